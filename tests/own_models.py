"""Users' own models for the tests of issue 18: one per recognised builder and one that is not recognised, each
with random weights, built the same way in the test and in a fresh process (which needs them for ``backbone=``)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tests.synthetic import vit_spec


class ZeroShotLikeHead(nn.Module):
    """A head holding its class embeddings as a parameter, with no nn.Linear inside (not a recognised builder)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return 10.0 * nn.functional.normalize(features, dim=-1) @ nn.functional.normalize(self.weight, dim=-1).T


def open_clip_by_name() -> nn.Module:
    import open_clip

    return open_clip.create_model("ViT-S-32", pretrained=None).visual


def module_spec() -> nn.Module:
    return vit_spec().build()


def torch_nn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GELU(), nn.Flatten(), nn.LayerNorm(128), nn.Linear(128, 16))


def hf_clip_vision() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=16, patch_size=8))


def timm_by_name() -> nn.Module:
    import timm

    return timm.create_model("test_vit", pretrained=False, num_classes=0)


def unrecognised() -> nn.Module:
    """An open_clip VisionTransformer built directly, with settings no open_clip config has."""
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=4.0, output_dim=16)


# name -> (backbone builder, image size, feature width, whether the backbone is recorded by itself)
BUILDERS = {
    "open_clip_by_name": (open_clip_by_name, 224, 384, True),
    "module_spec": (module_spec, 16, 16, True),
    "torch_nn": (torch_nn, 16, 16, True),
    "hf_clip_vision": (hf_clip_vision, 16, 32, True),
    "timm_by_name": (timm_by_name, 160, 64, True),
    "unrecognised": (unrecognised, 16, 16, False),
}


def heads_for(name: str) -> dict[str, nn.Module]:
    """Task "a": an nn.Sequential head (recorded); task "b": a plain nn.Linear (recorded), or for the unrecognised
    case a head with no nn.Linear (not recorded)."""
    dim = BUILDERS[name][2]
    with torch.random.fork_rng():
        torch.manual_seed(1)
        head_a = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, 3))
        head_b = ZeroShotLikeHead(4, dim) if name == "unrecognised" else nn.Linear(dim, 4)
    return {"a": head_a, "b": head_b}


def problem(name: str, seed: int = 0) -> tuple[nn.Module, list[nn.Module], dict[str, nn.Module], int]:
    """(pretrained, two fine-tuned copies of it, heads, image size), all from ``seed``."""
    build, size, _, _ = BUILDERS[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pretrained = build()
        finetuned = []
        for k in range(2):
            model = copy.deepcopy(pretrained)
            generator = torch.Generator().manual_seed(seed + 10 + k)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * (p.abs().mean() + 1e-2) * torch.randn(p.shape, generator=generator))
            finetuned.append(model)
    return pretrained, finetuned, heads_for(name), size
