"""ParetoMerging under a Trainer: what trains, what stays frozen, validation, resume, checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from paretomerge import ParetoMerging
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
    keys = set(model.state_dict())
    assert keys == {"lambdas"} | {f"preference_tensor.{p}.{i}" for p in "GAB" for i in range(4)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == keys


def test_gradients_reach_lambda_g_a_b_and_nothing_else(task_vectors):
    model = ParetoMerging(task_vectors=task_vectors, rank=4)
    with torch.no_grad():
        model.preference_tensor.G[0].normal_()  # with G = 0, A and B get no gradient yet
    batch = {t: torch.randn(4, 3, 16, 16) for t in task_vectors.task_names}
    logits = model(batch, torch.tensor([0.2, 0.3, 0.5]))
    sum(v.pow(2).mean() for v in logits.values()).backward()
    assert model.lambdas.grad is not None and float(model.lambdas.grad.abs().max()) > 0
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
    model = ParetoMerging(rank=4)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=3)
    metrics = trainer.validate(model, datamodule=suite, verbose=False)[0]
    labels = ["equal", "onehot_task0", "onehot_task1", "onehot_task2"]
    for label in labels:
        for task in ("task0", "task1", "task2", "mean"):
            assert 0.0 <= metrics[f"val/acc/{label}/{task}"] <= 1.0
    # G = 0 at init, so every preference gives layer-wise Task Arithmetic: the same accuracies.
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


@pytest.mark.parametrize("num_tasks", [2, 8])
def test_checkpoint_size_does_not_grow_with_the_number_of_tasks(tmp_path, num_tasks):
    suite = SyntheticSuite(num_tasks=num_tasks, batch_size=4, num_batches=1, width=64)
    model = ParetoMerging(rank=4)
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=suite)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    tv = suite.task_vectors()
    theta0_and_heads = sum(t.numel() * t.element_size() for t in tv.backbone.state_dict().values())
    theta0_and_heads += sum(t.numel() * t.element_size() for t in tv.heads.state_dict().values())
    size = path.stat().st_size
    assert size < 1.5 * theta0_and_heads, (size, theta0_and_heads)
    assert tv.nbytes() > 0
    checkpoint = torch.load(path, weights_only=True)
    assert "tau" not in str(list(checkpoint["paretomerge"]))
    assert set(checkpoint["paretomerge"]["base"]) == set(tv.backbone.state_dict())
