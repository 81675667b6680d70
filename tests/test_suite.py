"""TinySuite: the procedural images and captions, the tiny CLIP and its zero-shot heads, the build and its cache,
the unseen tasks, evaluate(), and the front metrics."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from paretomerge import ParetoMerging, select_for_unseen_task
from paretomerge.pareto import EXACT_HV_MAX_TASKS, hypervolume, measure_hypervolume, non_dominated
from paretomerge.suites import FAST_RECIPE, FAST_TASKS, CacheError, TinySuite
from paretomerge.suites import tiny as tiny_module
from paretomerge.suites.cache import read_entry
from paretomerge.suites.loaders import EpochShuffle, derive_seed
from paretomerge.suites.tiny import class_names
from paretomerge.suites.tiny_build import finetune, pretraining_data
from paretomerge.suites.tiny_images import (
    ADDED_DOMAINS,
    ADDED_FACTORS,
    DOMAINS,
    FACTORS,
    PRETRAINING_STYLE,
    TASK_SETS,
    render,
    render_task,
)
from paretomerge.suites.tiny_text import ADDED_TEMPLATES, TEMPLATES, UNSEEN, WordTokenizer
from paretomerge.suites.zeroshot import class_embeddings, zero_shot_head
from tests.conftest import SMALL_RECIPE, make_trainer

# The build's mechanics (determinism, cache, subsets, corruption) do not need a suite in CLIP's regime, so most
# tests here build a smaller one, several times; the regime is checked on the session's fast suite (`fast_tiny`).
FAST = dict(tasks=list(FAST_TASKS), recipe=SMALL_RECIPE, test_images=128, val_images=64, batch_size=8,
            progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    suite = TinySuite(cache_dir=str(root), **FAST)
    suite.task_vectors()
    return suite


def weights_of(directory):
    return {p.name: load_file(str(p)) for p in sorted(directory.glob("*.safetensors"))}


# ---------------------------------------------------------------- images and captions
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


def test_an_absent_element_is_not_drawn():
    with_digit = render(50, 5, elements=("digit",))
    without = render(50, 5, elements=())
    assert with_digit.present[:, 1].all() and not without.present.any()
    assert not torch.equal(with_digit.images, without.images)  # the glyph is the only difference in the pixels
    assert without.visible()[:, list(FACTORS).index("digit")].logical_not().all()
    assert without.visible()[:, list(FACTORS).index("background")].all()


@pytest.mark.parametrize("task", list(FACTORS))
def test_each_task_is_its_own_dataset_varying_only_its_factor(task):
    r = render_task(task, 400, 11)
    domain = DOMAINS[task]
    assert len(torch.unique(r.factors[task])) == len(FACTORS[task])
    for factor, value in domain.fixed.items():
        assert factor != task and bool((r.factors[factor] == value).all()), factor
    shown = {e for e, on in zip(("object", "digit", "dots"), r.present[0].tolist(), strict=True) if on}
    assert shown == set(domain.elements)
    assert domain.style != PRETRAINING_STYLE  # every dataset looks different from the pretraining images



@pytest.mark.parametrize("task", list(ADDED_FACTORS))
def test_each_added_factor_is_drawn_from_its_own_stream_over_its_dataset(task):
    """An added factor's labels take every class and decide the pixels it draws; its dataset's other factors are
    held as the domain says; and the image underneath is the one render draws without it (the painter has its own
    random stream), so the first eight factors' images cannot have moved."""
    domain = ADDED_DOMAINS[task]
    r, again = render_task(task, 300, 5), render_task(task, 300, 5)
    assert torch.equal(r.images, again.images) and torch.equal(r.factors[task], again.factors[task])
    assert len(torch.unique(r.factors[task])) == len(ADDED_FACTORS[task])
    for factor, value in domain.fixed.items():
        assert bool((r.factors[factor] == value).all()), factor
    base = render(300, 5, "heldout", domain.elements, domain.style, domain.fixed)
    assert all(torch.equal(r.factors[f], base.factors[f]) for f in FACTORS)
    unchanged = (r.images == base.images).float().mean().item()
    assert unchanged < 1.0  # the painter drew something
    if task != "tint":  # a colour cast touches every pixel; every other element leaves most of the image alone
        assert unchanged > 0.5, unchanged
    # The class decides what is drawn: what the painter changed is nearer its own class's mean change than another's.
    drawn = r.images - base.images
    means = torch.stack([drawn[r.factors[task] == c].mean(0) for c in range(len(ADDED_FACTORS[task]))])
    distances = ((drawn[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (distances.argmin(1) == r.factors[task]).float().mean() > 0.5


def test_the_named_task_sets_are_supersets_and_the_added_prompts_use_only_pretraining_words():
    assert TASK_SETS["tiny8"] == tuple(FACTORS)
    assert TASK_SETS["tiny14"][:8] == TASK_SETS["tiny8"] and TASK_SETS["tiny20"][:14] == TASK_SETS["tiny14"]
    assert (len(TASK_SETS["tiny14"]), len(set(TASK_SETS["tiny20"]))) == (14, 20)
    tokenizer = WordTokenizer()
    prompts = [t.format(c) for task, names in ADDED_FACTORS.items() for t in ADDED_TEMPLATES[task] for c in names]
    assert not (tokenizer(prompts) == tokenizer.stoi["<unk>"]).any()
    assert TinySuite(tasks="tiny14", progress=False).tasks == TASK_SETS["tiny14"]
    assert TinySuite(tasks=["shape", "frame"], progress=False).tasks == ("shape", "frame")
    with pytest.raises(ValueError, match="task set 'tiny12'.*tiny8"):
        TinySuite(tasks="tiny12")
    with pytest.raises(ValueError, match="unknown TinySuite task.*frames"):
        TinySuite(tasks=["shape", "frames"])


def test_the_eight_task_suites_keep_their_cache_keys():
    """Adding factors changed nothing the eight-task suites' cache keys depend on (the configuration's JSON: no
    floating point arithmetic, so the same on every machine): their built weights and every recorded figure hold."""
    assert TinySuite(seed=0).cache_path.name == "4ed8d89b847fc126"
    assert TinySuite(seed=0).clip_cache_path.name == "clip-c010c8734274a435"
    assert TinySuite(seed=1).cache_path.name == "3c52c4ee357b2255"
    assert TinySuite(tasks=FAST_TASKS, recipe=FAST_RECIPE).cache_path.name == "3c25edeb8455429a"
    assert TinySuite(tasks="tiny8").cache_path == TinySuite().cache_path
    wide = TinySuite(tasks="tiny20")  # the same tiny CLIP, its own entry
    assert wide.clip_cache_path == TinySuite().clip_cache_path and wide.cache_path != TinySuite().cache_path

def test_captions_are_deterministic_name_only_visible_factors_and_use_the_class_words():
    recipe = tiny_module.Recipe(**{**FAST_RECIPE, "pretrain_images": 300})
    images, texts, named = pretraining_data(recipe, 4)
    again = pretraining_data(recipe, 4)
    assert torch.equal(images, again[0]) and texts == again[1] and torch.equal(named, again[2])
    assert texts != pretraining_data(recipe, 5)[1]
    assert (named >= 0).any(1).all()  # every caption names something
    shown = render(300, 4, elements=np.random.default_rng([4, 1]).random((300, 3)) < recipe.element_rate)
    assert not ((named >= 0) & ~shown.visible()).any()
    for text, row in zip(texts[:50], named[:50], strict=True):
        for f, value in enumerate(row.tolist()):
            if value >= 0:
                assert FACTORS[list(FACTORS)[f]][value] in text, (text, row)
    # Every caption word and prompt word is in the tokenizer's vocabulary; <eot> ends every row.
    tokenizer = WordTokenizer()
    tokens = tokenizer(texts + [t.format(c) for task in FACTORS for t in TEMPLATES[task] for c in FACTORS[task]])
    assert not (tokens == tokenizer.stoi["<unk>"]).any()
    assert ((tokens == tokenizer.vocab_size - 1).sum(1) == 1).all()


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
    sampler = EpochShuffle(50, seed=3)
    first = list(sampler)
    assert list(sampler) == first and sorted(first) == list(range(50))
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_the_training_order_resumes_mid_epoch_and_splits_across_processes():
    sampler = EpochShuffle(50, seed=3)
    sampler.set_epoch(2)
    whole = list(sampler)
    partway = iter(sampler)
    seen = [next(partway) for _ in range(17)]
    restored = EpochShuffle(50, seed=3)
    restored.load_state_dict(sampler.state_dict())
    assert sampler.state_dict() == {"epoch": 2, "given": 17}
    restored.set_epoch(2)  # as Lightning does on resume: the same epoch keeps the position
    assert seen + list(restored) == whole and list(restored) == whole  # the next pass starts the epoch again
    shares = [EpochShuffle(50, seed=3, num_replicas=3, rank=r) for r in range(3)]
    for share in shares:
        share.set_epoch(2)
    taken = [list(share) for share in shares]
    assert all(len(t) == len(shares[0]) == 17 for t in taken)  # padded to 51, as DistributedSampler pads
    assert sorted(set().union(*taken)) == list(range(50)) and sum(map(len, taken)) == 51


# ---------------------------------------------------------------- the tiny CLIP, its heads, the fine-tuning
def test_the_heads_are_the_zero_shot_heads_of_the_suites_text_tower(built):
    clip = built.clip_model()
    tokenizer = built.recipe.tokenizer()
    tv = built.task_vectors()
    for task in FAST_TASKS + ("warmth", "parity"):
        weights = class_embeddings(clip, tokenizer, class_names(task), TEMPLATES[task])
        head = tv.heads[task] if task in FAST_TASKS else built.unseen(task).head
        assert torch.equal(head.classifier.weight, weights), task
        assert head.classifier.weight.norm(dim=1).sub(100.0).abs().max() < 1e-3  # scaled by exp(logit_scale)
    # θ0 is the CLIP's image tower.
    clip_visual = clip.visual.state_dict()
    assert all(torch.equal(v, clip_visual[k]) for k, v in tv.backbone.state_dict().items())


def test_fine_tuning_moves_only_the_image_tower_and_leaves_the_head_bitwise_unchanged(built):
    clip = built.clip_model()
    head = zero_shot_head(class_embeddings(clip, built.recipe.tokenizer(), FACTORS["size"], TEMPLATES["size"]))
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    visual_before = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    data = render_task("size", 64, 3, "train")
    state = finetune(built.recipe, clip.visual, head, data.images, data.factors["size"], 5, 0, "test", False)
    assert all(torch.equal(v, head_before[k]) for k, v in head.state_dict().items())
    assert all(torch.equal(v, visual_before[k]) for k, v in clip.visual.state_dict().items())
    assert any(not torch.equal(v, visual_before[k]) for k, v in state.items())


def test_the_build_fine_tunes_against_the_heads_it_stores(tmp_path, monkeypatch):
    seen = {}
    real = tiny_module.finetune

    def spy(recipe, theta0, head, images, labels, steps, seed, desc, progress=True):
        state = real(recipe, theta0, head, images, labels, steps, seed, desc, progress)
        seen[desc.split()[1]] = head.classifier.weight.clone()  # after fine-tuning
        return state

    monkeypatch.setattr(tiny_module, "finetune", spy)
    suite = TinySuite(cache_dir=str(tmp_path), **{**FAST, "recipe": {**SMALL_RECIPE, "finetune_steps": 3}})
    heads = suite.task_vectors().heads
    assert set(seen) == set(FAST_TASKS)
    assert all(torch.equal(seen[t], heads[t].classifier.weight) for t in FAST_TASKS)


# ---------------------------------------------------------------- build, report, cache
def test_the_build_report_has_every_column_and_the_regime_of_clip(fast_tiny):
    report = fast_tiny.build_report
    assert list(report["tasks"]) == list(FAST_TASKS)
    for task, row in report["tasks"].items():
        for column in ("zero_shot_accuracy", "individual_accuracy", "task_arithmetic_accuracy", "ties_accuracy",
                       "weight_averaging_accuracy"):
            assert 0.0 <= row[column] <= 1.0
        assert 0.0 < row["tau_norm_ratio"] < 0.2, task
        assert row["num_classes"] == len(FACTORS[task])
    assert report["build_seconds"] > 0
    assert set(report["unseen_tasks"]) == {"warmth", "parity"}
    mean = report["mean"]
    # Even the fast variant is in CLIP's regime: fine-tuning gains far more than zero-shot has, and merging keeps part
    # of it (measured, seed 0: zero-shot 57.8, Task Arithmetic 72.4, individual 93.8).
    assert mean["individual_accuracy"] > mean["task_arithmetic_accuracy"] + 0.1
    assert mean["task_arithmetic_accuracy"] > mean["zero_shot_accuracy"] + 0.05
    on_disk = json.loads((fast_tiny.cache_path / "build_report.json").read_text())
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


def test_the_same_seed_builds_identical_weights_captions_and_heads(built, tmp_path):
    again = TinySuite(cache_dir=str(tmp_path), **FAST)
    again.task_vectors()
    assert again.cache_path.name == built.cache_path.name
    assert again.clip_cache_path.name == built.clip_cache_path.name
    for entry, files in ((again.cache_path, ["finetuned_colour.safetensors", "finetuned_size.safetensors",
                                             "finetuned_stripes.safetensors", "heads.safetensors"]),
                         (again.clip_cache_path, ["clip.safetensors"])):
        first, second = weights_of(built.cache_path.parent / entry.name), weights_of(entry)
        assert list(first) == files
        for name in first:
            assert first[name].keys() == second[name].keys()
            assert all(torch.equal(first[name][k], second[name][k]) for k in first[name]), name


def test_a_task_subset_shares_the_pretrained_clip(built, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tiny CLIP was pretrained again")

    monkeypatch.setattr(tiny_module, "pretrain", refuse)
    subset = TinySuite(cache_dir=str(built.cache_path.parents[1]), **{**FAST, "tasks": ["colour", "size"]})
    assert subset.clip_cache_path == built.clip_cache_path and subset.cache_path != built.cache_path
    tv, reference = subset.task_vectors(), built.task_vectors()
    for name in tv.layer_names:  # the same fine-tuned models: each task's data and seed derive from its name
        assert torch.equal(tv.tau[name][1], reference.tau[name][2])


def test_a_second_suite_loads_from_the_cache_without_building(built, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the suite was rebuilt instead of loaded")

    monkeypatch.setattr(tiny_module, "pretrain", refuse)
    monkeypatch.setattr(tiny_module, "finetune", refuse)
    again = TinySuite(cache_dir=str(built.cache_path.parents[1]), **FAST)
    tv, reference = again.task_vectors(), built.task_vectors()
    assert all(torch.equal(tv.tau[n], reference.tau[n]) for n in tv.layer_names)
    assert again.build_report == built.build_report


def test_a_changed_config_builds_into_another_directory(built):
    other = TinySuite(cache_dir=str(built.cache_path.parents[1]), **{**FAST, "seed": 1})
    assert other.cache_path != built.cache_path and other.clip_cache_path != built.clip_cache_path
    assert other.cache_path.parent == built.cache_path.parent
    finer = TinySuite(cache_dir=str(built.cache_path.parents[1]), **{**FAST, "recipe": {**SMALL_RECIPE,
                                                                                       "finetune_lr": 1e-3}})
    assert finer.clip_cache_path == built.clip_cache_path and finer.cache_path != built.cache_path


def test_the_environment_variable_and_the_argument_choose_the_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("PARETOMERGE_CACHE", str(tmp_path / "env"))
    assert TinySuite(**FAST).cache_path.parents[1] == tmp_path / "env"
    assert TinySuite(cache_dir=str(tmp_path / "arg"), **FAST).cache_path.parents[1] == tmp_path / "arg"
    monkeypatch.delenv("PARETOMERGE_CACHE")
    assert ".cache/paretomerge/tiny" in str(TinySuite(**FAST).cache_path)


@pytest.mark.parametrize("entry", ["suite", "clip"])
@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate", "drop_manifest", "drop_a_file", "bad_manifest"])
def test_a_corrupt_or_partial_cache_is_reported_and_rebuilt_never_half_loaded(built, tmp_path, damage, entry):
    import shutil

    root = tmp_path / "cache"
    for source in (built.cache_path, built.clip_cache_path):
        shutil.copytree(source, root / "tiny" / source.name)
    source = built.cache_path if entry == "suite" else built.clip_cache_path
    config = built.config if entry == "suite" else built.clip_config
    target = root / "tiny" / source.name
    weights = target / ("heads.safetensors" if entry == "suite" else "clip.safetensors")
    if damage == "flip_a_byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "drop_manifest":
        (target / "manifest.json").unlink()
    elif damage == "drop_a_file":
        weights.unlink()
    else:
        (target / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError):
        read_entry(target, config)

    suite = TinySuite(cache_dir=str(root), **FAST)
    with pytest.warns(UserWarning, match="cache is not usable"):
        tv = suite.task_vectors()
    reference = built.task_vectors()
    assert all(torch.equal(tv.tau[n], reference.tau[n]) for n in tv.layer_names)
    assert all(torch.equal(tv.heads[t].classifier.weight, reference.heads[t].classifier.weight) for t in FAST_TASKS)
    read_entry(target, config)  # whole again
    # no staging or discarded leftovers (the build lock file stays: deleting it could race with a waiting process)
    assert not [p for p in (root / "tiny").iterdir() if p.name.startswith(".") and p.suffix != ".lock"]


def test_a_failed_build_leaves_no_entry_behind(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_module.cache, "save_file", crash)
    suite = TinySuite(cache_dir=str(tmp_path), **{**FAST, "recipe": {**SMALL_RECIPE, "pretrain_steps": 2,
                                                                    "finetune_steps": 2}})
    with pytest.raises(KeyboardInterrupt):
        suite.task_vectors()
    # nothing but the (released) build lock files of the two entries: the suite's, and the tiny CLIP's it crashed in
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == sorted(
        [f".{suite.clip_cache_path.name}.lock", f".{suite.cache_path.name}.lock"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ["shape", "smell"]}, "unknown TinySuite task"),
        ({"tasks": ["shape"]}, "at least 2 distinct"),
        ({"tasks": ["shape", "shape"]}, "at least 2 distinct"),
        ({"tasks": ["shape", "warmth"]}, "unseen tasks .* list them in unseen_tasks"),
        ({"tasks": ["shape", "digit"], "unseen_tasks": ["digit"]}, "also merged tasks"),
        ({"unseen_tasks": ["loudness"]}, "unknown unseen task"),
        ({"unseen_tasks": ["warmth", "warmth"]}, "repeats"),
        ({"recipe": {"widht": 8}}, "unknown recipe key"),
        ({"recipe": {"mention": {"shape": 1.5}}}, "recipe mention must map factors"),
        ({"recipe": {"finetune_effort": {"smell": 1.0}}}, "recipe finetune_effort must map factors"),
        ({"recipe": {"pretrain_steps": 0}}, "recipe pretrain_steps must be a positive int"),
        ({"recipe": {"element_rate": 2.0}}, "element_rate is a probability"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"batch_size": 600}, "exceeds test_images"),
        ({"seed": -1}, "seed must be a non-negative int"),
    ],
)
def test_bad_suite_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TinySuite(**kwargs)


def test_evaluate_refuses_an_unknown_split_and_an_unknown_task(built):
    with pytest.raises(ValueError, match="split must be"):
        built.evaluate(torch.nn.Linear(1, 1), split="train")
    with pytest.raises(KeyError, match="unknown task"):
        built.evaluate(torch.nn.Linear(1, 1), tasks=["shape"])
    with pytest.raises(KeyError, match="not an unseen task"):
        built.unseen("colour")


# ---------------------------------------------------------------- the unseen tasks
def test_an_unseen_task_has_a_head_and_no_task_vector_and_selection_runs_on_it(built, tmp_path):
    tv = built.task_vectors()
    assert "warmth" not in tv.task_names and "warmth" not in tv.heads
    warmth = built.unseen("warmth")
    assert warmth.images.shape == (128, 3, 32, 32) and set(warmth.labels.tolist()) == {0, 1}
    # the colour dataset's images, relabelled warm (red, yellow, magenta) or cool (green, blue, cyan)
    colour = render_task("colour", 128, derive_seed(0, "warmth", "unseen", "test"))
    _, groups, _ = UNSEEN["warmth"]
    assert torch.equal(warmth.images, colour.images)
    assert torch.equal(warmth.labels, torch.tensor(groups)[colour.factors["colour"]])
    assert built.unseen("warmth").images is warmth.images  # rendered once, not on every call
    model = ParetoMerging(rank=4, seed=0)
    make_trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(model, datamodule=built)
    chosen = select_for_unseen_task(model, warmth.images, warmth.head, task="warmth", num_preferences=6,
                                    progress=False)
    assert chosen.preferences.shape == (6, len(FAST_TASKS))
    accuracy = built.evaluate(chosen.model, tasks=["warmth"])["warmth"]
    assert 0.0 <= accuracy <= 1.0
    with torch.no_grad():
        by_hand = (warmth.head(chosen.model.backbone(warmth.images)).argmax(-1) == warmth.labels).float().mean()
    assert accuracy == pytest.approx(float(by_hand), abs=1e-6)
    assert built.build_report["unseen_tasks"]["warmth"]["zero_shot_accuracy"] == pytest.approx(
        float((warmth.head(tv.backbone(warmth.images)).argmax(-1) == warmth.labels).float().mean()), abs=1e-6)


def test_a_factor_left_out_of_the_merge_can_be_the_unseen_task(tmp_path, built):
    import shutil

    shutil.copytree(built.clip_cache_path, tmp_path / "tiny" / built.clip_cache_path.name)
    suite = TinySuite(cache_dir=str(tmp_path), **{**FAST, "tasks": ["colour", "stripes"], "unseen_tasks": ["size"],
                                                  "recipe": {**SMALL_RECIPE, "finetune_steps": 2}})
    size = suite.unseen("size")
    assert set(size.labels.tolist()) == {0, 1, 2} and size.head.classifier.out_features == 3
    assert "size" in suite.build_report["unseen_tasks"]


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


def trade_off_front(points: int, tasks: int, seed: int) -> np.ndarray:
    """A front shaped like a merged model's: every task well above 0, each point better at some tasks than others."""
    w = np.random.default_rng(seed).dirichlet(np.ones(tasks), size=points)
    return 0.6 + 0.4 * np.sqrt(w / w.max(axis=1, keepdims=True))


@pytest.mark.parametrize("tasks", [6, 7, 8])
def test_the_approximate_hypervolume_is_within_one_percent_of_the_exact_one(tasks):
    front = trade_off_front(30, tasks, seed=tasks)
    exact = measure_hypervolume(front, method="exact")
    approx = measure_hypervolume(front, method="approximate")
    assert exact.method == "exact" and exact.error == 0.0 and exact.value == hypervolume(front)
    assert approx.method == "approximate" and approx.value == pytest.approx(exact.value, rel=0.01)
    assert 0 < approx.error < 0.01 * exact.value
    assert approx.value == measure_hypervolume(front, method="approximate").value  # seeded: the same front, the same


def test_the_approximation_s_error_interval_holds_the_exact_value():
    """Its ±error is three standard errors of 16 Monte-Carlo runs: over 20 seeds the interval should hold the exact
    value nearly always (it missed 3 times in 240 draws at 6 to 10 tasks); 2 misses in 20 would say it is too small."""
    front = trade_off_front(30, 8, seed=0)
    exact = measure_hypervolume(front, method="exact").value
    misses = sum(abs(v.value - exact) > v.error for v in
                 (measure_hypervolume(front, method="approximate", seed=seed) for seed in range(20)))
    assert misses <= 1


def test_beyond_ten_tasks_the_hypervolume_is_approximate_and_says_so():
    assert EXACT_HV_MAX_TASKS == 10
    assert measure_hypervolume(trade_off_front(5, EXACT_HV_MAX_TASKS, 0)).method == "exact"
    many = measure_hypervolume(trade_off_front(40, 20, 0))
    assert many.method == "approximate" and many.error > 0
    assert many.describe().startswith("approximate ± ") and "3 standard errors" in many.describe()
    # boxes whose union is known at 20 tasks: one point's box is the product of its gains; a dominated one adds nothing
    corner = np.full((1, 20), 0.9)
    volume = measure_hypervolume(np.vstack([corner, np.full((1, 20), 0.8)]))
    assert volume.value == pytest.approx(0.9**20, rel=0.01) and abs(volume.value - 0.9**20) <= volume.error
    assert measure_hypervolume(np.zeros((3, 20))).value == 0.0  # no gain on any task: no volume
    with pytest.raises(ValueError, match="method must be"):
        measure_hypervolume(corner, method="fast")


def test_warnings_about_the_cache_name_the_problem(built, tmp_path):
    import shutil

    entry = tmp_path / "tiny" / built.cache_path.name
    shutil.copytree(built.cache_path, entry)
    shutil.copytree(built.clip_cache_path, tmp_path / "tiny" / built.clip_cache_path.name)
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
