"""benchmarks/bench_lm_memory.py --quick: loading K = 2 fine-tuned Llamas (fp32 and bf16 τ) and one Pareto Merging
step, each in a fresh process, stay within a sane factor of `memory_plan`, and the table prints what was measured."""

from __future__ import annotations

from tests.conftest import load_benchmark

MIB = 2**20


def test_the_quick_run_measures_loading_and_a_step_within_the_plan(capsys):
    script = load_benchmark("bench_lm_memory")
    result = script.main(["--quick"])
    rows = result["rows"]
    assert [(r["size"], r["tasks"], r["config"]) for r in rows] == [("4M", 2, "fp32/fp32"), ("4M", 2, "fp32/bf16")]
    out = capsys.readouterr().out
    fp32, bf16 = rows
    for row in rows:
        assert "skipped" not in row, row
        assert row["params"] == 4_196_672 and row["model_bytes"] == 4 * row["params"]
        assert row["tau_bytes"] == row["arithmetic_bytes"] - row["model_bytes"]  # τ allocated as planned
        # Loading holds θ0, the K stacks and one shard (the plan): measured 1.16× (fp32 τ) and 1.4-1.6× (bf16 τ) of
        # it here, about 10-25 MiB above it, code that runs once included. 1.5× the plan + 48 MiB leaves 40-65 MiB;
        # reading the two fine-tunes whole and keeping an fp64 copy of τ (+58 MiB) broke it for bf16 τ.
        assert 0 < row["load_above"] <= 1.5 * row["total_bytes"] + 48 * MIB, row
        assert row["step_above"] >= row["load_above"] - 16 * MIB and row["grad_ok"], row
        line = (f"| 4M (4,196,672) | 2 | {row['config']} | {row['model_bytes'] / MIB:,.0f} | "
                f"{row['arithmetic_bytes'] / MIB:,.0f} | {row['total_bytes'] / MIB:,.0f} | "
                f"{row['load_above'] / MIB:,.0f} | {row['load_above'] / row['total_bytes']:.2f} |")
        assert line in out, (line, out)
    assert bf16["tau_bytes"] * 2 == fp32["tau_bytes"] == 2 * fp32["model_bytes"]  # K·M, and K·M/2 in bf16
    assert fp32["loss"] == bf16["loss"] or abs(fp32["loss"] - bf16["loss"]) < 1e-3  # the same step, τ rounded
    assert "Baseline: a fresh process" in out and result["extrapolated"] == []  # one size: no line to extrapolate
