"""The compact Pareto set (issue 25): the preference basis τ̃ (a truncated SVD of each task vector), the one formula
θ(γ) = θ0 + Σ λ τ + Σ (c(γ) − λ) τ̃ + Δ(γ) in the module and the export, what the `.ckpt` and the export store, and what
they refuse."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from paretomerge import CheckpointError, ParetoMerging, export_pareto_set, load_pareto_set, merge
from paretomerge.kernels import PreferenceBasis
from paretomerge.kernels import basis as basis_module
from paretomerge.kernels.basis import layer_rank
from paretomerge.modules.pareto_merging import DEFAULT_BASIS_RANK
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION as PAPER
from tests.conftest import make_trainer
from tests.synthetic import SyntheticSuite, make_task_vectors

ROOT = Path(__file__).resolve().parents[1]
PREFERENCES = ([0.6, 0.1, 0.3], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3])


def by_hand(tau: torch.Tensor, rank: int) -> torch.Tensor:
    """Each task vector's best rank-``rank`` approximation as its own shape, from a float64 SVD."""
    matrices = tau.double().reshape(tau.shape[0], tau.shape[1], -1)
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    return ((u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]).reshape(tau.shape)


def held(basis: PreferenceBasis, name: str) -> torch.Tensor:
    """τ̃ ``[K, *shape]`` of a factored layer from its stored int8 codes and scales, by hand, in float64."""
    (left, right), shape = basis.factors[name], basis.shapes[name]
    u = left.codes.double() * left.scale.double()  # [m, K, r]
    v = right.codes.double() * right.scale.double()  # [n, K, r]
    return torch.einsum("mkr,nkr->kmn", u, v).reshape(-1, *shape)


def randomise(model: ParetoMerging) -> None:
    """A trained-looking model: λ and ω away from their start, some coefficients clamped, G ≠ 0."""
    torch.manual_seed(0)
    with torch.no_grad():
        model.lambdas.uniform_(0.0, 1.0)
        model.omega.normal_(std=0.3)
        for g in model.preference_tensor.G:
            g.normal_(std=0.5)


@pytest.mark.parametrize("bits", [None, 8])
def test_the_truncated_basis_is_each_task_vectors_best_rank_r_approximation(monkeypatch, bits):
    """Float factors: Eckart–Young's best rank-r approximation. int8 factors (the default): the same, off by at most
    half a quantization step per factor entry."""
    monkeypatch.setattr(basis_module, "FACTOR_BITS", bits)
    tv = make_task_vectors(num_tasks=3, width=32)
    basis = PreferenceBasis.truncated(tv.tau, 2)
    for name, tau in tv.tau.items():
        if tau.ndim < 3:  # 1-D parameters have no preference-dependent part
            assert name not in basis.names
            continue
        left, right = basis.factors[name]
        assert (left.codes.dtype == torch.int8) == (bits == 8) and (left.scale is None) == (bits is None)
        rebuilt = torch.stack([basis.combine(name, torch.eye(3, dtype=torch.float64)[k], torch.float64)
                               for k in range(3)])
        exact = by_hand(tau, 2)
        if bits is None:
            torch.testing.assert_close(rebuilt, exact, rtol=1e-4, atol=1e-5)
        else:
            error = float((rebuilt - exact).norm() / exact.norm())
            assert 1e-5 < error < 0.02, (name, error)
    # wide (conv1 [32, 3·8·8], c_proj [32, 128]), tall (in_proj [96, 32], c_fc [128, 32]) and 4-D layers all factored
    assert {"conv1.weight", "transformer.resblocks.0.mlp.c_proj.weight",
            "transformer.resblocks.0.attn.in_proj_weight"} <= set(basis.factors)
    left, right = basis.factors["conv1.weight"]
    assert left.shape == (32, 3, 2) and right.shape == (192, 3, 2)
    assert basis.nbytes() < (0.05 if bits else 0.2) * tv.nbytes()


