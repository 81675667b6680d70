"""Hugging Face causal-LM directories (``save_pretrained``'s layout) as `TaskVectors`, streamed shard by shard.

The whole model is the backbone and is merged, embeddings and ``lm_head`` included; every task's head is
``nn.Identity()`` (the backbone's ``CausalLMOutput``, whose ``.logits`` the project reads, is every task's output).
Tied weights (``tie_word_embeddings``) are one layer.

Everything is checked before any fine-tuned weight is read and before τ is allocated, from ``config.json``, the
safetensors headers and the tokenizers alone (`hf_files`; `HFModelError` names the directory and the field, file or
key).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from paretomerge.kernels import ModuleSpec, TaskVectors
from paretomerge.kernels.builders import hf_causal_lm_settings
from paretomerge.kernels.task_vectors import check_task_names
from paretomerge.progress import progress_bar
from paretomerge.suites.hf_files import (
    HFModelError,
    Layout,
    ModelFiles,
    check_tokenizers,
    compare_configs,
    config_settings,
    layout_of,
    load_tokenizer,
    read_config,
    read_headers,
    weight_sources,
)

__all__ = ["HFModelError", "causal_lm_task_vectors", "load_tokenizer", "memory_plan"]


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class _Plan:
    """What the checks found: the directories, the pretrained model's layout, and per fine-tune, merged layer -> the
    key holding it in that directory's files."""

    pretrained: ModelFiles
    layout: Layout
    finetuned: list[ModelFiles] = field(default_factory=list)
    sources: list[dict[str, str]] = field(default_factory=list)


def _inspect_pretrained(pretrained: str | os.PathLike) -> tuple[_Plan, dict[str, Any]]:
    """The pretrained directory, checked (its files hold every weight), and its config as transformers reads it."""
    base = read_config(pretrained, "the pretrained model")
    settings = config_settings(base)
    plan = _Plan(base, layout_of(settings))
    read_headers(base)
    weight_sources(base, plan.layout)
    return plan, settings


def _checked(pretrained: str | os.PathLike, finetuned: Sequence[str | os.PathLike],
             task_names: Sequence[str]) -> _Plan:
    """Every check, from configs, safetensors headers and tokenizer vocabularies alone (no weight is read): all
    configs first, then the headers, then the tokenizers."""
    plan, settings = _inspect_pretrained(pretrained)
    plan.finetuned = [read_config(path, f"task {task!r}") for task, path in zip(task_names, finetuned, strict=True)]
    for model in plan.finetuned:
        compare_configs(model, plan.pretrained, settings)
    for model in plan.finetuned:
        read_headers(model)
        plan.sources.append(weight_sources(model, plan.layout))
    check_tokenizers([plan.pretrained, *plan.finetuned], settings.get("vocab_size"))
    return plan


