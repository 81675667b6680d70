"""The front figures name every task's colour, keep their legends off the data, and use the grid's diagonal for each
task's accuracy range against the references (issue 27); figures, tables and CSVs of a loss front show the loss as it
is, named and marked "lower is better", with its low points non-dominated."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from paretomerge.front import summary_preferences
from paretomerge.pareto import ACCURACY, LOSS
from paretomerge.plotting import Overlay, front_figures, front_table, save_figure, task_colours, write_front_csv

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


def _loss_front(num_tasks: int, seed: int = 0):
    """Synthetic next-token losses (nats/token): task k's loss falls with γ_k, from about 3 to about 1.6."""
    prefs = summary_preferences(num_tasks).numpy()
    rng = np.random.default_rng(seed)
    high, low = rng.uniform(2.8, 3.4, num_tasks), rng.uniform(1.4, 1.8, num_tasks)
    loss = high - (high - low) * prefs ** 0.5
    references = {"zero-shot": high + 0.2, "individual": low - 0.05}
    overlays = [Overlay("Task Arithmetic", loss.mean(0, keepdims=True))]
    return loss, prefs, TASKS[:num_tasks], overlays, references


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_loss_figures_name_the_loss_and_say_lower_is_better(tmp_path, num_tasks):
    loss, prefs, tasks, overlays, references = _loss_front(num_tasks)
    figures = front_figures(loss, prefs, tasks, overlays, title="gpt", references=references, score=LOSS)
    assert sorted(figures) == (["front"] if num_tasks <= 3 else ["front", "parallel_coordinates"])
    for name, figure in figures.items():
        image = Image.open(save_figure(figure, tmp_path / f"{name}.png")).convert("RGB")
        assert np.asarray(image).std() > 10, name
        labels = [label for ax in figure.axes for label in (ax.get_xlabel(), ax.get_ylabel()) if label]
        assert labels and not any("%" in label or "accuracy" in label for label in labels), (name, labels)
    if num_tasks <= 3:
        ax = figures["front"].axes[0]
        axis_labels = [ax.get_xlabel(), ax.get_ylabel()] + ([ax.get_zlabel()] if num_tasks == 3 else [])
        assert axis_labels == [f"{task} loss (nats/token)" for task in tasks]
        assert ax.get_title() == "gpt (lower is better)"
    else:
        grid = figures["front"].axes
        assert [grid[(num_tasks - 1) * num_tasks + j].get_xlabel() for j in range(num_tasks)] == [
            f"{task} loss (nats/token)" for task in tasks]
        assert [grid[i * num_tasks].get_ylabel() for i in range(1, num_tasks)] == [
            f"{task} loss (nats/token)" for task in tasks[1:]]
        assert figures["front"].get_suptitle() == "gpt: pairwise projections of the front (loss nats/token, lower is " \
                                                  "better)"
        ax = figures["parallel_coordinates"].axes[0]
        assert ax.get_ylabel() == "loss (nats/token)"
        assert ax.get_title() == "gpt: parallel coordinates of the front (lower is better)"


def test_accuracy_figures_keep_their_labels():
    acc, prefs, tasks, _, _ = _front(2)
    ax = front_figures(acc, prefs, tasks, title="vit")["front"].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("colour accuracy (%)", "stripes accuracy (%)", "vit")
    acc, prefs, tasks, _, _ = _front(5)
    figures = front_figures(acc, prefs, tasks)
    assert figures["front"].get_suptitle() == "pairwise projections of the front (accuracy %)"
    assert figures["front"].axes[5 * 4].get_xlabel() == "colour accuracy (%)"
    assert figures["parallel_coordinates"].axes[0].get_ylabel() == "accuracy (%)"


def test_loss_scatters_plot_the_loss_itself():
    """K = 2 and 3: the points, their preference labels and the references sit at the losses, not at 100 × them."""
    loss, prefs, tasks, overlays, references = _loss_front(2)
    ax = front_figures(loss, prefs, tasks, overlays, references=references, score=LOSS)["front"].axes[0]
    annotated = {t.get_text(): t.xy for t in ax.texts}
    for p, point in zip(prefs, loss, strict=True):
        assert annotated[f"({p[0]:.2f}, {p[1]:.2f})"] == pytest.approx(tuple(point))
    order = np.argsort(prefs[:, 0])
    assert np.allclose(ax.get_lines()[0].get_xydata(), loss[order])
    offsets = [c.get_offsets() for c in ax.collections]
    for values in [*references.values(), overlays[0].points[0]]:
        assert any(o.shape == (1, 2) and np.allclose(o[0], values) for o in offsets)
    xlo, xhi = ax.get_xlim()
    assert xlo < loss[:, 0].min() and xhi < 10  # the axis spans losses, not percents
    loss, prefs, tasks, _, references = _loss_front(3)
    ax = front_figures(loss, prefs, tasks, references=references, score=LOSS)["front"].axes[0]
    offsets = [np.asarray(c._offsets3d).T for c in ax.collections]
    equal = np.flatnonzero(np.isclose(prefs, 1 / 3, atol=0.01).all(1))
    assert any(np.allclose(o, loss[equal]) for o in offsets)
    for values in references.values():
        assert any(o.shape == (1, 3) and np.allclose(o[0], values) for o in offsets)


