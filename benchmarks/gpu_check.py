"""The GPU check, in one command: Pareto Merging (ours, the default basis) on open_clip ViT-B/32 with random weights
(``pretrained=None``), K = 8 random task vectors and synthetic images, 500 steps under a Lightning Trainer, then the
30-preference front (FitSummary's set) through ``at(γ)``, the `.ckpt` and the export. Prints wall times, peak GPU
memory and the stored sizes against one backbone.

The images are noise, so the accuracies mean nothing; what is measured is the cost: the step, the front, the memory and
the bytes. ``--toy`` runs the same path on the CPU at toy sizes (a width-32 open_clip ViT, 5 steps, a few images):
tests/test_compact.py runs it, so the script works the day a GPU is lent.

``--case lm`` is the language-model case (issue 32): a random-weight Llama of about 1.1B parameters (TinyLlama's
shape: 22 layers, hidden 2048, MLP 5632, 32 heads with 4 key-value heads, vocab 32000) in bf16, K = 4 fine-tunes (θ0
+ noise) with bf16 task vectors, a few steps of ours on random token batches (the next-token loss): step time, peak
GPU memory against (K + 1) × the model's bytes, and the equal preference and the one-hots through ``at(γ)``. With
``--toy`` it runs a 2-layer width-32 Llama on the CPU (tests/test_language_models.py runs it).

    python benchmarks/gpu_check.py                      # on the GPU machine
    python benchmarks/gpu_check.py --basis-rank none    # the full basis, for comparison
    python benchmarks/gpu_check.py --case lm            # the 1.1B Llama, K = 4, bf16
    python benchmarks/gpu_check.py --toy                # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from paretomerge import ModuleSpec, ParetoMerging, TaskVectors, export_pareto_set
from paretomerge.front import evaluate_front, summary_preferences
from paretomerge.modules.pareto_merging import DEFAULT_BASIS_RANK
from paretomerge.pareto import hypervolume
from paretomerge.preferences import equal_and_one_hots
from paretomerge.suites import TextSuite

MIB = 2**20


class NoiseSuite(L.LightningDataModule):
    """Unlabeled noise images per task for training (a fixed pool, cycled) and a labeled noise split for the front."""

    def __init__(self, tasks: list[str], image_size: int, batch_size: int, pool: int, labeled: int,
                 classes: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.batch_size = batch_size
        self.train = {t: torch.randn(pool, 3, image_size, image_size, generator=generator) for t in tasks}
        self.test = {t: (torch.randn(labeled, 3, image_size, image_size, generator=generator),
                         torch.randint(0, classes, (labeled,), generator=generator)) for t in tasks}

    def train_dataloader(self) -> CombinedLoader:
        loaders = {t: DataLoader(TensorDataset(x), batch_size=self.batch_size, shuffle=True, drop_last=True)
                   for t, x in self.train.items()}
        return CombinedLoader(loaders, "max_size_cycle")

    @torch.no_grad()
    def evaluate(self, net: nn.Module, split: str = "test", tasks: list[str] | None = None) -> dict[str, float]:
        device = next(net.parameters()).device
        out = {}
        for task in tasks or list(self.test):
            images, labels = self.test[task]
            correct = sum(int((net(x.to(device), task=task).argmax(-1).cpu() == y).sum())
                          for x, y in zip(images.split(self.batch_size), labels.split(self.batch_size), strict=True))
            out[task] = correct / len(labels)
        return out


def problem(toy: bool, num_tasks: int) -> tuple[TaskVectors, int]:
    if toy:
        spec = ModuleSpec("open_clip.transformer:VisionTransformer",
                          {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 4, "mlp_ratio": 4.0,
                           "output_dim": 16})
    else:
        spec = ModuleSpec("open_clip:create_model", {"model_name": "ViT-B-32", "pretrained": None}, attr="visual")
    torch.manual_seed(0)
    visual = spec.build()
    names = [f"task{k}" for k in range(num_tasks)]
    state = visual.state_dict()

    def finetuned(k: int):
        def read() -> dict[str, torch.Tensor]:
            generator = torch.Generator().manual_seed(1 + k)
            return {n: v + 1e-3 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                    for n, v in state.items()}
        return read

    heads = {n: nn.Linear(visual.output_dim, 10) for n in names}
    tv = TaskVectors.from_state_dicts(visual, [finetuned(k) for k in range(num_tasks)], names, heads,
                                      backbone_spec=spec, copy_backbone=False)
    size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    return tv, size


# TinyLlama-1.1B's shape (random weights: nothing is downloaded); --toy: a 2-layer width-32 Llama
LLAMA_1B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
            "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048}
LLAMA_TOY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


class NoiseTextSuite(TextSuite):
    """Random token sequences per task: ``pool`` for training, ``labeled`` for the front (next-token loss)."""

    def __init__(self, tv: TaskVectors, vocab: int, seq_len: int, batch_size: int, pool: int, labeled: int) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=batch_size)
        generator = torch.Generator().manual_seed(0)
        self.tasks, self._tv = tv.task_names, tv
        self._splits = {(t, s): {"input_ids": torch.randint(0, vocab, (pool if s == "train" else labeled, seq_len),
                                                            generator=generator)}
                        for t in self.tasks for s in ("train", "val", "test")}

    def task_vectors(self) -> TaskVectors:
        return self._tv

    def token_split(self, task: str, split: str) -> dict[str, torch.Tensor]:
        return self._splits[task, split]


def lm_problem(toy: bool, num_tasks: int, cuda: bool) -> TaskVectors:
    """θ0 (bf16 on a GPU) and K fine-tunes θ0 + 1e-3·noise, τ in bf16, built on the device without a copy per task."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**(LLAMA_TOY if toy else LLAMA_1B))).to(dtype)
    names = [f"task{k}" for k in range(num_tasks)]

    def finetuned(k: int):
        def read() -> dict[str, torch.Tensor]:
            generator = torch.Generator(device=device).manual_seed(1 + k)
            return {n: p + 1e-3 * torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype)
                    for n, p in model.state_dict().items()}
        return read

    return TaskVectors.from_state_dicts(model, [finetuned(k) for k in range(num_tasks)], names,
                                        {n: nn.Identity() for n in names}, dtype=torch.bfloat16, copy_backbone=False)


