"""One merged model, heads included, as an ordinary open_clip or Hugging Face model (issue 34): ``paretomerge export
--at PREF --format open_clip|hf`` and `export_model`. The round trips run the code each export's README.md gives, in a
fresh process where paretomerge cannot be imported; every refusal leaves nothing on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from paretomerge import AdaMerging, ParetoMerging, TaskVectors, export_model
from paretomerge.cli import main as cli_main
from paretomerge.kernels import features_of
from paretomerge.kernels.inputs import call
from paretomerge.preferences import export_preference
from paretomerge.suites.zeroshot import zero_shot_head
from tests import own_models
from tests.conftest import make_trainer
from tests.synthetic import SyntheticSuite

TASKS = ("task0", "task1", "task2")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Ours on the synthetic problem (an open_clip ViT with nn.Linear heads), two steps, and its checkpoint."""
    root = tmp_path_factory.mktemp("export_models")
    model = ParetoMerging(rank=4)
    trainer = make_trainer(root, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2))
    trainer.save_checkpoint(root / "model.ckpt")
    return model, root / "model.ckpt"


def merge_of(name: str, heads: dict[str, nn.Module] | None = None) -> AdaMerging:
    """AdaMerging (Task Arithmetic at its start) over one of `own_models`' backbones, with ``heads`` (theirs by
    default)."""
    pretrained, finetuned, own_heads, _ = own_models.problem(name)
    heads = heads or own_heads
    tv = TaskVectors.from_state_dicts(pretrained, [m.state_dict() for m in finetuned], list(heads), heads)
    return AdaMerging(task_vectors=tv)


def zero_shot_merge() -> AdaMerging:
    """A Hugging Face CLIPVisionModel with a zero-shot head (it reads the L2-normalised embedding) and a linear one."""
    generator = torch.Generator().manual_seed(2)
    return merge_of("hf_clip_vision", {"a": zero_shot_head(30 * torch.randn(3, 32, generator=generator)),
                                       "b": nn.Linear(32, 4)})


ROUND_TRIP = textwrap.dedent('''
    import sys
    sys.modules["paretomerge"] = None  # from here on, importing paretomerge raises
    import re
    from pathlib import Path

    import torch

    try:
        import paretomerge
    except ImportError:
        pass
    else:
        raise AssertionError("paretomerge can be imported")
    root = Path(sys.argv[1])
    for name, want in torch.load(root / "expected.pt").items():
        readme = (root / name / "README.md").read_text()
        scope = {}
        exec(compile(re.search(r"```python\\n(.*?)```", readme, re.S).group(1), name, "exec"), scope)
        with torch.no_grad():
            torch.testing.assert_close(scope["embed"](want["images"]), want["embedding"], rtol=1e-5, atol=1e-5)
            assert list(scope["tasks"]) == list(want["logits"]), (name, list(scope["tasks"]))
            embedding = scope["embed"](want["images"])
            for task, logits in want["logits"].items():
                torch.testing.assert_close(scope["logits"](embedding, task), logits, rtol=1e-5, atol=1e-5)
        print("round trip", name)
    assert not [m for m in sys.modules if m.startswith("paretomerge.")]
''')


