"""Hyperparameters a method no longer takes: AdaMerging's ``seed``, which it never used (it draws nothing at random).
Checkpoints and exports written before still load; a config that still gives it is refused, naming it."""

from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from paretomerge import AdaMerging, ParetoMerging, export_pareto_set, load_pareto_set
from paretomerge.cli import main as cli_main
from tests.conftest import make_trainer
from tests.synthetic import SyntheticSuite

# what LightningCLI adds to the hyperparameters of the module it fitted
CLI_KEYS = {"_class_path": "paretomerge.AdaMerging", "_instantiator": "lightning.pytorch.cli.instantiate_module"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """An AdaMerging trained for two steps, and its checkpoint's contents."""
    root = tmp_path_factory.mktemp("retired")
    model = AdaMerging(lr=1e-2)
    trainer = make_trainer(root, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2))
    trainer.save_checkpoint(root / "new.ckpt")
    return model, torch.load(root / "new.ckpt", weights_only=True)


def test_adamerging_takes_no_seed_and_pareto_merging_still_does():
    assert "seed" not in inspect.signature(AdaMerging).parameters
    with pytest.raises(TypeError, match="seed"):
        AdaMerging(seed=0)
    assert AdaMerging.upgrade_hyperparameters({"seed": 0, "lr": 0.01}) == {"lr": 0.01}
    assert ParetoMerging(seed=5).hparams.seed == 5  # it draws its preferences with it
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        ParetoMerging(seed=-1)


@pytest.mark.parametrize("extra", [{}, CLI_KEYS], ids=["python", "cli"])
def test_an_adamerging_checkpoint_with_a_seed_still_loads(fitted, tmp_path, extra):
    model, checkpoint = fitted
    assert "seed" not in checkpoint["hyper_parameters"]
    old = {**checkpoint, "hyper_parameters": {**checkpoint["hyper_parameters"], **extra, "seed": 3}}
    torch.save(old, tmp_path / "old.ckpt")
    loaded = AdaMerging.load_from_checkpoint(tmp_path / "old.ckpt")
    assert "seed" not in loaded.hparams and loaded.hparams.lr == 1e-2
    assert torch.equal(loaded.lambdas, model.lambdas)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.at()(images, task="task1"), model.at()(images, task="task1"))


def test_an_adamerging_export_with_a_seed_still_loads(fitted, tmp_path):
    model, _ = fitted
    path = export_pareto_set(model, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    config = json.loads(metadata["paretomerge"])
    config["hyper_parameters"]["seed"] = 3
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**metadata, "paretomerge": json.dumps(config)})
    loaded = load_pareto_set(tmp_path / "old.safetensors")
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.at()(images, task="task2"), model.at()(images, task="task2"))


def test_a_config_giving_adamerging_a_seed_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["paretomerge"])
    config = tmp_path / "ada.yaml"
    config.write_text("model:\n  class_path: paretomerge.AdaMerging\n  init_args:\n    seed: 0\n"
                      "data:\n  class_path: tests.synthetic.SyntheticSuite\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code != 0
    assert "Option 'seed' is not accepted" in capsys.readouterr().err