def run_lm(args: argparse.Namespace, cuda: bool) -> dict:
    """The language-model case: ours on a random Llama, a few steps, peak memory against (K + 1) × the model."""
    steps = args.steps if args.steps is not None else (3 if args.toy else 20)
    seq_len, batch = (16, 2) if args.toy else (256, 4)
    start = time.perf_counter()
    tv = lm_problem(args.toy, args.tasks, cuda)
    vocab = tv.backbone.config.vocab_size
    suite = NoiseTextSuite(tv, vocab, seq_len, batch, pool=4 * batch, labeled=2 * batch)
    setup_s = time.perf_counter() - start
    model = ParetoMerging(task_vectors=tv, beta_div=0.0, objective="loss")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(max_steps=steps, accelerator="gpu" if cuda else "cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=not args.toy,
                        limit_val_batches=0, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=suite)
    if cuda:
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / MIB if cuda else float("nan")
    start = time.perf_counter()
    front = evaluate_front(model, suite, equal_and_one_hots(args.tasks), progress=not args.toy)
    front_s = time.perf_counter() - start
    params = sum(p.numel() for p in tv.theta0.values())
    model_mib = sum(p.numel() * p.element_size() for p in tv.theta0.values()) / MIB
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "case": "lm", "toy": args.toy,
        "tasks": args.tasks, "parameters": params, "steps": steps, "tokens_per_step": args.tasks * batch * seq_len,
        "setup_s": setup_s, "fit_s": fit_s, "step_ms": 1000 * fit_s / steps, "front_s": front_s,
        "peak_gpu_mib": peak, "model_mib": model_mib, "tau_mib": tv.nbytes() / MIB,
        "peak_over_k_plus_1_models": peak / ((args.tasks + 1) * model_mib) if cuda else float("nan"),
        "equal_loss": float(front[0].mean()),  # random tokens: ~log(vocab), a check that it ran, not a result
    }
    print(f"\n{result['device']}, random Llama of {params / 1e9:.2f}B parameters ({'toy' if args.toy else 'bf16'}), "
          f"K={args.tasks}, {steps} steps of {result['tokens_per_step']} tokens\n")
    print("| what | value |\n|---|---:|")
    for label, key, form in (("task vectors and data, s", "setup_s", ".1f"), ("fit, s", "fit_s", ".1f"),
                             ("per step, ms", "step_ms", ".0f"),
                             ("equal + one-hots through at(γ), s", "front_s", ".1f"),
                             ("model (θ0), MiB", "model_mib", ".0f"), ("task vectors, MiB", "tau_mib", ".0f"),
                             ("peak GPU memory, MiB", "peak_gpu_mib", ".0f"),
                             ("peak / ((K + 1) × model)", "peak_over_k_plus_1_models", ".2f")):
        print(f"| {label} | {format(result[key], form)} |")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", action="store_true", help="CPU, a width-32 ViT, 5 steps: checks the script runs")
    parser.add_argument("--case", choices=("vit", "lm"), default="vit",
                        help="vit: open_clip ViT-B/32, K = 8; lm: a random 1.1B Llama, K = 4, bf16")
    parser.add_argument("--tasks", type=int, default=None, help="default 8 (vit) or 4 (lm)")
    parser.add_argument("--steps", type=int, default=None, help="default 500 (5 with --toy)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per task per step (SPEC: 32)")
    parser.add_argument("--basis-rank", default=str(DEFAULT_BASIS_RANK), help="an int, a fraction, or none")
    parser.add_argument("--precision", default=None, help="Trainer precision (default: bf16-mixed on a GPU, 32 on CPU)")
    parser.add_argument("--out", default=None, help="write the result as JSON here too")
    args = parser.parse_args(argv)
    args.tasks = args.tasks or (4 if args.case == "lm" else 8)
    cuda = torch.cuda.is_available() and not args.toy
    if args.case == "lm":
        result = run_lm(args, cuda)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        return result
    rank = None if args.basis_rank.lower() in ("none", "full") else \
        (float(args.basis_rank) if "." in args.basis_rank else int(args.basis_rank))
    steps = args.steps if args.steps is not None else (5 if args.toy else 500)
    precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    batch = 4 if args.toy else args.batch_size

    start = time.perf_counter()
    tv, size = problem(args.toy, args.tasks)
    suite = NoiseSuite(list(tv.task_names), size, batch, pool=2 * batch, labeled=64 if args.toy else 256,
                       classes=10)
    setup_s = time.perf_counter() - start
    model = ParetoMerging(task_vectors=tv, basis_rank=rank)
    if cuda:
        model.cuda()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    basis = model.preference_basis()  # the truncated SVD, once (on the GPU when there is one)
    if cuda:
        torch.cuda.synchronize()
    basis_s = time.perf_counter() - start
    trainer = L.Trainer(max_steps=steps, accelerator="gpu" if cuda else "cpu", devices=1, precision=precision,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=not args.toy, limit_val_batches=0, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=suite)
    if cuda:
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - start
    preferences = summary_preferences(args.tasks, 0)
    start = time.perf_counter()
    front = evaluate_front(model, suite, preferences, progress=not args.toy)
    front_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / MIB if cuda else float("nan")
    backbone = sum(t.numel() * t.element_size() for t in tv.backbone.state_dict().values())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.ckpt"
        trainer.save_checkpoint(path)
        ckpt_bytes = path.stat().st_size
        export_bytes = export_pareto_set(model, Path(tmp) / "set.safetensors").stat().st_size
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "toy": args.toy, "tasks": args.tasks,
        "steps": steps, "images_per_step": batch * args.tasks, "precision": precision, "basis_rank": rank,
        "setup_s": setup_s, "basis_s": basis_s, "fit_s": fit_s, "step_ms": 1000 * fit_s / steps,
        "front_s": front_s, "preferences": len(preferences), "hypervolume": hypervolume(front),
        "peak_gpu_mib": peak, "backbone_mib": backbone / MIB, "basis_mib": basis.nbytes() / MIB,
        "ckpt_mib": ckpt_bytes / MIB, "ckpt_ratio": ckpt_bytes / backbone, "export_ratio": export_bytes / backbone,
    }
    print(f"\n{result['device']}, {'toy ViT (width 32)' if args.toy else 'open_clip ViT-B/32'}, K={args.tasks}, "
          f"{steps} steps of {result['images_per_step']} images, {precision}, basis_rank {rank}\n")
    print("| what | value |\n|---|---:|")
    for label, key, form in (("task vectors and data, s", "setup_s", ".1f"), ("preference basis (SVD), s", "basis_s",
                             ".2f"), ("fit, s", "fit_s", ".1f"), ("per step, ms", "step_ms", ".1f"),
                             (f"front ({len(preferences)} preferences), s", "front_s", ".1f"),
                             ("peak GPU memory, MiB", "peak_gpu_mib", ".0f"), ("basis, MiB", "basis_mib", ".1f"),
                             (".ckpt, MiB", "ckpt_mib", ".1f"), (".ckpt / one backbone", "ckpt_ratio", ".3f"),
                             ("export / one backbone", "export_ratio", ".3f")):
        print(f"| {label} | {format(result[key], form)} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
