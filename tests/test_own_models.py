"""Bring your own models (issue 18): any nn.Module backbone and heads train in process; recognised builders are
recorded so a fresh process rebuilds them from the .ckpt; the rest load with backbone= / heads=, checked first."""

from __future__ import annotations

import copy
import gc
import importlib.util
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from paretomerge import (
    AdaMerging,
    CheckpointError,
    ModuleSpec,
    ParetoMerging,
    TaskVectors,
    export_pareto_set,
    load_pareto_set,
    static_model,
)
from paretomerge.callbacks import MAPBaseline, ParetoFrontLogger
from paretomerge.kernels import DEFAULT_TARGETS
from paretomerge.modules import checkpoint as ckpt
from paretomerge.suites import TensorSuite
from tests import own_models
from tests.own_models import BUILDERS, ZeroShotLikeHead, problem

ROOT = Path(__file__).resolve().parents[1]
GAMMA = [0.7, 0.3]
UNRECORDED = "records no way to rebuild"


def suite_for(tv: TaskVectors, size: int, n: int = 8, seed: int = 0) -> TensorSuite:
    """Random images; labels in range of each head's output (its class count, read from the output)."""
    generator = torch.Generator().manual_seed(seed)
    train = {t: torch.randn(n, 3, size, size, generator=generator) for t in tv.task_names}
    val = {}
    net = static_model("task_arithmetic", tv)
    for t in tv.task_names:
        images = torch.randn(n, 3, size, size, generator=generator)
        classes = net(images[:1], task=t).shape[-1]
        val[t] = (images, torch.randint(0, classes, (n,), generator=generator))
    return TensorSuite(tv, train, val, batch_size=4, eval_batch_size=8)


def fit(model, suite, root: Path, steps: int = 2, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, default_root_dir=root, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        num_sanity_val_steps=0, accelerator="cpu", val_check_interval=steps, callbacks=list(callbacks))
    trainer.fit(model, suite)
    return trainer


def save(trainer: L.Trainer, path: Path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.save_checkpoint(path)
    return [str(w.message) for w in caught if UNRECORDED in str(w.message)]


def available_builders() -> list[str]:
    return [b for b in BUILDERS if b != "hf_clip_vision" or importlib.util.find_spec("transformers") is not None]


def load_in_a_fresh_process(tmp: Path, runs: dict) -> dict:
    """``at(GAMMA)``'s logits of every run's checkpoint, loaded by one fresh process (with backbone=/heads= where the
    run's modules were not recorded)."""
    lines = ["import sys, torch", f"sys.path.insert(0, {str(ROOT)!r})", "from paretomerge import ParetoMerging",
             f"data = torch.load({str(tmp / 'inputs.pt')!r})", "out = {}"]
    for builder, run in runs.items():
        kwargs = ""
        if not BUILDERS[builder][3]:  # only these need the test's own code in the fresh process
            lines.append("from tests import own_models")
            kwargs = (f", backbone=own_models.{BUILDERS[builder][0].__name__}(), "
                      f"heads={{'b': own_models.ZeroShotLikeHead(4, {BUILDERS[builder][2]})}}")
        lines += [f"net = ParetoMerging.load_from_checkpoint({str(run['ckpt'])!r}{kwargs}).at(data['gamma'])",
                  f"out[{builder!r}] = {{t: net(x, task=t) for t, x in data[{builder!r}].items()}}"]
    lines.append(f"torch.save(out, {str(tmp / 'outputs.pt')!r})")
    torch.save({"gamma": GAMMA, **{b: run["images"] for b, run in runs.items()}}, tmp / "inputs.pt")
    result = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=900,
                            cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp / "outputs.pt")


