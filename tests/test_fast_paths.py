"""Every fast path of issue 8 gives what its reference path gives: the fused merge against a per-layer autograd
merge, Δ(γ) against tensorly's one-call `multi_mode_dot`, the cached base against a fresh merge, `at()` without a
weight copy against an independent model, and the compiled forward against the eager one."""

from __future__ import annotations

import pytest
import tensorly as tl
import torch
import torch._dynamo
from tensorly.tenalg import multi_mode_dot

from paretomerge import ParetoMerging, PreferenceTensor, merge
from paretomerge.kernels import forward_tasks
from tests.synthetic import make_task_vectors

COMPILED: list[int] = []


def _counting_backend(graph, example_inputs):
    """A torch.compile backend that records that dynamo compiled a graph, then runs it as traced."""
    COMPILED.append(1)
    return graph.forward


if "paretomerge_counting" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(_counting_backend, name="paretomerge_counting")


def reference_merge(theta0, tau, coefficients):
    """θ0 + Σ_k c[..., l, k] τ_k per layer, written with plain autograd ops (the pre-issue-8 kernel)."""
    names = list(theta0)
    rows = coefficients if coefficients.ndim > 1 else coefficients.unsqueeze(0)
    out = {}
    for index, name in enumerate(names):
        row = rows[..., index if rows.shape[-2] > 1 else 0, :]
        out[name] = theta0[name] + torch.tensordot(row, tau[name].to(theta0[name].dtype), dims=([-1], [0]))
    return out


@pytest.mark.parametrize("shape", ["layer", "task", "models_layer", "models_task"])
def test_fused_merge_equals_per_layer_merge_in_values_and_gradients(shape):
    tv = make_task_vectors(num_tasks=3, seed=4)
    L, K = len(tv.layer_names), tv.num_tasks
    sizes = {"layer": (L, K), "task": (K,), "models_layer": (2, L, K), "models_task": (2, 1, K)}[shape]
    generator = torch.Generator().manual_seed(1)
    c = torch.rand(sizes, generator=generator, dtype=torch.float64).float()
    probes = {n: torch.randn(t.shape[1:], generator=generator) for n, t in tv.tau.items()}
    skipped = tv.layer_names[2]  # an unused output sends no gradient: the fused backward must skip it

    grads = []
    for fn in (merge, reference_merge):
        coefficients = c.clone().requires_grad_(True)
        merged = fn(tv.theta0, tv.tau, coefficients)
        loss = sum((merged[n] * probes[n]).sum() for n in merged if n != skipped)
        loss.backward()
        grads.append((merged, coefficients.grad))
    (fast, fast_grad), (ref, ref_grad) = grads
    for name in tv.layer_names:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_fused_merge_with_bf16_task_vectors_equals_per_layer_merge():
    tv = make_task_vectors(num_tasks=3, seed=4, dtype=torch.bfloat16)
    lam = torch.full((len(tv.layer_names), 3), 0.3, requires_grad=True)
    ref_lam = lam.detach().clone().requires_grad_(True)
    fast, ref = merge(tv.theta0, tv.tau, lam), reference_merge(tv.theta0, tv.tau, ref_lam)
    sum(v.square().sum() for v in fast.values()).backward()
    sum(v.square().sum() for v in ref.values()).backward()
    for name in tv.layer_names:
        assert fast[name].dtype == torch.float32
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lam.grad, ref_lam.grad, rtol=1e-5, atol=1e-4)


def test_fused_merge_passes_gradients_to_a_trainable_theta0():
    theta0 = {"w": torch.randn(3, 4, requires_grad=True)}
    tau = {"w": torch.randn(2, 3, 4)}
    merge(theta0, tau, torch.tensor([[0.3, 0.7], [0.1, 0.2]]).unsqueeze(1))["w"].sum().backward()
    torch.testing.assert_close(theta0["w"].grad, torch.full((3, 4), 2.0))  # two models, each with θ0 once


