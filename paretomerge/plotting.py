"""Figures and tables of accuracy fronts: what `paretomerge.callbacks.ParetoFrontLogger` sends to TensorBoard and what
``paretomerge front`` writes as PNG and CSV.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas (no pyplot state, no display needed):

- K = 2: a scatter of the front, each point labelled by its preference;
- K = 3: a 3-D scatter;
- K ≥ 4: a grid of pairwise 2-D projections (Pareto Merging's Figure 5) whose diagonal shows each task's accuracy
  range over the front, and a parallel-coordinates plot.

Every figure draws the one-hot preference e_k in task k's colour (`task_colours`) with a legend entry
``one-hot: <task>``, the equal preference as a black star, and the other preferences in grey (K ≥ 4) or in their
γ-weighted mix of the task colours (K ≤ 3). Baselines (Task Arithmetic, AdaMerging, MAP's predicted and real fronts)
go on the same axes as `Overlay`s, in black and grey so that colour always means a task. ``references`` (e.g.
``{"zero-shot": [K], "individual": [K]}``, per-task accuracies of θ0 and of each task's fine-tuned model) are
points for K ≤ 3, vertical lines on the grid's diagonal and markers on the parallel axes.
Accuracies are fractions in [0, 1]; the figures show percent.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from paretomerge.pareto import non_dominated


@dataclass
class Overlay:
    """Points of another method drawn over the front: ``points [n, K]`` accuracies. ``style`` overrides keys of
    its `OVERLAY_STYLES` entry (marker, color, s, fill, alpha, linestyle)."""

    label: str
    points: np.ndarray
    style: dict = field(default_factory=dict)


# A style: marker, color, s (marker area, points²), fill (False: hollow), alpha, linestyle and linewidth (for lines:
# parallel coordinates, the diagonal's reference lines, legend entries), edge (a filled marker's edge: Task Arithmetic's
# white edge keeps it visible where it sits on the equal preference's black star).
OVERLAY_STYLES = {
    "Task Arithmetic": {"marker": "X", "color": "black", "edge": "white", "s": 90, "linestyle": "--"},
    "AdaMerging": {"marker": "D", "color": "black", "s": 60, "fill": False, "linestyle": "-."},
    "MAP predicted": {"marker": ".", "color": "0.3", "s": 14, "alpha": 0.5, "linestyle": ":", "linewidth": 0.8},
    "MAP real": {"marker": "^", "color": "black", "s": 55, "fill": False, "linestyle": (0, (5, 1, 1, 1, 1, 1))},
}
OTHER_OVERLAY = {"marker": "s", "color": "0.3", "s": 40, "fill": False, "linestyle": "--"}  # any other label
REFERENCE_STYLES = {
    "zero-shot": {"marker": "v", "color": "0.45", "s": 60, "linestyle": ":", "linewidth": 1.6},
    "individual": {"marker": "P", "color": "black", "s": 80, "fill": False, "linestyle": "--", "linewidth": 1.2},
}
EQUAL = {"marker": "*", "color": "black", "s": 150, "linewidth": 2.2}
ONE_HOT = {"marker": "o", "s": 70, "edge": "black", "linewidth": 2.2}
OTHER = {"marker": "o", "color": "0.7", "s": 18, "linewidth": 0.8, "alpha": 0.8}
RANGE = {"marker": "|", "color": "0.3", "s": 100, "linewidth": 5}


def task_colours(num_tasks: int) -> list[tuple[float, float, float]]:
    """Task k's colour (RGB): tab10 without its grey (grey means "other preferences"), then tab20's light shades."""
    dark = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    light = [c for i, c in enumerate(colormaps["tab20"].colors) if i % 2 and i != 15]
    palette = dark + light
    return [tuple(palette[k % len(palette)]) for k in range(num_tasks)]


def _overlay_style(overlay: Overlay) -> dict:
    return OVERLAY_STYLES.get(overlay.label, OTHER_OVERLAY) | overlay.style


def _reference_style(name: str) -> dict:
    return REFERENCE_STYLES.get(name, {"marker": "d", "color": "0.2", "s": 50, "linestyle": "-.", "linewidth": 1.2})


def _scatter(ax, *coords, style: dict, scale: float = 1.0, **extra):
    """``ax.scatter`` in a style: hollow markers take the colour on their edge."""
    fill = style.get("fill", True)
    colour = [style["color"]] if not isinstance(style["color"], np.ndarray) else style["color"]
    return ax.scatter(*coords, marker=style["marker"], s=style["s"] * scale, alpha=style.get("alpha"),
                      c=colour if fill else "none", edgecolors=style.get("edge", "face" if fill else style["color"]),
                      linewidths=1.3 if not fill else 0.9, **extra)


def _line(style: dict, marker: bool = True, line: bool = False, scale: float = 1.0) -> dict:
    """``Line2D`` keywords for ``style``: its marker, its line, or both."""
    fill = style.get("fill", True)
    return dict(color=style["color"], alpha=style.get("alpha"),
                linestyle=style.get("linestyle", "-") if line else "none", linewidth=style.get("linewidth", 1.5),
                marker=style["marker"] if marker else "none",
                markersize=float(np.sqrt(style["s"] * scale)), markerfacecolor=style["color"] if fill else "none",
                markeredgecolor=style.get("edge", style["color"]))


def _handle(label: str, style: dict, marker: bool = True, line: bool = False) -> Line2D:
    """A legend entry drawn in ``style``."""
    return Line2D([], [], label=label, **_line(style, marker, line))


def preference_label(preference: Sequence[float]) -> str:
    """``(0.70, 0.30)``: how a preference is written on figures and in tables."""
    return "(" + ", ".join(f"{float(v):.2f}" for v in preference) + ")"


def _figure(width: float, height: float, layout: str | None = None) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _kinds(preferences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the one-hot rows and of the equal-preference row."""
    num_tasks = preferences.shape[1]
    one_hot = np.isclose(preferences.max(1), 1.0)
    equal = np.isclose(preferences, 1.0 / num_tasks).all(1)
    return one_hot, equal


