"""Figures and tables of fronts: what `paretomerge.callbacks.ParetoFrontLogger` sends to TensorBoard and what
``paretomerge front`` writes as PNG and CSV.

A front is ``[P, K]`` per-task scores, and every figure, table and CSV here takes the `paretomerge.pareto.Score` they
are (``score=``, `ACCURACY` by default): it says how values are shown (accuracy, fractions in [0, 1], in percent; a
loss in nats/token as it is), what the axes are called (`Score.label`) and which points are non-dominated (the high
ones for accuracy, the low ones for a loss, whose figures say "lower is better": lower-left is better there).

Figures are built on `matplotlib.figure.Figure` with the Agg canvas (no pyplot state, no display needed):

- K = 2: a scatter of the front, each point labelled by its preference;
- K = 3: a 3-D scatter;
- K ≥ 4: a grid of pairwise 2-D projections (Pareto Merging's Figure 5) whose diagonal shows each task's score
  range over the front, and a parallel-coordinates plot.

Every figure draws the one-hot preference e_k in task k's colour (`task_colours`) with a legend entry
``one-hot: <task>``, the equal preference as a black star, and the other preferences in grey (K ≥ 4) or in their
γ-weighted mix of the task colours (K ≤ 3). Baselines (Task Arithmetic, AdaMerging, MAP's predicted and real fronts)
go on the same axes as `Overlay`s, in black and grey so that colour always means a task. ``references`` (e.g.
``{"zero-shot": [K], "individual": [K]}``, per-task scores of θ0 and of each task's fine-tuned model) are
points for K ≤ 3, vertical lines on the grid's diagonal and markers on the parallel axes.
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

from paretomerge.pareto import ACCURACY, Score, non_dominated


@dataclass
class Overlay:
    """Points of another method drawn over the front: ``points [n, K]`` scores, in the front's `Score` (accuracy as
    fractions). ``style`` overrides keys of its `OVERLAY_STYLES` entry (marker, color, s, fill, alpha, linestyle)."""

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


def _direction(score: Score) -> str:
    """What a title adds so that a figure reads the right way: nothing where higher is better (the usual reading),
    ``" (lower is better)"`` for a loss."""
    return "" if score.higher_is_better else " (lower is better)"


def _minimum_pad(score: Score, low: float, high: float) -> float:
    """The least margin around the diagonal's range, in the score's shown units: 1 % of the shown scale, that is
    of 100 for a percent score (1 point of accuracy), else of the data's magnitude (about 0.02 for losses near 2)."""
    scale = float(score.shown(1.0)) if score.percent else max(abs(low), abs(high))
    return 0.01 * (scale if scale > 0 else 1.0)


# Up to this many tasks the front is also drawn as its K(K-1)/2 pairwise projections; beyond, as parallel coordinates
# only (benchmarks/README.md, "many_tasks.py": the grid took 17 s per drawing at K = 20, 0.3 s the parallel plot).
PAIRWISE_MAX_TASKS = 10


def front_figures(values: np.ndarray, preferences: np.ndarray, tasks: Sequence[str],
                  overlays: Sequence[Overlay] = (), title: str = "",
                  references: Mapping[str, Sequence[float]] | None = None,
                  score: Score = ACCURACY) -> dict[str, Figure]:
    """The figures of a front ``values [P, K]`` (per-task scores in ``score``: accuracy as fractions, a loss in
    nats/token) evaluated at ``preferences [P, K]``: ``{"front": ...}`` for K ≤ 3 (the front), and for 4 ≤ K ≤
    `PAIRWISE_MAX_TASKS` (its pairwise projections) plus ``"parallel_coordinates"``; beyond, ``"front"`` is the
    parallel coordinates alone. ``references``: name → ``[K]`` per-task scores in the same units, e.g.
    ``{"zero-shot": ..., "individual": ...}``."""
    values, preferences = np.asarray(values, dtype=float), np.asarray(preferences, dtype=float)
    num_tasks = len(tasks)
    if values.shape != preferences.shape or values.shape[1] != num_tasks:
        raise ValueError(f"{score.name} {values.shape} and preferences {preferences.shape} must both be "
                         f"[P, K={num_tasks}]")
    for overlay in overlays:
        if np.asarray(overlay.points).ndim != 2 or np.asarray(overlay.points).shape[1] != num_tasks:
            raise ValueError(f"overlay {overlay.label!r} must be [n, K={num_tasks}], got {np.shape(overlay.points)}")
    refs = {name: np.asarray(ref, dtype=float) for name, ref in (references or {}).items()}
    for name, ref in refs.items():
        if ref.shape != (num_tasks,) or not np.isfinite(ref).all():
            raise ValueError(f"reference {name!r} must be K={num_tasks} finite {score.name} values, got {ref.tolist()}")
    if num_tasks == 2:
        return {"front": _scatter_2d(values, preferences, tasks, overlays, title, refs, score)}
    if num_tasks == 3:
        return {"front": _scatter_3d(values, preferences, tasks, overlays, title, refs, score)}
    if num_tasks > PAIRWISE_MAX_TASKS:  # K(K-1)/2 panels: 190 at K = 20, 17 s to draw and too small to read
        return {"front": _parallel(values, preferences, tasks, overlays, title, refs, score)}
    return {"front": _pairwise(values, preferences, tasks, overlays, title, refs, score),
            "parallel_coordinates": _parallel(values, preferences, tasks, overlays, title, refs, score)}


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


