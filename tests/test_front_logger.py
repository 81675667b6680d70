"""The front in TensorBoard (ParetoFrontLogger), read back from the event files and from a real TensorBoard server,
and ``paretomerge front`` on a checkpoint."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from paretomerge import ParetoMerging
from paretomerge.callbacks import MAPBaseline, ParetoFrontLogger
from paretomerge.cli import main as cli_main
from paretomerge.front import individual_scores, summary_preferences
from paretomerge.kernels.merged_model import MergedModel
from paretomerge.pareto import front_spread, hypervolume
from paretomerge.plotting import PAIRWISE_MAX_TASKS, Overlay, front_figures, front_table, save_figure
from paretomerge.preferences import front_preferences
from tests.conftest import make_trainer

STEPS, EVERY = 10, 5


def _not_blank(image: Image.Image) -> None:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10, "the figure is (nearly) one colour"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "the figure has too few colours to hold a plot"


@pytest.fixture(scope="module")
def run(fast_tiny, tmp_path_factory):
    """A 10-step Pareto Merging fit on the fast TinySuite, validating every 5 steps, with the front logger and a
    small MAP baseline (listed first, so its front is on the final figure)."""
    root = tmp_path_factory.mktemp("tb")
    torch.manual_seed(0)
    model = ParetoMerging(rank=4, seed=0)
    front_logger = ParetoFrontLogger(every_n_validations=1, progress=False)
    map_baseline = MAPBaseline(budget=12, real_samples=3, generations=20)
    trainer = make_trainer(
        root, STEPS, val_check_interval=EVERY, check_val_every_n_epoch=None, limit_val_batches=None,
        logger=TensorBoardLogger(str(root), name="run", default_hp_metric=False), log_every_n_steps=1,
        callbacks=[map_baseline, front_logger, ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True)],
        enable_checkpointing=True,
    )
    trainer.fit(model, datamodule=fast_tiny)
    events = EventAccumulator(str(Path(trainer.logger.log_dir)),
                              size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return {"root": root, "model": model, "logger": front_logger, "map": map_baseline, "events": events,
            "suite": fast_tiny, "log_dir": Path(trainer.logger.log_dir)}


def _scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


def test_scalars_are_the_front_metrics_of_the_evaluated_points(run):
    events, logger, suite = run["events"], run["logger"], run["suite"]
    tasks = list(suite.tasks)
    hv = _scalars(events, "front/hypervolume")
    assert sorted(hv) == [EVERY, STEPS]
    # the last evaluation, recomputed here from the points the callback evaluated
    acc = logger.front.numpy()
    assert acc.shape == (37, 3)  # K=3: equal, one-hots, and the 36-point Das-Dennis set without duplicates
    assert torch.equal(logger.preferences, summary_preferences(3))
    assert hv[STEPS] == pytest.approx(hypervolume(acc), rel=1e-5)
    assert _scalars(events, "front/spread")[STEPS] == pytest.approx(front_spread(acc), rel=1e-5)
    individual = individual_scores(suite.task_vectors(), suite, "val")
    assert _scalars(events, "front/hypervolume_normalised")[STEPS] == pytest.approx(hypervolume(acc, individual),
                                                                                    rel=1e-5)
    # the evaluated accuracies are the module's own: at(γ) on the validation split, recomputed independently
    model = run["model"]
    for row, preference in ((0, [1, 1, 1]), (2, [0, 1, 0])):
        direct = suite.evaluate(model.at(preference), split="val")
        assert acc[row].tolist() == pytest.approx([direct[t] for t in tasks])
    # per-task accuracy at the equal preference and the one-hots: logged, and equal to the module's own
    # validation metrics (torchmetrics over the val loader, the other evaluation path) on the same split
    for label in ["equal"] + [f"onehot_{t}" for t in tasks]:
        for task in tasks:
            front_value = _scalars(events, f"front/acc/{label}/{task}")[STEPS]
            module_value = list(_scalars(events, f"val/acc/{label}/{task}").values())[-1]
            assert front_value == pytest.approx(module_value, abs=1e-6), (label, task)
    assert _scalars(events, "front/acc/onehot_size/size")[STEPS] == pytest.approx(acc[3, 2])
    # what it cost, said at the end of fit: two evaluations, and the figures of each plus the final ones
    assert logger.evaluations == 2 and logger.seconds["evaluating"] > 0 and logger.seconds["figures"] > 0


@pytest.mark.parametrize("num_tasks", [8, 14, 20, 30])
def test_the_preference_set_at_any_k_is_the_equal_one_the_one_hots_then_mixes(num_tasks):
    preferences = summary_preferences(num_tasks)
    assert torch.equal(preferences[0], torch.full((num_tasks,), 1.0 / num_tasks))
    assert torch.equal(preferences[1:num_tasks + 1], torch.eye(num_tasks))
    mixes = preferences[num_tasks + 1:]
    assert len(preferences) == max(30, num_tasks + 1) and len(mixes) == max(0, 29 - num_tasks)
    assert torch.allclose(mixes.sum(1), torch.ones(len(mixes))) and bool((mixes.max(1).values < 1).all())


def test_figures_text_and_hparams_are_in_the_event_file(run):
    events, logger = run["events"], run["logger"]
    tags = events.Tags()
    assert {"front/figure", "front/final/figure"} <= set(tags["images"])
    assert [e.step for e in events.Images("front/figure")] == [EVERY, STEPS]
    for tag in ("front/figure", "front/final/figure"):
        record = events.Images(tag)[-1]
        image = Image.open(io.BytesIO(record.encoded_image_string))
        assert image.size == (record.width, record.height) and image.size[0] >= 500
        _not_blank(image)
    # the table: one row per evaluated point, the first the equal preference with its accuracies
    text = events.Tensors("front/table/text_summary")[-1].tensor_proto.string_val[0].decode()
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(rows) == 37
    first = logger.front[0].numpy()
    assert rows[0].startswith("| (0.33, 0.33, 0.33) | " + " | ".join(f"{100 * v:.1f}" for v in first))
    # HParams tab: the experiment's metrics are the final front metrics, logged as scalars
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"final/hypervolume", "final/hypervolume_normalised", "final/spread"} <= metric_tags
    assert "rank" in {h.name for h in experiment.hparam_infos}
    assert _scalars(events, "final/hypervolume")[0] == pytest.approx(hypervolume(logger.front.numpy()), rel=1e-5)


def test_map_fronts_are_drawn_on_the_final_figure(run):
    """The final figure differs from the same front drawn without MAP's points: they are on its axes."""
    logger, map_baseline = run["logger"], run["map"]
    assert map_baseline.runs == 1 and map_baseline.last is not None
    tasks = list(run["suite"].tasks)
    acc, prefs = logger.front.numpy(), logger.preferences.numpy()
    overlays = logger._overlays  # Task Arithmetic, evaluated once
    assert [o.label for o in overlays] == ["Task Arithmetic"]
    with_map = overlays + [Overlay("MAP predicted", np.clip(map_baseline.last["predicted"], 0, 1)),
                           Overlay("MAP real", map_baseline.last["real"])]
    title = f"ParetoMerging, step {STEPS}, val split"
    references = {"zero-shot": logger._zero_shot, "individual": logger._individual}

    def pixels(figure_overlays):
        buffer = io.BytesIO()
        front_figures(acc, prefs, tasks, figure_overlays, title=title, references=references)["front"].savefig(
            buffer, format="png")
        return np.asarray(Image.open(buffer).convert("RGB"))

    logged = np.asarray(Image.open(io.BytesIO(run["events"].Images("front/final/figure")[-1].encoded_image_string))
                        .convert("RGB"))
    assert logged.shape == pixels(with_map).shape
    assert np.abs(logged.astype(int) - pixels(with_map).astype(int)).mean() < np.abs(
        logged.astype(int) - pixels(overlays).astype(int)).mean()


