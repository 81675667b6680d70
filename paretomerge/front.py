"""Evaluating a learned front: the preference set, per-task scores of ``module.at(γ)`` for each preference, and
the reference points drawn beside it (θ0, the individual fine-tuned models, Task Arithmetic).

Shared by the callbacks (`FitSummary`, `ParetoFrontLogger`, `MAPBaseline`), ``paretomerge front`` and the
benchmarks. A *datamodule* here is anything with ``evaluate(net, split, tasks=None) -> {task: score}`` and, where the
score is not an accuracy, a ``score`` attribute (`pareto.score_of`): the TinySuite's accuracy, a language model
suite's next-token loss. Models are run through ``at(...)`` and so through the one merge and forward of `kernels`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from paretomerge.kernels import TaskVectors, materialize
from paretomerge.pareto import score_of
from paretomerge.preferences import equal_and_one_hots, front_preferences
from paretomerge.progress import progress_bar
from paretomerge.static import static_model, task_wise


def summary_preferences(num_tasks: int, seed: int = 0) -> torch.Tensor:
    """The equal preference, the K one-hots, then the rest of the SPEC §4 front set (no duplicates): ``[P, K]``."""
    fixed = equal_and_one_hots(num_tasks)
    rest = [p for p in front_preferences(num_tasks, seed) if not any(torch.allclose(p, f) for f in fixed)]
    return torch.cat([fixed, torch.stack(rest)]) if rest else fixed


def preference_aware(module: Any) -> bool:
    """Whether ``module.at(γ)`` depends on γ: the module's ``preference_aware`` (`MergingModule` declares it), and True
    for a module that does not say (the one default, for every caller)."""
    return bool(getattr(module, "preference_aware", True))


def module_preferences(module: Any, seed: int = 0) -> torch.Tensor:
    """The preferences to evaluate a module's front at: `summary_preferences` for a preference-aware module, and the
    equal preference alone for a one-model module (AdaMerging), whose every preference gives the same model."""
    num_tasks = module.task_vectors.num_tasks
    if preference_aware(module):
        return summary_preferences(num_tasks, seed)
    return torch.full((1, num_tasks), 1.0 / num_tasks)


def evaluate_front(module: Any, datamodule: Any, preferences: torch.Tensor, progress: bool = True,
                   split: str = "test") -> torch.Tensor:
    """Scores ``[P, K]``: ``datamodule.evaluate(module.at(p), split)`` for each preference row, in task order."""
    rows = []
    for p in progress_bar(preferences, desc=f"evaluating the front on the {split} split", enabled=progress):
        accuracy = datamodule.evaluate(module.at(p), split=split)
        rows.append([accuracy[t] for t in module.task_vectors.task_names])
    return torch.tensor(rows, dtype=torch.float64)


def static_front(name: str, task_vectors: TaskVectors, datamodule: Any, preferences: torch.Tensor,
                 split: str = "test", **options: Any) -> torch.Tensor:
    """Scores ``[P, K]`` of a preference-taking static merge (``task_arithmetic_preference``) at each preference
    row."""
    rows = []
    for p in preferences:
        accuracy = datamodule.evaluate(static_model(name, task_vectors, preference=p, **options), split=split)
        rows.append([accuracy[t] for t in task_vectors.task_names])
    return torch.tensor(rows, dtype=torch.float64)


def individual_scores(task_vectors: TaskVectors, datamodule: Any, split: str = "test") -> np.ndarray:
    """``[K]``: each fine-tuned model θ0 + τ_k on its own task k (with its own float buffers, whatever the policy)."""
    values = []
    for k, task in enumerate(task_vectors.task_names):
        net = materialize(task_vectors, task_wise(task_vectors, torch.eye(task_vectors.num_tasks)[k], "merged"))
        values.append(datamodule.evaluate(net, split=split, tasks=[task])[task])
    return np.asarray(values)


def zero_shot_scores(task_vectors: TaskVectors, datamodule: Any, split: str = "test") -> np.ndarray:
    """``[K]``: the pre-trained model θ0 with each task's head (no task vector added) on every task."""
    net = materialize(task_vectors, task_wise(task_vectors, torch.zeros(task_vectors.num_tasks), "pretrained"))
    accuracy = datamodule.evaluate(net, split=split)
    return np.asarray([accuracy[t] for t in task_vectors.task_names])


def static_point(name: str, task_vectors: TaskVectors, datamodule: Any, split: str = "test") -> np.ndarray:
    """``[1, K]``: the scores of the registered static merge ``name`` (e.g. Task Arithmetic)."""
    accuracy = datamodule.evaluate(static_model(name, task_vectors), split=split)
    return np.array([[accuracy[t] for t in task_vectors.task_names]])


def reference_point(task_vectors: TaskVectors | None, datamodule: Any, split: str = "test",
                    report: dict | None = None) -> np.ndarray | None:
    """The hypervolume's reference point ``[K]`` for the datamodule's score (SPEC §3c): None for an accuracy (the
    origin); for a loss, the pretrained model θ0's per-task loss on ``split``: read from the suite's build report
    (``zero_shot_loss``, test split) where it has it, else computed from the task vectors; None when neither is
    there (a loss front then has no hypervolume)."""
    score = score_of(datamodule)
    if score.higher_is_better:
        return None
    tasks = list(task_vectors.task_names) if task_vectors is not None else list(getattr(datamodule, "tasks", []))
    key = f"zero_shot_{score.name}"
    if split == "test" and report and tasks and all(key in report["tasks"].get(t, {}) for t in tasks):
        return np.asarray([report["tasks"][t][key] for t in tasks], dtype=np.float64)
    if task_vectors is not None and task_vectors.has_task_vectors:
        return zero_shot_scores(task_vectors, datamodule, split)
    return None


def describe_reference(reference: np.ndarray | None, tasks: list[str], datamodule: Any) -> str:
    """The reference point said beside a hypervolume: ``reference point 0`` for accuracy, or θ0's per-task loss."""
    score = score_of(datamodule)
    if reference is None:
        return "reference point 0" if score.higher_is_better else "no reference point"
    values = ", ".join(f"{t} {v:.3f}" for t, v in zip(tasks, reference, strict=True))
    return f"reference point: the pretrained model's per-task {score.name} ({values}); volume of the gains over it"
