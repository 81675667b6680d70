"""Recognising how a module was built, so a `.ckpt` can rebuild it in a fresh process, and the factories a
`ModuleSpec` may name for modules whose constructors take more than plain arguments.

`recognise(module)` returns a `ModuleSpec` for
- a module built by `ModuleSpec.build` (the spec it was built from);
- a ``torch.nn`` module whose constructor arguments are its own attributes (``nn.Linear``, ``nn.LayerNorm``,
  ``nn.Conv2d``, activations, dropout...), and an ``nn.Sequential`` of recognised modules;
- an open_clip tower created by name (``open_clip.create_model(name).visual``, found among open_clip's configs);
- a Hugging Face ``CLIPVisionModel`` or causal LM (``LlamaForCausalLM``...; rebuilt from its config; needs
  ``transformers``);
- a timm model created by name (``timm.create_model(name, num_classes=...)``);
- a torchvision ``ResNet`` (any depth, ``fc`` a linear layer or an identity: `torchvision_resnet`).

Every guess is checked: the module the spec builds must have the same structure (`structure_difference`) as the
one it describes. Anything else gives None: training and ``at()`` do not need a spec, and loading the checkpoint
then takes the module itself (``load_from_checkpoint(path, backbone=..., heads={...})``).
"""

from __future__ import annotations

import inspect
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from paretomerge.kernels.architecture import PLAIN, ModuleSpec, check_hf_causal_lm, recorded_spec

_SKIPPED_ARGUMENTS = frozenset({"self", "device", "dtype"})
_MAX_OPEN_CLIP_CANDIDATES = 6


def class_name(module: nn.Module) -> str:
    """``package.module.QualName`` of a module's class (what a checkpoint records and compares)."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


# ---------------------------------------------------------------------------------------------- factories
def sequential(modules: Sequence[Sequence[Any]]) -> nn.Sequential:
    """``nn.Sequential`` of ``[[name, spec record], ...]``, each child built by `ModuleSpec.build` (with its checks)."""
    return nn.Sequential(OrderedDict((str(name), ModuleSpec.from_dict(record).build()) for name, record in modules))


def _hf_config_keys() -> set[str]:
    """The CLIPVisionConfig settings a spec may carry: its own fields, without a path or an attention implementation
    (a kernel name there makes transformers fetch code from the hub)."""
    from transformers import CLIPVisionConfig

    return {k for k in CLIPVisionConfig().to_dict() if k != "_name_or_path" and "attn_implementation" not in k}


def hf_clip_vision_model(config: Mapping[str, Any]) -> nn.Module:
    """A Hugging Face ``CLIPVisionModel`` with random weights, from its config's settings (nothing is read or
    fetched: keys other than `_hf_config_keys` are refused)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    refused = sorted(set(config) - _hf_config_keys())
    if refused:
        raise ValueError(f"hf_clip_vision_model: config keys {refused} are not CLIPVisionConfig settings it accepts "
                         "(paths and attention implementations are refused: they can fetch files or code)")
    return CLIPVisionModel(CLIPVisionConfig(**dict(config)))


def hf_causal_lm(config: Mapping[str, Any]) -> nn.Module:
    """A Hugging Face causal LM (``AutoModelForCausalLM.from_config``) with random weights, from its config's settings
    (``model_type`` plus the rest, as `hf_causal_lm_settings` records them). Nothing is read or fetched: a model type
    transformers does not know as a causal LM, and keys that could fetch files or code, are refused
    (`architecture.check_hf_causal_lm`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    problem = check_hf_causal_lm({"config": config})
    if problem:
        raise ValueError(f"hf_causal_lm: {problem}")
    settings = dict(config)
    model_type = settings.pop("model_type")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings))


def hf_causal_lm_settings(config: Any) -> dict[str, Any]:
    """What `hf_causal_lm` needs from a transformers config: its settings as JSON (plain values, string keys), without
    the provenance (``_name_or_path``, ``transformers_version``), private keys and attention implementations."""
    settings = json.loads(config.to_json_string(use_diff=False))
    return {k: v for k, v in settings.items()
            if not k.startswith("_") and k != "transformers_version" and "attn_implementation" not in k}


# ---------------------------------------------------------------------------------------------- structure
# Attributes that describe where weights came from or how images are preprocessed, not the architecture: a pretrained
# model sets them (Hugging Face's `name_or_path`, open_clip's `image_mean`/`image_std` for a pretrained tag).
_METADATA_ATTRIBUTES = frozenset({"training", "name_or_path", "image_mean", "image_std", "preprocess_cfg"})


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """A module's public attributes that describe its configuration: plain values, and functions/classes by name."""
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key in _METADATA_ATTRIBUTES:
            continue
        if isinstance(value, PLAIN) or (isinstance(value, tuple) and all(isinstance(v, PLAIN) for v in value)):
            out[key] = value
        elif inspect.isfunction(value) or inspect.isclass(value):
            out[key] = f"{value.__module__}.{value.__qualname__}"
    return out


