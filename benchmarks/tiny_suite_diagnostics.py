"""Why does entropy-driven merging fail or succeed on the TinySuite? Prints four tables for the default suite:

1. accuracy of task-wise merges θ0 + c·Σ_k τ_k for several c (Task Arithmetic's curve);
2. accuracy on every task with one task vector added at 0.3 and at 1.0 (how linear and how interfering τ_k is),
   and the pairwise cosine of the task vectors;
3. Spearman correlation of per-task prediction entropy with accuracy over random task-wise merges
   (negative: lower entropy means higher accuracy, which AdaMerging and Pareto Merging rely on);
4. mean accuracy of AdaMerging (λ only) and Pareto Merging (equal preference) after 0, 150 and 300 steps.

    python benchmarks/tiny_suite_diagnostics.py          # builds or loads TinySuite() (seed 0)
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from scipy.stats import spearmanr

from paretomerge import ParetoMerging
from paretomerge.kernels import forward_features, merge
from paretomerge.objectives import entropy
from paretomerge.suites import TinySuite


class _Record(L.Callback):
    """Appends ``measure(module)`` before steps 0 and 150."""

    def __init__(self, cells: list[float], measure) -> None:
        self.cells, self.measure = cells, measure

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step in (0, 150):
            self.cells.append(self.measure(module))


def main() -> None:
    suite = TinySuite(progress=False)
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

    print("\n## 4. Entropy-driven training on the adaptation split (mean test accuracy, %)\n")
    print("| method | 0 steps | 150 steps | 300 steps |\n| --- | --- | --- | --- |")
    equal = torch.full((num_tasks,), 1.0 / num_tasks)
    for name, kwargs in (("AdaMerging (λ only)", {"targets": None}), ("Pareto Merging, equal preference", {})):
        gamma = None if "targets" in kwargs else equal
        cells: list[float] = []

        model = ParetoMerging(task_vectors=tv, **kwargs)
        L.Trainer(max_steps=300, accelerator="cpu", logger=False, enable_checkpointing=False,
                  callbacks=[_Record(cells, lambda m, g=gamma: 100 * evaluate(m.merged_parameters(g))[0].mean())],
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  limit_val_batches=0).fit(model, datamodule=suite)
        cells.append(100 * evaluate(model.merged_parameters(gamma))[0].mean())
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")

if __name__ == "__main__":
    main()
