"""The TinySuite's procedural images: one generator with eight independent factors, one task per factor.

A 3×32×32 image holds a striped background (hue, stripe orientation) and up to three elements: an object (shape,
colour, size, quadrant), a handwritten digit glyph from scikit-learn's bundled ``load_digits`` in another quadrant, and
a few white dots in the remaining two (count). All factors are drawn independently and uniformly, so a label tells
nothing about the other factors. Everything comes from a ``numpy`` seed.

Two kinds of images come from it, as in CLIP's setting:
- **pretraining images** (the "web"): every factor varies, each element is present or not, in `PRETRAINING_STYLE`;
- **each task's dataset** (`DOMAINS`): the factor it labels varies and the others are held fixed, and the images are
  noisier than the pretraining ones, each dataset by its own amount. Zero-shot transfer to them is real but well below
  fine-tuning, and a task vector learned on one dataset barely touches the others' images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

IMAGE_SIZE = 32
# Bump when the rendering or the build code changes: it is part of the cache key of every built suite.
GENERATOR_VERSION = 3

# factor -> class names, as the captions and the zero-shot prompts say them. The order is the default task order.
FACTORS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross"),
    "colour": ("red", "green", "blue", "yellow", "magenta", "cyan"),
    "digit": tuple(str(d) for d in range(10)),
    "position": ("top left", "top right", "bottom left", "bottom right"),
    "stripes": ("horizontal", "vertical", "diagonal", "antidiagonal"),
    "size": ("small", "medium", "large"),
    "count": ("one dot", "two dots", "three dots", "four dots"),
    "background": ("grey", "navy", "forest", "maroon", "plum"),
}
ELEMENTS = ("object", "digit", "dots")
# The factors each element carries; the background (stripes, hue) is in every image.
ELEMENT_FACTORS = {"object": ("shape", "colour", "size", "position"), "digit": ("digit",), "dots": ("count",)}

_OBJECT_RGB = np.array([[0.95, 0.1, 0.1], [0.1, 0.9, 0.1], [0.2, 0.35, 1.0], [0.95, 0.95, 0.1],
                        [0.95, 0.1, 0.95], [0.1, 0.95, 0.95]], dtype=np.float32)
_BACKGROUND_RGB = np.array([[0.35, 0.35, 0.35], [0.15, 0.2, 0.45], [0.15, 0.4, 0.2], [0.45, 0.15, 0.15],
                            [0.35, 0.15, 0.4]], dtype=np.float32)
_HALF_EXTENT = (4.0, 5.5, 7.0)  # object size classes, pixels from the centre
_QUADRANT_ORIGIN = ((0, 0), (0, 16), (16, 0), (16, 16))  # (row, col) of each 16×16 quadrant
_STRIPE_PERIOD = 6
_GLYPH_SIZE = 16
# Normalisation to roughly zero mean, unit variance.
_MEAN, _STD = 0.3, 0.25


@dataclass(frozen=True)
class Style:
    """How the images look. The pretraining images use the defaults; each task's dataset changes one or two."""

    noise: float = 0.04  # std of the Gaussian pixel noise (pixels in [0, 1])
    stripe_contrast: float = 0.35  # the stripes' brightness swing around the background hue
    dot_value: float = 1.0  # the dots' brightness
    background_grey: float = 0.0  # how far each background hue is moved towards its own grey


PRETRAINING_STYLE = Style()


@dataclass(frozen=True)
class Domain:
    """One task's dataset: which elements its images show, the factors held fixed (factor -> class index), and how
    they look."""

    elements: tuple[str, ...]
    fixed: dict[str, int] = field(default_factory=dict)
    style: Style = PRETRAINING_STYLE


# Each task is its own dataset, as CLIP's benchmark tasks are: its images vary the factor it labels and hold the
# others fixed (a different setting per dataset), and they are noisier than the pretraining images, or their dots
# dimmer, or their background hues greyer: the evidence for the label is weaker, not moved to another class. How much
# was chosen by measurement (docs/tiny-suite.md, and benchmarks/README.md, "suite_regime.py").
DOMAINS: dict[str, Domain] = {
    "shape": Domain(("object",), {"colour": 3, "size": 2, "position": 0, "background": 0, "stripes": 0},
                    Style(noise=0.35)),
    "colour": Domain(("object",), {"shape": 0, "size": 2, "position": 1, "background": 0, "stripes": 1},
                     Style(noise=0.4)),
    "digit": Domain(("digit",), {"background": 3, "stripes": 0}, Style(noise=0.25)),
    "position": Domain(("object",), {"shape": 3, "colour": 4, "size": 1, "background": 2, "stripes": 3},
                       Style(noise=0.45)),
    "stripes": Domain((), {"background": 0}, Style(noise=0.45)),
    "size": Domain(("object",), {"shape": 1, "colour": 5, "position": 2, "background": 1, "stripes": 2},
                   Style(noise=0.45)),
    "count": Domain(("dots",), {"background": 4, "stripes": 1}, Style(dot_value=0.87)),
    "background": Domain((), {"stripes": 2}, Style(background_grey=0.55)),
}


@lru_cache(maxsize=1)
def _glyphs() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 ``load_digits`` glyphs upsampled to 16×16 in [0, 1], and their digits."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    up = torch.nn.functional.interpolate(images, size=(_GLYPH_SIZE, _GLYPH_SIZE), mode="bilinear",
                                         align_corners=False)
    return up.squeeze(1).clamp(0, 1).numpy(), digits.target.astype(np.int64)


