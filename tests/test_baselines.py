"""The baselines on the one merge kernel: static merges (SPEC §5) against hand-worked numbers, AdaMerging (plain,
task-wise, + preference, ++), Pareto Merging++, and preference selection for unseen tasks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from paretomerge import (
    STATIC_MERGES,
    AdaMerging,
    ModuleSpec,
    ParetoMerging,
    TaskVectors,
    select_for_unseen_task,
    static_merge,
    static_model,
)
from paretomerge.kernels import forward_features, merge
from paretomerge.kernels.sparsify import dare_drop, disjoint_mean_split, ties_select
from paretomerge.objectives import entropy
from tests.conftest import make_trainer
from tests.synthetic import make_task_vectors

# ---------------------------------------------------------------- a TIES example worked by hand
# Three tasks on a Linear(2, 2): 6 entries per task vector (w: 4, b: 2); top_k = 0.5 keeps each task's 3 largest.
TAU = {
    "weight": torch.tensor([[[4.0, -1.0], [2.5, 3.0]],
                            [[-1.0, -5.0], [2.0, 0.2]],
                            [[-6.0, 0.4], [-1.0, -3.0]]]),
    "bias": torch.tensor([[-2.0, 0.1], [3.0, -0.3], [0.5, 7.0]]),
}
# trim:  τ1 keeps 4, 3, 2.5        -> w [[4, 0], [2.5, 3]],  b [0, 0]
#        τ2 keeps -5, 3, 2         -> w [[0, -5], [2, 0]],   b [3, 0]
#        τ3 keeps 7, -6, -3        -> w [[-6, 0], [0, -3]],  b [0, 7]
# elect: sums w [[-2, -5], [4.5, 0]], b [3, 7]; w[1,1] sums to 0 and takes the majority of the elected signs
#        (-, -, +, +, + -> +).
# keep the entries agreeing with the elected sign:
SELECTED = {
    "weight": torch.tensor([[[0.0, 0.0], [2.5, 3.0]],
                            [[0.0, -5.0], [2.0, 0.0]],
                            [[-6.0, 0.0], [0.0, 0.0]]]),
    "bias": torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 7.0]]),
}
# disjoint sum (the default, as AdaMerging's and FusionBench's TIES run it): w[1,0] is kept by two tasks -> 2.5 + 2.
TIES_SUM = {"weight": torch.tensor([[-6.0, -5.0], [4.5, 3.0]]), "bias": torch.tensor([3.0, 7.0])}
# disjoint mean (the TIES paper): w[1,0] -> (2.5 + 2) / 2; every other entry is kept by one task.
TIES_MEAN = {"weight": torch.tensor([[-6.0, -5.0], [2.25, 3.0]]), "bias": torch.tensor([3.0, 7.0])}


def linear_task_vectors(tau: dict[str, torch.Tensor]) -> TaskVectors:
    torch.manual_seed(0)
    theta0 = nn.Linear(2, 2)
    finetuned = [{n: theta0.state_dict()[n] + tau[n][k] for n in tau} for k in range(3)]
    heads = {f"t{k}": nn.Linear(2, 2) for k in range(3)}
    return TaskVectors.from_state_dicts(theta0, finetuned, list(heads), heads,
                                        backbone_spec=ModuleSpec("torch.nn:Linear", {"in_features": 2,
                                                                                     "out_features": 2}))


def test_ties_trims_elects_and_takes_the_disjoint_sum_or_mean_as_worked_by_hand():
    selected = ties_select(TAU, top_k=0.5)
    for name in TAU:
        torch.testing.assert_close(selected[name], SELECTED[name], rtol=0, atol=0)
        torch.testing.assert_close(disjoint_mean_split(selected)[name].sum(0), TIES_MEAN[name])
    tv = linear_task_vectors(TAU)
    default = static_merge("ties", tv, top_k=0.5, scale=0.3)
    for aggregate, vector in (("sum", TIES_SUM), ("mean", TIES_MEAN)):
        merged = static_merge("ties", tv, top_k=0.5, scale=0.3, aggregate=aggregate)
        for name in TAU:
            torch.testing.assert_close(merged[name], tv.theta0[name] + 0.3 * vector[name])
            if aggregate == "sum":
                torch.testing.assert_close(default[name], merged[name], rtol=0, atol=0)


def test_dare_ties_follows_the_aggregate():
    tv = linear_task_vectors(TAU)
    for aggregate in ("sum", "mean"):
        dropped = tv.dare(0.5, seed=3)
        by_hand = static_merge("ties", dropped, top_k=0.5, aggregate=aggregate)
        merged = static_merge("dare_ties", tv, top_k=0.5, drop=0.5, seed=3, aggregate=aggregate)
        for name in TAU:
            torch.testing.assert_close(merged[name], by_hand[name], rtol=0, atol=0)
    sums = static_merge("dare_ties", tv, top_k=0.5, drop=0.5, seed=3)
    means = static_merge("dare_ties", tv, top_k=0.5, drop=0.5, seed=3, aggregate="mean")
    assert any(not torch.equal(sums[n], means[n]) for n in TAU)


def test_ties_ranks_over_the_whole_task_vector_not_per_layer():
    # Task 0's bias entries are all smaller than its weight entries: a global top-50% keeps no bias at all.
    tau = {"weight": torch.tensor([[[5.0, 6.0], [7.0, 8.0]]] * 3), "bias": torch.tensor([[1.0, 2.0]] * 3)}
    selected = ties_select(tau, top_k=0.5)
    assert torch.count_nonzero(selected["bias"]) == 0
    assert torch.equal(selected["weight"], tau["weight"].masked_fill(tau["weight"] < 6, 0))


def test_ties_preprocessing_returns_new_task_vectors_used_by_pareto_merging_plus_plus():
    tv = linear_task_vectors(TAU)
    pp = tv.ties(0.5)
    assert pp is not tv and pp.backbone is tv.backbone
    for name in TAU:
        torch.testing.assert_close(pp.tau[name], SELECTED[name])
        torch.testing.assert_close(tv.tau[name], TAU[name])  # the original is untouched
    model = ParetoMerging(linear_task_vectors(TAU), targets=None, ties_top_k=0.5)
    for name in TAU:
        torch.testing.assert_close(model.task_vectors.tau[name], SELECTED[name])


def test_task_arithmetic_and_weight_averaging_are_their_formulas():
    tv = make_task_vectors(3)
    ta = static_merge("task_arithmetic", tv)
    wa = static_merge("weight_averaging", tv)
    for name in tv.layer_names:
        torch.testing.assert_close(ta[name], tv.theta0[name] + 0.3 * tv.tau[name].sum(0))
        torch.testing.assert_close(wa[name], tv.theta0[name] + tv.tau[name].mean(0))


def test_task_arithmetic_with_preference_is_task_arithmetic_at_the_equal_preference():
    tv = make_task_vectors(3)
    ta = static_merge("task_arithmetic", tv, scale=0.3)
    equal = static_merge("task_arithmetic_preference", tv, preference=[2.0, 2.0, 2.0], scale=0.3)
    one_hot = static_merge("task_arithmetic_preference", tv, preference=[0.0, 1.0, 0.0], scale=0.3)
    for name in tv.layer_names:
        torch.testing.assert_close(equal[name], ta[name])
        torch.testing.assert_close(one_hot[name], tv.theta0[name] + 0.3 * 3 * tv.tau[name][1])


def test_dare_keeps_the_expectation_and_is_seeded():
    tv = make_task_vectors(3)
    one = dare_drop(tv.tau, 0.5, seed=1)
    assert all(torch.equal(one[n], dare_drop(tv.tau, 0.5, seed=1)[n]) for n in one)
    assert not all(torch.equal(one[n], dare_drop(tv.tau, 0.5, seed=2)[n]) for n in one)
    kept = torch.cat([(one[n] != 0).flatten().float() for n in one])
    assert abs(kept.mean().item() - 0.5) < 0.02  # ~64k entries: the std of this fraction is 0.002
    for n in one:  # survivors are rescaled by 1/(1 - p) = 2
        torch.testing.assert_close(one[n][one[n] != 0], 2 * tv.tau[n][one[n] != 0])

    # Mean over seeds of DARE + Task Arithmetic -> Task Arithmetic. Each entry's DARE estimate has std |τ|
    # (p = 0.5), so over 256 seeds the relative error of the mean is about 1/16 = 0.0625; allow 0.1.
    seeds = 256
    ta = static_merge("task_arithmetic", tv)
    total = {n: torch.zeros_like(v) for n, v in ta.items()}
    for seed in range(seeds):
        for n, v in static_merge("dare_task_arithmetic", tv, seed=seed).items():
            total[n] += v
    moved = torch.cat([(ta[n] - tv.theta0[n]).flatten() for n in ta])
    error = torch.cat([(total[n] / seeds - ta[n]).flatten() for n in ta])
    assert (error.norm() / moved.norm()).item() < 0.1
    assert (error.norm() / moved.norm()).item() > 0.02  # and it is a real random estimate, not TA itself


def test_every_registered_merge_gives_a_model_that_runs():
    tv = make_task_vectors(2)
    images = torch.randn(4, 3, 16, 16)
    outputs = set()
    for name in STATIC_MERGES:
        options = {"preference": [0.8, 0.2]} if name == "task_arithmetic_preference" else {}
        net = static_model(name, tv, **options)
        logits = net(images, task="task1")
        assert logits.shape == (4, 4) and torch.isfinite(logits).all()
        outputs.add(tuple(logits.flatten().round(decimals=5).tolist()))
    assert len(outputs) == len(STATIC_MERGES)  # six different merges give six different models


@pytest.mark.parametrize("name, options, message", [
    ("tie", {}, "unknown merge method 'tie'"),
    ("ties", {"top_k": 0.0}, r"top_k .* must be in \(0, 1\]"),
    ("ties", {"top_k": 1.5}, r"top_k .* must be in \(0, 1\]"),
    ("ties", {"aggregate": "median"}, "aggregate must be 'sum' .* or 'mean'"),
    ("dare_ties", {"aggregate": "max"}, "aggregate must be 'sum' .* or 'mean'"),
    ("dare_ties", {"drop": 0.0}, r"drop rate must be in \(0, 1\)"),
    ("dare_task_arithmetic", {"drop": 1.0}, "undefined"),
    ("dare_task_arithmetic", {"drop": -0.5}, r"drop rate must be in \(0, 1\)"),
    ("task_arithmetic_preference", {"preference": [0.5, 0.5]}, "must have 3 entries"),
    ("task_arithmetic_preference", {}, "needs preference="),
    ("task_arithmetic", {"drop": 0.5}, "does not take"),
    ("task_arithmetic", {"scale": float("nan")}, "scale must be a finite number"),
])
def test_bad_static_merge_input_is_refused(name, options, message):
    tv = make_task_vectors(3)
    with pytest.raises((ValueError, TypeError), match=message):
        static_merge(name, tv, **options)


# ---------------------------------------------------------------- AdaMerging
def test_adamerging_starts_as_task_arithmetic_and_task_wise_has_one_coefficient_per_task():
    tv = make_task_vectors(3)
    layer, task = AdaMerging(tv), AdaMerging(make_task_vectors(3), granularity="task")
    assert layer.lambdas.shape == (len(tv.layer_names), 3) and task.lambdas.shape == (1, 3)
    ta = static_model("task_arithmetic", tv)
    images = torch.randn(5, 3, 16, 16)
    for model in (layer, task):
        torch.testing.assert_close(model.at()(images, task="task0"), ta(images, task="task0"))
        # One model whatever the preference: a given one is validated, then ignored.
        torch.testing.assert_close(model.at([1, 0, 0])(images, task="task2"), model.at()(images, task="task2"))
        with pytest.raises(ValueError, match="must have 3 entries"):
            model.at([1, 0])


def test_adamerging_lowers_the_entropy_it_minimises(suite, tmp_path):
    model = AdaMerging(lr=1e-2)
    trainer = make_trainer(tmp_path, max_steps=15, limit_val_batches=0)
    suite.setup("fit")
    batch = next(iter(suite.train_dataloader()))[0]
    images = {t: value[0] for t, value in batch.items()}
    model.attach(suite.task_vectors())

    def total_entropy() -> float:
        with torch.no_grad():
            logits = model(images)
        return float(sum(entropy(v) for v in logits.values()))

    before = total_entropy()
    trainer.fit(model, datamodule=suite)
    after = total_entropy()
    assert after < before - 0.05, (before, after)


def fit_adamerging(suite, tmp_path, steps=100, **options):
    model = AdaMerging(lr=1e-2, **options)
    make_trainer(tmp_path, max_steps=steps, limit_val_batches=0).fit(model, datamodule=suite)
    return model, suite.evaluate(model.at())


def test_adamerging_with_a_one_hot_preference_raises_that_tasks_accuracy(fast_tiny, tmp_path):
    # Measured (100 steps, lr 1e-2, fast suite): e_stripes raises stripes by +28.9 points on seed 0 (+8.6, +19.5 on
    # seeds 1, 2). colour is at 100% already at the equal preference, and e_size moved size by -2.3, +40.6, +10.9
    # points on seeds 0-2, so those two do not make a test that holds for the method rather than for one seed.
    task = "stripes"
    _, plain = fit_adamerging(fast_tiny, tmp_path)
    preference = [1.0 if t == task else 0.0 for t in fast_tiny.tasks]
    _, focused = fit_adamerging(fast_tiny, tmp_path, preference=preference)
    assert focused[task] > plain[task] + 0.1, (task, focused, plain)


def test_adamerging_plus_plus_and_its_checkpoint(fast_tiny, tmp_path):
    model, accuracy = fit_adamerging(fast_tiny, tmp_path, steps=5, ties_top_k=0.2, granularity="task")
    reference = fast_tiny.task_vectors().ties(0.2)
    assert all(torch.equal(model.task_vectors.tau[n], reference.tau[n]) for n in reference.layer_names)
    path = tmp_path / "ada.ckpt"
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    loaded = AdaMerging.load_from_checkpoint(path)
    assert loaded.hparams.ties_top_k == 0.2 and loaded.hparams.granularity == "task"
    assert fast_tiny.evaluate(loaded.at()) == accuracy


@pytest.mark.parametrize("options, message", [
    ({"granularity": "block"}, "granularity must be one of"),
    ({"ties_top_k": 0.0}, r"ties_top_k .* must be in \(0, 1\]"),
    ({"ties_top_k": 2}, r"ties_top_k .* must be in \(0, 1\]"),
    ({"preference": [1.0, -1.0, 0.5]}, "non-negative"),
])
def test_bad_adamerging_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        AdaMerging(**options)


def test_adamerging_refuses_a_preference_for_the_wrong_number_of_tasks():
    with pytest.raises(ValueError, match="must have 3 entries"):
        AdaMerging(make_task_vectors(3), preference=[0.5, 0.5])
    with pytest.raises(ValueError, match="must be in"):
        ParetoMerging(make_task_vectors(3), ties_top_k=-0.2)


# ---------------------------------------------------------------- unseen tasks
def test_unseen_task_selection_keeps_the_lowest_entropy_preference():
    tv = make_task_vectors(3)
    model = ParetoMerging(tv, rank=4, seed=3)
    with torch.no_grad():  # a non-trivial preference tensor, so the candidates differ
        for core in model.preference_tensor.cores():
            core.normal_(0, 0.5)
    head = nn.Linear(16, 5)
    images = torch.randn(20, 3, 16, 16)
    chosen = select_for_unseen_task(model, images, head, task="new", num_preferences=12, seed=4, progress=False)
    assert chosen.preferences.shape == (12, 3) and chosen.entropies.shape == (12,)
    # Recompute every candidate's entropy from at(γ) and the head: the choice is their argmin.
    by_hand = []
    for gamma in chosen.preferences:
        with torch.no_grad():
            by_hand.append(float(entropy(head(model.at(gamma).backbone(images)))))
    by_hand = torch.tensor(by_hand, dtype=torch.float64)
    torch.testing.assert_close(chosen.entropies, by_hand, rtol=1e-5, atol=1e-6)
    assert chosen.entropies.max() - chosen.entropies.min() > 1e-3
    best = int(by_hand.argmin())
    torch.testing.assert_close(chosen.preference, chosen.preferences[best])
    assert chosen.entropy == pytest.approx(float(by_hand[best]), rel=1e-5)
    assert chosen.model.task_names == ("task0", "task1", "task2", "new")
    torch.testing.assert_close(chosen.model(images, task="new"), head(model.at(chosen.preference).backbone(images)))
    again = select_for_unseen_task(model, images, head, task="new", num_preferences=12, seed=4, progress=False)
    assert torch.equal(again.preferences, chosen.preferences)
    with pytest.raises(ValueError, match="is one of the merged tasks"):
        select_for_unseen_task(model, images, head, task="task1", progress=False)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        select_for_unseen_task(model, images[0], head, progress=False)


def test_all_methods_build_weights_through_the_one_merge_kernel(monkeypatch):
    # Count calls of kernels.merge as each module sees it: every method must go through it.
    import paretomerge.modules.base as base
    import paretomerge.static as static

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return merge(*args, **kwargs)

    monkeypatch.setattr(static, "merge", counting)
    monkeypatch.setattr(base, "merge", counting)
    tv = make_task_vectors(2)
    for name in STATIC_MERGES:
        before = len(calls)
        static_merge(name, tv, **({"preference": [1, 1]} if "preference" in name else {}))
        assert len(calls) == before + 1, name
    for model in (AdaMerging(tv), ParetoMerging(make_task_vectors(2), rank=2)):
        before = len(calls)
        model.at([0.5, 0.5])
        assert len(calls) == before + 2  # the base θ0 + Σλτ, then base + Δ(γ)
        model.at([0.2, 0.8])
        assert len(calls) == before + 3  # the base is cached while λ is unchanged: only + Δ(γ)
    params = merge(tv.theta0, tv.tau, torch.tensor([0.3, 0.3]))
    assert forward_features(tv.backbone, params, torch.randn(2, 3, 16, 16)).shape == (2, 16)


def test_lightning_trains_adamerging_with_task_wise_coefficients(suite, tmp_path):
    model = AdaMerging(granularity="task", lr=1e-2)
    make_trainer(tmp_path, max_steps=5, limit_val_batches=1).fit(model, datamodule=suite)
    assert model.lambdas.shape == (1, 3)
    assert not torch.allclose(model.lambdas, torch.full((1, 3), 0.3))


def test_pareto_merging_at_needs_a_preference():
    with pytest.raises(ValueError, match="needs a preference: 3 non-negative weights"):
        ParetoMerging(make_task_vectors(3), rank=2).at()
