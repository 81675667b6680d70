"""The CLIP merging benchmarks' vision tasks, read from one data root with torchvision (ImageFolder for RESISC45): the
eight of the merging papers here, and the twelve TALL-masks adds in `clip_data_tall`.

Every task gives labeled ``train`` and ``test`` splits and its cleaned class names (`open_task`). Where the dataset
ships no train/test split (EuroSAT; RESISC45 without torchgeo's split files) the test split is a class-stratified
share of each class, listed in ``SPLITS`` below. A dataset that is not where it should be is refused
with the layout it needs and where to get it (`DatasetNotFoundError`).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.io.matlab import MatReadError
from torchvision import datasets as tvd
from torchvision.datasets.folder import ImageFolder

from paretomerge.suites import clip_data_tall
from paretomerge.suites.labeled_split import DatasetNotFoundError, LabeledSplit, clean_class_name

# Every task: the task_vectors paper's eight (in its order), then the six that TALL-masks adds for 14 tasks and the six
# more for 20, in TALL-masks' order (its ALL_DATASETS list, src/utils/variables_and_paths.py).
TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD",
         "STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013",
         "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST")
# The named task sets (FusionBench's names): each is the first 8, 14 or 20 of TASKS, a superset of the one before.
TASK_SETS = {"TA8": TASKS[:8], "TALL14": TASKS[:14], "TALL20": TASKS}
# Test share of each class where the dataset has no official split. The split has its own fixed seed, so every run
# (whatever its seed) evaluates on the same test images.
SPLITS = {"EuroSAT": 0.1, "RESISC45": 0.2}
SPLIT_SEED = 0
# What torchvision's readers raise for a missing or malformed file (its IDX reader asserts on a bad header; the CIFAR
# batches are pickles; Cars, SVHN and Flowers-102 keep their metadata in .mat files).
_UNREADABLE = (RuntimeError, OSError, ValueError, KeyError, EOFError, AssertionError, pickle.UnpicklingError,
               MatReadError)

# GTSRB's metadata has class ids only (folders 00000..00042); these are the signs they stand for.
GTSRB_NAMES = (
    "speed limit 20 km/h", "speed limit 30 km/h", "speed limit 50 km/h", "speed limit 60 km/h", "speed limit 70 km/h",
    "speed limit 80 km/h", "end of speed limit 80 km/h", "speed limit 100 km/h", "speed limit 120 km/h", "no passing",
    "no passing for vehicles over 3.5 tonnes", "right of way at the next intersection", "priority road", "yield",
    "stop", "no vehicles", "vehicles over 3.5 tonnes prohibited", "no entry", "general caution",
    "dangerous curve to the left", "dangerous curve to the right", "double curve", "bumpy road", "slippery road",
    "road narrows on the right", "road work", "traffic signals", "pedestrians", "children crossing",
    "bicycles crossing", "beware of ice or snow", "wild animals crossing", "end of all speed and passing limits",
    "turn right ahead", "turn left ahead", "ahead only", "go straight or right", "go straight or left", "keep right",
    "keep left", "roundabout mandatory", "end of no passing", "end of no passing for vehicles over 3.5 tonnes",
)


class _SVHN(tvd.SVHN):
    """torchvision's SVHN without the MD5 of the whole ``.mat`` on every load: a missing file is still refused, and a
    truncated one fails in ``scipy.io.loadmat``."""

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))


# ---------------------------------------------------------------------- one reader per task
def _sun397(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = tvd.SUN397(root, transform=transform)
    base = Path(data._data_dir)
    listing = base / ("Training_01.txt" if split == "train" else "Testing_01.txt")
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} (SUN397's official partition 1) is missing")
    wanted = {line.strip() for line in listing.read_text().splitlines() if line.strip()}
    files = ["/" + str(Path(f).relative_to(base).as_posix()) for f in data._image_files]
    # torchvision lists the files in file-system order; sorted, the split is the same on every machine
    indices = sorted((i for i, f in enumerate(files) if f in wanted), key=files.__getitem__)
    labels = np.asarray(data._labels)
    return LabeledSplit(data, labels, tuple(clean_class_name(c) for c in data.classes)).subset(indices)


def _cars(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = tvd.StanfordCars(root, split=split, transform=transform)
    return LabeledSplit(data, np.asarray([label for _, label in data._samples]), tuple(data.classes))


def _stratified(labels: np.ndarray, share: float, split: str) -> list[int]:
    """A seeded (`SPLIT_SEED`) test share of every class (at least one image), and the rest for train."""
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_SEED, 7919]))
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test = set(rng.permutation(members)[:max(1, round(share * len(members)))].tolist())
        chosen.extend(i for i in members if (i in test) == (split == "test"))
    return sorted(chosen)


def _resisc45(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    base = root / "resisc45"
    data = ImageFolder(base / "NWPU-RESISC45", transform=transform)
    labels = np.asarray(data.targets)
    names = tuple(clean_class_name(c) for c in data.classes)
    listings = {part: base / f"resisc45-{part}.txt" for part in ("train", "test")}  # torchgeo's split files
    if all(p.is_file() for p in listings.values()):
        wanted = {line.strip() for line in listings[split].read_text().splitlines() if line.strip()}
        indices = [i for i, (path, _) in enumerate(data.samples) if Path(path).name in wanted]
    else:
        indices = _stratified(labels, SPLITS["RESISC45"], split)
    return LabeledSplit(data, labels, names).subset(indices)


def _eurosat(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = tvd.EuroSAT(root, transform=transform)
    labels = np.asarray(data.targets)
    names = tuple(clean_class_name(c) for c in data.classes)
    return LabeledSplit(data, labels, names).subset(_stratified(labels, SPLITS["EuroSAT"], split))


def _svhn(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = _SVHN(root / "svhn", split=split, transform=transform)
    return LabeledSplit(data, np.asarray(data.labels), tuple(str(d) for d in range(10)))


def _gtsrb(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = tvd.GTSRB(root, split=split, transform=transform)
    return LabeledSplit(data, np.asarray([label for _, label in data._samples]), GTSRB_NAMES)


def _mnist(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = tvd.MNIST(root, train=split == "train", transform=transform)
    names = tuple(c.split(" - ")[0] for c in data.classes)  # "7 - seven" -> "7"
    return LabeledSplit(data, data.targets.numpy(), names)


def _dtd(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = tvd.DTD(root, split=split, partition=1, transform=transform)
    # DTD numbers the classes present in each split's file; the test split has all 47.
    reference = data if split == "test" else tvd.DTD(root, split="test", partition=1)
    if data.classes != reference.classes:
        raise FileNotFoundError(f"DTD's {split} and test label files list different classes")
    return LabeledSplit(data, np.asarray(data._labels), tuple(clean_class_name(c) for c in data.classes))


# task -> (reader, expected layout under the data root, where the data comes from)
_READERS: dict[str, tuple[Callable[..., LabeledSplit], str, str]] = {
    "SUN397": (_sun397, "SUN397/ClassName.txt, SUN397/Training_01.txt, SUN397/Testing_01.txt, "
                        "SUN397/<letter>/<class>/sun_*.jpg",
               "SUN397.tar.gz and Partitions.zip (unzipped into SUN397/) from https://vision.princeton.edu/projects/"
               "2010/SUN/; torchvision.datasets.SUN397(root, download=True) fetches the images"),
    "Cars": (_cars, "stanford_cars/devkit/cars_meta.mat, stanford_cars/devkit/cars_train_annos.mat, "
                    "stanford_cars/cars_test_annos_withlabels.mat, stanford_cars/cars_train/*.jpg, "
                    "stanford_cars/cars_test/*.jpg",
             "Stanford Cars (Krause et al., 2013) as torchvision.datasets.StanfordCars reads it; the original "
             "download links are gone, so use a mirror that keeps this layout"),
    "RESISC45": (_resisc45, "resisc45/NWPU-RESISC45/<class>/<class>_001.jpg (optional: resisc45/resisc45-train.txt "
                            "and resisc45-test.txt, torchgeo's split files)",
                 "NWPU-RESISC45 (Cheng et al., 2017), e.g. through torchgeo.datasets.RESISC45(download=True)"),
    "EuroSAT": (_eurosat, "eurosat/2750/<Class>/<Class>_<n>.jpg",
                "the RGB EuroSAT (Helber et al., 2019): torchvision.datasets.EuroSAT(root, download=True)"),
    "SVHN": (_svhn, "svhn/train_32x32.mat, svhn/test_32x32.mat",
             "torchvision.datasets.SVHN(root + '/svhn', split='train' and 'test', download=True)"),
    "GTSRB": (_gtsrb, "gtsrb/GTSRB/Training/<00000..00042>/*.ppm, gtsrb/GTSRB/Final_Test/Images/*.ppm, "
                      "gtsrb/GT-final_test.csv",
              "torchvision.datasets.GTSRB(root, split='train' and 'test', download=True)"),
    "MNIST": (_mnist, "MNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                      "t10k-labels-idx1-ubyte",
              "torchvision.datasets.MNIST(root, train=True and False, download=True)"),
    "DTD": (_dtd, "dtd/dtd/images/<class>/*.jpg, dtd/dtd/labels/train1.txt, test1.txt",
            "torchvision.datasets.DTD(root, split='train' and 'test', download=True)"),
    **clip_data_tall.READERS,
}
assert tuple(_READERS) == TASKS, "every task has one reader, in TASKS' order"


def open_task(task: str, root: str | os.PathLike, split: str, transform: Callable | None = None) -> LabeledSplit:
    """The labeled ``split`` (``train`` or ``test``) of ``task`` under ``root``."""
    if task not in _READERS:
        raise ValueError(f"unknown CLIP task {task!r}; choose from {list(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    reader, layout, source = _READERS[task]
    root = Path(root).expanduser()
    try:
        opened = reader(root, split, transform)
    except _UNREADABLE as err:
        reason = str(err) or f"a malformed file ({type(err).__name__} in torchvision's reader)"
        raise DatasetNotFoundError(
            f"{task} ({split} split) could not be read under the data root {str(root)!r}: {reason}\n"
            f"  expected layout under the data root: {layout}\n"
            f"  where it comes from: {source}"
        ) from err
    if len(opened) == 0:
        raise DatasetNotFoundError(f"{task} ({split} split) under {str(root)!r} has no images; expected layout: "
                                   f"{layout}")
    bad = opened.labels[(opened.labels < 0) | (opened.labels >= len(opened.class_names))]
    if len(bad):
        raise DatasetNotFoundError(f"{task} ({split} split) has label {int(bad[0])} but {len(opened.class_names)} "
                                   "class names: the files do not match their metadata")
    return opened