@dataclass(frozen=True)
class Images:
    """``images [N, 3, 32, 32]`` float32, normalised; ``factors`` name -> labels ``[N]`` int64; ``present [N, 3]``
    bool, which of `ELEMENTS` each image shows (a factor of an absent element is drawn but invisible)."""

    images: torch.Tensor
    factors: dict[str, torch.Tensor]
    present: torch.Tensor

    def visible(self) -> torch.Tensor:
        """``[N, F]`` bool (F in `FACTORS` order): whether each factor can be seen in each image."""
        columns = []
        for factor in FACTORS:
            owner = next((i for i, e in enumerate(ELEMENTS) if factor in ELEMENT_FACTORS[e]), None)
            columns.append(torch.ones(len(self.present), dtype=torch.bool) if owner is None else self.present[:, owner])
        return torch.stack(columns, dim=1)


def render(num_images: int, seed: int, glyph_subset: str = "all", elements: tuple[str, ...] | np.ndarray = ELEMENTS,
           style: Style = PRETRAINING_STYLE, fixed: dict[str, int] | None = None) -> Images:
    """Draw ``num_images`` images with independent uniform factors. Deterministic in ``seed``.

    glyph_subset: "train" (the first 70% of the glyphs of each digit), "heldout" (the rest) or "all". The
                  adaptation, test and validation splits use held-out handwriting, as a real test set would.
    elements:     which of `ELEMENTS` to draw: names (every image), or a ``[N, 3]`` bool array (per image).
    style:        how the images look (`Style`).
    fixed:        factor -> class index held by every image.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    rng = np.random.default_rng(seed)
    n = num_images
    present = np.asarray(elements, dtype=bool) if isinstance(elements, np.ndarray) else \
        np.tile(np.array([e in elements for e in ELEMENTS]), (n, 1))
    f = {name: rng.integers(0, len(classes), n) for name, classes in FACTORS.items()}
    for name, value in (fixed or {}).items():
        f[name][:] = value
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)

    # Background: hue times a square-wave stripe pattern in one of four orientations.
    projections = np.stack([yy, xx, yy + xx, yy - xx])  # [4, H, W]
    phase = rng.uniform(0, _STRIPE_PERIOD, n).astype(np.float32)
    wave = np.sign(np.sin(2 * np.pi * (projections[f["stripes"]] + phase[:, None, None]) / _STRIPE_PERIOD + 0.5))
    brightness = 1.0 + style.stripe_contrast * wave  # [N, H, W]
    palette = (1 - style.background_grey) * _BACKGROUND_RGB + style.background_grey * _BACKGROUND_RGB.mean(
        1, keepdims=True)
    hue = palette[f["background"]] * rng.uniform(0.85, 1.15, (n, 1)).astype(np.float32)
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
    obj = masks[f["shape"], np.arange(n)] & present[:, 0, None, None]
    colour = _OBJECT_RGB[f["colour"]] + rng.uniform(-0.05, 0.05, (n, 3)).astype(np.float32)
    image = np.where(obj[:, None], colour[:, :, None, None], image)

    # The other three quadrants, in a random order: the digit goes in the first, the dots in the other two.
    others = np.array([[q for q in range(4) if q != p] for p in range(4)])[f["position"]]  # [N, 3]
    others = np.take_along_axis(others, rng.permuted(np.tile(np.arange(3), (n, 1)), axis=1), axis=1)
    glyphs, digits = _glyphs()
    digit_ink = _digit_ink(glyphs, digits, f["digit"], others[:, 0], rng, glyph_subset) * present[:, 1, None, None]
    image = image * (1 - digit_ink[:, None]) + digit_ink[:, None]
    dots = _dots(f["count"] + 1, others[:, 1:], rng) & present[:, 2, None, None]
    image = np.where(dots[:, None], style.dot_value, image)

    image = image + rng.normal(0, style.noise, image.shape).astype(np.float32)
    image = (np.clip(image, 0, 1) - _MEAN) / _STD
    return Images(torch.from_numpy(image.astype(np.float32)), {k: torch.from_numpy(v) for k, v in f.items()},
                  torch.from_numpy(present))


def render_task(task: str, num_images: int, seed: int, glyph_subset: str = "heldout") -> Images:
    """``num_images`` images of ``task``'s dataset (`DOMAINS`)."""
    domain = DOMAINS[task]
    return render(num_images, seed, glyph_subset, domain.elements, domain.style, domain.fixed)


def _digit_ink(glyphs: np.ndarray, digits: np.ndarray, labels: np.ndarray, quadrant: np.ndarray,
               rng: np.random.Generator, subset: str) -> np.ndarray:
    """``[N, 32, 32]``: the white ink (opacity in [0, 1]) of one glyph of each label, in its quadrant."""
    n = len(labels)
    choice = np.empty(n, dtype=np.int64)
    for d in range(10):
        pool = np.flatnonzero(digits == d)
        cut = int(round(0.7 * len(pool)))
        pool = {"train": pool[:cut], "heldout": pool[cut:], "all": pool}[subset]
        where = np.flatnonzero(labels == d)
        choice[where] = pool[rng.integers(0, len(pool), len(where))]
    alpha = glyphs[choice] * rng.uniform(0.75, 1.0, (n, 1, 1)).astype(np.float32)  # [N, 16, 16]
    origin = np.asarray(_QUADRANT_ORIGIN)[quadrant]
    span = np.arange(_GLYPH_SIZE)
    rows = (origin[:, 0, None, None] + span[None, :, None]).repeat(_GLYPH_SIZE, axis=2)
    cols = (origin[:, 1, None, None] + span[None, None, :]).repeat(_GLYPH_SIZE, axis=1)
    canvas = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    canvas[np.arange(n)[:, None, None], rows, cols] = alpha
    return canvas


def _dots(counts: np.ndarray, quadrants: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[N, 32, 32]`` bool: ``counts`` 3×3 dots in the two ``quadrants``, each in its own 4×4 cell."""
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
    return ink
