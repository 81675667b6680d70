"""Building the TinySuite's models the way the task-vector papers build CLIP's.

1. **θ0 and its text tower** (`pretrain`): a tiny CLIP (`TinyCLIP`: an open_clip ``VisionTransformer`` image tower and
   a bag-of-words text tower) trained from scratch on generated image-caption pairs (`tiny_text.captions`), with CLIP's
   symmetric contrastive loss at CLIP's final temperature (logit scale 100) plus a captioning loss (CoCa's idea: the
   image embedding also predicts the words the caption uses for each factor it names).
2. **Zero-shot heads** from the text tower (`suites/zeroshot.py`, the same code as CLIPSuite's).
3. **θ_k** (`finetune`): the image tower fine-tuned on task k's dataset against its frozen zero-shot head, with AdamW
   and a one-cycle schedule (Ilharco et al.). The head never changes.

Why these choices, with the measurements behind them: docs/tiny-suite.md, and benchmarks/README.md ("suite_regime.py").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paretomerge.kernels import ModuleSpec
from paretomerge.progress import progress_bar
from paretomerge.suites.tiny_images import FACTORS, IMAGE_SIZE, render
from paretomerge.suites.tiny_text import WordTokenizer, captions

# The `Recipe` fields the pretrained tiny CLIP depends on (the rest only change the fine-tuning).
PRETRAINING_FIELDS = ("width", "layers", "heads", "patch_size", "embed_dim", "text_width", "context_length",
                      "pretrain_images", "pretrain_steps", "pretrain_lr", "pretrain_batch", "element_rate", "mention",
                      "caption_loss", "logit_scale")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the built weights; its JSON is part of the cache key."""

    # the towers
    width: int = 64
    layers: int = 4
    heads: int = 4
    patch_size: int = 8
    embed_dim: int = 64
    text_width: int = 64
    context_length: int = 24
    # contrastive pretraining on captioned images
    pretrain_images: int = 8192
    pretrain_steps: int = 900
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 128
    element_rate: float = 0.75  # the chance that a pretraining image shows each of the object, the digit, the dots
    # factor -> the chance that a caption names it, when it is visible (the object's shape often, its colour rarely)
    mention: dict[str, float] = field(default_factory=lambda: {
        "shape": 0.8, "colour": 0.3, "digit": 0.9, "position": 0.8, "stripes": 0.3, "size": 0.6, "count": 0.9,
        "background": 0.3})
    caption_loss: float = 1.0  # weight of the captioning loss beside the contrastive one
    logit_scale: float = 100.0  # CLIP's temperature, fixed at the value CLIP's learned one ends at
    # fine-tuning each task's image tower against its frozen head
    finetune_images: int = 2048
    finetune_steps: int = 150
    # Steps per task = finetune_steps × effort: the task-vector papers fine-tune each dataset for its own number of
    # epochs. Tasks not named get 1.0.
    finetune_effort: dict[str, float] = field(default_factory=lambda: {"digit": 1.5})
    finetune_lr: float = 4e-4
    finetune_weight_decay: float = 0.1
    batch_size: int = 64

    def backbone_spec(self) -> ModuleSpec:
        """The image tower alone, as `TaskVectors` rebuilds it (the same module as ``clip_spec().build().visual``)."""
        return ModuleSpec(
            "open_clip.transformer:VisionTransformer",
            {"image_size": IMAGE_SIZE, "patch_size": self.patch_size, "width": self.width, "layers": self.layers,
             "heads": self.heads, "mlp_ratio": 4.0, "output_dim": self.embed_dim},
        )

    def clip_spec(self) -> ModuleSpec:
        """The whole tiny CLIP, image and text towers."""
        return ModuleSpec(f"{__name__}:TinyCLIP", {
            "vision": dict(self.backbone_spec().kwargs), "vocab_size": self.tokenizer().vocab_size,
            "text_width": self.text_width, "embed_dim": self.embed_dim, "logit_scale": self.logit_scale})

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer(self.context_length)

    def to_dict(self) -> dict:
        return asdict(self)

    def finetune_steps_for(self, task: str) -> int:
        return max(1, round(self.finetune_steps * self.finetune_effort.get(task, 1.0)))


class BagOfWords(nn.Module):
    """A light text tower: the mean of the text's word embeddings (``<pad>``, ``<sot>`` and ``<eot>`` left out), layer
    normalised and projected to the joint space. On a CPU budget it aligns words with images where open_clip's text
    transformer of the same width did not (benchmarks/README.md, "suite_regime.py"); it ignores word order."""

    def __init__(self, vocab_size: int, width: int, embed_dim: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed_dim, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        words = (tokens > 0) & (tokens < self.token_embedding.num_embeddings - 2)
        mean = (self.token_embedding(tokens) * words[..., None]).sum(1) / words.sum(1, keepdim=True).clamp_min(1)
        return self.text_projection(self.ln_final(mean))


class TinyCLIP(nn.Module):
    """CLIP's interface (``visual``, ``encode_image``, ``encode_text``, ``logit_scale``, as open_clip's ``CLIP`` has it)
    with an open_clip ``VisionTransformer`` image tower and a `BagOfWords` text tower."""

    def __init__(self, vision: dict, vocab_size: int, text_width: int, embed_dim: int, logit_scale: float) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        self.visual = VisionTransformer(**vision)
        self.text = BagOfWords(vocab_size, text_width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)), requires_grad=False)

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features


