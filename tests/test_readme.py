"""The README's Python examples run as written, and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_python_examples_run(fast_tiny, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    not_run = [b for b in blocks if b.startswith("# Not run by the tests")]
    assert len(not_run) == 1  # the CLIP example, which needs real data; every other block runs
    blocks = [b for b in blocks if b not in not_run]
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