def _scatter_2d(front, prefs, tasks, overlays, title, refs, score: Score) -> Figure:
    figure = _figure(9, 6, layout="constrained")
    ax = figure.add_subplot()
    shown = score.shown(front)
    order = np.argsort(prefs[:, 0])
    ax.plot(shown[order, 0], shown[order, 1], color="0.5", alpha=0.35, zorder=1)
    _front_points(ax, (shown[:, 0], shown[:, 1]), prefs, tasks, mixed=True)
    for a, p in zip(shown, prefs, strict=True):
        ax.annotate(preference_label(p), (a[0], a[1]), textcoords="offset points", xytext=(5, 5), fontsize=7)
    for overlay in overlays:  # over the front (zorder 6): a baseline can sit on a point, e.g. the equal one
        pts = score.shown(np.asarray(overlay.points, dtype=float))
        _scatter(ax, pts[:, 0], pts[:, 1], style=_overlay_style(overlay), zorder=6)
    for name, ref in refs.items():
        ref = score.shown(ref)
        _scatter(ax, [ref[0]], [ref[1]], style=_reference_style(name), zorder=3)
    ax.set_xlabel(score.label(tasks[0]))
    ax.set_ylabel(score.label(tasks[1]))
    ax.grid(alpha=0.3)
    ax.set_title((title or "front") + _direction(score), fontsize=10)
    figure.legend(handles=_legend_handles(prefs, tasks, overlays, refs, mixed=True), loc="outside right upper",
                  fontsize=8)
    return figure


def _scatter_3d(front, prefs, tasks, overlays, title, refs, score: Score) -> Figure:
    figure = _figure(9, 6.5, layout="constrained")
    ax = figure.add_subplot(projection="3d", computed_zorder=False)  # zorder keeps the highlighted points on top
    shown = score.shown(front)
    _front_points(ax, tuple(shown.T), prefs, tasks, mixed=True, depthshade=False)
    one_hot, equal = _kinds(prefs)
    for i in np.flatnonzero(one_hot | equal):
        ax.text(*shown[i], " " + preference_label(prefs[i]), fontsize=7)
    for overlay in overlays:
        _scatter(ax, *score.shown(np.asarray(overlay.points, dtype=float)).T, style=_overlay_style(overlay),
                 depthshade=False, zorder=6)
    for name, ref in refs.items():
        _scatter(ax, *([v] for v in score.shown(ref)), style=_reference_style(name), depthshade=False)
    ax.set_xlabel(score.label(tasks[0]))
    ax.set_ylabel(score.label(tasks[1]))
    ax.set_zlabel(score.label(tasks[2]))
    ax.set_title((title or "front") + _direction(score), fontsize=10)
    figure.legend(handles=_legend_handles(prefs, tasks, overlays, refs, mixed=True), loc="outside right upper",
                  fontsize=8)
    return figure


def _diagonal(ax, k, front, prefs, tasks, overlays, refs, score: Score, scale: float = 1.0) -> None:
    """Task k's score over the front: a bar from its minimum to its maximum with a tick per preference, the task's own
    one-hot and the equal preference marked; the overlays on a row below, the references as lines."""
    values = score.shown(front[:, k])
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
        pts = score.shown(np.asarray(overlay.points, dtype=float)[:, k])
        _scatter(ax, pts, np.full(len(pts), 0.3), style=_overlay_style(overlay), scale=scale, zorder=3)
        shown.append(pts)
    for name, reference in refs.items():
        style = _reference_style(name)
        at = float(score.shown(reference[k]))
        ax.axvline(at, color=style["color"], linestyle=style["linestyle"], linewidth=style.get("linewidth", 1.5),
                   zorder=1)
        shown.append([at])
    low, high = float(np.min(np.concatenate(shown))), float(np.max(np.concatenate(shown)))
    pad = max(0.08 * (high - low), _minimum_pad(score, low, high))
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(0, 1)
    ax.set_yticks([])  # the legend names the rows (tick labels here would widen every column of the grid)
    ax.set_title(tasks[k], fontsize=9, fontweight="bold", color=task_colours(len(tasks))[k])


