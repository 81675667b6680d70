"""Pareto Merging (our default) on the fast 3-task TinySuite: no collapse, and every one-hot raises its own task.

One fit of 500 steps serves both tests (about 25 s on 2 cores). The figures the margins rest on are in the tests'
docstrings; they were measured before issue 26 moved ω's start to λ_init and α to 0.5. Both tests pass with today's
defaults; the figures were not re-measured for lack of time (issue 26's note).
"""

from __future__ import annotations

import pytest
import torch

from paretomerge import ParetoMerging
from paretomerge.preferences import equal_and_one_hots
from tests.conftest import make_trainer

STEPS = 500


@pytest.fixture(scope="module")
def fitted(fast_tiny, tmp_path_factory):
    model = ParetoMerging(seed=0)
    make_trainer(tmp_path_factory.mktemp("fit"), max_steps=STEPS, limit_val_batches=0).fit(model, datamodule=fast_tiny)
    data = fast_tiny.labeled("test")
    predictions = []  # per preference (equal, then each one-hot): task -> predicted classes
    with torch.no_grad():
        for gamma in equal_and_one_hots(len(fast_tiny.tasks)):
            net = model.at(gamma)
            predictions.append({task: net(images, task=task).argmax(-1) for task, (images, _) in data.items()})
    return model, data, predictions


def test_no_task_collapses_onto_one_class_at_any_one_hot(fitted):
    """The collapse of SPEC-default Pareto Merging on the CLIP-regime prototype (digit at 22.5%, count at 28.5%) put
    most inputs into one confident wrong class. Here no class may take more than twice the true majority share.

    Measured on this fast suite with this fit: ours 1.60× at worst (1.16× on seed 1's fast suite); the paper's
    configuration 2.98× (2.61×), so this test fails on it."""
    _, data, predictions = fitted
    for index, predicted in enumerate(predictions):
        for task, (_, labels) in data.items():
            classes = int(labels.max()) + 1
            share = torch.bincount(predicted[task], minlength=classes).max().item() / len(labels)
            majority = torch.bincount(labels, minlength=classes).max().item() / len(labels)
            assert share <= 2 * majority, (index, task, share, majority)


def test_each_one_hot_raises_its_own_task(fitted):
    """at(e_k) beats the equal preference on task k for every task, and by 3 test images on average (128 per task).

    Measured with this fit (500 steps, batch 8, the fast suite of seed 0): +4, +7, +2 images for colour, stripes,
    size. The fast suite is small and its response noisy: on the fast suites of seeds 1 and 2 the same fit gave
    +3, +4, +6 and +6, −1, 0, and 200 steps gave −2 for size on seed 0 (benchmarks/README.md, "preference_response.py",
    has the 8-task figures). So one image is the margin per task, and the mean is what a broken preference response
    would lose first: the paper's configuration gave +2, −13, 0 here (−1, 0, −9 and −1, −2, −2 on seeds 1 and 2)."""
    _, data, predictions = fitted
    rises = []
    for k, (task, (_, labels)) in enumerate(data.items()):
        equal = int((predictions[0][task] == labels).sum())
        own = int((predictions[1 + k][task] == labels).sum())
        rises.append(own - equal)
    assert all(r >= 1 for r in rises), rises
    assert sum(rises) / len(rises) >= 3, rises
