"""Fabricate tiny, valid on-disk copies of the CLIP-benchmark vision datasets: the papers' eight and the twelve that
TALL-masks adds.

Each layout matches what torchvision 0.29.1's dataset classes read with ``download=False``, so tests can run the
real loading code without the real data. Images are seeded random noise around a class-dependent mean colour. Formats
with a fixed image size (CIFAR 32, STL-10 and PCAM 96, FER2013 48) ignore ``size``.

Split sizes: every split holds ``per_class`` images of every fabricated class. Datasets that torchvision loads as a
single pool (SUN397, RESISC45, EuroSAT) get ``2 * per_class`` images per class, i.e. room for a train and a test half;
SUN397 also gets the official-style ``Training_01.txt`` / ``Testing_01.txt`` partition saying which half is which.

SVHN caveat: torchvision always checks the MD5 of ``train_32x32.mat`` / ``test_32x32.mat``, which no fabricated file
can pass; wrap the ``SVHN(...)`` call in :func:`svhn_md5_check_disabled`. CIFAR, STL-10, Flowers-102 and FER2013 have
the same check; ``paretomerge.suites.clip_data_tall``'s readers skip it. PCAM's HDF5 files need h5py to be written.

CLI: ``python -m tests.fake_clip_data ROOT [--tasks ...] [--per-class N] [--size S] [--num-classes C]``
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import scipy.io as sio
from PIL import Image
from torchvision import datasets as tvd

TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD",
         "STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013",
         "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST")
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
    "STL10": ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"],
    "CIFAR10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "CIFAR100": ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee"],
    "Food101": ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad", "beignets"],
    # Image-id stems: the cats' breeds are capitalised, the dogs' not (torchvision title-cases them).
    "OxfordIIITPet": ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal",
                      "Birman"],
}
# Datasets whose class list is fixed (the files hold only label ids): their labels 0..n-1 stand for these.
_FIXED = {"Flowers102": list(tvd.Flowers102.classes), "KMNIST": list(tvd.KMNIST.classes),
          "FashionMNIST": list(tvd.FashionMNIST.classes), "EMNIST": [str(d) for d in range(10)],
          "FER2013": ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"],
          "PCAM": ["normal", "metastatic"], "RenderedSST2": ["negative", "positive"]}


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
    if task in ("PCAM", "RenderedSST2"):
        return list(_FIXED[task])  # binary
    if task in _FIXED:
        return _FIXED[task][:min(max(n, 2), len(_FIXED[task]))]
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


def _idx(raw: Path, prefixes: tuple[str, str], labels: list[int], per_class: int, size: int,
         rng: np.random.Generator) -> None:
    """MNIST's IDX files (also KMNIST's, Fashion-MNIST's, EMNIST's): ``<prefix>-{images-idx3,labels-idx1}-ubyte``."""
    raw.mkdir(parents=True, exist_ok=True)
    for prefix in prefixes:
        targets = np.repeat(labels, per_class).astype(np.uint8)
        images = np.stack([_image(rng, int(d), size, mode="L") for d in targets])
        # IDX format: magic 0x0000 <type 0x08=uint8> <ndim>, then big-endian int32 dims, then raw bytes.
        header = np.array([0x0803, *images.shape], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = np.array([0x0801, len(targets)], dtype=">i4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + targets.tobytes())


def _mnist(root: Path, digits: list[str], per_class: int, size: int, rng: np.random.Generator) -> None:
    _idx(root / "MNIST" / "raw", ("train", "t10k"), [int(d) for d in digits], per_class, size, rng)


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


# ---------------------------------------------------------------------- the twelve TALL-masks adds
def _pickle(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)  # the official batches are Python 2 pickles


def _cifar(root: Path, task: str, names: list[str], per_class: int, rng: np.random.Generator) -> None:
    """Pickled dicts: ``data`` [N, 3072] uint8 (the R, G and B planes of a 32x32 image), labels as a list."""
    ten = task == "CIFAR10"
    base = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"],
             "test": ["test_batch" if ten else "test"]}
    for batches in files.values():
        labels = np.repeat(np.arange(len(names)), per_class)
        for name, part in zip(batches, np.array_split(rng.permutation(labels), len(batches)), strict=True):
            planes = [_image(rng, int(k), 32).transpose(2, 0, 1).reshape(-1) for k in part]
            data = np.array(planes, dtype=np.uint8).reshape(-1, 3072)  # a batch may be empty
            key = "labels" if ten else "fine_labels"
            entry = {"batch_label": name, key: [int(k) for k in part], "data": data,
                     "filenames": [f"{name}_{i}.png" for i in range(len(part))]}
            if not ten:
                entry["coarse_labels"] = [0] * len(part)
            _pickle(base / name, entry)
    meta = {"label_names": names} if ten else {"fine_label_names": names, "coarse_label_names": ["coarse"]}
    _pickle(base / ("batches.meta" if ten else "meta"), meta)


def _stl10(root: Path, names: list[str], per_class: int, rng: np.random.Generator) -> None:
    """``<split>_X.bin``: uint8 [N, 3, 96, 96], each plane stored column by column; ``<split>_y.bin``: 1-based."""
    base = root / "stl10_binary"
    base.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        labels = np.repeat(np.arange(len(names)), per_class)
        images = np.stack([_image(rng, int(k), 96).transpose(2, 1, 0) for k in labels])  # [N, C, W, H]
        (base / f"{split}_X.bin").write_bytes(images.tobytes())
        (base / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    _write_lines(base / "class_names.txt", names)


def _flowers102(root: Path, names: list[str], per_class: int, size: int, rng: np.random.Generator) -> None:
    """``jpg/image_<id>.jpg``, ``imagelabels.mat`` (1-based label of every id) and ``setid.mat`` (the ids per split)."""
    if per_class * len(names) < 2:
        raise ValueError("Flowers102 needs 2 images per split (loadmat(squeeze_me=True) turns 1 id into a scalar)")
    base = root / "flowers-102"
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    for split in ids:
        for label in np.repeat(np.arange(len(names)), per_class):
            labels.append(int(label) + 1)
            ids[split].append(len(labels))
            _save(base / "jpg" / f"image_{len(labels):05d}.jpg", _image(rng, int(label), size))
    sio.savemat(base / "imagelabels.mat", {"labels": np.array(labels, dtype=np.uint8).reshape(1, -1)})
    sio.savemat(base / "setid.mat", {k: np.array(v, dtype=np.uint16).reshape(1, -1) for k, v in ids.items()})


def _oxford_pet(root: Path, names: list[str], per_class: int, size: int, rng: np.random.Generator) -> None:
    """``images/<stem>_<n>.jpg``; ``annotations/{trainval,test}.txt`` lines: ``<image> <class> <species> <breed>``."""
    base = root / "oxford-iiit-pet"
    for s, split in enumerate(("trainval", "test")):
        lines = []
        for label, name in enumerate(names):
            species = 1 if name[0].isupper() else 2  # 1 cat, 2 dog
            for i in range(per_class):
                image = f"{name}_{s * per_class + i + 1}"
                _save(base / "images" / f"{image}.jpg", _image(rng, label, size))
                lines.append(f"{image} {label + 1} {species} {label + 1}")
        _write_lines(base / "annotations" / f"{split}.txt", lines)


def _pcam(root: Path, per_class: int, rng: np.random.Generator) -> None:
    """``camelyonpatch_level_2_split_<split>_x.h5`` (``x`` [N, 96, 96, 3] uint8) and ``_y.h5`` (``y`` [N, 1, 1, 1])."""
    try:
        import h5py
    except ImportError as err:
        raise ImportError("writing PCAM's HDF5 files needs h5py: pip install h5py") from err
    base = root / "pcam"
    base.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        labels = np.repeat([0, 1], per_class).astype(np.uint8)
        with h5py.File(base / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f["x"] = np.stack([_image(rng, int(k), 96) for k in labels])
        with h5py.File(base / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f["y"] = labels.reshape(-1, 1, 1, 1)


def _fer2013(root: Path, names: list[str], per_class: int, rng: np.random.Generator) -> None:
    """``fer2013.csv``: ``emotion,pixels,Usage``, 48x48 grey pixels as text; the test split is PublicTest and
    PrivateTest (alternating here)."""
    base = root / "fer2013"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "fer2013.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["emotion", "pixels", "Usage"])
        for usage in ("Training", "Test"):
            for label in range(len(names)):
                for i in range(per_class):
                    pixels = " ".join(str(v) for v in _image(rng, label, 48, mode="L").reshape(-1))
                    kind = usage if usage == "Training" else ("PublicTest", "PrivateTest")[i % 2]
                    writer.writerow([label, pixels, kind])


def _food101(root: Path, names: list[str], per_class: int, size: int, rng: np.random.Generator) -> None:
    """``meta/{train,test}.json`` (class -> ``["<class>/<id>", ...]``) and ``images/<class>/<id>.jpg``."""
    base = root / "food-101"
    for s, split in enumerate(("train", "test")):
        listing = {}
        for label, name in enumerate(names):
            listing[name] = [f"{name}/{100000 * s + i + 1}" for i in range(per_class)]
            for rel in listing[name]:
                _save(base / "images" / f"{rel}.jpg", _image(rng, label, size))
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(listing))


def _rendered_sst2(root: Path, names: list[str], per_class: int, size: int, rng: np.random.Generator) -> None:
    _folder_tree(root / "rendered-sst2" / "train", names, per_class, size, rng, "{i}.png")
    _folder_tree(root / "rendered-sst2" / "valid", names, per_class, size, rng, "{i}.png")
    _folder_tree(root / "rendered-sst2" / "test", names, per_class, size, rng, "{i}.png")


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
    elif task == "DTD":
        _dtd(root, names, per_class, size, rng)
    elif task in ("CIFAR10", "CIFAR100"):
        _cifar(root, task, names, per_class, rng)
    elif task == "STL10":
        _stl10(root, names, per_class, rng)
    elif task == "Flowers102":
        _flowers102(root, names, per_class, size, rng)
    elif task == "OxfordIIITPet":
        _oxford_pet(root, names, per_class, size, rng)
    elif task == "PCAM":
        _pcam(root, per_class, rng)
    elif task == "FER2013":
        _fer2013(root, names, per_class, rng)
    elif task == "Food101":
        _food101(root, names, per_class, size, rng)
    elif task == "RenderedSST2":
        _rendered_sst2(root, names, per_class, size, rng)
    else:  # the MNIST-like three
        prefixes = ("emnist-digits-train", "emnist-digits-test") if task == "EMNIST" else ("train", "t10k")
        _idx(root / task / "raw", prefixes, list(range(len(names))), per_class, size, rng)


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