def run_readmes(root, expected: dict) -> str:
    """Run each export's README.md code in a fresh process without paretomerge; compare with ``expected``."""
    torch.save(expected, root / "expected.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", ROUND_TRIP, str(root)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def outputs(module, preference, images: torch.Tensor) -> dict:
    """``module.at(preference)``'s image embedding and each head's logits, in fp32."""
    net = module.at(preference)
    with torch.no_grad():
        return {"images": images, "embedding": features_of(call(net.backbone, images)),
                "logits": {task: net(images, task=task) for task in net.task_names}}


def test_both_formats_round_trip_in_a_fresh_process_without_paretomerge(fitted, tmp_path, capsys, monkeypatch):
    model, path = fitted
    with monkeypatch.context() as patch:  # a suite that names its classes, as CLIPSuite and TinySuite do
        names = {"task0": ["a", "b", "c"], "task1": ["d", "e", "f", "g"], "task2": ["h", "i", "j", "k", "l"]}
        patch.setattr(SyntheticSuite, "class_names", property(lambda self: names), raising=False)
        cli_main(["export", "--ckpt", str(path), "--at", "0.2,0.3,0.5", "--format", "open_clip",
                  "--out", str(tmp_path / "open_clip")])
    cli_main(["export", "--ckpt", str(path), "--at", "task1", "--format", "hf", "--out", str(tmp_path / "hf")])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"wrote {tmp_path / 'open_clip'}: ParetoMerging at the preference 0.2,0.3,0.5, 3 task " \
                         f"heads, as open_clip (0.1 MiB). It loads without paretomerge: " \
                         f"{tmp_path / 'open_clip' / 'README.md'} has the code"
    assert printed[1].startswith(f"wrote {tmp_path / 'hf'}: ParetoMerging at the preference 0,1,0, 3 task heads, as "
                                 "hf (0.1 MiB); heads.json gives each head's class count, not its class names (its "
                                 "suite SyntheticSuite does not name them)")
    zero_shot = zero_shot_merge()
    export_model(zero_shot, tmp_path / "hf_clip_vision", format="hf",
                 class_names={"a": ["cat", "dog", "bird"], "b": ["0", "1", "2", "3"]})
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = {"open_clip": outputs(model, [0.2, 0.3, 0.5], images), "hf": outputs(model, [0.0, 1.0, 0.0], images),
                "hf_clip_vision": outputs(zero_shot, None, images)}
    assert not torch.allclose(expected["open_clip"]["embedding"], expected["hf"]["embedding"])  # γ matters
    assert run_readmes(tmp_path, expected).count("round trip") == 3

    config = next((tmp_path / "open_clip").glob("paretomerge-ViT-*.json")).name  # open_clip's name for the tower
    assert {p.name for p in (tmp_path / "open_clip").iterdir()} == {
        "README.md", "heads.json", "heads.safetensors", "open_clip_visual.safetensors", config}
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"README.md", "config.json", "model.safetensors",
                                                             "heads.json", "heads.safetensors"}
    info = json.loads((tmp_path / "open_clip" / "heads.json").read_text())
    assert info["method"] == "ParetoMerging" and info["preference"] == pytest.approx(
        {"task0": 0.2, "task1": 0.3, "task2": 0.5})
    assert info["tasks"] == {task: {"classes": names[task], "num_classes": len(names[task]), "normalize": False}
                             for task in TASKS}
    assert json.loads((tmp_path / "hf" / "heads.json").read_text())["tasks"]["task2"]["classes"] is None
    info = json.loads((tmp_path / "hf_clip_vision" / "heads.json").read_text())
    assert info["preference"] is None and info["tasks"]["a"] == {"classes": ["cat", "dog", "bird"], "num_classes": 3,
                                                                 "normalize": True}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "CLIPVisionModelWithProjection"]
    assert (tmp_path / "hf" / "README.md").read_text().startswith(
        "# ParetoMerging at the preference task0 0, task1 1, task2 0\n")
    assert not list(tmp_path.glob(".*.writing-*"))


BAD_PREFERENCES = [
    ("0.5,0.5", "preference '0.5,0.5' has 2 entries, but the model has 3 tasks (task0, task1, task2)"),
    ([0.5, 0.5, 0.0, 0.0], "has 4 entries, but the model has 3 tasks"),
    ("0.5,-0.1,0.6", "has negative entries (task1=-0.1)"),
    ("nan,0.5,0.5", "has non-finite entries (task0=nan)"),
    ([0.2, float("inf"), 0.0], "has non-finite entries (task1=inf)"),
    ("0.2,0.3,0.4", "sums to 0.9, not 1 (within 1e-06)"),
    ("0.2,0.3,0.500002", "sums to 1.000002, not 1"),
    ([1, 1, 1], "sums to 3, not 1"),
    ("colour", "is neither numbers, 'equal' nor a task's name"),
    ("", "is neither numbers"),
]


