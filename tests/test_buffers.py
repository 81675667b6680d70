"""Float buffers under one policy (issue 35, SPEC §3c): BatchNorm's running statistics kept from θ0, merged with their
layer's coefficients, or recomputed on unlabeled inputs, the same in every merge and in ``at(γ)``, and reproduced by a
`.ckpt` and an export loaded in a fresh process."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from paretomerge import ParetoMerging, TaskVectors, export_pareto_set, static_merge, static_model
from paretomerge.kernels import ModuleSpec, materialize, merge, recognise
from paretomerge.kernels.buffers import CALIBRATION_CHUNK, buffers_for, calibration_set, float_buffers
from paretomerge.map.evaluate import MergeEvaluator
from paretomerge.suites import TensorSuite
from tests.conftest import make_trainer

TASKS = ("a", "b", "c")
SIZE = 16


def resnet() -> nn.Module:
    return ModuleSpec("paretomerge.kernels.builders:torchvision_resnet", {"layers": [1, 1, 1, 1]}).build()


@pytest.fixture(scope="module")
def problem():
    """θ0 (a torchvision ResNet, random weights) and three fine-tunes whose weights and running statistics moved
    (train-mode passes over shifted inputs), linear heads, and per-task images."""
    torch.manual_seed(0)
    theta0 = resnet().eval()
    images = {t: torch.randn(48, 3, SIZE, SIZE) * (1 + k) + k for k, t in enumerate(TASKS)}
    finetuned = []
    for t in TASKS:
        model = copy.deepcopy(theta0).train()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
            for _ in range(3):
                model(images[t])
        finetuned.append(model.state_dict())
    heads = {t: nn.Linear(512, 3) for t in TASKS}
    return theta0, finetuned, heads, images


def task_vectors(problem, policy: str, calibration: bool = True) -> TaskVectors:
    theta0, finetuned, heads, images = problem
    return TaskVectors.from_state_dicts(theta0, finetuned, list(TASKS), heads, buffer_policy=policy,
                                        calibration=calibration_set(images) if calibration else None)


def test_merged_buffers_follow_their_layers_coefficients(problem):
    theta0, finetuned, _, _ = problem
    tv = task_vectors(problem, "merged")
    assert set(tv.buffer_tau) == set(float_buffers(theta0))  # running means and variances, no integer buffer
    assert not any("num_batches_tracked" in n for n in tv.buffer_tau)
    c = torch.rand(len(tv.layer_names), 3)
    merged = buffers_for(tv, c)
    row = tv.layer_names.index("layer2.0.bn1.weight")
    name = "layer2.0.bn1.running_mean"
    expected = theta0.state_dict()[name] + sum(c[row, k] * (finetuned[k][name] - theta0.state_dict()[name])
                                                for k in range(3))
    torch.testing.assert_close(merged[name], expected)
    # θ0 + τ_k with its own statistics is the fine-tuned model, buffers included
    net = static_model("task_arithmetic_preference", tv, preference=[0, 1, 0], scale=1 / 3)
    for key, value in net.backbone.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(value, theta0.state_dict()[key])  # integer buffers are θ0's
        else:
            torch.testing.assert_close(value, finetuned[1][key], atol=1e-6, rtol=1e-5)
    # a variance merged past its fine-tunes stays a variance
    assert all(float(t.min()) >= 0 for n, t in buffers_for(tv, torch.full((3,), 5.0)).items() if "var" in n)


def test_pretrained_keeps_theta0_and_recomputed_matches_torch(problem):
    theta0, _, _, images = problem
    tv = task_vectors(problem, "pretrained")
    net = static_model("task_arithmetic", tv)
    for key, value in float_buffers(net.backbone).items():
        assert torch.equal(value, theta0.state_dict()[key])
    tv = task_vectors(problem, "recomputed")
    modes = [(m.training, getattr(m, "momentum", None)) for m in tv.backbone.modules()]
    net = static_model("task_arithmetic", tv)
    # torch's own re-estimation (swa_utils.update_bn: reset, momentum None, train mode) on the same chunks
    reference = materialize(tv, static_merge("task_arithmetic", task_vectors(problem, "pretrained")))
    chunks = [(x,) for x in calibration_set(images).split(CALIBRATION_CHUNK)]
    torch.optim.swa_utils.update_bn([x for (x,) in chunks], reference.backbone)
    for key, value in float_buffers(net.backbone).items():
        torch.testing.assert_close(value, float_buffers(reference.backbone)[key], atol=1e-5, rtol=1e-4)
    # nothing else changed: θ0's modules keep their eval mode, momentum and statistics
    assert [(m.training, getattr(m, "momentum", None)) for m in tv.backbone.modules()] == modes
    assert not any(m.training for m in net.modules())
    for key, value in tv.backbone.state_dict().items():
        assert torch.equal(value, theta0.state_dict()[key])


def test_every_policy_differs_and_the_map_evaluator_agrees(problem):
    """The same merge through the static path and through MAP's evaluator (one model per call, and several at once)
    gives the same buffers, and the three policies give three models."""
    _, _, _, images = problem
    labels = {t: torch.randint(0, 3, (48,)) for t in TASKS}
    data = {t: (images[t], labels[t]) for t in TASKS}
    c = np.array([[0.3, 0.3, 0.3], [0.8, 0.1, 0.2]])
    outputs = []
    for policy in ("pretrained", "merged", "recomputed"):
        tv = task_vectors(problem, policy)
        one, many = MergeEvaluator(tv, data, "loss")(c), MergeEvaluator(tv, data, "loss", models_per_call=2)(c)
        np.testing.assert_allclose(one, many, rtol=1e-4)
        net = static_model("task_arithmetic", tv)
        direct = [float(nn.functional.cross_entropy(net(images[t], task=t), labels[t])) for t in TASKS]
        np.testing.assert_allclose(one[0], direct, rtol=1e-4)
        outputs.append(one)
    assert not np.allclose(outputs[0], outputs[1]) and not np.allclose(outputs[1], outputs[2])


def test_bad_policy_and_missing_calibration_are_refused(problem):
    with pytest.raises(ValueError, match="buffer_policy must be one of"):
        task_vectors(problem, "averaged")
    tv = task_vectors(problem, "recomputed", calibration=False)
    with pytest.raises(ValueError, match="needs calibration inputs"):
        static_model("task_arithmetic", tv)
    with pytest.raises(ValueError, match="calibration must be a non-empty tensor"):
        tv.configure_buffers(calibration=torch.empty(0, 3, SIZE, SIZE))


def test_a_model_without_float_buffers_is_untouched(task_vectors):
    """The synthetic ViT has no float buffer: every policy gives no buffers, so every merge is what it was."""
    assert not task_vectors.buffer_tau
    params = merge(task_vectors.theta0, task_vectors.tau, torch.full((3,), 0.3))
    for policy in ("pretrained", "merged", "recomputed"):
        assert buffers_for(task_vectors, torch.full((3,), 0.3), params, policy) == {}


def test_torchvision_resnets_are_recognised():
    import torchvision

    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    spec = recognise(model)
    assert spec.kwargs == {"layers": [2, 2, 2, 2], "block": "basic", "num_classes": None}
    assert type(spec.build()).__name__ == "ResNet"
    assert recognise(torchvision.models.resnet50(num_classes=7)).kwargs["num_classes"] == 7


FRESH = textwrap.dedent('''
    import sys, torch
    from paretomerge import ParetoMerging, load_pareto_set
    pref = [0.2, 0.3, 0.5]
    a = ParetoMerging.load_from_checkpoint(sys.argv[1]).at(pref).state_dict()
    b = load_pareto_set(sys.argv[2]).at(pref).state_dict()
    trained = torch.load(sys.argv[3])
    for got in (a, b):
        assert set(got) == set(trained), set(got) ^ set(trained)
        gap = max(float((got[k].double() - trained[k].double()).abs().max()) for k in trained)
        print("gap", gap)
        assert gap <= 1e-5, gap
''')


def test_a_fit_takes_calibration_from_its_data_and_a_fresh_process_reproduces_at(problem, tmp_path):
    """Ours on the ResNet problem under `recomputed`, without calibration inputs: the fit takes them from its training
    data; ``at(γ)`` of the `.ckpt` and of the export, in a fresh process, equal the trained model's, buffers
    included (running statistics re-estimated there on the stored inputs)."""
    _, _, _, images = problem
    tv = task_vectors(problem, "recomputed", calibration=False)
    labels = {t: torch.randint(0, 3, (16,)) for t in TASKS}
    suite = TensorSuite(tv, train=images, val={t: (images[t][:16], labels[t]) for t in TASKS}, batch_size=8)
    model = ParetoMerging(rank=2, targets=r"layer4\.0\.conv2\.weight$")
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=suite)
    assert tv.calibration is not None and len(tv.calibration) == 3 * 48  # every task's, all the data there is
    net = model.at([0.2, 0.3, 0.5])
    assert not torch.equal(net.backbone.bn1.running_mean, problem[0].bn1.running_mean)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    export_pareto_set(model, tmp_path / "m.safetensors")
    torch.save(net.state_dict(), tmp_path / "trained.pt")
    done = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "m.ckpt"), str(tmp_path / "m.safetensors"),
                           str(tmp_path / "trained.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("gap") == 2


# A TinyResNetSuite recipe for the build's mechanics (seconds, not the 1.5 minutes of the default).
SMALL_RESNET = {"pretrain_images": 256, "pretrain_steps": 8, "finetune_images": 128, "finetune_steps": 6,
                "batch_size": 32}


def test_the_embedded_cnn_suite_builds_caches_and_follows_its_policy(tmp_path):
    from paretomerge.suites import TinyResNetSuite

    options = {"tasks": ["colour", "size"], "recipe": SMALL_RESNET, "test_images": 64, "val_images": 32,
               "calibration_images": 40, "cache_dir": str(tmp_path), "progress": False}
    suite = TinyResNetSuite(**options)
    tv = suite.task_vectors()
    assert tv.buffer_policy == "recomputed" and len(tv.calibration) == 40 and tv.buffer_tau
    assert type(tv.backbone).__name__ == "ResNet" and tv.backbone_spec is not None
    assert torch.equal(tv.calibration[1], suite.labeled("test")["size"][0][0])  # interleaved: colour, size, colour...
    assert all(float(t.abs().max()) > 0 for t in tv.buffer_tau.values())  # each fine-tune moved its statistics
    assert suite.build_report["buffer_policy"] == "recomputed"
    merged = TinyResNetSuite(**options, buffer_policy="merged")  # the cache is the same: weights do not depend on it
    assert merged.cache_path == suite.cache_path and merged.build_report["buffer_policy"] == "merged"
    assert merged.task_vectors().buffer_policy == "merged"
    with pytest.raises(ValueError, match="buffer_policy must be one of"):
        TinyResNetSuite(buffer_policy="average")
    with pytest.raises(ValueError, match="recipe layers"):
        TinyResNetSuite(recipe={"layers": [1, 1]})


def test_the_resnet18_suite_reads_local_files_only(tmp_path):
    from paretomerge.suites import ResNetSuite
    from tests.fake_clip_data import write_fake_dataset

    with pytest.raises(FileNotFoundError, match="local weights only"):
        ResNetSuite(pretrained=str(tmp_path / "resnet18-f37072fd.pth"))
    for task in ("CIFAR10", "GTSRB"):
        write_fake_dataset(task, tmp_path / "data", num_classes=3, per_class=2)
    weights = tmp_path / "resnet18.pth"
    torch.save(ModuleSpec("paretomerge.kernels.builders:torchvision_resnet",
                          {"layers": [2, 2, 2, 2], "num_classes": 1000}).build().state_dict(), weights)
    suite = ResNetSuite(pretrained=str(weights), data_root=str(tmp_path / "data"), tasks=["CIFAR10", "GTSRB"],
                        finetune_steps=1, finetune_batch=2, image_size=32, calibration_images=4, val_images=2,
                        num_workers=0, cache_dir=str(tmp_path / "cache"), progress=False)
    tv = suite.task_vectors()
    assert tv.task_names == ("CIFAR10", "GTSRB") and len(tv.calibration) == 4
    assert tv.heads["CIFAR10"].out_features == 3 and len(tv.buffer_tau) == 40  # ResNet-18: 20 BatchNorms
    accuracy = suite.evaluate(static_model("task_arithmetic", tv), split="val")
    assert set(accuracy) == {"CIFAR10", "GTSRB"}



def test_the_cnn_configs_parse(monkeypatch, capsys):
    import yaml

    from paretomerge.cli import main as cli_main

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    for name, suite in (("tiny_resnet", "TinyResNetSuite"), ("resnet18_map", "ResNetSuite")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", f"configs/{name}.yaml", "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["data"]["class_path"] == f"paretomerge.suites.{suite}"
        assert printed["data"]["init_args"]["buffer_policy"] == "recomputed"
        assert printed["model"]["init_args"]["targets"].startswith("layer[34]")
