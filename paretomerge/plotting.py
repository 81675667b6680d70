"""Figures and tables of accuracy fronts: what `paretomerge.callbacks.ParetoFrontLogger` sends to TensorBoard and what
``paretomerge front`` writes as PNG and CSV.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas (no pyplot state, no display needed):

- K = 2: a scatter of the front, each point labelled by its preference;
- K = 3: a 3-D scatter, each point coloured by its preference (γ as RGB);
- K ≥ 4: a grid of pairwise 2-D projections (Pareto Merging's Figure 5) and a parallel-coordinates plot.

Baselines (Task Arithmetic, AdaMerging, MAP's predicted and real fronts) go on the same axes as `Overlay`s.
Accuracies are fractions in [0, 1]; the figures show percent.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from paretomerge.pareto import non_dominated


@dataclass
class Overlay:
    """Points of another method drawn over the front: ``points [n, K]`` accuracies."""

    label: str
    points: np.ndarray
    style: dict = field(default_factory=dict)


# Styles by baseline name; anything else is drawn as grey squares.
OVERLAY_STYLES = {
    "Task Arithmetic": {"marker": "X", "color": "black", "s": 90},
    "AdaMerging": {"marker": "D", "color": "tab:green", "s": 70},
    "MAP predicted": {"marker": ".", "color": "tab:orange", "s": 12, "alpha": 0.6},
    "MAP real": {"marker": "^", "color": "tab:red", "s": 50},
}


def _style(overlay: Overlay) -> dict:
    return {"marker": "s", "color": "grey", "s": 40} | OVERLAY_STYLES.get(overlay.label, {}) | overlay.style


def preference_label(preference: Sequence[float]) -> str:
    """``(0.70, 0.30)``: how a preference is written on figures and in tables."""
    return "(" + ", ".join(f"{float(v):.2f}" for v in preference) + ")"


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _kinds(preferences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the one-hot rows and of the equal-preference row."""
    num_tasks = preferences.shape[1]
    one_hot = np.isclose(preferences.max(1), 1.0)
    equal = np.isclose(preferences, 1.0 / num_tasks).all(1)
    return one_hot, equal


def front_figures(accuracy: np.ndarray, preferences: np.ndarray, tasks: Sequence[str],
                  overlays: Sequence[Overlay] = (), title: str = "") -> dict[str, Figure]:
    """The figures of a front ``accuracy [P, K]`` evaluated at ``preferences [P, K]``: ``{"front": ...}`` for
    K ≤ 3, plus ``"parallel_coordinates"`` for K ≥ 4."""
    accuracy, preferences = np.asarray(accuracy, dtype=float), np.asarray(preferences, dtype=float)
    num_tasks = len(tasks)
    if accuracy.shape != preferences.shape or accuracy.shape[1] != num_tasks:
        raise ValueError(f"accuracy {accuracy.shape} and preferences {preferences.shape} must both be "
                         f"[P, K={num_tasks}]")
    for overlay in overlays:
        if np.asarray(overlay.points).ndim != 2 or np.asarray(overlay.points).shape[1] != num_tasks:
            raise ValueError(f"overlay {overlay.label!r} must be [n, K={num_tasks}], got {np.shape(overlay.points)}")
    if num_tasks == 2:
        return {"front": _scatter_2d(accuracy, preferences, tasks, overlays, title)}
    if num_tasks == 3:
        return {"front": _scatter_3d(accuracy, preferences, tasks, overlays, title)}
    return {"front": _pairwise(accuracy, preferences, tasks, overlays, title),
            "parallel_coordinates": _parallel(accuracy, preferences, tasks, overlays, title)}


