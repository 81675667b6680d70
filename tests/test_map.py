"""MAP's pieces (SPEC §6): sampling, the three surrogate cases, NSGA-III on surrogates, preference choice."""

from __future__ import annotations

import numpy as np
import pytest

from paretomerge.map import (
    DEFAULT_BUDGETS,
    QuadraticSurrogate,
    choose_for_preference,
    initial_samples,
    nsga3_front,
    num_quadratic_parameters,
)

RNG = np.random.default_rng(0)
A = np.array([[-2.0, 0.5, 0.1], [0.5, -1.0, -0.3], [0.1, -0.3, -0.5]])
B = np.array([1.0, -0.5, 0.25])
E = 0.3


def quadratic(c: np.ndarray) -> np.ndarray:
    return 0.5 * np.einsum("ni,ij,nj->n", c, A, c) + c @ B + E


def test_samples_start_with_the_one_hots_and_follow_the_paper_budgets():
    c = initial_samples(3, seed=1, bounds=(0.0, 1.0))
    assert c.shape == (DEFAULT_BUDGETS[3], 3) == (50, 3)
    np.testing.assert_array_equal(c[:3], np.eye(3))
    assert (c >= 0).all() and (c <= 1).all()
    np.testing.assert_array_equal(c, initial_samples(3, seed=1))
    assert not np.array_equal(c, initial_samples(3, seed=2))
    wide = initial_samples(2, budget=10, bounds=(-0.5, 1.5))
    np.testing.assert_array_equal(wide[:2], [[1.5, -0.5], [-0.5, 1.5]])


def test_case_1_recovers_an_exact_quadratic():
    c = RNG.uniform(0, 1, (30, 3))
    surrogate = QuadraticSurrogate("unbounded").fit(c, quadratic(c))
    np.testing.assert_allclose(surrogate.A, A, atol=1e-6)
    np.testing.assert_allclose(surrogate.b, B, atol=1e-6)
    assert surrogate.e == pytest.approx(E, abs=1e-6)
    held_out = RNG.uniform(0, 1, (20, 3))
    assert surrogate.r2(held_out, quadratic(held_out)) == pytest.approx(1.0, abs=1e-9)


def test_case_2_fits_a_sigmoid_of_a_quadratic():
    def metric(c):  # an accuracy in [0.1, 0.9]
        return 0.8 / (1 + np.exp(-3 * quadratic(c))) + 0.1

    c = RNG.uniform(0, 1, (40, 3))
    surrogate = QuadraticSurrogate("bounded", low=0.1, high=0.9).fit(c, metric(c))
    held_out = RNG.uniform(0, 1, (50, 3))
    assert surrogate.r2(held_out, metric(held_out)) >= 0.99
    assert ((surrogate.predict(held_out) >= 0.1) & (surrogate.predict(held_out) <= 0.9)).all()


def test_case_3_fits_a_softplus_of_a_quadratic():
    def metric(c):  # a loss >= 0.05
        return np.log1p(np.exp(2 * quadratic(c))) + 0.05

    c = RNG.uniform(0, 1, (40, 3))
    surrogate = QuadraticSurrogate("lower_bounded", low=0.05).fit(c, metric(c))
    held_out = RNG.uniform(0, 1, (50, 3))
    assert surrogate.r2(held_out, metric(held_out)) >= 0.99


def test_nsga3_on_two_known_quadratics_finds_the_analytic_front():
    # f1 = −(c1−1)² − c2², f2 = −c1² − (c2−1)²: the Pareto set is the segment c1 + c2 = 1, c ∈ [0, 1]².
    c = RNG.uniform(0, 1, (20, 2))
    f1 = -((c[:, 0] - 1) ** 2) - c[:, 1] ** 2
    f2 = -(c[:, 0] ** 2) - (c[:, 1] - 1) ** 2
    surrogates = [QuadraticSurrogate().fit(c, f1), QuadraticSurrogate().fit(c, f2)]
    front_c, front_values = nsga3_front(surrogates, seed=0)
    assert len(front_c) >= 8
    # In objective space the analytic front is (−2(1−t)², −2t²), t ∈ [0, 1]; every point found lies on it.
    t = np.linspace(0, 1, 20001)
    analytic = np.stack([-2 * (1 - t) ** 2, -2 * t ** 2], axis=1)
    true_values = np.stack([-((front_c[:, 0] - 1) ** 2) - front_c[:, 1] ** 2,
                            -(front_c[:, 0] ** 2) - (front_c[:, 1] - 1) ** 2], axis=1)
    np.testing.assert_allclose(front_values, true_values, atol=1e-9)  # the surrogates are exact here
    distance = np.linalg.norm(true_values[:, None, :] - analytic[None], axis=2).min(1)
    assert distance.max() < 0.01, distance
    assert np.abs(front_c.sum(1) - 1).max() < 0.05  # near the segment c1 + c2 = 1 in decision space too
    assert front_c[:, 0].min() < 0.1 and front_c[:, 0].max() > 0.9  # and spanning it
    chosen, index = choose_for_preference(front_c, front_values, [1.0, 0.0])
    assert chosen[0] == pytest.approx(front_c[:, 0].max()) and index == int(np.argmax(front_values[:, 0]))


