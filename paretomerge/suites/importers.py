"""Fine-tuned CLIP checkpoints from the formats people share, as open_clip visual-tower state dicts.

Formats (``to_open_clip_visual`` detects them by their keys):

- **open_clip**: the visual tower's own keys (``conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``...),
  or a whole open_clip model (``visual.`` prefix), as safetensors or a plain ``torch.save`` state dict;
- **Hugging Face** ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel`` (``vision_model.`` and
  ``visual_projection.``): renamed, q/k/v fused into ``in_proj_weight``, the projection transposed
  (`kernels.clip_towers`, which ``paretomerge export --format hf`` uses the other way);
- **task_vectors release** (Ilharco et al.): pickled whole ``ImageEncoder`` modules (``model.visual.`` prefix). Pickle
  runs code on load, so it loads only with ``allow_pickle=True``, with a warning; classes that are not importable
  here (the release's ``src.modeling``) are rebuilt as empty ``nn.Module`` shells that hold the weights.

Architecture compatibility is checked where the state dicts meet the backbone (`TaskVectors.from_state_dicts`,
SPEC §7): the first missing, unexpected or differently shaped key is named.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from paretomerge.kernels.clip_towers import HF_PREFIXES, hf_to_open_clip, open_clip_to_hf

__all__ = ["HF_PREFIXES", "PickledCheckpointError", "hf_to_open_clip", "open_clip_to_hf", "read_state_dict",
           "read_visual_state_dict", "to_open_clip_visual"]


class PickledCheckpointError(ValueError):
    """A pickled checkpoint, refused without an explicit opt-in."""


def read_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file, a ``torch.save``'d state dict (read with ``weights_only=True``), or —
    only with ``allow_pickle=True`` — a pickled whole module (its ``state_dict()``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): "
                             f"{err}") from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch says a file "can still be loaded" when it is a valid pickle holding objects weights_only refuses;
        # anything else is not a checkpoint at all, and the opt-in would not help.
        if "can still be loaded" not in str(err) and "Unsupported global" not in str(err):
            raise ValueError(f"{str(path)!r} is not a readable checkpoint (truncated, corrupt, or not a torch or "
                             f"safetensors file): {str(err).splitlines()[0][:200]}") from err
        if not allow_pickle:
            raise PickledCheckpointError(
                f"{str(path)!r} holds pickled Python objects (e.g. the task_vectors release's whole ImageEncoder "
                "modules). Unpickling runs code from the file, so it is refused by default. If you trust its source, "
                "pass allow_pickle=True (allow_pickle: true in a config) to load it."
            ) from err
        warnings.warn(f"unpickling {str(path)!r} (allow_pickle=True): this runs code from the file", stacklevel=2)
        loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_ShellPickle)
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{str(path)!r} is not a readable checkpoint (truncated or corrupt?): {err}") from err
    if isinstance(loaded, nn.Module):
        return dict(loaded.state_dict())
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict of tensors")
    return dict(loaded)


def to_open_clip_visual(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The open_clip visual-tower state dict in ``state``, whatever its format (see the module docstring)."""
    keys = list(state)
    if any(k.startswith(HF_PREFIXES) for k in keys):
        return hf_to_open_clip(state)
    for prefix in ("model.visual.", "module.visual.", "visual."):  # task_vectors ImageEncoder, DDP, open_clip CLIP
        if any(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def read_visual_state_dict(path: str | os.PathLike, pretrained: Mapping[str, Tensor],
                           allow_pickle: bool = False) -> dict[str, Tensor]:
    """A fine-tuned visual tower from ``path`` in any supported format, as open_clip keys.

    A Hugging Face ``CLIPVisionModel`` has no ``visual_projection`` (it is fine-tuned with the projection frozen);
    its ``proj`` is then taken from ``pretrained`` (θ0), so that task vector is zero there. Nothing else is filled
    in: a missing key is refused where the state dict meets the backbone."""
    state = read_state_dict(path, allow_pickle=allow_pickle)
    from_hf = any(k.startswith(HF_PREFIXES) for k in state)
    visual = to_open_clip_visual(state)
    if from_hf and "proj" not in visual and "proj" in pretrained:
        visual["proj"] = pretrained["proj"]
    return visual


class _Shell(nn.Module):
    """Stands in for a pickled ``nn.Module`` class that cannot be imported here; holds its weights and children."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        # nn.Module's own __setstate__ adds the attributes that modules pickled by older torch releases lack.
        nn.Module.__setstate__(self, state)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a module rebuilt from a pickle without its class: it holds weights, it cannot run")


class _ShellUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _Shell


class _ShellPickle:
    """A ``pickle_module`` for `torch.load` whose unpickler rebuilds unimportable classes as `_Shell` modules."""

    Unpickler = _ShellUnpickler
    load = staticmethod(pickle.load)
    __name__ = "pickle"