@pytest.fixture(scope="module")
def builder_runs(tmp_path_factory) -> dict:
    """Each available builder: fit 2 steps, save (recording the warnings), at() and the training-time forward on a
    few validation images; then one fresh process loads every checkpoint."""
    tmp = tmp_path_factory.mktemp("builders")
    runs = {}
    for builder in available_builders():
        pretrained, finetuned, heads, size = problem(builder)
        tv = TaskVectors.from_models(pretrained, finetuned, ["a", "b"], heads)
        suite = suite_for(tv, size)
        # A backbone without attention needs its own targets for the preference tensor (the default names attention).
        model = ParetoMerging(rank=2, targets=r"^4\.weight$" if builder == "torch_nn" else DEFAULT_TARGETS)
        trainer = fit(model, suite, tmp / builder)
        run = {"metrics": dict(trainer.callback_metrics), "tv": tv, "ckpt": tmp / f"{builder}.ckpt"}
        run["said"] = save(trainer, run["ckpt"])
        run["said_again"] = save(trainer, tmp / f"{builder}.again.ckpt")
        run["images"] = {t: x[:3] for t, (x, _) in suite.labeled("val").items()}
        net = model.at(GAMMA)
        run["expected"] = {t: net(x, task=t) for t, x in run["images"].items()}
        with torch.enable_grad():  # the training-time path: θ0 + Σ c(γ) τ + Δ(γ) through autograd
            run["training"] = {t: v.detach() for t, v in model(run["images"], torch.tensor(GAMMA)).items()}
        runs[builder] = run
    for builder, logits in load_in_a_fresh_process(tmp, runs).items():
        runs[builder]["loaded"] = logits
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("builder", list(BUILDERS))
def test_own_models_fit_save_and_load_in_a_fresh_process(builder, builder_runs):
    if builder not in builder_runs:
        pytest.skip("the Hugging Face builder needs transformers (pip install .[hf])")
    run = builder_runs[builder]
    assert "val/acc/equal/b" in run["metrics"]  # accuracy without finding an nn.Linear in the head
    recorded = BUILDERS[builder][3]
    assert (run["tv"].backbone_spec is not None) == recorded
    if recorded:
        assert run["said"] == [] and ckpt.unrecorded(run["tv"]) == {}
    else:  # said once, naming exactly what loading will need
        said = run["said"]
        assert len(said) == 1 and "backbone=<open_clip.transformer.VisionTransformer>" in said[0]
        assert "heads={'b': <tests.own_models.ZeroShotLikeHead>}" in said[0] and "'a'" not in said[0]
    assert run["said_again"] == []
    for t, expected in run["expected"].items():
        torch.testing.assert_close(run["training"][t], expected, atol=1e-5, rtol=1e-5)  # at() = training forward
        torch.testing.assert_close(run["loaded"][t], expected, atol=1e-5, rtol=1e-5)  # fresh process = this one


@pytest.fixture(scope="module")
def unrecognised_run(tmp_path_factory):
    """A fitted model on the unrecognised backbone and a zero-shot-like head, with the static merges, MAP and the front
    logger run on it; its checkpoint and export."""
    tmp = tmp_path_factory.mktemp("own")
    pretrained, finetuned, heads, size = problem("unrecognised")
    tv = TaskVectors.from_models(pretrained, finetuned, ["a", "b"], heads)
    suite = suite_for(tv, size)
    model = ParetoMerging(rank=2)
    front, map_baseline = ParetoFrontLogger(progress=False), MAPBaseline(budget=12, real_samples=4)
    trainer = fit(model, suite, tmp, steps=2, callbacks=[front, map_baseline])
    save(trainer, tmp / "model.ckpt")
    with pytest.warns(UserWarning, match=UNRECORDED):
        export_pareto_set(model, tmp / "set.safetensors")
    return {"model": model, "tv": tv, "suite": suite, "trainer": trainer, "front": front, "map": map_baseline,
            "ckpt": tmp / "model.ckpt", "export": tmp / "set.safetensors"}


def test_static_merges_map_and_the_front_logger_run_on_own_models(unrecognised_run):
    run = unrecognised_run
    assert 0.0 <= run["front"].metrics["front/hypervolume"] <= 1.0
    assert run["map"].runs == 1 and run["map"].last["real"].shape[1] == 2  # MAP's front, evaluated on both tasks
    accuracy = run["suite"].evaluate(static_model("ties", run["tv"]), split="val")
    assert set(accuracy) == {"a", "b"} and all(0.0 <= v <= 1.0 for v in accuracy.values())


