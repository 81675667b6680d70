"""CLIPSuite end to end on real open_clip architectures with random weights (``pretrained=None``) and tiny fake dataset
folders: the three checkpoint formats, zero-shot heads, three Pareto Merging steps, ``at()``, the export round trip,
the refusals, and the streaming loader's memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn

from paretomerge import ModuleSpec, ParetoMerging, export_model, export_pareto_set, load_pareto_set, recognise
from paretomerge.cli import main as cli_main
from paretomerge.modules import CheckpointError
from paretomerge.suites import CLIPSuite, DatasetNotFoundError, PickledCheckpointError
from paretomerge.suites import clip as clip_module
from paretomerge.suites.clip import load_task_vectors, resolve_pretrained
from paretomerge.suites.clip_data import GTSRB_NAMES, TASK_SETS, open_task
from paretomerge.suites.importers import open_clip_to_hf
from paretomerge.suites.zeroshot import TEMPLATES, class_embeddings
from tests.fake_clip_data import write_fake_dataset, write_fake_datasets

ROOT = Path(__file__).resolve().parents[1]
E2E_TASKS = ("EuroSAT", "MNIST", "DTD")  # one checkpoint format each: open_clip, Hugging Face, task_vectors pickle


def _theta0(seed: int = 0) -> dict[str, torch.Tensor]:
    """The visual tower CLIPSuite builds for ``pretrained=None`` and this seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model("ViT-B-32", pretrained=None).visual.state_dict()


