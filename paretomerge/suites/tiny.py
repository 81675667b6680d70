"""`TinySuite`: the embedded merging problem in CLIP's regime, built from nothing on a CPU in minutes.

A tiny CLIP is pretrained on generated image-caption pairs (θ0 and its text tower); every task's head is the zero-shot
head its text tower gives (`suites/zeroshot.py`, the same code as CLIPSuite's); and each task's θ_k fine-tunes the image
tower alone on that task's dataset, against the frozen head (`tiny_build`). The images come from one procedural
generator with eight factors, and each task is its own dataset: it varies the factor it labels and holds the others
fixed, and its images are noisier or fainter than the pretraining ones (`tiny_images.DOMAINS`). The *unseen tasks*
(`tiny_text.UNSEEN`) have a zero-shot head and no fine-tuned model (Pareto Merging §4.3).

Splits per task, as the merging papers use them: the labeled *test* split, whose images without labels are the
*adaptation* data that AdaMerging and Pareto Merging train on, and a labeled *validation* split.

Cache (``<root>/tiny/``): ``clip-<hash>`` holds the pretrained tiny CLIP (it depends only on the seed and the
pretraining recipe, so every task subset shares it); ``<hash>`` holds the fine-tuned image towers, the heads and the
build report of one configuration.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from paretomerge.kernels import TaskVectors, forward_features, run_head
from paretomerge.static import static_merge, task_wise
from paretomerge.suites import cache
from paretomerge.suites.loaders import derive_seed, epoch_shuffle, top1_accuracy
from paretomerge.suites.tiny_build import (
    PRETRAINING_FIELDS,
    Recipe,
    TinyCLIP,
    check_positive,
    finetune,
    pretrain,
    recipe_from,
    tau_norm_ratio,
)
from paretomerge.suites.tiny_images import (
    ADDED_DOMAINS,
    ADDED_FACTORS,
    ADDED_GENERATOR_VERSION,
    DOMAINS,
    FACTORS,
    GENERATOR_VERSION,
    TASK_CLASSES,
    TASK_SETS,
    render_task,
)
from paretomerge.suites.tiny_text import ADDED_TEMPLATES, TEMPLATES, UNSEEN
from paretomerge.suites.zeroshot import ZeroShotHead, class_embeddings, zero_shot_head

# The fast variant the tests use: three tasks, a 2-layer width-64 CLIP, half the images and fewer steps. It
# builds in about 45 s and stays in CLIP's regime (benchmarks/README.md, issue 16: zero-shot 56-58%, Task
# Arithmetic 70-76%, AdaMerging 75-77%, individual 94-96% on seeds 0-2). A width-32 variant built in 16 s but sat
# outside it: AdaMerging from the same start gave 61.5% on seed 0 and 46.1% on seed 1 (Task Arithmetic 54.4, 52.1).
FAST_TASKS = ("colour", "stripes", "size")
FAST_RECIPE = {"layers": 2, "pretrain_images": 4096, "pretrain_steps": 500, "finetune_images": 1024,
               "finetune_steps": 100}


@dataclass(frozen=True)
class UnseenTask:
    """A task with a zero-shot head and no fine-tuned model: its labeled images and its head."""

    images: Tensor  # [N, 3, 32, 32]
    labels: Tensor  # [N]
    head: ZeroShotHead


def class_names(task: str) -> tuple[str, ...]:
    """The class names of a factor (`FACTORS`, `ADDED_FACTORS`) or an unseen task (`UNSEEN`)."""
    return UNSEEN[task][2] if task in UNSEEN else TASK_CLASSES[task]


def templates(task: str) -> tuple[str, ...]:
    """The prompt templates of a task's zero-shot head."""
    return ADDED_TEMPLATES[task] if task in ADDED_TEMPLATES else TEMPLATES[task]


