"""The embedded TinyLM suite: its regime (merging helps and costs), its cache, its splits, the main LM job through the
console script, and a chosen trade-off written out as a Hugging Face directory that loads, and generates, in a process
that never imports paretomerge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from paretomerge import ParetoMerging
from paretomerge.suites import FAST_LM_RECIPE, TinyLMSuite
from paretomerge.suites import tiny_lm as tiny_lm_module
from paretomerge.suites.tiny_lm_build import LMRecipe, _train, encode, lm_config, make_tokenizer
from paretomerge.suites.tiny_lm_text import LANGUAGES

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_lm.yaml"
FAST = {"recipe": FAST_LM_RECIPE, "train_docs": 256, "val_docs": 32, "batch_size": 8, "progress": False}


@pytest.fixture(scope="session")
def fast_lm(tmp_path_factory) -> TinyLMSuite:
    """The fast TinyLM suite (a ~13 s build), built once per session into a temporary cache."""
    suite = TinyLMSuite(cache_dir=str(tmp_path_factory.mktemp("lm-cache")), **FAST)
    suite.task_vectors()
    return suite


def test_the_fast_suite_is_in_the_regime_merging_helps_and_costs(fast_lm):
    report = fast_lm.build_report
    rows = report["tasks"]
    tv = fast_lm.task_vectors()
    from paretomerge.front import static_point
    from paretomerge.kernels import materialize
    from paretomerge.static import task_wise

    for k, task in enumerate(fast_lm.tasks):
        own = rows[task]["individual_loss"]
        assert own < rows[task]["zero_shot_loss"]  # each fine-tune is best on its own language...
        for j in range(len(fast_lm.tasks)):  # ... better than every other fine-tune there
            if j != k:
                other = fast_lm.evaluate(materialize(tv, task_wise(tv, torch.eye(4)[j])), tasks=[task])[task]
                assert own < other, (task, fast_lm.tasks[j])
        # Task Arithmetic trails the fine-tune on its own language by a real margin (a quarter of the gap at least)
        gap = rows[task]["zero_shot_loss"] - own
        assert rows[task]["task_arithmetic_loss"] - own > 0.25 * gap, task
    mean = report["mean"]
    assert mean["individual_loss"] < mean["task_arithmetic_loss"] < mean["zero_shot_loss"]  # merging helps
    assert static_point("task_arithmetic", tv, fast_lm)[0].tolist() == pytest.approx(
        [rows[t]["task_arithmetic_loss"] for t in fast_lm.tasks])


def test_splits_are_padded_on_the_right_and_never_the_fine_tuning_or_test_text(fast_lm):
    from paretomerge.suites.tiny_lm_build import documents

    tokenizer = fast_lm.tokenizer()
    for task in fast_lm.tasks[:2]:
        splits = {s: fast_lm.token_split(task, s) for s in ("train", "val", "test")}
        for tokens in splits.values():
            mask = tokens["attention_mask"]
            assert (tokens["input_ids"][mask == 0] == tokenizer.pad_token_id).all()
            assert (mask[:, 1:] <= mask[:, :-1]).all()  # right padding: no token after a pad
            assert (mask == 0).any() and mask[:, 0].all()  # padding really occurs; every row starts with <s>
        rows = {s: {tuple(r.tolist()) for r in t["input_ids"]} for s, t in splits.items()}
        assert not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
        recipe = fast_lm.recipe
        finetuning = {tuple(r.tolist()) for r in tiny_lm_module.encode(tokenizer, documents(
            recipe, task, "finetune", fast_lm.seed), recipe.seq_len)["input_ids"]}
        assert len(rows["train"] & finetuning) < 0.05 * len(rows["train"])  # short documents may repeat by chance


def test_a_subset_shares_the_cache_and_a_rebuild_is_not_needed(fast_lm, monkeypatch):
    monkeypatch.setattr(tiny_lm_module, "pretrain", lambda *a, **k: pytest.fail("the cache was not used"))
    pair = TinyLMSuite(tasks=["vso", "svo"], cache_dir=fast_lm.hparams.cache_dir, **FAST)
    assert pair.cache_path == fast_lm.cache_path
    tv, full = pair.task_vectors(), fast_lm.task_vectors()
    for name in tv.layer_names:
        torch.testing.assert_close(tv.tau[name][0], full.tau[name][2])
        torch.testing.assert_close(tv.tau[name][1], full.tau[name][0])


@pytest.mark.parametrize("options, message", [
    ({"tasks": ["svo", "xyz"]}, "unknown TinyLM language"), ({"tasks": ["svo"]}, "at least 2 distinct"),
    ({"recipe": {"layerz": 3}}, "unknown TinyLM recipe key"), ({"recipe": {"noise": 1.5}}, "noise must be in"),
    ({"recipe": {"hidden_size": 30, "heads": 4}}, "multiple of heads"), ({"batch_size": 0}, "batch_size")])
def test_bad_options_are_refused_with_the_option_named(options, message):
    with pytest.raises(ValueError, match=message):
        TinyLMSuite(**options)


def run_cli(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "paretomerge"
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def lm_job(fast_lm, tmp_path_factory):
    """The LM main job's config on the fast suite, 20 steps, through the console script."""
    work = tmp_path_factory.mktemp("lm-job")
    env = dict(os.environ, PARETOMERGE_CACHE=str(Path(fast_lm.hparams.cache_dir)), PYTHONPATH=str(ROOT))
    recipe = json.dumps(FAST_LM_RECIPE)
    result = run_cli("fit", "--config", str(CONFIG), "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
                     "--data.init_args.recipe", recipe, "--data.init_args.train_docs", "256",
                     "--data.init_args.val_docs", "32", cwd=work, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return work, result.stdout, env


def test_the_lm_job_prints_the_perplexity_table_and_the_hypervolumes(lm_job, fast_lm):
    work, out, _ = lm_job
    assert len(out) < 10_000  # a log, not a terminal
    assert "objective: next-token loss: test perplexity per task" in out
    header = next(line for line in out.splitlines() if line.startswith("task "))
    for column in ("pretrained", "individual", "task arith.", "TIES", "PM equal", "PM one-hot", "one-hot - equal"):
        assert column in header
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out.splitlines()
            if line.split() and line.split()[0] in (*LANGUAGES, "mean")}
    assert set(rows) == {*LANGUAGES, "mean"}
    report = fast_lm.build_report["tasks"]
    for task in LANGUAGES:  # the printed columns are the perplexities of the report's losses
        assert rows[task][0] == pytest.approx(np.exp(report[task]["zero_shot_loss"]), abs=0.006)
        assert rows[task][1] == pytest.approx(np.exp(report[task]["individual_loss"]), abs=0.006)
        assert rows[task][6] == pytest.approx(rows[task][5] - rows[task][4], abs=0.011)
    front = next(line for line in out.splitlines() if line.startswith("Front: "))
    assert "reference point: the pretrained model's per-task loss (svo " in front and "hypervolume" in front
    assert "Task Arithmetic + preference (θ0 + 0.3·K·Σ_k γ_k τ_k) on the same preferences: hypervolume" in out
    csv = (work / "lightning_logs" / "tiny_lm" / "version_0" / "front_test.csv").read_text().splitlines()
    assert csv[0].split(",")[4:8] == [f"loss_{t}" for t in LANGUAGES]
    assert "--format hf --out merged/" in out


