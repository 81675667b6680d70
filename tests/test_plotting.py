"""The front figures name every task's colour, keep their legends off the data, and use the grid's diagonal for each
task's accuracy range against the references (issue 27)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from paretomerge.front import summary_preferences
from paretomerge.plotting import Overlay, front_figures, save_figure, task_colours

TASKS = ["colour", "stripes", "size", "digit", "cars", "dtd", "eurosat", "gtsrb"]


def _front(num_tasks: int, seed: int = 0):
    """Synthetic accuracies for the logger's preference set: task k's accuracy grows with γ_k."""
    prefs = summary_preferences(num_tasks).numpy()
    rng = np.random.default_rng(seed)
    low, high = rng.uniform(0.3, 0.6, num_tasks), rng.uniform(0.8, 0.95, num_tasks)
    acc = low + (high - low) * prefs ** 0.5
    references = {"zero-shot": low - 0.1, "individual": high + 0.03}
    overlays = [Overlay("Task Arithmetic", acc.mean(0, keepdims=True)), Overlay("MAP real", acc[:3] - 0.02)]
    return acc, prefs, TASKS[:num_tasks], overlays, references


def _legend_entries(figure) -> dict[str, object]:
    """Label → handle of every legend on the figure (figure legends and axes legends)."""
    legends = list(figure.legends) + [ax.get_legend() for ax in figure.axes if ax.get_legend() is not None]
    return {text.get_text(): handle for legend in legends
            for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True)}


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 8])
def test_every_figure_names_each_one_hot_task_in_its_colour(tmp_path, num_tasks):
    acc, prefs, tasks, overlays, references = _front(num_tasks)
    figures = front_figures(acc, prefs, tasks, overlays, references=references)
    assert sorted(figures) == (["front"] if num_tasks <= 3 else ["front", "parallel_coordinates"])
    colours = task_colours(num_tasks)
    for name, figure in figures.items():
        entries = _legend_entries(figure)
        for k, task in enumerate(tasks):
            handle = entries[f"one-hot: {task}"]
            assert to_rgb(handle.get_color()) == pytest.approx(colours[k]), (name, task)
        assert {"equal preference", "Task Arithmetic", "MAP real", "zero-shot", "individual"} <= set(entries), name
        assert not any(label.startswith("one-hot e_k") for label in entries)  # the old single entry is gone
        image = Image.open(save_figure(figure, tmp_path / f"{name}.png")).convert("RGB")
        assert np.asarray(image).std() > 10


def test_task_colours_are_distinct_and_not_the_grey_of_other_preferences():
    colours = task_colours(18)
    assert len({tuple(np.round(c, 3)) for c in colours}) == 18
    assert all(np.ptp(c) > 0.05 for c in colours)  # none is a grey (r = g = b)


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 8])
def test_legends_do_not_cover_the_data(num_tasks):
    """Every legend lies outside every axes that holds data (the grid's upper triangle is empty)."""
    acc, prefs, tasks, overlays, references = _front(num_tasks)
    for name, figure in front_figures(acc, prefs, tasks, overlays, references=references).items():
        renderer = figure.canvas.get_renderer()
        figure.canvas.draw()
        legend = figure.legends[0].get_window_extent(renderer)
        assert legend.x1 <= figure.bbox.x1 + 1 and legend.y1 <= figure.bbox.y1 + 1, name  # not clipped
        for ax in figure.axes:
            if ax.axison:
                box = ax.get_window_extent(renderer)
                assert not legend.overlaps(box), (name, ax.get_title(), ax.get_xlabel(), ax.get_ylabel())


def _diagonal(figure, k: int, num_tasks: int):
    return figure.axes[k * num_tasks + k]


def test_grid_diagonal_shows_each_tasks_range_against_the_references():
    num_tasks = 4
    acc, prefs, tasks, overlays, references = _front(num_tasks)
    figure = front_figures(acc, prefs, tasks, overlays, references=references)["front"]
    for k, task in enumerate(tasks):
        ax = _diagonal(figure, k, num_tasks)
        assert ax.get_title() == task
        lines = [(line.get_xdata(), line.get_linestyle()) for line in ax.get_lines()]
        # the range bar runs from the task's lowest to its highest accuracy over the front
        assert any(np.allclose(x, [100 * acc[:, k].min(), 100 * acc[:, k].max()]) and style == "-"
                   for x, style in lines)
        # one vertical line per reference, at its accuracy on this task
        for name, values in references.items():
            assert any(np.allclose(x, [100 * values[k]] * 2) for x, _ in lines), (task, name)
        lo, hi = ax.get_xlim()
        assert lo < 100 * references["zero-shot"][k] and hi > 100 * references["individual"][k]
        points = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections])
        # a tick per evaluated preference, the equal preference and the task's own one-hot marked again
        own = np.flatnonzero(np.isclose(prefs[:, k], 1.0))[0]
        assert np.sum(np.isclose(points, 100 * acc[own, k])) >= 2
        assert np.sum(np.isclose(points, 100 * acc[0, k])) >= 2
        assert any(np.isclose(points, 100 * overlays[0].points[0, k]))  # Task Arithmetic on the baselines' row


def test_grid_diagonal_without_references_still_shows_the_range():
    acc, prefs, tasks, _, _ = _front(5)
    figure = front_figures(acc, prefs, tasks)["front"]
    for k in range(5):
        ax = _diagonal(figure, k, 5)
        xs = [line.get_xdata() for line in ax.get_lines()]
        assert len(xs) == 1 and np.allclose(xs[0], [100 * acc[:, k].min(), 100 * acc[:, k].max()])
    assert "zero-shot" not in _legend_entries(figure)


def test_references_are_drawn_where_each_figure_kind_puts_them():
    for num_tasks in (2, 3):  # a point: the references' accuracies on every task at once
        acc, prefs, tasks, _, references = _front(num_tasks)
        ax = front_figures(acc, prefs, tasks, references=references)["front"].axes[0]
        offsets = [np.asarray(c._offsets3d).T if num_tasks == 3 else c.get_offsets() for c in ax.collections]
        for values in references.values():
            assert any(o.shape == (1, num_tasks) and np.allclose(o[0], 100 * values) for o in offsets)
    acc, prefs, tasks, _, references = _front(4)  # parallel coordinates: a marker on each task's axis
    ax = front_figures(acc, prefs, tasks, references=references)["parallel_coordinates"].axes[0]
    offsets = [c.get_offsets() for c in ax.collections]
    for values in references.values():
        assert any(np.allclose(o, np.column_stack([np.arange(4), 100 * values])) for o in offsets)


def test_one_hot_entries_only_for_the_one_hots_evaluated():
    prefs = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    entries = _legend_entries(front_figures(np.full((3, 3), 0.5), prefs, ["a", "b", "c"])["front"])
    assert [label for label in entries if label.startswith("one-hot")] == ["one-hot: a"]
    assert "equal preference" not in entries and "other preferences (colour: γ-mix)" in entries


def test_front_figures_refuse_bad_references():
    acc, prefs, tasks, _, _ = _front(3)
    with pytest.raises(ValueError, match="reference 'zero-shot'"):
        front_figures(acc, prefs, tasks, references={"zero-shot": [0.5, 0.5]})
    with pytest.raises(ValueError, match="reference 'individual'"):
        front_figures(acc, prefs, tasks, references={"individual": [0.5, float("nan"), 0.5]})
