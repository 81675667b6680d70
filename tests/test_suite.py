"""TinySuite: the procedural images, the build and its cache, evaluate(), and the front metrics."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from paretomerge import ParetoMerging
from paretomerge.pareto import hypervolume, non_dominated
from paretomerge.suites import FAST_RECIPE, FAST_TASKS, CacheError, TinySuite
from paretomerge.suites import tiny as tiny_module
from paretomerge.suites.cache import read_entry
from paretomerge.suites.tiny_images import FACTORS, render
from tests.conftest import make_trainer

FAST = dict(tasks=list(FAST_TASKS), recipe=FAST_RECIPE, test_images=128, val_images=64, batch_size=8,
            progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    suite = TinySuite(cache_dir=str(root), **FAST)
    suite.task_vectors()
    return suite


def weights_of(directory):
    return {p.name: load_file(str(p)) for p in sorted(directory.glob("*.safetensors"))}


# ---------------------------------------------------------------- images
def test_the_same_seed_gives_identical_images_and_another_seed_different_ones():
    a, b, c = render(64, 7), render(64, 7), render(64, 8)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(a.factors[f], b.factors[f]) for f in FACTORS)
    assert not torch.equal(a.images, c.images)


def test_images_have_the_promised_shape_and_every_factor_is_uniform_and_independent():
    r = render(4000, 0)
    assert r.images.shape == (4000, 3, 32, 32) and r.images.dtype == torch.float32
    for name, classes in FACTORS.items():
        counts = torch.bincount(r.factors[name], minlength=len(classes)).float()
        assert 3 <= len(classes) <= 10
        assert counts.min() > 0.7 * 4000 / len(classes), name
    # Independence: the joint table of two factors is close to the product of the marginals.
    joint = torch.zeros(4, 6)
    joint.index_put_((r.factors["shape"], r.factors["colour"]), torch.ones(4000), accumulate=True)
    expected = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True) / 4000
    assert ((joint - expected).abs() / expected).max() < 0.35


def test_the_labels_are_visible_in_the_pixels():
    # The object's colour is readable straight off the image: a nearest-colour rule on the most saturated
    # pixel gets it right nearly always. (A label generator disconnected from the pixels would give 1/6.)
    r = render(300, 3)
    rgb = r.images * 0.25 + 0.3
    saturation = rgb.max(1).values - rgb.min(1).values  # [N, H, W]
    flat = saturation.flatten(1).argmax(1)
    picked = rgb.flatten(2)[torch.arange(300), :, flat]  # [N, 3]
    palette = torch.tensor([[0.95, 0.1, 0.1], [0.1, 0.9, 0.1], [0.2, 0.35, 1.0], [0.95, 0.95, 0.1],
                            [0.95, 0.1, 0.95], [0.1, 0.95, 0.95]])
    guess = torch.cdist(picked, palette).argmin(1)
    assert (guess == r.factors["colour"]).float().mean() > 0.9


def test_the_adaptation_split_is_the_test_split_without_labels(built):
    batch, _, _ = next(iter(built.train_dataloader()))
    images, labels = built._split("test")[FAST_TASKS[0]]
    assert set(batch) == set(FAST_TASKS)
    (x,) = batch[FAST_TASKS[0]]
    assert x.shape == (8, 3, 32, 32)
    assert any(torch.equal(x[0], row) for row in images)
    test_batch, _, _ = next(iter(built.test_dataloader()))
    assert torch.equal(test_batch[FAST_TASKS[0]][1], labels[: len(test_batch[FAST_TASKS[0]][1])])


def test_the_training_order_is_reshuffled_per_epoch_and_repeatable():
    sampler = tiny_module.EpochShuffle(50, seed=3)
    first = list(sampler)
    assert list(sampler) == first and sorted(first) == list(range(50))
    sampler.set_epoch(1)
    assert list(sampler) != first


# ---------------------------------------------------------------- build, report, cache
def test_the_build_report_has_every_column_and_the_individual_models_beat_task_arithmetic(built):
    report = built.build_report
    assert list(report["tasks"]) == list(FAST_TASKS)
    for task, row in report["tasks"].items():
        for column in ("individual_accuracy", "task_arithmetic_accuracy", "weight_averaging_accuracy",
                       "pretrained_accuracy"):
            assert 0.0 <= row[column] <= 1.0
        assert 0.0 < row["tau_norm_ratio"] < 0.5, task
        assert row["num_classes"] == len(FACTORS[task])
    assert report["build_seconds"] > 0
    # Even the fast variant has a trade-off: fine-tuning helps, and merging loses some of it.
    assert report["mean"]["individual_accuracy"] > report["mean"]["task_arithmetic_accuracy"] + 0.1
    assert report["mean"]["individual_accuracy"] > report["mean"]["pretrained_accuracy"] + 0.2
    on_disk = json.loads((built.cache_path / "build_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))


def test_the_report_matches_evaluate_of_the_individual_models(built):
    tv = built.task_vectors()
    model = ParetoMerging(task_vectors=tv, targets=None, lambda_init=1.0)
    for k, task in enumerate(FAST_TASKS):
        with torch.no_grad():
            model.lambdas.zero_()
            model.lambdas[:, k] = 1.0  # θ0 + τ_k = θ_k
        accuracy = built.evaluate(model.at(torch.eye(len(FAST_TASKS))[k]))[task]
        assert accuracy == pytest.approx(built.build_report["tasks"][task]["individual_accuracy"], abs=1 / 128)


def test_the_same_seed_builds_identical_cached_weights(built, tmp_path):
    again = TinySuite(cache_dir=str(tmp_path), **FAST)
    again.task_vectors()
    assert again.cache_path.name == built.cache_path.name
    first, second = weights_of(built.cache_path), weights_of(again.cache_path)
    assert list(first) == ["finetuned_colour.safetensors", "finetuned_size.safetensors",
                           "finetuned_stripes.safetensors", "heads.safetensors", "theta0.safetensors"]
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].keys() == second[name].keys()
        assert all(torch.equal(first[name][k], second[name][k]) for k in first[name]), name


def test_a_second_suite_loads_from_the_cache_without_building(built, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the suite was rebuilt instead of loaded")

    monkeypatch.setattr(tiny_module, "pretrain", refuse)
    again = TinySuite(cache_dir=str(built.cache_path.parents[1]), **FAST)
    tv, reference = again.task_vectors(), built.task_vectors()
    assert all(torch.equal(tv.tau[n], reference.tau[n]) for n in tv.layer_names)
    assert again.build_report == built.build_report


def test_a_changed_config_builds_into_another_directory(built):
    other = TinySuite(cache_dir=str(built.cache_path.parents[1]), **{**FAST, "seed": 1})
    assert other.cache_path != built.cache_path
    assert other.cache_path.parent == built.cache_path.parent


def test_the_environment_variable_and_the_argument_choose_the_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("PARETOMERGE_CACHE", str(tmp_path / "env"))
    assert TinySuite(**FAST).cache_path.parents[1] == tmp_path / "env"
    assert TinySuite(cache_dir=str(tmp_path / "arg"), **FAST).cache_path.parents[1] == tmp_path / "arg"
    monkeypatch.delenv("PARETOMERGE_CACHE")
    assert ".cache/paretomerge/tiny" in str(TinySuite(**FAST).cache_path)


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate", "drop_manifest", "drop_a_file", "bad_manifest"])
def test_a_corrupt_or_partial_cache_is_reported_and_rebuilt_never_half_loaded(built, tmp_path, damage):
    import shutil

    root = tmp_path / "cache"
    shutil.copytree(built.cache_path, root / "tiny" / built.cache_path.name)
    entry = root / "tiny" / built.cache_path.name
    weights = entry / "theta0.safetensors"
    if damage == "flip_a_byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "drop_manifest":
        (entry / "manifest.json").unlink()
    elif damage == "drop_a_file":
        (entry / "finetuned_size.safetensors").unlink()
    else:
        (entry / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError):
        read_entry(entry, built.config)

    suite = TinySuite(cache_dir=str(root), **FAST)
    with pytest.warns(UserWarning, match="cache is not usable"):
        tv = suite.task_vectors()
    reference = built.task_vectors()
    assert all(torch.equal(tv.tau[n], reference.tau[n]) for n in tv.layer_names)
    read_entry(entry, built.config)  # whole again
    # no staging or discarded leftovers (the build lock file stays: deleting it could race with a waiting process)
    assert not [p for p in (root / "tiny").iterdir() if p.name.startswith(".") and p.suffix != ".lock"]


def test_a_failed_build_leaves_no_entry_behind(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_module.cache, "save_file", crash)
    suite = TinySuite(cache_dir=str(tmp_path), **{**FAST, "recipe": {**FAST_RECIPE, "pretext_steps": 2,
                                                                    "finetune_steps": 2}})
    with pytest.raises(KeyboardInterrupt):
        suite.task_vectors()
    # nothing but the (released) build lock file
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [f".{suite.cache_path.name}.lock"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ["shape", "smell"]}, "unknown TinySuite task"),
        ({"tasks": ["shape"]}, "at least 2 distinct"),
        ({"tasks": ["shape", "shape"]}, "at least 2 distinct"),
        ({"recipe": {"widht": 8}}, "unknown recipe key"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"batch_size": 600}, "exceeds test_images"),
        ({"seed": -1}, "seed must be a non-negative int"),
    ],
)
def test_bad_suite_arguments_are_refused_with_a_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TinySuite(**kwargs)


def test_evaluate_refuses_an_unknown_split(built):
    with pytest.raises(ValueError, match="split must be"):
        built.evaluate(torch.nn.Linear(1, 1), split="train")


# ---------------------------------------------------------------- a fit on the suite
def test_evaluate_of_at_one_hot_matches_what_the_module_logs(built, tmp_path):
    model = ParetoMerging(rank=4, seed=0)
    trainer = make_trainer(tmp_path, max_steps=6, limit_val_batches=None)
    trainer.fit(model, datamodule=built)
    logged = trainer.test(model, datamodule=built, verbose=False)[0]
    for k, task in enumerate(FAST_TASKS):
        at_one_hot = built.evaluate(model.at(torch.eye(len(FAST_TASKS))[k]))
        for other in FAST_TASKS:
            assert at_one_hot[other] == pytest.approx(logged[f"test/acc/onehot_{task}/{other}"], abs=1e-6)
    equal = built.evaluate(model.at([1, 1, 1]))
    assert np.mean(list(equal.values())) == pytest.approx(logged["test/acc/equal/mean"], abs=1e-6)


# ---------------------------------------------------------------- front metrics
def test_hypervolume_and_non_dominated_filtering_against_hand_computed_values():
    acc = [[0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [0.4, 0.4]]
    # Union of the boxes [0, a] × [0, b]: 0.9·0.1 + 0.5·0.4 + 0.1·0.4.
    assert hypervolume(acc) == pytest.approx(0.33)
    assert non_dominated(acc).tolist() == [0, 1, 2]
    assert hypervolume(acc, scale=[0.5, 0.5]) == pytest.approx(0.33 / 0.25)
    three = torch.tensor([[0.5, 0.5, 0.5]])
    assert hypervolume(three) == pytest.approx(0.125)


@pytest.mark.parametrize("bad", [[[0.5]], [[float("nan"), 0.1]], [[-0.1, 0.2]], []])
def test_hypervolume_refuses_malformed_fronts(bad):
    with pytest.raises(ValueError, match="accuracy front"):
        hypervolume(bad)


def test_warnings_about_the_cache_name_the_problem(built, tmp_path):
    import shutil

    entry = tmp_path / "tiny" / built.cache_path.name
    shutil.copytree(built.cache_path, entry)
    (entry / "manifest.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TinySuite(cache_dir=str(tmp_path), **FAST).task_vectors()
    assert any("manifest.json" in str(w.message) for w in caught)


def test_an_entry_finished_first_by_another_process_is_kept(tmp_path, monkeypatch):
    from paretomerge.suites import cache

    entry = tmp_path / "tiny" / "abc"
    cache.write_entry(entry, {"a": 1}, {"w": {"x": torch.ones(2)}}, {"doc": {"k": 1}})
    real_replace = cache.os.replace

    def racing_replace(src, dst):
        if ".building-" in str(src):
            entry.mkdir(parents=True, exist_ok=True)  # the other process's entry appears just before ours
            (entry / "manifest.json").write_text("{}")
            raise OSError(39, "Directory not empty")
        return real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", racing_replace)
    monkeypatch.setattr(cache, "discard", lambda directory: None)
    cache.write_entry(entry, {"a": 1}, {"w": {"x": torch.zeros(2)}}, {"doc": {"k": 2}})
    assert (entry / "manifest.json").read_text() == "{}"  # theirs kept
    assert not [p for p in entry.parent.iterdir() if ".building-" in p.name]  # ours cleaned up


def test_preference_weighted_sum_by_hand():
    from paretomerge.pareto import preference_weighted_sum

    acc = [[0.9, 0.5], [0.6, 0.8]]
    # Row 0: 0.25·0.9 + 0.75·0.5 = 0.6; row 1: (2·0.6 + 2·0.8) / 4 = 0.7 (preferences are normalised).
    np.testing.assert_allclose(preference_weighted_sum(acc, [[0.25, 0.75], [2.0, 2.0]]), [0.6, 0.7])
    with pytest.raises(ValueError, match=r"must both be \[P, K\]"):
        preference_weighted_sum(acc, [[0.5, 0.5]])
    with pytest.raises(ValueError, match="non-negative"):
        preference_weighted_sum(acc, [[1.0, -0.5], [0.5, 0.5]])
