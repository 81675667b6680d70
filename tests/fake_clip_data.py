"""Fabricate tiny, valid on-disk copies of eight CLIP-benchmark vision datasets.

Each layout matches what torchvision 0.29.1's dataset classes read with ``download=False``, so tests can run the
real loading code without the real data. Images are seeded random noise around a class-dependent mean colour.

Split sizes: every split holds ``per_class`` images of every fabricated class. Datasets that torchvision loads as a
single pool (SUN397, RESISC45, EuroSAT) get ``2 * per_class`` images per class, i.e. room for a train and a test half;
SUN397 also gets the official-style ``Training_01.txt`` / ``Testing_01.txt`` partition saying which half is which.

SVHN caveat: torchvision always checks the MD5 of ``train_32x32.mat`` / ``test_32x32.mat``, which no fabricated file
can pass; wrap the ``SVHN(...)`` call in :func:`svhn_md5_check_disabled`.

CLI: ``python -m tests.fake_clip_data ROOT [--tasks ...] [--per-class N] [--size S] [--num-classes C]``
"""

from __future__ import annotations

import argparse
import contextlib
import csv
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import scipy.io as sio
from PIL import Image

TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
DEFAULT_NUM_CLASSES = 3

# Real class names (first entries of each official list) so fabricated data looks like the real thing. SUN397 includes
# nested names early on because torchvision derives their labels from multi-level paths ("bakery/shop").
_NAMES = {
    "SUN397": ["abbey", "bakery/shop", "beach", "cathedral/indoor", "forest/broadleaf", "kitchen", "volcano"],
    "Cars": ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Acura TL Type-S 2008",
             "Acura TSX Sedan 2012", "Acura Integra Type R 2001", "Acura ZDX Hatchback 2012"],
    "RESISC45": ["airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral"],
    "EuroSAT": ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                "PermanentCrop", "Residential", "River", "SeaLake"],
    "DTD": ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed"],
}


def class_names(task: str, num_classes: int | None = None) -> list[str]:
    """Names fabricated for ``task`` in label order (GTSRB: its folder names; SVHN/MNIST: the digits as str)."""
    n = num_classes or DEFAULT_NUM_CLASSES
    if task in ("SVHN", "MNIST"):
        # 10-class formats: fabricate digits 0..n-1 (always includes 0, which SVHN stores as label 10).
        return [str(d) for d in range(min(max(n, 2), 10))]
    if task == "GTSRB":
        # torchvision labels the train split by *sorted folder index*, so folders must be 00000, 00001, ... to agree
        # with the ClassId column of the test CSV.
        return [f"{i:05d}" for i in range(n)]
    base = _NAMES[task]
    extra = {"SUN397": "synthetic_{}", "Cars": "Synthetic Car {} 2012"}.get(task, "class_{}")
    return base[:n] + [extra.format(i) for i in range(len(base), n)]


def _image(rng: np.random.Generator, label: int, size: int, mode: str = "RGB") -> np.ndarray:
    """Noise around a class-dependent mean colour (uint8, HxW or HxWx3)."""
    mean = np.array([(label * 67 + 40) % 256, (label * 131 + 90) % 256, (label * 197 + 160) % 256], dtype=np.float64)
    channels = 3 if mode == "RGB" else 1
    pixels = mean[:channels] + rng.normal(0.0, 30.0, size=(size, size, channels))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return pixels if mode == "RGB" else pixels[..., 0]


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)  # format from the suffix: .jpg / .ppm


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def _sun397(root: Path, names: list[str], per_class: int, size: int, rng: np.random.Generator) -> None:
    data = root / "SUN397"
    # torchvision strips the first 3 chars ("/a/") of each line to get the class name.
    _write_lines(data / "ClassName.txt", (f"/{name[0]}/{name}" for name in names))
    halves: dict[str, list[str]] = {"Training_01.txt": [], "Testing_01.txt": []}
    for label, name in enumerate(names):
        for i in range(2 * per_class):
            # Official files are sun_ + 16 lowercase letters; torchvision only globs "sun_*.jpg".
            stem = "".join(chr(ord("a") + int(c)) for c in f"{label:08d}{i:08d}")
            rel = f"/{name[0]}/{name}/sun_{stem}.jpg"
            _save(data / rel[1:], _image(rng, label, size))
            halves["Training_01.txt" if i < per_class else "Testing_01.txt"].append(rel)
    for fname, lines in halves.items():
        _write_lines(data / fname, lines)


def _cars(root: Path, names: list[str], per_class: int, size: int, rng: np.random.Generator) -> None:
    if len(names) < 2:
        # loadmat(squeeze_me=True) turns a 1-element cell into a bare str, so `classes` would not be a list.
        raise ValueError("Cars needs num_classes >= 2")
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    # A cell array (object ndarray) is what the real devkit holds; a plain list of str would be saved as a char matrix.
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object).reshape(1, -1)})
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    # The test annotations sit next to devkit/, not inside it (that is where torchvision looks).
    for split, mat in (("train", base / "devkit" / "cars_train_annos.mat"),
                       ("test", base / "cars_test_annos_withlabels.mat")):
        annos = np.zeros((1, per_class * len(names)), dtype=[(f, object) for f in fields])
        class_dtype = np.uint8 if len(names) < 256 else np.uint16  # the real devkit stores uint8
        for k in range(annos.shape[1]):
            label = k // per_class
            fname = f"{k + 1:05d}.jpg"
            _save(base / f"cars_{split}" / fname, _image(rng, label, size))
            annos[0, k] = (np.uint8(0), np.uint8(0), np.uint16(size - 1), np.uint16(size - 1), class_dtype(label + 1),
                           fname)  # "class" is 1-based
        sio.savemat(mat, {"annotations": annos})


