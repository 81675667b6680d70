"""`CLIPSuite`: the papers' setup. An open_clip visual tower, zero-shot heads, the vision tasks (the papers' eight, or
TALL-masks' 14 or 20), and fine-tuned checkpoints in the formats people share.

    <data_root>/                     the datasets, each in torchvision's own layout (`clip_data`)
    <checkpoint_dir>/<task>/         one fine-tuned visual tower per task, the first of CHECKPOINT_NAMES found
                                     (or <checkpoint_dir>/<task>.safetensors|.pt|.bin, or finetuned={task: path})

θ0 is the pretrained visual tower: an open_clip pretrained tag that is already in the local cache (nothing is
downloaded), a local whole-CLIP checkpoint file, or random weights (``pretrained: null``, for tests). The text tower
of the same weights builds each task's zero-shot head once; heads are cached as safetensors under
``<cache>/clip_heads/<hash>`` and the text tower is freed before the fine-tuned checkpoints are streamed in.

Splits per task: ``test`` (labeled; its images without labels are the adaptation data, as in the papers) and
``val`` (a seeded subset of ``val_images`` images of the train split).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_only
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from paretomerge.kernels import ModuleSpec, TaskVectors
from paretomerge.progress import progress_bar
from paretomerge.suites import cache
from paretomerge.suites.clip_data import TASK_SETS, TASKS, LabeledSplit, open_task
from paretomerge.suites.importers import PickledCheckpointError, read_visual_state_dict
from paretomerge.suites.loaders import derive_seed, epoch_shuffle, top1_accuracy
from paretomerge.suites.zeroshot import TEMPLATES, class_embeddings, zero_shot_head

MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
# Looked for, in this order, in <checkpoint_dir>/<task>/: ours, Hugging Face's, the task_vectors release's.
CHECKPOINT_NAMES = ("finetuned.safetensors", "model.safetensors", "pytorch_model.bin", "finetuned.pt")
HEADS_VERSION = 1


def preprocess_transform(model: str, pretrained: str | None) -> Callable:
    """open_clip's evaluation preprocessing for ``model`` with the pretrained tag's own normalisation (mean, std,
    interpolation, resize mode; OpenAI's where the tag sets none), built without creating the model."""
    image_size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    tag = open_clip.get_pretrained_cfg(model, pretrained) if pretrained and not Path(pretrained).is_file() else {}
    overrides = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
    return image_transform_v2(PreprocessCfg(size=image_size, **overrides), is_train=False)


def resolve_pretrained(model: str, pretrained: str | None) -> tuple[str | None, bool, str]:
    """``(file to load or None, the weights' quick_gelu, an identity for cache keys)`` for ``pretrained``: None
    (random weights), a local file, or an open_clip tag whose weights are in the Hugging Face hub cache (never
    downloaded). A local file gets ``quick_gelu=False``: set the suite's ``quick_gelu`` for OpenAI-derived weights."""
    if pretrained is None:
        return None, False, "random"
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), False, f"sha256:{cache.file_sha256(path)}"
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        raise ValueError(f"pretrained={pretrained!r} is neither a file nor an open_clip tag of {model}; tags: "
                         f"{open_clip.list_pretrained_tags_by_model(model)}")
    quick_gelu, identity = bool(cfg.get("quick_gelu", False)), f"{model}:{pretrained}"
    looked = []
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" names the default files
        names = (filename,) if filename else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        for name in names:
            found = try_to_load_from_cache(repo, name)
            looked.append(f"Hugging Face cache {repo}/{name}")
            if isinstance(found, str):
                return found, quick_gelu, identity
    raise FileNotFoundError(
        f"the open_clip weights {model} / {pretrained!r} are not in the local cache (looked at: {'; '.join(looked)}). "
        f"paretomerge never downloads at run time: fetch them once with python -c \"import open_clip; "
        f"open_clip.create_model('{model}', pretrained='{pretrained}')\" on a machine with network access, or pass "
        "a local whole-CLIP checkpoint file as pretrained"
    )


