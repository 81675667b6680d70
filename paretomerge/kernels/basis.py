"""The preference basis τ̃ (SPEC §3b): what the preference-dependent part of ours, Σ_k (c_k(γ) − λ_k) τ̃_k, multiplies.

Per merged layer it is either

- **factored**: a truncated SVD of each task vector, reshaped to a matrix ``[m, n] = [shape[0], prod(shape[1:])]``:
  ``τ̃_k = U_k V_kᵀ`` of rank ``r``, with the singular values folded into ``U``. Stored as ``left [m, K, r]`` and
  ``right [n, K, r]`` (a `Factor` each), so that ``left.reshape(m, K·r)`` is every task's factors side by side.
  The factors are int8 codes with one scale per column (one task's one singular component, symmetric, 127 levels):
  a quarter of float32's bytes. The model trains with the dequantized factors, the very numbers loading rebuilds;
- **dense**: τ_k itself, ``[K, *shape]``: every layer of the full basis (``rank=None``), and a matrix whose factors
  would hold as many numbers as the matrix does.

Parameters that are not ≥2-D (biases, norms, embeddings' vectors) are left out of a truncated basis: their
preference-dependent part is 0, so they take λ alone (keeping them dense moved the TinySuite's hypervolume by ±0.3%:
benchmarks/README.md, "bench_compact.py"). For one matrix the preference part costs one ``[m, K·r] × [K·r, n]``
product, which reads ``K·r·(m + n)`` numbers, against the ``K·m·n`` the full basis reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from paretomerge.progress import progress_bar


def check_rank(rank: Any) -> int | float | None:
    """A basis rank: None (the full basis), a positive int (per matrix), or a float in (0, 1) (that fraction of each
    matrix's rank ``min(m, n)``, rounded up)."""
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"basis_rank must be None, a positive int or a fraction in (0, 1), got {rank!r}")
    if isinstance(rank, int) and rank >= 1:
        return rank
    if isinstance(rank, float) and 0.0 < rank < 1.0:
        return rank
    raise ValueError(f"basis_rank must be None, a positive int or a fraction in (0, 1), got {rank!r}")


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A ≥2-D weight as the matrix the basis factors: ``[shape[0], prod(shape[1:])]``."""
    return shape[0], math.prod(shape[1:])


def layer_rank(shape: tuple[int, ...], rank: int | float | None) -> int | None:
    """How one layer is stored: its factors' rank, or None where it is dense (the full basis; a matrix whose factors
    would not be smaller). 0: left out (not ≥2-D, in a truncated basis)."""
    if rank is None:
        return None
    if len(shape) < 2:
        return 0
    m, n = matrix_shape(shape)
    r = rank if isinstance(rank, int) else math.ceil(rank * min(m, n))
    r = min(r, m, n)
    return r if r * (m + n) < m * n else None


#: The factors' storage: 8 (int8 codes and a scale per column) or None (the SVD's floats, in τ's dtype).
FACTOR_BITS: int | None = 8


@dataclass(frozen=True)
class Factor:
    """One side of a layer's factors, ``[rows, K, r]``: int8 ``codes`` with a ``scale [K, r]`` per column, or floats
    (``scale`` None)."""

    codes: Tensor
    scale: Tensor | None = None

    @classmethod
    def quantize(cls, values: Tensor, bits: int | None) -> Factor:
        """Symmetric per-column quantization: each column divided by its largest magnitude over 127, rounded (in the
        values' precision; the scale is kept in float32 at least)."""
        if bits is None:
            return cls(values)
        if bits != 8:
            raise ValueError(f"factors are stored in 8 bits or as floats, not {bits}")
        scale = values.abs().amax(dim=0) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(values / scale).clamp_(-127, 127).to(torch.int8)
        return cls(codes, scale.to(torch.float32) if scale.dtype == torch.float64 else scale)

    def values(self, dtype: torch.dtype) -> Tensor:
        """The factor ``[rows, K, r]`` in ``dtype`` (codes × scale)."""
        out = self.codes.to(dtype)
        return out if self.scale is None else out * self.scale.to(dtype)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device | None:
        tensors = self.tensors()
        return tensors[0].device if tensors else None

    def tensors(self) -> list[Tensor]:
        return [self.codes] if self.scale is None else [self.codes, self.scale]

    def apply(self, fn: Callable[[Tensor], Tensor]) -> Factor:
        return Factor(fn(self.codes), None if self.scale is None else fn(self.scale))


class PreferenceBasis:
    """τ̃ for every merged layer: ``dense`` (name -> ``[K, *shape]``) and ``factors`` (name -> a `Factor` pair ``(left
    [m, K, r], right [n, K, r])``); a layer in neither has no preference-dependent part. Build with `full` or
    `truncated`."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], num_tasks: int, dense: Mapping[str, Tensor],
                 factors: Mapping[str, tuple[Factor, Factor]]) -> None:
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.num_tasks = num_tasks
        self.dense = dict(dense)
        self.factors = {name: (left, right) for name, (left, right) in factors.items()}
        self._dequantized: dict[tuple[str, torch.dtype], tuple[Tensor, Tensor]] = {}

    @classmethod
    def full(cls, tau: Mapping[str, Tensor]) -> PreferenceBasis:
        """The task vectors themselves (shared, not copied): ours before the compact set, ``basis_rank=None``."""
        num_tasks = next(iter(tau.values())).shape[0]
        return cls({n: tuple(t.shape[1:]) for n, t in tau.items()}, num_tasks, tau, {})

    @classmethod
    @torch.no_grad()
    def truncated(cls, tau: Mapping[str, Tensor], rank: int | float | None) -> PreferenceBasis:
        """Each ≥2-D task vector's truncated SVD at `layer_rank` (computed in float64), stored as
        `FACTOR_BITS` says (int8 codes with float32 scales, or floats in τ's dtype); dense where factors would not be
        smaller; other layers left out. ``rank=None`` is `full`."""
        rank = check_rank(rank)
        if rank is None:
            return cls.full(tau)
        num_tasks = next(iter(tau.values())).shape[0]
        shapes = {n: tuple(t.shape[1:]) for n, t in tau.items()}
        dense, factors = {}, {}
        work = [n for n in tau if layer_rank(shapes[n], rank) != 0]
        large = sum(tau[n].numel() for n in work) > 2**24  # a bar only where it takes a while (CLIP on a CPU)
        for name in progress_bar(work, desc=f"preference basis: truncated SVD of each task vector (rank {rank})",
                                 large=large):
            r = layer_rank(shapes[name], rank)
            if r is None:
                dense[name] = tau[name]
                continue
            left, right = truncated_svd(tau[name], r)  # in float64: quantized from there
            if FACTOR_BITS is None:
                dtype = torch.promote_types(tau[name].dtype, torch.float32)
                left, right = left.to(dtype), right.to(dtype)
            factors[name] = (Factor.quantize(left, FACTOR_BITS), Factor.quantize(right, FACTOR_BITS))
        return cls(shapes, num_tasks, dense, factors)

    # ---------------------------------------------------------------- the merge's part
    def add_to(self, name: str, base: Tensor, coefficients: Tensor) -> Tensor:
        """``base + Σ_k coefficients[..., k] · τ̃_k`` for a factored layer, in ``base``'s dtype: one ``addmm`` of
        ``[m, K·r] × [K·r, n]`` per model (``coefficients [K]``), or a batched product for ``[*M, K]``.
        Differentiable in ``base`` and ``coefficients``."""
        left, right = self._matrices(name, base.dtype)
        scale = coefficients.to(base.dtype).repeat_interleave(left.shape[1] // self.num_tasks, dim=-1)  # [*M, K·r]
        if coefficients.ndim == 1:
            return torch.addmm(base.reshape(left.shape[0], right.shape[1]), left * scale, right).view(base.shape)
        return base + self.combine(name, coefficients, base.dtype)

    def combine(self, name: str, coefficients: Tensor, dtype: torch.dtype) -> Tensor:
        """``Σ_k coefficients[..., k] · τ̃_k`` of a factored layer: ``[*M, K]`` gives ``[*M, *shape]`` in ``dtype``."""
        left, right = self._matrices(name, dtype)
        scale = coefficients.to(dtype).repeat_interleave(left.shape[1] // self.num_tasks, dim=-1)
        product = (left * scale.unsqueeze(-2)) @ right
        return product.reshape(*coefficients.shape[:-1], *self.shapes[name])

    def _matrices(self, name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Every task's factors side by side, dequantized once per dtype (kept until the basis moves): ``[m, K·r]``
        and ``[K·r, n]``."""
        key = (name, dtype)
        if key not in self._dequantized:
            left, right = self.factors[name]
            k_r = left.shape[1] * left.shape[2]
            with torch.inference_mode(False), torch.no_grad():  # built under inference mode, still usable in training
                self._dequantized[key] = (left.values(dtype).reshape(-1, k_r), right.values(dtype).reshape(-1, k_r).T)
        return self._dequantized[key]

    # ---------------------------------------------------------------- views
    @property
    def names(self) -> tuple[str, ...]:
        """The layers with a preference-dependent part."""
        return (*self.dense, *self.factors)

    def ranks(self) -> dict[str, int | None]:
        """name -> the factors' rank, or None for a dense layer."""
        return {**{n: None for n in self.dense}, **{n: left.shape[-1] for n, (left, _) in self.factors.items()}}

    @property
    def device(self) -> torch.device | None:
        tensors = self.tensors()
        return tensors[0].device if tensors else None

    def tensors(self) -> list[Tensor]:
        return [*self.dense.values(), *(t for pair in self.factors.values() for side in pair for t in side.tensors())]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @torch.no_grad()
    def kept(self, tau: Mapping[str, Tensor]) -> float:
        """The share of the task vectors' squared norm the basis holds: Σ_k ‖τ̃_k‖² / Σ_k ‖τ_k‖² over every layer
        (1 for the full basis; a layer left out holds none). ‖U Vᵀ‖² is taken as tr(UᵀU VᵀV), without the matrix."""
        held = sum(float(self.dense[n].double().pow(2).sum()) for n in self.dense)
        for left, right in self.factors.values():
            u, v = left.values(torch.float64), right.values(torch.float64)  # [m, K, r], [n, K, r]
            held += float(torch.einsum("mki,mkj,nki,nkj->", u, u, v, v))
        total = sum(float(t.double().pow(2).sum()) for t in tau.values())
        return held / total if total > 0 else 1.0

    def apply_(self, fn: Callable[[Tensor], Tensor]) -> PreferenceBasis:
        """Apply a tensor conversion (``.to``/``.half``, as `TaskVectors.apply_`) in place; returns self."""
        self.dense = {n: fn(t) for n, t in self.dense.items()}
        self.factors = {n: (a.apply(fn), b.apply(fn)) for n, (a, b) in self.factors.items()}
        self._dequantized = {}
        return self

    def __repr__(self) -> str:
        ranks = sorted({r for r in self.ranks().values() if r is not None})
        return (f"PreferenceBasis(tasks={self.num_tasks}, factored={len(self.factors)} (rank {ranks}), "
                f"dense={len(self.dense)}, left out={len(self.shapes) - len(self.names)}, "
                f"{self.nbytes() / 2**20:.2f} MiB)")

    # ---------------------------------------------------------------- storage
    def state(self) -> dict[str, dict[str, Tensor]]:
        """What a `.ckpt` and an export store, on the CPU: ``dense`` (name -> ``[K, *shape]``), ``left`` and ``right``
        (name -> ``[m|n, K, r]``: int8 codes, or floats), ``left_scale`` and ``right_scale`` (name -> ``[K, r]``, for
        codes)."""
        out: dict[str, dict[str, Tensor]] = {"dense": {n: t.detach().cpu() for n, t in self.dense.items()}}
        for index, side in enumerate(("left", "right")):
            out[side] = {n: pair[index].codes.detach().cpu() for n, pair in self.factors.items()}
            out[f"{side}_scale"] = {n: pair[index].scale.detach().cpu() for n, pair in self.factors.items()
                                    if pair[index].scale is not None}
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Mapping[str, Tensor]], shapes: Mapping[str, tuple[int, ...]],
                   num_tasks: int, rank: int | float | None) -> PreferenceBasis:
        """A stored basis, checked against what ``rank`` gives for these layer ``shapes`` (name -> shape): every layer
        present in the right form, with the right shapes and finite values. Raises ``ValueError`` naming the first
        layer that is missing, unexpected, of the wrong shape or kind, or not finite."""
        parts = {part: dict(state.get(part) or {}) for part in ("dense", "left", "right", "left_scale", "right_scale")}
        for part, entries in parts.items():
            for name, value in entries.items():
                if name not in shapes:
                    raise ValueError(f"the preference basis has {part} entries for {name!r}, which is not a merged "
                                     "layer of this model")
                if not isinstance(value, Tensor):
                    raise ValueError(f"the preference basis's {part} entry for layer {name!r} is not a tensor")
        dense, factors = {}, {}
        for name, shape in shapes.items():
            r = layer_rank(shape, rank)
            present = [part for part, entries in parts.items() if name in entries]
            if r == 0:
                if present:
                    raise ValueError(f"the preference basis holds layer {name!r}, which rank {rank!r} leaves out")
                continue
            if r is None:
                expected = (num_tasks, *shape)
                if present != ["dense"]:
                    raise ValueError(f"the preference basis has no task vectors for layer {name!r}" if not present else
                                     f"the preference basis holds layer {name!r} as {present}, expected it dense")
                value = parts["dense"][name]
                if tuple(value.shape) != expected or not value.is_floating_point():
                    raise ValueError(f"the preference basis's layer {name!r} is {tuple(value.shape)} {value.dtype}, "
                                     f"expected the dense {expected} task vectors")
                _check_finite(name, value)
                dense[name] = value
                continue
            if "left" not in present or "right" not in present or "dense" in present:
                raise ValueError(f"the preference basis has no factors for layer {name!r} (rank {r})")
            m, n = matrix_shape(shape)
            pair = []
            for side, rows in (("left", m), ("right", n)):
                codes, scale = parts[side][name], parts[f"{side}_scale"].get(name)
                if tuple(codes.shape) != (rows, num_tasks, r):
                    raise ValueError(f"the preference basis's {side} factor of layer {name!r} is "
                                     f"{tuple(codes.shape)}, expected {(rows, num_tasks, r)}")
                if (codes.dtype == torch.int8) != (scale is not None) or not (codes.dtype == torch.int8
                                                                             or codes.is_floating_point()):
                    raise ValueError(f"the preference basis's {side} factor of layer {name!r} is {codes.dtype} "
                                     f"{'with' if scale is not None else 'without'} a scale: expected int8 codes "
                                     "with a scale, or floats")
                if scale is not None:
                    if tuple(scale.shape) != (num_tasks, r) or not scale.is_floating_point() \
                            or not bool((scale > 0).all()):
                        raise ValueError(f"the preference basis's {side} scale of layer {name!r} is not "
                                         f"{(num_tasks, r)} positive numbers")
                    _check_finite(name, scale)
                else:
                    _check_finite(name, codes)
                pair.append(Factor(codes, scale))
            factors[name] = (pair[0], pair[1])
        return cls(shapes, num_tasks, dense, factors)