def test_the_int8_codes_do_not_depend_on_threads_or_the_input_precision():
    """The same task vectors give the same int8 codes with 1 and 2 threads and given in float32 or float64
    (benchmarks/bench_reproducible.py also varies the CPU's vector instructions). Three tasks of a decaying spectrum
    and one of rank 3, so that rank 16 reaches into numerical noise, whose directions are arbitrary."""
    generator = torch.Generator().manual_seed(5)
    spectrum = 0.7 ** torch.arange(64.0)
    tau = torch.stack([torch.randn(192, 64, generator=generator) * spectrum @ torch.randn(64, 384, generator=generator)
                       for _ in range(3)] + [torch.randn(192, 3, generator=generator)
                                              @ torch.randn(3, 384, generator=generator)]) * 1e-3
    threads = torch.get_num_threads()

    def codes(values, num_threads):
        torch.set_num_threads(num_threads)
        try:
            left, right = PreferenceBasis.truncated({"w": values}, 16).factors["w"]
        finally:
            torch.set_num_threads(threads)
        return torch.cat([left.codes.flatten(), right.codes.flatten()])

    reference = codes(tau, 2)
    assert reference.numel() == 4 * 16 * (192 + 384)
    for values, num_threads in ((tau, 1), (tau.double(), 2), (tau.double(), 1)):
        assert int((codes(values, num_threads) != reference).sum()) == 0, (values.dtype, num_threads)
    # the rank-3 task's components past its rank are noise, stored as zeros
    left, right = PreferenceBasis.truncated({"w": tau}, 16).factors["w"]
    assert not left.codes[:, 3, 3:].any() and not right.codes[:, 3, 3:].any() and right.codes[:, 3, :3].any()


def test_the_layout_rule_dense_where_factors_would_not_be_smaller_and_fractions_of_the_layer_rank():
    assert layer_rank((32,), 4) == 0  # 1-D: left out of a truncated basis
    assert layer_rank((32,), None) is None and layer_rank((96, 32), None) is None  # the full basis: all dense
    assert layer_rank((96, 32), 4) == 4
    assert layer_rank((5, 32), 4) == 4  # 4·(5 + 32) = 148 numbers < 160
    assert layer_rank((5, 32), 5) is None and layer_rank((5, 32), 9) is None  # 5·37 = 185 ≥ 160: dense
    assert layer_rank((64, 64), 0.0625) == 4 and layer_rank((768, 3072), 0.0625) == 48
    assert layer_rank((17, 64), 0.0625) == 2  # ceil(17/16)
    with pytest.raises(ValueError, match="basis_rank must be"):
        ParetoMerging(basis_rank=0)
    with pytest.raises(ValueError, match="basis_rank must be"):
        ParetoMerging(basis_rank=1.5)
    with pytest.raises(ValueError, match="basis_rank must be"):
        ParetoMerging(basis_rank="4")


def test_merge_adds_the_factored_part_for_one_model_and_for_several():
    tv = make_task_vectors(num_tasks=3, width=32)
    tau = {n: t.double() for n, t in tv.tau.items()}
    theta0 = {n: t.double() for n, t in tv.theta0.items()}
    basis = PreferenceBasis.truncated(tau, 3)
    exact = {name: held(basis, name) for name in basis.factors}
    torch.manual_seed(1)
    rows = torch.randn(2, len(theta0), 3, dtype=torch.float64)  # [M, L, K]
    many = merge(theta0, basis, rows)
    for l, name in enumerate(theta0):
        expected = theta0[name].expand(2, *theta0[name].shape).clone()
        if name in basis.factors:
            expected += torch.einsum("mk,k...->m...", rows[:, l], exact[name])
        torch.testing.assert_close(many[name], expected, rtol=1e-10, atol=1e-10)
        one = merge(theta0, basis, rows[1])[name]
        torch.testing.assert_close(one, expected[1], rtol=1e-10, atol=1e-10)


