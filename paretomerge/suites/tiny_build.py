"""Building the TinySuite's models: a pretext-trained θ0, one fine-tuned θ_k and linear head per task.

θ0 is a small open_clip ``VisionTransformer`` trained on a pretext that is none of the tasks (the rotation
applied to the image, what each quadrant holds, coarse binary attributes such as digit parity, and the
image's coarse luminance and colours): it learns the visual primitives, not the classes. Each task then gets
a linear probe on θ0's features and a short one-cycle fine-tune of backbone and head, so τ_k stays a small
move from θ0 (‖τ_k‖/‖θ0‖ ≈ 3–12% on the default suite). Why these choices: README, "The embedded suite".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from paretomerge.kernels import ModuleSpec
from paretomerge.suites.tiny_images import COARSE, IMAGE_SIZE, render


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the built weights; its JSON is part of the cache key."""

    width: int = 64
    layers: int = 4
    heads: int = 4
    patch_size: int = 8
    output_dim: int = 64
    pretext_images: int = 8192
    pretext_steps: int = 600
    pretext_lr: float = 2e-3
    finetune_images: int = 2048
    finetune_steps: int = 300
    # Steps per task = finetune_steps × effort: easy factors converge sooner, as the task-vector papers
    # fine-tune each dataset for its own number of epochs. Tasks not named get 1.0.
    finetune_effort: dict[str, float] = field(default_factory=lambda: {
        "shape": 1.5, "digit": 1.75, "colour": 0.75, "position": 0.5, "stripes": 0.75, "size": 1.0, "count": 1.0,
        "background": 0.5})
    finetune_lr: float = 1e-3
    probe_steps: int = 300
    probe_lr: float = 1e-2
    head_lr: float = 1e-3
    batch_size: int = 64

    def backbone_spec(self) -> ModuleSpec:
        return ModuleSpec(
            "open_clip.transformer:VisionTransformer",
            {"image_size": IMAGE_SIZE, "patch_size": self.patch_size, "width": self.width, "layers": self.layers,
             "heads": self.heads, "mlp_ratio": 4.0, "output_dim": self.output_dim},
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def finetune_steps_for(self, task: str) -> int:
        return max(1, round(self.finetune_steps * self.finetune_effort.get(task, 1.0)))


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _batches(num_items: int, batch_size: int, steps: int, generator: torch.Generator):
    """Indices of ``steps`` shuffled mini-batches, reshuffling every pass."""
    order = torch.randperm(num_items, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > num_items:
            order, position = torch.randperm(num_items, generator=generator), 0
        yield order[position:position + batch_size]
        position += batch_size


def _pretext_data(num_images: int, seed: int) -> tuple[Tensor, Tensor]:
    """Pretext images, each rotated by a random multiple of 90°, and their targets ``[N, 1 + 4 + 7 + 304]``:
    the rotation, what each quadrant holds (object, digit, dots or nothing), the coarse binary attributes
    (``COARSE``: digit parity, warm or cool colour, ...), the 16×16 luminance, and the mean colour of each 8×8
    cell. None of them is a task's label."""
    rendered = render(num_images, seed)
    turns = torch.from_numpy(np.random.default_rng(seed).integers(0, 4, num_images))
    images, layout = rendered.images.clone(), rendered.layout.view(-1, 2, 2).clone()
    for k in range(1, 4):
        rows = turns == k
        images[rows] = torch.rot90(images[rows], k, dims=(-2, -1))
        layout[rows] = torch.rot90(layout[rows], k, dims=(-2, -1))
    luminance = nn.functional.avg_pool2d(images.mean(1, keepdim=True), 2).flatten(1)
    colours = nn.functional.avg_pool2d(images, 8).flatten(1)
    coarse = torch.stack([torch.tensor(groups)[rendered.factors[name]] for name, groups in COARSE.items()], dim=1)
    targets = torch.cat([turns[:, None].float(), layout.flatten(1).float(), coarse.float(), luminance, colours], dim=1)
    return images, targets


def _pretext_loss(out: Tensor, targets: Tensor) -> Tensor:
    """``out [N, 4 + 16 + 7 + 304]`` against ``targets [N, 1 + 4 + 7 + 304]`` (see ``_pretext_data``)."""
    rotation = nn.functional.cross_entropy(out[:, :4], targets[:, 0].long())
    layout = nn.functional.cross_entropy(out[:, 4:20].reshape(-1, 4), targets[:, 1:5].long().reshape(-1))
    coarse = nn.functional.binary_cross_entropy_with_logits(out[:, 20:27], targets[:, 5:12])
    return rotation + layout + coarse + nn.functional.mse_loss(out[:, 27:], targets[:, 12:])


def pretrain(recipe: Recipe, seed: int, progress: bool = True) -> nn.Module:
    """θ0: the backbone trained on the pretext (``_pretext_data``) over fresh images."""
    data, targets = _pretext_data(recipe.pretext_images, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = recipe.backbone_spec().build()
        decoder = nn.Linear(recipe.output_dim, 4 + 16 + targets.shape[1] - 5)
    params = list(backbone.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.pretext_lr, weight_decay=0.05)
    backbone.train()
    _train_one_cycle(optimizer, [recipe.pretext_lr], recipe.pretext_steps,
                     lambda index: _pretext_loss(decoder(backbone(data[index])), targets[index]),
                     len(data), recipe.batch_size, seed, "pretraining θ0 (pretext)", progress)
    return backbone.eval()


def _train_one_cycle(optimizer: torch.optim.Optimizer, max_lrs: list[float], steps: int,
                     loss_of: Callable[[Tensor], Tensor], num_items: int, batch_size: int, seed: int, desc: str,
                     progress: bool) -> None:
    """``steps`` optimizer steps on shuffled mini-batches (``loss_of(indices)``), one-cycle learning rates."""
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lrs, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    with _progress(steps, desc, progress) as bar:
        for index in _batches(num_items, batch_size, steps, generator):
            loss = loss_of(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()


def _features(backbone: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    with torch.no_grad():
        return torch.cat([backbone(chunk) for chunk in images.split(batch_size)])


def finetune(
    recipe: Recipe,
    theta0: nn.Module,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    steps: int,
    seed: int,
    desc: str,
    progress: bool = True,
) -> tuple[dict[str, Tensor], nn.Linear]:
    """θ_k and its head: a linear probe on θ0's features, then backbone and head fine-tuned together."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = nn.Linear(recipe.output_dim, num_classes)
    features = _features(theta0.eval(), images)
    probe = torch.optim.Adam(head.parameters(), lr=recipe.probe_lr)
    for _ in range(recipe.probe_steps):  # full batch on cached features: cheap
        loss = nn.functional.cross_entropy(head(features), labels)
        probe.zero_grad(set_to_none=True)
        loss.backward()
        probe.step()

    backbone = recipe.backbone_spec().build()
    backbone.load_state_dict(theta0.state_dict())
    backbone.train()
    optimizer = torch.optim.Adam([
        {"params": backbone.parameters(), "lr": recipe.finetune_lr},
        {"params": head.parameters(), "lr": recipe.head_lr},
    ])
    _train_one_cycle(optimizer, [recipe.finetune_lr, recipe.head_lr], steps,
                     lambda index: nn.functional.cross_entropy(head(backbone(images[index])), labels[index]),
                     len(images), recipe.batch_size, seed, desc, progress)
    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    return state, head.eval().requires_grad_(False)


def tau_norm_ratio(theta0: Mapping[str, Tensor], tau_k: Mapping[str, Tensor]) -> float:
    """‖τ_k‖ / ‖θ0‖ over all merged (floating-point) parameters."""
    tau_sq = sum(float(t.double().pow(2).sum()) for t in tau_k.values())
    theta_sq = sum(float(theta0[n].double().pow(2).sum()) for n in tau_k)
    return (tau_sq / theta_sq) ** 0.5
