"""One merged model (``at(γ)``) in its own ecosystem's format, for a process that never imports paretomerge.

- ``open_clip``: an open_clip ``VisionTransformer`` image tower: its state dict under open_clip's key names
  (``open_clip_visual.safetensors``) and the model config ``open_clip.create_model`` builds it from (``<name>.json``:
  a built-in model's name where one has the same tower, else a config to register with ``open_clip.add_model_config``);
- ``hf``: that tower as a Hugging Face ``CLIPVisionModelWithProjection`` (`clip_towers` renames the keys), a Hugging
  Face ``CLIPVisionModel`` backbone as itself, or a causal LM as itself (``MergedModel.save_pretrained``).

Beside an image tower go its task heads, each a linear map of the embedding or of its L2-normalised value (a zero-shot
head): ``heads.safetensors`` (``<task>.weight [C, D]``, ``<task>.bias [C]``) and ``heads.json`` (the tasks, their
classes, whether the embedding is normalised first, the preference). README.md holds the code that loads it all.

`plan_model_files` makes every check and holds what it will write; `ModelFiles.write` writes it. Every config is
checked by building from it what open_clip or transformers would build (on the meta device) and comparing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from paretomerge.kernels.clip_towers import hf_vision_model, hf_vision_settings, open_clip_config
from paretomerge.kernels.merged_model import MergedModel

FORMATS = ("open_clip", "hf")
OPEN_CLIP_WEIGHTS, HEADS_WEIGHTS, HEADS_INFO = "open_clip_visual.safetensors", "heads.safetensors", "heads.json"


@dataclasses.dataclass
class ModelFiles:
    """What `plan_model_files` will write: the files (name -> writer) and README.md's text."""

    format: str
    writers: dict[str, Callable[[Path], None]]
    readme: str

    def write(self, directory: Path) -> None:
        """Write everything into ``directory`` (created; it must not exist)."""
        directory.mkdir()
        for write in self.writers.values():
            write(directory)
        (directory / "README.md").write_text(self.readme)


def _kind(backbone: nn.Module, heads: Mapping[str, nn.Module]) -> str | None:
    cls = type(backbone)
    if cls.__module__.startswith("open_clip.") and cls.__name__ == "VisionTransformer":
        return "open_clip"
    if cls.__module__.startswith("transformers.") and cls.__name__ == "CLIPVisionModel":
        return "hf_clip_vision"
    if all(isinstance(h, nn.Identity) for h in heads.values()) and callable(getattr(backbone, "save_pretrained", None)):
        return "causal_lm"
    return None


def format_problem(backbone: nn.Module, heads: Mapping[str, nn.Module], fmt: str) -> str | None:
    """Why ``fmt`` cannot hold this model (its backbone and task heads), or None where it can."""
    if fmt not in FORMATS:
        return f"unknown format {fmt!r}; the formats are {list(FORMATS)}"
    kind = _kind(backbone, heads)
    name = type(backbone).__name__
    if kind is None:
        return (f"its backbone is a {type(backbone).__module__}.{name}: neither an open_clip VisionTransformer, a "
                "Hugging Face CLIPVisionModel nor a Hugging Face causal LM")
    if kind != "open_clip" and fmt == "open_clip":
        return f"its backbone is a Hugging Face {name}, not an open_clip image tower"
    try:
        if kind == "open_clip":
            config = open_clip_config(backbone)[1]
            if fmt == "hf":
                hf_vision_settings(config, backbone)
        if kind != "causal_lm":
            _linear_heads(heads, _embedding_width(backbone, kind))
    except ValueError as err:
        return str(err)
    return None


def model_formats(backbone: nn.Module, heads: Mapping[str, nn.Module]) -> list[str]:
    """The formats of `FORMATS` this model can be written in."""
    return [fmt for fmt in FORMATS if format_problem(backbone, heads, fmt) is None]


# ---------------------------------------------------------------------------------------------- heads
def _embedding_width(backbone: nn.Module, kind: str) -> int:
    return backbone.output_dim if kind == "open_clip" else backbone.config.hidden_size


