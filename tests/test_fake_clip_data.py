"""The fabricated layouts of the papers' eight datasets load through the real torchvision 0.29.1 dataset classes with
download=False."""

from __future__ import annotations

from pathlib import Path

import pytest
import torchvision.datasets as tvd

from tests.fake_clip_data import TASKS, class_names, svhn_md5_check_disabled, write_fake_dataset, write_fake_datasets

N_CLASSES, PER_CLASS, SIZE = 3, 2, 24


def _labels(ds) -> list[int]:
    """Per-sample labels without decoding images (attribute differs per dataset class)."""
    if isinstance(ds, tvd.ImageFolder):
        return list(ds.targets)
    if isinstance(ds, (tvd.StanfordCars, tvd.GTSRB)):
        return [int(label) for _, label in ds._samples]
    if isinstance(ds, tvd.SVHN):
        return ds.labels.tolist()
    if isinstance(ds, tvd.MNIST):
        return ds.targets.tolist()
    return list(ds._labels)  # SUN397, DTD


def _load(task: str, root: Path) -> dict[str, object]:
    if task == "SUN397":
        return {"all": tvd.SUN397(root)}
    if task == "Cars":
        return {s: tvd.StanfordCars(root, split=s) for s in ("train", "test")}
    if task == "RESISC45":
        return {"all": tvd.ImageFolder(root / "resisc45" / "NWPU-RESISC45")}
    if task == "EuroSAT":
        return {"all": tvd.EuroSAT(root)}
    if task == "SVHN":
        with svhn_md5_check_disabled():
            return {s: tvd.SVHN(root / "svhn", split=s) for s in ("train", "test")}
    if task == "GTSRB":
        return {s: tvd.GTSRB(root, split=s) for s in ("train", "test")}
    if task == "MNIST":
        return {"train": tvd.MNIST(root, train=True), "test": tvd.MNIST(root, train=False)}
    return {s: tvd.DTD(root, split=s, partition=1) for s in ("train", "val", "test")}


@pytest.mark.parametrize("task", TASKS[:8])  # the twelve TALL-masks adds load through their readers: test_clip_tall.py
def test_fake_dataset_loads(task, tmp_path):
    write_fake_dataset(task, tmp_path, num_classes=N_CLASSES, per_class=PER_CLASS, size=SIZE)
    names = class_names(task, N_CLASSES)
    for split, ds in _load(task, tmp_path).items():
        # Single-pool datasets hold a train half and a test half.
        per_split = 2 * PER_CLASS if split == "all" else PER_CLASS
        assert len(ds) == per_split * len(names), (task, split)
        labels = _labels(ds)
        expected = [int(n) for n in names] if task in ("SVHN", "MNIST") else list(range(len(names)))
        assert sorted(set(labels)) == expected, (task, split)
        assert all(labels.count(c) == per_split for c in expected), (task, split)
        image, label = ds[len(ds) - 1]
        assert image.size == (SIZE, SIZE) and image.mode == ("L" if task == "MNIST" else "RGB")
        assert label == labels[-1]
        if hasattr(ds, "classes") and task not in ("SVHN", "MNIST"):
            assert list(ds.classes) == (sorted(names) if task in ("RESISC45", "EuroSAT", "DTD") else names)


def test_sun397_partition_files_split_the_dataset(tmp_path):
    write_fake_dataset("SUN397", tmp_path, num_classes=N_CLASSES, per_class=PER_CLASS, size=SIZE)
    ds = tvd.SUN397(tmp_path)
    data = tmp_path / "SUN397"
    train, test = (set((data / f).read_text().split()) for f in ("Training_01.txt", "Testing_01.txt"))
    assert all(p.startswith("/") and p.count("/") >= 3 for p in train | test)  # "/a/abbey/sun_xxx.jpg"
    files = {"/" + p.relative_to(data).as_posix() for p in ds._image_files}
    assert not train & test and train | test == files
    assert len(train) == len(test) == PER_CLASS * N_CLASSES


def test_deterministic_and_class_dependent(tmp_path):
    for sub in ("a", "b"):
        write_fake_datasets(tmp_path / sub, tasks=("EuroSAT",), num_classes=2, per_class=1, size=8, seed=3)
    a, b = (tvd.EuroSAT(tmp_path / sub) for sub in ("a", "b"))
    assert [Path(p).read_bytes() for p, _ in a.samples] == [Path(p).read_bytes() for p, _ in b.samples]
    first, second = (a[i][0].tobytes() for i in (0, len(a) - 1))
    assert first != second


def test_svhn_needs_md5_bypass(tmp_path):
    write_fake_dataset("SVHN", tmp_path, per_class=1, size=SIZE)
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        tvd.SVHN(tmp_path / "svhn", split="train")


def test_cli(tmp_path):
    from tests.fake_clip_data import main

    main([str(tmp_path), "--tasks", "MNIST", "DTD", "--per-class", "1", "--size", "8", "--num-classes", "2"])
    assert len(tvd.MNIST(tmp_path, train=False)) == 2 and len(tvd.DTD(tmp_path, split="val")) == 2