def test_loss_grid_and_parallel_coordinates_use_the_loss_and_a_pad_in_its_units():
    num_tasks = 5
    loss, prefs, tasks, overlays, references = _loss_front(num_tasks)
    figures = front_figures(loss, prefs, tasks, overlays, references=references, score=LOSS)
    for k in range(num_tasks):
        ax = _diagonal(figures["front"], k, num_tasks)
        lines = [line.get_xdata() for line in ax.get_lines()]
        assert any(np.allclose(x, [loss[:, k].min(), loss[:, k].max()]) for x in lines)
        for values in references.values():
            assert any(np.allclose(x, [values[k]] * 2) for x in lines)
        low, high = references["individual"][k], references["zero-shot"][k]  # the extremes drawn on this task
        pad = max(0.08 * (high - low), 0.01 * high)
        assert ax.get_xlim() == pytest.approx((low - pad, high + pad))
    ax = figures["front"].axes[1 * num_tasks + 0]  # stripes (y) against colour (x)
    offsets = np.concatenate([c.get_offsets() for c in ax.collections])
    assert any(np.allclose(o, loss[0, [0, 1]]) for o in offsets)  # the equal preference
    ax = figures["parallel_coordinates"].axes[0]
    assert any(np.allclose(line.get_ydata(), loss[0]) for line in ax.get_lines())
    offsets = [c.get_offsets() for c in ax.collections]
    for values in references.values():
        assert any(np.allclose(o, np.column_stack([np.arange(num_tasks), values])) for o in offsets)


@pytest.mark.parametrize("score, value, expected", [(LOSS, 2.0, (1.98, 2.02)), (ACCURACY, 0.5, (49.0, 51.0))])
def test_diagonal_pads_a_flat_range_in_the_scores_units(score, value, expected):
    """A task whose score does not move over the front still gets a visible margin: 1 % of the loss, or 1 point of
    accuracy."""
    prefs = summary_preferences(4).numpy()
    values = np.full(prefs.shape, value)
    values[:, 1] = value + prefs[:, 1] / 10  # the other tasks may move
    ax = _diagonal(front_figures(values, prefs, TASKS[:4], score=score)["front"], 0, 4)
    assert ax.get_xlim() == pytest.approx(expected)


# rows 0-2 trade one task for the other; row 3 is worse than all of them on both tasks under a loss (better under
# accuracy), row 4 is worse than row 0 under a loss
TRADE_OFF = np.array([[1.0, 2.0], [2.0, 1.0], [1.5, 1.5], [2.5, 2.5], [1.2, 2.2]])
TRADE_PREFS = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.3, 0.7], [0.7, 0.3]])


def test_loss_table_shows_three_decimals_and_marks_the_low_points():
    table = front_table(TRADE_OFF, TRADE_PREFS, ["en", "fr"], score=LOSS)
    rows = [line.split() for line in table.splitlines()[2:]]
    assert [row[2:5] for row in rows] == [["1.000", "2.000", "1.500"], ["2.000", "1.000", "1.500"],
                                          ["1.500", "1.500", "1.500"], ["2.500", "2.500", "2.500"],
                                          ["1.200", "2.200", "1.700"]]
    assert [row[-1] == "*" for row in rows] == [True, True, True, False, False]
    markdown = front_table(TRADE_OFF, TRADE_PREFS, ["en", "fr"], markdown=True, score=LOSS).splitlines()
    assert markdown[0] == "| preference | en | fr | mean | nd |"
    assert markdown[2:] == ["| (1.00, 0.00) | 1.000 | 2.000 | 1.500 | * |",
                            "| (0.00, 1.00) | 2.000 | 1.000 | 1.500 | * |",
                            "| (0.50, 0.50) | 1.500 | 1.500 | 1.500 | * |",
                            "| (0.30, 0.70) | 2.500 | 2.500 | 2.500 |  |",
                            "| (0.70, 0.30) | 1.200 | 2.200 | 1.700 |  |"]
    accuracy = [line.split() for line in front_table(TRADE_OFF / 4, TRADE_PREFS, ["en", "fr"]).splitlines()[2:]]
    assert accuracy[3][2:] == ["62.5", "62.5", "62.5", "*"]  # accuracy by default: %, one decimal, the high point
    assert all(row[-1] != "*" for i, row in enumerate(accuracy) if i != 3)


def test_loss_csv_has_loss_columns_and_the_low_points_non_dominated(tmp_path):
    path = write_front_csv(tmp_path / "front.csv", TRADE_OFF, TRADE_PREFS, ["en", "fr"], score=LOSS)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["pref_en", "pref_fr", "loss_en", "loss_fr", "non_dominated"]
    assert [[float(r["loss_en"]), float(r["loss_fr"])] for r in rows] == TRADE_OFF.tolist()  # not ×100
    assert [float(r["pref_en"]) for r in rows] == TRADE_PREFS[:, 0].tolist()
    assert [r["non_dominated"] for r in rows] == ["1", "1", "1", "0", "0"]
    with open(write_front_csv(tmp_path / "acc.csv", TRADE_OFF / 4, TRADE_PREFS, ["en", "fr"]), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["pref_en", "pref_fr", "acc_en", "acc_fr", "non_dominated"]  # accuracy keeps acc_
    assert [r["non_dominated"] for r in rows] == ["0", "0", "0", "1", "0"]