def test_bad_input_is_refused_with_the_numbers():
    c = RNG.uniform(0, 1, (9, 3))
    assert num_quadratic_parameters(3) == 10
    with pytest.raises(ValueError, match="9 evaluated points cannot fit a quadratic surrogate with 10 parameters"):
        QuadraticSurrogate().fit(c, quadratic(c))
    with pytest.raises(ValueError, match="low < high"):
        initial_samples(2, bounds=(1.0, 1.0))
    with pytest.raises(ValueError, match="low < high"):
        nsga3_front([QuadraticSurrogate().fit(RNG.uniform(0, 1, (10, 3)), np.zeros(10))] * 2, bounds=(1, 0))
    y = np.linspace(0.0, 1.2, 12)
    with pytest.raises(ValueError, match=r"outside the declared range \[0.0, 1.0\]"):
        QuadraticSurrogate("bounded", low=0.0, high=1.0).fit(RNG.uniform(0, 1, (12, 3)), y)
    with pytest.raises(ValueError, match="below the declared minimum"):
        QuadraticSurrogate("lower_bounded", low=0.5).fit(RNG.uniform(0, 1, (12, 3)), y)
    with pytest.raises(ValueError, match="budget must be an int >= K=3"):
        initial_samples(3, budget=2)


# ---------------------------------------------------------------- real evaluations through the kernels
def test_the_evaluator_scores_merges_as_the_suite_does_batched_or_not_and_counts(fast_tiny):
    from paretomerge import static_model
    from paretomerge.map.evaluate import MergeEvaluator

    tv = fast_tiny.task_vectors()
    one_at_a_time = MergeEvaluator(tv, fast_tiny._split("test"), models_per_call=1)
    batched = MergeEvaluator(tv, fast_tiny._split("test"), models_per_call=4, batch_size=50)
    c = np.concatenate([np.eye(3), np.full((1, 3), 0.3), RNG.uniform(0, 1, (2, 3))])
    a, b = one_at_a_time(c), batched(c)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert one_at_a_time.count == batched.count == 6 * 3
    report = fast_tiny.build_report
    for k, task in enumerate(tv.task_names):
        assert a[k, k] == pytest.approx(report["tasks"][task]["individual_accuracy"], abs=1e-6)
        assert a[3, k] == pytest.approx(report["tasks"][task]["task_arithmetic_accuracy"], abs=1e-6)
    # θ0 + Σ c_k τ_k is Task Arithmetic + preference with γ = c / Σc and s = Σc / K.
    net = static_model("task_arithmetic_preference", tv, preference=c[4], scale=float(c[4].sum()) / 3)
    suite_view = fast_tiny.evaluate(net)
    np.testing.assert_allclose(a[4], [suite_view[t] for t in tv.task_names], atol=1e-6)
    losses = MergeEvaluator(tv, fast_tiny._split("test"), metric="loss")(c[:2])
    assert losses.shape == (2, 3) and (losses > 0).all()


def synthetic_evaluator(num_tasks: int):
    import torch

    from paretomerge.map.evaluate import MergeEvaluator
    from tests.synthetic import make_task_vectors

    tv = make_task_vectors(num_tasks)
    generator = torch.Generator().manual_seed(0)
    data = {t: (torch.randn(16, 3, 16, 16, generator=generator), torch.randint(0, 3, (16,), generator=generator))
            for t in tv.task_names}
    return MergeEvaluator(tv, data)


