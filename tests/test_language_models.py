"""Causal language models through the one merge and forward: token batches, the next-token objectives, every method
on an `HFTextSuite` of tiny random Llamas, scores that go down (a loss), checkpoints with tied weights, and the model of
one preference written out as an ordinary Hugging Face directory."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from paretomerge import AdaMerging, ParetoMerging, static_model
from paretomerge.callbacks import FitSummary
from paretomerge.kernels import forward_features, forward_tasks, merge
from paretomerge.map.evaluate import MergeEvaluator
from paretomerge.map.plain import plain_map
from paretomerge.modules.ideal import IDEAL_BATCHES, first_batches, resolve_ideal
from paretomerge.objectives import next_token_entropy, next_token_loss, resolve_objective, task_objectives
from paretomerge.pareto import LOSS, hypervolume, non_dominated, win_rate
from paretomerge.suites import HFTextSuite
from tests.conftest import make_trainer
from tests.hf_models import tiny_llama, word_level_tokenizer, write_model

ROOT = Path(__file__).resolve().parents[1]


def write_texts(root: Path, tasks: list[str], documents: int = 40, words: int = 40) -> dict[str, str]:
    """A .txt file per task of WordLevel tokens ``w<i>`` (task k mostly uses its own range of ids), 40 documents."""
    paths = {}
    for k, task in enumerate(tasks):
        rng = random.Random(k)
        docs = [" ".join(f"w{rng.randrange(4 + 12 * k, 24 + 12 * k)}" for _ in range(words)) for _ in range(documents)]
        paths[task] = str(root / f"{task}.txt")
        Path(paths[task]).write_text("\n\n".join(docs), encoding="utf-8")
    return paths


class Family:
    def __init__(self, pretrained: Path, finetuned: list[Path], models: list) -> None:
        self.pretrained, self.finetuned, self.models, self.tasks = pretrained, finetuned, models, ["task0", "task1"]


def finetune(model, tokenizer, text: str, steps: int = 40, seed: int = 0):
    """A copy of ``model`` trained ``steps`` AdamW steps on ``text`` (16-token windows): a real, quick fine-tune."""
    import copy

    tuned = copy.deepcopy(model).train()
    ids = torch.tensor(tokenizer(text.replace("\n\n", " "))["input_ids"][: 16 * 64]).view(-1, 16)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = ids[torch.randint(0, len(ids), (8,), generator=generator)]
        loss = tuned(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return tuned.eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """θ0 (a random tiny Llama with tied embeddings) and two fine-tunes, each trained on its task's text."""
    root = tmp_path_factory.mktemp("llamas")
    texts = write_texts(root, ["task0", "task1"])
    tokenizer = word_level_tokenizer(64)
    theta0 = tiny_llama(0, tied=True)
    models = [theta0] + [finetune(theta0, tokenizer, Path(texts[t]).read_text(), seed=k)
                         for k, t in enumerate(["task0", "task1"])]
    paths = [write_model(m, root / name, tokenizer=tokenizer)
             for m, name in zip(models, ["pretrained", "task0", "task1"], strict=True)]
    return Family(paths[0], paths[1:], models), texts


def make_suite(family, **options) -> HFTextSuite:
    fam, texts = family
    suite = HFTextSuite(str(fam.pretrained), {t: str(p) for t, p in zip(fam.tasks, fam.finetuned, strict=True)},
                        texts, seq_len=16, batch_size=4, eval_batch_size=16, progress=False, **options)
    suite.setup("fit")
    return suite


@pytest.fixture(scope="module")
def suite(family):
    return make_suite(family)


def hf_loss(model, tokens) -> float:
    """Hugging Face's own causal-LM loss: labels = inputs with padding as -100, shifted inside the model."""
    labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -100)
    return float(model(**tokens, labels=labels, use_cache=False).loss)


def test_the_next_token_loss_is_hugging_faces_and_padding_changes_nothing(family):
    fam, _ = family
    model = fam.models[0]
    ids = torch.randint(4, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 10:] = 0
    tokens = {"input_ids": ids, "attention_mask": mask}
    params = dict(model.named_parameters())
    logits = forward_features(model, params, tokens)
    assert logits.shape == (3, 12, 64)
    assert float(next_token_loss(logits, tokens)) == pytest.approx(hf_loss(model, tokens), rel=1e-5)
    # the entropy is taken over the same positions: a padded row gives what the row cut at its length gives
    short = {"input_ids": ids[1:2, :7], "attention_mask": mask[1:2, :7]}
    alone = next_token_entropy(forward_features(model, params, short), short)
    padded = next_token_entropy(logits[1:2], {k: v[1:2] for k, v in tokens.items()})
    assert float(padded) == pytest.approx(float(alone), rel=1e-5)


