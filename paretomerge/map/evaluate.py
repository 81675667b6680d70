"""Real evaluations for MAP: task-wise merges ``θ0 + Σ_k c_k τ_k`` through `kernels.merge`, run by the kernels'
forward on data prepared once, and counted (an evaluation is one merged model on one task: MAP's cost unit)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics.functional.classification import multiclass_accuracy

from paretomerge.kernels import TaskVectors, forward_features, forward_features_many, merge, run_head, select_model

METRICS = ("accuracy", "loss")


class MergeEvaluator:
    """``evaluator(c [n, K]) -> [n, K]``: each task's accuracy (or cross-entropy loss) of each merged model.

    data: task -> (images ``[N, C, H, W]``, labels ``[N]``), e.g. a suite's validation split; moved to the task
    vectors' device once. models_per_call: how many merged models one forward call runs (``forward_features_many``,
    a vmap over the kernel's leading model dimension); 1 (the default) evaluates them one at a time. On the default
    TinySuite, 2-core CPU, 8 models per call took 1.97× as long per model as one at a time (`bench_map.py --tables
    4`, median of 4 alternating rounds; torch has no vmap rule for `_native_multi_head_attention` and loops). Not
    yet measured on a GPU.
    """

    def __init__(self, task_vectors: TaskVectors, data: Mapping[str, tuple[Tensor, Tensor]], metric: str = "accuracy",
                 models_per_call: int = 1, batch_size: int = 256) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        missing = [t for t in task_vectors.task_names if t not in data]
        if missing:
            raise ValueError(f"no evaluation data for tasks {missing}")
        for name, value in (("models_per_call", models_per_call), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.tv, self.metric = task_vectors, metric
        self.models_per_call, self.batch_size = models_per_call, batch_size
        device = task_vectors.device
        self.data = {t: (data[t][0].to(device), data[t][1].to(device)) for t in task_vectors.task_names}
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
            rows.append(self._score(params, len(chunk), tasks))
        self.count += len(c) * len(tasks)
        return np.concatenate(rows)

    def _score(self, params: Mapping[str, Tensor], num_models: int, tasks: Sequence[str]) -> np.ndarray:
        scores = np.full((num_models, self.tv.num_tasks), np.nan)
        for k, task in enumerate(self.tv.task_names):
            if task not in tasks:
                continue
            images, labels = self.data[task]
            features = torch.cat([self._features(params, num_models, x) for x in images.split(self.batch_size)], dim=1)
            logits = torch.stack([run_head(task, self.tv.heads[task], f) for f in features])  # [M, N, C]
            for m in range(num_models):
                if self.metric == "accuracy":
                    scores[m, k] = float(multiclass_accuracy(logits[m], labels, logits.shape[-1], average="micro"))
                else:
                    scores[m, k] = float(F.cross_entropy(logits[m].float(), labels))
        return scores

    def _features(self, params: Mapping[str, Tensor], num_models: int, images: Tensor) -> Tensor:
        if num_models > 1:
            return forward_features_many(self.tv.backbone, params, images)
        return forward_features(self.tv.backbone, select_model(params, 0), images).unsqueeze(0)
