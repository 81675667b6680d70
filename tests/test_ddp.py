"""`trainer.fit` with ``strategy=ddp`` on CPU: 2 processes, gloo, a small TinySuite (tests/ddp_fit.py; the mechanics
need no suite in CLIP's regime, and a small one builds in seconds, fresh, so the build under DDP is checked too).

Checked: the fit completes for Pareto Merging and AdaMerging, and for Pareto Merging of a small TinyLM (token
batches, the next-token loss); λ and the preference tensor end identical on both ranks; the ranks saw different
images (or sequences) and drew different γ, keyed by (seed, step, rank); DDP wraps and all-reduces only the
trainable parameters (4 bytes each per step), never θ0, τ or the heads; validation metrics are synced; the suite is
built once, by one process, while the other waits; configs/ddp.yaml's collective timeouts reach the strategy (a hung
rank: tests/test_preemption.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from paretomerge import AdaMerging, ParetoMerging
from paretomerge.modules.ddp import DEFAULT_STEP_TIMEOUT, TimedDDPStrategy, collective_failure
from paretomerge.preferences import sample_dirichlet
from paretomerge.suites import FAST_TASKS, TinyLMSuite, TinySuite
from tests.conftest import SMALL_RECIPE
from tests.ddp_fit import SMALL_LM, digest

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp-cache")  # fresh: the first fit builds the suite


@pytest.fixture(scope="module")
def fits(tmp_path_factory, cache) -> Path:
    """Pareto Merging, AdaMerging, then Pareto Merging of a TinyLM, in one 2-process group (one launch of
    tests/ddp_fit.py)."""
    out = tmp_path_factory.mktemp("ddp")
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_fit.py"), str(out), str(cache),
                             "pareto,adamerging,tinylm", str(STEPS)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def pareto_fit(fits):
    return fits / "pareto", _ranks(fits / "pareto")


def _check_common(out: Path, ranks: list[dict], trainable_names: list[str]) -> None:
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["global_step"] == STEPS for r in ranks)
    # DDP wraps the trainable parameters only, and no buffers: θ0, τ and the heads are not module state
    for r in ranks:
        assert r["ddp_class"] == "DistributedDataParallel"
        assert r["ddp_parameters"] == sorted(trainable_names)
        assert r["ddp_buffers"] == 0
        # bytes all-reduced per step: one fp32 gradient per trainable parameter, and nothing frozen
        per_step = r["gradient_bytes"] / STEPS
        assert 4 * r["trainable_parameters"] <= per_step <= 1.05 * 4 * r["trainable_parameters"]
        assert r["frozen_parameters"] > 10 * r["trainable_parameters"]  # so sending θ0 or τ would fail the bound
    # identical trainable state at the end
    state0, state1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert sorted(state0) == sorted(trainable_names)
    for name in state0:
        assert torch.equal(state0[name], state1[name]), name
    # different data on each rank: disjoint images within the epoch, a different batch at every step
    for task in FAST_TASKS:
        assert len(ranks[0]["images"][task]) == STEPS * 8
        assert not set(ranks[0]["images"][task]) & set(ranks[1]["images"][task]), task
    for b0, b1 in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True):
        assert all(b0[t] != b1[t] for t in FAST_TASKS)
    # checkpoint and logs: written once, by rank zero
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert len(list((out / "logs").rglob("events.out.tfevents*"))) == 1


def test_ddp_fit_pareto_merging(pareto_fit, cache):
    out, ranks = pareto_fit
    model = ParetoMerging.load_from_checkpoint(out / "checkpoints" / "last.ckpt")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "lambdas" in names and any(n.startswith("preference_tensor.G") for n in names)
    _check_common(out, ranks, names)
    # γ per rank from (seed, step, rank): more preferences per step, the same expected objective
    for rank, record in enumerate(ranks):
        for step, gamma in enumerate(record["gammas"]):
            assert gamma == pytest.approx(sample_dirichlet(3, model.hparams.alpha, 0, step, rank).tolist())
    assert all(g0 != g1 for g0, g1 in zip(ranks[0]["gammas"], ranks[1]["gammas"], strict=True))
    # rank 1's SVD gives other factors (ddp_fit.py): every rank trained with rank 0's, which the checkpoint holds
    stored = model.preference_basis()
    assert ranks[0]["basis"] == ranks[1]["basis"] == digest(torch.cat([t.flatten().double() for t in stored.tensors()]))
    # validation metrics are synced across ranks by torchmetrics: the logged accuracy (each rank saw half the
    # validation images) equals the accuracy of the saved model on the whole validation split
    suite = TinySuite(tasks=list(FAST_TASKS), recipe=SMALL_RECIPE, test_images=128, val_images=64, batch_size=8,
                      progress=False, cache_dir=str(cache))
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    whole = suite.evaluate(model.at([1, 1, 1]), split="val")
    for task in FAST_TASKS:
        logged = events.Scalars(f"val/acc/equal/{task}")[-1].value
        assert logged == pytest.approx(whole[task], abs=1e-6), task
    scalars = events.Tags()["scalars"]
    # the rank-zero callbacks ran, with no collective the other rank would have to join
    assert {"front/hypervolume", "final/hypervolume", "map/hv_real", "test/front/hypervolume"} <= set(scalars)
    assert (out / "logs" / "version_0" / "front_test.csv").is_file()
    # the fresh cache was built exactly once, by one process
    assert len((out / "builds.txt").read_text().split()) == 1


def test_ddp_fit_adamerging(fits):
    out = fits / "adamerging"
    ranks = _ranks(out)
    model = AdaMerging.load_from_checkpoint(out / "checkpoints" / "last.ckpt")
    _check_common(out, ranks, ["lambdas"])
    assert not (out / "builds.txt").exists()  # the cache built by the first fit was reused
    assert model.lambdas.shape == (len(model.task_vectors.layer_names), 3)


def test_ddp_fit_of_a_language_model(fits, cache):
    out = fits / "tinylm"
    ranks = _ranks(out)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["global_step"] == STEPS for r in ranks)
    model = ParetoMerging.load_from_checkpoint(out / "checkpoints" / "last.ckpt")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state0, state1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert sorted(state0) == sorted(names)
    for name in state0:  # every rank ends with the same trained state, which moved from its start
        assert torch.equal(state0[name], state1[name]), name
    assert float(state0["preference_tensor.G.0"].abs().max()) > 0
    for r in ranks:
        assert r["ddp_buffers"] == 0 and r["gradient_bytes"] / STEPS <= 1.05 * 4 * r["trainable_parameters"]
    for task in ("svo", "sov", "vso"):  # each rank read its own sequences
        assert len(ranks[0]["images"][task]) == STEPS * 4
        assert not set(ranks[0]["images"][task]) & set(ranks[1]["images"][task]), task
    # the synced validation loss is the saved model's loss over the whole validation text
    suite = TinyLMSuite(tasks=["svo", "sov", "vso"], cache_dir=str(cache), **SMALL_LM)
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    whole = suite.evaluate(model.at([1, 1, 1]), split="val")
    for task in ("svo", "sov", "vso"):
        assert events.Scalars(f"val/loss/equal/{task}")[-1].value == pytest.approx(whole[task], rel=1e-5), task
    assert {"front/hypervolume", "map/hv_real", "test/front/hypervolume"} <= set(events.Tags()["scalars"])


def _build_concurrently(cache_dir: str, out: str, barrier) -> None:
    torch.set_num_threads(1)
    build = TinySuite._build

    def counted_build(self):
        with open(Path(out) / "builds.txt", "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return build(self)

    TinySuite._build = counted_build
    suite = TinySuite(tasks=list(FAST_TASKS), recipe=SMALL_RECIPE, test_images=128, val_images=64, batch_size=8,
                      progress=False, cache_dir=cache_dir)
    barrier.wait()  # both processes find the cache empty at the same moment
    tv = suite.task_vectors()
    total = sum(float(v.double().sum()) for v in tv.theta0.values()) + sum(float(v.double().sum())
                                                                          for v in tv.tau.values())
    (Path(out) / f"weights-{os.getpid()}.txt").write_text(repr(total))


def test_processes_starting_at_once_build_the_suite_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [context.Process(target=_build_concurrently, args=(str(tmp_path / "cache"), str(tmp_path), barrier))
                 for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0
    assert len((tmp_path / "builds.txt").read_text().split()) == 1
    weights = [p.read_text() for p in tmp_path.glob("weights-*.txt")]
    assert len(weights) == 2 and weights[0] == weights[1]  # the waiting process read what the builder wrote


def test_ddp_config_through_the_cli(pareto_fit, cache, tmp_path):
    """configs/ddp.yaml on top of a fit config: 2 CPU processes, gloo, every tiny config callback included."""
    command = [sys.executable, "-m", "paretomerge.cli", "fit", "--config", str(ROOT / "tests/configs/tiny_fast.yaml"),
               "--config", str(ROOT / "configs/ddp.yaml"), "--trainer.devices", "2", "--trainer.accelerator", "cpu",
               "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
               "--data.init_args.cache_dir", str(cache),  # the suite the first fit built
               "--data.init_args.recipe", "{" + ", ".join(f"{k}: {v}" for k, v in SMALL_RECIPE.items()) + "}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    # configs/ddp.yaml's collective timeouts reach the strategy (jsonargparse reads "h:m:s" as a timedelta)
    assert "TimedDDPStrategy: a training step's collectives time out after 0:03:00 (step_timeout), every other " \
           "collective after 0:30:00 (timeout)" in result.stdout + result.stderr
    assert "test accuracy (%) per task" in result.stdout and "PM equal" in result.stdout  # FitSummary on rank zero
    checkpoint = tmp_path / "lightning_logs" / "tiny_fast" / "version_0" / "checkpoints" / "last.ckpt"
    model = ParetoMerging.load_from_checkpoint(checkpoint)
    assert model.at([1, 0, 0]) is not None


def test_a_collective_timeout_is_told_from_other_errors_and_bad_bounds_are_refused():
    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
    assert collective_failure(RuntimeError(gloo + "Timed out waiting 10000ms for recv operation to complete")) \
        == "timeout"
    assert collective_failure(RuntimeError("Application timeout caused pair closure")) == "timeout"
    assert collective_failure(RuntimeError(gloo.replace("unbound_buffer", "pair") + "Connection closed by peer "
                                           "[127.0.0.1]:24721")) == "lost"
    assert collective_failure(RuntimeError("DataLoader timed out after 5 seconds")) is None  # not a collective
    assert collective_failure(ValueError(gloo + "Timed out")) is None
    with pytest.raises(ValueError, match="step_timeout must be a positive timedelta"):
        TimedDDPStrategy(step_timeout=timedelta(0))
    with pytest.raises(ValueError, match="step_timeout must be a positive timedelta"):
        TimedDDPStrategy(step_timeout=180)
    with pytest.raises(ValueError, match=r"step_timeout \(1:00:00\) must not exceed timeout \(0:30:00\)"):
        TimedDDPStrategy(step_timeout=timedelta(hours=1), timeout=timedelta(minutes=30))
    assert TimedDDPStrategy().step_timeout == DEFAULT_STEP_TIMEOUT == timedelta(minutes=3)
    assert TimedDDPStrategy(step_timeout=None).step_timeout is None  # Lightning's behaviour: `timeout` everywhere
