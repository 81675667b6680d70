"""Tiny random Llama directories, as ``save_pretrained`` writes them, for the Hugging Face causal-LM tests.

`write_family` writes a pretrained model and K fine-tunes (θ0 plus small seeded perturbations): sharded or not, fp32 or
bf16, tied or untied, optionally with a WordLevel tokenizer beside each. Everything is offline and seeded.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64}
SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>")


def tiny_llama(seed: int = 0, tied: bool = False, **overrides: Any) -> LlamaForCausalLM:
    """A random ``LlamaForCausalLM`` of `TINY`'s size (``overrides`` change it), seeded, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, "tie_word_embeddings": tied, **overrides})
    return LlamaForCausalLM(config).eval()


def perturbed(model: LlamaForCausalLM, seed: int, scale: float = 1e-2) -> LlamaForCausalLM:
    """A copy of ``model`` with every parameter moved by ``scale`` × seeded Gaussian noise (a "fine-tune")."""
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in out.parameters():  # a tied parameter is listed (and moved) once
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return out


def word_level_tokenizer(vocab_size: int, renamed: Mapping[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer of ``vocab_size`` tokens (`SPECIAL_TOKENS`, then ``w4``, ``w5``...), some renamed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(len(SPECIAL_TOKENS), vocab_size))]
    tokens = [(renamed or {}).get(t, t) for t in tokens]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def write_model(model: LlamaForCausalLM, directory: Path, *, dtype: torch.dtype = torch.float32,
                shard_bytes: int | None = None, tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    """``model`` saved in ``dtype`` by ``save_pretrained`` (shards of at most ``shard_bytes``, else one file), and
    ``tokenizer`` beside it."""
    saved = copy.deepcopy(model).to(dtype)
    options = {} if shard_bytes is None else {"max_shard_size": shard_bytes}
    saved.save_pretrained(directory, **options)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


@dataclass
class Family:
    """A pretrained directory, K fine-tuned ones, and the models they were written from (in the files' dtype)."""

    pretrained: Path
    finetuned: list[Path]
    models: list[LlamaForCausalLM]  # θ0 first, then the K fine-tunes, as the files hold them

    @property
    def tasks(self) -> list[str]:
        return [f"task{k}" for k in range(len(self.finetuned))]


def write_family(root: Path, num_tasks: int = 2, *, tied: bool = False, dtype: torch.dtype = torch.float32,
                 shard_bytes: int | None = None, tokenizer: bool = False, seed: int = 0, **overrides: Any) -> Family:
    """θ0 (``root/pretrained``) and ``num_tasks`` fine-tunes (``root/task{k}``); see `write_model`."""
    theta0 = tiny_llama(seed, tied=tied, **overrides)
    models = [theta0, *(perturbed(theta0, seed=seed + 1 + k) for k in range(num_tasks))]
    words = word_level_tokenizer(theta0.config.vocab_size) if tokenizer else None
    paths = [write_model(m, root / name, dtype=dtype, shard_bytes=shard_bytes, tokenizer=words)
             for m, name in zip(models, ["pretrained", *(f"task{k}" for k in range(num_tasks))], strict=True)]
    return Family(paths[0], paths[1:], [copy.deepcopy(m).to(dtype) for m in models])


# ---------------------------------------------------------------------------------------------- damaging a directory
def edit_config(directory: Path, **changes: Any) -> None:
    """Set fields of ``directory/config.json`` (a dict value replaces the field; None removes it)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


def shard_of(directory: Path, key: str) -> Path:
    """The weights file of ``directory`` that holds ``key``."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return directory / json.loads(index.read_text())["weight_map"][key]
    return directory / "model.safetensors"


def rewrite_shard(directory: Path, key: str, value: Tensor | None, beside: str | None = None) -> Path:
    """Replace (or, with None, drop) tensor ``key`` in the file that holds it, or add it to the file that holds
    ``beside``, leaving any index as it is."""
    path = shard_of(directory, beside or key)
    with safe_open(str(path), framework="pt") as shard:
        tensors = {k: shard.get_tensor(k) for k in shard.keys()}  # noqa: SIM118
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
