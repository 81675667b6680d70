"""`TinyResNetSuite`: the embedded CNN problem, MAP's ResNet-18 experiment in miniature (MAP paper, Table 6 and
Appendix D.5: three ResNet-18 fine-tunes, a new classification head each).

θ0 is a small torchvision ResNet (BasicBlock, one block per stage: `builders.torchvision_resnet`) pretrained here on the
TinySuite's pretraining images, supervised on all eight factors at once (the role ImageNet plays for ResNet-18). Each
task's θ_k fine-tunes the whole network with a new linear head on that task's own dataset (`tiny_images.DOMAINS`: its
images are noisier or fainter than the pretraining ones, so the fine-tune moves BatchNorm's running statistics as a
real one does). The images, splits and loaders are the TinySuite's; the float buffers follow ``buffer_policy``
(`kernels.buffers`), and ``recomputed`` estimates them on ``calibration_images`` of the adaptation split (the data
the fit already has).

Cache (``<root>/tiny/resnet-<hash>``): θ0, the fine-tuned networks and heads, and the build report.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from paretomerge.kernels import ModuleSpec, TaskVectors
from paretomerge.kernels.buffers import CALIBRATION_IMAGES, DEFAULT_BUFFER_POLICY, calibration_set, check_policy
from paretomerge.static import static_model
from paretomerge.suites import cache
from paretomerge.suites.loaders import derive_seed
from paretomerge.suites.tiny import FAST_TASKS, TinySuite
from paretomerge.suites.tiny_build import _train_one_cycle, check_positive, recipe_from
from paretomerge.suites.tiny_images import FACTORS, GENERATOR_VERSION, TASK_CLASSES, render, render_task

FEATURES = 512  # a torchvision ResNet's pooled width with BasicBlocks


@dataclass(frozen=True)
class ResNetRecipe:
    """Everything that determines the built weights; its JSON is part of the cache key."""

    layers: tuple[int, int, int, int] = (1, 1, 1, 1)
    pretrain_images: int = 8192
    pretrain_steps: int = 700
    pretrain_lr: float = 2e-3
    finetune_images: int = 2048
    finetune_steps: int = 120
    finetune_lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64

    def backbone_spec(self) -> ModuleSpec:
        return ModuleSpec("paretomerge.kernels.builders:torchvision_resnet",
                          {"layers": list(self.layers), "block": "basic", "num_classes": None})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}


def _check_resnet_recipe(overrides: dict[str, Any] | None) -> ResNetRecipe:
    recipe = recipe_from(ResNetRecipe, overrides, tuples=("layers",))
    for f in fields(ResNetRecipe):
        value = getattr(recipe, f.name)
        if f.name == "layers":
            if len(value) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in value):
                raise ValueError(f"recipe layers must be four positive ints (blocks per stage), got {value!r}")
        else:
            check_positive(f.name, value, f.type)
    return recipe


def pretrain_resnet(recipe: ResNetRecipe, seed: int, progress: bool = True) -> dict[str, Tensor]:
    """θ0: the ResNet trained from scratch to read all eight factors of the pretraining images (a linear read-out per
    factor, dropped afterwards), AdamW with a one-cycle schedule. Returns its state dict."""
    rendered = render(recipe.pretrain_images, seed)
    labels = torch.stack([rendered.factors[f] for f in FACTORS], dim=1)
    splits = [len(c) for c in FACTORS.values()]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = recipe.backbone_spec().build()
        readout = nn.Linear(FEATURES, sum(splits))
    optimizer = torch.optim.AdamW([*model.parameters(), *readout.parameters()], lr=recipe.pretrain_lr,
                                  weight_decay=recipe.weight_decay)
    model.train()

    def loss_of(index: Tensor) -> Tensor:
        logits = readout(model(rendered.images[index])).split(splits, dim=1)
        return sum(F.cross_entropy(z, labels[index, f]) for f, z in enumerate(logits)) / len(splits)

    _train_one_cycle(optimizer, recipe.pretrain_lr, recipe.pretrain_steps, loss_of, len(rendered.images),
                     recipe.batch_size, seed, "pretraining the tiny ResNet (all eight factors)", progress)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetune_resnet(theta0: nn.Module, num_classes: int, batch_of: Callable[[Tensor], tuple[Tensor, Tensor]],
                    num_items: int, steps: int, lr: float, weight_decay: float, batch_size: int, seed: int, desc: str,
                    progress: bool = True, device: str = "cpu") -> tuple[dict, dict]:
    """θ_k and its head: a copy of ``theta0`` (a torchvision ResNet whose ``fc`` is an identity) fine-tuned whole with a
    new linear head (cross-entropy, AdamW, one-cycle: `tiny_build._train_one_cycle`), as MAP fine-tunes ResNet-18.
    ``batch_of(indices) -> (images, labels)`` reads ``batch_size`` of the ``num_items`` training examples. Returns both
    state dicts, on the CPU; ``theta0`` is not modified."""
    backbone = copy.deepcopy(theta0).to(device).train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = nn.Linear(theta0.inplanes, num_classes)  # a ResNet's pooled width
    head.to(device)
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=lr, weight_decay=weight_decay)

    def loss_of(index: Tensor) -> Tensor:
        images, labels = batch_of(index)
        return F.cross_entropy(head(backbone(images.to(device))), labels.to(device))

    _train_one_cycle(optimizer, lr, steps, loss_of, num_items, batch_size, seed, desc, progress)
    return ({k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()},
            {k: v.detach().cpu().clone() for k, v in head.state_dict().items()})


class TinyResNetSuite(TinySuite):
    """The embedded CNN suite (a `TinySuite` whose models are ResNets with a linear head per task).

    tasks:              as TinySuite's (default: ``colour stripes size``, K = 3 as in MAP's ResNet-18 experiment;
                        ``tiny8`` for all eight).
    buffer_policy:      what a merged model's BatchNorm statistics are: ``recomputed`` (the default), ``merged`` or
                        ``pretrained`` (`kernels.buffers`).
    calibration_images: the adaptation images (every task's, in equal shares) ``recomputed`` estimates them on.
    The rest are TinySuite's (``recipe`` overrides `ResNetRecipe`).
    """

    def __init__(
        self,
        tasks: Sequence[str] | str | None = FAST_TASKS,
        seed: int = 0,
        buffer_policy: str = DEFAULT_BUFFER_POLICY,
        calibration_images: int = CALIBRATION_IMAGES,
        batch_size: int = 16,
        eval_batch_size: int = 256,
        test_images: int = 512,
        val_images: int = 256,
        recipe: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(tasks, None, seed, batch_size, eval_batch_size, test_images, val_images, None, cache_dir,
                         progress)
        check_policy(buffer_policy)
        if isinstance(calibration_images, bool) or not isinstance(calibration_images, int) or calibration_images < 1:
            raise ValueError(f"calibration_images must be a positive int, got {calibration_images!r}")
        self.recipe = _check_resnet_recipe(recipe)
        self.save_hyperparameters()
        self._reports: dict[str, dict[str, Any]] = {}  # policy -> the build report with its static merges

    @property
    def config(self) -> dict[str, Any]:
        return {"suite": "tiny-resnet", "generator_version": GENERATOR_VERSION, "tasks": list(self.tasks),
                "seed": self.hparams.seed, "recipe": self.recipe.to_dict()}

    @property
    def cache_path(self) -> Path:
        return cache.cache_root(self.hparams.cache_dir) / "tiny" / f"resnet-{cache.config_key(self.config)}"

    def _say(self, message: str) -> None:
        print(f"TinyResNetSuite: {message}", flush=True)

    def clip_model(self) -> Any:
        raise TypeError("TinyResNetSuite has no CLIP: its θ0 is a ResNet (task_vectors().backbone)")

    def calibration(self) -> Tensor:
        """The unlabeled inputs ``recomputed`` estimates BatchNorm statistics on (`kernels.buffers.calibration_set` of
        the adaptation split)."""
        return calibration_set({t: x for t, (x, _) in self._split("test").items()}, self.hparams.calibration_images)

    @property
    def build_report(self) -> dict[str, Any]:
        """TinySuite's report (θ0 with each head, individual, the static merges, ‖τ_k‖/‖θ0‖), with the static merges'
        columns evaluated under this suite's ``buffer_policy`` (the cached report's are under ``merged``); the policy
        is the report's ``buffer_policy``."""
        report = self._load()[2]
        policy = self.hparams.buffer_policy
        if report.get("buffer_policy") == policy:
            return report
        if policy not in self._reports:
            tv, columns = self.task_vectors(), {}
            for merge in ("task_arithmetic", "ties", "weight_averaging"):
                columns[f"{merge}_accuracy"] = self.evaluate(static_model(merge, tv))
            tasks = {t: {**row, **{c: v[t] for c, v in columns.items()}} for t, row in report["tasks"].items()}
            mean = {**report["mean"], **{c: sum(v.values()) / len(v) for c, v in columns.items()}}
            self._reports[policy] = {**report, "tasks": tasks, "mean": mean, "buffer_policy": policy}
        return self._reports[policy]

    def _from_cache(self, tensors: dict, documents: dict) -> tuple[TaskVectors, dict[str, nn.Module], dict]:
        try:
            spec = self.recipe.backbone_spec()
            pretrained = spec.build()
            pretrained.load_state_dict(tensors["pretrained"])
            heads = {}
            for t in self.tasks:
                head = nn.Linear(FEATURES, len(TASK_CLASSES[t]))
                head.load_state_dict(tensors[f"head_{t}"])
                heads[t] = head
            finetuned = [tensors[f"finetuned_{t}"] for t in self.tasks]
            tv = TaskVectors.from_state_dicts(pretrained, finetuned, list(self.tasks), heads, backbone_spec=spec,
                                              buffer_policy=self.hparams.buffer_policy,
                                              calibration=self.calibration())
            return tv, {}, documents["build_report"]
        except (KeyError, RuntimeError, ValueError) as err:  # consistent hashes but wrong contents
            raise cache.CacheError(f"{self.cache_path} holds unexpected weights ({err})") from None

    def _build(self) -> tuple[dict, dict]:
        progress, recipe, seed = self.hparams.progress, self.recipe, self.hparams.seed
        rank_zero_info(f"Building TinyResNetSuite ({len(self.tasks)} tasks: {', '.join(self.tasks)}) into "
                       f"{self.cache_path}")
        start = time.perf_counter()
        theta0 = pretrain_resnet(recipe, derive_seed(seed, "resnet-pretrain"), progress)
        tensors: dict[str, Any] = {"pretrained": theta0}
        model = recipe.backbone_spec().build()
        model.load_state_dict(theta0)
        for k, task in enumerate(self.tasks):
            data = render_task(task, recipe.finetune_images, derive_seed(seed, task, "finetune-images"), "train")
            images, labels = data.images, data.factors[task]
            tensors[f"finetuned_{task}"], tensors[f"head_{task}"] = finetune_resnet(
                model, len(TASK_CLASSES[task]), lambda index, x=images, y=labels: (x[index], y[index]), len(images),
                recipe.finetune_steps, recipe.finetune_lr, recipe.weight_decay, recipe.batch_size,
                derive_seed(seed, task, "resnet-finetune"), f"fine-tuning {task} ({k + 1}/{len(self.tasks)})",
                progress)
        tv, unseen, _ = self._from_cache(tensors, {"build_report": {}})
        tv.configure_buffers("merged")  # the report's merges: each fine-tune's statistics merged as its weights are
        report = self._report(tv, unseen, build_seconds=time.perf_counter() - start)
        report["buffer_policy"] = "merged"
        rank_zero_info(f"TinyResNetSuite built in {report['build_seconds']:.0f} s; mean accuracy: θ0 with each head "
                       f"{100 * report['mean']['zero_shot_accuracy']:.1f}%, individual "
                       f"{100 * report['mean']['individual_accuracy']:.1f}%, Task Arithmetic (statistics merged) "
                       f"{100 * report['mean']['task_arithmetic_accuracy']:.1f}%")
        return tensors, {"build_report": report}