def test_tasks_of_different_lengths_run_as_one_call_and_each_sees_only_its_own(family):
    fam, _ = family
    model = fam.models[0]
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    batch = {"a": {"input_ids": torch.randint(4, 64, (2, 9), generator=g), "attention_mask": torch.ones(2, 9).long()},
             "b": {"input_ids": torch.randint(4, 64, (3, 14), generator=g)}}  # no mask: all tokens count
    heads = {"a": torch.nn.Identity(), "b": torch.nn.Identity()}
    out = forward_tasks(model, heads, params, batch)
    assert out["a"].shape == (2, 9, 64) and out["b"].shape == (3, 14, 64)
    for task in batch:
        alone = forward_features(model, params, batch[task])
        torch.testing.assert_close(out[task], alone, rtol=1e-4, atol=1e-5)


def test_the_objective_is_the_loss_for_tokens_and_the_entropy_for_images():
    tokens = {"input_ids": torch.zeros(1, 3, dtype=torch.long)}
    assert resolve_objective(None, tokens) == "loss" and resolve_objective("entropy", tokens) == "entropy"
    assert resolve_objective(None, torch.zeros(1, 3, 8, 8)) == "entropy"
    with pytest.raises(ValueError, match="next-token loss of a language model"):
        resolve_objective("loss", torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="objective must be one of"):
        ParetoMerging(objective="perplexity")
    logits = {"t": torch.randn(1, 3, 5)}
    with pytest.raises(ValueError, match="needs every task's token batch"):
        task_objectives(logits, ["t"], "loss")
    parts = task_objectives(logits, ["t"], "loss", beta_div=0.5, inputs={"t": tokens})
    assert "div" not in parts and float(parts["f"][0]) == pytest.approx(float(next_token_loss(logits["t"], tokens)))


def test_task_vectors_merge_the_whole_model_tied_weights_once(suite, family):
    fam, _ = family
    tv = suite.task_vectors()
    assert "lm_head.weight" not in tv.layer_names and "model.embed_tokens.weight" in tv.layer_names
    assert all(isinstance(h, torch.nn.Identity) for h in tv.heads.values())
    merged = merge(tv.theta0, tv.tau, torch.tensor([0.3, 0.3]))
    expected = {n: p0 + 0.3 * (p1 - p0) + 0.3 * (p2 - p0) for (n, p0), p1, p2 in zip(
        fam.models[0].named_parameters(), fam.models[1].parameters(), fam.models[2].parameters(), strict=True)}
    for name in tv.layer_names:
        torch.testing.assert_close(merged[name], expected[name])
    net = static_model("task_arithmetic", tv)
    assert net.headless and net.backbone.lm_head.weight is net.backbone.model.embed_tokens.weight
    torch.testing.assert_close(net.backbone.lm_head.weight, expected["model.embed_tokens.weight"])


def test_static_merges_and_map_score_the_loss_through_the_one_forward(suite):
    tv = suite.task_vectors()
    report = suite.build_report
    for task in suite.tasks:
        row = report["tasks"][task]
        assert row["individual_loss"] < row["zero_shot_loss"]  # each fine-tune learnt its own text
    for name in ("ties", "dare_task_arithmetic", "dare_ties", "weight_averaging"):
        losses = suite.evaluate(static_model(name, tv))
        assert all(np.isfinite(v) and v > 0 for v in losses.values()), name
    evaluator = MergeEvaluator(tv, suite.labeled("val"))
    assert evaluator.score is LOSS and evaluator.metric == "loss"
    theta0 = evaluator(np.zeros((1, 2)))[0]
    expected = suite.evaluate(static_model("task_arithmetic", tv, scale=0.0), split="val")
    assert theta0.tolist() == pytest.approx([expected[t] for t in suite.tasks], rel=1e-5)
    result = plain_map(evaluator, budget=12, holdout=0.0, generations=15, pop_size=20)
    assert result.front_predicted.shape[1] == 2 and (result.front_predicted > 0).all()
    kept = non_dominated(result.front_predicted, LOSS)
    assert len(kept) == len(result.front_predicted)  # NSGA-III's front is non-dominated for a loss: it minimised
    with pytest.raises(ValueError, match="next-token loss"):
        MergeEvaluator(tv, suite.labeled("val"), metric="accuracy")