def test_the_front_command_draws_a_loss_front(lm_job, tmp_path, capsys):
    from paretomerge.cli import main

    work, _, env = lm_job
    checkpoint = work / "lightning_logs" / "tiny_lm" / "version_0" / "checkpoints" / "last.ckpt"
    main(["front", "--ckpt", str(checkpoint), "--out", str(tmp_path / "front.png"), "--no-progress",
          "--prefs", "1,1,1,1", "1,0,0,0", "0,1,0,0", "--cache-dir", env["PARETOMERGE_CACHE"]])
    out = capsys.readouterr().out
    assert "reference point: the pretrained model's per-task loss" in out
    assert (tmp_path / "front.png").stat().st_size > 0 and (tmp_path / "front_parallel.png").exists()
    assert (tmp_path / "front.csv").read_text().splitlines()[0].split(",")[4] == "loss_svo"


ROUND_TRIP = textwrap.dedent("""
    import sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, expected = sys.argv[1], torch.load(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(expected["text"])["input_ids"] == expected["ids"][0].tolist(), "another tokenizer"
    with torch.no_grad():
        logits = model(input_ids=expected["ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    generated = model.generate(expected["ids"][:, :4], max_new_tokens=6, do_sample=False)
    print("generated:", tokenizer.decode(generated[0]))
    assert not [m for m in sys.modules if m.startswith("paretomerge")], "paretomerge was imported"
""")


def test_export_round_trip_in_a_fresh_process_without_paretomerge(lm_job, fast_lm, tmp_path):
    from paretomerge.cli import main

    work, _, env = lm_job
    checkpoint = work / "lightning_logs" / "tiny_lm" / "version_0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "merged"
    main(["export", "--ckpt", str(checkpoint), "--at", "0.4,0.3,0.2,0.1", "--format", "hf", "--out", str(out),
          "--cache-dir", env["PARETOMERGE_CACHE"]])
    model = ParetoMerging.load_from_checkpoint(checkpoint)
    text = "ta " + " ".join(fast_lm.tokenizer().convert_ids_to_tokens(list(range(10, 20))))
    ids = torch.tensor([fast_lm.tokenizer()(text)["input_ids"]])
    with torch.no_grad():
        logits = model.at([0.4, 0.3, 0.2, 0.1])({"input_ids": ids})
    torch.save({"ids": ids, "logits": logits, "text": text}, tmp_path / "expected.pt")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", ROUND_TRIP, str(out), str(tmp_path / "expected.pt")],
                            cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated: <s>" in result.stdout


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_a_short_training_schedule_still_trains(steps):
    """A recipe with a few pretraining or fine-tuning steps (as the DDP test's) builds: one cycle needs room for its
    warm-up, and below 3 steps the rate is constant."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(lm_config(LMRecipe(hidden_size=16, intermediate_size=32, heads=2, seq_len=12)))
    data = encode(make_tokenizer(), ["the cat sees the dog"] * 8, 12)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, data, steps, 4, 1e-2, 0.0, 0, "test", False)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_without_transformers_the_lm_suites_say_what_to_install(monkeypatch):
    from importlib import util

    from paretomerge.suites import HFTextSuite

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ImportError, match=r"TinyLMSuite .* pip install 'paretomerge\[hf\]'"):
        TinyLMSuite()
    with pytest.raises(ImportError, match=r"HFTextSuite .* pip install 'paretomerge\[hf\]'"):
        HFTextSuite("base", {"a": "a", "b": "b"}, {"a": "a.txt", "b": "b.txt"})
