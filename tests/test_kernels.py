"""The merge kernel, the preference tensor and task vectors, against independent computations."""

from __future__ import annotations

import pytest
import torch

from paretomerge import ModuleSpec, ParetoMerging, PreferenceTensor, TaskVectors, merge, recognise
from paretomerge.kernels import DEFAULT_TARGETS, forward_tasks, select_model, select_targets
from tests.synthetic import build_problem, make_task_vectors, vit_spec


def test_delta_equals_explicit_low_rank_product():
    pt = PreferenceTensor({"w": (12, 5), "conv": (6, 3, 2, 2)}, num_tasks=4, rank=3, seed=1)
    with torch.no_grad():
        for g in pt.G:
            g.normal_()
    gamma = torch.tensor([0.1, 0.2, 0.3, 0.4])
    delta = pt.delta(gamma)
    for name, g, a, b in zip(pt.names, pt.G, pt.A, pt.B, strict=True):
        core = sum(gamma[k] * g[:, :, k] for k in range(4))
        expected = (a @ core @ b.T).reshape(pt.shapes[name])
        torch.testing.assert_close(delta[name], expected, rtol=1e-5, atol=1e-6)
        assert delta[name].shape == pt.shapes[name]
    many = pt.delta(torch.stack([gamma, gamma.flip(0)]))
    torch.testing.assert_close(many["w"][0], delta["w"])
    torch.testing.assert_close(many["w"][1], pt.delta(gamma.flip(0))["w"])


def test_delta_is_zero_at_init_and_parameter_count_matches_formula():
    shapes = {"a": (48, 16), "b": (16, 16)}
    pt = PreferenceTensor(shapes, num_tasks=5, rank=4)
    assert all(float(d.detach().abs().max()) == 0.0 for d in pt.delta(torch.full((5,), 0.2)).values())
    assert pt.num_parameters() == (48 + 16) * 4 + 16 * 5 + (16 + 16) * 4 + 16 * 5
    assert float(pt.A[0].abs().max()) > 0 and float(pt.B[1].abs().max()) > 0


def test_default_targets_are_open_clip_attention_projections(task_vectors):
    shapes = select_targets(dict(task_vectors.backbone.named_parameters()), DEFAULT_TARGETS)
    assert sorted(shapes) == sorted(
        f"transformer.resblocks.{i}.attn.{p}" for i in range(2) for p in ("in_proj_weight", "out_proj.weight")
    )
    with pytest.raises(ValueError, match="matches no"):
        select_targets(dict(task_vectors.backbone.named_parameters()), r"nothing_here$")


def test_merge_layerwise_taskwise_and_model_dimension(task_vectors):
    tv = task_vectors
    L, K = len(tv.layer_names), tv.num_tasks
    lam = torch.rand(L, K)
    merged = merge(tv.theta0, tv.tau, lam)
    for index, name in enumerate(tv.layer_names):
        expected = tv.theta0[name] + sum(lam[index, k] * tv.tau[name][k] for k in range(K))
        torch.testing.assert_close(merged[name], expected)
    c = torch.tensor([0.1, 0.5, 0.9])
    taskwise = merge(tv.theta0, tv.tau, c)
    torch.testing.assert_close(taskwise[tv.layer_names[3]], merge(tv.theta0, tv.tau, c.expand(L, K))[tv.layer_names[3]])
    batched = merge(tv.theta0, tv.tau, torch.stack([lam, lam.flip(1)]))
    torch.testing.assert_close(select_model(batched, 1)[tv.layer_names[0]],
                               merge(tv.theta0, tv.tau, lam.flip(1))[tv.layer_names[0]])
    several_taskwise = merge(tv.theta0, tv.tau, torch.stack([c, c.flip(0)]).unsqueeze(1))
    torch.testing.assert_close(select_model(several_taskwise, 0)[tv.layer_names[5]], taskwise[tv.layer_names[5]])
    with pytest.raises(ValueError, match=r"\[M, 1, K\]"):
        merge(tv.theta0, tv.tau, torch.rand(L + 1, K))
    with pytest.raises(ValueError, match="must end in K=3"):
        merge(tv.theta0, tv.tau, torch.rand(L, K + 1))


def test_bf16_task_vectors_merge_close_to_fp32():
    full = make_task_vectors(num_tasks=2, seed=3)
    half = make_task_vectors(num_tasks=2, seed=3, dtype=torch.bfloat16)
    assert next(iter(half.tau.values())).dtype == torch.bfloat16
    assert half.nbytes() * 2 == full.nbytes()
    lam = torch.full((len(full.layer_names), 2), 0.3)
    a, b = merge(full.theta0, full.tau, lam), merge(half.theta0, half.tau, lam)
    for name in full.layer_names:
        assert b[name].dtype == torch.float32
        torch.testing.assert_close(a[name], b[name], rtol=1e-2, atol=1e-2)


