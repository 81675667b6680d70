"""Small pure functions from per-task quantities to scalars (SPEC §3, §3c). Shapes: ``f``, ``gamma``: ``[K]``.

A task's objective f_k is its mean prediction entropy (classifiers: logits ``[B, C]``; needs no labels), or, for a
causal language model (logits ``[B, T, V]`` on a token batch, `kernels.inputs`), its next-token loss (the shifted
inputs are the targets, padding masked; needs no labels either) or its next-token entropy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from paretomerge.kernels.inputs import attention_mask, is_tokens

#: The per-task objectives: ``entropy`` (classifiers and language models) and ``loss`` (language models).
OBJECTIVES = ("entropy", "loss")


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


def _next_token_positions(logits: Tensor, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The predictions ``[N, V]`` at every position whose next token is a real one (both it and its target unmasked),
    and those targets ``[N]``."""
    if logits.ndim != 3 or logits.shape[:2] != inputs["input_ids"].shape:
        raise ValueError(f"next-token objectives need logits [B, T, V] for input_ids {tuple(inputs['input_ids'].shape)}"
                         f", got {tuple(logits.shape)}")
    mask = attention_mask(inputs).bool()
    keep = mask[:, 1:] & mask[:, :-1]
    return logits[:, :-1][keep], inputs["input_ids"][:, 1:][keep]


def next_token_loss_sum(logits: Tensor, inputs: Mapping[str, Tensor]) -> tuple[Tensor, int]:
    """The summed next-token cross-entropy (nats, in float32 at least) over a batch's predicted tokens, and their
    count: what a mean over several batches adds up."""
    predictions, targets = _next_token_positions(logits, inputs)
    total = F.cross_entropy(predictions.float() if predictions.dtype.itemsize < 4 else predictions, targets,
                            reduction="sum")
    return total, int(targets.numel())


def next_token_loss(logits: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
    """The mean next-token cross-entropy (nats per predicted token; padding masked): a causal LM's loss."""
    total, count = next_token_loss_sum(logits, inputs)
    return total / max(count, 1)


def next_token_entropy(logits: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
    """The mean entropy of the next-token prediction over the positions `next_token_loss` scores (nats)."""
    predictions, _ = _next_token_positions(logits, inputs)
    return entropy(predictions.float() if predictions.dtype.itemsize < 4 else predictions)


def check_objective(objective: str | None) -> str | None:
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES} or None (the batch's default: loss for token batches, "
                         f"entropy for images), got {objective!r}")
    return objective


def resolve_objective(objective: str | None, inputs: object) -> str:
    """The per-task objective for a batch: the one asked for, else ``loss`` for token batches (a language model's
    next-token loss needs no labels) and ``entropy`` for images. ``loss`` on images is refused: its targets would be
    labels, which adaptation does not have."""
    tokens = is_tokens(inputs)
    if objective == "loss" and not tokens:
        raise ValueError("objective='loss' is the next-token loss of a language model, whose targets are its inputs; "
                         "these batches are images, for which the label-free objective is 'entropy'")
    return check_objective(objective) or ("loss" if tokens else "entropy")


def task_objectives(logits: Mapping[str, Tensor], tasks: Sequence[str], objective: str = "entropy",
                    beta_div: float = 0.0, inputs: Mapping[str, object] | None = None) -> dict[str, Tensor]:
    """What every method minimises per task (SPEC §3, §3c; AdaMerging): ``f [K]`` in ``tasks`` order, each task's
    mean prediction entropy (``objective="entropy"``) or a language model's next-token loss (``"loss"``; ``inputs``:
    task -> its token batch, which holds the targets); and, for classifiers with ``beta_div`` > 0, the diversity term
    ``div`` = Σ_k KL(p̄_k ‖ uniform) (`marginal_divergence`), to be added to the scalarised loss as ``penalty`` =
    β_div · div. One implementation, so that each term means the same in AdaMerging, the paper's configuration and
    ours. The diversity term is defined for class predictions only: on token batches it is not applied."""
    tokens = {t: inputs[t] for t in tasks if inputs is not None and is_tokens(inputs[t])}
    if objective == "loss" and len(tokens) != len(tasks):
        raise ValueError("the next-token loss needs every task's token batch (inputs=...) for its targets")

    def f_of(task: str) -> Tensor:
        if task not in tokens:
            return entropy(logits[task])
        return next_token_loss(logits[task], tokens[task]) if objective == "loss" else \
            next_token_entropy(logits[task], tokens[task])

    parts = {"f": torch.stack([f_of(t) for t in tasks])}
    if beta_div > 0 and not tokens:
        parts["div"] = torch.stack([marginal_divergence(logits[t]) for t in tasks]).sum()
        parts["penalty"] = beta_div * parts["div"]
    return parts


def check_beta_div(beta_div: float) -> float:
    if isinstance(beta_div, bool) or not isinstance(beta_div, (int, float)) or not 0 <= beta_div < math.inf:
        raise ValueError(f"beta_div must be a finite non-negative number, got {beta_div!r}")
    return float(beta_div)