def shape_difference(want: Mapping[str, Any], have: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first name whose shape differs between two name -> tensor (or shape) maps, as ``(name, wanted shape,
    shape had)``, a missing side being None; None if they have the same names and shapes."""
    def shape(value: Any) -> tuple[int, ...] | None:
        return None if value is None else tuple(value.shape if hasattr(value, "shape") else value)

    for name in dict.fromkeys([*want, *have]):
        wanted, had = shape(want.get(name)), shape(have.get(name))
        if wanted != had:
            return name, wanted, had
    return None


def structure_difference(expected: nn.Module, got: nn.Module) -> str | None:
    """The first way ``got`` differs from ``expected`` in structure (state-dict names and shapes, submodule classes,
    their plain attributes such as an activation's kind), or None if they are the same. Weights are not compared."""
    difference = shape_difference(expected.state_dict(), got.state_dict())
    if difference is not None:
        name, wanted, had = difference
        return f"{name!r} is {had} instead of {wanted}" if None not in (wanted, had) \
            else f"{name!r} is in only one of them"
    want_modules, have_modules = dict(expected.named_modules()), dict(got.named_modules())
    for name in dict.fromkeys([*want_modules, *have_modules]):
        where = f"submodule {name!r}" if name else "the module"
        if name not in have_modules or name not in want_modules:
            return f"{where} exists in only one of them"
        a, b = want_modules[name], have_modules[name]
        if type(a) is not type(b):
            return f"{where} is a {class_name(b)} instead of a {class_name(a)}"
        attrs_a, attrs_b = _plain_attributes(a), _plain_attributes(b)
        for key in dict.fromkeys([*attrs_a, *attrs_b]):
            if attrs_a.get(key, "<absent>") != attrs_b.get(key, "<absent>"):
                return f"{where} has {key}={attrs_b.get(key, '<absent>')!r} instead of {attrs_a.get(key, '<absent>')!r}"
    return None


_BUILD_ERRORS = (ImportError, OSError, TypeError, ValueError, RuntimeError, AttributeError, KeyError,
                 NotImplementedError)


def _verified(spec: ModuleSpec, module: nn.Module) -> ModuleSpec | None:
    """``spec`` if what it builds has ``module``'s structure; None if it does not, or cannot be built.

    The candidate is built on the meta device where its constructor allows (no memory, no initialisation), else on
    the CPU; either way the global random state is left as it was (a resumed run draws the same numbers)."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                built = spec.build()
        except _BUILD_ERRORS:
            try:
                built = spec.build()
            except _BUILD_ERRORS:
                return None
    return spec if structure_difference(module, built) is None else None


# ---------------------------------------------------------------------------------------------- recognisers
def _plain(value: Any) -> Any:
    """``value`` as a ModuleSpec kwarg (tuples become lists), or raise TypeError."""
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, PLAIN) for v in value):
        return list(value)
    raise TypeError(type(value).__name__)


def _torch_nn(module: nn.Module) -> ModuleSpec | None:
    """A torch.nn module rebuilt from the attributes named like its constructor's arguments (a tensor attribute
    standing for a boolean flag, such as ``bias``, becomes whether it is set)."""
    cls = type(module)
    if cls is nn.Sequential:
        return _sequential(module)
    if not cls.__module__.startswith("torch.nn.modules.") or getattr(nn, cls.__name__, None) is not cls:
        return None
    kwargs = {}
    for parameter in inspect.signature(cls.__init__).parameters.values():
        if parameter.name in _SKIPPED_ARGUMENTS or parameter.name.startswith("_") or parameter.kind in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if not hasattr(module, parameter.name):
            if parameter.default is inspect.Parameter.empty:
                return None
            continue  # the default; the structure check below catches a module built otherwise
        value = getattr(module, parameter.name)
        if isinstance(parameter.default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        try:
            kwargs[parameter.name] = _plain(value)
        except TypeError:
            if parameter.default is inspect.Parameter.empty:
                return None
    return _verified(ModuleSpec(f"torch.nn:{cls.__name__}", kwargs), module)


def _sequential(module: nn.Sequential) -> ModuleSpec | None:
    children = []
    for name, child in module.named_children():
        spec = recognise(child)
        if spec is None:
            return None
        children.append([name, spec.to_dict()])
    return ModuleSpec(f"{__name__}:sequential", {"modules": children})


def _open_clip(module: nn.Module) -> ModuleSpec | None:
    """An open_clip tower created by name: the configs whose vision settings match the module's are built (random
    weights, plain CLIP configs first, with ``force_quick_gelu`` where the module has QuickGELU and the config does not)
    and compared; the first with the same structure is recorded."""
    if not type(module).__module__.startswith("open_clip."):
        return None
    import open_clip

    def pair(value: Any) -> tuple[Any, Any]:
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    sizes = {key: pair(getattr(module, key, None)) for key in ("image_size", "patch_size")}
    tower = getattr(module, "transformer", None)
    shape = {key: getattr(tower, key, None) for key in ("width", "layers")}
    quick_gelu = any(type(m).__name__ == "QuickGELU" for m in module.modules())

    def matches(config: Mapping[str, Any]) -> bool:  # what the module tells about itself against a config
        vision = config.get("vision_cfg", {})
        return config.get("embed_dim") == getattr(module, "output_dim", None) \
            and all(seen == (None, None) or pair(vision.get(key)) == seen for key, seen in sizes.items()) \
            and all(seen is None or vision.get(key) == seen for key, seen in shape.items())

    configs = {name: open_clip.get_model_config(name) or {} for name in open_clip.list_models()}
    candidates = sorted((name for name, config in configs.items() if matches(config)),
                        key=lambda name: ("text_cfg" in configs[name] and "hf_model_name" in configs[name]["text_cfg"],
                                          "multimodal_cfg" in configs[name] or configs[name].get("custom_text", False),
                                          bool(configs[name].get("quick_gelu")) != quick_gelu))
    for name in candidates[:_MAX_OPEN_CLIP_CANDIDATES]:
        kwargs = {"model_name": name, "pretrained": None}
        if quick_gelu and not configs[name].get("quick_gelu"):
            kwargs["force_quick_gelu"] = True
        spec = _verified(ModuleSpec("open_clip:create_model", kwargs, attr="visual"), module)
        if spec is not None:
            return spec
    return None


def _hf_clip_vision(module: nn.Module) -> ModuleSpec | None:
    cls = type(module)
    if cls.__name__ != "CLIPVisionModel" or not cls.__module__.startswith("transformers."):
        return None
    config = json.loads(module.config.to_json_string(use_diff=True))  # JSON: plain, string keys
    allowed = _hf_config_keys()
    config = {k: v for k, v in config.items() if k in allowed}
    return _verified(ModuleSpec(f"{__name__}:hf_clip_vision_model", {"config": config}), module)


def _hf_causal_lm(module: nn.Module) -> ModuleSpec | None:
    """A transformers causal LM (the class ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` names for its model type), rebuilt
    from its config."""
    if not type(module).__module__.startswith("transformers."):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(getattr(module, "config", None), "model_type", None), ())
    if type(module).__name__ not in ((names,) if isinstance(names, str) else tuple(names)):
        return None
    spec = ModuleSpec(f"{__name__}:hf_causal_lm", {"config": hf_causal_lm_settings(module.config)})
    return _verified(spec, module)


def _timm(module: nn.Module) -> ModuleSpec | None:
    if not type(module).__module__.startswith("timm."):
        return None
    architecture = (getattr(module, "pretrained_cfg", None) or {}).get("architecture")
    if not isinstance(architecture, str):
        return None
    kwargs: dict[str, Any] = {"model_name": architecture, "pretrained": False}
    for key in ("num_classes", "global_pool"):
        value = getattr(module, key, None)
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            kwargs[key] = value
    return _verified(ModuleSpec("timm:create_model", kwargs), module)


RESNET_BLOCKS = ("basic", "bottleneck")


def torchvision_resnet(layers: Sequence[int], block: str = "basic", num_classes: int | None = None) -> nn.Module:
    """A torchvision ``ResNet`` with random weights: ``layers`` blocks per stage (ResNet-18 is ``[2, 2, 2, 2]`` with
    ``"basic"`` blocks); ``num_classes=None`` replaces ``fc`` by an identity, so the backbone gives its pooled features
    (the merged tasks' heads are their own linear layers)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    if block not in RESNET_BLOCKS:
        raise ValueError(f"torchvision_resnet: block must be one of {list(RESNET_BLOCKS)}, got {block!r}")
    if len(layers) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
        raise ValueError(f"torchvision_resnet: layers must be four positive ints, got {layers!r}")
    model = ResNet(BasicBlock if block == "basic" else Bottleneck, list(layers), num_classes=num_classes or 1000)
    if num_classes is None:
        model.fc = nn.Identity()
    return model


def _torchvision_resnet(module: nn.Module) -> ModuleSpec | None:
    if type(module).__module__ != "torchvision.models.resnet" or type(module).__name__ != "ResNet":
        return None
    first = module.layer1[0]
    block = "basic" if type(first).__name__ == "BasicBlock" else "bottleneck"
    layers = [len(getattr(module, f"layer{i}")) for i in range(1, 5)]
    classes = None if isinstance(module.fc, nn.Identity) else getattr(module.fc, "out_features", None)
    spec = ModuleSpec("paretomerge.kernels.builders:torchvision_resnet",
                      {"layers": layers, "block": block, "num_classes": classes})
    return _verified(spec, module)


_RECOGNISERS = (_torch_nn, _open_clip, _hf_clip_vision, _hf_causal_lm, _timm, _torchvision_resnet)


def recognise(module: nn.Module) -> ModuleSpec | None:
    """How to rebuild ``module`` (random weights, the same structure) in a fresh process, or None if it is not a
    recognised builder's (see the module docstring)."""
    spec = recorded_spec(module)
    if spec is not None and _verified(spec, module) is not None:  # unless the module was changed after building
        return spec
    for recogniser in _RECOGNISERS:
        spec = recogniser(module)
        if spec is not None:
            return spec
    return None