def load_task_vectors(visual: nn.Module, paths: Mapping[str, str | os.PathLike], heads: Mapping[str, nn.Module],
                      spec: ModuleSpec, allow_pickle: bool = False, progress: bool = False) -> TaskVectors:
    """`TaskVectors` of the pretrained ``visual`` tower (kept, not copied) and one fine-tuned checkpoint per task
    (``paths``, in task order), streamed: one checkpoint is in memory at a time, so the peak is θ0, the K stacks and one
    checkpoint (``benchmarks/bench_load_memory.py`` measures it)."""
    theta0 = visual.state_dict()
    bar = progress_bar(total=len(paths), desc="loading fine-tuned checkpoints", enabled=progress)
    current: list[str] = []

    def reader(task: str) -> Callable[[], dict[str, Tensor]]:
        def read() -> dict[str, Tensor]:
            current[:] = [task]
            bar.set_postfix_str(task)
            state = read_visual_state_dict(paths[task], theta0, allow_pickle=allow_pickle)
            bar.update()
            return state
        return read

    try:
        return TaskVectors.from_state_dicts(visual, [reader(t) for t in paths], list(paths), heads,
                                            backbone_spec=spec, copy_backbone=False)
    except (ValueError, KeyError, TypeError) as err:
        if not current or isinstance(err, PickledCheckpointError) or str(paths[current[0]]) in str(err):
            raise
        raise type(err)(f"{err} (checkpoint {str(paths[current[0]])!r})") from err
    finally:
        bar.close()


class _Images(Dataset):
    """The images of a labeled dataset, without labels (the adaptation data)."""

    def __init__(self, labeled: Dataset) -> None:
        self.labeled = labeled

    def __len__(self) -> int:
        return len(self.labeled)

    def __getitem__(self, index: int) -> Tensor:
        return self.labeled[index][0]


