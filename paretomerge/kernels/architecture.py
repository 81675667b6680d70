"""How to rebuild a backbone or a head in a fresh process, without pickle.

A `.ckpt` stores weights only (loaded with ``weights_only=True``), so the module *structure* has to be
described by data: ``ModuleSpec(target, kwargs, attr)`` means ``getattr(target(**kwargs), attr)``.

A spec read from a checkpoint is untrusted, so `build` only
- imports nothing new: the target's module must be already imported, or part of torch, open_clip or
  paretomerge (import your own module before loading a checkpoint that names a class of it);
- calls ``nn.Module`` subclasses, or ``open_clip.create_model`` with ``pretrained=None`` and a known model
  name (nothing it could download, unpickle or read from disk);
- refuses kwargs whose names suggest loading (``pretrained``, ``*path*``, ``cache_dir``, ``*weights*``...)
  unless they are None or False;
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

# Factories (not classes) that a spec may name, with the only kwargs they may get. Everything else must be
# an nn.Module subclass.
ALLOWED_FACTORIES = {
    "open_clip:create_model": frozenset({"model_name", "pretrained", "force_quick_gelu"}),
    "open_clip.factory:create_model": frozenset({"model_name", "pretrained", "force_quick_gelu"}),
}
TRUSTED_PACKAGES = frozenset({"torch", "open_clip", "paretomerge"})
# kwargs that could make a constructor read, fetch or unpickle something; refused unless None or False.
_LOADING_KWARG = re.compile(r"pretrain|path|file|url|cache|checkpoint|ckpt|weight|hub|download|jit|device", re.I)
_SPEC_ATTRIBUTE = "_paretomerge_spec"
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, _PLAIN):
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
        loading = sorted(k for k, v in self.kwargs.items() if _LOADING_KWARG.search(k) and v not in (None, False))
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
        import open_clip

        extra = set(self.kwargs) - ALLOWED_FACTORIES[self.target]
        if extra:
            raise ValueError(f"ModuleSpec {self.target!r}: kwargs {sorted(extra)} are not allowed")
        if self.kwargs.get("pretrained") is not None:
            raise ValueError(f"ModuleSpec {self.target!r}: pretrained must be None (weights come from the checkpoint)")
        if self.kwargs.get("model_name") not in open_clip.list_models():
            raise ValueError(f"ModuleSpec {self.target!r}: unknown open_clip model {self.kwargs.get('model_name')!r}")

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

    @classmethod
    def of(cls, module: nn.Module) -> ModuleSpec | None:
        """The spec a module was built from, or one inferred for plain ``nn.Linear`` heads; else None."""
        spec = getattr(module, _SPEC_ATTRIBUTE, None)
        if isinstance(spec, ModuleSpec):
            return spec
        if type(module) is nn.Linear:
            return cls(
                "torch.nn:Linear",
                {"in_features": module.in_features, "out_features": module.out_features,
                 "bias": module.bias is not None},
            )
        return None
