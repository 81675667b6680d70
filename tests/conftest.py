from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from tests.synthetic import SyntheticSuite, make_task_vectors

# Under pytest-xdist (the README's `-n 2`) each of the two workers gets one core's worth of threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture
def task_vectors():
    return make_task_vectors(num_tasks=3, seed=0)


def make_trainer(root, max_steps: int, **kwargs) -> L.Trainer:
    options = dict(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root), limit_val_batches=1,
        num_sanity_val_steps=0, deterministic=True,
    )
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.fixture
def suite():
    return SyntheticSuite(num_tasks=3, batch_size=8, num_batches=3)


# A TinySuite recipe for tests of the build's mechanics (determinism, cache, concurrency), which do not need a suite
# in CLIP's regime: it builds in a few seconds, so those tests can build it many times.
SMALL_RECIPE = {"width": 32, "layers": 2, "embed_dim": 32, "text_width": 32, "pretrain_images": 1024,
                "pretrain_steps": 60, "finetune_images": 256, "finetune_steps": 20}


@pytest.fixture(scope="session")
def fast_tiny(tmp_path_factory):
    """The fast 3-task TinySuite (in CLIP's regime, about 45 s to build), built once per test session into a
    temporary cache. Tests that only exercise the build's mechanics use a smaller recipe of their own."""
    from paretomerge.suites import FAST_RECIPE, FAST_TASKS, TinySuite

    suite = TinySuite(tasks=list(FAST_TASKS), recipe=FAST_RECIPE, test_images=128, val_images=64, batch_size=8,
                      progress=False, cache_dir=str(tmp_path_factory.mktemp("cache")))
    suite.task_vectors()
    return suite


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
