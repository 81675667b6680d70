"""What recording a user's own backbone costs, at ViT-B/32 size: how long `recognise` takes (it runs once, at the first
checkpoint save, or never if nothing is saved), what it records, and whether the module the record builds has the
same structure. Random weights throughout; nothing is downloaded.

Builders: open_clip by name (GELU, and QuickGELU as the "openai" weights load), a Hugging Face CLIPVisionModel
(ViT-B/32 config), timm by name, and a torchvision ViT with its head replaced (not recognised: loading its checkpoint
takes ``backbone=``). Each row is the median of ``--repeats`` runs, alone on the machine.

Run:  .venv/bin/python benchmarks/bench_own_models.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from paretomerge.kernels import ModuleSpec
from paretomerge.kernels.builders import recognise, structure_difference


def open_clip_tower(quick_gelu: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import open_clip

        return open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=quick_gelu).visual
    return build


def hf_clip_vision() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig())  # the default config is ViT-B/32's


def timm_vit() -> nn.Module:
    import timm

    return timm.create_model("vit_base_patch32_224", pretrained=False, num_classes=0)


def torchvision_vit() -> nn.Module:
    from torchvision.models import vit_b_32

    model = vit_b_32(weights=None)
    model.heads = nn.Identity()
    return model


BUILDERS = {
    "open_clip ViT-B-32 (GELU)": open_clip_tower(False),
    "open_clip ViT-B-32 (QuickGELU)": open_clip_tower(True),
    "HF CLIPVisionModel ViT-B/32": hf_clip_vision,
    "timm vit_base_patch32_224": timm_vit,
    "torchvision vit_b_32, heads=Identity": torchvision_vit,
}


def measure(build: Callable[[], nn.Module], repeats: int) -> tuple[float, ModuleSpec | None, str]:
    module = build()
    times, spec = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        spec = recognise(module)
        times.append(time.perf_counter() - start)
    if spec is None:
        check = "n/a (backbone= at load)"
    else:
        difference = structure_difference(module, ModuleSpec.from_dict(spec.to_dict()).build())
        check = "same structure" if difference is None else f"DIFFERS: {difference}"
    return statistics.median(times), spec, check


def describe(spec: ModuleSpec | None) -> str:
    if spec is None:
        return "not recognised"
    kwargs = {k: v for k, v in spec.kwargs.items() if k != "config"}
    return f"{spec.target} {kwargs}" + (" + config" if "config" in spec.kwargs else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}\n")
    print("| backbone | params (M) | recognise (s) | recorded as | rebuilt from the record |")
    print("| --- | --- | --- | --- | --- |")
    for name, build in BUILDERS.items():
        try:
            seconds, spec, check = measure(build, args.repeats)
        except ImportError as err:
            print(f"| {name} | | | skipped: {err} | |")
            continue
        params = sum(p.numel() for p in build().parameters()) / 1e6
        print(f"| {name} | {params:.1f} | {seconds:.2f} | {describe(spec)} | {check} |")


if __name__ == "__main__":
    main()
