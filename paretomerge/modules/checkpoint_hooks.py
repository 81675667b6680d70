"""A merging module's side of `.ckpt` I/O: what it writes at save (`checkpoint.pack`), how it rebuilds itself from a
checkpoint in a fresh process (`restore`), the checks made when resuming, and ``load_from_checkpoint``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from paretomerge.modules import checkpoint as ckpt
from paretomerge.modules.checkpoint import CheckpointError


class CheckpointHooks:
    """Mixed into `MergingModule` (a LightningModule): uses its ``task_vectors``, ``_tv()``, ``attach``,
    ``base_parameters()``, ``preference_basis()``, ``preference_conditioned`` and ``_basis``."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        tv = self._tv()
        missing = ckpt.unrecorded(tv)
        if missing and not self._said_unrecorded:
            self._said_unrecorded = True
            loader = f"{type(self).__name__}.load_from_checkpoint"
            rank_zero_warn(f"{type(self).__name__}: this checkpoint {ckpt.missing_modules_message(missing, loader)}")
        checkpoint[ckpt.SECTION] = ckpt.pack(tv, self.base_parameters(), self.preference_basis())
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is not None:  # what `paretomerge front` and `export` rebuild to evaluate or take a tokenizer
            cls = type(datamodule)
            checkpoint[ckpt.SECTION]["datamodule_class"] = f"{cls.__module__}.{cls.__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        section = ckpt.section_of(checkpoint)
        if self.task_vectors is None:
            state = checkpoint.get("state_dict") or {}
            self.restore(section, loader=f"{type(self).__name__}.load_from_checkpoint",
                         state_dtype=state["lambdas"].dtype if "lambdas" in state else None)
            return
        # resuming: the task vectors must be those the checkpoint was trained with, and the basis is the stored one
        ckpt.check_compatible(ckpt.section_signature(section), self.task_vectors, "the checkpoint")
        lambdas = checkpoint.get("state_dict", {}).get("lambdas")
        if self.task_vectors.has_task_vectors and lambdas is not None:
            ckpt.check_same_weights(section, self.task_vectors, lambdas)
        self._restore_basis(section)

    def restore(self, section: Mapping[str, Any], loader: str, backbone: nn.Module | None = None,
                heads: Mapping[str, nn.Module] | None = None, state_dtype: torch.dtype | None = None) -> None:
        """Rebuild from a `.ckpt`'s section (or an export's, `load_pareto_set`) in a process that has nothing else:
        the base-only task vectors (``backbone``/``heads`` for what it could not record; in the dtype the base was
        saved in) and the preference basis. λ, ω, G, A, B are made ``state_dtype`` (the dtype they were saved in) and
        loaded after this, from the state dict."""
        self.attach(ckpt.unpack(section, backbone, heads, loader=loader))
        if state_dtype is not None:
            for param in self.parameters():
                param.data = param.data.to(state_dtype)
        self._restore_basis(section)

    def _restore_basis(self, section: Mapping[str, Any]) -> None:
        # The stored basis, bit for bit: at(γ) after loading, and a resumed fit, use the formula the model trained with.
        tv = self.task_vectors
        self._basis = ckpt.unpack_basis(section, tv, self.hparams.get("basis_rank"))
        if self.preference_conditioned and self._basis is None:
            raise CheckpointError(f"{type(self).__name__} has preference-conditioned coefficients, but the checkpoint "
                                  "holds no preference basis for them (written by the paper's configuration, or "
                                  "damaged)")
        if self._basis is not None and self.hparams.get("basis_rank") is None and tv.has_task_vectors:
            # The full basis is τ: resuming keeps the task vectors (shared) once they are checked to be the stored ones.
            for name, stored in self._basis.dense.items():
                if not torch.equal(stored, tv.tau[name].to(stored.dtype)):
                    raise CheckpointError(f"the task vectors differ from the ones this checkpoint was trained with "
                                          f"(its full preference basis), first at layer {name!r}")
            self._basis = None

    @classmethod
    def upgrade_hyperparameters(cls, stored: Mapping[str, Any]) -> dict[str, Any]:
        """Stored hyperparameters with what a checkpoint written before a hyperparameter existed meant by it."""
        return dict(stored)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool = True,
        backbone: nn.Module | None = None,
        heads: Mapping[str, nn.Module] | None = None,
        **kwargs: Any,
    ):
        """Lightning's loader, after checking the file; unpickles nothing but weights unless told to.

        ``backbone`` and ``heads`` (task -> module) rebuild what the checkpoint could not record (a backbone or heads
        that are not a recognised builder's: it says so at save, and loading without them names them): modules of
        the same class and parameter shapes, whose weights are replaced by the checkpoint's (copies are loaded; the
        modules given are left as they are). Other ``kwargs`` override hyperparameters, as in Lightning.
        """
        with ckpt.supplied_modules(backbone, heads):  # checks their types first
            if not hasattr(checkpoint_path, "read"):
                ckpt.inspect_checkpoint(checkpoint_path, weights_only=weights_only)
            return super().load_from_checkpoint(
                checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict,
                weights_only=weights_only, **kwargs,
            )
