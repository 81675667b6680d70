"""The twelve vision tasks that TALL-masks (Wang et al., 2024) adds to the eight, read with torchvision's dataset
classes (``download=False``) from the same data root as `clip_data`'s.

Every task has an official train/test split, used as it is: STL-10, Flowers-102, Food-101, Rendered SST-2 and PCAM
``train``/``test``; Oxford-IIIT Pet ``trainval``/``test``; FER2013 ``Training`` against ``PublicTest`` and
``PrivateTest``; CIFAR and the MNIST-like sets their train and test files. EMNIST is its ``digits`` split, the one
TALL-masks' code reads.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torchvision import datasets as tvd

from paretomerge.suites.labeled_split import LabeledSplit, clean_class_name

EMNIST_SPLIT = "digits"
# FER2013's emotion ids 0..6 (Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral), as the adjectives CLIP's prompts use
# (the first of each class's names in TALL-masks' code).
FER2013_NAMES = ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")
# PCAM's labels: 0 no metastatic tissue in the patch's centre, 1 metastatic tissue (CLIP's and TALL-masks' names).
PCAM_NAMES = ("lymph node", "lymph node containing metastatic tumor tissue")


def _no_md5(files: list) -> list:
    return [[name, None] for name, _ in files]


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds lists, dicts, strings and numpy arrays, and refuses anything else: a CIFAR batch holds
    nothing more, and unpickling anything more can run code from the file."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        allowed = (module, name) in self.ALLOWED or (
            module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"))
        if not allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds; it is not "
                                         "unpickled (unpickling runs code from the file)")
        return super().find_class(module, name)


class _CIFAR10(tvd.CIFAR10):
    """torchvision's CIFAR-10 without the MD5s (a missing file is still refused, a truncated one fails to unpickle),
    each pickled batch first read by `_ArraysOnly`, so torchvision's plain ``pickle.load`` only sees plain data."""

    train_list = _no_md5(tvd.CIFAR10.train_list)
    test_list = _no_md5(tvd.CIFAR10.test_list)
    meta = {**tvd.CIFAR10.meta, "md5": None}

    def __init__(self, root: Path, train: bool, transform: Callable | None) -> None:
        for name, _ in (self.train_list if train else self.test_list) + [[self.meta["filename"], None]]:
            path = Path(root) / self.base_folder / name
            if path.is_file():  # torchvision refuses a missing one
                with open(path, "rb") as file:
                    _ArraysOnly(file, encoding="latin1").load()
        super().__init__(root, train=train, transform=transform)


class _CIFAR100(_CIFAR10):
    base_folder = tvd.CIFAR100.base_folder
    train_list = _no_md5(tvd.CIFAR100.train_list)
    test_list = _no_md5(tvd.CIFAR100.test_list)
    meta = {**tvd.CIFAR100.meta, "md5": None}


class _STL10(tvd.STL10):
    """torchvision's STL-10 without the MD5s and without the 100,000 unlabeled images (2.7 GB) it otherwise demands."""

    train_list = _no_md5(tvd.STL10.train_list[:2])  # train_X.bin, train_y.bin
    test_list = _no_md5(tvd.STL10.test_list)


class _Flowers102(tvd.Flowers102):
    _file_dict = {key: (name, None) for key, (name, _) in tvd.Flowers102._file_dict.items()}


class _FER2013(tvd.FER2013):
    _RESOURCES = {key: (name, None) for key, (name, _) in tvd.FER2013._RESOURCES.items()}


def _same_classes(data: object, reference: object, files: str) -> None:
    """Where torchvision derives a split's classes from that split's own file, the train and test splits must agree."""
    if list(data.classes) != list(reference.classes):
        raise ValueError(f"{files} list different classes ({len(data.classes)} against {len(reference.classes)})")