def _pickle_image_encoder(path: Path, visual_state: dict, workdir: Path, monkeypatch) -> None:
    """A whole pickled module of a class the loading process cannot import (the release's src.modeling.ImageEncoder)."""
    package = workdir / "fake_clip_release"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "modeling.py").write_text(textwrap.dedent("""
        import open_clip, torch

        class ImageEncoder(torch.nn.Module):
            def __init__(self, state):
                super().__init__()
                self.model = open_clip.create_model("ViT-B-32", pretrained=None)
                self.model.visual.load_state_dict(state)
                del self.model.transformer  # the release drops the text transformer (keep_lang=False)
    """))
    with monkeypatch.context() as patch:
        patch.syspath_prepend(str(workdir))
        from fake_clip_release.modeling import ImageEncoder

        torch.save(ImageEncoder(visual_state), path)
    for name in [m for m in sys.modules if m.startswith("fake_clip_release")]:
        del sys.modules[name]  # for good: the loading side must not find the class
    (package / "modeling.py").unlink()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fake data for three tasks and three fine-tuned checkpoints, one per format."""
    root = tmp_path_factory.mktemp("clip")
    write_fake_datasets(root / "data", tasks=E2E_TASKS, per_class=4)
    theta0 = _theta0()
    generator = torch.Generator().manual_seed(1)
    finetuned = {t: {n: v + 1e-3 * torch.randn(v.shape, generator=generator) for n, v in theta0.items()}
                 for t in E2E_TASKS}
    ckpt = root / "checkpoints"
    for task in E2E_TASKS:
        (ckpt / task).mkdir(parents=True)
    # (a) open_clip keys, safetensors
    save_file({n: v.contiguous() for n, v in finetuned["EuroSAT"].items()},
              str(ckpt / "EuroSAT" / "finetuned.safetensors"))
    # (b) Hugging Face CLIPVisionModel: q/k/v separate, no visual_projection (frozen in fine-tuning, so τ = 0 there)
    finetuned["MNIST"]["proj"] = theta0["proj"].clone()
    hf = {k: v for k, v in open_clip_to_hf(finetuned["MNIST"]).items() if not k.startswith("visual_projection")}
    save_file(hf, str(ckpt / "MNIST" / "model.safetensors"))
    # (c) the task_vectors release: a pickled whole ImageEncoder
    with pytest.MonkeyPatch.context() as monkeypatch:
        _pickle_image_encoder(ckpt / "DTD" / "finetuned.pt", finetuned["DTD"], root, monkeypatch)
    return {"root": root, "theta0": theta0, "finetuned": finetuned}


def _suite(world, **kwargs) -> CLIPSuite:
    options = {"pretrained": None, "data_root": str(world["root"] / "data"),
               "checkpoint_dir": str(world["root"] / "checkpoints"), "tasks": list(E2E_TASKS), "batch_size": 2,
               "eval_batch_size": 8, "val_images": 4, "num_workers": 0, "cache_dir": str(world["root"] / "cache"),
               "progress": False}
    return CLIPSuite(**(options | kwargs))


@pytest.mark.slow
def test_vit_b32_end_to_end_three_formats_three_steps_and_the_export(world, tmp_path, monkeypatch):
    with pytest.raises(PickledCheckpointError, match=r"runs code from the file.*allow_pickle=True"):
        _suite(world).task_vectors()  # DTD's checkpoint is a pickle: refused without the opt-in
    assert len(list((world["root"] / "cache" / "clip_heads").glob("*/manifest.json"))) == 3  # built before that

    # the heads are built once: this suite reads them from the cache, without the text tower
    monkeypatch.setattr(clip_module, "class_embeddings", lambda *a, **k: pytest.fail("heads rebuilt"))
    suite = _suite(world, allow_pickle=True)
    with pytest.warns(UserWarning, match="runs code from the file"):
        tv = suite.task_vectors()
    theta0, finetuned = world["theta0"], world["finetuned"]
    assert tv.task_names == E2E_TASKS and len(tv.layer_names) == 152
    for name in tv.layer_names:  # every format gave back exactly its weights: τ_k = θ_k − θ0
        assert torch.equal(tv.theta0[name], theta0[name])
        for k, task in enumerate(E2E_TASKS):
            assert torch.equal(tv.tau[name][k], finetuned[task][name] - theta0[name]), (task, name)
    assert not tv.tau["proj"][1].any()  # the Hugging Face task kept θ0's projection
    assert {t: h.classifier.weight.shape for t, h in tv.heads.items()} == \
        {"EuroSAT": (3, 512), "MNIST": (10, 512), "DTD": (3, 512)}

    model = ParetoMerging(rank=4)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=suite)
    assert model.global_step == 3
    assert any(bool(g.any()) for g in model.preference_tensor.G)  # the preference tensor moved from G = 0
    net = model.at([0.2, 0.3, 0.5])
    assert isinstance(net.backbone, type(tv.backbone)) and not net.training
    accuracy = suite.evaluate(net, "test")
    assert set(accuracy) == set(E2E_TASKS) and all(0.0 <= v <= 1.0 for v in accuracy.values())

    ckpt, exported = tmp_path / "model.ckpt", tmp_path / "pareto_set.safetensors"
    trainer.save_checkpoint(ckpt)
    cli_main(["export", "--ckpt", str(ckpt), "--out", str(exported)])
    pareto_set = load_pareto_set(exported)
    reloaded = ParetoMerging.load_from_checkpoint(ckpt)
    images = suite.labeled("val")
    for preference in ([0.2, 0.3, 0.5], [1.0, 0.0, 0.0]):
        from_ckpt, from_export, trained = reloaded.at(preference), pareto_set.at(preference), model.at(preference)
        for task in E2E_TASKS:
            x = images[task][0]
            assert x.shape[1:] == (3, 224, 224)
            assert torch.equal(from_export(x, task=task), from_ckpt(x, task=task))
            torch.testing.assert_close(from_export(x, task=task), trained(x, task=task))
    backbone = sum(t.numel() * t.element_size() for t in tv.backbone.state_dict().values())
    # ours: the base, the preference basis's int8 factors (K=3) and a small tensor (r=4): about one model
    assert backbone < exported.stat().st_size < 1.1 * backbone

    # One preference's model as an ordinary open_clip and Hugging Face model, heads included (issue 34), loaded by the
    # code its README.md gives, at ViT-B/32's size (tests/test_export_models.py runs that code where paretomerge
    # cannot be imported).
    for fmt in ("open_clip", "hf"):  # what `paretomerge export --format` runs on the loaded .ckpt
        export_model(model, tmp_path / fmt, format=fmt, at="0.2,0.3,0.5", class_names=suite.class_names)
    x = torch.cat([images[task][0][:1] for task in E2E_TASKS])
    trained = model.at([0.2, 0.3, 0.5])
    with torch.no_grad():
        embedding = trained.backbone(x)
        logits = {task: trained.heads[task](embedding) for task in E2E_TASKS}  # = trained(x, task=task)
    readmes = {name: (tmp_path / name / "README.md").read_text() for name in ("open_clip", "hf")}
    assert 'model = open_clip.create_model("ViT-B-32", pretrained=None)' in readmes["open_clip"]  # a built-in's name
    for readme in readmes.values():
        scope: dict = {}
        exec(readme.split("```python\n", 1)[1].split("```", 1)[0], scope)
        with torch.no_grad():
            loaded = scope["embed"](x)
            torch.testing.assert_close(loaded, embedding, rtol=1e-5, atol=1e-5)
            for task in E2E_TASKS:
                torch.testing.assert_close(scope["logits"](loaded, task), logits[task], rtol=1e-5, atol=1e-5)
    heads = json.loads((tmp_path / "hf" / "heads.json").read_text())["tasks"]
    assert heads["MNIST"] == {"classes": list(suite.class_names["MNIST"]), "num_classes": 10, "normalize": True}


def test_zero_shot_heads_are_deterministic_and_match_the_text_tower():
    torch.manual_seed(3)
    clip = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    names, templates = ["annual crop", "forest", "sea lake"], TEMPLATES["EuroSAT"]
    weights = class_embeddings(clip, tokenizer, names, templates)
    assert torch.equal(weights, class_embeddings(clip, tokenizer, names, templates))
    torch.testing.assert_close(weights, class_embeddings(clip, tokenizer, names, templates, batch_size=2))
    with torch.no_grad():  # one class, computed directly: normalise each prompt, average, normalise, scale
        prompts = clip.encode_text(tokenizer([t.format("forest") for t in templates]))
        mean = (prompts / prompts.norm(dim=-1, keepdim=True)).mean(0)
        direct = clip.logit_scale.exp() * mean / mean.norm()
    torch.testing.assert_close(weights[1], direct, rtol=1e-5, atol=1e-5)
    # and the head gives CLIP's own zero-shot logits on images
    head = clip_module.zero_shot_head(weights)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = clip.logit_scale.exp() * clip.encode_image(images, normalize=True) @ F.normalize(weights, dim=-1).T
        torch.testing.assert_close(head(clip.visual(images)), expected, rtol=1e-4, atol=1e-4)
    assert recognise(head).build().classifier.weight.shape == (3, 512)  # rebuildable from a checkpoint


def test_a_vit_b16_checkpoint_is_refused_for_a_vit_b32_backbone_naming_the_first_key(tmp_path):
    torch.manual_seed(1)
    b16 = open_clip.create_model("ViT-B-16", pretrained=None).visual.state_dict()
    path = tmp_path / "b16.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in b16.items()}, str(path))
    spec = ModuleSpec("open_clip:create_model", {"model_name": "ViT-B-32", "pretrained": None}, attr="visual")
    with pytest.raises(ValueError, match=r"task 'Cars': parameter 'positional_embedding' has shape \(197, 768\)"):
        load_task_vectors(spec.build(), {"Cars": path}, {"Cars": nn.Linear(512, 3)}, spec)


def test_missing_data_checkpoints_and_bad_arguments_are_refused(tmp_path):
    suite = CLIPSuite(pretrained=None, data_root=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ck"),
                      tasks=["SVHN", "GTSRB"], num_workers=0, progress=False)
    with pytest.raises(DatasetNotFoundError, match=r"(?s)SVHN \(test split\).*svhn/train_32x32.mat.*"
                                                   r"torchvision.datasets.SVHN"):
        suite.task_vectors()
    for task in ("SVHN", "GTSRB"):
        write_fake_dataset(task, tmp_path / "data")
    (tmp_path / "ck" / "SVHN").mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "ck" / "SVHN" / "finetuned.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no fine-tuned checkpoint for task 'GTSRB'; looked for .*GTSRB/"
                                                r"finetuned.safetensors"):
        suite.task_vectors()
    with pytest.raises(ValueError, match="model must be one of"):
        CLIPSuite(model="RN50")
    with pytest.raises(ValueError, match="at least 2 distinct tasks"):
        CLIPSuite(tasks=["SVHN", "Flowers"])
    with pytest.raises(ValueError, match=r"finetuned names tasks \['MNIST'\]"):
        CLIPSuite(tasks=["SVHN", "GTSRB"], finetuned={"MNIST": "x.pt"})
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        CLIPSuite(batch_size=0)


def test_pretrained_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_pretrained("ViT-B-32", None) == (None, False, "random")
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag"):
        resolve_pretrained("ViT-B-32", "no-such-tag")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_pretrained("ViT-B-32", "openai")
    # a cached copy in the Hugging Face cache layout is found, with the tag's QuickGELU setting
    repo = tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"weights")
    path, quick_gelu, identity = resolve_pretrained("ViT-B-32", "openai")
    assert path.endswith("abc123/open_clip_model.safetensors") and quick_gelu and identity == "ViT-B-32:openai"
    # the tag's own normalisation is used (LAION's ViT-L/14 tag: mean and std 0.5), without building the model
    normalise = clip_module.preprocess_transform("ViT-L-14", "laion2b_s32b_b82k").transforms[-1]
    assert tuple(normalise.mean) == (0.5, 0.5, 0.5) and tuple(normalise.std) == (0.5, 0.5, 0.5)
    assert tuple(clip_module.preprocess_transform("ViT-B-32", None).transforms[-1].mean)[0] == pytest.approx(0.4815,
                                                                                                            abs=1e-4)
    local = tmp_path / "clip.safetensors"
    local.write_bytes(b"weights")
    assert resolve_pretrained("ViT-B-32", str(local))[2].startswith("sha256:")


def test_all_eight_datasets_load_with_cleaned_class_names_and_disjoint_splits(tmp_path):
    write_fake_datasets(tmp_path, TASK_SETS["TA8"], per_class=3)
    assert len(GTSRB_NAMES) == 43
    preprocess = open_clip.image_transform(224, is_train=False)
    expected = {"SUN397": ("abbey", "bakery shop", "beach"), "EuroSAT": ("Annual Crop", "Forest",
                                                                        "Herbaceous Vegetation"),
                "RESISC45": ("airplane", "airport", "baseball diamond"), "MNIST": tuple("0123456789"),
                "SVHN": tuple("0123456789"), "GTSRB": GTSRB_NAMES, "DTD": ("banded", "blotchy", "braided"),
                "Cars": ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012")}
    for task in TASK_SETS["TA8"]:
        train, test = (open_task(task, tmp_path, split, preprocess) for split in ("train", "test"))
        assert train.class_names == test.class_names == expected[task], task
        for split in (train, test):
            assert set(np.unique(split.labels)) == {0, 1, 2}, task  # every fabricated class in both splits
            image, label = split.dataset[len(split) - 1]
            assert image.shape == (3, 224, 224) and label == split.labels[-1], task
    # where torchvision has no split, the test share is seeded, stratified and disjoint from train
    train, test = open_task("EuroSAT", tmp_path, "train"), open_task("EuroSAT", tmp_path, "test")
    assert not set(train.dataset.indices) & set(test.dataset.indices)
    assert len(train) + len(test) == 3 * 6 and np.bincount(test.labels).tolist() == [1, 1, 1]
    assert open_task("EuroSAT", tmp_path, "test").dataset.indices == test.dataset.indices
    # SUN397 follows the official partition files
    sun = open_task("SUN397", tmp_path, "test")
    files = ["/" + Path(sun.dataset.dataset._image_files[i]).relative_to(tmp_path / "SUN397").as_posix()
             for i in sun.dataset.indices]
    assert sorted(files) == sorted((tmp_path / "SUN397" / "Testing_01.txt").read_text().split())


@pytest.mark.slow
def test_loading_vit_b32_checkpoints_streams_within_the_memory_bound():
    """Four real-size ViT-B/32 checkpoints (benchmarks/bench_load_memory.py measures eight): the peak stays within
    θ0 + K task vectors (+30%), below the 2K + 1 models that reading every fine-tuned state dict first would hold."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_load_memory.py"), "--formats", "safetensors",
                          "--tasks", "4", "--json"], check=True, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    row = json.loads(out.strip().splitlines()[-1])
    assert row["tasks"] == 4 and row["model_bytes"] > 300 * 2**20  # K = 4 real-size ViT-B/32 towers
    assert row["tau_bytes"] == 4 * row["model_bytes"]
    # peak above the imports' baseline ≤ (K+1) × model bytes × 1.3 = 6.5 models, against 9 held by eager loading
    assert row["peak_above_baseline"] <= row["bound"] < (2 * 4 + 1) * row["model_bytes"], row


