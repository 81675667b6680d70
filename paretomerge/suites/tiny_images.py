"""The TinySuite's procedural images: one generator with eight independent factors, one task per factor.

Every 3×32×32 image holds a striped background (hue, stripe orientation), one object (shape, colour, size,
quadrant), a handwritten digit glyph from scikit-learn's bundled ``load_digits`` in another quadrant, and a
few white dots in the remaining two quadrants (count). All factors are drawn independently and uniformly,
so a task's label tells nothing about the other factors. Everything comes from a ``numpy`` seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

IMAGE_SIZE = 32
# Bump when the rendering or the build code changes: it is part of the cache key of every built suite.
GENERATOR_VERSION = 2

# factor -> class names. The order is the default task order; `tasks` may pick any subset of 2 or more.
FACTORS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross"),
    "colour": ("red", "green", "blue", "yellow", "magenta", "cyan"),
    "digit": tuple(str(d) for d in range(10)),
    "position": ("top-left", "top-right", "bottom-left", "bottom-right"),
    "stripes": ("horizontal", "vertical", "diagonal", "anti-diagonal"),
    "size": ("small", "medium", "large"),
    "count": ("1", "2", "3", "4"),
    "background": ("grey", "blue", "green", "red", "purple"),
}

# Coarse binary attributes of each factor (class -> group), the pretext's labels: they teach the visual
# primitives (parity of a digit, warm or cool colour, axis-aligned or diagonal stripes...) without the classes.
# Position has none: it changes under the pretext's rotations (the quadrant layout covers it).
COARSE: dict[str, tuple[int, ...]] = {
    "shape": (0, 1, 1, 0),
    "colour": (0, 1, 1, 0, 0, 1),
    "digit": (0, 1, 0, 1, 0, 1, 0, 1, 0, 1),
    "stripes": (0, 0, 1, 1),
    "size": (0, 1, 1),
    "count": (1, 0, 1, 0),
    "background": (0, 0, 1, 1, 1),
}

_OBJECT_RGB = np.array([[0.95, 0.1, 0.1], [0.1, 0.9, 0.1], [0.2, 0.35, 1.0], [0.95, 0.95, 0.1],
                        [0.95, 0.1, 0.95], [0.1, 0.95, 0.95]], dtype=np.float32)
_BACKGROUND_RGB = np.array([[0.35, 0.35, 0.35], [0.15, 0.2, 0.45], [0.15, 0.4, 0.2], [0.45, 0.15, 0.15],
                            [0.35, 0.15, 0.4]], dtype=np.float32)
_HALF_EXTENT = (4.0, 5.5, 7.0)  # object size classes, pixels from the centre
_QUADRANT_ORIGIN = ((0, 0), (0, 16), (16, 0), (16, 16))  # (row, col) of each 16×16 quadrant
_STRIPE_PERIOD = 6
_GLYPH_SIZE = 16
_NOISE_STD = 0.04
# Normalisation to roughly zero mean, unit variance.
_MEAN, _STD = 0.3, 0.25


@lru_cache(maxsize=1)
def _glyphs() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 ``load_digits`` glyphs upsampled to 12×12 in [0, 1], and their digits."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    up = torch.nn.functional.interpolate(images, size=(_GLYPH_SIZE, _GLYPH_SIZE), mode="bilinear",
                                         align_corners=False)
    return up.squeeze(1).clamp(0, 1).numpy(), digits.target.astype(np.int64)


@dataclass(frozen=True)
class Images:
    """``images [N, 3, 32, 32]`` float32, normalised; ``factors`` name -> labels ``[N]`` int64;
    ``layout [N, 4]``: what each quadrant holds (0 object, 1 digit, 2 dots, 3 nothing), the pretext's labels."""

    images: torch.Tensor
    factors: dict[str, torch.Tensor]
    layout: torch.Tensor