def test_at_with_zero_core_is_layerwise_task_arithmetic_for_any_preference():
    pretrained, finetuned, heads, names = build_problem(num_tasks=3, seed=5)
    tv = TaskVectors.from_state_dicts(pretrained, finetuned, names, heads)
    model = ParetoMerging(task_vectors=tv, rank=4, omega_init=0.0)  # ω = 0 and G = 0: no preference dependence
    # An independent merge, from the raw state dicts.
    reference = vit_spec().build()
    theta0 = pretrained.state_dict()
    ta = {k: v + 0.3 * sum(s[k] - v for s in finetuned) if v.is_floating_point() else v for k, v in theta0.items()}
    reference.load_state_dict(ta)
    reference.eval()
    images = torch.randn(5, 3, 16, 16)
    for pref in ([1, 1, 1], [1, 0, 0], [0.2, 0.7, 0.1]):
        net = model.at(pref)
        for task in names:
            expected = heads[task](reference(images))
            torch.testing.assert_close(net(images, task=task), expected, rtol=1e-5, atol=1e-5)


def test_at_equals_training_time_merged_forward(task_vectors):
    model = ParetoMerging(task_vectors=task_vectors, rank=4, seed=2)
    with torch.no_grad():
        model.lambdas.uniform_(0, 1)
        for g in model.preference_tensor.G:
            g.normal_(0, 0.5)
    generator = torch.Generator().manual_seed(0)
    batch = {t: torch.randn(4, 3, 16, 16, generator=generator) for t in task_vectors.task_names}
    gamma = torch.tensor([0.6, 0.3, 0.1])
    with torch.no_grad():
        training_logits = model(batch, gamma)
    net = model.at(gamma)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    differs = False
    for task, images in batch.items():
        out = net(images, task=task)
        assert out.grad_fn is None
        torch.testing.assert_close(out, training_logits[task], rtol=1e-5, atol=1e-6)
        differs |= not torch.allclose(out, model.at([1, 0, 0])(images, task=task), atol=1e-4)
    assert differs, "the preference tensor should make at(γ) depend on γ"


def test_forward_tasks_runs_one_backbone_call(task_vectors):
    calls = []
    handle = task_vectors.backbone.register_forward_hook(lambda *a: calls.append(1))
    batch = {t: torch.randn(2, 3, 16, 16) for t in task_vectors.task_names}
    logits = forward_tasks(task_vectors.backbone, task_vectors.heads, task_vectors.theta0, batch)
    handle.remove()
    assert len(calls) == 1
    assert {t: tuple(v.shape) for t, v in logits.items()} == {"task0": (2, 3), "task1": (2, 4), "task2": (2, 5)}


def test_task_vectors_hold_differences_and_are_frozen():
    pretrained, finetuned, heads, names = build_problem(num_tasks=2, seed=1)
    tv = TaskVectors.from_state_dicts(pretrained, finetuned, names, heads)
    name = tv.layer_names[4]
    torch.testing.assert_close(tv.tau[name][1], finetuned[1][name] - pretrained.state_dict()[name])
    assert all(not p.requires_grad for p in tv.backbone.parameters())
    assert all(not p.requires_grad for p in tv.heads.parameters())
    assert tv.backbone is not pretrained, "TaskVectors must own its copy of θ0"
    assert len(tv.layer_names) == sum(1 for p in pretrained.parameters() if p.is_floating_point())


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s.pop("transformer.resblocks.1.attn.in_proj_weight"),
         "'transformer.resblocks.1.attn.in_proj_weight'"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "'extra.weight'"),
        (lambda s: s.__setitem__("conv1.weight", torch.zeros(1, 2)), "'conv1.weight' has shape"),
        (lambda s: s.__setitem__("proj", torch.full_like(s["proj"], float("nan"))), "'proj' contains NaN"),
        (lambda s: s.__setitem__("proj", s["proj"].long()), "'proj' is torch.int64"),
    ],
)
def test_task_vectors_refuse_mismatched_weights_naming_the_parameter(corrupt, message):
    pretrained, finetuned, heads, names = build_problem(num_tasks=2, seed=1)
    corrupt(finetuned[1])
    with pytest.raises((ValueError, TypeError), match=message) as info:
        TaskVectors.from_state_dicts(pretrained, finetuned, names, heads)
    assert "task1" in str(info.value)