@pytest.mark.parametrize("num_tasks, expected", [(4, 4 + 8 * 4 * 2), (3, 3 + 8 * 2 + 8 * 3)])
def test_nested_map_counts_k_log_k_evaluations(num_tasks, expected):
    from paretomerge.map.nested import nested_map

    evaluator = synthetic_evaluator(num_tasks)
    result = nested_map(evaluator, [1.0] * num_tasks, points_per_pair=8, generations=40)
    # K evaluations of the fine-tuned models, then per round T = 8 pair scalings on the tasks being merged:
    # K = 4: two 2-task pairs, then one 4-task pair: 4 + 8·(2+2) + 8·4 = 4 + T·K·log2(K).
    assert result.evaluations == evaluator.count == expected
    assert len(result.merges) == num_tasks - 1
    assert sorted(sum((a + b for a, b, _ in result.merges[-1:]), [])) == sorted(evaluator.tv.task_names)
    assert result.coefficients.shape == (num_tasks,) and (result.coefficients >= 0).all()
    net = result.model(evaluator.tv)  # the merged model for that preference, scored as the evaluator scores it
    task = evaluator.tv.task_names[0]
    images, labels = evaluator.data[task]
    accuracy = float((net(images, task=task).argmax(-1) == labels).float().mean())
    assert accuracy == pytest.approx(evaluator(result.coefficients)[0, 0], abs=1e-6)
    with pytest.raises(ValueError, match="cannot fit a 2-task quadratic surrogate with 6 parameters"):
        nested_map(evaluator, [1.0] * num_tasks, points_per_pair=5)


def test_angular_bins_by_hand():
    from paretomerge.map.bayesian import angular_bins

    # K = 2: one angle atan2(c2, c1) in [0, π/2], four bins of π/8.
    np.testing.assert_array_equal(angular_bins(np.array([[1, 0], [0, 1], [1, 1], [1, 0.3], [0.3, 1]]), 4),
                                  [0, 3, 2, 0, 3])  # atan(0.3) = 0.29 < π/8; atan(1/0.3) = 1.28 > 3π/8
    # K = 3: φ1 = arccos(c1/‖c‖), φ2 = atan2(c3, c2); bin = 4·b1 + b2.
    c = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 1, 1]])
    # [1,1,1]: φ1 = arccos(1/√3) = 0.955 -> bin 2 (0.785..1.178); φ2 = π/4 -> bin 2.
    np.testing.assert_array_equal(angular_bins(c, 4), [0, 4 * 3 + 3, 4 * 3 + 0, 4 * 2 + 2])


def test_bin_scores_follow_algorithm_3():
    from paretomerge.map.bayesian import bin_scores

    errors = np.array([0.5, 0.5, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0])
    bins = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    scores = bin_scores(errors, bins, drop=0.2, resamples=30, seed=0)
    assert scores[0].mean == 0.5 and scores[0].std == 0.0 and scores[0].score == 0.5  # identical errors
    assert scores[1].mean == pytest.approx(3.0)
    # Bin 1 drops one of its five points per resample, so each resample mean is one of (15 − e)/4.
    possible = (15 - errors[3:]) / 4
    assert 0 < scores[1].std <= (possible.max() - possible.min()) / 2
    assert scores[1].score == pytest.approx(scores[1].mean + 0.5 * scores[1].std)


def test_bayesian_map_spends_its_budget_and_counts_it():
    from paretomerge.map.bayesian import bayesian_map

    evaluator = synthetic_evaluator(2)
    result = bayesian_map(evaluator, initial=8, per_round=4, rounds=2, bins_per_angle=4)
    assert result.c.shape == (16, 2) and result.metrics.shape == (16, 2)
    assert result.evaluations == evaluator.count == 16 * 2
    assert len(result.surrogates) == 2 and ((result.c >= 0) & (result.c <= 1)).all()


def test_front_indicators_by_hand():
    from paretomerge.pareto import generational_distance, inverted_generational_distance, win_rate

    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    front = np.array([[0.8, 0.0]])
    assert generational_distance(front, ref) == pytest.approx(0.2)
    # IGD: from (1,0) the nearest is 0.2 away, from (0,1) it is √(0.8² + 1) away.
    assert inverted_generational_distance(front, ref) == pytest.approx((0.2 + np.sqrt(0.64 + 1)) / 2)
    a = np.array([[0.9, 0.5]])
    b = np.array([[0.8, 0.6], [0.95, 0.4]])
    # Triples (a, b_j, k): 0.9>0.8 yes, 0.5>0.6 no, 0.9>0.95 no, 0.5>0.4 yes -> 2 of 4.
    assert win_rate(a, b) == pytest.approx(0.5)
    assert win_rate(b, a) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same K"):
        win_rate(a, np.ones((2, 3)))


