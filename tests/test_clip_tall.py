"""The twelve datasets TALL-masks adds to the papers' eight, each read from a tiny folder in its real on-disk format
(``tests/fake_clip_data.py``); the refusals of missing and malformed folders; the named task sets (8, 14, 20)."""

from __future__ import annotations

import pickle
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from paretomerge.suites import CLIPSuite, DatasetNotFoundError
from paretomerge.suites.clip_data import TASK_SETS, TASKS, open_task
from paretomerge.suites.clip_data_tall import READERS
from paretomerge.suites.zeroshot import TEMPLATES
from tests.fake_clip_data import write_fake_dataset, write_fake_datasets

ADDED = TASK_SETS["TALL20"][8:]
try:
    import h5py  # noqa: F401  (optional: PCAM's HDF5 files)

    HAS_H5PY = True
except ImportError:
    HAS_H5PY = False
# task -> (the first cleaned class names, how many classes, fabricated classes, image size and mode)
EXPECTED = {
    "STL10": (("airplane", "bird", "car"), 3, 3, (96, 96), "RGB"),
    "OxfordIIITPet": (("Abyssinian", "American Bulldog", "American Pit Bull Terrier"), 3, 3, (24, 24), "RGB"),
    "Flowers102": (("pink primrose", "hard-leaved pocket orchid", "canterbury bells"), 102, 3, (24, 24), "RGB"),
    "CIFAR100": (("apple", "aquarium fish", "baby"), 3, 3, (32, 32), "RGB"),
    "PCAM": (("lymph node", "lymph node containing metastatic tumor tissue"), 2, 2, (96, 96), "RGB"),
    "FER2013": (("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"), 7, 3, (48, 48), "L"),
    "CIFAR10": (("airplane", "automobile", "bird"), 3, 3, (32, 32), "RGB"),
    "Food101": (("apple pie", "baby back ribs", "baklava"), 3, 3, (24, 24), "RGB"),
    "FashionMNIST": (("T-shirt top", "Trouser", "Pullover"), 10, 3, (24, 24), "L"),
    "RenderedSST2": (("negative", "positive"), 2, 2, (24, 24), "RGB"),
    "EMNIST": (("0", "1", "2"), 10, 3, (24, 24), "L"),
    "KMNIST": (("o", "ki", "su"), 10, 3, (24, 24), "L"),
}
PER_CLASS = 2


def _needs_h5py(task: str) -> None:
    if task == "PCAM" and not HAS_H5PY:
        pytest.skip("PCAM's files are HDF5 and h5py is not installed (its refusal is tested below)")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tall")
    write_fake_datasets(root, [t for t in ADDED if t != "PCAM" or HAS_H5PY], per_class=PER_CLASS, size=24)
    return root


def test_the_task_sets_are_tall_masks_8_14_and_20_each_a_superset_of_the_one_before():
    eight = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
    assert TASK_SETS["TA8"] == eight and TASK_SETS["TALL20"] == TASKS and set(TEMPLATES) == set(TASKS)
    assert TASK_SETS["TALL14"] == (*eight, "STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013")
    assert TASK_SETS["TALL20"] == (*TASK_SETS["TALL14"], "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2",
                                   "EMNIST", "KMNIST")
    assert CLIPSuite().tasks == eight  # the default is still the papers' eight
    assert CLIPSuite(tasks="TALL14").tasks == TASK_SETS["TALL14"]
    assert CLIPSuite(tasks="TALL20", finetuned={"KMNIST": "k.pt"}).tasks == TASKS
    assert CLIPSuite(tasks=["KMNIST", "PCAM"]).tasks == ("KMNIST", "PCAM")  # a list, in its own order
    with pytest.raises(ValueError, match=r"tasks='TALL21' is not a task set; name one of \['TA8', 'TALL14', "):
        CLIPSuite(tasks="TALL21")
    with pytest.raises(ValueError, match="at least 2 distinct tasks"):
        CLIPSuite(tasks=["KMNIST", "KMNIST"])


@pytest.mark.parametrize("task", ADDED)
def test_each_added_dataset_reads_its_official_train_and_test_splits(task, data_root):
    _needs_h5py(task)
    names, count, fabricated, size, mode = EXPECTED[task]
    first = {}
    for split in ("train", "test"):
        opened = open_task(task, data_root, split)
        assert opened.class_names[:len(names)] == names and len(opened.class_names) == count, split
        assert np.bincount(opened.labels).tolist() == [PER_CLASS] * fabricated, split  # labels without decoding
        image, label = opened.dataset[len(opened) - 1]
        assert label == opened.labels[-1] and image.size == size and image.mode == mode, split
        first[split] = opened.dataset[0][0].tobytes()
    assert first["train"] != first["test"]  # two splits, not one read twice
    assert TEMPLATES[task] and all("{}" in t for t in TEMPLATES[task])