def test_a_loss_front_is_measured_against_the_pretrained_loss():
    front = np.array([[1.0, 2.0], [2.0, 1.0], [2.5, 2.5], [3.5, 0.5]])
    reference = np.array([3.0, 3.0])
    assert non_dominated(front, LOSS).tolist() == [0, 1, 3]
    # gains over the reference (2, 1), (1, 2), (0.5, 0.5); the last point is worse than it on the first task: 0
    assert hypervolume(front, score=LOSS, reference=reference) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="needs a reference point"):
        hypervolume(front, score=LOSS)
    assert win_rate(front[:1], front[2:3], LOSS) == 1.0 and win_rate(front[:1], front[3:], LOSS) == 0.5


@pytest.fixture(scope="module")
def fitted(suite, tmp_path_factory):
    """Ours fitted 6 steps on the tiny Llamas, with the summary; its checkpoint."""
    root = tmp_path_factory.mktemp("fit")
    model = ParetoMerging(rank=2, beta_div=0)
    summary = FitSummary()
    trainer = make_trainer(root, max_steps=6, callbacks=[summary], limit_val_batches=1, val_check_interval=3)
    trainer.fit(model, datamodule=suite)
    path = root / "lm.ckpt"
    trainer.save_checkpoint(path)
    return model, summary, path


def test_ours_fits_a_language_model_and_the_summary_speaks_perplexity(fitted, suite, capsys):
    model, summary, _ = fitted
    assert summary.front.shape == (11, 2)
    targets = [n for n in model.preference_tensor.names]
    assert targets and all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in targets)
    equal = suite.evaluate(model.at([1, 1]))
    assert [equal[t] for t in suite.tasks] == pytest.approx(summary.front[0].tolist(), rel=1e-6)


def test_the_checkpoint_rebuilds_the_llama_in_a_fresh_process_tied_weights_included(fitted, family, tmp_path):
    model, _, path = fitted
    fam, _ = family
    ids = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    expected = model.at([0.7, 0.3])({"input_ids": ids})
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch
        from paretomerge import ParetoMerging
        model = ParetoMerging.load_from_checkpoint({str(path)!r})
        net = model.at([0.7, 0.3])
        saved = torch.load({str(tmp_path / 'expected.pt')!r})
        out = net({{"input_ids": saved["ids"]}})
        assert type(net.backbone).__name__ == "LlamaForCausalLM", type(net.backbone)
        assert net.backbone.lm_head.weight is net.backbone.model.embed_tokens.weight
        torch.testing.assert_close(out, saved["logits"], rtol=0, atol=1e-5)
        print("same logits")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "same logits" in result.stdout


def test_the_ideal_point_is_each_tasks_loss_under_its_own_fine_tune(fitted, suite, family):
    """The loss objective's z (modules.ideal): measured once when the fit starts, on the first IDEAL_BATCHES training
    batches, as each fine-tune's own loss, which Hugging Face computes from the fine-tune's directory."""
    model, _, _ = fitted
    fam, _ = family
    batches = [model.split_batch(b, suite.tasks, "train")
               for b in first_batches(suite.train_dataloader(), IDEAL_BATCHES)]
    expected = [np.mean([hf_loss(fam.models[k + 1], batch[task][0]) for batch in batches])
                for k, task in enumerate(suite.tasks)]
    assert model._ideal is not None and model._ideal.tolist() == pytest.approx(expected, rel=1e-4)
    theta0 = [np.mean([hf_loss(fam.models[0], batch[task][0]) for batch in batches]) for task in suite.tasks]
    assert all(z < t for z, t in zip(expected, theta0, strict=True))  # each fine-tune is better on its own text


def test_the_ideal_point_follows_the_objective_and_is_checked():
    assert resolve_ideal(None, "loss") == "individual" and resolve_ideal(None, "entropy") == "zero"
    assert resolve_ideal("zero", "loss") == "zero"
    assert ParetoMerging(ideal="zero").ideal_point({"t": {"input_ids": torch.zeros(1, 2, dtype=torch.long)}}) == 0.0
    with pytest.raises(ValueError, match="ideal must be one of"):
        ParetoMerging(ideal="best")


def test_adamerging_minimises_the_summed_loss(suite, tmp_path):
    model = AdaMerging(lr=5e-2)
    before = suite.evaluate(static_model("task_arithmetic", suite.task_vectors()))
    make_trainer(tmp_path, max_steps=8, limit_val_batches=0).fit(model, datamodule=suite)
    after = suite.evaluate(model.at())
    assert model.objective_name({"t": {"input_ids": torch.zeros(1, 2, dtype=torch.long)}}) == "loss"
    assert sum(after.values()) < sum(before.values())  # AdaMerging at 0.3 is Task Arithmetic: it must improve on it


