"""Why does entropy-driven merging fail or succeed on the TinySuite? Prints five tables (default suite or --tasks):

1. accuracy of task-wise merges θ0 + c·Σ_k τ_k for several c (Task Arithmetic's curve);
2. accuracy on every task with one task vector added at 0.3 and at 1.0 (how linear and how interfering τ_k is),
   and the pairwise cosine of the task vectors;
3. Spearman correlation of per-task prediction entropy with accuracy over random task-wise merges
   (negative: lower entropy means higher accuracy, which AdaMerging and Pareto Merging rely on);
4. AdaMerging, AdaMerging++, Pareto Merging and Pareto Merging++ (equal preference) over 500 steps: mean accuracy,
   mean entropy, and how much the predictions collapse onto one class;
5. Pareto Merging by rank and Frobenius weight.

    python benchmarks/tiny_suite_diagnostics.py                        # TinySuite() (seed 0), ~10 min on 2 cores
    python benchmarks/tiny_suite_diagnostics.py --tasks digit position  # a subset
"""

from __future__ import annotations

import argparse

import lightning as L
import numpy as np
import torch
from scipy.stats import spearmanr

from paretomerge import AdaMerging, ParetoMerging
from paretomerge.kernels import forward_features, merge
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION
from paretomerge.objectives import entropy
from paretomerge.suites import TinySuite

STEPS = (0, 100, 250, 500)


class _Record(L.Callback):
    """Appends ``measure(module)`` before each step of ``STEPS`` but the last (measured after the fit)."""

    def __init__(self, cells: list[float], measure) -> None:
        self.cells, self.measure = cells, measure

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step in STEPS[:-1]:
            self.cells.append(self.measure(module))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=None, help="TinySuite tasks (default: all eight)")
    args = parser.parse_args()
    suite = TinySuite(tasks=args.tasks, progress=False)
    tv = suite.task_vectors()
    tasks, num_tasks = list(tv.task_names), tv.num_tasks
    test = suite._split("test")
    backbone = tv.backbone.eval()

    def evaluate(params) -> tuple[np.ndarray, np.ndarray]:
        """Accuracy and mean entropy per task, ``[K]`` each."""
        acc, ent = [], []
        with torch.no_grad():
            for t in tasks:
                images, labels = test[t]
                logits = tv.heads[t](forward_features(backbone, params, images))
                acc.append(float((logits.argmax(-1) == labels).float().mean()))
                ent.append(float(entropy(logits)))
        return np.array(acc), np.array(ent)

    def row(name: str, acc: np.ndarray) -> str:
        return f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in acc) + f" | {100 * acc.mean():.1f} |"

    header = "| merge | " + " | ".join(tasks) + " | mean |\n|" + " --- |" * (num_tasks + 2)
    print("## 1. Task-wise merges θ0 + c·Σ τ_k (test accuracy, %)\n\n" + header)
    for c in (0.0, 0.1, 0.2, 0.3, 0.5):
        print(row(f"c = {c}", evaluate(merge(tv.theta0, tv.tau, torch.full((num_tasks,), c)))[0]))

    print("\n## 2. One task vector at a time: θ0 + c·τ_k (rows), accuracy on every task (columns)\n\n" + header)
    for c in (0.3, 1.0):
        for k, t in enumerate(tasks):
            coefficients = torch.zeros(num_tasks)
            coefficients[k] = c
            print(row(f"{t} × {c}", evaluate(merge(tv.theta0, tv.tau, coefficients))[0]))
    flat = torch.stack([torch.cat([tv.tau[n][k].flatten() for n in tv.layer_names]) for k in range(num_tasks)])
    flat = flat / flat.norm(dim=1, keepdim=True)
    cosine = (flat @ flat.T).numpy()
    off = cosine[~np.eye(num_tasks, dtype=bool)]
    print(f"\nPairwise cosine of the task vectors: min {off.min():+.3f}, max {off.max():+.3f}")

    rng = np.random.default_rng(0)
    accs, ents = [], []
    for _ in range(24):
        c = torch.tensor(rng.uniform(0.0, 0.6, num_tasks), dtype=torch.float32)
        a, e = evaluate(merge(tv.theta0, tv.tau, c))
        accs.append(a)
        ents.append(e)
    accs, ents = np.array(accs), np.array(ents)
    print("\n## 3. Spearman(entropy, accuracy) over 24 random task-wise merges, c ~ U[0, 0.6]^K\n")
    print("| task | " + " | ".join(tasks) + " | mean over tasks |\n|" + " --- |" * (num_tasks + 2))
    per_task = [spearmanr(ents[:, k], accs[:, k]).statistic for k in range(num_tasks)]
    overall = spearmanr(ents.mean(1), accs.mean(1)).statistic
    print("| ρ | " + " | ".join(f"{r:+.2f}" for r in per_task) + f" | {overall:+.2f} |")

    def measure(params) -> str:
        """Mean test accuracy (%) / mean entropy (nats) / mean share of the most-predicted class (%)."""
        acc, ent = evaluate(params)
        shares = []
        with torch.no_grad():
            for t in tasks:
                predictions = tv.heads[t](forward_features(backbone, params, test[t][0])).argmax(-1)
                shares.append(float(torch.bincount(predictions).max()) / len(predictions))
        return f"{100 * acc.mean():.1f} / {ent.mean():.2f} / {100 * np.mean(shares):.0f}"

    print("\n## 4. Entropy-driven training on the adaptation split: mean test accuracy (%) / mean entropy (nats) / "
          "share of the most-predicted class (%), at the equal preference\n")
    print("| method | " + " | ".join(f"{s} steps" for s in STEPS) + " |\n|" + " --- |" * (len(STEPS) + 1))
    equal = torch.full((num_tasks,), 1.0 / num_tasks)
    for name, cls, options in (("AdaMerging (layer-wise)", AdaMerging, {}),
                               ("AdaMerging++", AdaMerging, {"ties_top_k": 0.2}),
                               ("Pareto Merging", ParetoMerging, {}),
                               ("Pareto Merging++", ParetoMerging, {"ties_top_k": 0.2})):
        gamma = equal if cls is ParetoMerging else None
        cells: list[str] = []
        model = cls(**options)
        L.Trainer(max_steps=STEPS[-1], accelerator="cpu", logger=False, enable_checkpointing=False,
                  callbacks=[_Record(cells, lambda m, g=gamma: measure(m.merged_parameters(g)))],
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  limit_val_batches=0).fit(model, datamodule=suite)
        cells.append(measure(model.merged_parameters(gamma)))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    print("\n## 5. Pareto Merging after 500 steps by preference-tensor rank and Frobenius weight: mean test accuracy "
          "(%) / mean entropy / share of the most-predicted class (%), at the equal preference\n")
    print("| rank | β_frob = 1 (default) | β_frob = 100 |\n| --- | --- | --- |")
    for rank in (1, 4, 16):
        cells = []
        for beta_frob in (1.0, 100.0):
            model = ParetoMerging(rank=rank, beta_frob=beta_frob, **PAPER_CONFIGURATION)
            L.Trainer(max_steps=STEPS[-1], accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0).fit(model, datamodule=suite)
            cells.append(measure(model.merged_parameters(equal)))
        print(f"| {rank} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
