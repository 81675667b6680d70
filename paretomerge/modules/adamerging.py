"""AdaMerging (Yang et al.; SPEC §5): merge coefficients learned by minimising prediction entropy on unlabeled
data, for one model. With a fixed preference γ it is *AdaMerging + preference* (one run per preference), with
``ties_top_k`` it is AdaMerging++."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from paretomerge.kernels import TaskVectors
from paretomerge.modules.base import MergingModule
from paretomerge.objectives import check_beta_div, linear_scalarization
from paretomerge.preferences import validate_preference

GRANULARITIES = ("layer", "task")

#: Hyperparameters that checkpoints written before their removal hold: ``seed``, which AdaMerging never used.
RETIRED_HYPERPARAMETERS = ("seed",)


class AdaMerging(MergingModule):
    """Learns λ by minimising ``Σ_k f_k`` (or ``Σ_k γ_k f_k`` for a fixed ``preference``), f_k the mean entropy (or a
    language model's next-token loss).

    Args:
        task_vectors: a `TaskVectors`; if None, ``trainer.datamodule.task_vectors()`` is used in ``setup``.
        granularity: ``"layer"`` (λ ``[L, K]``, one per layer and task) or ``"task"`` (λ ``[1, K]``, one per task).
        preference: a fixed γ (K non-negative weights, normalised); None for plain AdaMerging.
        lr, lambda_init, lambda_bounds: Adam's learning rate, the start value of λ, and its clamp after each step.
        ties_top_k: TIES-preprocess the task vectors keeping this fraction of each (AdaMerging++ uses 0.2).
        compile_forward: run the merged forward through ``torch.compile`` (True: inductor; or a backend's name).
        beta_div: the diversity term of the shared entropy objective (`objectives.task_objectives`), β_div ·
            Σ_k KL(p̄_k ‖ uniform), as in `ParetoMerging`; 0 (the default) is AdaMerging as published.
        objective: each task's f_k, as in `ParetoMerging`: ``"entropy"``, ``"loss"`` (a language model's next-token
            loss: FusionBench's AdaMerging for Llama minimises the summed LM loss), or None (loss for token batches,
            entropy for images).

    ``at()`` needs no preference: the model is the same for every γ (one given is validated, then ignored).
    """

    preference_aware = False

    def __init__(
        self,
        task_vectors: TaskVectors | None = None,
        granularity: str = "layer",
        preference: Sequence[float] | None = None,
        lr: float = 1e-3,
        lambda_init: float = 0.3,
        lambda_bounds: Sequence[float] | None = (0.0, 1.0),
        ties_top_k: float | None = None,
        compile_forward: bool | str = False,
        beta_div: float = 0.0,
        objective: str | None = None,
    ) -> None:
        super().__init__(lr=lr, lambda_init=lambda_init, lambda_bounds=lambda_bounds, ties_top_k=ties_top_k,
                         compile_forward=compile_forward, objective=objective)
        check_beta_div(beta_div)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if isinstance(preference, Tensor):
            preference = preference.tolist()
        if preference is not None:
            validate_preference(preference, len(preference))  # finite, non-negative, positive sum; length later
            preference = [float(p) for p in preference]
        self.save_hyperparameters(ignore=["task_vectors", "compile_forward"])  # a .ckpt loads eagerly
        if task_vectors is not None:
            self.attach(task_vectors)

    def _build_trainable(self, tv: TaskVectors) -> None:
        if self.hparams.preference is not None:
            validate_preference(self.hparams.preference, tv.num_tasks)  # one weight per task
        rows = len(tv.layer_names) if self.hparams.granularity == "layer" else 1
        self.lambdas = torch.nn.Parameter(
            torch.full((rows, tv.num_tasks), float(self.hparams.lambda_init), device=self.device)
        )

    def training_preference(self) -> Tensor:
        """The fixed preference, or the equal one (which only labels the step: the objective is Σ_k f_k)."""
        return self._preference(self._tv().num_tasks)

    def _preference(self, num_tasks: int) -> Tensor:
        if self.hparams.preference is None:
            return torch.full((num_tasks,), 1.0 / num_tasks)
        return validate_preference(self.hparams.preference, num_tasks)

    def objective(self, logits: Mapping[str, Tensor], gamma: Tensor,
                  inputs: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """``Σ_k f_k``, or ``Σ_k γ_k f_k`` with a fixed preference; plus ``β_div · Σ_k KL(p̄_k ‖ uniform)`` where
        ``beta_div`` > 0 (classifiers)."""
        parts = self.task_objectives(logits, inputs)
        f = parts["f"]
        weights = gamma if self.hparams.preference is not None else torch.ones_like(f)
        return {"loss": linear_scalarization(f, weights.to(f)) + parts.pop("penalty", 0.0), **parts}

    @classmethod
    def upgrade_hyperparameters(cls, stored: Mapping[str, Any]) -> dict[str, Any]:
        """Stored hyperparameters without the retired ones (a checkpoint written before ``seed`` was removed)."""
        return {key: value for key, value in stored.items() if key not in RETIRED_HYPERPARAMETERS}

    def evaluation_preferences(self, num_tasks: int) -> Tensor:
        """One model, so one evaluation (logged as ``{stage}/acc/merged/...``)."""
        return self._preference(num_tasks).unsqueeze(0)

    def preference_label(self, index: int) -> str:
        return "merged"
