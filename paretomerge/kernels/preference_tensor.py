"""The low-rank preference tensor: Δ^l(γ) = G^l ×1 A^l ×2 B^l ×3 γ = A^l (Σ_k γ_k G^l[:,:,k]) (B^l)ᵀ.

Shapes per target matrix ``[m, n]`` (a ≥2-D weight reshaped to ``[out, -1]``): ``G [r, r, K]``,
``A [m, r]``, ``B [n, r]``. Mode products are tensorly's (`multi_mode_dot`, PyTorch backend).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import tensorly as tl
import torch
from tensorly.tenalg import mode_dot, multi_mode_dot
from torch import Tensor, nn

# The attention projections, as open_clip and torchvision name them (nn.MultiheadAttention: `attn.in_proj_weight`
# [3d, d], `attn.out_proj.weight` [d, d]; torchvision's module is `self_attention`), and Hugging Face CLIP
# (`self_attn.q_proj.weight`, k, v, out), Hugging Face Llama-family causal LMs (`self_attn.q_proj.weight`, k, v, o)
# and timm (`attn.qkv.weight`, `attn.proj.weight`).
DEFAULT_TARGETS = (r"(^|\.)(attn\.(in_proj_weight|out_proj\.weight|qkv\.weight|proj\.weight)"
                   r"|self_attention\.(in_proj_weight|out_proj\.weight)|self_attn\.(q|k|v|o|out)_proj\.weight)$")


def select_targets(params: Mapping[str, Tensor], pattern: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the ≥2-D floating-point parameters whose name matches ``pattern`` (``re.search``)."""
    try:
        regex = re.compile(pattern)
    except (re.error, TypeError) as err:
        raise ValueError(f"targets pattern {pattern!r} is not a valid regular expression: {err}") from err
    chosen = {
        name: tuple(p.shape) for name, p in params.items()
        if regex.search(name) and p.ndim >= 2 and p.is_floating_point()
    }
    if not chosen:
        examples = [n for n, p in params.items() if p.ndim >= 2][:5]
        raise ValueError(f"targets pattern {pattern!r} matches no ≥2-D weight of this backbone; some candidates: "
                         f"{examples}. Pass targets='<regex>' naming the weights the preference tensor should adapt, "
                         "or targets=None for no preference tensor")
    return chosen


class PreferenceTensor(nn.Module):
    """``G``, ``A``, ``B`` for each target matrix; ``delta(γ)`` gives the preference-dependent weights."""

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        num_tasks: int,
        rank: int,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        self.names = tuple(shapes)
        self.shapes = {name: tuple(int(s) for s in shapes[name]) for name in self.names}
        self.rank, self.num_tasks = rank, num_tasks
        generator = torch.Generator().manual_seed(seed)
        self.G, self.A, self.B = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        for name in self.names:
            m, n = self.matrix_shape(name)
            a, b = torch.empty(m, rank), torch.empty(n, rank)
            # Kaiming-uniform with a=√5, as nn.Linear initialises its weight; G = 0 so Δ(γ) = 0 at start.
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=generator)
            self.G.append(nn.Parameter(torch.zeros(rank, rank, num_tasks)))
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(b))

    def matrix_shape(self, name: str) -> tuple[int, int]:
        shape = self.shapes[name]
        return shape[0], math.prod(shape[1:])

    def delta(self, gamma: Tensor) -> dict[str, Tensor]:
        """Δ for each target. ``gamma``: ``[K]`` gives name -> ``[*shape]``; ``[M, K]`` gives ``[M, *shape]``."""
        if gamma.shape[-1:] != (self.num_tasks,) or gamma.ndim not in (1, 2):
            raise ValueError(f"gamma must be [K] or [M, K] with K={self.num_tasks}, got {tuple(gamma.shape)}")
        rows = gamma.reshape(-1, self.num_tasks)
        out = {}
        with tl.backend_context("pytorch"):
            for name, g, a, b in zip(self.names, self.G, self.A, self.B, strict=True):
                # Contract γ first (the cheapest mode), then the [r, r] core with A and B. The one-call
                # multi_mode_dot(G, [γ, A, B], modes=[2, 0, 1]) gives the same Δ but folds 3-D [m, n, M] tensors
                # through copies: far slower, forward and backward (benchmarks/README.md, bench_step.py's Δ table).
                cores = mode_dot(g, rows.to(g.dtype), mode=2)  # [r, r, M]
                d = [multi_mode_dot(cores[:, :, i], [a, b], modes=[0, 1]) for i in range(rows.shape[0])]  # [m, n]
                out[name] = d[0].reshape(self.shapes[name]) if gamma.ndim == 1 else \
                    torch.stack(d).reshape(rows.shape[0], *self.shapes[name])
        return out

    def cores(self) -> list[Tensor]:
        """The cores ``G^l``, which the Frobenius penalty acts on."""
        return list(self.G)

    def num_parameters(self) -> int:
        """``Σ (m+n)·r + r²·K`` over targets."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"targets={len(self.names)}, rank={self.rank}, num_tasks={self.num_tasks}, " \
               f"parameters={self.num_parameters()}"
