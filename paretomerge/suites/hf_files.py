"""Reading and checking Hugging Face causal-LM directories without reading a weight: ``config.json`` (compared field by
field), the safetensors index and shard headers (names, shapes, dtypes), and the tokenizer files. `hf_lm` checks every
directory with these before it loads θ0 or reads a fine-tuned tensor.

A directory holds ``config.json`` and ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` listed by
``model.safetensors.index.json``, and optionally tokenizer files. Pickled ``*.bin`` weights and custom code
(``auto_map``) are refused, never run. Every refusal is an `HFModelError` naming the directory and the field, file or
key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

# Top-level config.json fields in which fine-tunes may differ: they do not change what the weights compute. So are
# fields ending in "dropout" or "_pdrop" (dropout is off: the backbone runs in eval mode).
IGNORED_CONFIG_FIELDS = frozenset({
    "_name_or_path", "transformers_version", "architectures",  # provenance (model_type itself is compared)
    "torch_dtype", "dtype",  # the storage dtype: θ0 is loaded in `dtype` whatever the files hold
    "use_cache", "cache_implementation",  # the KV cache at generation time
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",  # special ids
    "max_length", "min_length", "do_sample", "temperature", "top_k", "top_p", "num_beams", "repetition_penalty",
    "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",  # generation settings
    "output_attentions", "output_hidden_states", "return_dict",  # what the forward returns besides the logits
    "initializer_range", "initializer_factor",  # initialisation only: the weights come from the files
    "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class",  # labels, tokenizer name
    "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",  # the same attention, another kernel
    "chunk_size_feed_forward", "torchscript", "use_bfloat16",  # how, not what, it computes
})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_AGREE = ("configs must agree on everything that changes the computation (vocab size, hidden size, layers, heads, "
          "rope...)")


class HFModelError(ValueError):
    """A Hugging Face model directory that cannot be merged with the others (the message names the directory and the
    offending field, file or key)."""


@dataclass
class ModelFiles:
    """One directory: who it is in messages, its config.json, and (once read) its weight headers."""

    path: Path
    label: str  # "the pretrained model" or "task 'math'"
    config: dict[str, Any]
    files: dict[str, Path] | None = None  # shard name -> file, in the index's order
    index: dict[str, str] | None = None  # key -> shard name the index maps it to (None: one unsharded file)
    headers: dict[str, tuple[tuple[int, ...], str, str]] | None = None  # key -> (shape, safetensors dtype, shard)

    @property
    def where(self) -> str:
        return f"{self.label} ({self.path})"


# ---------------------------------------------------------------------------------------------- configs
def read_config(path: str | os.PathLike, label: str) -> ModelFiles:
    """The directory's ``config.json``, refused if absent, not JSON, custom code, or not a causal LM transformers
    knows."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model = ModelFiles(Path(path).expanduser(), label, {})
    if not model.path.is_dir():
        raise HFModelError(f"{model.where}: not a directory")
    file = model.path / "config.json"
    if not file.is_file():
        raise HFModelError(f"{model.where}: no config.json (a save_pretrained directory has one)")
    try:
        model.config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFModelError(f"{model.where}: config.json is not valid JSON: {err}") from err
    if not isinstance(model.config, dict):
        raise HFModelError(f"{model.where}: config.json holds a {type(model.config).__name__}, not an object")
    if "auto_map" in model.config:
        raise HFModelError(f"{model.where}: config.json has 'auto_map' (the model needs its own code); custom code is "
                           "never run here")
    model_type = model.config.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise HFModelError(f"{model.where}: config field 'model_type' is {model_type!r}, not a causal language model "
                           "transformers knows")
    return model


def config_settings(model: ModelFiles) -> dict[str, Any]:
    """The config as transformers reads it (defaults filled, old spellings such as a top-level ``rope_theta``
    moved to where this release keeps them), as JSON, so that two releases' files compare field by field."""
    from transformers import AutoConfig

    raw = dict(model.config)
    try:
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise HFModelError(f"{model.where}: config.json is not a valid {model.config['model_type']} config: "
                           f"{err}") from err
    return json.loads(config.to_json_string(use_diff=False))