def _pairwise(front, prefs, tasks, overlays, title, refs, score: Score) -> Figure:
    num_tasks = len(tasks)
    size = max(1.5, 12.0 / num_tasks)
    figure = _figure(size * num_tasks, size * num_tasks)
    axes = figure.subplots(num_tasks, num_tasks, squeeze=False)
    scale = min(1.0, 4.0 / num_tasks)  # smaller markers in smaller cells
    shown = score.shown(front)
    for i in range(num_tasks):
        for j in range(num_tasks):
            ax = axes[i][j]
            if j > i:
                ax.axis("off")
                continue
            ax.tick_params(labelsize=6)
            if i == num_tasks - 1:
                ax.set_xlabel(score.label(tasks[j]), fontsize=8)
            if i == j:
                _diagonal(ax, i, front, prefs, tasks, overlays, refs, score, scale)
                continue
            _front_points(ax, (shown[:, j], shown[:, i]), prefs, tasks, mixed=False, scale=scale)
            for overlay in overlays:
                pts = score.shown(np.asarray(overlay.points, dtype=float))
                _scatter(ax, pts[:, j], pts[:, i], style=_overlay_style(overlay), scale=0.6 * scale, zorder=6)
            if j == 0:
                ax.set_ylabel(score.label(tasks[i]), fontsize=8)
    what = f"{score.name} {score.unit}" + ("" if score.higher_is_better else ", lower is better")
    figure.suptitle((title + ": " if title else "") + f"pairwise projections of the front ({what})", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    # the empty upper triangle holds the legend, its top right corner at the top right cell's
    figure.legend(handles=_legend_handles(prefs, tasks, overlays, refs, reference_lines=True, front_range=True),
                  loc="upper right", bbox_to_anchor=(1, 1), bbox_transform=axes[0][-1].transAxes, fontsize=9)
    return figure


def _parallel(front, prefs, tasks, overlays, title, refs, score: Score) -> Figure:
    num_tasks = len(tasks)
    figure = _figure(max(8.0, 1.1 * num_tasks) + 2.5, 5, layout="constrained")
    ax = figure.add_subplot()
    x = np.arange(num_tasks)
    colours = task_colours(num_tasks)
    one_hot, equal = _kinds(prefs)
    shown = score.shown(front)
    for overlay in overlays:
        style = _overlay_style(overlay)
        for row in score.shown(np.asarray(overlay.points, dtype=float)):
            ax.plot(x, row, **_line(style, line=True, scale=0.6), zorder=2)
    for i in np.argsort(one_hot | equal, kind="stable"):  # highlighted lines last, on top
        style = (ONE_HOT | {"color": colours[prefs[i].argmax()]}) if one_hot[i] else EQUAL if equal[i] else OTHER
        ax.plot(x, shown[i], color=style["color"], linewidth=style["linewidth"], alpha=style.get("alpha", 1.0),
                zorder=3 if (one_hot[i] or equal[i]) else 1)
    for name, ref in refs.items():
        _scatter(ax, x, score.shown(ref), style=_reference_style(name), zorder=5)
    ax.set_xticks(x, list(tasks), rotation=30, fontsize=8)
    for label, colour in zip(ax.get_xticklabels(), colours, strict=True):
        label.set_color(colour)
    ax.set_ylabel(score.label())
    ax.grid(alpha=0.3)
    ax.set_title((title + ": " if title else "") + "parallel coordinates of the front" + _direction(score),
                 fontsize=10)
    figure.legend(handles=_legend_handles(prefs, tasks, overlays, refs, lines=True), loc="outside right upper",
                  fontsize=8)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _decimals(score: Score) -> int:
    """Decimals a table gives a shown score: one for a percent (accuracy), three otherwise (a loss in nats/token)."""
    return 1 if score.percent else 3


def csv_column(score: Score, task: str) -> str:
    """The CSV column of task's score: ``acc_<task>`` for accuracy (as readers of older files expect),
    ``<score.name>_<task>`` otherwise (``loss_<task>``)."""
    return f"{'acc' if score.name == ACCURACY.name else score.name}_{task}"


def front_table(values: np.ndarray, preferences: np.ndarray, tasks: Sequence[str], markdown: bool = False,
                score: Score = ACCURACY) -> str:
    """Every evaluated point: preference → per-task score as shown (accuracy in % with one decimal, a loss with
    three) and their mean, the non-dominated points (under ``score``'s direction) marked ``*``."""
    values, preferences = np.asarray(values, dtype=float), np.asarray(preferences, dtype=float)
    keep = set(non_dominated(values, score).tolist())
    digits = _decimals(score)
    header = ["preference", *tasks, "mean", "nd"]
    rows = [[preference_label(p), *(f"{v:.{digits}f}" for v in a), f"{a.mean():.{digits}f}", "*" if i in keep else ""]
            for i, (p, a) in enumerate(zip(preferences, score.shown(values), strict=True))]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def write_front_csv(path: str | Path, values: np.ndarray, preferences: np.ndarray, tasks: Sequence[str],
                    score: Score = ACCURACY) -> Path:
    """One row per evaluated point: ``pref_<task>...``, the scores as evaluated (`csv_column`: ``acc_<task>...``
    fractions for accuracy, ``loss_<task>...`` in nats/token for a loss), ``non_dominated`` (1/0, under ``score``'s
    direction)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = set(non_dominated(values, score).tolist())
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"pref_{t}" for t in tasks] + [csv_column(score, t) for t in tasks] + ["non_dominated"])
        for i, (p, a) in enumerate(zip(np.asarray(preferences).tolist(), np.asarray(values).tolist(), strict=True)):
            writer.writerow([f"{v:.6f}" for v in p] + [f"{v:.6f}" for v in a] + [int(i in keep)])
    return path