def recipe_from(cls: type, overrides: Mapping[str, Any] | None, label: str = "recipe",
                tuples: tuple[str, ...] = ()) -> Any:
    """``cls()`` (an embedded suite's recipe dataclass) with ``overrides``, a dict of its fields: anything else, and
    unknown keys, are refused naming the known ones. Fields in ``tuples`` (lists in YAML) are stored as tuples. The
    values are the caller's to check (`check_positive`)."""
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ValueError(f"recipe must be a dict of {cls.__name__} fields, got {overrides!r}")
    known = {f.name for f in fields(cls)}
    bad = sorted(set(overrides or {}) - known)
    if bad:
        raise ValueError(f"unknown {label} key(s) {bad}; known: {sorted(known)}")
    return replace(cls(), **{k: tuple(v) if k in tuples else v for k, v in (overrides or {}).items()})


def check_positive(name: str, value: Any, kind: str) -> None:
    """Refuse a recipe value that is not a positive ``kind`` (``"int"`` or ``"float"``; a float field takes ints)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
            or (kind == "int" and not isinstance(value, int)):
        raise ValueError(f"recipe {name} must be a positive {kind}, got {value!r}")


def _batches(num_items: int, batch_size: int, steps: int, generator: torch.Generator):
    """Indices of ``steps`` shuffled mini-batches, reshuffling every pass."""
    order = torch.randperm(num_items, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > num_items:
            order, position = torch.randperm(num_items, generator=generator), 0
        yield order[position:position + batch_size]
        position += batch_size


def _train_one_cycle(optimizer: torch.optim.Optimizer, max_lr: float, steps: int, loss_of: Callable[[Tensor], Tensor],
                     num_items: int, batch_size: int, seed: int, desc: str, progress: bool) -> None:
    """``steps`` optimizer steps on shuffled mini-batches (``loss_of(indices)``), one-cycle learning rate."""
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    with progress_bar(total=steps, desc=desc, enabled=progress) as bar:
        for index in _batches(num_items, batch_size, steps, generator):
            loss = loss_of(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()


def pretraining_data(recipe: Recipe, seed: int) -> tuple[Tensor, list[str], Tensor]:
    """The pretraining images ``[N, 3, 32, 32]`` (every factor varies; each element shown with probability
    ``element_rate``), one generated caption each, and what each caption names ``[N, F]`` (`tiny_text.captions`)."""
    shown = np.random.default_rng([seed, 1]).random((recipe.pretrain_images, 3)) < recipe.element_rate
    rendered = render(recipe.pretrain_images, seed, elements=shown)
    texts, named = captions(rendered.factors, seed, recipe.mention, rendered.visible())
    return rendered.images, texts, named


def pretrain(recipe: Recipe, seed: int, progress: bool = True) -> TinyCLIP:
    """θ0 and its text tower: `TinyCLIP` trained on `pretraining_data` with CLIP's symmetric contrastive loss plus the
    captioning loss (a linear read-out of the image embedding predicts, for each factor a caption names, the class it
    names; it is dropped afterwards)."""
    images, texts, named = pretraining_data(recipe, seed)
    tokens = recipe.tokenizer()(texts)
    splits = [len(c) for c in FACTORS.values()]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = recipe.clip_spec().build()
        captioner = nn.Linear(recipe.embed_dim, sum(splits))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0},
                                   {"params": captioner.parameters(), "weight_decay": 0.0}], lr=recipe.pretrain_lr)
    model.train()
    scale = model.logit_scale.exp()

    def loss_of(index: Tensor) -> Tensor:
        features = model.encode_image(images[index])
        logits = scale * F.normalize(features, dim=-1) @ model.encode_text(tokens[index], normalize=True).T
        target = torch.arange(len(index))
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        said = named[index]
        caption = sum(F.cross_entropy(words, said[:, f], ignore_index=-1, reduction="sum")
                      for f, words in enumerate(captioner(features).split(splits, dim=1))) / len(index)
        return contrastive + recipe.caption_loss * caption

    _train_one_cycle(optimizer, recipe.pretrain_lr, recipe.pretrain_steps, loss_of, len(images),
                     recipe.pretrain_batch, seed, "pretraining the tiny CLIP (image-caption pairs)", progress)
    return model.eval().requires_grad_(False)


def finetune(recipe: Recipe, theta0: nn.Module, head: nn.Module, images: Tensor, labels: Tensor, steps: int, seed: int,
             desc: str, progress: bool = True) -> dict[str, Tensor]:
    """θ_k: a copy of the image tower ``theta0`` fine-tuned with cross-entropy against the frozen ``head`` (AdamW,
    one-cycle), as Ilharco et al. fine-tune CLIP. Neither ``theta0`` nor ``head`` is modified."""
    backbone = recipe.backbone_spec().build()
    backbone.load_state_dict(theta0.state_dict())
    backbone.train()
    head = head.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=recipe.finetune_lr,
                                  weight_decay=recipe.finetune_weight_decay)
    _train_one_cycle(optimizer, recipe.finetune_lr, steps,
                     lambda index: F.cross_entropy(head(backbone(images[index])), labels[index]),
                     len(images), recipe.batch_size, seed, desc, progress)
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def tau_norm_ratio(theta0: Mapping[str, Tensor], tau_k: Mapping[str, Tensor]) -> float:
    """‖τ_k‖ / ‖θ0‖ over all merged (floating-point) parameters."""
    tau_sq = sum(float(t.double().pow(2).sum()) for t in tau_k.values())
    theta_sq = sum(float(theta0[n].double().pow(2).sum()) for n in tau_k)
    return (tau_sq / theta_sq) ** 0.5