def test_figures_carry_the_zero_shot_and_individual_references(run):
    """The logger computes θ0's and the fine-tuned models' accuracy on its split once, and the logged figure is the
    front drawn with them (closer in pixels than the same front drawn without)."""
    logger, suite = run["logger"], run["suite"]
    tv = suite.task_vectors()
    theta0 = suite.evaluate(MergedModel(tv.backbone, tv.heads).eval(), split="val")  # θ0 itself, not through the merge
    assert logger._zero_shot.tolist() == pytest.approx([theta0[t] for t in suite.tasks])
    assert logger._individual.tolist() == pytest.approx(individual_scores(tv, suite, "val").tolist())
    assert (logger._zero_shot < logger._individual).all()  # fine-tuning helps each task on the tiny suite
    tasks, acc, prefs = list(suite.tasks), logger.front.numpy(), logger.preferences.numpy()
    last = run["map"].last
    overlays = logger._overlays + [Overlay("MAP predicted", np.clip(last["predicted"], 0, 1)),
                                   Overlay("MAP real", last["real"])]
    title = f"ParetoMerging, step {STEPS}, val split"

    def pixels(references):
        buffer = io.BytesIO()
        front_figures(acc, prefs, tasks, overlays, title=title, references=references)["front"].savefig(
            buffer, format="png")
        return np.asarray(Image.open(buffer).convert("RGB")).astype(int)

    logged = np.asarray(Image.open(io.BytesIO(run["events"].Images("front/final/figure")[-1].encoded_image_string))
                        .convert("RGB")).astype(int)
    with_references = pixels({"zero-shot": logger._zero_shot, "individual": logger._individual})
    assert np.abs(logged - with_references).mean() < np.abs(logged - pixels({})).mean()