def test_export_writes_an_ordinary_hugging_face_directory(fitted, suite, tmp_path):
    from paretomerge.cli import main

    _, _, path = fitted
    out = tmp_path / "merged"
    main(["export", "--ckpt", str(path), "--at", "0.7,0.3", "--format", "hf", "--out", str(out)])
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "model.safetensors" in names and "tokenizer.json" in names
    assert not list(tmp_path.glob(".merged.writing-*"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    for argv, _ in (
            (["--at", "0.7,0.3", "--format", "hf", "--out", str(out)], "exists and is not an empty directory"),
            (["--format", "hf", "--out", str(tmp_path / "b")], "give --at with 2 weights"),
            (["--at", "1,2,3", "--format", "hf", "--out", str(tmp_path / "c")], "2 comma-separated numbers"),
            (["--at", "1,0", "--out", str(tmp_path / "d.safetensors")], "--at goes with --format hf")):
        with pytest.raises(SystemExit) as exit_:
            main(["export", "--ckpt", str(path), *argv])
        assert exit_.value.code != 0


@pytest.mark.parametrize("problem, message", [
    ("missing", "does not exist"), ("short", "too few to hold out"), ("jsonl", "must be an object with a 'text'"),
    ("suffix", "a .txt file"), ("tasks", "tasks must name at least 2 distinct tasks")])
def test_text_files_are_checked_before_anything_trains(family, tmp_path, problem, message):
    fam, texts = family
    texts = dict(texts)
    tasks = None
    if problem == "missing":
        texts["task1"] = str(tmp_path / "nowhere.txt")
    elif problem == "short":
        (tmp_path / "short.txt").write_text("w4 w5 w6 " * 20)
        texts["task1"] = str(tmp_path / "short.txt")
    elif problem == "jsonl":
        (tmp_path / "bad.jsonl").write_text('{"text": "w4 w5"}\n["w4"]\n')
        texts["task1"] = str(tmp_path / "bad.jsonl")
    elif problem == "suffix":
        (tmp_path / "text.csv").write_text("w4,w5")
        texts["task1"] = str(tmp_path / "text.csv")
    else:
        tasks = ["task0", "task0"]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        make_suite((fam, texts), tasks=tasks)


def test_a_loss_of_nan_names_the_task_with_an_lm(suite):
    logits = {"task0": torch.full((1, 4, 64), float("nan")), "task1": torch.zeros(1, 4, 64)}
    tokens = {t: {"input_ids": torch.ones(1, 4, dtype=torch.long)} for t in logits}
    f = task_objectives(logits, ["task0", "task1"], "loss", inputs=tokens)["f"]
    assert not torch.isfinite(f[0]) and float(f[1]) == pytest.approx(float(np.log(64)), rel=1e-5)


def test_the_model_is_the_same_through_the_one_merge_path(suite):
    """at(γ) of a fresh ours (ω = λ_init) is Task Arithmetic + preference: θ0 + 0.3·K·Σγτ."""
    model = ParetoMerging(task_vectors=suite.task_vectors(), rank=2, basis_rank=None)
    ours = suite.evaluate(model.at([0.8, 0.2]))
    free = suite.evaluate(static_model("task_arithmetic_preference", suite.task_vectors(), preference=[0.8, 0.2]))
    assert [ours[t] for t in suite.tasks] == pytest.approx([free[t] for t in suite.tasks], rel=1e-5)


def test_the_gpu_checks_lm_case_runs_at_toy_sizes_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --case lm --toy: the GPU check's LM path (K = 4 fine-tunes with bf16 τ, a fit, at(γ))
    on a CPU, so the script works the day a GPU is lent."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = gpu_check.main(["--case", "lm", "--toy", "--out", str(tmp_path / "result.json")])
    assert result["device"] == "cpu" and result["case"] == "lm" and result["tasks"] == 4 and result["steps"] == 3
    assert result["tau_mib"] == pytest.approx(4 * result["model_mib"] / 2, rel=1e-6)  # bf16 τ: half a model each
    assert result["equal_loss"] == pytest.approx(np.log(64), rel=0.1)  # random tokens over a 64-word vocabulary
    assert json.loads((tmp_path / "result.json").read_text())["fit_s"] > 0
