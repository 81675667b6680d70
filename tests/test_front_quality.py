"""benchmarks/front_quality.py --quick runs end to end, and what it prints is what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from paretomerge.front import static_front, summary_preferences
from paretomerge.pareto import hypervolume
from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    return load_benchmark("front_quality")


@pytest.mark.slow
def test_the_quick_sweep_compares_ours_the_paper_and_the_free_front(fast_tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARETOMERGE_CACHE", str(fast_tiny.cache_path.parents[1]))  # the session's fast suite
    script = load_script()
    results = script.main(["--quick", "--out", str(tmp_path / "out.jsonl")])
    assert len(results) == 1 and [json.loads(line) for line in (tmp_path / "out.jsonl").open()] == results
    result = results[0]
    assert (result["K"], result["P"]) == (3, 37)  # the equal preference, then SPEC §4's 36 Das-Dennis points
    assert set(result["hv"]) == {"ours", "paper", "TA + preference"}
    assert result["winner"] == max(result["hv"], key=result["hv"].get)
    # the free front's hypervolume is the static merges' own, at the same preferences
    free = static_front("task_arithmetic_preference", fast_tiny.task_vectors(), fast_tiny, summary_preferences(3, 0))
    assert result["hv"]["TA + preference"] == pytest.approx(hypervolume(free), rel=1e-9)
    assert all(0 < v < 1 for v in result["hv"].values())
    out = capsys.readouterr().out
    assert f"{result['hv']['ours']:.4f}" in out and "small-set cases" in out


def test_adamerging_plus_preference_is_one_run_per_preference_with_the_diversity_term(fast_tiny, monkeypatch):
    monkeypatch.setenv("PARETOMERGE_CACHE", str(fast_tiny.cache_path.parents[1]))
    script = load_script()
    made = []

    class Recording(script.AdaMerging):
        def __init__(self, **options):
            made.append(options)
            super().__init__(**options)

    monkeypatch.setattr(script, "AdaMerging", Recording)
    preferences = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    front = script.adamerging_front(fast_tiny, preferences, steps=2, beta_div=0.1)
    assert front.shape == (2, 3) and bool(((front >= 0) & (front <= 1)).all())
    assert [m["preference"] for m in made] == preferences.tolist() and {m["beta_div"] for m in made} == {0.1}