def test_tensorboard_server_serves_the_front_figure(run):
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(run["root"]), "--host", "127.0.0.1",
         "--port", "0", "--load_fast", "false"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        deadline = time.time() + 120
        output = []
        while url is None and time.time() < deadline:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                break
            output.append(line)
            match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = match.group(1) if match else None
        assert url, "TensorBoard did not start:\n" + "".join(output)

        def get(path):
            with urllib.request.urlopen(url + path, timeout=30) as response:
                return response.headers.get("Content-Type", ""), response.read()

        run_name = None
        while time.time() < deadline:  # the server loads the event files in the background
            tags = json.loads(get("/data/plugin/images/tags")[1])
            run_name = next((r for r, t in tags.items() if "front/figure" in t), None)
            if run_name:
                break
            time.sleep(1)
        assert run_name, f"no run with the tag front/figure in {tags}"
        query = urllib.parse.urlencode({"run": run_name, "tag": "front/figure"})
        entries = json.loads(get(f"/data/plugin/images/images?{query}")[1])
        assert [e["step"] for e in entries] == [EVERY, STEPS]
        kind, body = get("/data/plugin/images/individualImage?" + entries[-1]["query"])
        assert kind == "image/png" and body.startswith(b"\x89PNG")
        _not_blank(Image.open(io.BytesIO(body)))
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_front_command_writes_png_csv_and_table(run, tmp_path):
    checkpoint = run["root"] / "checkpoints" / "last.ckpt"
    out = tmp_path / "front.png"
    result = subprocess.run(
        [sys.executable, "-m", "paretomerge.cli", "front", "--ckpt", str(checkpoint), "--out", str(out),
         "--prefs", "1,0,0", "0.5,0.5,0", "1,1,1", "--split", "val", "--no-progress",
         "--cache-dir", str(run["suite"].hparams.cache_dir)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (900, 650)  # the K=3 figure, 9 × 6.5 inches at 100 dpi (the legend right of the axes)
    _not_blank(image)
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0].split(",") == ["pref_colour", "pref_stripes", "pref_size", "acc_colour", "acc_stripes",
                                  "acc_size", "non_dominated"]
    model, suite = run["model"], run["suite"]
    for row, preference in zip(rows[1:], ([1, 0, 0], [0.5, 0.5, 0], [1, 1, 1]), strict=True):
        expected = suite.evaluate(model.at(preference), split="val")
        assert [float(v) for v in row.split(",")[3:6]] == pytest.approx([expected[t] for t in suite.tasks], abs=1e-6)
    assert "(0.50, 0.50, 0.00)" in result.stdout and "Task Arithmetic:" in result.stdout
    tv = suite.task_vectors()
    zero_shot = MergedModel(tv.backbone, tv.heads).eval()  # θ0 itself, not through the merge
    for name, values in (("zero-shot", suite.evaluate(zero_shot, split="val")),
                         ("individual", dict(zip(suite.tasks, individual_scores(tv, suite, "val"), strict=True)))):
        assert f"{name}: " + ", ".join(f"{t} {100 * values[t]:.1f}" for t in suite.tasks) in result.stdout


def front_refusal(argv: list[str]) -> str:
    """What ``paretomerge front`` says when it refuses ``argv`` (in this process: the console script's own run is
    test_front_command_writes_png_csv_and_table)."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(["front", *argv])
    assert exit_.value.code not in (0, None)
    return str(exit_.value.code)


@pytest.mark.parametrize("argv, message", [
    (["--prefs", "1,0"], "3 entries"),
    (["--prefs", "1,x,0"], "comma-separated"),
    (["--prefs", "0,-1,1"], "non-negative"),
])
def test_front_command_refuses_bad_preferences(run, tmp_path, argv, message):
    checkpoint = run["root"] / "checkpoints" / "last.ckpt"
    said = front_refusal(["--ckpt", str(checkpoint), "--out", str(tmp_path / "f.png"), "--cache-dir",
                          str(run["suite"].hparams.cache_dir), "--no-progress", *argv])
    assert message in said and not (tmp_path / "f.png").exists()


def test_front_command_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in front_refusal(["--ckpt", str(bad), "--out", str(tmp_path / "f.png")])


@pytest.mark.parametrize("num_tasks, names", [(2, ["front"]), (5, ["front", "parallel_coordinates"]), (11, ["front"])])
def test_figures_for_two_and_many_tasks(tmp_path, num_tasks, names):
    prefs = front_preferences(num_tasks).numpy()
    acc = 0.5 + 0.4 * prefs
    tasks = [f"task{k}" for k in range(num_tasks)]
    figures = front_figures(acc, prefs, tasks, [Overlay("Task Arithmetic", acc.mean(0, keepdims=True))])
    assert sorted(figures) == sorted(names)
    for name, figure in figures.items():
        _not_blank(Image.open(save_figure(figure, tmp_path / f"{name}.png")))
    if num_tasks == 2:  # every point labelled by its preference
        labels = {t.get_text() for t in figures["front"].axes[0].texts}
        assert labels == {f"({p[0]:.2f}, {p[1]:.2f})" for p in prefs}
    elif num_tasks <= PAIRWISE_MAX_TASKS:  # a K×K grid of pairwise projections
        assert sum(ax.get_visible() and ax.axison for ax in figures["front"].axes) >= num_tasks * (num_tasks - 1) // 2
    else:  # past 10 tasks, the parallel coordinates alone: one axis, one line per preference
        assert len(figures["front"].axes) == 1 and len(figures["front"].axes[0].lines) >= len(prefs)
    table = front_table(acc, prefs, tasks)
    assert len(table.splitlines()) == 2 + len(prefs)


def test_front_figures_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        front_figures(np.zeros((3, 2)), np.zeros((4, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="overlay 'x'"):
        front_figures(np.zeros((3, 2)), np.zeros((3, 2)), ["a", "b"], [Overlay("x", np.zeros((1, 3)))])


def test_front_logger_refuses_bad_arguments():
    with pytest.raises(ValueError, match="every_n_validations"):
        ParetoFrontLogger(every_n_validations=0)
    with pytest.raises(ValueError, match="split"):
        ParetoFrontLogger(split="train")
    with pytest.raises(ValueError, match="seed"):
        ParetoFrontLogger(seed=-1)


def test_front_logger_checks_the_adamerging_checkpoint_when_built(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ParetoFrontLogger(adamerging_ckpt=str(tmp_path / "missing.ckpt"))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        ParetoFrontLogger(adamerging_ckpt=str(bad))


def test_front_logger_keeps_its_every_n_rhythm_across_a_resume():
    before = ParetoFrontLogger(every_n_validations=3)
    before.validations = 4
    after = ParetoFrontLogger(every_n_validations=3)
    after.load_state_dict(before.state_dict())
    assert after.validations == 4


@pytest.mark.parametrize("class_path, message", [
    ("some_module_never_imported.Suite", "which is not imported"),
    ("json.JSONDecoder", "is not a MergingModule"),
])
def test_front_command_imports_only_known_classes_named_by_a_checkpoint(run, tmp_path, class_path, message):
    checkpoint = torch.load(run["root"] / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = class_path
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    assert message in front_refusal(["--ckpt", str(edited), "--out", str(tmp_path / "f.png")])
    assert not (tmp_path / "f.png").exists()


def test_past_ten_tasks_the_hypervolume_is_logged_and_printed_with_its_error():
    from paretomerge.callbacks.fit_summary import volumes

    w = np.random.default_rng(0).dirichlet(np.ones(12), size=20)
    front = torch.tensor(0.6 + 0.4 * np.sqrt(w / w.max(axis=1, keepdims=True)))
    hv, normalised = volumes(front, [0.99] * 12)
    assert hv.method == normalised.method == "approximate" and hv.error > 0
    metrics: dict = {}
    ParetoFrontLogger._log_volume(metrics, "front/hypervolume", hv)
    assert metrics == {"front/hypervolume": hv.value, "front/hypervolume_error": hv.error}
    small, _ = volumes(front[:, :3], [0.99] * 3)
    metrics = {}
    ParetoFrontLogger._log_volume(metrics, "front/hypervolume", small)
    assert small.method == "exact" and set(metrics) == {"front/hypervolume"}
