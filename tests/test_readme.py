"""The README's Python examples run as written, and its test command is the one CI runs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OWN_MODELS = "# Your own models: "
OWN_MODEL_EXAMPLES = {b.split("\n", 1)[0][len(OWN_MODELS):]: b
                      for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if b.startswith(OWN_MODELS)}


@pytest.mark.slow
def test_python_examples_run(fast_tiny, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    not_run = [b for b in blocks if b.startswith("# Not run by the tests")]
    assert len(not_run) == 1  # the CLIP example, which needs real data; every other block runs
    blocks = [b for b in blocks if b not in not_run and not b.startswith(OWN_MODELS)]
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PARETOMERGE_CACHE", str(fast_tiny.cache_path.parents[1]))  # the session's fast suite
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "example" / "last.ckpt").exists()
    assert namespace["logits"].shape == (4, 3)
    assert namespace["model"].preference_tensor.num_parameters() > 0
    assert "warmth" in namespace["chosen"].model.heads  # the unseen-task example's model reads the new task
    assert namespace["net"].task_names == ("colour", "stripes", "size")  # the export example's model


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, "the README's test command must be run verbatim by .ci/run"


def test_the_own_models_section_has_its_four_examples():
    assert [name.split(" (")[0] for name in OWN_MODEL_EXAMPLES] == [
        "open_clip by name", "a torchvision ViT", "a Hugging Face CLIPVisionModel",
        "a hand-built backbone, loaded with backbone="]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OWN_MODEL_EXAMPLES))
def test_own_models_examples_run(name, tmp_path, monkeypatch):
    """Each example of "Your own models" runs as written, on its own; saving warns exactly when a module cannot be
    recorded, and the logits come from the model it built (or loaded)."""
    if "Hugging Face" in name:
        pytest.importorskip("transformers", reason="the Hugging Face example needs transformers (pip install .[hf])")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(OWN_MODEL_EXAMPLES[name], "README.md", "exec"), namespace)
    said = [str(w.message) for w in caught if "records no way to rebuild" in str(w.message)]
    assert namespace["logits"].shape[0] == 2 and torch.isfinite(namespace["logits"]).all()
    if "backbone=" in name:
        assert len(said) == 1 and "backbone=<readme_example.SmallConvNet>" in said[0]
        assert namespace["loaded"].task_vectors.backbone is not None
    else:
        assert said == []