def config_differences(mine: Any, theirs: Any, where: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted field, this value, the other value)`` for every field that differs, nested dicts key by key."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in dict.fromkeys([*theirs, *mine]):
            if not where and (key in IGNORED_CONFIG_FIELDS or key.endswith(("dropout", "_pdrop"))):
                continue
            yield from config_differences(mine.get(key, "<absent>"), theirs.get(key, "<absent>"), f"{where}{key}.")
    elif mine != theirs:
        yield where.rstrip("."), mine, theirs


def compare_configs(model: ModelFiles, pretrained: ModelFiles, reference: Mapping[str, Any]) -> None:
    """Refuse ``model`` if its config differs from the pretrained one in a field that changes the computation."""
    if model.config["model_type"] != pretrained.config["model_type"]:
        raise HFModelError(f"{model.where}: config field 'model_type' is {model.config['model_type']!r} there but "
                           f"{pretrained.config['model_type']!r} in the pretrained model ({pretrained.path}); {_AGREE}")
    for name, mine, theirs in config_differences(config_settings(model), reference):
        raise HFModelError(f"{model.where}: config field {name!r} is {mine!r} there but {theirs!r} in the pretrained "
                           f"model ({pretrained.path}); {_AGREE}")


# ---------------------------------------------------------------------------------------------- weight headers
def read_headers(model: ModelFiles) -> None:
    """Fill ``files``, ``index`` and ``headers`` from the index and each shard's header (no tensor data is read; one
    shard is open at a time)."""
    index_file, single = model.path / _INDEX, model.path / _SINGLE
    if index_file.is_file():
        try:
            model.index = {str(k): str(v) for k, v in json.loads(index_file.read_text())["weight_map"].items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise HFModelError(f"{model.where}: {_INDEX} has no readable 'weight_map': {err}") from err
        model.files = {name: model.path / name for name in dict.fromkeys(model.index.values())}
        for name, file in model.files.items():
            if not file.is_file():
                raise HFModelError(f"{model.where}: {_INDEX} names the shard {name!r}, which is not there")
    elif single.is_file():
        model.files = {_SINGLE: single}
    else:
        pickled = [p.name for p in model.path.glob("*.bin")]
        raise HFModelError(f"{model.where}: no {_SINGLE} or {_INDEX}"
                           + (f" ({pickled} are pickled weights, not read: resave them as safetensors)" if pickled
                              else ""))
    model.headers = {}
    for name, file in model.files.items():
        try:
            with safe_open(str(file), framework="pt") as shard:
                for key in shard.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key in model.headers:
                        raise HFModelError(f"{model.where}: tensor {key!r} is in both {model.headers[key][2]!r} and "
                                           f"{name!r}")
                    piece = shard.get_slice(key)
                    model.headers[key] = (tuple(piece.get_shape()), piece.get_dtype(), name)
        except (SafetensorError, OSError) as err:
            raise HFModelError(f"{model.where}: the shard {name!r} has an unreadable safetensors header (truncated or "
                               f"corrupt?): {err}") from err


@dataclass(frozen=True)
class Layout:
    """The pretrained model's structure: the merged layers with their shapes, and every name a file may use."""

    shapes: dict[str, tuple[int, ...]]  # merged layer (canonical parameter name) -> shape
    names: dict[str, tuple[str, ...]]  # merged layer -> the names a file may store it under (itself first, then ties)
    known: frozenset[str]  # every state-dict name, tied or not (buffers are taken from θ0, never merged)


def layout_of(settings: Mapping[str, Any]) -> Layout:
    """`Layout` of the model ``settings`` describe, built on the meta device (no memory, nothing read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(settings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(raw.pop("model_type"), **raw))
    canonical: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.is_floating_point():
            names.setdefault(canonical.setdefault(id(param), name), []).append(name)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.is_floating_point()}
    return Layout(shapes, {n: tuple(names[n]) for n in shapes}, frozenset(model.state_dict()))


def weight_sources(model: ModelFiles, layout: Layout) -> dict[str, str]:
    """merged layer -> the key holding it in ``model``'s files; refuses a missing, extra, misshapen or non-float one."""
    assert model.headers is not None
    sources = {}
    for layer, shape in layout.shapes.items():
        key = next((n for n in layout.names[layer] if n in model.headers), None)
        if key is None:
            shard = (model.index or {}).get(layer)
            hint = f" (the index maps it to {shard!r}, which does not hold it)" if shard else ""
            raise HFModelError(f"{model.where}: tensor {layer!r} is missing from its weights{hint}, but the model the "
                               "pretrained config builds has it; different architecture?")
        have, dtype, shard = model.headers[key]
        if have != shape:
            raise HFModelError(f"{model.where}: tensor {key!r} (in {shard!r}) has shape {have} there but {shape} in "
                               "the pretrained model")
        if dtype not in _FLOAT_DTYPES:
            raise HFModelError(f"{model.where}: tensor {key!r} (in {shard!r}) is {dtype}, not floating point")
        sources[layer] = key
    for key, (_, _, shard) in model.headers.items():
        if key not in layout.known and not key.endswith("rotary_emb.inv_freq"):  # older releases saved that buffer
            raise HFModelError(f"{model.where}: tensor {key!r} (in {shard!r}) is not in the pretrained model; "
                               "different architecture?")
    return sources


# ---------------------------------------------------------------------------------------------- tokenizers
def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def vocabulary(model: ModelFiles) -> dict[str, int]:
    """token -> id of the directory's tokenizer (``AutoTokenizer``, local files only, no custom code)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model.path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as err:
        raise HFModelError(f"{model.where}: its tokenizer files cannot be read: {err}") from err
    return dict(tokenizer.get_vocab())


def check_tokenizers(models: Sequence[ModelFiles], vocab_size: Any) -> None:
    """Every directory with tokenizer files has the first one's vocabulary, and none is larger than ``vocab_size``."""
    first: tuple[ModelFiles, dict[str, int]] | None = None
    for model in models:
        if not has_tokenizer(model.path):
            continue
        vocab = vocabulary(model)
        top = max(vocab.values(), default=-1) + 1
        if isinstance(vocab_size, int) and max(len(vocab), top) > vocab_size:
            raise HFModelError(f"{model.where}: the tokenizer has {len(vocab)} tokens (ids up to {top - 1}) but the "
                               f"config's vocab_size is {vocab_size}")
        if first is None:
            first = model, vocab
            continue
        reference, ref_vocab = first
        if vocab != ref_vocab:
            changed = [t for t in sorted(ref_vocab, key=ref_vocab.__getitem__) if vocab.get(t) != ref_vocab[t]]
            token = (changed or [t for t in sorted(vocab, key=vocab.__getitem__) if t not in ref_vocab])[0]
            there, theirs = (f"id {v[token]}" if token in v else "absent" for v in (vocab, ref_vocab))
            raise HFModelError(
                f"{model.where}: its tokenizer's vocabulary ({len(vocab)} tokens) differs from that of "
                f"{reference.where} ({len(ref_vocab)} tokens), first at token {token!r} ({there} there, {theirs} "
                f"in {reference.label}); merged models must share one vocabulary")


def load_tokenizer(directories: str | os.PathLike | Sequence[str | os.PathLike]) -> Any:
    """The tokenizer (``AutoTokenizer``, local files only) of the first of ``directories`` that has tokenizer files, to
    be written beside an exported model; `HFModelError` naming the directories if none has one."""
    paths = [directories] if isinstance(directories, (str, os.PathLike)) else list(directories)
    for path in paths:
        if has_tokenizer(Path(path).expanduser()):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(Path(path).expanduser()), local_files_only=True,
                                                 trust_remote_code=False)
    raise HFModelError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in any of {[str(p) for p in paths]}")