def test_the_clip_configs_parse(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["paretomerge"])
    for extra in ([], ["--config", "configs/pareto_merging_pp.yaml"], ["--config", "configs/clip_map.yaml"]):
        for config in ("configs/clip_vit_b32_8tasks.yaml", "configs/clip_vit_l14_8tasks.yaml"):
            with pytest.raises(SystemExit) as exit_info:
                cli_main(["fit", "--config", config, *extra, "--print_config"])
            assert exit_info.value.code in (0, None)
    capsys.readouterr()
    for config in ("clip_vit_b32_tall14", "clip_vit_b32_tall20", "clip_vit_l14_tall14", "clip_vit_l14_tall20"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", f"configs/{config}.yaml", "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["data"]["init_args"]["tasks"] == config[-6:].upper()  # TALL14 or TALL20
        assert printed["trainer"]["logger"]["init_args"]["name"] == config


def test_corrupt_checkpoint_files_are_refused_naming_the_file_not_the_pickle_opt_in(tmp_path):
    from paretomerge.suites.importers import read_state_dict

    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=r"noise.pt.*not a readable checkpoint") as info:
        read_state_dict(noise)
    assert not isinstance(info.value, PickledCheckpointError)
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated.safetensors.*not a readable safetensors file"):
        read_state_dict(truncated)


