"""A CLIP image tower in open_clip's and in Hugging Face's terms: the names of its weights both ways (what the
importers read, `suites.importers`, and what ``paretomerge export --format hf`` writes, `modules.formats`), and the
configs each library rebuilds it from.

open_clip keeps q/k/v fused (``attn.in_proj_weight [3d, d]``) and its projection as ``proj [d, e]`` (``x @ proj``);
Hugging Face's ``CLIPVisionModel(WithProjection)`` splits q/k/v and stores the projection as a ``Linear`` (``[e, d]``).
A config is trusted only once what the library builds from it (on the meta device) has the tower's structure.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from paretomerge.kernels.builders import structure_difference

HF_PREFIXES = ("vision_model.", "visual_projection.")
# Hugging Face name (after ``vision_model.``) -> open_clip name, for everything but the fused attention and the
# projection. ``pre_layrnorm`` is Hugging Face's own spelling.
_HF_FIXED = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_HF_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_IGNORED = ("embeddings.position_ids",)  # a buffer of arange indices, not a weight
# A custom tower's config needs a text tower for open_clip to build a CLIP; the smallest it builds. The heads hold what
# the real text tower gave.
_PLACEHOLDER_TEXT = {"context_length": 1, "vocab_size": 1, "width": 8, "heads": 1, "layers": 1}
# the CLIPVisionCfg settings a Hugging Face CLIP vision tower has an equivalent for (patch dropout is off at inference)
_HF_SETTINGS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "patch_dropout"}


def hf_to_open_clip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face CLIP vision keys -> open_clip visual keys; q/k/v fused, ``visual_projection`` transposed."""
    out: dict[str, Tensor] = {}
    attention: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.startswith("visual_projection."):
            if key == "visual_projection.weight":
                out["proj"] = value.t().contiguous()  # HF Linear [out, in]; open_clip x @ proj, [in, out]
            continue
        if not key.startswith("vision_model."):
            continue  # the text tower of a CLIPModel
        name = key[len("vision_model."):]
        if name in _HF_IGNORED:
            continue
        if name in _HF_FIXED:
            out[_HF_FIXED[name]] = value
            continue
        match = _HF_LAYER_KEY.match(name)
        if match is None:
            raise KeyError(f"unknown Hugging Face CLIP vision key {key!r}")
        layer, module, kind = int(match.group(1)), match.group(2), match.group(3)
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            attention.setdefault((layer, kind), {})[module[-6]] = value
            continue
        if module not in _HF_LAYER:
            raise KeyError(f"unknown Hugging Face CLIP vision key {key!r}")
        out[f"transformer.resblocks.{layer}.{_HF_LAYER[module]}.{kind}"] = value
    for (layer, kind), parts in attention.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise KeyError(f"layer {layer} of the Hugging Face checkpoint lacks the {'/'.join(missing)} projection "
                           f"{kind}")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"transformer.resblocks.{layer}.attn.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def open_clip_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `hf_to_open_clip`: open_clip visual keys -> ``CLIPVisionModelWithProjection`` keys."""
    fixed = {v: k for k, v in _HF_FIXED.items()}
    layer_names = {v: k for k, v in _HF_LAYER.items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key in fixed:
            out[f"vision_model.{fixed[key]}"] = value
        else:
            match = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", key)
            if match is None:
                raise KeyError(f"unknown open_clip visual key {key!r}")
            layer, rest = match.group(1), match.group(2)
            prefix = f"vision_model.encoder.layers.{layer}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                for part, chunk in zip("qkv", value.chunk(3), strict=True):
                    out[f"{prefix}self_attn.{part}_proj.{kind}"] = chunk.contiguous()
                continue
            module, kind = rest.rsplit(".", 1)
            if module not in layer_names:
                raise KeyError(f"unknown open_clip visual key {key!r}")
            out[f"{prefix}{layer_names[module]}.{kind}"] = value
    return out


# ---------------------------------------------------------------------------------------------- configs
def open_clip_config(tower: nn.Module) -> tuple[str | None, dict[str, Any]]:
    """(a built-in open_clip model with this tower, or None; the model config) of an open_clip VisionTransformer,
    refused unless ``open_clip.CLIP(**config).visual`` has the tower's structure."""
    import open_clip
    from open_clip.transformer import LayerScale, PatchDropout, QuickGELU

    blocks = tower.transformer.resblocks
    width, heads = tower.conv1.out_channels, getattr(blocks[0].attn, "num_heads", None)
    (image_h, image_w), (patch_h, patch_w) = tower.image_size, tower.patch_size
    if heads is None or width % heads or patch_h != patch_w or getattr(tower, "proj", None) is None:
        raise ValueError("its open_clip VisionTransformer is not one an open_clip model config describes (custom "
                         "attention, a non-square patch or no projection)")
    vision: dict[str, Any] = {
        "image_size": image_h if image_h == image_w else [image_h, image_w], "patch_size": patch_h, "width": width,
        "layers": len(blocks), "head_width": width // heads, "mlp_ratio": blocks[0].mlp.c_fc.out_features / width}
    if isinstance(tower.ln_pre, nn.Identity):
        vision["no_ln_pre"] = True
    if tower.pool_type != "tok":
        vision["pool_type"] = tower.pool_type
    if tower.final_ln_after_pool:
        vision["final_ln_after_pool"] = True
    if isinstance(getattr(blocks[0], "ls_1", None), LayerScale):
        vision["ls_init_value"] = 1e-5  # only initialises γ, which the weights replace
    if isinstance(tower.patch_dropout, PatchDropout):
        vision["patch_dropout"] = tower.patch_dropout.prob
    quick_gelu = any(isinstance(m, QuickGELU) for m in tower.modules())
    name = _builtin_name(tower.output_dim, vision, quick_gelu)
    config = {"embed_dim": tower.output_dim, "quick_gelu": quick_gelu, "vision_cfg": vision,
              "text_cfg": dict(_PLACEHOLDER_TEXT)}
    if name is not None:
        config = {**open_clip.get_model_config(name), "quick_gelu": quick_gelu}
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            built = open_clip.CLIP(**config).visual
    except (AssertionError, RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"open_clip cannot build its VisionTransformer from the config it gives ({err})") from err
    difference = structure_difference(tower, built)
    if difference is not None:
        raise ValueError(f"open_clip would build its VisionTransformer otherwise from the config it gives "
                         f"({difference})")
    return name, config


def _builtin_name(embed_dim: int, vision: Mapping[str, Any], quick_gelu: bool) -> str | None:
    """The open_clip model whose CLIP config has this image tower (a plain text tower), its activation's own
    variant first; None if none has."""
    import open_clip
    from open_clip.model import CLIPVisionCfg

    found = []
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name) or {}
        if config.get("embed_dim") != embed_dim or config.get("custom_text") or "multimodal_cfg" in config \
                or "hf_model_name" in config.get("text_cfg", {}) or (config.get("quick_gelu") and not quick_gelu):
            continue
        try:
            if CLIPVisionCfg(**config["vision_cfg"]) == CLIPVisionCfg(**vision):
                found.append((bool(config.get("quick_gelu")) != quick_gelu, len(name), name))
        except (TypeError, KeyError):
            continue
    return min(found)[2] if found else None


def hf_vision_settings(config: Mapping[str, Any], tower: nn.Module) -> dict[str, Any]:
    """The ``CLIPVisionConfig`` settings of the open_clip tower ``config`` describes; refused where Hugging Face's CLIP
    vision tower has no equivalent."""
    from open_clip.model import CLIPVisionCfg

    vision, default = dataclasses.asdict(CLIPVisionCfg(**config["vision_cfg"])), dataclasses.asdict(CLIPVisionCfg())
    extra = {k: v for k, v in vision.items() if k not in _HF_SETTINGS and v != default[k]}
    if extra or not isinstance(vision["image_size"], int) or not isinstance(vision["layers"], int):
        shown = extra or {k: vision[k] for k in ("image_size", "layers")}
        raise ValueError(f"a Hugging Face CLIPVisionModel has no equivalent of its open_clip settings {shown}")
    width = vision["width"]
    return {"hidden_size": width, "intermediate_size": int(width * vision["mlp_ratio"]),
            "num_hidden_layers": vision["layers"], "num_attention_heads": width // vision["head_width"],
            "image_size": vision["image_size"], "patch_size": vision["patch_size"], "num_channels": 3,
            "projection_dim": config["embed_dim"], "hidden_act": "quick_gelu" if config.get("quick_gelu") else "gelu",
            "layer_norm_eps": tower.ln_post.eps}


def hf_vision_model(settings: Mapping[str, Any], state: Mapping[str, Tensor]) -> nn.Module:
    """A ``CLIPVisionModelWithProjection`` holding ``state`` (open_clip keys), built without initialising weights."""
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    except ImportError as err:
        raise ValueError("--format hf needs transformers: pip install 'paretomerge[hf]'") from err
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**settings))
    model.load_state_dict(open_clip_to_hf(state), strict=True, assign=True)  # names the first key that differs
    embeddings = model.vision_model.embeddings
    if getattr(embeddings, "position_ids", torch.empty(0)).is_meta:  # an index buffer: never saved, kept real
        embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
    return model.eval()
