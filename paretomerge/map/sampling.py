"""Where MAP evaluates real merged models: the K one-hots plus uniform points in the bounds (SPEC §6)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The MAP paper's default number of evaluated points for K = 2 … 8 tasks.
DEFAULT_BUDGETS = {2: 30, 3: 50, 4: 60, 5: 85, 6: 100, 7: 140, 8: 250}


def check_bounds(bounds: Sequence[float], num_tasks: int | None = None) -> tuple[float, float]:
    """``(low, high)`` with low < high, both finite; refused with a message otherwise."""
    if isinstance(bounds, (str, bytes)) or len(bounds) != 2:
        raise ValueError(f"bounds must be (low, high), got {bounds!r}")
    low, high = (float(b) for b in bounds)
    if not (np.isfinite(low) and np.isfinite(high)) or not low < high:
        raise ValueError(f"bounds must be finite with low < high, got low={low}, high={high}")
    return low, high


def initial_samples(num_tasks: int, budget: int | None = None, seed: int = 0,
                    bounds: Sequence[float] = (0.0, 1.0)) -> np.ndarray:
    """``[budget, K]`` scaling vectors: the K one-hots (``high`` on task k, ``low`` elsewhere), then uniform
    draws in ``[low, high]^K`` seeded by ``(seed, K)``. ``budget`` defaults to `DEFAULT_BUDGETS` (K ≤ 8)."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 2:
        raise ValueError(f"MAP needs at least 2 tasks, got {num_tasks!r}")
    low, high = check_bounds(bounds)
    if budget is None:
        if num_tasks not in DEFAULT_BUDGETS:
            raise ValueError(f"no default budget for K={num_tasks} (known: K = 2 … 8); pass budget=")
        budget = DEFAULT_BUDGETS[num_tasks]
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < num_tasks:
        raise ValueError(f"budget must be an int >= K={num_tasks} (the one-hots come first), got {budget!r}")
    one_hots = np.full((num_tasks, num_tasks), low) + (high - low) * np.eye(num_tasks)
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_tasks]))
    uniform = rng.uniform(low, high, size=(budget - num_tasks, num_tasks))
    return np.concatenate([one_hots, uniform])
