from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.synthetic import SyntheticSuite, make_task_vectors

torch.set_num_threads(min(2, torch.get_num_threads()))


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


@pytest.fixture(scope="module")
def fast_tiny(tmp_path_factory):
    """The fast 3-task TinySuite, built once per test module into a temporary cache."""
    from paretomerge.suites import FAST_RECIPE, FAST_TASKS, TinySuite

    suite = TinySuite(tasks=list(FAST_TASKS), recipe=FAST_RECIPE, test_images=128, val_images=64, batch_size=8,
                      progress=False, cache_dir=str(tmp_path_factory.mktemp("cache")))
    suite.task_vectors()
    return suite
