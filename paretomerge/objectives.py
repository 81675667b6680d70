"""Small pure functions from per-task quantities to scalars (SPEC §3). Shapes: ``f``, ``gamma``: ``[K]``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of the prediction entropy H(softmax(logits)), in nats. ``logits``: ``[B, C]``.

    Computed from ``log_softmax`` so extreme logits (±1e4) stay finite; a ``-inf`` logit (a masked class)
    contributes 0, not ``0 · -inf``.
    """
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p.clamp_min(torch.finfo(log_p.dtype).min)).sum(-1).mean()


def smooth_tchebycheff(f: Tensor, gamma: Tensor, mu: float, ideal: Tensor | float = 0.0) -> Tensor:
    """μ · logsumexp_k(γ_k (f_k − z_k) / μ); tends to max_k γ_k (f_k − z_k) as μ → 0."""
    if not mu > 0:
        raise ValueError(f"mu must be positive, got {mu!r}")
    return mu * torch.logsumexp(gamma * (f - ideal) / mu, dim=-1)


def linear_scalarization(f: Tensor, gamma: Tensor) -> Tensor:
    """Σ_k γ_k f_k."""
    return (gamma * f).sum(-1)


def cosine_alignment(f: Tensor, gamma: Tensor, eps: float = 1e-3) -> Tensor:
    """cos(f, 1/max(γ, ε)): large when tasks with a larger preference have a lower objective."""
    return F.cosine_similarity(f, 1.0 / gamma.clamp_min(eps), dim=-1)


def frobenius_penalty(tensors: Iterable[Tensor]) -> Tensor:
    """Σ ‖T‖_F² over the given tensors."""
    terms = [t.pow(2).sum() for t in tensors]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def marginal_divergence(logits: Tensor) -> Tensor:
    """KL(p̄ ‖ uniform) = log C − H(p̄), with p̄ the batch's mean prediction: 0 when the batch's predictions are spread
    evenly over the C classes, log C when every input is given the same class. The diversity half of information
    maximisation; as a penalty it keeps entropy minimisation from collapsing a task onto one confident class."""
    mean = F.softmax(logits, dim=-1).mean(0)
    # a class no input gives any probability (a -inf logit) contributes 0, and no NaN to the gradient, as in `entropy`
    return math.log(logits.shape[-1]) + (mean * mean.clamp_min(torch.finfo(mean.dtype).tiny).log()).sum()


def entropy_objective(logits: Mapping[str, Tensor], tasks: Sequence[str], beta_div: float = 0.0) -> dict[str, Tensor]:
    """What every entropy-trained method minimises per task (SPEC §3, AdaMerging): ``entropies [K]``, each task's
    mean prediction entropy, in ``tasks`` order; and with ``beta_div`` > 0 the diversity term, ``div`` =
    Σ_k KL(p̄_k ‖ uniform) (`marginal_divergence`), to be added to the scalarised loss as ``penalty`` = β_div · div.
    One implementation, so that the term means the same in AdaMerging, the paper's configuration and ours."""
    parts = {"entropies": torch.stack([entropy(logits[t]) for t in tasks])}
    if beta_div > 0:
        parts["div"] = torch.stack([marginal_divergence(logits[t]) for t in tasks]).sum()
        parts["penalty"] = beta_div * parts["div"]
    return parts


def check_beta_div(beta_div: float) -> float:
    if isinstance(beta_div, bool) or not isinstance(beta_div, (int, float)) or not 0 <= beta_div < math.inf:
        raise ValueError(f"beta_div must be a finite non-negative number, got {beta_div!r}")
    return float(beta_div)
