"""The README's and docs/'s Python examples run as written, their links lead somewhere, and the README's test command
is the one CI runs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
NOT_RUN = "# Not run by the tests"
OWN_MODELS = "# Your own models: "
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def prose(page: Path) -> str:
    """The page without its code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", page.read_text(), flags=re.S))


OWN_MODEL_EXAMPLES = {b.split("\n", 1)[0][len(OWN_MODELS):]: (page, b)
                      for page in PAGES for b in python_blocks(page) if b.startswith(OWN_MODELS)}
# Blocks run in order, one namespace per page; the own-models examples run on their own, below.
RUN_BY_PAGE = {name(page): [b for b in python_blocks(page) if not b.startswith((NOT_RUN, OWN_MODELS))]
               for page in PAGES}
RUN_BY_PAGE = {page: blocks for page, blocks in RUN_BY_PAGE.items() if blocks}


def after(steps: list[tuple[str, dict]], text: str) -> dict:
    """The namespace as it was right after the first block containing ``text``."""
    return next(namespace for block, namespace in steps if text in block)


def check_readme(steps, tmp_path):
    fit = after(steps, "load_from_checkpoint")
    assert (tmp_path / "runs" / "example" / "last.ckpt").exists()
    assert fit["logits"].shape == (4, 3)
    assert fit["model"].preference_tensor.num_parameters() > 0
    own = after(steps, "TaskVectors.from_state_dicts")  # "Your own models in five lines"
    assert own["logits"].shape == (4, 5) and torch.isfinite(own["logits"]).all()


def check_own_models(steps, tmp_path):
    export = after(steps, "load_pareto_set")
    assert (tmp_path / "runs" / "example" / "pareto_set.safetensors").exists()
    assert export["net"].task_names == ("colour", "stripes", "size")  # the export example's model


def check_baselines(steps, tmp_path):
    assert set(after(steps, "AdaMerging(")["ada_accuracy"]) == {"colour", "stripes", "size"}


def check_unseen_tasks(steps, tmp_path):
    assert "warmth" in after(steps, "select_for_unseen_task(")["chosen"].model.heads  # it reads the new task


def check_language_models(steps, tmp_path):
    ns = after(steps, "HFTextSuite(")
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "merged" / "tokenizer.json").exists()
    assert set(ns["suite"].evaluate(ns["net"])) == {"fr", "de"}
    with torch.no_grad():  # the reloaded directory is the trade-off at(0.7, 0.3) gave
        torch.testing.assert_close(ns["reloaded"](ns["ids"]).logits, ns["net"]({"input_ids": ns["ids"]}),
                                   rtol=0, atol=1e-5)


def check_cnn(steps, tmp_path):
    ns = after(steps, "configure_buffers(")
    theta0 = ns["pretrained"].bn1.running_var
    recomputed, merged = ns["net"].backbone.bn1.running_var, ns["merged"].backbone.bn1.running_var
    assert not torch.equal(recomputed, theta0) and not torch.equal(merged, theta0)
    assert not torch.equal(recomputed, merged) and ns["tv"].buffer_policy == "merged"


CHECKS = {"README.md": check_readme, "docs/cnn.md": check_cnn, "docs/own-models.md": check_own_models,
          "docs/baselines.md": check_baselines,
          "docs/unseen-tasks.md": check_unseen_tasks, "docs/language-models.md": check_language_models}


def test_every_page_with_examples_is_run_and_checked():
    assert set(CHECKS) == set(RUN_BY_PAGE), "every page with runnable examples needs its checks in CHECKS"


@pytest.mark.slow
@pytest.mark.parametrize("page", list(RUN_BY_PAGE))
def test_python_examples_run(page, fast_tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PARETOMERGE_CACHE", str(fast_tiny.cache_path.parents[1]))  # the session's fast suite
    namespace: dict = {}
    steps = []
    for block in RUN_BY_PAGE[page]:
        exec(compile(block, page, "exec"), namespace)
        steps.append((block, dict(namespace)))
    CHECKS[page](steps, tmp_path)


def test_only_the_clip_example_is_not_run():
    """The CLIP example needs the real data, checkpoints and weights, which no test machine has; every other
    Python block in the README and docs/ runs."""
    not_run = [(name(page), b) for page in PAGES for b in python_blocks(page) if b.startswith(NOT_RUN)]
    assert [page for page, _ in not_run] == ["docs/clip.md"]
    assert "CLIPSuite(" in not_run[0][1]


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README.read_text(), flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, "the README's test command must be run verbatim by .ci/run"


def test_the_own_models_section_has_its_four_examples():
    assert [n.split(" (")[0] for n in OWN_MODEL_EXAMPLES] == [
        "open_clip by name", "a torchvision ViT", "a Hugging Face CLIPVisionModel",
        "a hand-built backbone, loaded with backbone="]
    assert {name(page) for page, _ in OWN_MODEL_EXAMPLES.values()} == {"docs/own-models.md"}


def test_the_readme_links_every_doc():
    linked = {(ROOT / target.split("#")[0]).resolve() for target in LINK.findall(prose(README))}
    assert DOCS and [name(d) for d in DOCS if d.resolve() not in linked] == []


def slugs(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_lead_somewhere(page):
    """Every relative link in the README and docs/ names an existing file, and a heading there if it has an anchor."""
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in slugs(file)):
            broken.append(target)
    assert broken == []


@pytest.mark.slow
@pytest.mark.parametrize("example", list(OWN_MODEL_EXAMPLES))
def test_own_models_examples_run(example, tmp_path, monkeypatch):
    """Each example of "Your own models" runs as written, on its own; saving warns exactly when a module cannot be
    recorded, and the logits come from the model it built (or loaded)."""
    if "Hugging Face" in example:
        pytest.importorskip("transformers", reason="the Hugging Face example needs transformers (pip install .[hf])")
    page, block = OWN_MODEL_EXAMPLES[example]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(block, name(page), "exec"), namespace)
    said = [str(w.message) for w in caught if "records no way to rebuild" in str(w.message)]
    assert namespace["logits"].shape[0] == 2 and torch.isfinite(namespace["logits"]).all()
    if "backbone=" in example:
        assert len(said) == 1 and "backbone=<readme_example.SmallConvNet>" in said[0]
        assert namespace["loaded"].task_vectors.backbone is not None
    else:
        assert said == []