def render(num_images: int, seed: int, glyph_subset: str = "all") -> Images:
    """Draw ``num_images`` images with independent uniform factors. Deterministic in ``seed``.

    glyph_subset: "train" (the first 70% of the glyphs of each digit), "heldout" (the rest) or "all". The
    adaptation, test and validation splits use held-out handwriting, as a real test set would.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    rng = np.random.default_rng(seed)
    n = num_images
    f = {name: rng.integers(0, len(classes), n) for name, classes in FACTORS.items()}
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)

    # Background: hue times a square-wave stripe pattern in one of four orientations.
    projections = np.stack([yy, xx, yy + xx, yy - xx])  # [4, H, W]
    phase = rng.uniform(0, _STRIPE_PERIOD, n).astype(np.float32)
    wave = np.sign(np.sin(2 * np.pi * (projections[f["stripes"]] + phase[:, None, None]) / _STRIPE_PERIOD + 0.5))
    brightness = 1.0 + 0.35 * wave  # [N, H, W]
    hue = _BACKGROUND_RGB[f["background"]] * rng.uniform(0.85, 1.15, (n, 1)).astype(np.float32)
    image = hue[:, :, None, None] * brightness[:, None]

    # The object: a shape of one size and colour, near the centre of its quadrant.
    half = np.asarray(_HALF_EXTENT, dtype=np.float32)[f["size"]]
    origin = np.asarray(_QUADRANT_ORIGIN, dtype=np.float32)[f["position"]]
    cy = origin[:, 0] + 7.5 + rng.uniform(-1, 1, n).astype(np.float32)
    cx = origin[:, 1] + 7.5 + rng.uniform(-1, 1, n).astype(np.float32)
    dy = yy[None] - cy[:, None, None]
    dx = xx[None] - cx[:, None, None]
    s = half[:, None, None]
    masks = np.stack([
        dx ** 2 + dy ** 2 <= s ** 2,
        np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * s,
        (dy <= s) & (np.abs(dx) <= (dy + s) / 2),
        ((np.abs(dx) <= s / 3) & (np.abs(dy) <= s)) | ((np.abs(dy) <= s / 3) & (np.abs(dx) <= s)),
    ])  # [4 shapes, N, H, W]
    obj = masks[f["shape"], np.arange(n)]
    colour = _OBJECT_RGB[f["colour"]] + rng.uniform(-0.05, 0.05, (n, 3)).astype(np.float32)
    image = np.where(obj[:, None], colour[:, :, None, None], image)

    # The other three quadrants, in a random order: the digit goes in the first, the dots in the other two.
    others = np.array([[q for q in range(4) if q != p] for p in range(4)])[f["position"]]  # [N, 3]
    others = np.take_along_axis(others, rng.permuted(np.tile(np.arange(3), (n, 1)), axis=1), axis=1)
    glyphs, digits = _glyphs()
    image = _paste_digits(image, glyphs, digits, f["digit"], others[:, 0], rng, glyph_subset)
    image, dotted = _paste_dots(image, f["count"] + 1, others[:, 1:], rng)
    layout = np.full((n, 4), 3, dtype=np.int64)
    rows = np.arange(n)
    layout[rows, f["position"]] = 0
    layout[rows, others[:, 0]] = 1
    layout[rows[:, None].repeat(2, 1)[dotted], others[:, 1:][dotted]] = 2

    image = image + rng.normal(0, _NOISE_STD, image.shape).astype(np.float32)
    image = (np.clip(image, 0, 1) - _MEAN) / _STD
    return Images(torch.from_numpy(image.astype(np.float32)), {k: torch.from_numpy(v) for k, v in f.items()},
                  torch.from_numpy(layout))


def _paste_digits(image: np.ndarray, glyphs: np.ndarray, digits: np.ndarray, labels: np.ndarray,
                  quadrant: np.ndarray, rng: np.random.Generator, subset: str) -> np.ndarray:
    n = len(labels)
    choice = np.empty(n, dtype=np.int64)
    for d in range(10):
        pool = np.flatnonzero(digits == d)
        cut = int(round(0.7 * len(pool)))
        pool = {"train": pool[:cut], "heldout": pool[cut:], "all": pool}[subset]
        where = np.flatnonzero(labels == d)
        choice[where] = pool[rng.integers(0, len(pool), len(where))]
    alpha = glyphs[choice] * rng.uniform(0.75, 1.0, (n, 1, 1)).astype(np.float32)  # white ink, [N, 12, 12]
    origin = np.asarray(_QUADRANT_ORIGIN)[quadrant] + rng.integers(0, 16 - _GLYPH_SIZE + 1, (n, 2))
    span = np.arange(_GLYPH_SIZE)
    rows = (origin[:, 0, None, None] + span[None, :, None]).repeat(_GLYPH_SIZE, axis=2)
    cols = (origin[:, 1, None, None] + span[None, None, :]).repeat(_GLYPH_SIZE, axis=1)
    canvas = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    canvas[np.arange(n)[:, None, None], rows, cols] = alpha
    return image * (1 - canvas[:, None]) + canvas[:, None]


def _paste_dots(image: np.ndarray, counts: np.ndarray, quadrants: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The image with the dots, and which of the two ``quadrants`` received any ``[N, 2]``."""
    # The two quadrants hold 4×4 cells of 4×4 pixels each; every dot (3×3, white) takes a distinct cell.
    n = len(counts)
    cells = np.argsort(rng.random((n, 32)), axis=1)[:, :4]  # 4 distinct cells; the first `count` are drawn
    quadrant = np.take_along_axis(quadrants, cells // 16, axis=1)  # [N, 4]
    origin = np.asarray(_QUADRANT_ORIGIN)[quadrant]  # [N, 4, 2]
    top = origin[..., 0] + 4 * ((cells % 16) // 4)  # 3×3 dots in 4×4 cells never touch
    left = origin[..., 1] + 4 * (cells % 4)
    drawn = np.arange(4)[None] < counts[:, None]
    ink = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    i = np.nonzero(drawn)
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            ink[i[0], top[i] + dr, left[i] + dc] = True
    dotted = np.stack([((cells // 16 == side) & drawn).any(1) for side in (0, 1)], axis=1)
    return np.where(ink[:, None], 1.0, image).astype(np.float32), dotted