def test_task_vectors_refuse_other_architecture_and_bad_arguments():
    pretrained, finetuned, heads, names = build_problem(num_tasks=2, seed=1)
    other = vit_spec(width=48).build().state_dict()
    with pytest.raises(ValueError, match="has shape"):
        TaskVectors.from_state_dicts(pretrained, [finetuned[0], other], names, heads)
    with pytest.raises(ValueError, match="2 task names"):
        TaskVectors.from_state_dicts(pretrained, finetuned[:1], names, heads)
    with pytest.raises(ValueError, match="unique"):
        TaskVectors.from_state_dicts(pretrained, finetuned, ["a", "a"], {"a": heads["task0"]})
    with pytest.raises(ValueError, match="heads must map"):
        TaskVectors.from_state_dicts(pretrained, finetuned, names, {"task0": heads["task0"]})
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))  # any module is accepted; a Sequential of Linears is recorded
    tv = TaskVectors.from_state_dicts(plain, [plain.state_dict()] * 2, names, heads)
    assert tv.backbone_spec.target == "paretomerge.kernels.builders:sequential"


def test_module_spec_builds_only_modules_and_plain_kwargs():
    net = ModuleSpec("torch.nn:Linear", {"in_features": 3, "out_features": 2}).build()
    assert recognise(net).kwargs == {"in_features": 3, "out_features": 2}
    with pytest.raises(ValueError, match="refusing to call"):
        ModuleSpec("torch.nn.functional:relu", {}).build()
    with pytest.raises(ValueError, match="refused|refusing"):
        ModuleSpec("os:system", {"command": "true"}).build()
    with pytest.raises(TypeError, match="only str, int"):
        ModuleSpec("torch.nn:Linear", {"in_features": torch.zeros(1)})
    spec = vit_spec()
    assert ModuleSpec.from_dict(spec.to_dict()) == spec


def test_merge_gradient_matches_finite_differences():
    theta0 = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    tau = {"w": torch.randn(2, 3, 4, dtype=torch.float64), "b": torch.randn(2, 4, dtype=torch.float64)}
    probe = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}

    def loss(coefficients):
        merged = merge(theta0, tau, coefficients)
        return sum((merged[n] * probe[n]).sum() ** 2 for n in merged)

    assert torch.autograd.gradcheck(loss, (torch.rand(2, 2, dtype=torch.float64, requires_grad=True),))
    assert torch.autograd.gradcheck(loss, (torch.rand(3, 2, 2, dtype=torch.float64, requires_grad=True),))
    assert torch.autograd.gradcheck(loss, (torch.rand(2, dtype=torch.float64, requires_grad=True),))


def saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_bf16_task_vectors_stay_bf16_in_the_backward_graph():
    full = make_task_vectors(num_tasks=4, seed=3)
    half = make_task_vectors(num_tasks=4, seed=3, dtype=torch.bfloat16)
    lam = torch.full((len(full.layer_names), 4), 0.3, requires_grad=True)
    full_bytes = saved_bytes(lambda: merge(full.theta0, full.tau, lam))
    half_bytes = saved_bytes(lambda: merge(half.theta0, half.tau, lam))
    assert full_bytes >= full.nbytes()
    assert half_bytes < 0.55 * full_bytes, (half_bytes, full_bytes)


def test_half_precision_weights_take_float32_deltas():
    theta0 = {"w": torch.randn(4, 3).half()}
    tau = {"w": torch.randn(2, 4, 3).half()}
    merged = merge(theta0, tau, torch.tensor([0.3, 0.3]), {"w": torch.randn(4, 3)})
    assert merged["w"].dtype == torch.float16


def test_module_spec_from_a_checkpoint_cannot_import_or_load(tmp_path):
    import sys

    assert "this" not in sys.modules
    with pytest.raises(ValueError, match="not imported"):
        ModuleSpec("this:Anything").build()
    assert "this" not in sys.modules
    refused = [
        ModuleSpec("open_clip:create_model", {"model_name": "ViT-B-32", "pretrained": str(tmp_path / "evil.pt")}),
        ModuleSpec("open_clip:create_model", {"model_name": "ViT-B-32", "weights_only": False}),
        ModuleSpec("open_clip:create_model", {"model_name": "hf-hub:someone/model"}),
        ModuleSpec("torch.nn:Linear", {"in_features": 2, "out_features": 2, "device": "meta"}),
    ]
    for spec in refused:
        with pytest.raises(ValueError, match="refused|not allowed|must be None|unknown open_clip model"):
            spec.build()


def test_moving_task_vectors_that_share_their_backbone_moves_their_own_tau_too():
    # `ties()` shares θ0 and the heads, so moving the preprocessed copy first must not make `to` skip the original's τ
    tv = make_task_vectors(num_tasks=3)
    preprocessed = tv.ties(0.2)
    preprocessed.to("meta")
    assert tv.device == torch.device("meta")  # the shared backbone moved with it
    tv.to("meta")
    assert all(t.device == torch.device("meta") for t in tv.tau.values())