def front_figures(accuracy: np.ndarray, preferences: np.ndarray, tasks: Sequence[str],
                  overlays: Sequence[Overlay] = (), title: str = "",
                  references: Mapping[str, Sequence[float]] | None = None) -> dict[str, Figure]:
    """The figures of a front ``accuracy [P, K]`` evaluated at ``preferences [P, K]``: ``{"front": ...}`` for
    K ≤ 3, plus ``"parallel_coordinates"`` for K ≥ 4. ``references``: name → ``[K]`` per-task accuracies (fractions),
    e.g. ``{"zero-shot": ..., "individual": ...}``."""
    accuracy, preferences = np.asarray(accuracy, dtype=float), np.asarray(preferences, dtype=float)
    num_tasks = len(tasks)
    if accuracy.shape != preferences.shape or accuracy.shape[1] != num_tasks:
        raise ValueError(f"accuracy {accuracy.shape} and preferences {preferences.shape} must both be "
                         f"[P, K={num_tasks}]")
    for overlay in overlays:
        if np.asarray(overlay.points).ndim != 2 or np.asarray(overlay.points).shape[1] != num_tasks:
            raise ValueError(f"overlay {overlay.label!r} must be [n, K={num_tasks}], got {np.shape(overlay.points)}")
    refs = {name: np.asarray(values, dtype=float) for name, values in (references or {}).items()}
    for name, values in refs.items():
        if values.shape != (num_tasks,) or not np.isfinite(values).all():
            raise ValueError(f"reference {name!r} must be K={num_tasks} finite accuracies, got {values.tolist()}")
    if num_tasks == 2:
        return {"front": _scatter_2d(accuracy, preferences, tasks, overlays, title, refs)}
    if num_tasks == 3:
        return {"front": _scatter_3d(accuracy, preferences, tasks, overlays, title, refs)}
    return {"front": _pairwise(accuracy, preferences, tasks, overlays, title, refs),
            "parallel_coordinates": _parallel(accuracy, preferences, tasks, overlays, title, refs)}


def _legend_handles(prefs, tasks, overlays, refs, *, mixed: bool = False, lines: bool = False,
                    reference_lines: bool = False, front_range: bool = False) -> list[Line2D]:
    """One entry per one-hot present (``one-hot: <task>`` in its colour), the equal preference, the other
    preferences, the overlays and the references. ``lines``: the front and overlays are drawn as lines;
    ``reference_lines``: references are lines (the grid's diagonal); ``front_range``: the diagonal's range bar."""
    colours = task_colours(len(tasks))
    one_hot, equal = _kinds(prefs)
    handles = [_handle(f"one-hot: {tasks[k]}", ONE_HOT | {"color": colours[k]}, marker=not lines, line=lines)
               for k in sorted(set(prefs[one_hot].argmax(1).tolist()))]
    if equal.any():
        handles.append(_handle("equal preference", EQUAL, marker=not lines, line=lines))
    if (~(one_hot | equal)).any():
        handles.append(_handle("other preferences" + (" (colour: γ-mix)" if mixed else ""), OTHER,
                               marker=not lines, line=lines))
    if front_range:
        handles.append(_handle("diagonal: range over the front", RANGE | {"alpha": 0.5}, line=True))
    handles += [_handle(o.label, _overlay_style(o), line=lines) for o in overlays]
    handles += [_handle(name, _reference_style(name), marker=not reference_lines, line=reference_lines)
                for name in refs]
    return handles


