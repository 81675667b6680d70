"""ParetoMerging under a Trainer: what trains, what stays frozen, validation, resume, checkpoints."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from paretomerge import CheckpointError, ParetoMerging
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION as PAPER
from paretomerge.preferences import sample_dirichlet
from tests.conftest import make_trainer
from tests.synthetic import SyntheticSuite, make_task_vectors

ROOT = Path(__file__).resolve().parents[1]


def snapshot(tv):
    return (
        {k: v.clone() for k, v in tv.backbone.state_dict().items()},
        {k: v.clone() for k, v in tv.tau.items()},
        {k: v.clone() for k, v in tv.heads.state_dict().items()},
    )


def test_fit_trains_only_lambda_and_the_preference_tensor(tmp_path, suite):
    tv = suite.task_vectors()
    before = snapshot(tv)
    model = ParetoMerging(rank=4)
    make_trainer(tmp_path, max_steps=8, val_check_interval=3).fit(model, datamodule=suite)

    assert model.task_vectors is tv
    assert float((model.lambdas - 0.3).abs().max()) > 1e-4, "λ did not move"
    assert all(float(g.abs().max()) > 0 for g in model.preference_tensor.G), "G stayed zero"
    assert float(model.lambdas.min()) >= 0.0 and float(model.lambdas.max()) <= 1.0
    for old, new in zip(before, snapshot(tv), strict=True):
        assert all(torch.equal(old[k], new[k]) for k in old), "a frozen tensor changed"
    assert float(model.omega.abs().max()) > 0, "ω (the preference-conditioned coefficients) stayed zero"
    keys = set(model.state_dict())
    assert keys == {"lambdas", "omega"} | {f"preference_tensor.{p}.{i}" for p in "GAB" for i in range(4)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == keys


def test_gradients_reach_lambda_omega_g_a_b_and_nothing_else(task_vectors):
    model = ParetoMerging(task_vectors=task_vectors, rank=4)
    with torch.no_grad():
        model.preference_tensor.G[0].normal_()  # with G = 0, A and B get no gradient yet
    batch = {t: torch.randn(4, 3, 16, 16) for t in task_vectors.task_names}
    logits = model(batch, torch.tensor([0.2, 0.3, 0.5]))
    sum(v.pow(2).mean() for v in logits.values()).backward()
    assert model.lambdas.grad is not None and float(model.lambdas.grad.abs().max()) > 0
    assert model.omega.grad is not None and float(model.omega.grad.abs().max()) > 0
    pt = model.preference_tensor
    assert float(pt.G[0].grad.abs().max()) > 0 and float(pt.A[0].grad.abs().max()) > 0
    assert float(pt.B[0].grad.abs().max()) > 0
    frozen = list(task_vectors.backbone.parameters()) + list(task_vectors.heads.parameters())
    assert all(p.grad is None for p in frozen)
    assert all(not t.requires_grad for t in task_vectors.tau.values())


def test_lambda_is_clamped_after_every_step(tmp_path, suite):
    model = ParetoMerging(rank=4, lambda_init=1.0, lr=0.2)
    seen = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append((float(pl_module.lambdas.min()), float(pl_module.lambdas.max())))

    make_trainer(tmp_path, max_steps=5, callbacks=[Watch()], limit_val_batches=0).fit(model, datamodule=suite)
    assert len(seen) == 5 and all(lo >= 0.0 and hi <= 1.0 for lo, hi in seen)
    assert any(hi == 1.0 for _, hi in seen), "the test should push λ against its bound"


def test_validation_logs_accuracy_at_equal_and_one_hot_preferences(tmp_path, suite):
    model = ParetoMerging(rank=4, omega_init=0.0)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=3)
    metrics = trainer.validate(model, datamodule=suite, verbose=False)[0]
    labels = ["equal", "onehot_task0", "onehot_task1", "onehot_task2"]
    for label in labels:
        for task in ("task0", "task1", "task2", "mean"):
            assert 0.0 <= metrics[f"val/acc/{label}/{task}"] <= 1.0
    # G = 0 at init and ω = 0 here, so every preference gives layer-wise Task Arithmetic: the same accuracies.
    assert metrics["val/acc/equal/mean"] == metrics["val/acc/onehot_task1/mean"]
    # Individual models label the data, so the merge is imperfect but not useless.
    assert 0.0 < metrics["val/acc/equal/mean"] < 1.0


def test_task_vectors_from_the_constructor_need_no_datamodule(tmp_path, suite):
    model = ParetoMerging(task_vectors=make_task_vectors(3), rank=4)
    make_trainer(tmp_path, max_steps=2).fit(model, train_dataloaders=suite.train_dataloader())
    assert float((model.lambdas - 0.3).abs().max()) > 0


def test_without_task_vectors_the_error_says_where_they_come_from(tmp_path, suite):
    model = ParetoMerging(rank=4)
    with pytest.raises(RuntimeError, match="no task vectors"):
        make_trainer(tmp_path, max_steps=1).fit(model, train_dataloaders=suite.train_dataloader())


class Crash(Exception):
    pass


def test_resume_is_bitwise_exact(tmp_path):
    """4 batches per epoch; interrupted after epoch 2 (step 8) by a crash; resumed to step 16."""

    def fresh():
        return ParetoMerging(rank=4, seed=3), SyntheticSuite(num_tasks=3, batch_size=8, num_batches=4)

    model, suite = fresh()
    make_trainer(tmp_path / "a", max_steps=16, val_check_interval=4).fit(model, datamodule=suite)

    class Interrupt(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 9:
                raise Crash()

    saver = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=8, save_last=True)
    interrupted, suite_b = fresh()
    with pytest.raises(Crash):
        make_trainer(tmp_path / "b", max_steps=16, val_check_interval=4, callbacks=[saver, Interrupt()],
                     enable_checkpointing=True).fit(interrupted, datamodule=suite_b)
    resumed, suite_c = fresh()
    make_trainer(tmp_path / "c", max_steps=16, val_check_interval=4).fit(
        resumed, datamodule=suite_c, ckpt_path=str(tmp_path / "b" / "last.ckpt")
    )
    expected, got = model.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert not torch.equal(expected["lambdas"], interrupted.state_dict()["lambdas"])


CHILD = textwrap.dedent(
    """
    import sys, torch
    from paretomerge import ParetoMerging
    assert "tests" not in sys.modules
    ckpt, images, out = sys.argv[1:4]
    model = ParetoMerging.load_from_checkpoint(ckpt)
    assert not model.task_vectors.has_task_vectors
    x = torch.load(images)
    result = {}
    for pref in ([1, 1, 1], [0.7, 0.1, 0.2], [0, 0, 1]):
        net = model.at(pref)
        result[str(pref)] = {t: net(x, task=t) for t in net.task_names}
    torch.save(result, out)
    """
)


@pytest.mark.slow
def test_checkpoint_round_trip_in_a_fresh_process_gives_identical_outputs(tmp_path, suite):
    model = ParetoMerging(rank=4)
    trainer = make_trainer(tmp_path, max_steps=6, limit_val_batches=0)
    trainer.fit(model, datamodule=suite)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    images = torch.randn(6, 3, 16, 16)
    torch.save(images, tmp_path / "images.pt")
    (tmp_path / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, str(tmp_path / "child.py"), str(path), str(tmp_path / "images.pt"), str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path, env=env, timeout=300,
    )
    child = torch.load(tmp_path / "out.pt", weights_only=True)
    for pref in ([1, 1, 1], [0.7, 0.1, 0.2], [0, 0, 1]):
        net = model.at(pref)
        for task in net.task_names:
            assert torch.equal(child[str(pref)][task], net(images, task=task)), (pref, task)


def fit_and_save(tmp_path, num_tasks: int, steps: int, **options):
    """A ParetoMerging fitted on a width-64 synthetic suite and saved; returns the model, suite and .ckpt path."""
    suite = SyntheticSuite(num_tasks=num_tasks, batch_size=4, num_batches=1, width=64)
    model = ParetoMerging(rank=4, **options)
    trainer = make_trainer(tmp_path, max_steps=steps, limit_val_batches=0)
    trainer.fit(model, datamodule=suite)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return model, suite, path


@pytest.mark.parametrize("num_tasks", [2, 8])
def test_the_paper_models_checkpoint_size_does_not_grow_with_the_number_of_tasks(tmp_path, num_tasks):
    _, suite, path = fit_and_save(tmp_path, num_tasks, steps=1, **PAPER)
    tv = suite.task_vectors()
    theta0_and_heads = sum(t.numel() * t.element_size() for t in tv.backbone.state_dict().values())
    theta0_and_heads += sum(t.numel() * t.element_size() for t in tv.heads.state_dict().values())
    size = path.stat().st_size
    assert size < 1.5 * theta0_and_heads, (size, theta0_and_heads)
    assert tv.nbytes() > 0
    checkpoint = torch.load(path, weights_only=True)
    assert "tau" not in str(list(checkpoint["paretomerge"])) and "basis" not in checkpoint["paretomerge"]
    assert set(checkpoint["paretomerge"]["base"]) == set(tv.backbone.state_dict())


def test_validation_accuracy_is_top1_of_the_merged_model(tmp_path, suite):
    model = ParetoMerging(rank=4, seed=1)
    make_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(model, datamodule=suite)
    metrics = make_trainer(tmp_path, max_steps=1, limit_val_batches=None).validate(
        model, datamodule=suite, verbose=False)[0]
    _, _, val = suite._build()
    for label, pref in (("equal", [1, 1, 1]), ("onehot_task2", [0, 0, 1])):
        net = model.at(pref)
        for task, (images, labels) in val.items():
            expected = (net(images, task=task).argmax(-1) == labels).float().mean().item()
            assert metrics[f"val/acc/{label}/{task}"] == pytest.approx(expected, abs=1e-6), (label, task)


@pytest.mark.parametrize("mixed_tasks", [None, 2])
def test_gamma_is_drawn_per_global_step_and_rank(tmp_path, monkeypatch, mixed_tasks):
    """3 batches per epoch and 5 steps, so global_step and batch_idx differ; a fake rank 3 must be used. With
    ``mixed_tasks=2`` each γ mixes 2 of the 3 tasks."""
    suite = SyntheticSuite(num_tasks=3, batch_size=8, num_batches=3)
    model = ParetoMerging(rank=4, seed=11, alpha=0.5, mixed_tasks=mixed_tasks)
    seen = []
    objective = model.objective

    def spy(logits, gamma, inputs=None):
        seen.append(gamma.clone())
        return objective(logits, gamma, inputs)

    monkeypatch.setattr(model, "objective", spy)
    monkeypatch.setattr(ParetoMerging, "global_rank", property(lambda self: 3))
    make_trainer(tmp_path, max_steps=5, limit_val_batches=0).fit(model, datamodule=suite)
    expected = [sample_dirichlet(3, 0.5, seed=11, step=s, rank=3, mixed_tasks=mixed_tasks) for s in range(5)]
    assert len(seen) == 5
    for got, want in zip(seen, expected, strict=True):
        assert torch.equal(got, want)
        assert int((got > 0).sum()) == (3 if mixed_tasks is None else 2)


def test_the_paper_configuration_is_spec_section_3_objective_and_model(task_vectors):
    """configs/pareto_merging_paper.yaml's model options: SPEC §3's loss by hand, and λ independent of γ."""
    options = yaml.safe_load((ROOT / "configs" / "pareto_merging_paper.yaml").read_text())["model"]["init_args"]
    assert options == PAPER
    model = ParetoMerging(task_vectors=task_vectors, rank=4, mu=0.3, beta_cos=0.7, beta_frob=2.0, **options)
    assert model.omega is None and not model.preference_conditioned
    assert all(model.coefficients(torch.tensor(g)) is model.lambdas for g in ([1.0, 0, 0], [0.2, 0.3, 0.5]))
    with torch.no_grad():
        model.lambdas.uniform_(0.1, 0.9)
        for g in model.preference_tensor.G:
            g.normal_()
        one, other = model.merged_parameters(torch.tensor([1.0, 0, 0])), model.merged_parameters(torch.tensor(
            [0.2, 0.3, 0.5]))
    changed = {n for n in one if not torch.equal(one[n], other[n])}
    assert changed == set(model.preference_tensor.names)  # γ reaches the weights only through Δ(γ)
    check_objective_by_hand(model)


def test_ours_starts_at_task_arithmetic_plus_preference(task_vectors):
    """ω starts at λ_init (``omega_init=None``) and G at 0, so before any step, with the full basis, ``at(γ)`` is
    θ0 + 0.3·K·Σ_k γ_k τ_k for every γ: the free front a learned one has to beat is where training starts."""
    from paretomerge import static_model

    model = ParetoMerging(task_vectors=task_vectors, rank=4, basis_rank=None)
    assert model.hparams.omega_init is None and torch.equal(model.omega, torch.full_like(model.lambdas, 0.3))
    images = torch.randn(3, 3, 16, 16)
    for gamma in ([1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [1 / 3] * 3):
        ours, free = model.at(gamma), static_model("task_arithmetic_preference", task_vectors, preference=gamma)
        for task in task_vectors.task_names:
            torch.testing.assert_close(ours(images, task=task), free(images, task=task))
    assert not ParetoMerging(task_vectors=task_vectors, omega_init=0.0).omega.any()  # the first releases' start
    assert torch.equal(ParetoMerging(task_vectors=task_vectors, lambda_init=0.2).omega,
                       torch.full_like(model.lambdas, 0.2))


def test_the_diversity_term_by_hand(task_vectors):
    model = ParetoMerging(task_vectors=task_vectors, rank=4, mu=0.3, beta_cos=0.7, beta_frob=2.0, beta_div=0.4)
    logits = {"task0": torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "task1": torch.zeros(2, 4),
              "task2": torch.tensor([[0.0, 0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 0.0, 0.0, 9.0]])}
    parts = model.objective(logits, torch.tensor([0.5, 0.3, 0.2]))
    div = 0.0
    for rows in logits.values():
        p = torch.softmax(rows.double(), -1).mean(0)
        div += float((p * (p * p.numel()).log()).sum())  # KL(p̄ ‖ uniform)
    assert float(parts["div"]) == pytest.approx(div, rel=1e-5)
    assert float(parts["div"]) > 0.5  # task2 predicts one class for every input
    rest = float(parts["stch"] - 0.7 * parts["cos"] + 2.0 * parts["frob"])
    assert float(parts["loss"]) == pytest.approx(rest + 0.4 * div, rel=1e-5)


def test_preference_conditioned_coefficients_by_hand_with_the_full_basis(task_vectors):
    """θ(γ) = θ0 + Σ_k c_k(γ) τ_k + Δ(γ) with c(γ) = clamp(λ + ω ⊙ (Kγ − 1), [0, 1]) computed here: the full basis
    (``basis_rank=None``); the truncated one is tests/test_compact.py's."""
    model = ParetoMerging(task_vectors=task_vectors, rank=4, basis_rank=None)
    torch.manual_seed(0)
    with torch.no_grad():
        model.lambdas.uniform_(0.0, 1.0)
        model.omega.normal_(std=0.3)  # some coefficients land outside [0, 1] and are clamped
        for g in model.preference_tensor.G:
            g.normal_()
    gamma = torch.tensor([0.6, 0.1, 0.3])
    lam, om = model.lambdas.detach(), model.omega.detach()
    c = [[min(max(lam[l, k].item() + om[l, k].item() * (3 * gamma[k].item() - 1), 0.0), 1.0) for k in range(3)]
         for l in range(lam.shape[0])]
    assert any(v in (0.0, 1.0) for row in c for v in row)
    delta = model.preference_tensor.delta(gamma)
    for grad in (True, False):  # the training path (base merged with gradients) and the cached base
        with torch.set_grad_enabled(grad):
            merged = model.merged_parameters(gamma)
        for l, name in enumerate(task_vectors.layer_names):
            expected = task_vectors.theta0[name] + sum(c[l][k] * task_vectors.tau[name][k] for k in range(3))
            if name in delta:
                expected = expected + delta[name].detach()
            torch.testing.assert_close(merged[name].detach(), expected, rtol=1e-5, atol=1e-6)
    equal = model.merged_parameters(torch.full((3,), 1 / 3))
    base = model.base_parameters()
    assert all(torch.allclose(equal[n], base[n] + delta_at_equal, atol=1e-6)
               for n, delta_at_equal in model.preference_tensor.delta(torch.full((3,), 1 / 3)).items())


