"""Hugging Face causal-LM directories as `TaskVectors`: exact task vectors (sharded or not, fp32 or bf16, tied or
untied), every refusal made from configs and headers before a fine-tuned weight is read, streaming one shard at a time,
and the backbone's spec surviving a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from paretomerge.kernels import ModuleSpec, recognise
from paretomerge.kernels.builders import structure_difference
from paretomerge.suites import hf_files, hf_lm
from paretomerge.suites.hf_lm import HFModelError, causal_lm_task_vectors, load_tokenizer, memory_plan
from tests.hf_models import (
    Family,
    edit_config,
    rewrite_shard,
    tiny_llama,
    word_level_tokenizer,
    write_family,
)

ROOT = Path(__file__).resolve().parents[1]
SHARD = 20_000  # bytes: the tiny Llama's 82 kB of fp32 weights in 6 shards
EMBED, Q_PROJ = "model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"


@dataclass
class Spy:
    """What `hf_lm` opened and read: files opened (headers and data), tensors read, θ0 loads, most shards open."""

    opened: list[str] = field(default_factory=list)
    read: list[tuple[str, str]] = field(default_factory=list)
    loads: int = 0
    open_now: int = 0
    most_open: int = 0


@pytest.fixture
def spy(monkeypatch) -> Spy:
    record, real_open, real_load = Spy(), hf_lm.safe_open, hf_lm._load_pretrained

    class Handle:
        def __init__(self, path: str, framework: str) -> None:
            self.path, self.inner = path, real_open(path, framework=framework)

        def __enter__(self) -> Handle:
            record.open_now += 1
            record.most_open = max(record.most_open, record.open_now)
            record.opened.append(self.path)
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            record.open_now -= 1
            self.inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.inner.keys()

        def get_slice(self, key: str):
            return self.inner.get_slice(key)

        def get_tensor(self, key: str) -> torch.Tensor:
            record.read.append((self.path, key))
            return self.inner.get_tensor(key)

    def load(*args):
        record.loads += 1
        return real_load(*args)

    monkeypatch.setattr(hf_lm, "safe_open", Handle)
    monkeypatch.setattr(hf_files, "safe_open", Handle)  # the headers are read there
    monkeypatch.setattr(hf_lm, "_load_pretrained", load)
    return record


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Family:
    """θ0 and two fine-tunes: sharded, fp32, untied, with tokenizers (copied by `family` before a test damages them)."""
    return write_family(tmp_path_factory.mktemp("family"), 2, shard_bytes=SHARD, tokenizer=True)


@pytest.fixture
def family(written, tmp_path) -> Family:
    paths = [Path(shutil.copytree(p, tmp_path / p.name)) for p in (written.pretrained, *written.finetuned)]
    return replace(written, pretrained=paths[0], finetuned=paths[1:])


def _load(family: Family, **options):
    return causal_lm_task_vectors(family.pretrained, family.finetuned, family.tasks, progress=False, **options)


def _refused(family: Family, spy: Spy, *fragments: str) -> str:
    """The `HFModelError` message, checked to name every fragment, with nothing loaded or read before it."""
    with pytest.raises(HFModelError) as info:
        _load(family)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert spy.read == [] and spy.loads == 0, "a fine-tuned tensor was read, or θ0 loaded, before the refusal"
    return message


def _input(vocab_size: int = 64) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}


# ---------------------------------------------------------------------------------------------- exact task vectors
@pytest.mark.parametrize(("tied", "dtype", "shard_bytes", "num_tasks"), [
    (False, torch.float32, None, 2), (True, torch.float32, SHARD, 3),
    (False, torch.bfloat16, SHARD, 3), (True, torch.bfloat16, None, 2)])
def test_task_vectors_are_the_fine_tunes_minus_theta0_and_merge_like_a_loaded_model(tmp_path, tied, dtype,
                                                                                    shard_bytes, num_tasks):
    family = write_family(tmp_path, num_tasks, tied=tied, dtype=dtype, shard_bytes=shard_bytes)
    assert (shard_bytes is None) == (family.pretrained / "model.safetensors").is_file()
    tv = _load(family)
    theta0, models = dict(family.models[0].named_parameters()), family.models[1:]
    assert len(tv.layer_names) == (20 if tied else 21) and (tied ^ ("lm_head.weight" in tv.layer_names))
    assert tv.task_names == tuple(family.tasks) and all(isinstance(h, nn.Identity) for h in tv.heads.values())
    for name in tv.layer_names:
        assert tv.tau[name].dtype == torch.float32 and tv.theta0[name].dtype == torch.float32
        assert torch.equal(tv.theta0[name], theta0[name].float())
        for k, model in enumerate(models):  # bf16 files: both exact in fp32, so the difference is exact too
            assert torch.equal(tv.tau[name][k], dict(model.named_parameters())[name].float() - theta0[name].float())

    coefficients = [0.3, 0.5, 0.2][:num_tasks]
    merged = {n: tv.theta0[n] + sum(c * tv.tau[n][k] for k, c in enumerate(coefficients)) for n in tv.layer_names}
    batch = _input()
    logits = torch.func.functional_call(tv.backbone, merged, (), batch).logits
    direct = tiny_llama(tied=tied)
    missing = direct.load_state_dict(merged, strict=False).missing_keys  # tied: lm_head.weight is embed_tokens
    assert missing == (["lm_head.weight"] if tied else [])
    assert (direct.lm_head.weight is direct.model.embed_tokens.weight) == tied
    assert logits.shape == (2, 7, 64) and torch.equal(logits, direct(**batch).logits)


def test_a_tied_weight_is_one_layer_whichever_name_the_files_store_it_under(tmp_path):
    family = write_family(tmp_path, 2, tied=True)
    expected = _load(family).tau[EMBED]
    embed = dict(family.models[1].named_parameters())[EMBED].detach()
    rewrite_shard(family.finetuned[0], "lm_head.weight", embed + 1.0, beside=EMBED)  # a stored duplicate: ignored
    rewrite_shard(family.finetuned[1], EMBED, None)  # stored only under the tied name
    rewrite_shard(family.finetuned[1], "lm_head.weight", dict(family.models[2].named_parameters())[EMBED].detach(),
                  beside=Q_PROJ)
    tv = _load(family)
    assert "lm_head.weight" not in tv.layer_names and torch.equal(tv.tau[EMBED], expected)


def test_tau_in_bf16_is_the_fp32_difference_rounded_and_theta0_may_be_bf16(written):
    exact = _load(written)
    halved = _load(written, tau_dtype=torch.bfloat16)
    assert halved.nbytes() * 2 == exact.nbytes() and halved.theta0[EMBED].dtype == torch.float32
    for name in exact.layer_names:
        assert halved.tau[name].dtype == torch.bfloat16
        assert torch.equal(halved.tau[name], exact.tau[name].to(torch.bfloat16))  # rounded once, from the exact τ
        error = (halved.tau[name].float() - exact.tau[name]).abs()
        assert bool((error <= exact.tau[name].abs() * 2**-8).all())  # bf16: 8 significant bits
    bf16 = _load(written, dtype=torch.bfloat16)
    assert bf16.theta0[EMBED].dtype == bf16.tau[EMBED].dtype == torch.bfloat16
    theta0, theta1 = (dict(m.named_parameters())[EMBED].to(torch.bfloat16) for m in written.models[:2])
    assert torch.equal(bf16.tau[EMBED][0], theta1 - theta0)


def test_memory_plan_counts_theta0_the_stacks_and_one_shard_without_reading_weights(written, spy):
    plan = memory_plan(written.pretrained, 2, tau_dtype=torch.bfloat16)
    assert spy.read == [] and spy.loads == 0
    numel = sum(p.numel() for p in written.models[0].parameters())
    assert plan["theta0_bytes"] == 4 * numel and plan["tau_bytes"] == 2 * 2 * numel == _load(
        written, tau_dtype=torch.bfloat16).nbytes()
    assert 0 < plan["largest_shard_bytes"] <= SHARD + 1000 and plan["total_bytes"] == sum(
        plan[k] for k in ("theta0_bytes", "tau_bytes", "largest_shard_bytes"))


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(("change", "field_name"), [
    ({"vocab_size": 96}, "'vocab_size' is 96 there but 64"),
    ({"hidden_size": 48}, "'hidden_size' is 48 there but 32"),
    ({"num_hidden_layers": 3}, "'num_hidden_layers' is 3 there but 2"),
    ({"num_attention_heads": 8}, "'num_attention_heads' is 8 there but 4"),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}, "'rope_parameters.rope_theta' is 1000000.0"),
    ({"rope_parameters": None, "rope_theta": 1e6}, "'rope_parameters.rope_theta' is 1000000.0"),  # older spelling
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}},
     "'rope_parameters.rope_type' is 'linear'"),
])
def test_configs_that_change_the_computation_are_refused_naming_the_field(family, spy, change, field_name):
    edit_config(family.finetuned[1], **change)
    message = _refused(family, spy, "task 'task1'", str(family.finetuned[1]), field_name,
                       f"in the pretrained model ({family.pretrained})", "configs must agree")
    assert "task 'task0'" not in message


def test_fields_that_do_not_change_the_computation_are_ignored(family, written):
    edit_config(family.finetuned[0], _name_or_path="someone/math", transformers_version="4.44.0", dtype="bfloat16",
                use_cache=False, eos_token_id=7, architectures=["LlamaForSequenceClassification"],
                attention_dropout=0.1, initializer_range=0.5, rope_parameters=None, rope_theta=10000.0)
    tv = _load(family)
    assert torch.equal(tv.tau[Q_PROJ], _load(written).tau[Q_PROJ])


@pytest.mark.parametrize(("change", "fragment"), [
    ({"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}, "'auto_map'"),
    ({"model_type": "vit"}, "'model_type' is 'vit', not a causal language model"),
    ({"model_type": "mistral"}, "'model_type' is 'mistral' there but 'llama' in the pretrained model"),
])
def test_custom_code_and_other_model_types_are_refused(family, spy, change, fragment):
    edit_config(family.finetuned[0], **change)
    _refused(family, spy, "task 'task0'", str(family.finetuned[0]), fragment)


# ---------------------------------------------------------------------------------------------- files and tensors
def test_missing_files_are_refused_naming_them(family, spy):
    (family.finetuned[1] / "model-00004-of-00006.safetensors").unlink()
    _refused(family, spy, "task 'task1'", "names the shard 'model-00004-of-00006.safetensors', which is not there")
    (family.finetuned[1] / "model.safetensors.index.json").unlink()
    _refused(family, spy, str(family.finetuned[1]), "no model.safetensors or model.safetensors.index.json")
    (family.pretrained / "config.json").unlink()
    _refused(family, spy, "the pretrained model", str(family.pretrained), "no config.json")


def test_a_missing_tensor_is_refused_naming_the_key_the_directory_and_the_shard(family, spy):
    shard = rewrite_shard(family.finetuned[1], Q_PROJ, None)
    _refused(family, spy, "task 'task1'", str(family.finetuned[1]), f"tensor {Q_PROJ!r} is missing from its weights",
             f"the index maps it to {shard.name!r}")
    rewrite_shard(family.pretrained, EMBED, None)  # θ0's own files must hold every weight too
    _refused(family, spy, "the pretrained model", f"tensor {EMBED!r}")


@pytest.mark.parametrize(("key", "value", "fragments"), [
    (Q_PROJ, torch.zeros(32, 16), [f"tensor {Q_PROJ!r}", "has shape (32, 16) there but (32, 32)"]),
    (Q_PROJ, torch.zeros(32, 32, dtype=torch.int64), [f"tensor {Q_PROJ!r}", "is I64, not floating point"]),
    ("model.layers.1.self_attn.extra.weight", torch.zeros(3), ["'model.layers.1.self_attn.extra.weight'",
                                                               "is not in the pretrained model"]),
])
def test_shape_dtype_and_extra_tensors_are_refused(family, spy, key, value, fragments):
    rewrite_shard(family.finetuned[0], key, value, beside=Q_PROJ)
    _refused(family, spy, "task 'task0'", str(family.finetuned[0]), *fragments)


def test_a_truncated_shard_is_refused_and_checks_run_in_order_before_any_read(family, written, spy):
    truncated = family.finetuned[1] / "model-00002-of-00006.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    edit_config(family.finetuned[1], hidden_size=48)  # every config is checked before a fine-tune's header is read
    _refused(family, spy, "task 'task1'", "'hidden_size'")
    assert spy.opened and all(Path(path).parent == family.pretrained for path in spy.opened)  # θ0's headers only
    edit_config(family.finetuned[1], hidden_size=32)
    damaged = rewrite_shard(family.finetuned[0], Q_PROJ, None)  # an earlier directory's problem is found first
    _refused(family, spy, "task 'task0'", f"tensor {Q_PROJ!r}")
    assert str(truncated) not in spy.opened
    shutil.copy(written.finetuned[0] / damaged.name, damaged)
    _refused(family, spy, "task 'task1'", str(family.finetuned[1]), "the shard 'model-00002-of-00006.safetensors' has "
             "an unreadable safetensors header (truncated or corrupt?)")


def test_non_finite_weights_are_refused_naming_the_key(family, spy):
    value = dict(family.models[2].named_parameters())[Q_PROJ].detach().clone()
    value[3, 4] = float("nan")
    shard = rewrite_shard(family.finetuned[1], Q_PROJ, value)
    with pytest.raises(HFModelError, match=rf"task 'task1' .*tensor '{Q_PROJ}' \(in '{shard.name}'\) contains NaN"):
        _load(family)


# ---------------------------------------------------------------------------------------------- tokenizers
def test_tokenizers_must_share_one_vocabulary_within_vocab_size(family, spy):
    word_level_tokenizer(64, renamed={"w10": "ten"}).save_pretrained(family.finetuned[1])
    _refused(family, spy, "task 'task1'", str(family.finetuned[1]), "first at token 'w10'", "(64 tokens)",
             "share one vocabulary")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a directory without a tokenizer is not compared
        (family.finetuned[1] / name).unlink()
    assert _load(family).num_tasks == 2
    spy.read.clear()
    spy.loads = 0
    word_level_tokenizer(80).save_pretrained(family.pretrained)
    _refused(family, spy, "the pretrained model", "the tokenizer has 80 tokens (ids up to 79) but the config's "
             "vocab_size is 64")


def test_load_tokenizer_takes_the_first_directory_with_one(family):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (family.pretrained / name).unlink()
    tokenizer = load_tokenizer([family.pretrained, *family.finetuned])
    assert tokenizer("w5 w6 nonsense")["input_ids"] == [5, 6, 0] and len(tokenizer.get_vocab()) == 64
    with pytest.raises(HFModelError, match=r"no tokenizer files .* in any of \[.*pretrained"):
        load_tokenizer(family.pretrained)


# ---------------------------------------------------------------------------------------------- streaming
def test_fine_tunes_are_streamed_one_shard_at_a_time(written, spy):
    tv = _load(written)
    assert spy.most_open == 1 and spy.loads == 1
    for directory in written.finetuned:
        reads = [(Path(p).name, key) for p, key in spy.read if Path(p).parent == directory]
        assert sorted(key for _, key in reads) == sorted(tv.layer_names)  # every layer read once per fine-tune
        runs = [name for i, (name, _) in enumerate(reads) if i == 0 or reads[i - 1][0] != name]
        assert len(runs) == len(set(runs)) == 6  # shard by shard: each shard's tensors read in one visit


_MEMORY_CHILD = """
import gc, json, sys
from paretomerge.suites.hf_lm import causal_lm_task_vectors, memory_plan
def memory(field):  # VmRSS: resident now; VmHWM: its peak in this process (ru_maxrss would count the forked parent)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))
def load(root, k):
    return causal_lm_task_vectors(f"{root}/pretrained", [f"{root}/task{i}" for i in range(k)],
                                  [f"t{i}" for i in range(k)], progress=False)
