"""Objectives: limits, bounds, numerical safety and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paretomerge.objectives import (
    cosine_alignment,
    entropy,
    frobenius_penalty,
    linear_scalarization,
    marginal_divergence,
    smooth_tchebycheff,
    task_objectives,
)

finite = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)
weights = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, weights), min_size=2, max_size=8))
def test_stch_is_bounded_by_weighted_max_and_tends_to_it(pairs):
    f = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    gamma = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    weighted_max = float((gamma * f).max())
    for mu in (1.0, 0.1, 1e-3):
        value = float(smooth_tchebycheff(f, gamma, mu))
        assert weighted_max - 1e-9 <= value <= weighted_max + mu * math.log(len(pairs)) + 1e-9
    assert abs(float(smooth_tchebycheff(f, gamma, 1e-6)) - weighted_max) < 1e-5


def test_stch_refuses_non_positive_mu():
    with pytest.raises(ValueError, match="mu must be positive"):
        smooth_tchebycheff(torch.ones(2), torch.ones(2), 0.0)


def test_entropy_known_values_and_extreme_logits():
    assert float(entropy(torch.zeros(3, 7))) == pytest.approx(math.log(7), rel=1e-6)
    extreme = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]], requires_grad=True)
    value = entropy(extreme)
    value.backward()
    assert torch.isfinite(value) and float(value.detach()) == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(extreme.grad).all()
    masked = torch.tensor([[float("-inf"), 0.0, 0.0]], requires_grad=True)
    value = entropy(masked)
    value.backward()
    assert float(value.detach()) == pytest.approx(math.log(2), rel=1e-6) and torch.isfinite(masked.grad).all()
    # Mean over the batch: the loss does not grow with batch size.
    logits = torch.randn(4, 5)
    assert float(entropy(logits.repeat(3, 1))) == pytest.approx(float(entropy(logits)), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False), min_size=2, max_size=10))
def test_entropy_is_between_zero_and_log_classes(row):
    value = float(entropy(torch.tensor([row], dtype=torch.float64)))
    assert -1e-9 <= value <= math.log(len(row)) + 1e-9


def test_cosine_alignment_is_finite_with_zero_preferences_and_rewards_inverse_alignment():
    gamma = torch.tensor([1.0, 0.0, 0.0])
    aligned = torch.tensor([0.001, 1.0, 1.0])  # low entropy where γ is large
    opposed = torch.tensor([1.0, 0.001, 0.001])
    assert torch.isfinite(cosine_alignment(aligned, gamma))
    assert float(cosine_alignment(aligned, gamma)) > float(cosine_alignment(opposed, gamma))


def test_linear_and_frobenius():
    assert float(linear_scalarization(torch.tensor([1.0, 2.0]), torch.tensor([0.25, 0.75]))) == pytest.approx(1.75)
    assert float(frobenius_penalty([torch.ones(2, 2), torch.full((3,), 2.0)])) == pytest.approx(16.0)
    assert float(frobenius_penalty([])) == 0.0


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    f = torch.rand(4, dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    core = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: entropy(x), (logits,))
    assert torch.autograd.gradcheck(lambda x: smooth_tchebycheff(x, gamma, 0.1), (f,))
    assert torch.autograd.gradcheck(lambda x: cosine_alignment(x, gamma), (f,))
    assert torch.autograd.gradcheck(lambda x: linear_scalarization(x, gamma), (f,))
    assert torch.autograd.gradcheck(lambda x: frobenius_penalty([x]), (core,))


def test_marginal_divergence_is_finite_where_a_class_has_probability_zero():
    logits = torch.tensor([[0.0, 1.0, -float("inf")], [2.0, 0.0, -float("inf")]], requires_grad=True)
    div = marginal_divergence(logits)
    p = torch.softmax(logits.detach(), -1).mean(0)[:2]
    assert torch.isfinite(div) and float(div) == pytest.approx(float(math.log(3) + (p * p.log()).sum()), rel=1e-6)
    div.backward()
    assert torch.isfinite(logits.grad).all()
    assert float(marginal_divergence(torch.tensor([[9.0, 0.0], [9.0, 0.0]]))) == pytest.approx(math.log(2), abs=2e-3)


def test_the_entropy_objective_is_one_switch_with_the_same_meaning_everywhere():
    from paretomerge import AdaMerging, ParetoMerging
    from tests.synthetic import make_task_vectors

    tv = make_task_vectors(num_tasks=3)
    logits = {"task0": torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "task1": torch.zeros(2, 4),
              "task2": torch.tensor([[0.0, 0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 0.0, 0.0, 9.0]])}
    gamma = torch.tensor([0.5, 0.3, 0.2])
    div = float(task_objectives(logits, tv.task_names, "entropy", 1.0)["div"])
    assert div > 0.5 and "div" not in task_objectives(logits, tv.task_names)
    for module in (AdaMerging(task_vectors=tv), AdaMerging(task_vectors=tv, preference=[0.5, 0.3, 0.2]),
                   AdaMerging(task_vectors=tv, granularity="task"), AdaMerging(task_vectors=tv, ties_top_k=0.2),
                   ParetoMerging(task_vectors=tv, rank=4, beta_div=0),
                   ParetoMerging(task_vectors=tv, rank=4, beta_div=0, preference_coefficients=False)):
        without = float(module.objective(logits, gamma)["loss"])
        module.hparams.beta_div = 0.4
        parts = module.objective(logits, gamma)
        assert float(parts["div"]) == pytest.approx(div, rel=1e-6)
        assert float(parts["loss"]) == pytest.approx(without + 0.4 * div, rel=1e-6), type(module).__name__
    assert AdaMerging(beta_div=0.2).hparams.beta_div == 0.2
    with pytest.raises(ValueError, match="beta_div"):
        AdaMerging(beta_div=-1.0)