def test_templates_and_class_names_can_be_given_per_task(world):
    with pytest.raises(ValueError, match="every template needs a"):
        _suite(world, templates={"MNIST": ["a digit"]})
    with pytest.raises(ValueError, match=r"class_names names tasks \['SVHN'\]"):
        _suite(world, class_names={"SVHN": ["0"]})
    with pytest.raises(ValueError, match=r"class_names\['EuroSAT'\] has 2 names but the dataset has 3"):
        _ = _suite(world, class_names={"EuroSAT": ["crops", "forest"]}).class_names
    suite = _suite(world, class_names={"EuroSAT": ["annual crop land", "forest", "herbaceous vegetation land"]},
                   templates={"EuroSAT": ["a satellite photo of {}."]})
    assert suite.class_names["EuroSAT"] == ("annual crop land", "forest", "herbaceous vegetation land")
    assert suite.class_names["DTD"] == ("banded", "blotchy", "braided")
    assert suite._templates("EuroSAT") == ["a satellite photo of {}."] and suite._templates("DTD") == TEMPLATES["DTD"]


def test_inputs_are_checked_once_for_prepare_data_and_setup(world, monkeypatch):
    calls = []
    monkeypatch.setattr(clip_module, "resolve_pretrained", lambda *a: calls.append(a) or (None, False, "random"))
    suite = _suite(world)
    suite.prepare_data()
    assert suite._check_inputs()[1]["MNIST"].name == "model.safetensors" and len(calls) == 1


def test_a_bad_export_file_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a paretomerge export"):
        load_pareto_set(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pareto_set(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_pareto_set(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="needs a MergingModule"):
        export_pareto_set(nn.Linear(2, 2), tmp_path / "x.safetensors")
