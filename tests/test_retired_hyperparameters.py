"""Hyperparameters a method no longer takes: AdaMerging's ``seed``, which it never used (it draws nothing at random).
Checkpoints and exports written before still load, and resume through the console script as from Python; a config
that still gives it is refused, naming it. And ParetoMerging checkpoints written before its hyperparameters of ours
existed resume through the console script as what they were trained as."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from paretomerge import AdaMerging, ParetoMerging, export_pareto_set, load_pareto_set
from paretomerge import cli as cli_module
from paretomerge.cli import main as cli_main
from paretomerge.modules import CheckpointError
from paretomerge.modules.pareto_merging import LEGACY_HYPERPARAMETERS, PAPER_CONFIGURATION
from tests.conftest import make_trainer
from tests.synthetic import SyntheticSuite

# what LightningCLI adds to the hyperparameters of the module it fitted
CLI_KEYS = {"_class_path": "paretomerge.AdaMerging", "_instantiator": "lightning.pytorch.cli.instantiate_module"}
CONFIG = Path(__file__).resolve().parent / "configs" / "synthetic.yaml"


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


@pytest.fixture
def said(monkeypatch) -> list[str]:
    """What the console script says through `rank_zero_info` (Lightning's loggers are configured by whichever test
    ran first, so caplog does not see them reliably in a full run)."""
    lines: list[str] = []
    monkeypatch.setattr(cli_module, "rank_zero_info", lambda message, *a, **k: lines.append(str(message)))
    return lines


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


def resume_with_the_cli(tmp_path: Path, *args: str) -> dict:
    """``paretomerge fit --config tests/configs/synthetic.yaml ARGS`` in this process; the checkpoint it ends with."""
    cli_main(["fit", "--config", str(CONFIG), *args, "--trainer.default_root_dir", str(tmp_path / "resumed"),
              "--trainer.logger", "false", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"])
    (path,) = (tmp_path / "resumed").rglob("*.ckpt")
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("extra", [{}, CLI_KEYS], ids=["python", "cli"])
def test_the_console_script_resumes_an_adamerging_checkpoint_with_a_seed(fitted, tmp_path, extra, said):
    """LightningCLI passes a checkpoint's stored hyperparameters to the constructor: the retired ``seed`` is left out
    first (`AdaMerging.upgrade_hyperparameters`), as loading from Python does."""
    _, checkpoint = fitted
    old = {**checkpoint, "hyper_parameters": {**checkpoint["hyper_parameters"], **extra, "seed": 3}}
    torch.save(old, tmp_path / "old.ckpt")
    resumed = resume_with_the_cli(tmp_path, "--model", "paretomerge.AdaMerging", "--ckpt_path",
                                  str(tmp_path / "old.ckpt"), "--trainer.max_steps", "3")
    assert f"{tmp_path / 'old.ckpt'} was written by an earlier version of AdaMerging: seed is retired" \
        in "\n".join(said)
    assert resumed["global_step"] == 3 and "seed" not in resumed["hyper_parameters"]
    assert resumed["hyper_parameters"]["lr"] == 1e-2  # the checkpoint's, over the config's (LightningCLI's rule)
    assert not torch.equal(resumed["state_dict"]["lambdas"], checkpoint["state_dict"]["lambdas"])  # it trained on


def test_the_console_script_resumes_a_pareto_merging_checkpoint_from_before_ours_as_the_paper_model(tmp_path, said):
    """A checkpoint written before preference_coefficients, beta_div, basis_rank and omega_init existed holds the
    paper's model. The config says today's defaults (ours), but a checkpoint's hyperparameters take precedence over the
    config in LightningCLI: it resumes as the paper's model, with one line saying so. From Python, where the user
    builds the model, ours is refused, naming what to pass."""
    suite = SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2)
    model = ParetoMerging(rank=4, **PAPER_CONFIGURATION)
    make_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, datamodule=suite)
    model.trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    stored = {k: v for k, v in checkpoint["hyper_parameters"].items() if k not in LEGACY_HYPERPARAMETERS}
    old = tmp_path / "old.ckpt"
    torch.save({**checkpoint, "hyper_parameters": {**stored, **CLI_KEYS, "_class_path": "paretomerge.ParetoMerging"}},
               old)
    refusal = "trained with preference_coefficients=False, this model has preference_coefficients=True: resume with "
    with pytest.raises(CheckpointError, match=refusal + "preference_coefficients=False"):
        make_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(ParetoMerging(rank=4), datamodule=suite,
                                                                     ckpt_path=str(old))
    resumed = resume_with_the_cli(tmp_path, "--ckpt_path", str(old), "--trainer.max_steps", "3")
    assert "earlier version of ParetoMerging: it resumes as what it was trained as, preference_coefficients=False, " \
           "beta_div=0.0, basis_rank=None, omega_init=0.0" in "\n".join(said)
    hparams = resumed["hyper_parameters"]
    assert resumed["global_step"] == 3 and {k: hparams[k] for k in LEGACY_HYPERPARAMETERS} == LEGACY_HYPERPARAMETERS
    assert hparams["alpha"] == 1.0 and "omega" not in resumed["state_dict"]
    assert not torch.equal(resumed["state_dict"]["lambdas"], checkpoint["state_dict"]["lambdas"])