def test_theta_of_gamma_by_hand_with_and_without_gradients_in_float64(task_vectors):
    """θ(γ) = θ0 + Σ_k λ_k τ_k + Σ_k (c_k(γ) − λ_k) τ̃_k + Δ(γ), c(γ) = clamp(λ + ω ⊙ (Kγ − 1), [0, 1]): one formula,
    the training path (gradients on) and the cached path (off) agreeing to 1e-6 in float64."""
    model = ParetoMerging(task_vectors=task_vectors, rank=4, basis_rank=2).double()
    randomise(model)
    lam, om = model.lambdas.detach(), model.omega.detach()
    tv = model.task_vectors
    for preference in PREFERENCES:
        gamma = torch.tensor(preference, dtype=torch.float64)
        c = (lam + om * (3 * gamma - 1)).clamp(0.0, 1.0)
        delta = model.preference_tensor.delta(gamma)
        results = {}
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                results[grad] = model.merged_parameters(gamma)
        for l, name in enumerate(tv.layer_names):
            tau = tv.tau[name]
            expected = tv.theta0[name] + torch.einsum("k,k...->...", lam[l], tau)
            if tau.ndim > 2:
                expected = expected + torch.einsum("k,k...->...", c[l] - lam[l], held(model.preference_basis(), name))
            if name in delta:
                expected = expected + delta[name].detach()
            for grad in (True, False):
                torch.testing.assert_close(results[grad][name].detach(), expected, rtol=0, atol=1e-6)
            assert float((results[True][name].detach() - results[False][name]).abs().max()) < 1e-12
    assert results[True][tv.layer_names[0]].requires_grad and not results[False][tv.layer_names[0]].requires_grad


def test_the_equal_preference_is_the_stored_base_plus_delta(task_vectors):
    model = ParetoMerging(task_vectors=task_vectors, rank=4)
    randomise(model)
    equal = torch.full((3,), 1 / 3)
    merged, base, delta = model.merged_parameters(equal), model.base_parameters(), model.preference_tensor.delta(equal)
    for name, value in merged.items():
        torch.testing.assert_close(value, base[name] + delta.get(name, 0.0), rtol=0, atol=1e-6)


def test_gradients_reach_lambda_and_omega_through_the_truncated_basis(task_vectors):
    model = ParetoMerging(task_vectors=task_vectors, rank=4, basis_rank=1)
    batch = {t: torch.randn(4, 3, 16, 16) for t in task_vectors.task_names}
    logits = model(batch, torch.tensor([0.2, 0.3, 0.5]))
    sum(v.pow(2).mean() for v in logits.values()).backward()
    assert float(model.omega.grad.abs().max()) > 0 and float(model.lambdas.grad.abs().max()) > 0
    one_d = [l for l, n in enumerate(task_vectors.layer_names) if task_vectors.tau[n].ndim == 2]
    assert not model.omega.grad[one_d].any()  # 1-D layers have no preference part: ω there gets nothing


def fit_float64(root: Path, **options) -> tuple[ParetoMerging, SyntheticSuite, object]:
    suite = SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2)
    model = ParetoMerging(rank=4, **options)
    trainer = make_trainer(root, max_steps=3, limit_val_batches=0, precision="64-true")
    trainer.fit(model, datamodule=suite)
    return model, suite, trainer


