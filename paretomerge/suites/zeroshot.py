"""Zero-shot classification heads from CLIP's text tower (SPEC §1).

For each class, the prompts ``template.format(name)`` of its task are encoded, each embedding is normalised, the
embeddings are averaged over the templates and normalised again; the rows ``[C, D]`` are scaled by
``logit_scale.exp()``. `ZeroShotHead` normalises the image features and applies them, so
``head(visual(x))`` are CLIP's zero-shot logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paretomerge.kernels import ModuleSpec
from paretomerge.progress import progress_bar

# Prompt templates per task, in the style of CLIP's prompt engineering: what the images are, in a few phrasings.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "SUN397": ("a photo of a {}.", "a photo of the {}.", "a photo of a place: {}."),
    "Cars": ("a photo of a {}.", "a photo of the {}, a type of car.", "a photo of my {}.", "a close-up photo of a {}.",
             "a photo of a {}, a car."),
    "RESISC45": ("satellite imagery of {}.", "aerial imagery of {}.", "a satellite photo of {}.",
                 "an aerial photo of {}.", "satellite imagery of the {}.", "an overhead photo of {}."),
    "EuroSAT": ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."),
    "SVHN": ('a photo of the number: "{}".', "a photo of the house number {}."),
    "GTSRB": ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
              'a close up photo of a "{}" traffic sign.'),
    "MNIST": ('a photo of the number: "{}".', "a handwritten digit {}."),
    "DTD": ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
            "a photo of a {} object.", "a close-up photo of a {} surface."),
}
# The twelve tasks TALL-masks adds take TALL-masks' templates (its src/datasets/templates.py; for most tasks those are
# CLIP's, from openai/CLIP's data/prompts.md), the ones its fine-tuned checkpoints' heads were built with. open_clip
# ships templates for ImageNet only.
_CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
    "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
    "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)
TEMPLATES |= {
    "STL10": ("a photo of a {}.", "a photo of the {}."),
    "OxfordIIITPet": ("a photo of a {}, a type of pet.",),
    "Flowers102": ("a photo of a {}, a type of flower.",),
    "CIFAR100": _CIFAR_TEMPLATES,
    "PCAM": ("this is a photo of {}",),
    "FER2013": ("a photo of a {} looking face.", "a photo of a face showing the emotion: {}.",
                "a photo of a face looking {}.", "a face that looks {}.", "they look {}.", "look at how {} they are."),
    "CIFAR10": _CIFAR_TEMPLATES,
    "Food101": ("a photo of {}, a type of food.",),
    "FashionMNIST": ("a photo of a {}.", "a photo of the {}."),
    "RenderedSST2": ("a {} review of a movie.",),
    "EMNIST": ('a photo of the digit character: "{}".',),
    "KMNIST": ("a photo of the character {}.",),
}


class ZeroShotHead(nn.Module):
    """``logits = classifier(normalise(features))``; ``classifier.weight`` is ``[C, D]`` (already scaled)."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(F.normalize(features, dim=-1))


@torch.no_grad()
def class_embeddings(clip_model: nn.Module, tokenizer: Callable[[list[str]], Tensor], class_names: Sequence[str],
                     templates: Sequence[str], batch_size: int = 256, progress: bool = False,
                     description: str = "zero-shot head") -> Tensor:
    """``[C, D]``: per class, the normalised mean of the normalised prompt embeddings, times ``logit_scale.exp()``."""
    if not class_names or not templates:
        raise ValueError("a zero-shot head needs at least one class name and one template")
    prompts = [template.format(name) for name in class_names for template in templates]
    device = next(clip_model.parameters()).device
    chunks = []
    for start in progress_bar(range(0, len(prompts), batch_size), desc=description, enabled=progress):
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        chunks.append(F.normalize(clip_model.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(chunks).reshape(len(class_names), len(templates), -1)
    weights = F.normalize(per_prompt.mean(dim=1), dim=-1)
    return (clip_model.logit_scale.exp().float() * weights).cpu()


def zero_shot_head(weights: Tensor) -> ZeroShotHead:
    """A `ZeroShotHead` holding ``weights`` ``[C, D]``, built through a `ModuleSpec` so a checkpoint can rebuild it."""
    spec = ModuleSpec(f"{__name__}:ZeroShotHead", {"embed_dim": int(weights.shape[1]),
                                                    "num_classes": int(weights.shape[0])})
    head = spec.build()
    with torch.no_grad():
        head.classifier.weight.copy_(weights)
    return head