load(sys.argv[1], 2)  # the small family first: code paths run once are part of the baseline
gc.collect()
baseline = memory("VmRSS")
tv = load(sys.argv[2], 3)
row = {"above": memory("VmHWM") - baseline, "tau": tv.nbytes()}
print(json.dumps({**memory_plan(f"{sys.argv[2]}/pretrained", 3), **row}))
"""


def test_loading_streams_within_theta0_the_stacks_and_one_shard(written, tmp_path):
    big = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 4}  # 5.5 M parameters: 22 MB in fp32
    write_family(tmp_path, 3, shard_bytes=4 * 2**20, **big)
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(written.pretrained.parent), str(tmp_path)],
                         check=True, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    row = json.loads(out.strip().splitlines()[-1])
    assert row["theta0_bytes"] > 20 * 2**20 and row["tau"] == row["tau_bytes"] == 3 * row["theta0_bytes"]
    # θ0 + 3 stacks + one 4 MB shard, plus 15 % and 8 MB for the allocator; all three fine-tunes in memory at once
    # (a state dict each) would be 66 MB more.
    assert row["above"] <= row["total_bytes"] * 1.15 + 8 * 2**20, row


# ---------------------------------------------------------------------------------------------- rebuilding
@pytest.mark.parametrize("tied", [False, True])
def test_a_llama_is_recognised_and_rebuilt_from_its_spec(tied):
    model = tiny_llama(tied=tied)
    spec = recognise(model)
    assert spec is not None and spec.target == "paretomerge.kernels.builders:hf_causal_lm"
    record = json.loads(json.dumps(spec.to_dict()))
    settings = record["kwargs"]["config"]  # what a real Llama config holds passes the loading-key checks
    assert {"rope_parameters", "initializer_range", "tie_word_embeddings", "use_cache", "pretraining_tp"} <= set(
        settings)
    built = ModuleSpec.from_dict(record).build()
    assert isinstance(built, LlamaForCausalLM) and structure_difference(model, built) is None
    assert (built.lm_head.weight is built.model.embed_tokens.weight) == tied


def test_the_task_vectors_spec_rebuilds_the_backbone(written):
    tv = _load(written)
    built = ModuleSpec.from_dict(json.loads(json.dumps(tv.backbone_spec.to_dict()))).build()
    assert structure_difference(tv.backbone, built) is None


@pytest.mark.parametrize(("change", "fragment"), [
    ({"auto_map": {"AutoModelForCausalLM": "x.Y"}}, "['auto_map']"),
    ({"_name_or_path": "someone/model"}, "['_name_or_path']"),
    ({"_attn_implementation": "kernels-community/flash"}, "['_attn_implementation']"),
    ({"rope_parameters": {"rope_type": "default", "cache_dir": "/tmp"}}, "['rope_parameters.cache_dir']"),
    ({"model_type": "vit"}, "model_type 'vit' is not a causal language model"),
])
def test_specs_that_could_fetch_files_or_code_are_refused(change, fragment):
    config = {**recognise(tiny_llama()).kwargs["config"], **change}
    with pytest.raises(ValueError, match="hf_causal_lm") as info:
        ModuleSpec("paretomerge.kernels.builders:hf_causal_lm", {"config": config}).build()
    assert fragment in str(info.value)