def test_loading_without_the_modules_names_exactly_the_missing_keyword_arguments(unrecognised_run):
    with pytest.raises(CheckpointError) as err:
        ParetoMerging.load_from_checkpoint(unrecognised_run["ckpt"])
    message = str(err.value)
    assert "ParetoMerging.load_from_checkpoint(path, backbone=<open_clip.transformer.VisionTransformer>, " \
           "heads={'b': <tests.own_models.ZeroShotLikeHead>})" in message
    with pytest.raises(CheckpointError, match=r"heads=\{'b'"):  # the backbone alone is not enough
        ParetoMerging.load_from_checkpoint(unrecognised_run["ckpt"], backbone=own_models.unrecognised())
    with pytest.raises(CheckpointError, match=r"load_pareto_set\(path, backbone="):
        load_pareto_set(unrecognised_run["export"])


def test_mismatched_modules_are_refused_naming_the_first_difference_and_nothing_is_loaded(unrecognised_run):
    from open_clip.transformer import VisionTransformer

    path, head = unrecognised_run["ckpt"], {"b": ZeroShotLikeHead(4, 16)}
    wider = VisionTransformer(image_size=16, patch_size=8, width=48, layers=2, heads=4, mlp_ratio=4.0, output_dim=16)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"'class_embedding' has shape \(48,\) but \(32,\) in the checkpoint"):
        ParetoMerging.load_from_checkpoint(path, backbone=wider, heads=head)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())  # the module given is untouched
    with pytest.raises(CheckpointError, match="backbone= is a torch.nn.modules.container.Sequential, but the "
                                              "checkpoint's is a open_clip.transformer.VisionTransformer"):
        ParetoMerging.load_from_checkpoint(path, backbone=nn.Sequential(nn.Linear(2, 2)), heads=head)
    with pytest.raises(CheckpointError, match=r"heads= has tasks \['c'\] that this checkpoint does not have"):
        ParetoMerging.load_from_checkpoint(path, backbone=own_models.unrecognised(),
                                           heads={**head, "c": ZeroShotLikeHead(4, 16)})
    with pytest.raises(CheckpointError, match=r"heads\['b'\].*'weight' has shape \(5, 16\) but \(4, 16\)"):
        ParetoMerging.load_from_checkpoint(path, backbone=own_models.unrecognised(),
                                           heads={"b": ZeroShotLikeHead(5, 16)})
    with pytest.raises(TypeError, match="backbone= must be an nn.Module"):
        ParetoMerging.load_from_checkpoint(path, backbone="ViT-B-32", heads=head)
    # A class of the same name from another module (a notebook's __main__.Net against mypkg.Net) is accepted.
    renamed = type("ZeroShotLikeHead", (ZeroShotLikeHead,), {"__module__": "notebook"})
    ParetoMerging.load_from_checkpoint(path, backbone=own_models.unrecognised(), heads={"b": renamed(4, 16)})
    # After all of that, the right modules load, into copies, and give the trained model's outputs.
    given = own_models.unrecognised()
    loaded = ParetoMerging.load_from_checkpoint(path, backbone=given, heads=head)
    assert loaded.task_vectors.backbone is not given
    x = torch.randn(2, 3, 16, 16)
    expected = unrecognised_run["model"].at(GAMMA)(x, task="b")
    torch.testing.assert_close(loaded.at(GAMMA)(x, task="b"), expected)
    exported = load_pareto_set(unrecognised_run["export"], backbone=own_models.unrecognised(), heads=head)
    torch.testing.assert_close(exported.at(GAMMA)(x, task="b"), expected)


def test_adamerging_loads_own_models_with_backbone(tmp_path):
    pretrained, finetuned, heads, size = problem("unrecognised", seed=3)
    tv = TaskVectors.from_models(pretrained, finetuned, ["a", "b"], heads)
    model = AdaMerging()
    trainer = fit(model, suite_for(tv, size), tmp_path)
    assert len(save(trainer, tmp_path / "ada.ckpt")) == 1
    with pytest.raises(CheckpointError, match=r"AdaMerging.load_from_checkpoint\(path, backbone="):
        AdaMerging.load_from_checkpoint(tmp_path / "ada.ckpt")
    loaded = AdaMerging.load_from_checkpoint(tmp_path / "ada.ckpt", backbone=own_models.unrecognised(),
                                             heads={"b": ZeroShotLikeHead(4, 16)})
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.at()(x, task="a"), model.at()(x, task="a"))