def _load_pretrained(path: Path, dtype: torch.dtype, progress: bool) -> nn.Module:
    """θ0: ``AutoModelForCausalLM.from_pretrained`` in ``dtype`` from local files, no custom code, frozen."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                     trust_remote_code=False, use_safetensors=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return model.eval().requires_grad_(False)


def _fill(tau: dict[str, Tensor], k: int, model: ModelFiles, sources: Mapping[str, str], theta0: Mapping[str, Tensor]
          ) -> None:
    """Row ``k`` of every stack: ``τ[layer][k] = θ_k − θ0``, read shard by shard, tensor by tensor (one shard open)."""
    assert model.files is not None and model.headers is not None
    by_shard: dict[str, dict[str, str]] = {}
    for layer, key in sources.items():
        by_shard.setdefault(model.headers[key][2], {})[key] = layer
    for shard_name, keys in by_shard.items():
        with safe_open(str(model.files[shard_name]), framework="pt") as shard:
            for key, layer in keys.items():
                value = shard.get_tensor(key).to(theta0[layer].dtype)
                # A sum is non-finite iff an entry is (or it overflows: then the slower exact test decides).
                if not torch.isfinite(value.sum(dtype=torch.float32)) and not bool(torch.isfinite(value).all()):
                    raise HFModelError(f"{model.where}: tensor {key!r} (in {shard_name!r}) contains NaN or inf")
                torch.sub(value, theta0[layer], out=tau[layer][k])  # in θ0's dtype, stored in τ's


def _float_dtype(value: torch.dtype | None, name: str, default: torch.dtype) -> torch.dtype:
    if value is None:
        return default
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{name} must be a floating-point torch.dtype (torch.float32, torch.bfloat16...), "
                         f"got {value!r}")
    return value


def causal_lm_task_vectors(pretrained: str | os.PathLike, finetuned: Sequence[str | os.PathLike],
                           task_names: Sequence[str], *, dtype: torch.dtype | None = None,
                           tau_dtype: torch.dtype | None = None, progress: bool = True) -> TaskVectors:
    """`TaskVectors` of a pretrained causal LM directory (θ0, in ``dtype``: float32 unless given) and one fine-tuned
    directory per task: τ ``[K, *shape]`` in ``tau_dtype`` (θ0's unless given; ``torch.bfloat16`` halves it) for every
    floating-point parameter, tied ones once; heads ``nn.Identity()``.

    All checks come first, from config.json and the safetensors headers (`HFModelError`): configs agree on every
    field that changes the computation (all but `IGNORED_CONFIG_FIELDS` and dropout rates), every tensor is there with
    θ0's shape and a float dtype, nothing extra, and the tokenizers of the directories that have tokenizer files
    share one vocabulary no larger than ``vocab_size`` (a directory without tokenizer files is not compared). Then θ0
    is loaded and the fine-tunes are streamed: one shard of one fine-tune open at a time, so the peak is θ0, the K
    stacks and one shard (`memory_plan`)."""
    names = check_task_names(task_names)
    if isinstance(finetuned, (str, os.PathLike)) or not isinstance(finetuned, Sequence):
        raise TypeError("finetuned must be a sequence of directories, one per task")
    if len(finetuned) != len(names):
        raise ValueError(f"got {len(finetuned)} fine-tuned directories for {len(names)} task names")
    dtype = _float_dtype(dtype, "dtype", torch.float32)
    tau_dtype = _float_dtype(tau_dtype, "tau_dtype", dtype)
    plan = _checked(pretrained, finetuned, names)
    backbone = _load_pretrained(plan.pretrained.path, dtype, progress)
    theta0 = {n: p for n, p in backbone.named_parameters() if p.is_floating_point()}  # the layout's layers
    tau = {n: torch.empty((len(names), *p.shape), dtype=tau_dtype) for n, p in theta0.items()}
    bar = progress_bar(total=len(names), desc="loading fine-tuned models", enabled=progress)
    try:
        with torch.no_grad():
            for k, (model, sources) in enumerate(zip(plan.finetuned, plan.sources, strict=True)):
                bar.set_postfix_str(names[k])
                _fill(tau, k, model, sources, theta0)
                bar.update()
    finally:
        bar.close()
    spec = ModuleSpec("paretomerge.kernels.builders:hf_causal_lm", {"config": hf_causal_lm_settings(backbone.config)})
    return TaskVectors(backbone, tau, {t: nn.Identity() for t in names}, names, backbone_spec=spec)


def memory_plan(pretrained: str | os.PathLike, num_tasks: int, dtype: torch.dtype | None = None,
                tau_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes `causal_lm_task_vectors` will hold, from the pretrained directory's config and headers (no weight is
    read): ``theta0_bytes`` (parameters in ``dtype``), ``tau_bytes`` (K stacks in ``tau_dtype``),
    ``largest_shard_bytes`` (the largest pretrained weights file: one fine-tune shard is open at a time) and
    ``total_bytes``, their sum."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    dtype = _float_dtype(dtype, "dtype", torch.float32)
    tau_dtype = _float_dtype(tau_dtype, "tau_dtype", dtype)
    plan, _ = _inspect_pretrained(pretrained)
    numel = sum(torch.Size(shape).numel() for shape in plan.layout.shapes.values())
    assert plan.pretrained.files is not None
    sizes = {"theta0_bytes": numel * dtype.itemsize, "tau_bytes": num_tasks * numel * tau_dtype.itemsize,
             "largest_shard_bytes": max(file.stat().st_size for file in plan.pretrained.files.values())}
    return {**sizes, "total_bytes": sum(sizes.values())}