def check_objective_by_hand(model):
    with torch.no_grad():
        for g in model.preference_tensor.G:
            g.fill_(0.5)
    logits = {"task0": torch.tensor([[2.0, 0.0, 0.0]]), "task1": torch.zeros(1, 4),
              "task2": torch.tensor([[0.0, 0.0, 0.0, 0.0, 9.0]])}
    gamma = torch.tensor([0.5, 0.3, 0.2])
    parts = model.objective(logits, gamma)

    def H(row):
        p = [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
        return -sum(q * math.log(q) for q in p)

    f = [H([2.0, 0.0, 0.0]), math.log(4), H([0.0] * 4 + [9.0])]
    stch = 0.3 * math.log(sum(math.exp(g * v / 0.3) for g, v in zip(gamma.tolist(), f, strict=True)))
    inv = [1 / g for g in gamma.tolist()]
    cos = sum(a * b for a, b in zip(f, inv, strict=True)) / (math.hypot(*f) * math.hypot(*inv))
    frob = sum(g.numel() * 0.25 for g in model.preference_tensor.G)
    assert float(parts["loss"]) == pytest.approx(stch - 0.7 * cos + 2.0 * frob, rel=1e-5)
    assert float(parts["stch"]) == pytest.approx(stch, rel=1e-5)
    assert float(parts["cos"]) == pytest.approx(cos, rel=1e-5)
    assert float(parts["frob"]) == pytest.approx(frob, rel=1e-5)


@pytest.mark.slow
def test_resume_refuses_task_vectors_other_than_the_checkpoints(tmp_path):
    suite = SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(ParetoMerging(rank=4), datamodule=suite)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other_values = SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2, seed=7)
    with pytest.raises(CheckpointError, match="differ from the ones this checkpoint was trained with"):
        make_trainer(tmp_path, max_steps=4).fit(ParetoMerging(rank=4), datamodule=other_values,
                                                ckpt_path=str(tmp_path / "a.ckpt"))
    wider = SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2, width=48)
    with pytest.raises(CheckpointError, match="another architecture: backbone parameter 'class_embedding'"):
        make_trainer(tmp_path, max_steps=4).fit(ParetoMerging(rank=4, targets=None), datamodule=wider,
                                                ckpt_path=str(tmp_path / "a.ckpt"))


