"""How to rebuild a backbone or a head in a fresh process, without pickle.

A `.ckpt` stores weights only (loaded with ``weights_only=True``), so the module *structure* has to be
described by data: ``ModuleSpec(target, kwargs, attr)`` means ``getattr(target(**kwargs), attr)``.

A spec read from a checkpoint is untrusted, so `build` only
- imports nothing new: the target's module must be already imported, or part of torch, open_clip, timm or
  paretomerge (import your own module before loading a checkpoint that names a class of it; paretomerge's Hugging
  Face builder imports transformers);
- calls ``nn.Module`` subclasses, or one of `ALLOWED_FACTORIES`: ``open_clip.create_model`` and ``timm.create_model``
  with no pretrained weights and a known model name (nothing they could download, unpickle or read from disk), and
  paretomerge's own builders (`paretomerge.kernels.builders`: an ``nn.Sequential`` of specs, a Hugging Face
  ``CLIPVisionModel`` or causal LM from its config, the latter checked by `check_hf_causal_lm`);
- refuses kwargs whose names suggest loading (``pretrained``, ``*path*``, ``cache_dir``, ``*weights*``...), at any
  depth of nested dicts (there also ``*model_name``, such as open_clip's ``hf_model_name``), unless None or False;
- passes plain JSON-like kwargs.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn


def _check_open_clip(kwargs: Mapping[str, Any]) -> str | None:
    import open_clip

    if kwargs.get("pretrained") is not None:
        return "pretrained must be None (weights come from the checkpoint)"
    if kwargs.get("model_name") not in open_clip.list_models():
        return f"unknown open_clip model {kwargs.get('model_name')!r}"
    if (open_clip.get_model_config(kwargs["model_name"]) or {}).get("text_cfg", {}).get("hf_model_name"):
        return "its text tower is a Hugging Face model whose config is fetched from the hub; refused"
    return None


def _check_timm(kwargs: Mapping[str, Any]) -> str | None:
    import timm

    if kwargs.get("pretrained") not in (None, False):
        return "pretrained must be False (weights come from the checkpoint)"
    if kwargs.get("model_name") not in timm.list_models():  # no "hf-hub:" names: nothing to fetch
        return f"unknown timm model {kwargs.get('model_name')!r}"
    return None


# Settings of a Hugging Face config that name a file, a hub repository or code to fetch, or an attention kernel (a
# kernel name there makes transformers fetch code from the hub).
_HF_REFUSED_KEYS = frozenset({"auto_map", "_name_or_path", "name_or_path", "trust_remote_code"})
# Causal-LM settings whose names match `_NESTED_LOADING_KEY` but read nothing: the generation-time KV cache
# (``use_cache``, Gemma's ``cache_implementation``) and Llama's pretraining tensor-parallel slicing
# (``pretraining_tp``).
_HF_HARMLESS_KEYS = frozenset({"use_cache", "cache_implementation", "pretraining_tp"})


def check_hf_causal_lm(kwargs: Mapping[str, Any]) -> str | None:
    """What is wrong with ``{"config": {...}}`` for ``builders.hf_causal_lm``, or None: the config must be a dict with a
    ``model_type`` transformers builds a causal LM for, and no key that could fetch files or code (`_HF_REFUSED_KEYS`,
    attention implementations, or names suggesting loading at any depth, as `_loading_keys` finds them)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = kwargs.get("config")
    if not isinstance(config, Mapping):
        return f"config must be a dict of a transformers config's settings, got {type(config).__name__}"
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"model_type {model_type!r} is not a causal language model transformers knows (no custom code is run)"
    refused = [k for k in config if k in _HF_REFUSED_KEYS or "attn_implementation" in k]
    refused += [k for k in _loading_keys(config, depth=1) if k.rsplit(".", 1)[-1] not in _HF_HARMLESS_KEYS]
    if refused:
        return (f"config keys {sorted(set(refused))} are refused: they could fetch files or code (paths, remote code, "
                "attention implementations)")
    return None


# Factories (not classes) that a spec may name: the only kwargs they may get, and a check of their values. Everything
# else must be an nn.Module subclass.
ALLOWED_FACTORIES = {
    "open_clip:create_model": (frozenset({"model_name", "pretrained", "force_quick_gelu"}), _check_open_clip),
    "open_clip.factory:create_model": (frozenset({"model_name", "pretrained", "force_quick_gelu"}), _check_open_clip),
    "timm:create_model": (frozenset({"model_name", "pretrained", "num_classes", "global_pool"}), _check_timm),
    "paretomerge.kernels.builders:sequential": (frozenset({"modules"}), None),
    "paretomerge.kernels.builders:hf_clip_vision_model": (frozenset({"config"}), None),
    "paretomerge.kernels.builders:hf_causal_lm": (frozenset({"config"}), check_hf_causal_lm),
    "paretomerge.kernels.builders:torchvision_resnet": (frozenset({"layers", "block", "num_classes"}), None),
}
TRUSTED_PACKAGES = frozenset({"torch", "open_clip", "timm", "paretomerge"})
# kwargs that could make a constructor read, fetch or unpickle something; refused unless None or False.
_LOADING_KWARG = re.compile(r"pretrain|path|file|url|cache|checkpoint|ckpt|weight|hub|download|jit|device", re.I)
# Nested deeper (open_clip's ``vision_cfg``/``text_cfg`` dicts), a model name is also something to fetch
# (``hf_model_name``, ``timm_model_name``).
_NESTED_LOADING_KEY = re.compile(_LOADING_KWARG.pattern + r"|model_name", re.I)
_SPEC_ATTRIBUTE = "_paretomerge_spec"