def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# task -> (what breaks the fabricated folder, what the refusal says)
MALFORMED: dict[str, tuple[Callable[[Path], object], str]] = {
    "STL10": (lambda r: (r / "stl10_binary/class_names.txt").unlink(), r"stl10_binary/class_names.txt is missing"),
    "OxfordIIITPet": (lambda r: (r / "oxford-iiit-pet/annotations/test.txt").write_text("Abyssinian_1 1\n"),
                      "not enough values to unpack"),
    "Flowers102": (lambda r: (r / "flowers-102/setid.mat").write_bytes(b"MATLAB 5.0"), "Mat file"),
    "CIFAR100": (lambda r: _truncate(r / "cifar-100-python/test"), "pickle data was truncated"),
    "PCAM": (lambda r: (r / "pcam/camelyonpatch_level_2_split_test_y.h5").write_bytes(b"not hdf5"), "signature"),
    "FER2013": (lambda r: (r / "fer2013/fer2013.csv").write_text("emotion,pixels,Usage\n0,1 2 3,PublicTest\n"),
                r"shape '\[48, 48\]' is invalid"),
    "CIFAR10": (lambda r: (r / "cifar-10-batches-py/test_batch").write_bytes(b"not a pickle"), "load key"),
    "Food101": (lambda r: (r / "food-101/meta/test.json").write_text("{apple_pie: []"), "Expecting property name"),
    "FashionMNIST": (lambda r: (r / "FashionMNIST/raw/t10k-labels-idx1-ubyte").unlink(), "Dataset not found"),
    "RenderedSST2": (lambda r: shutil.rmtree(r / "rendered-sst2/test/positive"), "Dataset not found"),
    "EMNIST": (lambda r: _truncate(r / "EMNIST/raw/emnist-digits-test-images-idx3-ubyte"), "is invalid for input"),
    "KMNIST": (lambda r: (r / "KMNIST/raw/t10k-labels-idx1-ubyte").write_bytes(b"IDX? no."),
               r"a malformed file \(AssertionError in torchvision's reader\)"),
}


@pytest.mark.parametrize("task", ADDED)
def test_a_missing_or_malformed_folder_is_refused_naming_the_dataset_the_path_and_the_layout(task, tmp_path):
    _needs_h5py(task)
    layout = re.escape(READERS[task][1])
    with pytest.raises(DatasetNotFoundError, match=rf"(?s)^{task} \(test split\) could not be read under the data "
                                                   rf"root '{re.escape(str(tmp_path))}'.*expected layout under the "
                                                   rf"data root: {layout}\n  where it comes from: "):
        open_task(task, tmp_path, "test")
    write_fake_dataset(task, tmp_path, per_class=1, size=8)
    breaks, says = MALFORMED[task]
    breaks(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=rf"(?s)^{task} \(test split\).*{says}.*expected layout under the "
                                                   rf"data root: {layout}"):
        open_task(task, tmp_path, "test")


def test_labels_beyond_the_class_names_and_splits_that_disagree_are_refused(tmp_path):
    write_fake_datasets(tmp_path, ["STL10", "Food101", "OxfordIIITPet"], per_class=1, size=8)
    (tmp_path / "stl10_binary/test_y.bin").write_bytes(bytes([1, 2, 0]))  # 1-based: 0 wraps to 255
    with pytest.raises(DatasetNotFoundError, match=r"STL10 \(test split\) has label 255 but 3 class names"):
        open_task("STL10", tmp_path, "test")
    (tmp_path / "food-101/meta/train.json").write_text('{"apple_pie": ["apple_pie/1"]}')
    with pytest.raises(DatasetNotFoundError, match=r"train.json and test.json list different classes \(1 against 3\)"):
        open_task("Food101", tmp_path, "train")
    lines = (tmp_path / "oxford-iiit-pet/annotations/trainval.txt").read_text().splitlines()
    (tmp_path / "oxford-iiit-pet/annotations/trainval.txt").write_text("\n".join(lines[:-1]) + "\n")  # a breed short
    with pytest.raises(DatasetNotFoundError, match=r"trainval.txt and test.txt list different classes \(2 against 3\)"):
        open_task("OxfordIIITPet", tmp_path, "train")


def test_fer2013_test_split_needs_the_file_with_test_labels(tmp_path):
    base = tmp_path / "fer2013"
    base.mkdir()
    pixels = " ".join(["7"] * 48 * 48)
    (base / "train.csv").write_text(f"emotion,pixels\n3,{pixels}\n")
    (base / "test.csv").write_text(f"pixels\n{pixels}\n")  # Kaggle's split files: test.csv has no emotion column
    assert open_task("FER2013", tmp_path, "train").labels.tolist() == [3]
    with pytest.raises(DatasetNotFoundError, match=r"test.csv has no labels: the test split needs fer2013/fer2013.csv "
                                                   r"or fer2013/icml_face_data.csv"):
        open_task("FER2013", tmp_path, "test")


def test_pcam_without_h5py_is_refused_saying_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError, installed or not
    with pytest.raises(ImportError, match=r"PCAM is stored as HDF5 files.*needs h5py.*pip install h5py"):
        open_task("PCAM", tmp_path, "test")


_ran: list[str] = []


def _record(what: str) -> None:
    _ran.append(what)


class _Payload:
    def __reduce__(self):
        return _record, ("unpickled",)  # unpickling calls _record: code from the file runs


def test_a_cifar_batch_that_names_anything_but_numpy_arrays_is_not_unpickled(tmp_path):
    write_fake_dataset("CIFAR10", tmp_path, per_class=1)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        batch = pickle.load(f)
    path.write_bytes(pickle.dumps({**batch, "extra": _Payload()}, protocol=2))
    with pytest.raises(DatasetNotFoundError, match=r"it names tests.test_clip_tall._record, which a CIFAR batch never "
                                                   r"holds; it is not unpickled"):
        open_task("CIFAR10", tmp_path, "test")
    assert _ran == []  # refused before anything in the file ran
    pickle.loads(path.read_bytes())
    assert _ran == ["unpickled"]  # as torchvision's plain pickle.load would have
