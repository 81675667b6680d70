"""`ResNetSuite`: MAP's ResNet-18 experiment (MAP paper, Table 6 and Appendix D.5) on real data: torchvision's
ResNet-18 with ImageNet weights from a local file, fine-tuned with a new linear head on each task (CIFAR-10,
Flowers-102 and GTSRB by default), the datasets read from local folders with torchvision's classes
(``download=False``: `clip_data.open_task`, the same readers as CLIPSuite's).

θ_k is either a file you give (``finetuned: {task: path}``: a torchvision ResNet state dict whose ``fc`` is the task's
head) or fine-tuned here from θ0 on the task's train split (``finetune_steps`` AdamW steps, one-cycle, no
augmentation: `tiny_resnet.finetune_resnet`, the embedded suite's) and cached under ``<cache>/resnet/<hash>``. The
splits, loaders and evaluation are CLIPSuite's: the test split's images are the unlabeled adaptation data, ``val`` a
seeded subset of the train split. Float buffers follow ``buffer_policy`` (`kernels.buffers`); ``recomputed``
estimates them on ``calibration_images`` test images of every task.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchvision import transforms

from paretomerge.kernels import ModuleSpec, TaskVectors
from paretomerge.kernels.buffers import CALIBRATION_IMAGES, DEFAULT_BUFFER_POLICY, calibration_set, check_policy
from paretomerge.suites import cache
from paretomerge.suites.clip import CLIPSuite
from paretomerge.suites.clip_data import open_task
from paretomerge.suites.importers import read_state_dict
from paretomerge.suites.loaders import derive_seed
from paretomerge.suites.tiny_resnet import finetune_resnet

MAP_TASKS = ("CIFAR10", "Flowers102", "GTSRB")
DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}
# torchvision's ImageNet preprocessing for ResNet-18 (its IMAGENET1K_V1 weights' transforms)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_transform(size: int = 224) -> transforms.Compose:
    return transforms.Compose([transforms.Lambda(lambda image: image.convert("RGB")), transforms.Resize(size),
                               transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ResNetSuite(CLIPSuite):
    """MAP's ResNet experiment: a torchvision ResNet per task, merged.

    pretrained:         θ0: a local torchvision ResNet state dict (``resnet18-f37072fd.pth``; its ``fc`` is dropped),
                        or None for random weights seeded by ``seed`` (tests).
    depth:              18 (the MAP paper's) or 34.
    data_root, tasks:   the datasets (`clip_data`'s layouts) and which of them (default CIFAR-10, Flowers-102, GTSRB).
    finetuned:          task -> a fine-tuned state dict file (its ``fc`` is the head); tasks not named are fine-tuned
                        here: ``finetune_steps`` steps of ``finetune_batch`` train images at ``finetune_lr``.
    buffer_policy:      ``recomputed`` (the default), ``merged`` or ``pretrained`` (`kernels.buffers`).
    calibration_images: test images (every task's, equal shares) that ``recomputed`` estimates statistics on.
    The rest are CLIPSuite's.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        depth: int = 18,
        data_root: str = "data",
        tasks: Sequence[str] = MAP_TASKS,
        finetuned: dict[str, str] | None = None,
        finetune_steps: int = 1000,
        finetune_lr: float = 1e-3,
        finetune_batch: int = 64,
        image_size: int = 224,
        buffer_policy: str = DEFAULT_BUFFER_POLICY,
        calibration_images: int = CALIBRATION_IMAGES,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        val_images: int = 512,
        num_workers: int = 4,
        seed: int = 0,
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        super(CLIPSuite, self).__init__()  # CLIPSuite's checks are for open_clip models; its loaders serve as they are
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {list(DEPTHS)}, got {depth!r}")
        tasks = self._task_list(list(tasks))
        extra = sorted(set(finetuned or {}) - set(tasks))
        if extra:
            raise ValueError(f"finetuned names tasks {extra} that are not in tasks={tasks}")
        check_policy(buffer_policy)
        for name, value, low in (("finetune_steps", finetune_steps, 1), ("finetune_batch", finetune_batch, 1),
                                 ("image_size", image_size, 8), ("calibration_images", calibration_images, 1),
                                 ("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                 ("val_images", val_images, 1), ("num_workers", num_workers, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int of at least {low}, got {value!r}")
        for path in [pretrained, *(finetuned or {}).values()]:
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{path!r} does not exist or is not a file (ResNetSuite reads local weights "
                                        "only; torchvision's ResNet-18 ImageNet weights are resnet18-f37072fd.pth)")
        self.save_hyperparameters()
        self.hparams["class_names"] = None  # CLIPSuite's override of the datasets' names, unused here
        self.tasks = tuple(tasks)
        self._task_vectors: TaskVectors | None = None
        self._inputs = None
        self._preprocess = imagenet_transform(image_size)
        self._splits: dict = {}
        self._decoded: dict = {}

    def _check_inputs(self) -> Any:
        if self._inputs is None:  # every dataset opens (or is refused with the layout it needs)
            self._inputs = {t: open_task(t, self.hparams.data_root, "test").class_names for t in self.tasks}
        return self._inputs

    def _spec(self) -> ModuleSpec:
        return ModuleSpec("paretomerge.kernels.builders:torchvision_resnet",
                          {"layers": DEPTHS[self.hparams.depth], "block": "basic", "num_classes": None})

    def _theta0(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.hparams.seed)
            model = self._spec().build()
        if self.hparams.pretrained is not None:
            state = read_state_dict(self.hparams.pretrained)
            model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
        return model.eval()

    def _load(self) -> TaskVectors:
        if self._task_vectors is not None:
            return self._task_vectors
        class_names = self._check_inputs()
        theta0 = self._theta0()
        states, heads = [], {}
        for task in self.tasks:
            given = (self.hparams.finetuned or {}).get(task)
            state = dict(read_state_dict(given)) if given else self._finetuned(theta0, task, len(class_names[task]))
            heads[task] = nn.Linear(state["fc.weight"].shape[1], state["fc.weight"].shape[0])
            heads[task].load_state_dict({"weight": state.pop("fc.weight"), "bias": state.pop("fc.bias")})
            states.append(state)
        total, share = self.hparams.calibration_images, max(1, self.hparams.calibration_images // len(self.tasks))
        per_task = {}
        for task in self.tasks:  # the first test images of every task (decoded): what recomputed estimates on
            dataset = self._split(task, "test").dataset
            per_task[task] = torch.stack([dataset[i][0] for i in range(min(share, len(dataset)))])
        self._task_vectors = TaskVectors.from_state_dicts(
            theta0, states, list(self.tasks), heads, backbone_spec=self._spec(),
            buffer_policy=self.hparams.buffer_policy, calibration=calibration_set(per_task, total))
        return self._task_vectors

    def _finetuned(self, theta0: nn.Module, task: str, num_classes: int) -> dict[str, Tensor]:
        """θ_k with its head as ``fc``, fine-tuned here (cached)."""
        hp = self.hparams
        config = {"suite": "resnet", "task": task, "depth": hp.depth, "seed": hp.seed, "steps": hp.finetune_steps,
                  "lr": hp.finetune_lr, "batch": hp.finetune_batch, "image_size": hp.image_size,
                  "pretrained": None if hp.pretrained is None else cache.file_sha256(Path(hp.pretrained)),
                  "data_root": str(Path(hp.data_root).resolve())}
        directory = cache.cache_root(hp.cache_dir) / "resnet" / cache.config_key(config)

        def build() -> tuple[dict, dict]:
            start = time.perf_counter()
            dataset = open_task(task, hp.data_root, "train", self._preprocess).dataset

            def batch_of(index: Tensor) -> tuple[Tensor, Tensor]:
                images, labels = zip(*(dataset[int(i)] for i in index), strict=True)
                return torch.stack(images), torch.as_tensor(labels)

            backbone, head = finetune_resnet(
                theta0, num_classes, batch_of, len(dataset), hp.finetune_steps, hp.finetune_lr, 0.05,
                hp.finetune_batch, derive_seed(hp.seed, task, "ft"), f"fine-tuning ResNet-{hp.depth} on {task}",
                self._progress, "cuda" if torch.cuda.is_available() else "cpu")
            state = backbone | {f"fc.{k}": v for k, v in head.items()}  # the head as the fine-tuned model's fc
            return {"state": state}, {"seconds": time.perf_counter() - start}

        return cache.read_or_build(directory, config, build, lambda tensors, _: dict(tensors["state"]),
                                   lambda message: rank_zero_info(f"ResNetSuite: {message}"))