def test_a_bad_preference_is_refused_with_its_cause_and_nothing_is_written(fitted, tmp_path):
    model, path = fitted
    out = tmp_path / "new" / "merged"
    for index, (at, cause) in enumerate(BAD_PREFERENCES):
        with pytest.raises(ValueError) as error:
            export_model(model, out, format=("open_clip", "hf")[index % 2], at=at)
        assert cause in str(error.value), (at, str(error.value))
        assert "'equal', or a task's name for its one-hot (task0, task1, task2)" in str(error.value)  # what to write
    for argv, cause in ((["--at", "0.5,0.5", "--format", "open_clip"], "--at: " + BAD_PREFERENCES[0][1]),
                        (["--at", "0.2,0.3,0.4", "--format", "hf"], "sums to 0.9, not 1 (within 1e-06)"),
                        (["--format", "hf"], "give --at with 3 weights, one per task (task0, task1, task2)")):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["export", "--ckpt", str(path), *argv, "--out", str(out)])
        assert cause in str(exit_.value.code)
    for at, cause in ((torch.ones(1, 3) / 3, "got a torch.float32 tensor of shape (1, 3)"),
                      (None, "ParetoMerging gives one model per preference: give the preference, 3 weights")):
        with pytest.raises(ValueError, match=cause.replace("(", r"\(").replace(")", r"\)")):
            export_model(model, out, format="open_clip", at=at)
    with pytest.raises(ValueError, match=r"class_names\['task1'\] has 2 names, but its head has 4 classes"):
        export_model(model, out, format="hf", at="equal", class_names={"task0": "abc", "task1": "ab", "task2": "abcde"})
    assert list(tmp_path.iterdir()) == []
    assert export_preference("equal", TASKS).tolist() == pytest.approx([1 / 3] * 3)
    assert export_preference("task2", TASKS).tolist() == [0.0, 0.0, 1.0]
    assert export_preference(" 0.1, 0.2,0.7", TASKS).tolist() == pytest.approx([0.1, 0.2, 0.7])


def test_a_model_a_format_cannot_hold_is_refused_naming_the_formats_that_fit(tmp_path):
    from tests.hf_models import perturbed, tiny_llama

    cases = [
        (merge_of("torch_nn"), "open_clip", r"its backbone is a torch\.nn\.modules\.container\.Sequential: neither an "
                                            r"open_clip VisionTransformer.*The formats that fit it: pareto-set$"),
        (zero_shot_merge(), "open_clip", r"its backbone is a Hugging Face CLIPVisionModel, not an open_clip image "
                                         r"tower\. The formats that fit it: hf, pareto-set$"),
        (merge_of("module_spec"), "hf", r"the head of task 'a' \(Sequential\) is not a linear map of the 16-wide "
                                        r"embedding.*The formats that fit it: pareto-set$"),
    ]
    llama = tiny_llama()
    names = ["x", "y"]
    tv = TaskVectors.from_state_dicts(llama, [perturbed(llama, k).state_dict() for k in (1, 2)], names,
                                      {t: nn.Identity() for t in names})
    cases.append((AdaMerging(task_vectors=tv), "open_clip", r"its backbone is a Hugging Face LlamaForCausalLM, not an "
                                                            r"open_clip image tower\. The formats that fit it: hf, "
                                                            r"pareto-set$"))
    for model, fmt, message in cases:
        with pytest.raises(ValueError, match=f"^format '{fmt}' does not fit this model: {message}"):
            export_model(model, tmp_path / "merged", format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_the_tiny_suite_names_its_classes_without_building(tmp_path):
    from paretomerge.suites import FAST_TASKS, TinySuite
    from paretomerge.suites.tiny_images import TASK_CLASSES

    suite = TinySuite(tasks=list(FAST_TASKS), progress=False, cache_dir=str(tmp_path))
    assert suite.class_names == {t: TASK_CLASSES[t] for t in FAST_TASKS}
    assert list(tmp_path.iterdir()) == []