@torch.no_grad()
def _linear_heads(heads: Mapping[str, nn.Module], width: int) -> dict[str, tuple[Tensor, Tensor, bool]]:
    """task -> (weight ``[C, D]``, bias ``[C]``, whether the head reads the L2-normalised embedding): each head must
    be an ``nn.Linear``, or hold one Linear and nothing else and give its map of the (normalised) embedding."""
    out = {}
    for task, head in heads.items():
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        owned = {id(p) for p in head.parameters()} | {id(b) for b in head.buffers()}
        if len(linears) == 1 and owned == {id(p) for p in linears[0].parameters()} and linears[0].in_features == width:
            linear = linears[0]
            weight = linear.weight.detach()
            bias = torch.zeros_like(weight[:, 0]) if linear.bias is None else linear.bias.detach()
            probe = torch.randn(4, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            probe = probe.to(weight)
            got = head(probe)
            for normalize in (False, True):
                expected = F.linear(F.normalize(probe, dim=-1) if normalize else probe, weight, bias)
                if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                    out[task] = (weight, bias, normalize)
                    break
        if task not in out:
            raise ValueError(f"the head of task {task!r} ({type(head).__name__}) is not a linear map of the "
                             f"{width}-wide embedding or of its L2-normalised value, which is what the export writes")
    return out


# ---------------------------------------------------------------------------------------------- the files
def plan_model_files(net: MergedModel, fmt: str, directory: str | Path, *, tokenizer: Any = None,
                     class_names: Mapping[str, Sequence[str]] | None = None,
                     about: Mapping[str, Any] | None = None) -> ModelFiles:
    """Everything ``net`` (one merged model) becomes in ``fmt``, checked and held in memory; nothing is written.

    ``directory`` is where the files will end up (README.md's code names it); ``tokenizer`` goes beside a causal LM;
    ``class_names`` (task -> names, one per class) and ``about`` (``method``, ``preference``: task -> weight) go into
    heads.json and README.md."""
    problem = format_problem(net.backbone, net.heads, fmt)
    if problem is not None:
        raise ValueError(f"--format {fmt} cannot hold this model: {problem}")
    kind, about = _kind(net.backbone, net.heads), dict(about or {})
    if kind == "causal_lm":
        if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
            raise TypeError(f"tokenizer must have save_pretrained (a Hugging Face tokenizer), got "
                            f"{type(tokenizer).__name__}")
        files = [("config.json, model.safetensors", f"the model, a Hugging Face {type(net.backbone).__name__}")]
        if tokenizer is not None:
            files.append(("tokenizer files", "its tokenizer"))
        code = _causal_lm_code(tokenizer).format(directory=str(directory))
        return ModelFiles(fmt, {"model": lambda d: net.save_pretrained(d, tokenizer=tokenizer)},
                          _readme(fmt, about, files, code, "torch and transformers"))
    state = {k: v.detach().contiguous().cpu() for k, v in net.backbone.state_dict().items()}
    heads = _linear_heads(net.heads, _embedding_width(net.backbone, kind))
    names = _class_names(class_names, heads)
    if kind == "open_clip" and fmt == "open_clip":
        name, config = open_clip_config(net.backbone)
        builtin = name is not None
        if name is None:
            name = "paretomerge-ViT-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        writers = {OPEN_CLIP_WEIGHTS: lambda d: save_file(state, str(d / OPEN_CLIP_WEIGHTS)),
                   f"{name}.json": lambda d: (d / f"{name}.json").write_text(json.dumps(config, indent=2) + "\n")}
        files = [(OPEN_CLIP_WEIGHTS, "the image tower's weights, under open_clip's own key names"),
                 (f"{name}.json", "its open_clip model config: " + (
                     "a built-in open_clip model's, whose text tower is not part of the export" if builtin else
                     "the text tower in it is a placeholder") + " (the zero-shot heads hold what the text tower gave)")]
        code, needs = _open_clip_code(name, builtin), "torch, safetensors and open_clip_torch"
    else:
        if kind == "open_clip":
            model = hf_vision_model(hf_vision_settings(open_clip_config(net.backbone)[1], net.backbone), state)
            cls, output = "CLIPVisionModelWithProjection", "image_embeds"
        else:
            model, cls, output = net.backbone, "CLIPVisionModel", "pooler_output"
        writers = {"model": lambda d: model.save_pretrained(d)}
        files = [("config.json, model.safetensors", f"the image tower, a Hugging Face {cls}")]
        code, needs = _hf_code(cls, output), "torch, safetensors and transformers"
    info = {"tasks": {t: {"classes": None if names is None else list(names[t]), "num_classes": int(w.shape[0]),
                          "normalize": normalize} for t, (w, _, normalize) in heads.items()},
            "logits": "(normalize(embedding) if normalize else embedding) @ weight.T + bias", **about}
    tensors = {f"{t}.{part}": v.contiguous().cpu() for t, (w, b, _) in heads.items()
               for part, v in (("weight", w), ("bias", b))}
    writers[HEADS_WEIGHTS] = lambda d: save_file(tensors, str(d / HEADS_WEIGHTS))
    writers[HEADS_INFO] = lambda d: (d / HEADS_INFO).write_text(json.dumps(info, indent=2) + "\n")
    files += [(HEADS_WEIGHTS, "each task's head: `<task>.weight` [C, D] and `<task>.bias` [C]"),
              (HEADS_INFO, "the tasks, their classes, whether a head reads the L2-normalised embedding, and the "
                           "preference")]
    channels, height, width = _image_shape(net.backbone, kind)
    code = code.format(directory=str(directory), images=f"[B, {channels}, {height}, {width}]",
                       width=next(iter(heads.values()))[0].shape[1], tasks=", ".join(repr(t) for t in heads))
    code += (f"\n\n\nwith torch.no_grad():\n    embedding = embed(torch.zeros(2, {channels}, {height}, {width}))\n"
             "    print({task: logits(embedding, task).argmax(-1).tolist() for task in tasks})\n")
    return ModelFiles(fmt, writers, _readme(fmt, about, files, code, needs, images=True))


