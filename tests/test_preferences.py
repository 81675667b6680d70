"""Preferences: validation of user input (SPEC §7), seeded sampling and grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paretomerge.preferences import (
    equal_and_one_hots,
    front_preferences,
    sample_dirichlet,
    simplex_grid,
    validate_preference,
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), min_size=1, max_size=9).filter(
    lambda xs: sum(xs) > 1e-6))
def test_valid_preferences_are_normalised_proportionally(values):
    gamma = validate_preference(values, len(values))
    assert gamma.dtype == torch.float32 and gamma.shape == (len(values),)
    assert float(gamma.sum()) == pytest.approx(1.0, abs=1e-5)
    expected = np.asarray(values) / sum(values)
    np.testing.assert_allclose(gamma.numpy(), expected, rtol=1e-5, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=3, max_size=3))
def test_invalid_preferences_are_refused(values):
    array = np.asarray(values)
    ok = np.isfinite(array).all() and (array >= 0).all() and array.sum() > 0 and np.isfinite(array.sum())
    if ok:
        validate_preference(values, 3)
    else:
        with pytest.raises(ValueError, match="preference"):
            validate_preference(values, 3)


@pytest.mark.parametrize(
    "pref, error, message",
    [
        ([0.5, 0.5], ValueError, "must have 3 entries"),
        ([[0.2, 0.3, 0.5]], ValueError, "must have 3 entries"),
        ([0.5, float("nan"), 0.5], ValueError, "NaN or inf"),
        ([0.5, float("inf"), 0.5], ValueError, "NaN or inf"),
        ([0.5, -0.1, 0.6], ValueError, "non-negative"),
        ([0.0, 0.0, 0.0], ValueError, "positive sum"),
        ("abc", TypeError, "string"),
        ([True, False, True], TypeError, "numbers"),
        (["a", "b", "c"], TypeError, "numbers"),
    ],
)
def test_bad_preferences_name_the_problem(pref, error, message):
    with pytest.raises(error, match=message):
        validate_preference(pref, 3)


def test_tensor_and_integer_preferences_are_accepted():
    torch.testing.assert_close(validate_preference(torch.tensor([1, 3]), 2), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(validate_preference(np.array([2.0, 2.0]), 2), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(validate_preference(torch.tensor([1.0, 3.0], dtype=torch.bfloat16), 2),
                               torch.tensor([0.25, 0.75]))
    with pytest.raises(TypeError, match="real numbers"):
        validate_preference(torch.tensor([True, False]), 2)


def test_dirichlet_draws_are_keyed_by_seed_step_and_rank():
    a = sample_dirichlet(4, 1.0, seed=0, step=10, rank=0)
    assert torch.equal(a, sample_dirichlet(4, 1.0, seed=0, step=10, rank=0))
    assert not torch.equal(a, sample_dirichlet(4, 1.0, seed=0, step=11, rank=0))
    assert not torch.equal(a, sample_dirichlet(4, 1.0, seed=0, step=10, rank=1))
    assert not torch.equal(a, sample_dirichlet(4, 1.0, seed=1, step=10, rank=0))
    draws = torch.stack([sample_dirichlet(3, 1.0, 0, s) for s in range(2000)])
    assert torch.all(draws >= 0) and torch.allclose(draws.sum(1), torch.ones(2000))
    # Dir(1,1,1) has mean 1/3 in every coordinate.
    torch.testing.assert_close(draws.mean(0), torch.full((3,), 1 / 3), atol=0.02, rtol=0)


def test_a_draw_mixes_at_most_mixed_tasks_tasks_and_is_the_plain_draw_up_to_that_k():
    # Up to K = mixed_tasks the draw is the plain Dir(α) one, number for number: the 8-task figures cannot move.
    for k in (2, 8):
        plain = np.random.default_rng(np.random.SeedSequence([3, 17, 0])).dirichlet(np.full(k, 0.5))
        assert torch.equal(sample_dirichlet(k, 0.5, 3, 17, 0, mixed_tasks=8),
                           torch.as_tensor(plain, dtype=torch.float32))
        assert torch.equal(sample_dirichlet(k, 0.5, 3, 17, 0, mixed_tasks=None), sample_dirichlet(k, 0.5, 3, 17, 0))
    draws = torch.stack([sample_dirichlet(20, 0.5, 0, s, mixed_tasks=8) for s in range(3000)])
    assert torch.equal(draws, torch.stack([sample_dirichlet(20, 0.5, 0, s, mixed_tasks=8) for s in range(3000)]))
    assert torch.all((draws > 0).sum(1) <= 8) and torch.all(draws >= 0)
    torch.testing.assert_close(draws.sum(1), torch.ones(3000))
    # Every task is drawn as often as any other, and a draw's largest weight is distributed as at K = 8, not as at
    # K = 20 (medians from 3,000 draws: about 0.42 against 0.23).
    torch.testing.assert_close((draws > 0).float().mean(0), torch.full((20,), 8 / 20), atol=0.04, rtol=0)
    eight = torch.stack([sample_dirichlet(8, 0.5, 1, s) for s in range(3000)]).max(1).values.median()
    twenty = torch.stack([sample_dirichlet(20, 0.5, 1, s) for s in range(3000)]).max(1).values.median()
    assert abs(draws.max(1).values.median() - eight) < 0.03 and twenty < eight - 0.1


def test_grids_and_front_preferences():
    grid = simplex_grid(3, 7)
    assert grid.shape == (math.comb(9, 2), 3) == (36, 3)
    torch.testing.assert_close(grid.sum(1), torch.ones(36))
    assert front_preferences(2).shape == (11, 2)
    assert front_preferences(3).shape == (36, 3)
    eight = front_preferences(8, seed=0)
    assert eight.shape == (30, 8)
    torch.testing.assert_close(eight[:9], equal_and_one_hots(8))
    assert torch.equal(eight, front_preferences(8, seed=0))


def test_dirichlet_sets_are_seeded_on_the_simplex_and_extend_the_front_set():
    from paretomerge.preferences import dirichlet_set

    a = dirichlet_set(4, 20, seed=3)
    assert a.shape == (20, 4) and (a >= 0).all()
    torch.testing.assert_close(a.sum(1), torch.ones(20))
    assert torch.equal(a, dirichlet_set(4, 20, seed=3)) and not torch.equal(a, dirichlet_set(4, 20, seed=4))
    # The front set for K >= 4 is the equal preference, the one-hots, then the same seeded draws.
    torch.testing.assert_close(front_preferences(8, seed=2)[9:], dirichlet_set(8, 21, seed=2))