def test_a_head_that_does_not_accept_the_features_is_named_with_the_shapes(tmp_path):
    pretrained, finetuned, _, size = problem("torch_nn")
    heads = {"a": nn.Linear(16, 3), "b": nn.Linear(12, 4)}  # the backbone gives 16 features
    tv = TaskVectors.from_models(pretrained, finetuned, ["a", "b"], heads)
    with pytest.raises(ValueError, match="matches no ≥2-D weight of this backbone.*targets=None"):
        ParetoMerging(tv, rank=2)  # no attention weights for the default targets
    model = ParetoMerging(tv, rank=2, targets=None)
    with pytest.raises(ValueError, match=r"the head of task 'b' \(Linear\) does not accept the backbone's features of "
                                         r"shape \(2, 16\)"):
        model.at(GAMMA)(torch.randn(2, 3, size, size), task="b")
    train = {t: torch.randn(8, 3, size, size) for t in ("a", "b")}
    with pytest.raises(ValueError, match=r"head of task 'b' \(Linear\) does not accept .* shape \(4, 16\)"):
        fit(ParetoMerging(rank=2, targets=None), TensorSuite(tv, train, batch_size=4), tmp_path)


def test_a_backbone_whose_output_is_not_features_is_refused_with_what_to_do():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(12, 4)

        def forward(self, x):
            return self.linear(x.flatten(1)), x

    tv = TaskVectors.from_models(Pair(), [Pair(), Pair()], ["a", "b"], {"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})
    with pytest.raises(TypeError, match="returned a tuple; a backbone must return its features as a tensor"):
        ParetoMerging(tv, rank=2, targets=None).at(GAMMA)(torch.randn(1, 3, 2, 2), task="a")


def test_from_models_streams_one_model_at_a_time_and_refuses_state_dicts():
    pretrained, finetuned, heads, _ = problem("torch_nn")
    made = []

    def maker(k):
        def make():
            gc.collect()
            assert all(ref() is None for ref in made), "the previous model is still alive"  # one at a time
            model = copy.deepcopy(finetuned[k])
            made.append(weakref.ref(model))
            return model
        return make

    streamed = TaskVectors.from_models(pretrained, [maker(0), maker(1)], ["a", "b"], heads)
    direct = TaskVectors.from_state_dicts(pretrained, [m.state_dict() for m in finetuned], ["a", "b"], heads)
    assert len(made) == 2
    assert all(torch.equal(streamed.tau[n], direct.tau[n]) for n in direct.layer_names)
    with pytest.raises(TypeError, match="fine-tuned model 1 is a OrderedDict, not an nn.Module"):
        TaskVectors.from_models(pretrained, [finetuned[0], finetuned[1].state_dict()], ["a", "b"], heads)
    other = own_models.module_spec()
    with pytest.raises(ValueError, match="task 'b'.*different architecture"):
        TaskVectors.from_models(pretrained, [finetuned[0], other], ["a", "b"], heads)


def test_recognised_specs_rebuild_the_same_structure_and_the_refusals_stay():
    from paretomerge.kernels.builders import recognise, structure_difference

    for builder in ("open_clip_by_name", "torch_nn", "timm_by_name"):
        module = BUILDERS[builder][0]()
        spec = recognise(module)
        assert spec is not None and structure_difference(module, ModuleSpec.from_dict(spec.to_dict()).build()) is None
    import open_clip

    quick = open_clip.create_model("ViT-S-32", pretrained=None, force_quick_gelu=True).visual
    assert recognise(quick).kwargs.get("force_quick_gelu") is True  # GELU and QuickGELU towers are told apart
    assert recognise(nn.Sequential(nn.Linear(2, 2), ZeroShotLikeHead(2, 2))) is None  # one unknown child: not recorded
    for spec, problem_text in [
        (ModuleSpec("timm:create_model", {"model_name": "test_vit", "pretrained": True}), "pretrained must be False"),
        (ModuleSpec("timm:create_model", {"model_name": "hf-hub:someone/model"}), "unknown timm model"),
        (ModuleSpec("timm:create_model", {"model_name": "test_vit", "checkpoint_path": "/x"}), "not allowed"),
        (ModuleSpec("open_clip:create_model", {"model_name": "roberta-ViT-B-32", "pretrained": None}), "hub"),
        (ModuleSpec("paretomerge.kernels.builders:sequential",
                    {"modules": [["0", {"target": "os:system", "kwargs": {"command": "true"}}]]}), "refus"),
    ]:
        with pytest.raises(ValueError, match=problem_text):
            spec.build()


def test_what_a_pretrained_model_carries_besides_its_architecture_does_not_stop_recognition():
    pytest.importorskip("transformers")
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from paretomerge.kernels.builders import recognise

    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=16, patch_size=8))
    hf.name_or_path = hf.config._name_or_path = "tanganke/clip-vit-base-patch32_cars"  # as from_pretrained sets
    spec = recognise(hf)
    assert spec is not None and "_name_or_path" not in spec.kwargs["config"]
    tower = own_models.open_clip_by_name()
    tower.image_mean, tower.image_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # a pretrained tag's preprocessing
    assert recognise(tower).kwargs["model_name"] == "ViT-S-32"


