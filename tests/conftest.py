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
