"""`TinySuite`: the embedded merging problem that runs anywhere, built from nothing on a CPU in minutes.

Eight 3×32×32 image-classification tasks over one procedural generator (``tiny_images``): each task labels a
different factor of the same kind of image. A small open_clip ViT is pretrained on a pretext (θ0), then
fine-tuned once per task (θ_k and a linear head), so the task vectors pull the shared backbone in different
directions (``tiny_build``). The weights are cached as safetensors (``cache``) and reloaded in seconds.

Splits per task, as the merging papers use them: the labeled *test* split, whose images without labels are
the *adaptation* data that AdaMerging and Pareto Merging train on, and a labeled *validation* split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from paretomerge.kernels import TaskVectors, forward_features, merge
from paretomerge.static import static_merge
from paretomerge.suites import cache
from paretomerge.suites.loaders import EpochShuffle, derive_seed, top1_accuracy
from paretomerge.suites.tiny_build import Recipe, finetune, pretrain, tau_norm_ratio
from paretomerge.suites.tiny_images import FACTORS, GENERATOR_VERSION, render

# The fast variant the tests use: three tasks, a 2-layer width-32 ViT, fewer images and steps.
FAST_TASKS = ("colour", "stripes", "size")
FAST_RECIPE = {"width": 32, "layers": 2, "output_dim": 32, "pretext_images": 1024, "pretext_steps": 120,
               "finetune_images": 512, "finetune_steps": 80, "finetune_lr": 1e-3}


class TinySuite(LightningDataModule):
    """The embedded suite.

    tasks:          factors to classify, 2 to 8 of ``shape colour digit position stripes size count background``
                    (default: all eight).
    seed:           everything (images, θ0, fine-tuning) derives from it.
    batch_size:     unlabeled adaptation images per task per training step (SPEC: 16).
    test_images:    labeled test images per task; their images are the adaptation split.
    val_images:     labeled validation images per task.
    recipe:         overrides of `Recipe` (backbone size, pretext and fine-tuning schedule).
    cache_dir:      cache root (default ``$PARETOMERGE_CACHE`` or ``~/.cache/paretomerge``); the suite lives
                    in ``<root>/tiny/<config-hash>``.
    progress:       progress bars while building.
    """

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
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
        tasks = list(FACTORS) if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in FACTORS]
        if unknown:
            raise ValueError(f"unknown TinySuite task(s) {unknown}; choose from {list(FACTORS)}")
        if len(tasks) < 2 or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must name at least 2 distinct factors, got {tasks}")
        for name, value in (("seed", seed), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("test_images", test_images), ("val_images", val_images)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} int, "
                                 f"got {value!r}")
        if batch_size > test_images:
            raise ValueError(f"batch_size={batch_size} exceeds test_images={test_images} (the adaptation split)")
        known = {f.name for f in fields(Recipe)}
        bad = sorted(set(recipe or {}) - known)
        if bad:
            raise ValueError(f"unknown recipe key(s) {bad}; known: {sorted(known)}")
        self.recipe = replace(Recipe(), **(recipe or {}))
        for f in fields(Recipe):
            value = getattr(self.recipe, f.name)
            if f.name == "finetune_effort":
                if not isinstance(value, dict) or any(k not in FACTORS or not isinstance(v, (int, float)) or v <= 0
                                                      for k, v in value.items()):
                    raise ValueError(f"recipe finetune_effort must map task names to positive numbers, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
                    or (f.type == "int" and not isinstance(value, int)):
                raise ValueError(f"recipe {f.name} must be a positive {f.type}, got {value!r}")
        self.save_hyperparameters()
        self.tasks = tuple(tasks)
        self._loaded: tuple[TaskVectors, dict[str, Any]] | None = None
        self._splits: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}

    # ------------------------------------------------------------------ identity and cache
    @property
    def config(self) -> dict[str, Any]:
        """Everything the built weights and report depend on; its hash names the cache directory."""
        return {"suite": "tiny", "generator_version": GENERATOR_VERSION, "tasks": list(self.tasks),
                "seed": self.hparams.seed, "test_images": self.hparams.test_images, "recipe": self.recipe.to_dict()}

    @property
    def cache_path(self) -> Path:
        return cache.cache_root(self.hparams.cache_dir) / "tiny" / cache.config_key(self.config)

    def prepare_data(self) -> None:
        """Build the suite into the cache if it is not there (Lightning runs this on one process per node)."""
        self._load()

    def setup(self, stage: str) -> None:
        self._load()

    def _load(self) -> tuple[TaskVectors, dict[str, Any]]:
        if self._loaded is None:
            try:
                self._loaded = self._read()
            except cache.CacheError:
                # One process builds; any other starting at once waits here, then reads what it wrote.
                with cache.exclusive(self.cache_path, on_wait=lambda message: print(f"TinySuite: {message}",
                                                                                     flush=True)):
                    try:
                        self._loaded = self._read()
                    except cache.CacheError as err:
                        if self.cache_path.exists():
                            rank_zero_warn(f"TinySuite cache is not usable: {err}. Rebuilding it.")
                        self._loaded = self._build()
        return self._loaded

    def _read(self) -> tuple[TaskVectors, dict[str, Any]]:
        tensors, documents = cache.read_entry(self.cache_path, self.config)
        return self._from_cache(tensors, documents)

    def _from_cache(self, tensors: dict[str, dict[str, Tensor]], documents: dict[str, Any]) -> tuple[TaskVectors, dict]:
        try:
            spec = self.recipe.backbone_spec()
            pretrained = spec.build()
            pretrained.load_state_dict(tensors["theta0"])
            finetuned = [tensors[f"finetuned_{t}"] for t in self.tasks]
            heads = {}
            for t in self.tasks:
                head = nn.Linear(self.recipe.output_dim, len(FACTORS[t]))
                head.load_state_dict({"weight": tensors["heads"][f"{t}.weight"], "bias": tensors["heads"][f"{t}.bias"]})
                heads[t] = head
            tv = TaskVectors.from_state_dicts(pretrained, finetuned, list(self.tasks), heads, backbone_spec=spec)
            return tv, documents["build_report"]
        except (KeyError, RuntimeError, ValueError) as err:  # consistent hashes but wrong contents
            raise cache.CacheError(f"{self.cache_path} holds unexpected weights ({err})") from None

    def _build(self) -> tuple[TaskVectors, dict[str, Any]]:
        progress, recipe, seed = self.hparams.progress, self.recipe, self.hparams.seed
        rank_zero_info(f"Building TinySuite ({len(self.tasks)} tasks: {', '.join(self.tasks)}) into {self.cache_path}")
        start = time.perf_counter()
        theta0 = pretrain(recipe, derive_seed(seed, "pretext"), progress)
        finetuned, heads = [], {}
        for k, task in enumerate(self.tasks):
            data = render(recipe.finetune_images, derive_seed(seed, task, "finetune-images"), glyph_subset="train")
            state, head = finetune(recipe, theta0, data.images, data.factors[task], len(FACTORS[task]),
                                   recipe.finetune_steps_for(task), derive_seed(seed, task, "finetune"),
                                   f"fine-tuning {task} ({k + 1}/{len(self.tasks)})", progress)
            finetuned.append(state)
            heads[task] = head
        tv = TaskVectors.from_state_dicts(theta0, finetuned, list(self.tasks), heads,
                                          backbone_spec=recipe.backbone_spec())
        report = self._report(tv, build_seconds=time.perf_counter() - start)
        tensors = {"theta0": theta0.state_dict(), "heads": {}}
        for task, state in zip(self.tasks, finetuned, strict=True):
            tensors[f"finetuned_{task}"] = state
            tensors["heads"].update({f"{task}.{k}": v for k, v in heads[task].state_dict().items()})
        cache.write_entry(self.cache_path, self.config, tensors, {"build_report": report})
        rank_zero_info(f"TinySuite built in {report['build_seconds']:.0f} s; mean individual accuracy "
                       f"{100 * report['mean']['individual_accuracy']:.1f}%, Task Arithmetic "
                       f"{100 * report['mean']['task_arithmetic_accuracy']:.1f}%")
        return tv, report

    def _report(self, tv: TaskVectors, build_seconds: float) -> dict[str, Any]:
        num_tasks = len(self.tasks)
        backbone = tv.backbone.eval()

        def accuracy(params: dict[str, Tensor], tasks: Sequence[str] | None = None) -> dict[str, float]:
            return self._accuracies(lambda x, t: tv.heads[t](forward_features(backbone, params, x)), tasks=tasks)

        def coefficients(values: Sequence[float]) -> dict[str, Tensor]:
            return merge(tv.theta0, tv.tau, torch.tensor(values, dtype=torch.float32))

        one_hot = np.eye(num_tasks).tolist()
        columns = {  # θ0 + τ_k, the static merges of SPEC §5, and θ0 itself
            "individual_accuracy": {t: accuracy(coefficients(one_hot[k]), [t])[t] for k, t in enumerate(self.tasks)},
            "task_arithmetic_accuracy": accuracy(static_merge("task_arithmetic", tv)),
            "weight_averaging_accuracy": accuracy(static_merge("weight_averaging", tv)),
            "pretrained_accuracy": accuracy(coefficients([0.0] * num_tasks)),
            "tau_norm_ratio": {t: tau_norm_ratio(tv.theta0, {n: v[k] for n, v in tv.tau.items()})
                               for k, t in enumerate(self.tasks)},
        }
        per_task = {t: {column: values[t] for column, values in columns.items()} | {"num_classes": len(FACTORS[t])}
                    for t in self.tasks}
        mean = {column: float(np.mean(list(values.values()))) for column, values in columns.items()}
        return {"tasks": per_task, "mean": mean, "build_seconds": build_seconds, "config": self.config}

    # ------------------------------------------------------------------ what users call
    def task_vectors(self) -> TaskVectors:
        """θ0, τ ``[K, *shape]`` and the fine-tuned heads (built into the cache the first time)."""
        return self._load()[0]

    @property
    def build_report(self) -> dict[str, Any]:
        """Per task: individual, Task Arithmetic (0.3), weight-averaging and pretrained (θ0) test accuracy,
        ‖τ_k‖/‖θ0‖ and the number of classes; their means; the build's wall time in seconds."""
        return self._load()[1]

    def evaluate(self, net: nn.Module, split: str = "test", tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Top-1 accuracy per task of ``net(images, task=name) -> logits`` (e.g. ``model.at(pref)``), for all tasks
        or the ``tasks`` given."""
        unknown = [t for t in tasks or () if t not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; this suite has {list(self.tasks)}")
        device = next(net.parameters()).device
        return self._accuracies(lambda x, t: net(x.to(device), task=t), split, tasks)

    def _accuracies(self, predict: Callable[[Tensor, str], Tensor], split: str = "test",
                    tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Top-1 accuracy per task (torchmetrics, as the modules log it) of ``predict(images, task) -> logits``."""
        data, size = self._split(split), self.hparams.eval_batch_size
        return {task: top1_accuracy(lambda x, task=task: predict(x, task),
                                    zip(data[task][0].split(size), data[task][1].split(size), strict=True),
                                    len(FACTORS[task]))
                for task in tasks or self.tasks}

    def labeled(self, split: str = "val") -> dict[str, tuple[Tensor, Tensor]]:
        """task -> (images ``[N, 3, 32, 32]``, labels ``[N]``) of the labeled ``test`` or ``val`` split."""
        return self._split(split)

    def _split(self, split: str) -> dict[str, tuple[Tensor, Tensor]]:
        """task -> (images ``[N, 3, 32, 32]``, labels ``[N]``) of the labeled ``test`` or ``val`` split."""
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        if split not in self._splits:
            size = self.hparams.test_images if split == "test" else self.hparams.val_images
            rendered = {t: render(size, derive_seed(self.hparams.seed, t, split), glyph_subset="heldout")
                        for t in self.tasks}
            self._splits[split] = {t: (r.images, r.factors[t]) for t, r in rendered.items()}
        return self._splits[split]

    # ------------------------------------------------------------------ Lightning's loaders
    def train_dataloader(self) -> CombinedLoader:
        """The unlabeled adaptation split: task -> ``[images]`` batches of ``batch_size``, reshuffled every
        epoch by ``(seed, task, epoch)``."""
        loaders = {
            t: DataLoader(TensorDataset(images), batch_size=self.hparams.batch_size, drop_last=True,
                          sampler=EpochShuffle(len(images), derive_seed(self.hparams.seed, t, "order")))
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