def _folder_tree(base: Path, names: list[str], count: int, size: int, rng: np.random.Generator, fmt: str) -> None:
    for label, name in enumerate(names):
        for i in range(count):
            _save(base / name / fmt.format(name=name, i=i + 1), _image(rng, label, size))


def _svhn(root: Path, digits: list[str], per_class: int, size: int, rng: np.random.Generator) -> None:
    for split in ("train", "test"):
        labels = np.repeat([int(d) for d in digits], per_class)
        # X is H x W x C x N; y is N x 1 with digit 0 stored as 10 (torchvision maps it back to 0).
        x = np.stack([_image(rng, int(d), size) for d in labels], axis=-1)
        y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        path = root / "svhn" / f"{split}_32x32.mat"
        path.parent.mkdir(parents=True, exist_ok=True)
        sio.savemat(path, {"X": x, "y": y})


def _mnist(root: Path, digits: list[str], per_class: int, size: int, rng: np.random.Generator) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        labels = np.repeat([int(d) for d in digits], per_class).astype(np.uint8)
        images = np.stack([_image(rng, int(d), size, mode="L") for d in labels])
        # IDX format: magic 0x0000 <type 0x08=uint8> <ndim>, then big-endian int32 dims, then raw bytes.
        header = np.array([0x0803, *images.shape], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = np.array([0x0801, len(labels)], dtype=">i4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())


def _gtsrb(root: Path, names: list[str], per_class: int, size: int, rng: np.random.Generator) -> None:
    base = root / "gtsrb"
    # Real files: Training/<class>/<track>_<image>.ppm; the per-class GT-*.csv files are not read by torchvision.
    _folder_tree(base / "GTSRB" / "Training", names, per_class, size, rng, "00000_{i:05d}.ppm")
    rows = []
    for k in range(per_class * len(names)):
        label = k // per_class
        fname = f"{k:05d}.ppm"
        _save(base / "GTSRB" / "Final_Test" / "Images" / fname, _image(rng, label, size))
        rows.append([fname, size, size, 0, 0, size - 1, size - 1, label])
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        writer.writerows(rows)


def _dtd(root: Path, names: list[str], per_class: int, size: int, rng: np.random.Generator) -> None:
    data = root / "dtd" / "dtd"
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(names):
        for s, split in enumerate(splits):
            for i in range(per_class):
                rel = f"{name}/{name}_{s * per_class + i + 1:04d}.jpg"
                _save(data / "images" / rel, _image(rng, label, size))
                splits[split].append(rel)
    for split, lines in splits.items():
        _write_lines(data / "labels" / f"{split}1.txt", lines)


def write_fake_dataset(task: str, root: str | Path, num_classes: int | None = None, per_class: int = 2,
                       size: int = 32, seed: int = 0) -> None:
    """Write ``task``'s fake layout under ``root`` (the directory passed to torchvision, except SVHN: root/svhn)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if per_class < 1:
        raise ValueError("per_class must be >= 1 so every split holds every class")
    root = Path(root)
    names = class_names(task, num_classes)
    # Per-task stream so adding or removing tasks does not change the others' pixels.
    rng = np.random.default_rng([seed, TASKS.index(task)])
    if task == "SUN397":
        _sun397(root, names, per_class, size, rng)
    elif task == "Cars":
        _cars(root, names, per_class, size, rng)
    elif task == "RESISC45":
        _folder_tree(root / "resisc45" / "NWPU-RESISC45", names, 2 * per_class, size, rng, "{name}_{i:03d}.jpg")
    elif task == "EuroSAT":
        _folder_tree(root / "eurosat" / "2750", names, 2 * per_class, size, rng, "{name}_{i}.jpg")
    elif task == "SVHN":
        _svhn(root, names, per_class, size, rng)
    elif task == "GTSRB":
        _gtsrb(root, names, per_class, size, rng)
    elif task == "MNIST":
        _mnist(root, names, per_class, size, rng)
    else:
        _dtd(root, names, per_class, size, rng)


def write_fake_datasets(root: str | Path, tasks: Iterable[str] = TASKS, **kwargs) -> None:
    for task in tasks:
        write_fake_dataset(task, root, **kwargs)


@contextlib.contextmanager
def svhn_md5_check_disabled() -> Iterator[None]:
    """Let ``torchvision.datasets.SVHN`` accept fabricated .mat files (it otherwise demands the official MD5)."""
    from torchvision.datasets import SVHN

    original = SVHN.split_list
    SVHN.split_list = {split: [url, fname, None] for split, (url, fname, _) in original.items()}
    try:
        yield
    finally:
        SVHN.split_list = original


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_fake_datasets(args.root, args.tasks, num_classes=args.num_classes, per_class=args.per_class,
                        size=args.size, seed=args.seed)


if __name__ == "__main__":
    main()
