"""Is the embedded TinyLM suite in the merging regime? Builds θ0 and the four fine-tunes from scratch per seed
(`paretomerge.suites.tiny_lm_build`) and prints the build's wall times, the test-loss matrix (next-token loss, nats per
predicted token, padding masked) of θ0, each θ_k, Task Arithmetic, weight averaging and Task Arithmetic with a one-hot
preference, the perplexity of each mean, ‖τ_k‖/‖θ0‖ and the cosines between task vectors, then the regime checks as
PASS/FAIL lines.

    python benchmarks/tiny_lm_regime.py --seeds 0 1 2 3          # the default recipe
    python benchmarks/tiny_lm_regime.py --seeds 0 --quick        # FAST_LM_RECIPE (the tests' build)
    python benchmarks/tiny_lm_regime.py --recipe '{"finetune_steps": 300}'
    python benchmarks/tiny_lm_regime.py --step-time              # forward+backward of 64 sequences, then exit
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import time

import torch
import torch.nn.functional as F

from paretomerge.suites import tiny_lm_build as lm
from paretomerge.suites.tiny_lm_build import LANGUAGES, LMRecipe

TA_SCALE, ONE_HOT_SCALE = 0.3, 1.2  # θ0 + 0.3 Σ τ_k; θ0 + 1.2 τ_k (SPEC §5, s·K γ_k with a one-hot γ)
MARGIN = 0.25  # TA must stay at least this share of (θ0 − θ_k) above θ_k on every language


def next_token_loss(model, batch: dict, batch_size: int = 128) -> float:
    """Mean cross-entropy per predicted token (nats) over ``batch``, targets that are padding left out."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(batch["input_ids"]), batch_size):
            ids, mask = batch["input_ids"][start:start + batch_size], batch["attention_mask"][start:start + batch_size]
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            keep = mask[:, 1:].bool()
            total += float(F.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def merged(model, theta0: dict, taus: dict[str, dict], coefficients: dict[str, float]):
    """A copy of ``model`` holding θ0 + Σ_k c_k τ_k (floating-point entries only)."""
    state = {n: (p + sum(c * taus[k][n] for k, c in coefficients.items()) if p.is_floating_point() else p)
             for n, p in theta0.items()}
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out


def step_time(recipe: LMRecipe, sequences: int = 64, repeats: int = 20) -> float:
    """Milliseconds of one forward+backward of ``sequences`` full-length sequences through the model."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(lm.lm_config(recipe))
    ids = torch.randint(4, model.config.vocab_size, (sequences, recipe.seq_len))
    mask = torch.ones_like(ids)
    for _ in range(3):
        model(input_ids=ids, attention_mask=mask, use_cache=False).logits.logsumexp(-1).mean().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        model(input_ids=ids, attention_mask=mask, use_cache=False).logits.logsumexp(-1).mean().backward()
    return (time.perf_counter() - start) / repeats * 1000


def build(recipe: LMRecipe, seed: int) -> tuple[object, dict[str, dict], dict[str, float]]:
    """θ0 (the model), the fine-tuned state dicts, and the wall seconds of each stage."""
    times = {}
    start = time.perf_counter()
    for language in LANGUAGES:
        for split in ("pretrain", "finetune", "test"):
            lm.documents(recipe, language, split, seed)
    times["text, every split (again below)"] = time.perf_counter() - start
    start = time.perf_counter()
    model = lm.pretrain(recipe, seed, progress=False)
    times["pretraining"] = time.perf_counter() - start
    finetuned = {}
    for language in LANGUAGES:
        start = time.perf_counter()
        finetuned[language] = lm.finetune(recipe, model, language, seed, progress=False)
        times[f"fine-tune {language}"] = time.perf_counter() - start
    return model, finetuned, times


def report(recipe: LMRecipe, seed: int) -> bool:
    model, finetuned, times = build(recipe, seed)
    build_total = sum(v for k, v in times.items() if not k.startswith("text"))
    print(f"\n=== seed {seed} ===")
    for stage, seconds in times.items():
        print(f"  {stage:32s} {seconds:6.1f} s")
    print(f"  {'build (pretraining + fine-tunes)':32s} {build_total:6.1f} s")

    tokenizer = lm.make_tokenizer()
    test = {k: lm.encode(tokenizer, lm.documents(recipe, k, "test", seed), recipe.seq_len) for k in LANGUAGES}
    theta0 = {n: p.detach().clone() for n, p in model.state_dict().items()}
    taus = {k: {n: finetuned[k][n] - p for n, p in theta0.items() if p.is_floating_point()} for k in LANGUAGES}
    rows = {"θ0": {}} | {f"θ_{k}": {k: 1.0} for k in LANGUAGES}
    rows |= {"Task Arithmetic (0.3)": {k: TA_SCALE for k in LANGUAGES},
             "weight averaging": {k: 1 / len(LANGUAGES) for k in LANGUAGES}}
    rows |= {f"TA one-hot {k} (1.2)": {k: ONE_HOT_SCALE} for k in LANGUAGES}
    losses = {name: [next_token_loss(merged(model, theta0, taus, c), test[k]) for k in LANGUAGES]
              for name, c in rows.items()}

    print(f"\n  {'test loss (nats/token)':24s}" + "".join(f"{k:>8s}" for k in LANGUAGES) + f"{'mean':>8s}{'ppl':>8s}")
    for name, values in losses.items():
        mean = sum(values) / len(values)
        print(f"  {name:24s}" + "".join(f"{v:8.3f}" for v in values) + f"{mean:8.3f}{math.exp(mean):8.2f}")
    individual = [losses[f"θ_{k}"][i] for i, k in enumerate(LANGUAGES)]
    mean_individual = sum(individual) / len(individual)
    print(f"  {'individual (θ_k on k)':24s}" + "".join(f"{v:8.3f}" for v in individual)
          + f"{mean_individual:8.3f}{math.exp(mean_individual):8.2f}")

    flat = {k: torch.cat([t.flatten() for t in taus[k].values()]).double() for k in LANGUAGES}
    theta_norm = torch.cat([theta0[n].flatten() for n in taus[LANGUAGES[0]]]).double().norm()
    ratios = {k: float(flat[k].norm() / theta_norm) for k in LANGUAGES}
    print("\n  ‖τ_k‖/‖θ0‖: " + ", ".join(f"{k} {r:.3f}" for k, r in ratios.items())
          + f"; mean {sum(ratios.values()) / len(ratios):.3f}")
    print("  cos(τ_j, τ_k): " + ", ".join(f"{a}/{b} {float(F.cosine_similarity(flat[a], flat[b], dim=0)):.2f}"
                                          for a, b in itertools.combinations(LANGUAGES, 2)))

    zero, ta = losses["θ0"], losses["Task Arithmetic (0.3)"]
    mean = {name: sum(v) / len(v) for name, v in losses.items()}
    checks = []
    for i, k in enumerate(LANGUAGES):
        others = [losses[f"θ_{j}"][i] for j in LANGUAGES if j != k]
        checks.append((f"θ_{k} best on {k} (< θ0 and every other θ_j)", individual[i] < min([zero[i], *others])))
    checks.append(("TA mean strictly between θ0's and the individuals'",
                   mean_individual < mean["Task Arithmetic (0.3)"] < mean["θ0"]))
    for i, k in enumerate(LANGUAGES):
        share = (ta[i] - individual[i]) / (zero[i] - individual[i])
        checks.append((f"TA worse than θ_{k} on {k} by ≥ {MARGIN:.0%} of the gap ({share:.0%})", share >= MARGIN))
    for i, k in enumerate(LANGUAGES):
        one_hot = losses[f"TA one-hot {k} (1.2)"]
        worse = [j for jj, j in enumerate(LANGUAGES) if jj != i and one_hot[jj] > ta[jj]]
        checks.append((f"one-hot {k} beats TA on {k}, loses to it on {len(worse)}/3 others ({' '.join(worse)})",
                       one_hot[i] < ta[i] and bool(worse)))
    print()
    for line, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {line}")
    return all(ok for _, ok in checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="FAST_LM_RECIPE, the tests' build")
    parser.add_argument("--recipe", type=json.loads, default={}, help="LMRecipe overrides, as JSON")
    parser.add_argument("--step-time", action="store_true", help="time a forward+backward of 64 sequences and exit")
    args = parser.parse_args()
    recipe = LMRecipe(**{**(lm.FAST_LM_RECIPE if args.quick else {}), **args.recipe})
    print(f"torch threads {torch.get_num_threads()}; recipe {json.dumps(recipe.to_dict())}")
    print(f"forward+backward of 64 × {recipe.seq_len} tokens: {step_time(recipe):.1f} ms")
    if args.step_time:
        return
    passed = {seed: report(recipe, seed) for seed in args.seeds}
    print("\nregime holds on every check: " + ", ".join(f"seed {s} {'yes' if ok else 'NO'}"
                                                      for s, ok in passed.items()))


if __name__ == "__main__":
    main()
