"""Real evaluations for MAP: task-wise merges ``θ0 + Σ_k c_k τ_k`` through `kernels.merge`, run by the kernels'
forward on data prepared once, and counted (an evaluation is one merged model on one task: MAP's cost unit).

Scores: a classifier's accuracy (or its cross-entropy on the labels), or a language model's next-token loss on each
task's text (the MAP paper's loss metric for Llama merges). The evaluator's `score` says which way is better, and the
surrogates, the search and the metrics read it from there."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics.functional.classification import multiclass_accuracy

from paretomerge.kernels import TaskVectors, forward_features, forward_features_many, merge, run_head, select_model
from paretomerge.kernels.buffers import buffers_for
from paretomerge.kernels.inputs import Inputs, inputs_to, is_tokens, split_rows
from paretomerge.objectives import next_token_loss_sum
from paretomerge.pareto import SCORES, Score

METRICS = ("accuracy", "loss")


def surrogate_kind(score: Score) -> tuple[str, float, float | None]:
    """The MAP paper's surrogate case for a score (`QuadraticSurrogate`): accuracy in [0, 1] is case 2 (``bounded``),
    a loss in [0, ∞) case 3 (``lower_bounded``). Returns ``(kind, low, high)``."""
    return ("bounded", 0.0, 1.0) if score.higher_is_better else ("lower_bounded", 0.0, None)


class MergeEvaluator:
    """``evaluator(c [n, K]) -> [n, K]``: each task's accuracy (or cross-entropy loss) of each merged model.

    data: task -> (images ``[N, C, H, W]``, labels ``[N]``), e.g. a suite's validation split; or, for a language model,
    task -> its token batch (`kernels.inputs`; ``(tokens, None)`` too), scored by the next-token loss (``metric`` must
    be ``"loss"``, the default for tokens). Moved to the task vectors' device once. ``score`` is the `Score` of the
    metric. models_per_call: how many merged models one forward call runs (``forward_features_many``, images only,
    a vmap over the kernel's leading model dimension); 1 (the default) evaluates them one at a time. On the default
    TinySuite, 2-core CPU, 8 models per call took 1.97× as long per model as one at a time (`bench_map.py --tables
    4`, median of 4 alternating rounds; torch has no vmap rule for `_native_multi_head_attention` and loops). Not
    yet measured on a GPU.
    """

    def __init__(self, task_vectors: TaskVectors, data: Mapping[str, tuple[Tensor, Tensor] | Inputs],
                 metric: str | None = None, models_per_call: int = 1, batch_size: int = 256) -> None:
        missing = [t for t in task_vectors.task_names if t not in data]
        if missing:
            raise ValueError(f"no evaluation data for tasks {missing}")
        pairs = {t: data[t] if isinstance(data[t], (tuple, list)) else (data[t], None) for t in task_vectors.task_names}
        self.tokens = any(is_tokens(inputs) for inputs, _ in pairs.values())
        metric = metric or ("loss" if self.tokens else "accuracy")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if self.tokens and (metric != "loss" or models_per_call != 1):
            raise ValueError("a language model's text is scored by its next-token loss (metric='loss'), one model per "
                             f"call; got metric={metric!r}, models_per_call={models_per_call}")
        unlabeled = [t for t, (inputs, labels) in pairs.items() if labels is None and not is_tokens(inputs)]
        if unlabeled:
            raise ValueError(f"evaluation images need labels: give (images, labels) for tasks {unlabeled}")
        for name, value in (("models_per_call", models_per_call), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.tv, self.metric, self.score = task_vectors, metric, SCORES[metric]
        self.models_per_call, self.batch_size = models_per_call, batch_size
        device = task_vectors.device
        self.data = {t: (inputs_to(inputs, device), None if labels is None else labels.to(device))
                     for t, (inputs, labels) in pairs.items()}
        self.count = 0

    @torch.no_grad()
    def __call__(self, c: np.ndarray, tasks: Sequence[str] | None = None) -> np.ndarray:
        """Scores ``[n, K]``; with ``tasks``, only those columns are evaluated (and counted), the others are NaN."""
        c = np.atleast_2d(np.asarray(c, dtype=np.float64))
        if c.shape[1] != self.tv.num_tasks or not np.isfinite(c).all():
            raise ValueError(f"scaling vectors must be finite [n, K={self.tv.num_tasks}], got shape {c.shape}")
        tasks = list(self.tv.task_names) if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in self.tv.task_names]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the task vectors have {list(self.tv.task_names)}")
        rows = []
        for start in range(0, len(c), self.models_per_call):
            chunk = torch.as_tensor(c[start:start + self.models_per_call], dtype=torch.float32, device=self.tv.device)
            params = merge(self.tv.theta0, self.tv.tau, chunk.unsqueeze(1))  # [M, 1, K] -> name: [M, *shape]
            params |= buffers_for(self.tv, chunk.unsqueeze(1), params)  # and the float buffers of the policy
            rows.append(self._score(params, len(chunk), tasks))
        self.count += len(c) * len(tasks)
        return np.concatenate(rows)

    def _score(self, params: Mapping[str, Tensor], num_models: int, tasks: Sequence[str]) -> np.ndarray:
        scores = np.full((num_models, self.tv.num_tasks), np.nan)
        for k, task in enumerate(self.tv.task_names):
            if task not in tasks:
                continue
            images, labels = self.data[task]
            if self.tokens:
                scores[0, k] = self._token_loss(params, images)
                continue
            features = torch.cat([self._features(params, num_models, x) for x in images.split(self.batch_size)], dim=1)
            logits = torch.stack([run_head(task, self.tv.heads[task], f) for f in features])  # [M, N, C]
            for m in range(num_models):
                if self.metric == "accuracy":
                    scores[m, k] = float(multiclass_accuracy(logits[m], labels, logits.shape[-1], average="micro"))
                else:
                    scores[m, k] = float(F.cross_entropy(logits[m].float(), labels))
        return scores

    def _token_loss(self, params: Mapping[str, Tensor], tokens: Mapping[str, Tensor]) -> float:
        """One merged language model's next-token loss over every predicted token of ``tokens``."""
        total, count, model = 0.0, 0, select_model(params, 0)
        for chunk in split_rows(tokens, self.batch_size):
            chunk_total, chunk_count = next_token_loss_sum(forward_features(self.tv.backbone, model, chunk), chunk)
            total, count = total + float(chunk_total), count + chunk_count
        return total / max(count, 1)

    def _features(self, params: Mapping[str, Tensor], num_models: int, images: Tensor) -> Tensor:
        if num_models > 1:
            return forward_features_many(self.tv.backbone, params, images)
        return forward_features(self.tv.backbone, select_model(params, 0), images).unsqueeze(0)