def _loading_keys(kwargs: Mapping[str, Any], where: str = "", depth: int = 0) -> list[str]:
    """Keys, at any depth of nested dicts and lists, whose names suggest loading and whose values are set."""
    found = []
    pattern = _LOADING_KWARG if depth == 0 else _NESTED_LOADING_KEY
    for key, value in kwargs.items():
        path = f"{where}{key}"
        if pattern.search(key) and value not in (None, False):
            found.append(path)
        for item in [value] if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ():
            if isinstance(item, Mapping):
                found.extend(_loading_keys(item, f"{path}.", depth + 1))
    return sorted(set(found))
PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"ModuleSpec kwargs: key {key!r} at {where} is not a string")
            _check_plain(item, f"{where}.{key}")
        return
    raise TypeError(
        f"ModuleSpec kwargs: {where} is a {type(value).__name__}; only str, int, float, bool, None, "
        "lists and dicts of those can be stored in a checkpoint"
    )


@dataclass(frozen=True)
class ModuleSpec:
    """``target`` is ``"package.module:QualName"``; ``attr`` an optional dotted attribute of the result."""

    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    attr: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or self.target.count(":") != 1:
            raise ValueError(f"ModuleSpec target must look like 'package.module:Name', got {self.target!r}")
        _check_plain(dict(self.kwargs), "kwargs")
        if self.attr is not None and not isinstance(self.attr, str):
            raise TypeError(f"ModuleSpec attr must be a string or None, got {self.attr!r}")

    def _resolve(self) -> Any:
        module_name, qualname = self.target.split(":")
        if module_name not in sys.modules and module_name.split(".")[0] not in TRUSTED_PACKAGES:
            raise ValueError(
                f"ModuleSpec target {self.target!r}: module {module_name!r} is not imported; import it yourself "
                "before building (a spec from a checkpoint may not import new code)"
            )
        try:
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"ModuleSpec target {self.target!r} cannot be imported: {err}") from err
        loading = _loading_keys(self.kwargs)
        if loading and self.target not in ALLOWED_FACTORIES:
            raise ValueError(f"ModuleSpec {self.target!r}: kwargs {loading} could load files or weights; refused")
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return obj
        if self.target not in ALLOWED_FACTORIES:
            raise ValueError(
                f"ModuleSpec target {self.target!r} is neither an nn.Module subclass nor an allowed factory "
                f"({sorted(ALLOWED_FACTORIES)}); refusing to call it"
            )
        self._check_factory_kwargs()
        return obj

    def _check_factory_kwargs(self) -> None:
        allowed, check = ALLOWED_FACTORIES[self.target]
        extra = set(self.kwargs) - allowed
        if extra:
            raise ValueError(f"ModuleSpec {self.target!r}: kwargs {sorted(extra)} are not allowed")
        problem = check(self.kwargs) if check is not None else None
        if problem:
            raise ValueError(f"ModuleSpec {self.target!r}: {problem}")

    def build(self) -> nn.Module:
        """Construct the module (random weights) and remember this spec on it."""
        module = self._resolve()(**dict(self.kwargs))
        for part in (self.attr or "").split(".") if self.attr else []:
            module = getattr(module, part)
        if not isinstance(module, nn.Module):
            raise TypeError(f"ModuleSpec {self.target!r} (attr {self.attr!r}) built a {type(module).__name__}")
        setattr(module, _SPEC_ATTRIBUTE, self)
        return module

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kwargs": dict(self.kwargs), "attr": self.attr}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModuleSpec:
        if not isinstance(data, Mapping) or "target" not in data:
            raise ValueError(f"not a ModuleSpec record: {data!r}")
        return cls(data["target"], dict(data.get("kwargs") or {}), data.get("attr"))


def recorded_spec(module: nn.Module) -> ModuleSpec | None:
    """The spec ``module`` was built from by `ModuleSpec.build`, if it was."""
    spec = getattr(module, _SPEC_ATTRIBUTE, None)
    return spec if isinstance(spec, ModuleSpec) else None
