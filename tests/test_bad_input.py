"""Bad input gets an error that names the problem, and leaves no partial file behind (SPEC §7)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, TensorDataset

from paretomerge import CheckpointError, ParetoMerging
from tests.conftest import make_trainer
from tests.synthetic import SyntheticSuite


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained model and its checkpoint."""
    root = tmp_path_factory.mktemp("saved")
    suite = SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2)
    model = ParetoMerging(rank=4)
    trainer = make_trainer(root, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=suite)
    trainer.save_checkpoint(root / "good.ckpt")
    return model, root / "good.ckpt"


@pytest.mark.parametrize(
    "pref, message",
    [([0.5, 0.5], "3 entries"), ([0.5, -0.5, 1.0], "non-negative"), ([float("nan"), 0.5, 0.5], "NaN"),
     ([0, 0, 0], "positive sum")],
)
def test_at_refuses_bad_preferences(saved, pref, message):
    model, _ = saved
    with pytest.raises(ValueError, match=message):
        model.at(pref)


def test_truncated_checkpoint_is_refused(saved, tmp_path):
    _, good = saved
    data = good.read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        ParetoMerging.load_from_checkpoint(bad)
    assert bad.read_bytes() == data[: len(data) // 2]


def test_corrupt_checkpoint_is_refused(saved, tmp_path):
    _, good = saved
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # zero out a stretch inside some record
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        ParetoMerging.load_from_checkpoint(bad)


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ParetoMerging.load_from_checkpoint(tmp_path / "nope.ckpt")


def test_checkpoint_of_the_wrong_kind_is_refused(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"lambdas": torch.zeros(2, 2)}, "hyper_parameters": {}}, path)
    with pytest.raises(CheckpointError, match="not a paretomerge checkpoint"):
        ParetoMerging.load_from_checkpoint(path)


def test_pickled_checkpoint_is_refused_unless_opted_in(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "module": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(CheckpointError, match="pickled objects"):
        ParetoMerging.load_from_checkpoint(path)
    # With the explicit opt-in it unpickles, and then fails for the right reason: it is not ours.
    with pytest.raises(CheckpointError, match="not a paretomerge checkpoint"):
        ParetoMerging.load_from_checkpoint(path, weights_only=False)


def test_checkpoint_from_another_task_set_is_refused_on_resume(saved, tmp_path):
    _, good = saved
    other = SyntheticSuite(num_tasks=4, batch_size=4, num_batches=2)
    with pytest.raises(CheckpointError, match="another task set"):
        make_trainer(tmp_path, max_steps=3).fit(ParetoMerging(rank=4), datamodule=other, ckpt_path=str(good))


def test_non_finite_loss_stops_with_step_preference_and_task_and_saves_only_good_checkpoints(tmp_path):
    """A NaN image in the 4th batch of task1; a checkpoint after every step; the run stops at step 3."""
    suite = SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2)
    images = {t: torch.randn(16, 3, 16, 16) for t in suite.task_vectors().task_names}
    images["task1"][13, 0, 0, 0] = float("nan")
    loader = CombinedLoader({t: DataLoader(TensorDataset(x), batch_size=4) for t, x in images.items()},
                            mode="max_size_cycle")
    model = ParetoMerging(task_vectors=suite.task_vectors(), rank=4)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[saver])
    with pytest.raises(FloatingPointError, match=r"step 3, preference \[.*\]: task objective not finite for "
                                                 r"\['task1'\]"):
        trainer.fit(model, train_dataloaders=loader)
    saved = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert saved == [f"epoch=0-step={s}.ckpt" for s in (1, 2, 3)]
    for name in saved:  # every file written is complete and finite
        loaded = ParetoMerging.load_from_checkpoint(tmp_path / name)
        assert all(torch.isfinite(v).all() for v in loaded.state_dict().values())


@pytest.mark.parametrize(
    "kwargs, message",
    [({"rank": 0}, "rank"), ({"mu": 0.0}, "mu"), ({"beta_cos": -1.0}, "beta_cos"), ({"lr": 0}, "lr"),
     ({"lambda_bounds": (1.0, 0.0)}, "lambda_bounds"), ({"lambda_init": 2.0}, "outside"),
     ({"targets": "(unclosed"}, "regular expression"), ({"seed": -1}, "non-negative"),
     ({"beta_div": -0.1}, "beta_div"), ({"preference_floor": 1.0}, "preference_floor"),
     ({"preference_floor": "0.2"}, "preference_floor"),
     ({"preference_coefficients": "yes"}, "preference_coefficients must be true or false"),
     ({"omega_init": "0.3"}, "omega_init"), ({"omega_init": float("nan")}, "omega_init"),
     ({"mixed_tasks": 1}, "mixed_tasks must be an integer of at least 2"), ({"mixed_tasks": 2.5}, "mixed_tasks"),
     ({"mixed_tasks": True}, "mixed_tasks")],
)
def test_bad_hyperparameters_are_refused(task_vectors, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParetoMerging(task_vectors=task_vectors, **kwargs)


def test_checkpoint_naming_code_to_run_is_refused(saved, tmp_path):
    import sys

    _, good = saved
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["paretomerge"]["backbone_spec"] = {"target": "this:Anything", "kwargs": {}, "attr": None}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="not imported"):
        ParetoMerging.load_from_checkpoint(tmp_path / "evil.ckpt")
    assert "this" not in sys.modules


def test_merged_model_refuses_unknown_task(saved):
    model, _ = saved
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        model.at([1, 1, 1])(torch.randn(1, 3, 16, 16), task="nope")


@pytest.mark.parametrize(
    "batch, error, message",
    [
        ([torch.zeros(1)], TypeError, "must be dicts"),
        ({"nope": (torch.zeros(1, 3, 16, 16), torch.zeros(1))}, KeyError, r"tasks \['nope'\]"),
        ({"task0": torch.zeros(1, 3, 16, 16)}, ValueError, "task 'task0' has no labels"),
    ],
)
def test_malformed_evaluation_batches_are_refused(saved, batch, error, message):
    model, _ = saved
    with pytest.raises(error, match=message):
        model.split_batch(batch, model.task_vectors.task_names, "val")


def test_training_batch_must_hold_every_task(saved):
    model, _ = saved
    with pytest.raises(KeyError, match=r"no images for tasks \['task1', 'task2'\]"):
        model.split_batch({"task0": torch.zeros(1, 3, 16, 16)}, model.task_vectors.task_names, "train")
    split = model.split_batch({t: [torch.zeros(1)] for t in model.task_vectors.task_names}, ["task0", "task1", "task2"],
                              "train")
    assert all(labels is None for _, labels in split.values())
