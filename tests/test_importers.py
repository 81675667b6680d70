"""Fine-tuned checkpoint importers on real open_clip architectures with random weights (no downloads)."""

from __future__ import annotations

import sys
import textwrap

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from paretomerge import ModuleSpec, TaskVectors
from paretomerge.suites.importers import (
    PickledCheckpointError,
    hf_to_open_clip,
    open_clip_to_hf,
    read_state_dict,
    to_open_clip_visual,
)


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None).visual


def _small_visual(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return open_clip.model.VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
                                             output_dim=16)


def test_hugging_face_keys_round_trip_to_open_clip(vit_b32):
    state = vit_b32.state_dict()
    hf = open_clip_to_hf(state)
    # Hugging Face's CLIPVisionModelWithProjection naming for ViT-B/32: 12 layers × 16 tensors, 3 embeddings,
    # 2 + 2 layer norms and the projection
    assert len(hf) == 12 * 16 + 3 + 4 + 1
    assert hf["vision_model.encoder.layers.0.self_attn.q_proj.weight"].shape == (768, 768)
    assert hf["vision_model.encoder.layers.11.self_attn.v_proj.bias"].shape == (768,)
    assert hf["vision_model.embeddings.patch_embedding.weight"].shape == (768, 3, 32, 32)
    assert hf["visual_projection.weight"].shape == (512, 768)  # Linear [out, in]
    assert "vision_model.pre_layrnorm.weight" in hf and "vision_model.post_layernorm.bias" in hf
    # q, k, v are the three row blocks of in_proj, in that order (nn.MultiheadAttention's layout)
    fused = state["transformer.resblocks.3.attn.in_proj_weight"]
    assert torch.equal(hf["vision_model.encoder.layers.3.self_attn.k_proj.weight"], fused[768:1536])
    back = hf_to_open_clip({**hf, "vision_model.embeddings.position_ids": torch.arange(50)[None]})
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # detected by its keys, and loadable into the real architecture
    vit_b32.load_state_dict(to_open_clip_visual(hf))


def test_hugging_face_checkpoint_missing_a_projection_is_refused(vit_b32):
    hf = open_clip_to_hf(vit_b32.state_dict())
    del hf["vision_model.encoder.layers.2.self_attn.k_proj.bias"]
    with pytest.raises(KeyError, match="layer 2 .* lacks the k projection bias"):
        hf_to_open_clip(hf)
    with pytest.raises(KeyError, match="unknown Hugging Face"):
        hf_to_open_clip({"vision_model.encoder.layers.0.mystery.weight": torch.zeros(1)})


@pytest.mark.parametrize("prefix", ["", "visual."])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_state_dicts_load_from_safetensors_and_torch_files(tmp_path, prefix, suffix):
    visual = _small_visual(1)
    state = {prefix + k: v.contiguous() for k, v in visual.state_dict().items()}
    path = tmp_path / f"finetuned{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = to_open_clip_visual(read_state_dict(path))
    assert sorted(loaded) == sorted(visual.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in visual.state_dict().items())


def test_the_task_vectors_release_format_needs_the_pickle_opt_in(tmp_path, monkeypatch):
    # A whole pickled module of a class the loading process cannot import, like the release's src.modeling.ImageEncoder
    package = tmp_path / "fake_release"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "modeling.py").write_text(textwrap.dedent("""
        import torch

        class ImageEncoder(torch.nn.Module):
            def __init__(self, visual):
                super().__init__()
                self.model = torch.nn.Module()
                self.model.visual = visual
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from fake_release.modeling import ImageEncoder

    visual = _small_visual(2)
    path = tmp_path / "finetuned.pt"
    torch.save(ImageEncoder(visual), path)
    for name in [m for m in sys.modules if m.startswith("fake_release")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    (package / "modeling.py").unlink()

    with pytest.raises(PickledCheckpointError, match="allow_pickle=True"):
        read_state_dict(path)
    with pytest.warns(UserWarning, match="runs code from the file"):
        state = read_state_dict(path, allow_pickle=True)
    loaded = to_open_clip_visual(state)
    assert sorted(loaded) == sorted(visual.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in visual.state_dict().items())


def test_a_vit_b16_state_dict_is_refused_for_a_vit_b32_backbone(vit_b32):
    torch.manual_seed(1)
    b16 = open_clip.create_model("ViT-B-16", pretrained=None).visual.state_dict()
    spec = ModuleSpec("open_clip:create_model", {"model_name": "ViT-B-32", "pretrained": None}, attr="visual")
    # the first parameter in the backbone's order that differs: positional_embedding [197, 768] against [50, 768]
    with pytest.raises(ValueError, match=r"parameter 'positional_embedding' has shape \(197, 768\)"):
        TaskVectors.from_state_dicts(vit_b32, [to_open_clip_visual(b16)], ["task"], {"task": nn.Linear(512, 3)},
                                     backbone_spec=spec)


def test_missing_files_and_non_state_dicts_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.pt")
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a state dict"):
        read_state_dict(path)