def test_attaching_task_vectors_of_another_architecture_is_refused(task_vectors):
    model = ParetoMerging(task_vectors=task_vectors, rank=4)
    with pytest.raises(CheckpointError, match="another architecture: backbone parameter 'class_embedding'"):
        model.attach(make_task_vectors(3, width=48))
    with pytest.raises(CheckpointError, match="another task set"):
        model.attach(make_task_vectors(2))
    assert model.task_vectors is task_vectors
    model.attach(make_task_vectors(3, seed=9))  # same architecture and tasks: accepted


def test_task_vectors_follow_the_module_dtype_and_bf16_true_trains(tmp_path, suite):
    model = ParetoMerging(task_vectors=suite.task_vectors(), rank=4)
    model.to(torch.float64)
    assert model.task_vectors.backbone.conv1.weight.dtype == torch.float64
    assert next(iter(model.task_vectors.tau.values())).dtype == torch.float64
    assert model.at([1, 2, 3])(torch.randn(2, 3, 16, 16, dtype=torch.float64), task="task0").dtype == torch.float64

    model = ParetoMerging(rank=4)
    make_trainer(tmp_path, max_steps=2, precision="bf16-true", limit_val_batches=1).fit(model, datamodule=suite)
    assert model.lambdas.dtype == torch.bfloat16
    assert model.task_vectors.backbone.conv1.weight.dtype == torch.bfloat16
    assert float((model.lambdas.float() - 0.3).abs().max()) > 0


def test_a_checkpoint_from_before_preference_conditioned_coefficients_loads_as_the_paper_model(tmp_path, suite):
    model = ParetoMerging(rank=4, **PAPER)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=suite)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    for key in ("preference_coefficients", "beta_div", "omega_init"):  # what an earlier paretomerge wrote: no such
        del checkpoint["hyper_parameters"][key]
    torch.save(checkpoint, path)
    loaded = ParetoMerging.load_from_checkpoint(path)
    assert loaded.omega is None and loaded.hparams.beta_div == 0.0
    images = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(loaded.at([0.2, 0.3, 0.5])(images, task="task1"),
                               model.at([0.2, 0.3, 0.5])(images, task="task1"))