class TinySuite(LightningDataModule):
    """The embedded suite.

    tasks:          the merged tasks, each with a fine-tuned model: a named set, ``tiny8`` (the default: ``shape colour
                    digit position stripes size count background``), ``tiny14`` or ``tiny20`` (each a superset of the
                    one before, `TASK_SETS`), or a list of 2 or more of the eight factors and the twelve added ones
                    (`tiny_images.ADDED_FACTORS`).
    unseen_tasks:   tasks with a zero-shot head and no fine-tuned model (`unseen`): ``warmth`` and ``parity`` (coarse
                    relabellings of colour and digit), or factors not in ``tasks``. Never merged.
    seed:           everything (images, captions, θ0, fine-tuning) derives from it.
    batch_size:     unlabeled adaptation images per task per training step.
    test_images:    labeled test images per task; their images are the adaptation split.
    val_images:     labeled validation images per task.
    recipe:         overrides of `Recipe` (tower sizes, pretraining and fine-tuning schedules).
    cache_dir:      cache root (default ``$PARETOMERGE_CACHE`` or ``~/.cache/paretomerge``); the suite lives in
                    ``<root>/tiny/``.
    progress:       progress bars while building.
    """

    def __init__(
        self,
        tasks: Sequence[str] | str | None = None,
        unseen_tasks: Sequence[str] | None = ("warmth", "parity"),
        seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int = 256,
        test_images: int = 512,
        val_images: int = 256,
        recipe: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(tasks, str):
            if tasks not in TASK_SETS:
                raise ValueError(f"unknown TinySuite task set {tasks!r}; the named sets are {list(TASK_SETS)}, or "
                                 f"give a list of tasks from {list(TASK_CLASSES)}")
            tasks = TASK_SETS[tasks]
        tasks = list(FACTORS) if tasks is None else list(tasks)
        unseen_tasks = [] if unseen_tasks is None else list(unseen_tasks)
        held_out = [t for t in tasks if t in UNSEEN]
        if held_out:
            raise ValueError(f"{held_out} are unseen tasks (a zero-shot head and no fine-tuned model): list them in "
                             f"unseen_tasks, not tasks; tasks choose from {list(TASK_CLASSES)}")
        unknown = [t for t in tasks if t not in TASK_CLASSES]
        if unknown:
            raise ValueError(f"unknown TinySuite task(s) {unknown}; choose from {list(TASK_CLASSES)} or a named "
                             f"set {list(TASK_SETS)}")
        if len(tasks) < 2 or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must name at least 2 distinct factors, got {tasks}")
        unknown = [t for t in unseen_tasks if t not in UNSEEN and t not in TASK_CLASSES]
        if unknown:
            raise ValueError(f"unknown unseen task(s) {unknown}; choose from {list(UNSEEN)} or factors not in tasks")
        merged = [t for t in unseen_tasks if t in tasks]
        if merged:
            raise ValueError(f"unseen task(s) {merged} are also merged tasks; an unseen task has no fine-tuned model, "
                             "so take it out of tasks or out of unseen_tasks")
        if len(set(unseen_tasks)) != len(unseen_tasks):
            raise ValueError(f"unseen_tasks has repeats: {unseen_tasks}")
        for name, value in (("seed", seed), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("test_images", test_images), ("val_images", val_images)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} int, "
                                 f"got {value!r}")
        if batch_size > test_images:
            raise ValueError(f"batch_size={batch_size} exceeds test_images={test_images} (the adaptation split)")
        self.recipe = _check_recipe(recipe)
        self.save_hyperparameters()
        self.tasks = tuple(tasks)
        self.unseen_tasks = tuple(unseen_tasks)
        self._loaded: tuple[TaskVectors, dict[str, nn.Module], dict[str, Any]] | None = None
        self._clip: TinyCLIP | None = None
        self._splits: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}  # (task, split) -> (images, labels)

    # ------------------------------------------------------------------ identity and cache
    @property
    def config(self) -> dict[str, Any]:
        """Everything the built weights and report depend on; its hash names the cache directory."""
        named = self.tasks + self.unseen_tasks
        datasets = {t: asdict({**DOMAINS, **ADDED_DOMAINS}[UNSEEN[t][0] if t in UNSEEN else t]) for t in named}
        config = {"suite": "tiny", "generator_version": GENERATOR_VERSION, "tasks": list(self.tasks),
                  "unseen_tasks": list(self.unseen_tasks), "seed": self.hparams.seed,
                  "test_images": self.hparams.test_images, "recipe": self.recipe.to_dict(),
                  "datasets": json.loads(json.dumps(datasets))}
        if any(t in ADDED_FACTORS for t in named):  # only then, so that the eight factors' suites keep their key
            config["added_generator_version"] = ADDED_GENERATOR_VERSION
        return config

    @property
    def clip_config(self) -> dict[str, Any]:
        """What the pretrained tiny CLIP depends on (not the tasks): its hash names its own cache directory."""
        recipe = self.recipe.to_dict()
        return {"suite": "tiny-clip", "generator_version": GENERATOR_VERSION, "seed": self.hparams.seed,
                "recipe": {k: recipe[k] for k in PRETRAINING_FIELDS}}

    @property
    def cache_path(self) -> Path:
        return cache.cache_root(self.hparams.cache_dir) / "tiny" / cache.config_key(self.config)

    @property
    def clip_cache_path(self) -> Path:
        return cache.cache_root(self.hparams.cache_dir) / "tiny" / f"clip-{cache.config_key(self.clip_config)}"

    def prepare_data(self) -> None:
        """Build the suite into the cache if it is not there (Lightning runs this on one process per node)."""
        self._load()

    def setup(self, stage: str) -> None:
        self._load()

    def _say(self, message: str) -> None:
        print(f"TinySuite: {message}", flush=True)

    def _warn_unusable(self, err: cache.CacheError) -> None:
        rank_zero_warn(f"TinySuite cache is not usable: {err}. Rebuilding it.")

    def clip_model(self) -> TinyCLIP:
        """The pretrained tiny CLIP (θ0 is its ``visual``; the zero-shot heads come from its text tower), frozen."""
        if self._clip is None:
            def build() -> tuple[dict, dict]:
                start = time.perf_counter()
                model = pretrain(self.recipe, derive_seed(self.hparams.seed, "pretrain"), self.hparams.progress)
                return {"clip": model.state_dict()}, {"pretraining": {"seconds": time.perf_counter() - start}}

            self._clip = cache.read_or_build(self.clip_cache_path, self.clip_config, build, self._clip_from_cache,
                                             self._say, self._warn_unusable)
        return self._clip

    def _clip_from_cache(self, tensors: dict, documents: dict) -> TinyCLIP:
        try:
            model = self.recipe.clip_spec().build()
            model.load_state_dict(tensors["clip"])
            return model.eval().requires_grad_(False)
        except (KeyError, RuntimeError) as err:
            raise cache.CacheError(f"{self.clip_cache_path} holds unexpected weights ({err})") from None

    def _load(self) -> tuple[TaskVectors, dict[str, nn.Module], dict[str, Any]]:
        if self._loaded is None:
            self._loaded = cache.read_or_build(self.cache_path, self.config, self._build, self._from_cache, self._say,
                                               self._warn_unusable)
        return self._loaded

    def _from_cache(self, tensors: dict, documents: dict) -> tuple[TaskVectors, dict[str, nn.Module], dict]:
        try:
            spec = self.recipe.backbone_spec()
            pretrained = spec.build()
            pretrained.load_state_dict(self.clip_model().visual.state_dict())
            heads = {t: zero_shot_head(tensors["heads"][t]) for t in self.tasks + self.unseen_tasks}
            finetuned = [tensors[f"finetuned_{t}"] for t in self.tasks]
            tv = TaskVectors.from_state_dicts(pretrained, finetuned, list(self.tasks),
                                              {t: heads[t] for t in self.tasks}, backbone_spec=spec)
            return tv, {t: heads[t] for t in self.unseen_tasks}, documents["build_report"]
        except (KeyError, RuntimeError, ValueError) as err:  # consistent hashes but wrong contents
            raise cache.CacheError(f"{self.cache_path} holds unexpected weights ({err})") from None

    def _build(self) -> tuple[dict, dict]:
        progress, recipe, seed = self.hparams.progress, self.recipe, self.hparams.seed
        rank_zero_info(f"Building TinySuite ({len(self.tasks)} tasks: {', '.join(self.tasks)}) into {self.cache_path}")
        start = time.perf_counter()
        clip = self.clip_model()
        tokenizer = recipe.tokenizer()
        weights = {t: class_embeddings(clip, tokenizer, class_names(t), templates(t))
                   for t in self.tasks + self.unseen_tasks}
        finetuned = {}
        for k, task in enumerate(self.tasks):
            data = render_task(task, recipe.finetune_images, derive_seed(seed, task, "finetune-images"), "train")
            finetuned[task] = finetune(recipe, clip.visual, zero_shot_head(weights[task]), data.images,
                                       data.factors[task], recipe.finetune_steps_for(task),
                                       derive_seed(seed, task, "finetune"),
                                       f"fine-tuning {task} ({k + 1}/{len(self.tasks)})", progress)
        tensors = {"heads": weights} | {f"finetuned_{t}": state for t, state in finetuned.items()}
        tv, unseen, _ = self._from_cache(tensors, {"build_report": {}})
        report = self._report(tv, unseen, build_seconds=time.perf_counter() - start)
        rank_zero_info(f"TinySuite built in {report['build_seconds']:.0f} s; mean accuracy: zero-shot "
                       f"{100 * report['mean']['zero_shot_accuracy']:.1f}%, individual "
                       f"{100 * report['mean']['individual_accuracy']:.1f}%, Task Arithmetic "
                       f"{100 * report['mean']['task_arithmetic_accuracy']:.1f}%")
        return tensors, {"build_report": report}

    def _report(self, tv: TaskVectors, unseen: dict[str, nn.Module], build_seconds: float) -> dict[str, Any]:
        num_tasks = len(self.tasks)
        backbone, heads = tv.backbone.eval(), {**tv.heads, **unseen}
        theta0 = task_wise(tv, [0.0] * num_tasks, "pretrained")  # θ0 as it is, and each θ_k with its own buffers

        def accuracy(params: dict[str, Tensor], tasks: Sequence[str] | None = None) -> dict[str, float]:
            return self._accuracies(lambda x, t: run_head(t, heads[t], forward_features(backbone, params, x)),
                                    tasks=tasks)

        one_hot = np.eye(num_tasks).tolist()
        columns = {  # θ0 alone (zero-shot), θ0 + τ_k, and the static merges of SPEC §5
            "zero_shot_accuracy": accuracy(theta0),
            "individual_accuracy": {t: accuracy(task_wise(tv, one_hot[k], "merged"), [t])[t]
                                    for k, t in enumerate(self.tasks)},
            "task_arithmetic_accuracy": accuracy(static_merge("task_arithmetic", tv)),
            "ties_accuracy": accuracy(static_merge("ties", tv)),
            "weight_averaging_accuracy": accuracy(static_merge("weight_averaging", tv)),
            "tau_norm_ratio": {t: tau_norm_ratio(tv.theta0, {n: v[k] for n, v in tv.tau.items()})
                               for k, t in enumerate(self.tasks)},
        }
        per_task = {t: {column: values[t] for column, values in columns.items()} | {"num_classes": len(class_names(t))}
                    for t in self.tasks}
        mean = {column: float(np.mean(list(values.values()))) for column, values in columns.items()}
        unseen_rows = {t: {"zero_shot_accuracy": value, "num_classes": len(class_names(t))}
                       for t, value in accuracy(theta0, self.unseen_tasks).items()}
        return {"tasks": per_task, "mean": mean, "unseen_tasks": unseen_rows, "build_seconds": build_seconds,
                "config": self.config}

    # ------------------------------------------------------------------ what users call
    def task_vectors(self) -> TaskVectors:
        """θ0, τ ``[K, *shape]`` and the zero-shot heads of the merged tasks (built into the cache the first time)."""
        return self._load()[0]

    @property
    def class_names(self) -> dict[str, tuple[str, ...]]:
        """task -> the class names its zero-shot head was built from (as CLIPSuite's; nothing is built)."""
        return {task: class_names(task) for task in self.tasks}

    @property
    def build_report(self) -> dict[str, Any]:
        """Per task: zero-shot (θ0), individual, Task Arithmetic (0.3), TIES, weight-averaging test accuracy,
        ‖τ_k‖/‖θ0‖ and the number of classes; their means; the unseen tasks' zero-shot accuracy; the build's wall time
        in seconds."""
        return self._load()[2]

    def unseen(self, task: str, split: str = "test") -> UnseenTask:
        """An unseen task's labeled images (its factor's dataset, relabelled) and zero-shot head. The images without
        labels are what `select_for_unseen_task` scores preferences on."""
        if task not in self.unseen_tasks:
            raise KeyError(f"{task!r} is not an unseen task of this suite; it has {list(self.unseen_tasks)}")
        images, labels = self._task_split(task, split)
        return UnseenTask(images, labels, self._load()[1][task])

    def evaluate(self, net: nn.Module, split: str = "test", tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Top-1 accuracy per task of ``net(images, task=name) -> logits`` (e.g. ``model.at(pref)``), for all merged
        tasks or the ``tasks`` given (an unseen task too, when ``net`` has a head for it)."""
        known = self.tasks + self.unseen_tasks
        unknown = [t for t in tasks or () if t not in known]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; this suite has {list(self.tasks)} and unseen "
                           f"{list(self.unseen_tasks)}")
        device = next(net.parameters()).device
        return self._accuracies(lambda x, t: net(x.to(device), task=t), split, tasks or None)

    def _accuracies(self, predict: Callable[[Tensor, str], Tensor], split: str = "test",
                    tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Top-1 accuracy per task (torchmetrics, as the modules log it) of ``predict(images, task) -> logits``."""
        return {task: top1_accuracy(lambda x, task=task: predict(x, task),
                                    self._batches(*self._task_split(task, split)))
                for task in (self.tasks if tasks is None else tasks)}

    def _batches(self, images: Tensor, labels: Tensor):
        size = self.hparams.eval_batch_size
        return zip(images.split(size), labels.split(size), strict=True)

    def labeled(self, split: str = "val") -> dict[str, tuple[Tensor, Tensor]]:
        """task -> (images ``[N, 3, 32, 32]``, labels ``[N]``) of the labeled ``test`` or ``val`` split."""
        return self._split(split)

    def _split(self, split: str) -> dict[str, tuple[Tensor, Tensor]]:
        """task -> (images, labels) of the merged tasks' labeled ``test`` or ``val`` split, each task's own dataset."""
        return {t: self._task_split(t, split) for t in self.tasks}

    def _task_split(self, task: str, split: str) -> tuple[Tensor, Tensor]:
        """(images, labels) of one task's labeled ``test`` or ``val`` split, rendered once. A merged task's images are
        its dataset; an unseen task's are its factor's dataset, with the coarse labels for a relabelling."""
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        if (task, split) not in self._splits:
            size = self.hparams.test_images if split == "test" else self.hparams.val_images
            if task in self.tasks:
                rendered = render_task(task, size, derive_seed(self.hparams.seed, task, split))
                labels = rendered.factors[task]
            else:
                factor, groups, _ = UNSEEN.get(task, (task, None, None))
                rendered = render_task(factor, size, derive_seed(self.hparams.seed, task, "unseen", split))
                labels = rendered.factors[factor] if groups is None else torch.tensor(groups)[rendered.factors[factor]]
            self._splits[task, split] = (rendered.images, labels)
        return self._splits[task, split]

    # ------------------------------------------------------------------ Lightning's loaders
    def train_dataloader(self) -> CombinedLoader:
        """The unlabeled adaptation split: task -> ``[images]`` batches of ``batch_size``, reshuffled every
        epoch by ``(seed, task, epoch)``. Stateful (torchdata), so a mid-epoch resume continues at the next batch."""
        loaders = {
            t: StatefulDataLoader(TensorDataset(images), batch_size=self.hparams.batch_size, drop_last=True,
                          sampler=epoch_shuffle(self, len(images), derive_seed(self.hparams.seed, t, "order")))
            for t, (images, _) in self._split("test").items()
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _labeled(self, split: str) -> CombinedLoader:
        loaders = {t: DataLoader(TensorDataset(x, y), batch_size=self.hparams.eval_batch_size)
                   for t, (x, y) in self._split(split).items()}
        return CombinedLoader(loaders, mode="max_size")

    def val_dataloader(self) -> CombinedLoader:
        return self._labeled("val")

    def test_dataloader(self) -> CombinedLoader:
        return self._labeled("test")


def _check_recipe(overrides: dict[str, Any] | None) -> Recipe:
    """`Recipe` with ``overrides``, each checked: unknown keys and wrong types are refused with a message."""
    recipe = recipe_from(Recipe, overrides)
    per_factor = {"finetune_effort": (TASK_CLASSES, lambda v: v > 0, "positive numbers"),
                  "mention": (FACTORS, lambda v: 0 <= v <= 1, "probabilities")}
    for f in fields(Recipe):
        value = getattr(recipe, f.name)
        if f.name in per_factor:
            keys, valid, what = per_factor[f.name]
            if not isinstance(value, dict) or any(k not in keys or isinstance(v, bool) or not isinstance(
                    v, (int, float)) or not valid(v) for k, v in value.items()):
                raise ValueError(f"recipe {f.name} must map factors of {list(keys)} to {what}, got {value!r}")
        else:
            check_positive(f.name, value, f.type)
    if recipe.element_rate > 1:
        raise ValueError(f"recipe element_rate is a probability, got {recipe.element_rate}")
    if recipe.width % recipe.heads:
        raise ValueError(f"recipe width={recipe.width} must be a multiple of heads={recipe.heads}")
    return recipe