def _class_names(given: Mapping[str, Sequence[str]] | None,
                 heads: Mapping[str, tuple[Tensor, Tensor, bool]]) -> dict[str, tuple[str, ...]] | None:
    if given is None:
        return None
    unknown = sorted(set(given) - set(heads))
    if unknown:
        raise ValueError(f"class_names names tasks {unknown} the model does not have ({list(heads)})")
    missing = [t for t in heads if t not in given]
    if missing:
        raise ValueError(f"class_names gives no names for tasks {missing}")
    names = {t: tuple(str(n) for n in given[t]) for t in heads}
    for task, (weight, _, _) in heads.items():
        if len(names[task]) != weight.shape[0]:
            raise ValueError(f"class_names[{task!r}] has {len(names[task])} names, but its head has "
                             f"{weight.shape[0]} classes")
    return names


def _image_shape(backbone: nn.Module, kind: str) -> tuple[int, int, int]:
    if kind == "open_clip":
        return 3, *backbone.image_size
    size = backbone.config.image_size
    return backbone.config.num_channels, size, size


# ---------------------------------------------------------------------------------------------- README.md
_HEADS_CODE = '''heads = load_file(directory / "heads.safetensors")
tasks = json.loads((directory / "heads.json").read_text())["tasks"]


def logits(embedding, task):
    """[B, C] logits of one task's head ({tasks}) from embed(images)."""
    if tasks[task]["normalize"]:
        embedding = F.normalize(embedding, dim=-1)
    return embedding @ heads[f"{{task}}.weight"].T + heads[f"{{task}}.bias"]'''

_IMPORTS = '''import json
from pathlib import Path

{first}import torch
import torch.nn.functional as F
from safetensors.torch import load_file
{last}'''


def _open_clip_code(name: str, builtin: bool) -> str:
    register = "" if builtin else \
        f'open_clip.add_model_config(directory / "{name}.json")  # registers the architecture as "{name}"\n'
    return _IMPORTS.format(first="import open_clip\n", last="") + f'''
directory = Path({{directory!r}})
{register}model = open_clip.create_model("{name}", pretrained=None)  # random weights: the image tower's come next
model.visual.load_state_dict(load_file(directory / "{OPEN_CLIP_WEIGHTS}"))
tower = model.visual.eval()


def embed(images):
    """{{images}} images -> [B, {{width}}] image embeddings."""
    return tower(images)


''' + _HEADS_CODE


def _hf_code(cls: str, output: str) -> str:
    return _IMPORTS.format(first="", last=f"from transformers import {cls}\n") + f'''
directory = Path({{directory!r}})
tower = {cls}.from_pretrained(str(directory)).eval()


def embed(images):
    """{{images}} images -> [B, {{width}}] image embeddings."""
    return tower(pixel_values=images).{output}


''' + _HEADS_CODE


def _causal_lm_code(tokenizer: Any) -> str:
    lines = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             "directory = {directory!r}", "model = AutoModelForCausalLM.from_pretrained(directory).eval()"]
    if tokenizer is not None:
        lines += ["tokenizer = AutoTokenizer.from_pretrained(directory)", "",
                  'tokens = tokenizer("hello", return_tensors="pt")',
                  "print(tokenizer.decode(model.generate(**tokens, max_new_tokens=8, do_sample=False)[0]))"]
    return "\n".join(lines) + "\n"


def _readme(fmt: str, about: Mapping[str, Any], files: Sequence[tuple[str, str]], code: str, needs: str,
            images: bool = False) -> str:
    preference, method = about.get("preference"), about.get("method", "A merge")
    title = f"{method} at the preference " + ", ".join(f"{t} {w:.4g}" for t, w in preference.items()) \
        if preference else f"{method}: its merged model"
    text = [f"# {title}", "", f"One merged model, exported by paretomerge in the `{fmt}` format. Loading it needs "
            f"{needs}, not paretomerge.", "", "| file | holds |", "| --- | --- |"]
    text += [f"| `{name}` | {holds} |" if "," not in name and " " not in name else f"| {name} | {holds} |"
             for name, holds in files]
    text += ["", "```python", code.rstrip("\n"), "```", ""]
    if images:
        text += ["The images are the inputs the model was merged on: floats, preprocessed as its suite did (CLIPSuite: "
                 "open_clip's evaluation preprocessing for the model).", ""]
    return "\n".join(text)
