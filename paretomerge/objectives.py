"""Small pure functions from per-task quantities to scalars (SPEC §3). Shapes: ``f``, ``gamma``: ``[K]``."""

from __future__ import annotations

import math
from collections.abc import Iterable

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
    log_mean = torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])
    return math.log(logits.shape[-1]) + (log_mean.exp() * log_mean).sum()