def _cifar(cls: type[_CIFAR10]) -> Callable[..., LabeledSplit]:
    def read(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
        data = cls(root, train=split == "train", transform=transform)
        return LabeledSplit(data, np.asarray(data.targets), tuple(clean_class_name(c) for c in data.classes))
    return read


def _stl10(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = _STL10(root, split=split, transform=transform)
    if not hasattr(data, "classes"):
        raise FileNotFoundError(f"{root / _STL10.base_folder / _STL10.class_names_file} is missing")
    names = tuple(clean_class_name(c) for c in data.classes)
    return LabeledSplit(data, data.labels.astype(np.int64), names)  # uint8 in the file, 1-based


def _flowers102(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = _Flowers102(root, split=split, transform=transform)
    return LabeledSplit(data, np.asarray(data._labels), tuple(data.classes))  # the metadata has class ids only


def _oxford_pet(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = tvd.OxfordIIITPet(root, split="trainval" if split == "train" else "test", transform=transform)
    if split == "train":
        _same_classes(data, tvd.OxfordIIITPet(root, split="test"), "annotations/trainval.txt and test.txt")
    return LabeledSplit(data, np.asarray(data._labels), tuple(data.classes))


def _pcam(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    try:
        import h5py
    except ImportError as err:
        raise ImportError("PCAM is stored as HDF5 files, and reading them needs h5py, which is not installed: "
                          "pip install h5py") from err
    data = tvd.PCAM(root, split=split, transform=transform)
    with h5py.File(data._base_folder / data._FILES[split]["targets"][0], "r") as targets:
        labels = np.asarray(targets["y"][:, 0, 0, 0], dtype=np.int64)  # [N, 1, 1, 1] in the file
    if len(labels) != len(data):
        raise ValueError(f"PCAM's {split} files hold {len(data)} images but {len(labels)} labels")
    return LabeledSplit(data, labels, PCAM_NAMES)


def _fer2013(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = _FER2013(root, split=split, transform=transform)
    labels = [label for _, label in data._samples]
    if None in labels:
        raise FileNotFoundError("fer2013/test.csv has no labels: the test split needs fer2013/fer2013.csv or "
                                "fer2013/icml_face_data.csv")
    return LabeledSplit(data, np.asarray(labels, dtype=np.int64), FER2013_NAMES)


def _mnist_like(cls: type[tvd.MNIST], **kwargs: str) -> Callable[..., LabeledSplit]:
    def read(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
        data = cls(root, train=split == "train", transform=transform, **kwargs)
        return LabeledSplit(data, data.targets.numpy(), tuple(clean_class_name(c) for c in data.classes))
    return read


def _food101(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = tvd.Food101(root, split=split, transform=transform)
    if split == "train":
        _same_classes(data, tvd.Food101(root, split="test"), "food-101/meta/train.json and test.json")
    return LabeledSplit(data, np.asarray(data._labels), tuple(clean_class_name(c) for c in data.classes))


def _rendered_sst2(root: Path, split: str, transform: Callable | None) -> LabeledSplit:
    data = tvd.RenderedSST2(root, split=split, transform=transform)
    return LabeledSplit(data, np.asarray([label for _, label in data._samples]), tuple(data.classes))


# task -> (reader, expected layout under the data root, where the data comes from); TALL-masks' order
READERS: dict[str, tuple[Callable[..., LabeledSplit], str, str]] = {
    "STL10": (_stl10, "stl10_binary/train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt "
                      "(unlabeled_X.bin is not needed)",
              "stl10_binary.tar.gz, unpacked: torchvision.datasets.STL10(root, download=True)"),
    "OxfordIIITPet": (_oxford_pet, "oxford-iiit-pet/images/<Breed>_<n>.jpg, oxford-iiit-pet/annotations/trainval.txt, "
                                   "oxford-iiit-pet/annotations/test.txt",
                      "torchvision.datasets.OxfordIIITPet(root, download=True)"),
    "Flowers102": (_flowers102, "flowers-102/jpg/image_<00001..08189>.jpg, flowers-102/imagelabels.mat, "
                                "flowers-102/setid.mat",
                   "torchvision.datasets.Flowers102(root, download=True)"),
    "CIFAR100": (_cifar(_CIFAR100), "cifar-100-python/train, cifar-100-python/test, cifar-100-python/meta",
                 "cifar-100-python.tar.gz, unpacked: torchvision.datasets.CIFAR100(root, download=True)"),
    "PCAM": (_pcam, "pcam/camelyonpatch_level_2_split_train_x.h5, _train_y.h5, _test_x.h5, _test_y.h5 (read with h5py)",
             "torchvision.datasets.PCAM(root, split='train' and 'test', download=True) (needs gdown and h5py)"),
    "FER2013": (_fer2013, "fer2013/fer2013.csv or fer2013/icml_face_data.csv (Kaggle's train.csv and test.csv are not "
                          "enough: test.csv has no labels)",
                "the Kaggle challenge 'Challenges in Representation Learning: Facial Expression Recognition "
                "Challenge' (fer2013.tar.gz's fer2013.csv, or icml_face_data.csv); torchvision cannot download it"),
    "CIFAR10": (_cifar(_CIFAR10), "cifar-10-batches-py/data_batch_1..5, cifar-10-batches-py/test_batch, "
                                  "cifar-10-batches-py/batches.meta",
                "cifar-10-python.tar.gz, unpacked: torchvision.datasets.CIFAR10(root, download=True)"),
    "Food101": (_food101, "food-101/meta/train.json, food-101/meta/test.json, food-101/images/<class>/<id>.jpg",
                "torchvision.datasets.Food101(root, download=True)"),
    "FashionMNIST": (_mnist_like(tvd.FashionMNIST), "FashionMNIST/raw/train-images-idx3-ubyte, "
                                                    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                                                    "t10k-labels-idx1-ubyte",
                     "torchvision.datasets.FashionMNIST(root, train=True and False, download=True)"),
    "RenderedSST2": (_rendered_sst2, "rendered-sst2/train/{negative,positive}/*.png, "
                                     "rendered-sst2/test/{negative,positive}/*.png",
                     "torchvision.datasets.RenderedSST2(root, split='train' and 'test', download=True)"),
    "EMNIST": (_mnist_like(tvd.EMNIST, split=EMNIST_SPLIT),
               f"EMNIST/raw/emnist-{EMNIST_SPLIT}-train-images-idx3-ubyte, emnist-{EMNIST_SPLIT}-train-labels-idx1-"
               f"ubyte, emnist-{EMNIST_SPLIT}-test-images-idx3-ubyte, emnist-{EMNIST_SPLIT}-test-labels-idx1-ubyte",
               f"torchvision.datasets.EMNIST(root, split='{EMNIST_SPLIT}', download=True), or the gzip.zip of NIST's "
               "EMNIST page, unzipped and gunzipped into EMNIST/raw/"),
    "KMNIST": (_mnist_like(tvd.KMNIST), "KMNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                                        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte",
               "torchvision.datasets.KMNIST(root, train=True and False, download=True)"),
}