def test_recognising_leaves_the_random_state_and_checks_recorded_specs(tmp_path):
    from paretomerge.kernels.builders import recognise

    tower = own_models.open_clip_by_name()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    recognise(tower)
    assert torch.equal(torch.rand(3), expected)  # a resumed run draws the same numbers whether or not it saved
    built = own_models.module_spec()
    assert recognise(built) is not None
    built.proj = None  # changed after ModuleSpec.build: its spec no longer rebuilds it
    assert recognise(built) is None
    tv = TaskVectors.from_models(*problem("unrecognised")[:2], ["a", "b"], heads=own_models.heads_for("unrecognised"))
    assert copy.deepcopy(tv).backbone_spec is None and ckpt.unrecorded(copy.deepcopy(tv))["heads"] == {
        "b": "tests.own_models.ZeroShotLikeHead"}


def test_specs_from_a_checkpoint_cannot_fetch_anything_even_nested():
    for spec, problem_text in [
        (ModuleSpec("paretomerge.kernels.builders:hf_clip_vision_model",
                    {"config": {"hidden_size": 32, "attn_implementation": "kernels-community/flash-attn"}}),
         "attn_implementation.*refused"),
        (ModuleSpec("paretomerge.kernels.builders:hf_clip_vision_model", {"config": {"_name_or_path": "/x"}}),
         "refused"),
        (ModuleSpec("open_clip.model:CLIP", {"embed_dim": 8, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224",
                                                                            "timm_model_pretrained": True},
                                             "text_cfg": {}}), r"vision_cfg.timm_model_pretrained"),
        (ModuleSpec("open_clip.model:CLIP", {"embed_dim": 8, "vision_cfg": {},
                                             "text_cfg": {"hf_model_name": "someone/model"}}),
         r"text_cfg.hf_model_name"),
    ]:
        if "hf_clip" in spec.target:
            pytest.importorskip("transformers")
        with pytest.raises(ValueError, match=problem_text):
            spec.build()


def test_tensor_suite_refuses_what_it_cannot_serve():
    tv = TaskVectors.from_models(*problem("torch_nn")[:2], ["a", "b"], heads=own_models.heads_for("torch_nn"))
    train = {t: torch.randn(4, 3, 16, 16) for t in ("a", "b")}
    with pytest.raises(ValueError, match=r"val\['a'\]: expected \(images, labels\), got Tensor"):
        TensorSuite(tv, train, val={t: torch.randn(4, 3, 16, 16) for t in ("a", "b")})
    with pytest.raises(ValueError, match=r"val must have the tasks \['a', 'b'\]; unknown \[\], missing \['b'\]"):
        TensorSuite(tv, train, val={"a": (torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))})
    with pytest.raises(ValueError, match=r"train must have the tasks"):
        TensorSuite(tv, {"a": train["a"]})
    with pytest.raises(ValueError, match=r"labels must be an integer tensor \[N=4\]"):
        TensorSuite(tv, train, val={t: (torch.randn(4, 3, 16, 16), torch.zeros(4)) for t in ("a", "b")})
