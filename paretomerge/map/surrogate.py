"""One task's quadratic surrogate ``M̃(c) = ½cᵀAc + bᵀc + e`` over task-wise scaling vectors ``c [K]`` (SPEC §6).

Kinds (the MAP paper's three cases):
- ``"unbounded"`` (case 1): the quadratic itself, fitted in closed form by least squares;
- ``"bounded"`` (case 2, e.g. accuracy in ``[low, high]``): ``(high − low)·σ(quadratic) + low``;
- ``"lower_bounded"`` (case 3, e.g. a loss ``≥ low``): ``softplus(quadratic) + low``.
Cases 2 and 3 start from least squares on the inverse-transformed targets, then minimise the squared error in
the metric's own units with L-BFGS.
"""

from __future__ import annotations

import numpy as np
import torch

KINDS = ("unbounded", "bounded", "lower_bounded")


def num_quadratic_parameters(num_tasks: int) -> int:
    """``(K+1)(K+2)/2``: K squares, K(K−1)/2 cross terms, K linear terms, one constant."""
    return (num_tasks + 1) * (num_tasks + 2) // 2


def design_matrix(c: np.ndarray) -> np.ndarray:
    """``[n, (K+1)(K+2)/2]`` rows ``[c_i² (i), c_i c_j (i<j), c_i (i), 1]`` for ``c [n, K]``."""
    c = np.asarray(c, dtype=np.float64)
    k = c.shape[1]
    upper = np.triu_indices(k, 1)
    return np.concatenate([c ** 2, c[:, upper[0]] * c[:, upper[1]], c, np.ones((c.shape[0], 1))], axis=1)


class QuadraticSurrogate:
    """Fit with `fit(c [n, K], y [n])`; `predict(c [m, K]) -> [m]`; `r2(c, y)`; `A [K, K]`, `b [K]`, `e`."""

    def __init__(self, kind: str = "unbounded", low: float | None = None, high: float | None = None,
                 lbfgs_steps: int = 200) -> None:
        if kind not in KINDS:
            raise ValueError(f"surrogate kind must be one of {KINDS}, got {kind!r}")
        if kind == "bounded" and (low is None or high is None or not float(low) < float(high)):
            raise ValueError(f"a bounded surrogate needs low < high (the metric's range), got low={low}, high={high}")
        if kind == "lower_bounded" and low is None:
            raise ValueError("a lower_bounded surrogate needs low (the metric's minimum)")
        self.kind, self.low, self.high, self.lbfgs_steps = kind, low, high, lbfgs_steps
        self.weights: np.ndarray | None = None  # over the design row

    # ---------------------------------------------------------------- fitting
    def fit(self, c: np.ndarray, y: np.ndarray) -> QuadraticSurrogate:
        c, y = np.asarray(c, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if c.ndim != 2 or y.shape != (c.shape[0],):
            raise ValueError(f"fit needs c [n, K] and y [n], got {c.shape} and {y.shape}")
        needed = num_quadratic_parameters(c.shape[1])
        if c.shape[0] < needed:
            raise ValueError(f"{c.shape[0]} evaluated points cannot fit a quadratic surrogate with {needed} "
                             f"parameters for K={c.shape[1]} tasks; evaluate at least {needed}")
        if not (np.isfinite(c).all() and np.isfinite(y).all()):
            raise ValueError("surrogate data contains NaN or inf")
        self._check_range(y)
        design = design_matrix(c)
        self.weights = np.linalg.lstsq(design, self._inverse(y), rcond=None)[0]
        if self.kind != "unbounded":
            self._refine(design, y)
        return self

    def _check_range(self, y: np.ndarray) -> None:
        if self.kind == "bounded" and (y.min() < self.low or y.max() > self.high):
            raise ValueError(f"observed metric values span [{y.min():.6g}, {y.max():.6g}], outside the declared "
                             f"range [{self.low}, {self.high}] of the bounded surrogate")
        if self.kind == "lower_bounded" and y.min() < self.low:
            raise ValueError(f"observed metric value {y.min():.6g} is below the declared minimum {self.low} of the "
                             "lower_bounded surrogate")

    def _inverse(self, y: np.ndarray) -> np.ndarray:
        """Targets for the initial least squares: the quadratic that would give ``y`` exactly."""
        if self.kind == "unbounded":
            return y
        if self.kind == "bounded":
            p = np.clip((y - self.low) / (self.high - self.low), 1e-4, 1 - 1e-4)
            return np.log(p / (1 - p))
        z = np.maximum(y - self.low, 1e-4)
        return z + np.log(-np.expm1(-z))  # softplus⁻¹(z) = log(e^z − 1), stable

    def _link(self, q: torch.Tensor) -> torch.Tensor:
        if self.kind == "bounded":
            return (self.high - self.low) * torch.sigmoid(q) + self.low
        if self.kind == "lower_bounded":
            return torch.nn.functional.softplus(q) + self.low
        return q

    def _refine(self, design: np.ndarray, y: np.ndarray) -> None:
        x, target = torch.as_tensor(design), torch.as_tensor(y)
        w = torch.tensor(self.weights, requires_grad=True)
        optimizer = torch.optim.LBFGS([w], max_iter=self.lbfgs_steps, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = ((self._link(x @ w) - target) ** 2).mean()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weights = w.detach().numpy()

    # ---------------------------------------------------------------- use
    def _fitted(self) -> np.ndarray:
        if self.weights is None:
            raise RuntimeError("the surrogate is not fitted; call fit(c, y) first")
        return self.weights

    def predict(self, c: np.ndarray) -> np.ndarray:
        """``M̃(c)`` for ``c [m, K]``: ``[m]``."""
        q = design_matrix(c) @ self._fitted()
        return self._link(torch.as_tensor(q)).numpy()

    def r2(self, c: np.ndarray, y: np.ndarray) -> float:
        """Coefficient of determination of the predictions on ``(c, y)`` (use held-out points)."""
        y = np.asarray(y, dtype=np.float64)
        residual = ((self.predict(c) - y) ** 2).sum()
        total = ((y - y.mean()) ** 2).sum()
        return float(1.0 - residual / total) if total > 0 else float(residual == 0)

    @property
    def num_tasks(self) -> int:
        p = len(self._fitted())
        return int((np.sqrt(8 * p + 1) - 3) / 2)

    @property
    def A(self) -> np.ndarray:  # noqa: N802 (the paper's name)
        w, k = self._fitted(), self.num_tasks
        a = np.zeros((k, k))
        a[np.diag_indices(k)] = 2 * w[:k]
        upper = np.triu_indices(k, 1)
        a[upper] = w[k:k + len(upper[0])]
        a[(upper[1], upper[0])] = a[upper]
        return a

    @property
    def b(self) -> np.ndarray:
        w, k = self._fitted(), self.num_tasks
        return w[-k - 1:-1].copy()

    @property
    def e(self) -> float:
        return float(self._fitted()[-1])