@pytest.mark.parametrize("options", [{}, {"basis_rank": None}], ids=["default basis", "full basis"])
def test_a_fresh_process_rebuilds_the_trained_models_at_from_the_ckpt_and_the_export(tmp_path, options):
    model, suite, trainer = fit_float64(tmp_path, **options)
    assert model.lambdas.dtype == torch.float64 and float(model.omega.abs().max()) > 0
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    export_pareto_set(model, tmp_path / "set.safetensors")
    images = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    torch.save({"images": images}, tmp_path / "images.pt")
    with torch.no_grad():
        expected = {str(p): {t: model.at(p)(images, task=t) for t in suite.task_vectors().task_names}
                    for p in PREFERENCES}
    script = textwrap.dedent(f"""
        import json, torch
        from paretomerge import ParetoMerging, load_pareto_set
        images = torch.load({str(tmp_path / 'images.pt')!r})["images"]
        loaded = ParetoMerging.load_from_checkpoint({str(tmp_path / 'model.ckpt')!r})
        exported = load_pareto_set({str(tmp_path / 'set.safetensors')!r})
        assert loaded.lambdas.dtype == torch.float64 and not loaded.task_vectors.has_task_vectors
        out = {{}}
        for p in {[list(p) for p in PREFERENCES]!r}:
            gamma = torch.tensor(p, dtype=torch.float64)
            rows = {{}}
            for t in loaded.task_vectors.task_names:
                with torch.enable_grad():  # the loaded module's own forward, gradients on
                    trained_path = loaded({{t: images}}, gamma)[t]
                assert trained_path.requires_grad
                rows[t] = [loaded.at(p)(images, task=t).tolist(), exported.at(p)(images, task=t).tolist(),
                           trained_path.detach().tolist()]
            out[str(p)] = rows
        print(json.dumps({{"out": out, "basis_rank": loaded.hparams.basis_rank,
                          "basis": repr(loaded.preference_basis())}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["basis_rank"] == model.hparams.basis_rank
    for p in PREFERENCES:
        for task, values in answer["out"][str(p)].items():
            for value in values:
                torch.testing.assert_close(torch.tensor(value, dtype=torch.float64), expected[str(p)][task],
                                           rtol=0, atol=1e-6)


def test_the_checkpoint_holds_the_base_and_the_factors_and_is_compact(tmp_path):
    suite = SyntheticSuite(num_tasks=4, batch_size=4, num_batches=2, width=64)
    tv = suite.task_vectors()
    sizes = {}
    for rank in (DEFAULT_BASIS_RANK, None):
        model = ParetoMerging(rank=4, basis_rank=rank)
        trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
        trainer.fit(model, datamodule=suite)
        trainer.save_checkpoint(tmp_path / f"{rank}.ckpt")
        sizes[rank] = (tmp_path / f"{rank}.ckpt").stat().st_size
        section = torch.load(tmp_path / f"{rank}.ckpt", weights_only=True)["paretomerge"]
        stored = section["preference_basis"]
        if rank is None:
            assert not stored["left"] and all(torch.equal(stored["dense"][n], tv.tau[n]) for n in tv.layer_names)
        else:
            shapes = {n: tuple(tv.theta0[n].shape) for n in tv.layer_names}
            assert set(stored["dense"]) == {n for n, shape in shapes.items() if layer_rank(shape, rank) is None}
            assert set(stored["left"]) == set(stored["right"]) == set(model._basis.factors) == \
                {n for n, shape in shapes.items() if layer_rank(shape, rank)}
            assert all(stored["left"][n].shape[-1] == DEFAULT_BASIS_RANK for n in stored["left"])
            assert all(stored["left"][n].dtype == torch.int8 for n in stored["left"])
    backbone = sum(t.numel() * t.element_size() for t in tv.backbone.state_dict().values())
    assert sizes[None] > (1 + 4) * backbone  # the full basis: K more backbones
    # the two files differ by the two bases' bytes, and nothing else of size
    saved = tv.nbytes() - PreferenceBasis.truncated(tv.tau, DEFAULT_BASIS_RANK).nbytes()
    assert sizes[None] - sizes[DEFAULT_BASIS_RANK] == pytest.approx(saved, rel=0.02)
    assert sizes[DEFAULT_BASIS_RANK] < 1.7 * backbone, (sizes, backbone)


def damaged(path: Path, edit) -> Path:
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint["paretomerge"])
    out = path.with_name("damaged.ckpt")
    torch.save(checkpoint, out)
    return out


def test_damaged_or_missing_factors_are_refused_naming_the_layer(tmp_path):
    suite = SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2)
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(ParetoMerging(rank=4), datamodule=suite)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    layer = "transformer.resblocks.1.mlp.c_fc.weight"

    def drop(section):
        del section["preference_basis"]["left"][layer]

    def truncate(section):
        section["preference_basis"]["right"][layer] = section["preference_basis"]["right"][layer][:5]

    def poison(section):
        section["preference_basis"]["left_scale"][layer][0, 0] = float("nan")

    def remove_all(section):
        del section["preference_basis"]

    for edit, message in ((drop, f"no factors for layer '{layer}'"), (truncate, f"right factor of layer '{layer}'"),
                          (poison, f"left scale of layer '{layer}'"), (remove_all, "no preference basis")):
        with pytest.raises(CheckpointError, match=message):
            ParetoMerging.load_from_checkpoint(damaged(path, edit))
    export = export_pareto_set(ParetoMerging.load_from_checkpoint(path), tmp_path / "set.safetensors")
    with safe_open(str(export), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    del tensors[f"basis_left/{layer}"]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=f"no factors for layer '{layer}'"):
        load_pareto_set(tmp_path / "bad.safetensors")


def test_resuming_with_another_basis_rank_is_refused(tmp_path):
    suite = SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2)
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(ParetoMerging(rank=4), datamodule=suite)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match=rf"trained with basis_rank={DEFAULT_BASIS_RANK}.*resume with"):
        make_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(
            ParetoMerging(rank=4, basis_rank=None), datamodule=suite, ckpt_path=str(tmp_path / "a.ckpt"))


def legacy(path: Path, out: Path, drop: tuple[str, ...]) -> Path:
    """What an earlier paretomerge wrote: the full basis as ``basis`` (name -> [K, *shape]), and no hyperparameters
    it did not have yet."""
    checkpoint = torch.load(path, weights_only=True)
    section = checkpoint["paretomerge"]
    if "preference_basis" in section:
        section["basis"] = section.pop("preference_basis")["dense"]
    for key in drop:
        del checkpoint["hyper_parameters"][key]
    torch.save(checkpoint, out)
    return out


@pytest.mark.parametrize("kind", ["full basis", "paper"])
def test_checkpoints_and_exports_written_before_the_compact_set_still_load(tmp_path, kind):
    options, drop = ({"basis_rank": None}, ("basis_rank", "omega_init")) if kind == "full basis" else \
        (PAPER, ("basis_rank", "omega_init", "preference_coefficients", "beta_div"))
    suite = SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2)
    model = ParetoMerging(rank=4, **options)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=suite)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    old = legacy(tmp_path / "new.ckpt", tmp_path / "old.ckpt", drop)
    assert "preference_basis" not in torch.load(old, weights_only=True)["paretomerge"]
    loaded = ParetoMerging.load_from_checkpoint(old)
    assert loaded.hparams.basis_rank is None and loaded.preference_conditioned == (kind == "full basis")
    # an export of that time: basis/ for every layer, λ only beside it, no basis_rank in its config
    export = export_pareto_set(model, tmp_path / "set.safetensors")
    with safe_open(str(export), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    config = json.loads(metadata["paretomerge"])
    for key in drop:
        config["hyper_parameters"].pop(key)
    config.pop("basis_rank")
    if kind == "paper":
        tensors.pop("coefficients/lambdas")
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"paretomerge": json.dumps(config)})
    exported = load_pareto_set(tmp_path / "old.safetensors")
    images = torch.randn(3, 3, 16, 16)
    for p in PREFERENCES:
        for task in ("task0", "task2"):
            expected = model.at(p)(images, task=task)
            torch.testing.assert_close(loaded.at(p)(images, task=task), expected)
            torch.testing.assert_close(exported.at(p)(images, task=task), expected)


def test_mixed_precision_builds_the_weights_in_their_own_dtype(task_vectors):
    """Under autocast (``precision="bf16-mixed"``) the forward runs in bf16, but θ(γ) is built in float32, as at(γ)
    builds it: a bf16 merge would round the task vectors away against θ0."""
    model = ParetoMerging(task_vectors=task_vectors, rank=4)
    randomise(model)
    gamma = torch.tensor([0.6, 0.1, 0.3])
    plain = model.merged_parameters(gamma)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.merged_parameters(gamma)
    for name, value in plain.items():
        assert mixed[name].dtype == torch.float32
        torch.testing.assert_close(mixed[name], value, rtol=0, atol=0)


def test_the_gpu_check_runs_at_toy_sizes_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --toy: the GPU check's whole path (fit, 30-preference front, .ckpt, export) on a CPU."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = gpu_check.main(["--toy", "--out", str(tmp_path / "result.json")])
    assert result["device"] == "cpu" and result["steps"] == 5 and result["preferences"] == 30
    assert result["basis_rank"] == DEFAULT_BASIS_RANK and 0 <= result["hypervolume"] <= 1
    assert 1.0 < result["export_ratio"] < result["ckpt_ratio"]  # the .ckpt adds Adam's state
    assert json.loads((tmp_path / "result.json").read_text())["fit_s"] > 0


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_an_adamerging_export_loads_as_its_one_model(tmp_path, granularity):
    from paretomerge import AdaMerging

    suite = SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2)
    model = AdaMerging(granularity=granularity)
    make_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, datamodule=suite)
    exported = load_pareto_set(export_pareto_set(model, tmp_path / "ada.safetensors"))
    assert isinstance(exported.module, AdaMerging) and not exported.preference_aware
    assert exported.module.hparams.granularity == granularity and exported.preference_tensor is None
    images = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(exported.at()(images, task="task1"), model.at()(images, task="task1"), rtol=0, atol=0)


def test_a_resumed_fit_trains_with_the_stored_basis_not_a_recomputed_one(tmp_path, monkeypatch):
    suite = SyntheticSuite(num_tasks=3, batch_size=4, num_batches=2)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(ParetoMerging(rank=4), datamodule=suite)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    stored = torch.load(tmp_path / "a.ckpt", weights_only=True)["paretomerge"]["preference_basis"]
    svd = basis_module.truncated_svd  # another device's SVD: other bits for the same τ
    monkeypatch.setattr(basis_module, "truncated_svd", lambda tau, rank: tuple(1.5 * f for f in svd(tau, rank)))
    resumed = ParetoMerging(rank=4)
    make_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(resumed, datamodule=suite,
                                                                  ckpt_path=str(tmp_path / "a.ckpt"))
    for name, (left, right) in resumed.preference_basis().factors.items():
        assert torch.equal(left.scale, stored["left_scale"][name]) and torch.equal(right.codes, stored["right"][name])
    assert not torch.equal(PreferenceBasis.truncated(suite.task_vectors().tau, DEFAULT_BASIS_RANK).factors[
        "conv1.weight"][0].scale, stored["left_scale"]["conv1.weight"])  # the patched SVD does differ


def test_the_dequantized_factors_follow_moves_and_survive_inference_mode(task_vectors):
    model = ParetoMerging(task_vectors=task_vectors, rank=4)
    randomise(model)
    gamma = torch.tensor([0.6, 0.1, 0.3])
    with torch.inference_mode():  # what trainer.validate/test run under: the cache is filled here
        model.merged_parameters(gamma)
    batch = {t: torch.randn(2, 3, 16, 16) for t in task_vectors.task_names}
    sum(v.sum() for v in model(batch, gamma).values()).backward()  # then training still works
    assert float(model.omega.grad.abs().max()) > 0
    model.double()  # the cached float32 matrices must not be reused for float64
    with torch.no_grad():
        merged = model.merged_parameters(gamma.double())
        layer = "transformer.resblocks.0.attn.in_proj_weight"
        l = task_vectors.layer_names.index(layer)
        lam, om = model.lambdas, model.omega
        c = (lam[l] + om[l] * (3 * gamma.double() - 1)).clamp(0, 1)
        expected = task_vectors.theta0[layer] + torch.einsum("k,k...->...", lam[l], task_vectors.tau[layer]) \
            + torch.einsum("k,k...->...", c - lam[l], held(model.preference_basis(), layer)) \
            + model.preference_tensor.delta(gamma.double())[layer]
    assert merged[layer].dtype == torch.float64
    torch.testing.assert_close(merged[layer], expected, rtol=0, atol=1e-12)


def test_a_bf16_backbone_with_float32_coefficients_loads_as_it_trained(tmp_path):
    tv = make_task_vectors(num_tasks=3)
    tv.backbone.to(torch.bfloat16)
    tv.heads.to(torch.bfloat16)
    model = ParetoMerging(task_vectors=tv, rank=4)
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    images = {t: DataLoader(TensorDataset(torch.randn(4, 3, 16, 16, dtype=torch.bfloat16)), batch_size=4)
              for t in tv.task_names}
    trainer.fit(model, train_dataloaders=CombinedLoader(images, "max_size_cycle"))
    trainer.save_checkpoint(tmp_path / "bf16.ckpt")
    loaded = ParetoMerging.load_from_checkpoint(tmp_path / "bf16.ckpt")
    assert loaded.lambdas.dtype == torch.float32 and loaded.task_vectors.backbone.conv1.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lambdas, model.lambdas.detach())
    images = torch.randn(3, 3, 16, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(loaded.at([0.2, 0.3, 0.5])(images, task="task0"),
                               model.at([0.2, 0.3, 0.5])(images, task="task0"), rtol=0, atol=0)