def test_the_map_callback_logs_its_front_beside_pareto_merging(fast_tiny, tmp_path):
    from paretomerge import ParetoMerging
    from paretomerge.callbacks import MAPBaseline
    from tests.conftest import make_trainer

    callback = MAPBaseline(budget=16, real_samples=4, generations=30)
    trainer = make_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[callback])
    trainer.fit(ParetoMerging(rank=2), datamodule=fast_tiny)
    metrics = callback.last["metrics"]
    assert metrics["map/evaluations"] == 16 * 3  # the budget, on each of the 3 tasks
    picks = len(callback.last["picks"])
    assert 2 <= picks <= 4 and metrics["map/evaluations_with_real_check"] == (16 + picks) * 3
    for key in ("map/hv_predicted", "map/hv_real", "map/gd_predicted_vs_real", "map/igd_predicted_vs_real",
                "map/win_rate_module_vs_map", "map/win_rate_map_vs_module", "map/hv_module"):
        assert np.isfinite(metrics[key]), key
    # Both win rates count strict wins, so they sum to at most 1 (ties count for neither).
    assert metrics["map/win_rate_module_vs_map"] + metrics["map/win_rate_map_vs_module"] <= 1 + 1e-9
    assert any(key.startswith("map/r2/") for key in metrics)
    assert (tmp_path / "map_front.csv").is_file()


def test_task_vector_subsets_keep_the_chosen_tasks():
    from tests.synthetic import make_task_vectors

    tv = make_task_vectors(3)
    sub = tv.subset(["task2", "task0"])
    assert sub.task_names == ("task2", "task0") and sub.backbone is tv.backbone
    for name in tv.layer_names:
        assert sub.tau[name].shape[0] == 2
        assert sub.tau[name][0].data_ptr() != 0 and (sub.tau[name][0] == tv.tau[name][2]).all()
    with pytest.raises(ValueError, match="unknown tasks"):
        tv.subset(["task9"])


@pytest.mark.parametrize("variant, options", [("bayesian", {"initial": 12, "per_round": 3, "rounds": 1}),
                                              ("nested", {"nested_preferences": 2, "points_per_pair": 8})])
def test_the_map_callback_runs_every_variant(fast_tiny, tmp_path, variant, options):
    from paretomerge import ParetoMerging
    from paretomerge.callbacks import MAPBaseline
    from tests.conftest import make_trainer

    callback = MAPBaseline(variant=variant, real_samples=3, generations=20, **options)
    make_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[callback]).fit(ParetoMerging(rank=2),
                                                                                      datamodule=fast_tiny)
    metrics = callback.last["metrics"]
    if variant == "bayesian":
        assert metrics["map/evaluations"] == (12 + 3) * 3
    else:  # per preference: 3 one-hot checks + pair rounds 8·2 + 8·3 = 43; two preferences
        assert metrics["map/evaluations"] == 2 * 43
        assert len(callback.last["real"]) == 2
    assert np.isfinite(metrics["map/hv_real"]) and np.isfinite(metrics["map/win_rate_module_vs_map"])


def test_bad_map_callback_settings_are_refused():
    from paretomerge.callbacks import MAPBaseline

    with pytest.raises(ValueError, match="variant must be one of"):
        MAPBaseline(variant="grid")
    with pytest.raises(ValueError, match="real_samples must be at least 2"):
        MAPBaseline(real_samples=1)


def test_nested_map_merges_groups_the_preference_ignores():
    from paretomerge.map.nested import nested_map

    evaluator = synthetic_evaluator(3)
    result = nested_map(evaluator, [0.0, 0.0, 1.0], points_per_pair=8, generations=20)
    assert result.coefficients.shape == (3,) and len(result.merges) == 2


def test_the_map_callback_can_run_every_n_validations(fast_tiny, tmp_path):
    from paretomerge import ParetoMerging
    from paretomerge.callbacks import MAPBaseline
    from tests.conftest import make_trainer

    callback = MAPBaseline(budget=12, real_samples=2, generations=10, every_n_validations=2)
    trainer = make_trainer(tmp_path, max_steps=4, val_check_interval=1, check_val_every_n_epoch=None,
                           limit_val_batches=1, callbacks=[callback])
    trainer.fit(ParetoMerging(rank=2), datamodule=fast_tiny)
    assert callback.validations == 4 and callback.runs == 2 + 1  # after validations 2 and 4, and at fit end


def test_bad_bayesian_and_callback_settings_name_the_problem():
    from paretomerge.callbacks import MAPBaseline
    from paretomerge.map.bayesian import angular_bins, bayesian_map

    evaluator = synthetic_evaluator(2)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        bayesian_map(evaluator, initial=8, per_round=2, rounds=1, temperature=0.0)
    with pytest.raises(ValueError, match="per_round must be an int >= 1"):
        bayesian_map(evaluator, initial=8, per_round=0, rounds=1)
    with pytest.raises(ValueError, match="bins_per_angle must be a positive int"):
        angular_bins(np.ones((2, 2)), 0)
    with pytest.raises(ValueError, match="every_n_validations must be a positive int"):
        MAPBaseline(every_n_validations=0)
    assert evaluator.count == 0  # refused before anything was evaluated
