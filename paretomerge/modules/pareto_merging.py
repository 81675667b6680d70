"""Pareto Merging (SPEC §3): layer-wise λ plus a low-rank preference tensor, trained over γ ~ Dir(α·1); and ours,
which also conditions the task-vector coefficients on γ (``preference_coefficients``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from paretomerge.kernels import DEFAULT_TARGETS, PreferenceTensor, TaskVectors, preference_coefficients, select_targets
from paretomerge.kernels.basis import check_rank
from paretomerge.kernels.inputs import inputs_to
from paretomerge.modules.base import MergingModule
from paretomerge.modules.checkpoint import CheckpointError
from paretomerge.modules.ideal import IDEAL_BATCHES, check_ideal, first_batches, individual_objectives, resolve_ideal
from paretomerge.objectives import check_beta_div, cosine_alignment, frobenius_penalty, smooth_tchebycheff
from paretomerge.preferences import sample_dirichlet

#: The switches that turn our default back into the paper's method, SPEC §3 exactly (configs/pareto_merging_paper.yaml).
PAPER_CONFIGURATION = {"preference_coefficients": False, "beta_div": 0.0, "alpha": 1.0}

#: What a checkpoint written before each of these hyperparameters existed meant by it.
LEGACY_HYPERPARAMETERS = {"preference_coefficients": False, "beta_div": 0.0, "basis_rank": None, "omega_init": 0.0}

#: The rank of ours' preference basis (`kernels.PreferenceBasis`), chosen by benchmarks/bench_compact.py.
DEFAULT_BASIS_RANK = 16


class ParetoMerging(MergingModule):
    """Learns the Pareto set of merged models in one run; ``at(γ)`` gives the model for a preference.

    The defaults are **ours**: SPEC §3's method plus two switches, ``preference_coefficients`` (the task-vector
    coefficients depend on γ, starting from Task Arithmetic + preference) and ``beta_div`` (a diversity penalty),
    trained on preferences drawn from Dir(0.5) instead of Dir(1). ``preference_coefficients=False, beta_div=0,
    alpha=1`` (`PAPER_CONFIGURATION`) is the paper's configuration exactly (``configs/pareto_merging_paper.yaml``);
    there λ does not depend on γ and all of the preference's effect goes through the preference tensor.

    Args (the other defaults are SPEC §3's):
        task_vectors: a `TaskVectors`; if None, ``trainer.datamodule.task_vectors()`` is used in ``setup``.
        rank: r of the preference tensor (cores ``[r, r, K]``).
        alpha: Dirichlet concentration of the sampled preferences. Ours draws from Dir(0.5), which puts more of the
            training preferences near the edges and corners of the simplex, where a front's extent (and its
            hypervolume) is decided; the paper's is 1 (uniform on the simplex). On the TinySuite, with ω starting at
            λ_init, 0.5 instead of 1 took the hypervolume above Task Arithmetic + preference in 11 instead of 10 of
            the 12 small-task-set cases, and raised the 8-task one on seeds 0-2 (benchmarks/README.md,
            "front_quality.py").
        mu: smooth-Tchebycheff temperature.
        beta_cos: weight of the cosine alignment between entropies and 1/γ (subtracted).
        beta_frob: weight of Σ‖G‖_F².
        lr: Adam learning rate.
        lambda_init: initial value of every λ[l, k].
        lambda_bounds: λ is clamped to this range after each optimizer step; None leaves it free.
        targets: regex over parameter names choosing the preference tensor's target matrices; None for no
            preference tensor (γ then only weights the objective: an ablation, and the benchmark baseline).
        eps: floor of γ inside 1/γ.
        ties_top_k: TIES-preprocess the task vectors keeping this fraction of each (0.2 in the paper): Pareto
            Merging++ (SPEC §5). None uses them as they are.
        compile_forward: run the merged forward through ``torch.compile`` (True: inductor; or a backend's name).
            Off by default: on the TinySuite on 2 CPU cores, inductor takes 44 s to compile and then saves 12% of a
            step, about 6 s over 500 steps (benchmarks/bench_compile.py). Not measured on a GPU yet.
        preference_coefficients: ours. The merge's coefficients become c(γ) = clamp(λ + ω ⊙ (K·γ − 1),
            lambda_bounds) (`kernels.preference_coefficients`), with ω ``[L, K]`` learned from ``omega_init``: c = λ
            at the equal preference, and a one-hot e_k moves task k's coefficients by (K−1)·ω[:, k]. The preference
            then acts inside the span of the task vectors, where lowering a task's entropy tracks raising its
            accuracy. On the TinySuite the paper's preference tensor alone barely moves its task (own-task entropy by
            ≤ 0.02 nats at the one-hots); with c(γ) (today's defaults, seeds 0-2) the one-hots lower it by 0.09–0.12
            nats on average and raise 7–8 of 8 tasks by +5.4 to +7.5 points on average (benchmarks/README.md,
            "preference_response.py"). Costs L·K parameters, and a `.ckpt`
            or export then also stores the preference basis τ̃ that c(γ) − λ multiplies (``basis_rank``).
        basis_rank: ours. The preference basis: θ(γ) = θ0 + Σ_k λ_k τ_k + Σ_k (c_k(γ) − λ_k) τ̃_k + Δ(γ), where τ̃_k is
            each ≥2-D task vector's truncated SVD, stored as int8 factors (`kernels.PreferenceBasis`), so the stored
            set is one model plus factors. An int is the rank per matrix; a float in (0, 1) that fraction of each
            matrix's rank; None keeps the full task vectors (K more backbones in the `.ckpt`). The model trains with
            the basis it stores. The default, an absolute rank of 16 (a quarter of the TinySuite's 64-wide layers'
            rank), kept TinySuite seeds 0-3 within 0.9% of the full basis's hypervolume (rank 8 lost 1.75% on one)
            and stores ViT-B/32 at K = 8 in a `.ckpt` of 1.09 backbones (benchmarks/README.md, "bench_compact.py").
        omega_init: ours. ω's initial value; None (the default) is ``lambda_init``, so that c(γ) starts as
            clamp(λ_init·K·γ): Task Arithmetic + preference, the free front a learned one must beat, and training
            moves from there. ω learned from 0 starts at the single Task Arithmetic model for every γ and is slow to
            get anywhere: at lr 1e-3 over 500 steps, the learned front stayed below Task Arithmetic + preference in
            8 of 12 small-task-set cases; from λ_init it is above in 11 of 12 (with ``alpha`` 0.5;
            benchmarks/README.md, "front_quality.py").
        beta_div: ours. Weight of Σ_k KL(p̄_k ‖ uniform), the batch-mean prediction's divergence from uniform
            (`objectives.marginal_divergence`): it penalises a task collapsing onto one class. 0 turns it off. It acts
            on classifiers only: a language model's token batches have no classes to collapse onto (warned once).
        objective: each task's f_k: ``"entropy"`` (SPEC §3), ``"loss"`` (a language model's next-token loss on the
            task's unlabeled text, SPEC §3c), or None (the default): loss for token batches, entropy for images.
        ideal: the smooth-Tchebycheff ideal point z (`modules.ideal`): ``"zero"`` (SPEC §3), ``"individual"`` (each
            task's objective under its own fine-tuned model, measured when the fit starts), or None (the default):
            the objective's, individual for the loss and zero for the entropy. On TinyLM (Dir(1), seeds 0-2) z = 0
            left ours' equal-preference mean loss above AdaMerging's on 2 of 3 seeds and the individual ideal below it
            on all 3, with a 1.6-2.2x larger four-language hypervolume (docs/method.md, "The ideal point").
        preference_floor: ρ in [0, 1); the smooth-Tchebycheff term weighs the tasks by (1 − ρ)·γ + ρ/K instead of γ,
            so no task is ignored at a one-hot (the model is still built from γ). 0, the default, is SPEC §3's.
        mixed_tasks: how many tasks one training preference mixes: each γ is then Dir(α) over that many tasks chosen
            at random (0 elsewhere), so that a draw's largest weight is distributed as at K = mixed_tasks whatever K
            is. None (the default) mixes all K, SPEC §3's; at K ≤ mixed_tasks the draws are the plain ones, number
            for number. An opt-in for many tasks, not the default: on the TinySuite's 14- and 20-task sets (seeds
            0-2) 8 raised 85 of the 102 one-hots' own tasks instead of 79, but cost the equal preference 0.8-3.8
            points and about half the 20-task hypervolume (benchmarks/README.md, "many_tasks.py").
        seed: seeds the preference tensor's init and every γ draw, keyed by (seed, global_step, rank): one γ per
            optimizer step and process (micro-batches of an accumulated step share it).
    """

    def __init__(
        self,
        task_vectors: TaskVectors | None = None,
        rank: int = 16,
        alpha: float = 0.5,
        mu: float = 0.1,
        beta_cos: float = 0.1,
        beta_frob: float = 1.0,
        lr: float = 1e-3,
        lambda_init: float = 0.3,
        lambda_bounds: Sequence[float] | None = (0.0, 1.0),
        targets: str | None = DEFAULT_TARGETS,
        eps: float = 1e-3,
        seed: int = 0,
        ties_top_k: float | None = None,
        compile_forward: bool | str = False,
        preference_coefficients: bool = True,
        beta_div: float = 0.1,
        preference_floor: float = 0.0,
        mixed_tasks: int | None = None,
        basis_rank: int | float | None = DEFAULT_BASIS_RANK,
        omega_init: float | None = None,
        objective: str | None = None,
        ideal: str | None = None,
    ) -> None:
        super().__init__(lr=lr, lambda_init=lambda_init, lambda_bounds=lambda_bounds, ties_top_k=ties_top_k,
                         compile_forward=compile_forward, objective=objective)
        self.save_hyperparameters(ignore=["task_vectors", "compile_forward"])  # a .ckpt loads eagerly
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        for name, value in (("alpha", alpha), ("mu", mu), ("eps", eps)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if isinstance(preference_floor, bool) or not isinstance(preference_floor, (int, float)) \
                or not 0.0 <= preference_floor < 1.0:
            raise ValueError(f"preference_floor must be in [0, 1), got {preference_floor!r}")
        if mixed_tasks is not None and (isinstance(mixed_tasks, bool) or not isinstance(mixed_tasks, int)
                                        or mixed_tasks < 2):
            raise ValueError(f"mixed_tasks must be an integer of at least 2 (how many tasks one training preference "
                             f"mixes), or None to mix all of them; got {mixed_tasks!r}")
        if not isinstance(preference_coefficients, bool):
            raise ValueError(f"preference_coefficients must be true or false, got {preference_coefficients!r}")
        check_beta_div(beta_div)
        for name, value in (("beta_cos", beta_cos), ("beta_frob", beta_frob)):
            if not value >= 0:
                raise ValueError(f"{name} must be non-negative, got {value!r}")
        check_rank(basis_rank)
        check_ideal(ideal)
        if omega_init is not None and (isinstance(omega_init, bool) or not isinstance(omega_init, (int, float))
                                       or not math.isfinite(omega_init)):
            raise ValueError(f"omega_init must be a finite number or None (λ_init), got {omega_init!r}")
        self.preference_tensor: PreferenceTensor | None = None
        self.omega: torch.nn.Parameter | None = None
        self._ideal: Tensor | None = None  # z [K] where it is measured: once per fit (`ideal_point`)
        if task_vectors is not None:
            self.attach(task_vectors)

    def _build_trainable(self, tv: TaskVectors) -> None:
        if tv.num_tasks < 2:
            raise ValueError(f"Pareto Merging needs at least 2 tasks, got {tv.num_tasks}")
        targets = self.hparams.targets
        shapes = select_targets(dict(tv.backbone.named_parameters()), targets) if targets is not None else None
        super()._build_trainable(tv)
        if self.hparams.preference_coefficients:
            self.omega = torch.nn.Parameter(torch.full_like(self.lambdas, self.omega_start))
        if shapes is not None:
            self.preference_tensor = PreferenceTensor(
                shapes, tv.num_tasks, self.hparams.rank, seed=self.hparams.seed
            ).to(self.device)

    @property
    def preference_conditioned(self) -> bool:
        return self.omega is not None

    @property
    def omega_start(self) -> float:
        """ω's initial value: ``omega_init``, or λ_init where it is None (c(γ) then starts as λ_init·K·γ)."""
        omega_init = self.hparams.get("omega_init")
        return float(self.hparams.lambda_init if omega_init is None else omega_init)

    def coefficients(self, gamma: Tensor | None) -> Tensor:
        """λ, or ours: ``clamp(λ + ω ⊙ (K·γ − 1), lambda_bounds)``."""
        if self.omega is None:
            return self.lambdas
        if gamma is None:
            raise ValueError("ParetoMerging with preference_coefficients needs a preference γ to build its weights")
        bounds = self.hparams.lambda_bounds
        return preference_coefficients(self.lambdas, self.omega, gamma, None if bounds is None else tuple(bounds))

    def deltas(self, gamma: Tensor | None) -> dict[str, Tensor] | None:
        if self.preference_tensor is None:
            return None
        if gamma is None:
            raise ValueError("ParetoMerging needs a preference γ to build its weights")
        return self.preference_tensor.delta(gamma)

    def objective(self, logits: Mapping[str, Tensor], gamma: Tensor,
                  inputs: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """SPEC §3: ``loss = STCH_μ(f; γ) − β_cos·cos(f, 1/γ̃) + β_frob·Σ‖G‖²`` with f_k the mean entropy of task k
        (or, for a language model, its next-token loss: SPEC §3c, ``objective``); ours adds ``β_div·Σ_k KL(p̄_k ‖
        uniform)`` where ``beta_div`` > 0 (classifiers).

        Returns the loss and its parts (``stch``, ``cos``, ``frob``, ``div`` where used, ``f [K]``).
        """
        hp = self.hparams
        parts = self.task_objectives(logits, inputs)
        f = parts.pop("f")
        ideal = self.ideal_point(inputs)
        floor = hp.preference_floor
        stch = smooth_tchebycheff(f, (1.0 - floor) * gamma + floor / len(gamma) if floor else gamma, hp.mu, ideal)
        cos = cosine_alignment(f - ideal, gamma, hp.eps)
        cores = self.preference_tensor.cores() if self.preference_tensor is not None else []
        frob = frobenius_penalty(cores).to(f)
        loss = stch - hp.beta_cos * cos + hp.beta_frob * frob + parts.pop("penalty", 0.0)
        return {"loss": loss, "stch": stch, "cos": cos, "frob": frob, "f": f, **parts}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._ideal = None  # measured again at the first step: a resumed fit measures the same batches

    def ideal_point(self, inputs: Mapping[str, Any] | None) -> Tensor | float:
        """z of the smooth-Tchebycheff term for these batches (`modules.ideal`): 0, or each task's objective under its
        own fine-tuned model, measured at the first step of a fit on the first batches of a fresh training loader of
        the datamodule (else on ``inputs``) and averaged over the processes."""
        objective = self.objective_name(inputs)
        if resolve_ideal(self.hparams.get("ideal"), objective) == "zero":
            return 0.0
        if self._ideal is None:
            tv = self._tv()
            if not tv.has_task_vectors:
                raise RuntimeError("the individual ideal point needs the task vectors (a loaded .ckpt has none)")
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            batches = [inputs]
            if datamodule is not None and callable(getattr(datamodule, "train_dataloader", None)):
                batches = [{t: inputs_to(x, self.device) for t, (x, _) in
                            self.split_batch(b, tv.task_names, "train").items()}
                           for b in first_batches(datamodule.train_dataloader(), IDEAL_BATCHES)]
            ideal = individual_objectives(tv, batches, objective)
            if self._trainer is not None and self.trainer.world_size > 1:
                ideal = self.trainer.strategy.reduce(ideal, reduce_op="mean")
            self._ideal = ideal.detach()
        return self._ideal.to(self.device)

    def training_preference(self) -> Tensor:
        """γ ~ Dir(α·1) over ``mixed_tasks`` tasks chosen at random (all K where K ≤ mixed_tasks), keyed by (seed,
        global_step, rank)."""
        hp = self.hparams
        return sample_dirichlet(self._tv().num_tasks, hp.alpha, hp.seed, self.global_step, self.global_rank,
                                hp.get("mixed_tasks"))

    @classmethod
    def upgrade_hyperparameters(cls, stored: Mapping[str, Any]) -> dict[str, Any]:
        """A checkpoint written before preference-conditioned coefficients existed has neither ω nor their
        hyperparameters: it is the paper's model. One written before the compact set stored the full basis."""
        return {**LEGACY_HYPERPARAMETERS, **stored}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("hyper_parameters") is not None:
            stored = self.upgrade_hyperparameters(checkpoint["hyper_parameters"])
            if self.task_vectors is None:  # loading: the checkpoint decides
                self.hparams.update({key: stored[key] for key in LEGACY_HYPERPARAMETERS})
            else:  # resuming: what the stored state is must match
                keys = ("preference_coefficients", "basis_rank") if self.preference_conditioned else \
                    ("preference_coefficients",)
                for key in keys:
                    if self.hparams[key] != stored[key]:
                        raise CheckpointError(f"the checkpoint was trained with {key}={stored[key]!r}, this model has "
                                              f"{key}={self.hparams[key]!r}: resume with {key}={stored[key]!r}")
        super().on_load_checkpoint(checkpoint)