def _front_points(ax, coords, prefs, tasks, mixed: bool, scale: float = 1.0, **extra) -> None:
    """The front's points at ``coords`` (a tuple of ``[P]`` arrays): the other preferences, then the one-hots in
    their task's colour and the equal preference on top. ``mixed``: the others in their γ-mix of the task colours."""
    colours = np.asarray(task_colours(len(tasks)))
    one_hot, equal = _kinds(prefs)
    other = ~(one_hot | equal)
    if other.any():
        colour = np.clip(prefs[other] @ colours, 0, 1) if mixed else OTHER["color"]
        _scatter(ax, *(x[other] for x in coords), style=OTHER | {"color": colour, "alpha": None if mixed else 0.8,
                                                                "s": OTHER["s"] * (2 if mixed else 1)},
                 scale=scale, zorder=2, **extra)
    for i in np.flatnonzero(one_hot):
        _scatter(ax, *(x[[i]] for x in coords), style=ONE_HOT | {"color": tuple(colours[prefs[i].argmax()])},
                 scale=scale, zorder=4, **extra)
    if equal.any():
        _scatter(ax, *(x[equal] for x in coords), style=EQUAL, scale=scale, zorder=5, **extra)


def _scatter_2d(acc, prefs, tasks, overlays, title, refs) -> Figure:
    figure = _figure(9, 6, layout="constrained")
    ax = figure.add_subplot()
    order = np.argsort(prefs[:, 0])
    ax.plot(100 * acc[order, 0], 100 * acc[order, 1], color="0.5", alpha=0.35, zorder=1)
    _front_points(ax, (100 * acc[:, 0], 100 * acc[:, 1]), prefs, tasks, mixed=True)
    for a, p in zip(acc, prefs, strict=True):
        ax.annotate(preference_label(p), (100 * a[0], 100 * a[1]), textcoords="offset points", xytext=(5, 5),
                    fontsize=7)
    for overlay in overlays:  # over the front (zorder 6): a baseline can sit on a point, e.g. the equal one
        pts = 100 * np.asarray(overlay.points, dtype=float)
        _scatter(ax, pts[:, 0], pts[:, 1], style=_overlay_style(overlay), zorder=6)
    for name, values in refs.items():
        _scatter(ax, [100 * values[0]], [100 * values[1]], style=_reference_style(name), zorder=3)
    ax.set_xlabel(f"{tasks[0]} accuracy (%)")
    ax.set_ylabel(f"{tasks[1]} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "front", fontsize=10)
    figure.legend(handles=_legend_handles(prefs, tasks, overlays, refs, mixed=True), loc="outside right upper",
                  fontsize=8)
    return figure


def _scatter_3d(acc, prefs, tasks, overlays, title, refs) -> Figure:
    figure = _figure(9, 6.5, layout="constrained")
    ax = figure.add_subplot(projection="3d", computed_zorder=False)  # zorder keeps the highlighted points on top
    _front_points(ax, tuple(100 * acc.T), prefs, tasks, mixed=True, depthshade=False)
    one_hot, equal = _kinds(prefs)
    for i in np.flatnonzero(one_hot | equal):
        ax.text(*(100 * acc[i]), " " + preference_label(prefs[i]), fontsize=7)
    for overlay in overlays:
        _scatter(ax, *(100 * np.asarray(overlay.points, dtype=float).T), style=_overlay_style(overlay),
                 depthshade=False, zorder=6)
    for name, values in refs.items():
        _scatter(ax, *([100 * v] for v in values), style=_reference_style(name), depthshade=False)
    ax.set_xlabel(f"{tasks[0]} (%)")
    ax.set_ylabel(f"{tasks[1]} (%)")
    ax.set_zlabel(f"{tasks[2]} (%)")
    ax.set_title(title or "front", fontsize=10)
    figure.legend(handles=_legend_handles(prefs, tasks, overlays, refs, mixed=True), loc="outside right upper",
                  fontsize=8)
    return figure


def _diagonal(ax, k, acc, prefs, tasks, overlays, refs, scale: float = 1.0) -> None:
    """Task k's accuracy over the front: a bar from its minimum to its maximum with a tick per preference, the
    task's own one-hot and the equal preference marked; the overlays on a row below, the references as lines."""
    values = 100 * acc[:, k]
    y = 0.65 if overlays else 0.5
    ax.plot([values.min(), values.max()], [y, y], color=RANGE["color"], linewidth=RANGE["linewidth"], alpha=0.3,
            solid_capstyle="butt", zorder=1)
    ax.scatter(values, np.full(len(values), y), marker="|", color=RANGE["color"], s=RANGE["s"] * scale,
               linewidths=0.8, zorder=2)
    one_hot, equal = _kinds(prefs)
    own = one_hot & (prefs.argmax(1) == k)
    _scatter(ax, values[own], np.full(own.sum(), y), style=ONE_HOT | {"color": task_colours(len(tasks))[k]},
             scale=scale, zorder=4)
    _scatter(ax, values[equal], np.full(equal.sum(), y), style=EQUAL, scale=scale, zorder=5)
    shown = [values]
    for overlay in overlays:
        pts = 100 * np.asarray(overlay.points, dtype=float)[:, k]
        _scatter(ax, pts, np.full(len(pts), 0.3), style=_overlay_style(overlay), scale=scale, zorder=3)
        shown.append(pts)
    for name, reference in refs.items():
        style = _reference_style(name)
        ax.axvline(100 * reference[k], color=style["color"], linestyle=style["linestyle"],
                   linewidth=style.get("linewidth", 1.5), zorder=1)
        shown.append([100 * reference[k]])
    low, high = float(np.min(np.concatenate(shown))), float(np.max(np.concatenate(shown)))
    pad = max(0.08 * (high - low), 1.0)
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(0, 1)
    ax.set_yticks([])  # the legend names the rows (tick labels here would widen every column of the grid)
    ax.set_title(tasks[k], fontsize=9, fontweight="bold", color=task_colours(len(tasks))[k])


def _pairwise(acc, prefs, tasks, overlays, title, refs) -> Figure:
    num_tasks = len(tasks)
    size = max(1.5, 12.0 / num_tasks)
    figure = _figure(size * num_tasks, size * num_tasks)
    axes = figure.subplots(num_tasks, num_tasks, squeeze=False)
    scale = min(1.0, 4.0 / num_tasks)  # smaller markers in smaller cells
    for i in range(num_tasks):
        for j in range(num_tasks):
            ax = axes[i][j]
            if j > i:
                ax.axis("off")
                continue
            ax.tick_params(labelsize=6)
            if i == num_tasks - 1:
                ax.set_xlabel(f"{tasks[j]} (%)", fontsize=8)
            if i == j:
                _diagonal(ax, i, acc, prefs, tasks, overlays, refs, scale)
                continue
            _front_points(ax, (100 * acc[:, j], 100 * acc[:, i]), prefs, tasks, mixed=False, scale=scale)
            for overlay in overlays:
                pts = 100 * np.asarray(overlay.points, dtype=float)
                _scatter(ax, pts[:, j], pts[:, i], style=_overlay_style(overlay), scale=0.6 * scale, zorder=6)
            if j == 0:
                ax.set_ylabel(f"{tasks[i]} (%)", fontsize=8)
    figure.suptitle((title + ": " if title else "") + "pairwise projections of the front (accuracy %)", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    # the empty upper triangle holds the legend, its top right corner at the top right cell's
    figure.legend(handles=_legend_handles(prefs, tasks, overlays, refs, reference_lines=True, front_range=True),
                  loc="upper right", bbox_to_anchor=(1, 1), bbox_transform=axes[0][-1].transAxes, fontsize=9)
    return figure


def _parallel(acc, prefs, tasks, overlays, title, refs) -> Figure:
    num_tasks = len(tasks)
    figure = _figure(max(8.0, 1.1 * num_tasks) + 2.5, 5, layout="constrained")
    ax = figure.add_subplot()
    x = np.arange(num_tasks)
    colours = task_colours(num_tasks)
    one_hot, equal = _kinds(prefs)
    for overlay in overlays:
        style = _overlay_style(overlay)
        for row in np.asarray(overlay.points, dtype=float):
            ax.plot(x, 100 * row, **_line(style, line=True, scale=0.6), zorder=2)
    for i in np.argsort(one_hot | equal, kind="stable"):  # highlighted lines last, on top
        style = (ONE_HOT | {"color": colours[prefs[i].argmax()]}) if one_hot[i] else EQUAL if equal[i] else OTHER
        ax.plot(x, 100 * acc[i], color=style["color"], linewidth=style["linewidth"], alpha=style.get("alpha", 1.0),
                zorder=3 if (one_hot[i] or equal[i]) else 1)
    for name, values in refs.items():
        _scatter(ax, x, 100 * values, style=_reference_style(name), zorder=5)
    ax.set_xticks(x, list(tasks), rotation=30, fontsize=8)
    for label, colour in zip(ax.get_xticklabels(), colours, strict=True):
        label.set_color(colour)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title((title + ": " if title else "") + "parallel coordinates of the front", fontsize=10)
    figure.legend(handles=_legend_handles(prefs, tasks, overlays, refs, lines=True), loc="outside right upper",
                  fontsize=8)
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
