"""The comparison: every baseline and Pareto Merging on the TinySuite, in the shape of the papers' tables.

    python benchmarks/compare_methods.py                 # default suite (8 tasks), 500 steps; ~35 min on 2 cores
    python benchmarks/compare_methods.py --quick         # the fast 3-task suite, 10 steps: a smoke test (~1 min)

Tables (printed as Markdown, and saved as CSV and Markdown under ``--out``):

- **A** (Pareto Merging Table 4 shape): per-task test accuracy and the mean (raw and normalised by the individual
  models) of individual, θ0, weight averaging, Task Arithmetic, TIES, DARE-TA, DARE-TIES, AdaMerging (task-wise,
  layer-wise), AdaMerging++, and Pareto Merging and Pareto Merging++ at the equal preference, each both ours (the
  default: preference-conditioned coefficients, diversity term) and the paper's configuration (SPEC §3 exactly).
  Every AdaMerging row is there twice: as published, and with ours' diversity term (β_div 0.1), the like-for-like
  comparison with ours.
- **B** (MAP Table 4 shape): the preference-weighted sum Σ_k p_k acc_k over 20 seeded Dirichlet(1) preferences,
  mean ± std: Pareto Merging(++) ``at(p)``, Task Arithmetic + preference, AdaMerging + preference (one run per
  preference, on the first ``--pref-runs`` of them, with and without the diversity term) and the single-model methods.

The fronts on small task sets (hypervolume against Task Arithmetic + preference and AdaMerging + preference, over
seeds) are benchmarks/front_quality.py's.

Every table has cost columns: optimisation runs, training steps, and wall seconds (merging or fitting only, not
evaluation). Every method merges through ``kernels.merge`` (the static merges, ``at``) and trains through Lightning.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import logging
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `callbacks` lives at the repository root

from paretomerge import AdaMerging, ParetoMerging, static_model  # noqa: E402
from paretomerge.front import evaluate_front  # noqa: E402
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION  # noqa: E402
from paretomerge.pareto import preference_weighted_sum  # noqa: E402
from paretomerge.preferences import dirichlet_set  # noqa: E402
from paretomerge.suites import FAST_RECIPE, FAST_TASKS, TinySuite  # noqa: E402

STATIC = [  # (row label, registered name, options)
    ("weight averaging", "weight_averaging", {}),
    ("Task Arithmetic", "task_arithmetic", {}),
    ("TIES", "ties", {}),
    ("DARE-TA", "dare_task_arithmetic", {}),
    ("DARE-TIES", "dare_ties", {}),
]
DIV = inspect.signature(ParetoMerging).parameters["beta_div"].default  # ours' diversity term
ADAMERGING = [  # (row label, options): AdaMerging as published, then with ours' diversity term
    (f"{label}{suffix}", {**options, **div})
    for suffix, div in (("", {}), (f", β_div {DIV:g}", {"beta_div": DIV}))
    for label, options in (("AdaMerging (task-wise)", {"granularity": "task"}), ("AdaMerging (layer-wise)", {}),
                           ("AdaMerging++", {"ties_top_k": 0.2}))
]
LEARNED = [  # (row label, class, options)
    *((label, AdaMerging, options) for label, options in ADAMERGING),
    ("Pareto Merging (ours)", ParetoMerging, {}),
    ("Pareto Merging++ (ours)", ParetoMerging, {"ties_top_k": 0.2}),
    ("Pareto Merging (paper)", ParetoMerging, PAPER_CONFIGURATION),
    ("Pareto Merging++ (paper)", ParetoMerging, {**PAPER_CONFIGURATION, "ties_top_k": 0.2}),
]
PARETO = [(label, options) for label, cls, options in LEARNED if cls is ParetoMerging]


class Runner:
    """Fits and evaluates methods on one suite, timing each fit or merge."""

    def __init__(self, suite: TinySuite, steps: int) -> None:
        self.suite, self.steps = suite, steps
        self.tv = suite.task_vectors()
        self.tasks = list(self.tv.task_names)
        report = suite.build_report
        self.individual = np.array([report["tasks"][t]["individual_accuracy"] for t in self.tasks])
        self.zero_shot = np.array([report["tasks"][t]["zero_shot_accuracy"] for t in self.tasks])

    def accuracy(self, net: torch.nn.Module) -> np.ndarray:
        result = self.suite.evaluate(net)
        return np.array([result[t] for t in self.tasks])

    def static(self, name: str, **options) -> tuple[torch.nn.Module, float]:
        start = time.perf_counter()
        net = static_model(name, self.tv, **options)
        return net, time.perf_counter() - start

    def fit(self, cls: type, **options) -> tuple[L.LightningModule, float]:
        L.seed_everything(0, verbose=False)
        model = cls(**options)
        trainer = L.Trainer(max_steps=self.steps, accelerator="auto", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, deterministic=True)
        start = time.perf_counter()
        trainer.fit(model, datamodule=self.suite)
        return model, time.perf_counter() - start


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " if i == 0 else " ---: " for i in
                                                            range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def save(out: Path, name: str, header: list[str], rows: list[list[str]], title: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    text = f"### {title}\n\n{markdown(header, rows)}\n"
    (out / f"{name}.md").write_text(text)
    print("\n" + text, flush=True)
    return text


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table_a(runner: Runner, out: Path, bar: tqdm) -> tuple[str, dict]:
    """Per-task accuracy at the equal preference; returns the table and the fitted models and accuracies."""
    results: dict[str, dict] = {}
    rows = []
    total_finetune = sum(runner.suite.recipe.finetune_steps_for(t) for t in runner.tasks)
    cost_individual = [f"{len(runner.tasks)} fine-tunes", str(total_finetune), "(suite build)"]
    for label, accuracy, cost in (("individual", runner.individual, cost_individual),
                                  ("zero-shot θ0", runner.zero_shot, ["0", "0", "0"])):
        results[label] = {"accuracy": accuracy}
        rows.append([label, *map(pct, accuracy), pct(accuracy.mean()), pct((accuracy / runner.individual).mean()),
                     *cost])
    for label, name, options in STATIC:
        net, seconds = runner.static(name, **options)
        accuracy = runner.accuracy(net)
        results[label] = {"accuracy": accuracy, "seconds": seconds}
        rows.append([label, *map(pct, accuracy), pct(accuracy.mean()), pct((accuracy / runner.individual).mean()),
                     "0", "0", f"{seconds:.1f}"])
        bar.update()
    for label, cls, options in LEARNED:
        model, seconds = runner.fit(cls, **options)
        net = model.at() if not model.preference_aware else model.at([1.0] * len(runner.tasks))
        accuracy = runner.accuracy(net)
        results[label] = {"accuracy": accuracy, "seconds": seconds, "model": model}
        shown = label + (" (equal pref.)" if model.preference_aware else "")
        rows.append([shown, *map(pct, accuracy), pct(accuracy.mean()), pct((accuracy / runner.individual).mean()),
                     "1", str(runner.steps), f"{seconds:.1f}"])
        bar.update()
    header = ["method", *runner.tasks, "mean", "norm. mean", "runs", "steps", "wall s"]
    title = (f"Table A: test accuracy (%) per task, {len(runner.tasks)} tasks (normalised mean: accuracy / individual, "
             "averaged)")
    return save(out, "table_a", header, rows, title), results


def table_b(runner: Runner, results: dict, out: Path, pref_runs: int, bar: tqdm) -> str:
    num_tasks = len(runner.tasks)
    prefs = dirichlet_set(num_tasks, 20, seed=0)
    n = min(pref_runs, len(prefs))
    rows = []

    def row(label: str, acc: np.ndarray, runs: str, steps: str, seconds: float) -> None:
        scores = preference_weighted_sum(acc, prefs[: len(acc)])
        first = scores[:n]
        all20 = f"{pct(scores.mean())} ± {pct(scores.std())}" if len(scores) == len(prefs) else "—"
        rows.append([label, all20, f"{pct(first.mean())} ± {pct(first.std())}", runs, steps, f"{seconds:.1f}"])

    for label, _ in PARETO:
        model, fit_seconds = results[label]["model"], results[label]["seconds"]
        acc = evaluate_front(model, runner.suite, prefs, progress=False).numpy()
        row(f"{label} at(p)", acc, "1", str(runner.steps), fit_seconds)
        bar.update()
    start = time.perf_counter()
    nets = [static_model("task_arithmetic_preference", runner.tv, preference=p) for p in prefs]
    seconds = time.perf_counter() - start
    row("Task Arithmetic + preference", np.stack([runner.accuracy(net) for net in nets]), "0", "0", seconds)
    for suffix, div in (("", {}), (f", β_div {DIV:g}", {"beta_div": DIV})):
        accs, seconds = [], 0.0
        for p in prefs[:n]:
            model, s = runner.fit(AdaMerging, preference=p.tolist(), **div)
            accs.append(runner.accuracy(model.at()))
            seconds += s
            bar.update()
        row(f"AdaMerging + preference{suffix} ({n} runs)", np.stack(accs), str(n), str(n * runner.steps), seconds)
    for label in ("weight averaging", "Task Arithmetic", "TIES", "DARE-TA", "DARE-TIES",
                  *(label for label, _ in ADAMERGING)):
        result = results[label]
        learned = "model" in result
        row(label, np.tile(result["accuracy"], (len(prefs), 1)), "1" if learned else "0",
            str(runner.steps) if learned else "0", result["seconds"])
    header = ["method", "20 preferences", f"first {n} preferences", "runs", "steps", "wall s"]
    title = ("Table B: preference-weighted accuracy Σ_k p_k acc_k (%), mean ± std over 20 seeded Dirichlet(1) "
             f"preferences ({num_tasks} tasks); AdaMerging + preference ran on the first {n}")
    return save(out, "table_b", header, rows, title)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps of every learned run (SPEC: 500)")
    parser.add_argument("--pref-runs", type=int, default=10,
                        help="AdaMerging + preference runs in table B (one per preference; at most 20)")
    parser.add_argument("--out", default="benchmarks/results/compare", help="where the CSV and Markdown go")
    parser.add_argument("--cache-dir", default=None, help="the TinySuite cache root (default: the suite's)")
    parser.add_argument("--quick", action="store_true",
                        help="the fast 3-task suite, 10 steps, 2 preference runs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    suite_options: dict = {"progress": False, "cache_dir": args.cache_dir}
    tasks = None
    if args.quick:
        suite_options.update(recipe=FAST_RECIPE, test_images=128, val_images=64, batch_size=8)
        tasks, args.steps, args.pref_runs = list(FAST_TASKS), 10, 2
    out = Path(args.out)
    runner = Runner(TinySuite(tasks=tasks, **suite_options), args.steps)
    total = len(STATIC) + len(LEARNED) + len(PARETO) + 2 * args.pref_runs
    started = time.perf_counter()
    with tqdm(total=total, desc="methods", file=sys.stderr) as bar:
        text_a, results = table_a(runner, out, bar)
        text_b = table_b(runner, results, out, args.pref_runs, bar)
    command = "python benchmarks/compare_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    footer = (f"\nCommand: `{command.strip()}`; total wall time {time.perf_counter() - started:.0f} s; torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads.\n")
    (out / "compare.md").write_text("\n".join([text_a, text_b, footer]))
    print(footer)


if __name__ == "__main__":
    main()