def _scatter_2d(acc, prefs, tasks, overlays, title) -> Figure:
    figure = _figure(7, 6)
    ax = figure.add_subplot()
    order = np.argsort(prefs[:, 0])
    ax.plot(100 * acc[order, 0], 100 * acc[order, 1], color="tab:blue", alpha=0.35, zorder=1)
    points = ax.scatter(100 * acc[:, 0], 100 * acc[:, 1], c=prefs[:, 0], cmap="viridis", vmin=0, vmax=1, s=45,
                        edgecolors="black", linewidths=0.5, zorder=3, label="learned front (colour: γ₁)")
    for a, p in zip(acc, prefs, strict=True):
        ax.annotate(preference_label(p), (100 * a[0], 100 * a[1]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    for overlay in overlays:
        pts = 100 * np.asarray(overlay.points, dtype=float)
        ax.scatter(pts[:, 0], pts[:, 1], label=overlay.label, zorder=2, **_style(overlay))
    figure.colorbar(points, ax=ax, label=f"γ ({tasks[0]})")
    ax.set_xlabel(f"{tasks[0]} accuracy (%)")
    ax.set_ylabel(f"{tasks[1]} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or "front", fontsize=10)
    figure.tight_layout()
    return figure


def _scatter_3d(acc, prefs, tasks, overlays, title) -> Figure:
    figure = _figure(7, 6.5)
    ax = figure.add_subplot(projection="3d")
    ax.scatter(*(100 * acc.T), c=np.clip(prefs, 0, 1), s=40, edgecolors="black", linewidths=0.4, depthshade=False,
               label="learned front (colour: γ as RGB)")
    one_hot, equal = _kinds(prefs)
    for i in np.flatnonzero(one_hot | equal):
        ax.text(*(100 * acc[i]), preference_label(prefs[i]), fontsize=7)
    for overlay in overlays:
        ax.scatter(*(100 * np.asarray(overlay.points, dtype=float).T), label=overlay.label, depthshade=False,
                   **_style(overlay))
    ax.set_xlabel(f"{tasks[0]} (%)")
    ax.set_ylabel(f"{tasks[1]} (%)")
    ax.set_zlabel(f"{tasks[2]} (%)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or "front", fontsize=10)
    return figure


def _point_colours(prefs: np.ndarray) -> list:
    """One-hot e_k in task k's colour, the equal preference black, the rest light grey."""
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    one_hot, equal = _kinds(prefs)
    return [palette(int(p.argmax()) % 10) if one_hot[i] else ("black" if equal[i] else "0.65")
            for i, p in enumerate(prefs)]


def _pairwise(acc, prefs, tasks, overlays, title) -> Figure:
    num_tasks = len(tasks)
    size = max(1.5, 12.0 / num_tasks)
    figure = _figure(size * num_tasks, size * num_tasks)
    colours = _point_colours(prefs)
    axes = figure.subplots(num_tasks, num_tasks, squeeze=False)
    for i in range(num_tasks):
        for j in range(num_tasks):
            ax = axes[i][j]
            if j > i:
                ax.axis("off")
                continue
            if i == j:
                ax.text(0.5, 0.5, tasks[i], ha="center", va="center", fontsize=10, transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            ax.scatter(100 * acc[:, j], 100 * acc[:, i], c=colours, s=14, edgecolors="none")
            for overlay in overlays:
                pts = 100 * np.asarray(overlay.points, dtype=float)
                style = _style(overlay) | {"s": _style(overlay)["s"] * 0.5}
                ax.scatter(pts[:, j], pts[:, i], **style)
            ax.tick_params(labelsize=6)
            if i == num_tasks - 1:
                ax.set_xlabel(tasks[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(tasks[i], fontsize=8)
    handles = [axes[1][0].scatter([], [], c="black", s=14, label="equal preference"),
               axes[1][0].scatter([], [], c="tab:blue", s=14, label="one-hot e_k (colour: task k)"),
               axes[1][0].scatter([], [], c="0.65", s=14, label="Dirichlet preferences")]
    handles += [axes[1][0].scatter([], [], label=o.label, **_style(o)) for o in overlays]
    figure.legend(handles=handles, loc="upper right", fontsize=9)
    figure.suptitle((title + ": " if title else "") + "pairwise projections of the front (accuracy %)", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    return figure


def _parallel(acc, prefs, tasks, overlays, title) -> Figure:
    num_tasks = len(tasks)
    figure = _figure(max(8.0, 1.1 * num_tasks), 5)
    ax = figure.add_subplot()
    x = np.arange(num_tasks)
    colours = _point_colours(prefs)
    one_hot, equal = _kinds(prefs)
    for i in np.argsort(one_hot | equal, kind="stable"):  # highlighted lines last, on top
        ax.plot(x, 100 * acc[i], color=colours[i], linewidth=2.0 if (one_hot[i] or equal[i]) else 0.8,
                alpha=1.0 if (one_hot[i] or equal[i]) else 0.6)
    for overlay in overlays:
        style = _style(overlay)
        for row in np.asarray(overlay.points, dtype=float):
            ax.plot(x, 100 * row, color=style["color"], linestyle="--", linewidth=1.0, alpha=style.get("alpha", 0.9))
        ax.plot([], [], color=style["color"], linestyle="--", label=overlay.label)
    ax.plot([], [], color="black", linewidth=2, label="equal preference")
    ax.plot([], [], color="tab:blue", linewidth=2, label="one-hot e_k (colour: task k)")
    ax.plot([], [], color="0.65", linewidth=0.8, label="Dirichlet preferences")
    ax.set_xticks(x, list(tasks), rotation=30, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title((title + ": " if title else "") + "parallel coordinates of the front", fontsize=10)
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def front_table(accuracy: np.ndarray, preferences: np.ndarray, tasks: Sequence[str], markdown: bool = False) -> str:
    """Every evaluated point: preference → per-task accuracy (%) and mean, non-dominated points marked ``*``."""
    accuracy, preferences = np.asarray(accuracy, dtype=float), np.asarray(preferences, dtype=float)
    keep = set(non_dominated(accuracy).tolist())
    header = ["preference", *tasks, "mean", "nd"]
    rows = [[preference_label(p), *(f"{100 * v:.1f}" for v in a), f"{100 * a.mean():.1f}", "*" if i in keep else ""]
            for i, (p, a) in enumerate(zip(preferences, accuracy, strict=True))]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def write_front_csv(path: str | Path, accuracy: np.ndarray, preferences: np.ndarray, tasks: Sequence[str]) -> Path:
    """One row per evaluated point: ``pref_<task>...``, ``acc_<task>...`` (fractions), ``non_dominated``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = set(non_dominated(accuracy).tolist())
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"pref_{t}" for t in tasks] + [f"acc_{t}" for t in tasks] + ["non_dominated"])
        for i, (p, a) in enumerate(zip(np.asarray(preferences).tolist(), np.asarray(accuracy).tolist(), strict=True)):
            writer.writerow([f"{v:.6f}" for v in p] + [f"{v:.6f}" for v in a] + [int(i in keep)])
    return path
