"""benchmarks/compare_methods.py --quick runs end to end and its tables agree with what they are built from."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from paretomerge.suites import FAST_RECIPE, FAST_TASKS, TinySuite
from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    return load_benchmark("compare_methods")


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_quick_comparison_writes_both_tables(fast_tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARETOMERGE_CACHE", str(fast_tiny.cache_path.parents[1]))  # the session's fast suite
    out = tmp_path / "out"
    load_script().main(["--quick", "--out", str(out)])
    for name in ("table_a", "table_b", "compare"):
        assert (out / f"{name}.md").is_file(), name
    assert "Table A" in capsys.readouterr().out

    table_a = {row["method"]: row for row in read(out / "table_a.csv")}
    assert list(table_a) == [
        "individual", "zero-shot θ0", "weight averaging", "Task Arithmetic", "TIES", "DARE-TA", "DARE-TIES",
        "AdaMerging (task-wise)", "AdaMerging (layer-wise)", "AdaMerging++", "AdaMerging (task-wise), β_div 0.1",
        "AdaMerging (layer-wise), β_div 0.1", "AdaMerging++, β_div 0.1", "Pareto Merging (ours) (equal pref.)",
        "Pareto Merging++ (ours) (equal pref.)", "Pareto Merging (paper) (equal pref.)",
        "Pareto Merging++ (paper) (equal pref.)",
    ]
    # Rows built through the static registry agree with the suite's own build report.
    report = TinySuite(tasks=list(FAST_TASKS), recipe=FAST_RECIPE, test_images=128, val_images=64, batch_size=8,
                       progress=False).build_report
    for task in FAST_TASKS:
        assert float(table_a["Task Arithmetic"][task]) == pytest.approx(
            100 * report["tasks"][task]["task_arithmetic_accuracy"], abs=0.051)
        assert float(table_a["weight averaging"][task]) == pytest.approx(
            100 * report["tasks"][task]["weight_averaging_accuracy"], abs=0.051)
    assert table_a["AdaMerging (layer-wise)"]["runs"] == "1" and table_a["AdaMerging (layer-wise)"]["steps"] == "10"
    assert table_a["TIES"]["runs"] == "0"

    table_b = {row["method"]: row for row in read(out / "table_b.csv")}
    for name in ("AdaMerging + preference (2 runs)", "AdaMerging + preference, β_div 0.1 (2 runs)"):
        assert table_b[name]["runs"] == "2", name
    assert {"AdaMerging (layer-wise)", "AdaMerging (layer-wise), β_div 0.1"} <= set(table_b)
    # A single model's preference-weighted sum over preferences summing to 1 lies within its accuracies.
    ta = [float(table_a["Task Arithmetic"][t]) for t in FAST_TASKS]
    mean_ta = float(table_b["Task Arithmetic"]["20 preferences"].split(" ± ")[0])
    assert min(ta) - 0.1 <= mean_ta <= max(ta) + 0.1