def test_delta_equals_tensorly_one_call_mode_products_in_values_and_gradients():
    pt = PreferenceTensor({"in": (12, 4), "conv": (6, 2, 2, 2)}, num_tasks=3, rank=5, seed=2)
    with torch.no_grad():
        for g in pt.G:
            g.normal_()
    gamma = torch.tensor([0.5, 0.2, 0.3])
    probes = {n: torch.randn(pt.shapes[n]) for n in pt.names}

    sum((d * probes[n]).sum() for n, d in pt.delta(gamma).items()).backward()
    fast = [p.grad.clone() for p in pt.parameters()]
    fast_values = {n: d.detach() for n, d in pt.delta(gamma).items()}
    pt.zero_grad()
    with tl.backend_context("pytorch"):
        reference = {
            n: multi_mode_dot(g, [gamma.unsqueeze(0), a, b], modes=[2, 0, 1])[:, :, 0].reshape(pt.shapes[n])
            for n, g, a, b in zip(pt.names, pt.G, pt.A, pt.B, strict=True)
        }
    sum((d * probes[n]).sum() for n, d in reference.items()).backward()
    for name in pt.names:
        torch.testing.assert_close(fast_values[name], reference[name].detach(), rtol=1e-5, atol=1e-6)
    for got, expected in zip(fast, (p.grad for p in pt.parameters()), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def trained_model() -> ParetoMerging:
    # ω = 0: c(γ) = λ, so θ(γ) is the base plus Δ(γ), which these tests compare against `merge` directly
    model = ParetoMerging(task_vectors=make_task_vectors(num_tasks=3, seed=6), rank=3, seed=1, omega_init=0.0)
    with torch.no_grad():
        model.lambdas.uniform_(0, 1, generator=torch.Generator().manual_seed(0))
        for g in model.preference_tensor.G:
            g.normal_(0, 0.5)
    return model


def test_cached_base_equals_a_fresh_merge_and_follows_lambda():
    model = trained_model()
    tv = model.task_vectors
    gamma = torch.tensor([0.2, 0.3, 0.5])
    with torch.no_grad():
        cached = model.merged_parameters(gamma)  # through the cached base
    fresh = merge(tv.theta0, tv.tau, model.lambdas.detach(), model.preference_tensor.delta(gamma))
    for name in tv.layer_names:
        assert torch.equal(cached[name], fresh[name].detach()), name
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    before = model.at(gamma)(images, task="task0")
    with torch.no_grad():
        model.lambdas.mul_(0.5)  # in place, as an optimizer step does
    after = model.at(gamma)(images, task="task0")
    expected = model({"task0": images}, gamma)["task0"].detach()  # gradients on: a fresh merge, no cache
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)
    model.base_parameters()
    model.to(torch.float64)  # moving the module drops the cache: the next base is float64, like θ0
    assert model._base_cache is None
    assert next(iter(model.base_parameters().values())).dtype == torch.float64


def test_at_models_own_their_weights():
    model = trained_model()
    tv = model.task_vectors
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    gamma = [0.6, 0.2, 0.2]
    first = model.at(gamma)
    expected = first(images, task="task1").clone()
    theta0 = {n: p.clone() for n, p in tv.theta0.items()}
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)  # a user editing the returned model must not reach the base, θ0 or the next at()
    for name, value in tv.theta0.items():
        assert torch.equal(value, theta0[name]), name
    torch.testing.assert_close(model.at(gamma)(images, task="task1"), expected, rtol=0, atol=0)
    assert not set(p.data_ptr() for p in first.parameters()) & set(p.data_ptr() for p in tv.backbone.parameters())


def test_compiled_forward_equals_eager_forward():
    tv = make_task_vectors(num_tasks=2, seed=7)
    batch = {t: torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(k))
             for k, t in enumerate(tv.task_names)}
    eager = forward_tasks(tv.backbone, tv.heads, tv.theta0, batch)
    # aot_eager traces and runs the same graph as inductor without a C++ toolchain: the flag's plumbing, cheaply.
    compiled = forward_tasks(tv.backbone, tv.heads, tv.theta0, batch, compile_backend="aot_eager")
    for task in tv.task_names:
        torch.testing.assert_close(compiled[task], eager[task], rtol=1e-5, atol=1e-6)
    model = ParetoMerging(task_vectors=tv, rank=2, compile_forward="paretomerge_counting")
    gamma = torch.tensor([0.4, 0.6])
    loss = model.objective(model(batch, gamma), gamma)["loss"]
    loss.backward()
    reference = ParetoMerging(task_vectors=tv, rank=2)
    ref_loss = reference.objective(reference(batch, gamma), gamma)["loss"]
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.lambdas.grad, reference.lambdas.grad, rtol=1e-4, atol=1e-6)
    assert COMPILED, "compile_forward must send the merged forward through torch.compile"
    assert "compile_forward" not in model.hparams  # a .ckpt loads eagerly, wherever it is loaded
    with pytest.raises(ValueError, match="compile_forward must be true, false or a torch.compile backend"):
        ParetoMerging(task_vectors=tv, compile_forward="fastest")