class CLIPSuite(LightningDataModule):
    """The CLIP merging problem on the papers' eight tasks, TALL-masks' 14 or 20, or any list of those tasks.

    model:          open_clip model name: ``ViT-B-32``, ``ViT-B-16`` or ``ViT-L-14``.
    pretrained:     θ0 and the text tower: an open_clip tag in the local cache (``openai``), a local whole-CLIP
                    checkpoint (open_clip keys, safetensors or a weights-only torch file), or None for random
                    weights seeded by ``seed``.
    data_root:      the datasets, each in torchvision's layout (see docs/clip.md and `clip_data`).
    checkpoint_dir: fine-tuned visual towers, ``<checkpoint_dir>/<task>/<one of CHECKPOINT_NAMES>``; open_clip keys,
                    Hugging Face ``CLIPVisionModel`` keys, or (with ``allow_pickle``) task_vectors' pickled modules.
    finetuned:      task -> checkpoint path, overriding ``checkpoint_dir`` for those tasks.
    tasks:          a named task set of `clip_data.TASK_SETS` (``TA8``, the default: the papers' eight; ``TALL14``;
                    ``TALL20``) or a list of tasks of `clip_data.TASKS`, in the order given.
    allow_pickle:   load pickled checkpoints (task_vectors' release). Unpickling runs code from the file.
    quick_gelu:     QuickGELU activations (OpenAI's weights use them); None takes the pretrained tag's setting
                    (False for a local file).
    templates:      task -> prompt templates (``"a photo of a {}."``) replacing ours (`zeroshot.TEMPLATES`), e.g.
                    those the fine-tuned checkpoints' heads were built with.
    class_names:    task -> class names replacing the cleaned metadata names (same count and order).
    batch_size:     unlabeled adaptation images per task per training step (SPEC: 32, the paper's; AdaMerging's loop
                    draws two batches of 16).
    val_images:     labeled validation images per task, drawn (seeded) from the train split.
    num_workers:    DataLoader workers per task loader.
    seed:           seeds the validation subsets, the split of datasets without one, the shuffles and random θ0.
    cache_dir:      cache root for the zero-shot heads (default ``$PARETOMERGE_CACHE`` or ``~/.cache/paretomerge``).
    """

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        data_root: str = "data",
        checkpoint_dir: str | None = None,
        finetuned: dict[str, str] | None = None,
        tasks: str | Sequence[str] | None = None,
        allow_pickle: bool = False,
        quick_gelu: bool | None = None,
        templates: dict[str, list[str]] | None = None,
        class_names: dict[str, list[str]] | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        val_images: int = 512,
        num_workers: int = 4,
        seed: int = 0,
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if model not in MODELS:
            raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
        tasks = self._task_list("TA8" if tasks is None else tasks)
        extra = sorted(set(finetuned or {}) - set(tasks))
        if extra:
            raise ValueError(f"finetuned names tasks {extra} that are not in tasks={tasks}")
        for name, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                 ("val_images", val_images, 1), ("num_workers", num_workers, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a {'positive' if low else 'non-negative'} int, got {value!r}")
        for name, overrides in (("templates", templates), ("class_names", class_names)):
            extra = sorted(set(overrides or {}) - set(tasks))
            if extra:
                raise ValueError(f"{name} names tasks {extra} that are not in tasks={tasks}")
            for task, values in (overrides or {}).items():
                if isinstance(values, str) or not values or not all(isinstance(v, str) and v for v in values):
                    raise ValueError(f"{name}[{task!r}] must be a non-empty list of non-empty strings, got {values!r}")
        for task, values in (templates or {}).items():
            if not all("{}" in v for v in values):
                raise ValueError(f"templates[{task!r}]: every template needs a '{{}}' for the class name, got {values}")
        self.save_hyperparameters()
        self.tasks = tuple(tasks)
        self._task_vectors: TaskVectors | None = None
        self._inputs: tuple[dict[str, tuple[str, ...]], dict[str, Path], tuple[str | None, bool, str]] | None = None
        self._preprocess: Callable | None = None
        self._splits: dict[tuple[str, str], LabeledSplit] = {}
        self._decoded: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}

    @staticmethod
    def _task_list(tasks: str | Sequence[str]) -> list[str]:
        if isinstance(tasks, str):
            if tasks not in TASK_SETS:
                raise ValueError(f"tasks={tasks!r} is not a task set; name one of {list(TASK_SETS)} or list tasks of "
                                 f"{list(TASKS)}")
            return list(TASK_SETS[tasks])
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or len(tasks) < 2 or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must name at least 2 distinct tasks of {list(TASKS)}, or a task set of "
                             f"{list(TASK_SETS)}, got {tasks}")
        return tasks

    # ------------------------------------------------------------------ loading
    def prepare_data(self) -> None:
        """Check everything that can be missing (datasets, checkpoints, cached weights) once per node, before any
        process loads the weights; ``setup`` loads them."""
        self._check_inputs()

    def setup(self, stage: str) -> None:
        self._load()

    def _check_inputs(self) -> tuple[dict[str, tuple[str, ...]], dict[str, Path], tuple[str | None, bool, str]]:
        """(task -> class names, task -> checkpoint, the resolved pretrained weights); refuses what is missing.
        Kept once it succeeds: ``prepare_data`` and ``setup`` both need it, and hashing a local weights file is slow."""
        if self._inputs is None:
            hp = self.hparams
            names = {t: self._class_names_of(t, open_task(t, hp.data_root, "test").class_names) for t in self.tasks}
            self._inputs = names, self.checkpoint_paths(), resolve_pretrained(hp.model, hp.pretrained)
        return self._inputs

    def _class_names_of(self, task: str, metadata: tuple[str, ...]) -> tuple[str, ...]:
        override = (self.hparams.class_names or {}).get(task)
        if override is None:
            return metadata
        if len(override) != len(metadata):
            raise ValueError(f"class_names[{task!r}] has {len(override)} names but the dataset has {len(metadata)} "
                             f"classes ({', '.join(metadata[:3])}, ...)")
        return tuple(override)

    @property
    def _progress(self) -> bool:
        return bool(self.hparams.progress) and rank_zero_only.rank == 0  # one set of bars under DDP

    def _load(self) -> TaskVectors:
        if self._task_vectors is not None:
            return self._task_vectors
        hp = self.hparams
        # Everything that can be missing is checked before the model is built.
        class_names, paths, (file, tag_quick_gelu, identity) = self._check_inputs()
        quick_gelu = tag_quick_gelu if hp.quick_gelu is None else bool(hp.quick_gelu)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)  # random θ0 (pretrained=None) is a function of the seed
            try:
                clip_model = open_clip.create_model(hp.model, pretrained=file, force_quick_gelu=quick_gelu)
            except (RuntimeError, ValueError, KeyError, OSError) as err:
                raise ValueError(f"cannot load the pretrained {hp.model} weights from {file!r} (pretrained="
                                 f"{hp.pretrained!r}): {err}") from err
        clip_model.eval()
        if identity == "random":
            identity = f"random:seed={hp.seed}"
        heads = {t: self._head(clip_model, t, class_names[t], identity, quick_gelu) for t in self.tasks}
        visual = clip_model.visual
        del clip_model  # frees the text tower before the fine-tuned weights arrive
        spec = ModuleSpec("open_clip:create_model",
                          {"model_name": hp.model, "pretrained": None, "force_quick_gelu": quick_gelu}, attr="visual")
        self._task_vectors = load_task_vectors(visual, {t: paths[t] for t in self.tasks}, heads, spec,
                                               allow_pickle=hp.allow_pickle, progress=self._progress)
        rank_zero_info(f"CLIPSuite: {hp.model} ({hp.pretrained or 'random weights'}), tasks {', '.join(self.tasks)}; "
                       f"task vectors {self._task_vectors.nbytes() / 2**20:.0f} MiB")
        return self._task_vectors

    def checkpoint_paths(self) -> dict[str, Path]:
        """task -> the fine-tuned checkpoint that will be read; refuses a task with none, listing where it looked."""
        hp, paths = self.hparams, {}
        for task in self.tasks:
            if task in (hp.finetuned or {}):
                candidates = [Path(hp.finetuned[task]).expanduser()]
            elif hp.checkpoint_dir is not None:
                root = Path(hp.checkpoint_dir).expanduser()
                candidates = [root / task / name for name in CHECKPOINT_NAMES]
                candidates += [root / f"{task}{suffix}" for suffix in (".safetensors", ".pt", ".bin")]
            else:
                raise FileNotFoundError(f"no fine-tuned checkpoint for task {task!r}: set checkpoint_dir (laid out "
                                        f"as <checkpoint_dir>/{task}/finetuned.safetensors) or finetuned: "
                                        f"{{{task}: path}}")
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise FileNotFoundError(f"no fine-tuned checkpoint for task {task!r}; looked for "
                                        + ", ".join(str(c) for c in candidates))
            paths[task] = found
        return paths

    def _head(self, clip_model: nn.Module, task: str, names: Sequence[str], identity: str,
              quick_gelu: bool) -> nn.Module:
        """The zero-shot head of ``task``, from the cache or built with the text tower (and then cached)."""
        config = {"suite": "clip-heads", "version": HEADS_VERSION, "model": self.hparams.model, "weights": identity,
                  "quick_gelu": quick_gelu, "task": task, "class_names": list(names),
                  "templates": list(self._templates(task))}
        path = cache.cache_root(self.hparams.cache_dir) / "clip_heads" / cache.config_key(config)

        def build() -> tuple[dict, dict]:
            weights = class_embeddings(clip_model, open_clip.get_tokenizer(self.hparams.model), names,
                                       self._templates(task), progress=self._progress,
                                       description=f"zero-shot head {task}")
            return {"head": {"weight": weights}}, {}

        def load(tensors: dict, documents: dict) -> nn.Module:
            if "weight" not in tensors.get("head", {}):
                raise cache.CacheError(f"{path} holds no head weights")
            return zero_shot_head(tensors["head"]["weight"])

        return cache.read_or_build(path, config, build, load)

    def _templates(self, task: str) -> Sequence[str]:
        return (self.hparams.templates or {}).get(task) or TEMPLATES[task]

    # ------------------------------------------------------------------ what users call
    def task_vectors(self) -> TaskVectors:
        """θ0, τ ``[K, *shape]`` and the zero-shot heads."""
        return self._load()

    @property
    def class_names(self) -> dict[str, tuple[str, ...]]:
        """task -> the class names its zero-shot head is built from (cleaned metadata, or ``class_names``)."""
        return {t: self._class_names_of(t, self._split(t, "test").class_names) for t in self.tasks}

    def _split(self, task: str, split: str) -> LabeledSplit:
        """The labeled ``test`` or ``val`` split of ``task``, with the open_clip preprocessing."""
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        if (task, split) not in self._splits:
            hp = self.hparams
            if self._preprocess is None:
                self._preprocess = preprocess_transform(hp.model, hp.pretrained)
            if split == "test":
                self._splits[task, split] = open_task(task, hp.data_root, "test", self._preprocess)
            else:
                train = open_task(task, hp.data_root, "train", self._preprocess)
                rng = np.random.default_rng(derive_seed(hp.seed, task, "val"))
                chosen = np.sort(rng.permutation(len(train))[:hp.val_images])
                self._splits[task, split] = train.subset(chosen.tolist())
        return self._splits[task, split]

    def _loader(self, dataset: Dataset, persistent: bool = False, **kwargs: Any) -> DataLoader:
        workers = self.hparams.num_workers
        return StatefulDataLoader(dataset, num_workers=workers, persistent_workers=persistent and workers > 0,
                          pin_memory=torch.cuda.is_available(), **kwargs)

    def evaluate(self, net: nn.Module, split: str = "test", tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Top-1 accuracy per task of ``net(images, task=name) -> logits`` (e.g. ``model.at(pref)``)."""
        unknown = [t for t in tasks or () if t not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; this suite has {list(self.tasks)}")
        device = next(net.parameters()).device
        return {task: top1_accuracy(lambda x, task=task: net(x.to(device), task=task), self._batches(task, split))
                for task in tasks or self.tasks}

    def _batches(self, task: str, split: str) -> DataLoader:
        """Labeled batches of ``task``: the validation images decoded once and kept (every front evaluation and
        validation reuses them), the test split decoded by the loader's workers each time (it is large)."""
        if split == "val":
            return DataLoader(TensorDataset(*self.labeled("val")[task]), batch_size=self.hparams.eval_batch_size)
        return self._loader(self._split(task, split).dataset, batch_size=self.hparams.eval_batch_size)

    def labeled(self, split: str = "val") -> dict[str, tuple[Tensor, Tensor]]:
        """task -> (images ``[N, 3, H, W]``, labels ``[N]``), decoded once and kept in memory (validation, the front
        logger and MAP evaluate on it: at 224×224, 600 kB per image, so 8 tasks × 512 validation images hold 2.4 GB
        and 20 tasks 6.1 GB; the whole test split of the eight tasks would hold about 50 GB, so evaluate it with
        `evaluate` instead)."""
        if split not in self._decoded:
            decoded = {}
            for task in self.tasks:
                loader = self._loader(self._split(task, split).dataset, batch_size=self.hparams.eval_batch_size)
                batches = list(progress_bar(loader, desc=f"decoding {task} ({split})", enabled=self._progress))
                decoded[task] = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
            self._decoded[split] = decoded
        return self._decoded[split]

    # ------------------------------------------------------------------ Lightning's loaders
    def train_dataloader(self) -> CombinedLoader:
        """The unlabeled adaptation data (each task's test images): task -> ``[B, 3, H, W]`` batches, reshuffled every
        epoch by ``(seed, task, epoch)``."""
        loaders = {}
        for task in self.tasks:
            images = _Images(self._split(task, "test").dataset)
            if len(images) < self.hparams.batch_size:
                raise ValueError(f"task {task!r} has {len(images)} test images, fewer than batch_size="
                                 f"{self.hparams.batch_size}")
            order = epoch_shuffle(self, len(images), derive_seed(self.hparams.seed, task, "order"))
            loaders[task] = self._loader(images, persistent=True, batch_size=self.hparams.batch_size,
                                         drop_last=True, sampler=order)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _labeled_loaders(self, split: str) -> CombinedLoader:
        return CombinedLoader({t: self._batches(t, split) for t in self.tasks}, mode="max_size")

    def val_dataloader(self) -> CombinedLoader:
        return self._labeled_loaders("val")

    def test_dataloader(self) -> CombinedLoader:
        return self._labeled_loaders("test")