def _check_finite(name: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"the preference basis of layer {name!r} contains NaN or inf")


#: A singular component below this fraction of its matrix's largest is numerical noise (a float32 task vector's
#: rounding sits near 1e-7 of it): stored as zeros, since its direction is arbitrary and differs between machines.
NULL_COMPONENT = 1e-6


@torch.no_grad()
def truncated_svd(tau: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``left [m, K, r]``, ``right [n, K, r]`` with ``left[:, k] @ right[:, k].T`` the best rank-``r`` approximation
    (Eckart–Young) of ``tau[k]`` as an ``[m, n]`` matrix: ``left`` the top singular vectors scaled by their singular
    values, ``right`` unit singular vectors, in float64.

    From the eigenvectors of the small Gram matrix (``τ τᵀ`` or ``τᵀ τ``) rather than a full SVD: a full SVD of a
    fine-tuning update, whose spectrum decays, took 20x as long on the CPU for the same rank-16 factors (to about 1e-5
    relatively; `benchmarks/bench_basis_svd.py`). Made to give the same numbers on any machine, so that the int8
    codes quantized from them do too (`benchmarks/bench_reproducible.py`): every product is taken in float64 (a
    float32 Gram matrix differed between CPUs' vector paths), each singular vector's sign is fixed (its largest entry
    positive; LAPACK's is arbitrary), and components below `NULL_COMPONENT` of the largest, whose directions are
    noise, are zeros."""
    num_tasks = tau.shape[0]
    m, n = matrix_shape(tuple(tau.shape[1:]))
    work = tau.reshape(num_tasks, m, n).double()
    wide = m <= n
    small = work if wide else work.mT  # [K, min(m, n), max(m, n)]
    _, vectors = torch.linalg.eigh(small @ small.mT)  # ascending eigenvalues
    top = vectors[..., -rank:].flip(-1)  # [K, min, r]: singular vectors of the short side
    peak = top.abs().argmax(dim=-2, keepdim=True)
    top = top * torch.where(top.gather(-2, peak) < 0, -1.0, 1.0)  # the sign: the largest entry positive
    other = small.mT @ top  # [K, max, r]: the long side's singular vectors times the singular values
    values = other.norm(dim=-2, keepdim=True)  # [K, 1, r]
    live = values > NULL_COMPONENT * values.amax(dim=-1, keepdim=True)
    top, other = top * live, other * live
    if wide:  # τ = (U S) Vᵀ with U = top, V S = other
        left, right = top * values, other / values.clamp_min(torch.finfo(values.dtype).tiny)
    else:  # τ = (U S) Vᵀ with V = top, U S = other
        left, right = other, top
    return left.permute(1, 0, 2).contiguous(), right.permute(1, 0, 2).contiguous()
