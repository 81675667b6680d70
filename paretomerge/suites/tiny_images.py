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


# ---------------------------------------------------------------------- the twelve added factors (issue 33)
# Factors beyond the eight the pretraining images show, for the 14- and 20-task sets. Each is a new element drawn over
# a task's own images (`PAINTERS`), from its own random stream, so the eight factors' images, the pretraining images and
# θ0 stay bit for bit what they were. θ0 never saw these elements, but every class is named with words the pretraining
# captions taught (a colour, a quadrant, a shape, a number, a size, an orientation): zero-shot transfer is partial, as
# CLIP's is on the datasets TALL adds (near chance on some, like KMNIST). Class names and prompts: `tiny_text`.
ADDED_FACTORS: dict[str, tuple[str, ...]] = {
    "frame": FACTORS["colour"],          # the colour of a 2-pixel frame around the image
    "digit_position": FACTORS["position"],  # the quadrant of a handwritten digit
    "objects": ("one", "two", "three", "four"),  # how many small circles
    "outline": FACTORS["shape"],         # the shape of a large hollow outline
    "ink": FACTORS["colour"],            # the colour of a handwritten digit's ink
    "band": FACTORS["stripes"],          # the orientation of one thick line through the image
    "dot_colour": FACTORS["colour"],     # the colour of one to four dots
    "digit_size": FACTORS["size"],       # the size of a handwritten digit
    "dot_size": FACTORS["size"],         # the size of three square dots
    "tint": FACTORS["colour"],           # a colour cast over the whole image
    "stripe_colour": FACTORS["colour"],  # the colour of thin stripes
    "glyph_count": ("one", "two", "three", "four"),  # how many small handwritten digits
}


@dataclass(frozen=True)
class AddedDomain(Domain):
    """An added factor's dataset: the base image (`Domain`'s fields) with the factor's element drawn over it."""


ADDED_DOMAINS: dict[str, AddedDomain] = {
    "frame": AddedDomain(("object",),
                         {"shape": 2, "colour": 3, "size": 0, "position": 3, "background": 1, "stripes": 2},
                         Style(noise=0.3)),
    "digit_position": AddedDomain((), {"background": 4, "stripes": 3}, Style(noise=0.3)),
    "objects": AddedDomain((), {"background": 0, "stripes": 2}, Style(noise=0.1)),
    "outline": AddedDomain((), {"background": 3, "stripes": 0}, Style(noise=0.35)),
    "ink": AddedDomain((), {"background": 2, "stripes": 1}, Style(noise=0.3)),
    "band": AddedDomain((), {"background": 1}, Style(noise=0.35, stripe_contrast=0.0)),
    "dot_colour": AddedDomain((), {"background": 0, "stripes": 3}, Style(noise=0.15)),
    "digit_size": AddedDomain((), {"background": 1, "stripes": 0}, Style(noise=0.2)),
    "dot_size": AddedDomain((), {"background": 2, "stripes": 2}, Style(noise=0.3)),
    "tint": AddedDomain(("object", "digit"), {}, Style(noise=0.3)),
    "stripe_colour": AddedDomain((), {"background": 0}, Style(noise=0.3, stripe_contrast=0.0)),
    "glyph_count": AddedDomain((), {"background": 4, "stripes": 1}, Style(noise=0.1)),
}

# The named task sets, each a superset of the one before (TALL's 8, 14 and 20, in spirit).
TASK_SETS: dict[str, tuple[str, ...]] = {
    "tiny8": tuple(FACTORS),
    "tiny14": tuple(FACTORS) + tuple(ADDED_FACTORS)[:6],
    "tiny20": tuple(FACTORS) + tuple(ADDED_FACTORS),
}
# Every task: its class names.
TASK_CLASSES: dict[str, tuple[str, ...]] = FACTORS | ADDED_FACTORS
# Bump when an added factor's drawing changes (part of the cache key of the suites that use one).
ADDED_GENERATOR_VERSION = 1
_PAINTER_STREAM = 20  # the painter's random stream is (seed, 20); render's own is seed


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
           style: Style = PRETRAINING_STYLE, fixed: dict[str, int] | None = None, painter: str | None = None) -> Images:
    """Draw ``num_images`` images with independent uniform factors. Deterministic in ``seed``.

    glyph_subset: "train" (the first 70% of the glyphs of each digit), "heldout" (the rest) or "all". The
                  adaptation, test and validation splits use held-out handwriting, as a real test set would.
    elements:     which of `ELEMENTS` to draw: names (every image), or a ``[N, 3]`` bool array (per image).
    style:        how the images look (`Style`).
    fixed:        factor -> class index held by every image.
    painter:      an added factor (`ADDED_FACTORS`) drawn over the image before the noise; its labels join ``factors``.
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
    masks = _shape_masks(dy, dx, half[:, None, None])  # [4 shapes, N, H, W]
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

    if painter is not None:  # an added factor, drawn from its own stream: the rest of the image is as without it
        painter_rng = np.random.default_rng([seed, _PAINTER_STREAM])
        f[painter], image = PAINTERS[painter](image.astype(np.float32), painter_rng, glyph_subset)
    image = image + rng.normal(0, style.noise, image.shape).astype(np.float32)
    image = (np.clip(image, 0, 1) - _MEAN) / _STD
    return Images(torch.from_numpy(image.astype(np.float32)), {k: torch.from_numpy(v) for k, v in f.items()},
                  torch.from_numpy(present))


def render_task(task: str, num_images: int, seed: int, glyph_subset: str = "heldout") -> Images:
    """``num_images`` images of ``task``'s dataset (`DOMAINS`, or `ADDED_DOMAINS` for an added factor)."""
    if task in ADDED_DOMAINS:
        domain = ADDED_DOMAINS[task]
        return render(num_images, seed, glyph_subset, domain.elements, domain.style, domain.fixed, painter=task)
    domain = DOMAINS[task]
    return render(num_images, seed, glyph_subset, domain.elements, domain.style, domain.fixed)


def _shape_masks(dy: np.ndarray, dx: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``[4, *dy.shape]`` bool: circle, square, triangle and cross of half extent ``s`` around offsets ``dy, dx``."""
    return np.stack([
        dx ** 2 + dy ** 2 <= s ** 2,
        np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * s,
        (dy <= s) & (np.abs(dx) <= (dy + s) / 2),
        ((np.abs(dx) <= s / 3) & (np.abs(dy) <= s)) | ((np.abs(dy) <= s / 3) & (np.abs(dx) <= s)),
    ])


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
    return _place(alpha, origin[:, 0], origin[:, 1])


def _place(alpha: np.ndarray, top: np.ndarray, left: np.ndarray) -> np.ndarray:
    """``[N, 32, 32]``: each ``alpha [N, h, w]`` with its top-left corner at ``(top, left)``, zero elsewhere."""
    n, h, w = alpha.shape
    rows = (top[:, None, None] + np.arange(h)[None, :, None]).repeat(w, axis=2)
    cols = (left[:, None, None] + np.arange(w)[None, None, :]).repeat(h, axis=1)
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


# ---------------------------------------------------------------------- the added factors' painters
# Each: (image [N, 3, 32, 32] before noise, its own rng, glyph subset) -> (labels [N], image). Colours are the object's
# palette (`_OBJECT_RGB`), with a little jitter as the object's have.
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def _colour_of(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (_OBJECT_RGB[labels] + rng.uniform(-0.05, 0.05, (len(labels), 3)).astype(np.float32))[:, :, None, None]


def _paint(image: np.ndarray, mask: np.ndarray, colour: np.ndarray | float) -> np.ndarray:
    return np.where(mask[:, None], colour, image).astype(np.float32)


def _ink(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray | float = 1.0) -> np.ndarray:
    return (image * (1 - alpha[:, None]) + alpha[:, None] * colour).astype(np.float32)


def _glyph_bank(size: int, subset: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """``[N, size, size]`` random handwritten digits (ink opacity), resized to ``size``."""
    glyphs, digits = _glyphs()
    labels = rng.integers(0, 10, n)
    canvas = _digit_ink(glyphs, digits, labels, np.zeros(n, dtype=np.int64), rng, subset)[:, :_GLYPH_SIZE, :_GLYPH_SIZE]
    if size == _GLYPH_SIZE:
        return canvas
    resized = torch.nn.functional.interpolate(torch.from_numpy(canvas)[:, None], size=(size, size), mode="bilinear",
                                              align_corners=False)
    return resized[:, 0].clamp(0, 1).numpy()


def _quadrant_corner(quadrant: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners placing a ``size`` square inside each quadrant, jittered where there is room."""
    origin = np.asarray(_QUADRANT_ORIGIN)[quadrant]
    slack = 16 - size
    jitter = rng.integers(0, slack + 1, (len(quadrant), 2)) if slack > 0 else np.zeros((len(quadrant), 2), int)
    return origin[:, 0] + jitter[:, 0], origin[:, 1] + jitter[:, 1]


def _distinct_quadrants(n: int, rng: np.random.Generator) -> np.ndarray:
    """``[N, 4]``: a random order of the four quadrants per image."""
    return rng.permuted(np.tile(np.arange(4), (n, 1)), axis=1)


def _frame(image, rng, subset):
    labels = rng.integers(0, 6, len(image))
    border = (_YY < 2) | (_YY >= IMAGE_SIZE - 2) | (_XX < 2) | (_XX >= IMAGE_SIZE - 2)
    return labels, _paint(image, np.broadcast_to(border, (len(image),) + border.shape), _colour_of(labels, rng))


def _digit_position(image, rng, subset):
    labels = rng.integers(0, 4, len(image))
    top, left = _quadrant_corner(labels, _GLYPH_SIZE, rng)
    return labels, _ink(image, _place(_glyph_bank(_GLYPH_SIZE, subset, rng, len(image)), top, left))


def _objects(image, rng, subset):
    n = len(image)
    labels = rng.integers(0, 4, n)
    order = _distinct_quadrants(n, rng)
    mask = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for slot in range(4):
        origin = np.asarray(_QUADRANT_ORIGIN, dtype=np.float32)[order[:, slot]]
        cy = origin[:, 0] + 7.5 + rng.uniform(-2, 2, n).astype(np.float32)
        cx = origin[:, 1] + 7.5 + rng.uniform(-2, 2, n).astype(np.float32)
        disc = (_YY[None] - cy[:, None, None]) ** 2 + (_XX[None] - cx[:, None, None]) ** 2 <= 3.2 ** 2
        mask |= disc & (slot <= labels)[:, None, None]
    return labels, _paint(image, mask, 0.95)


def _outline(image, rng, subset):
    n = len(image)
    labels = rng.integers(0, 4, n)
    cy = 15.5 + rng.uniform(-2, 2, n).astype(np.float32)
    cx = 15.5 + rng.uniform(-2, 2, n).astype(np.float32)
    dy, dx = _YY[None] - cy[:, None, None], _XX[None] - cx[:, None, None]
    outer = _shape_masks(dy, dx, np.float32(11.0))[labels, np.arange(n)]
    inner = _shape_masks(dy, dx, np.float32(8.0))[labels, np.arange(n)]
    return labels, _paint(image, outer & ~inner, 0.95)


def _ink_colour(image, rng, subset):
    n = len(image)
    labels = rng.integers(0, 6, n)
    top, left = _quadrant_corner(rng.integers(0, 4, n), _GLYPH_SIZE, rng)
    return labels, _ink(image, _place(_glyph_bank(_GLYPH_SIZE, subset, rng, n), top, left), _colour_of(labels, rng))


def _band(image, rng, subset):
    n = len(image)
    labels = rng.integers(0, 4, n)
    cy = 15.5 + rng.uniform(-6, 6, n).astype(np.float32)[:, None, None]
    cx = 15.5 + rng.uniform(-6, 6, n).astype(np.float32)[:, None, None]
    dy, dx = _YY[None] - cy, _XX[None] - cx
    distance = np.stack([np.abs(dy), np.abs(dx), np.abs(dy + dx) / np.sqrt(2), np.abs(dy - dx) / np.sqrt(2)])
    return labels, _paint(image, distance[labels, np.arange(n)] <= 1.6, 0.95)


def _dot_colour(image, rng, subset):
    n = len(image)
    labels = rng.integers(0, 6, n)
    quadrants = _distinct_quadrants(n, rng)[:, :2]
    return labels, _paint(image, _dots(rng.integers(1, 5, n), quadrants, rng), _colour_of(labels, rng))


def _digit_size(image, rng, subset):
    n = len(image)
    labels = rng.integers(0, 3, n)
    quadrant = rng.integers(0, 4, n)
    alpha = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for k, size in enumerate((8, 12, 16)):
        top, left = _quadrant_corner(quadrant, size, rng)
        alpha = np.where((labels == k)[:, None, None], _place(_glyph_bank(size, subset, rng, n), top, left), alpha)
    return labels, _ink(image, alpha)


def _dot_size(image, rng, subset):
    n = len(image)
    labels = rng.integers(0, 3, n)
    half = np.asarray([0.6, 1.6, 2.6], dtype=np.float32)[labels][:, None, None]
    cells = np.argsort(rng.random((n, 16)), axis=1)[:, :3]  # three of the 16 8×8 cells
    mask = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for c in range(3):
        cy = (8 * (cells[:, c] // 4) + 3.5)[:, None, None]
        cx = (8 * (cells[:, c] % 4) + 3.5)[:, None, None]
        mask |= np.maximum(np.abs(_YY[None] - cy), np.abs(_XX[None] - cx)) <= half
    return labels, _paint(image, mask, 0.95)


def _tint(image, rng, subset):
    labels = rng.integers(0, 6, len(image))
    return labels, (0.6 * image + 0.4 * _colour_of(labels, rng)).astype(np.float32)


def _stripe_colour(image, rng, subset):
    n = len(image)
    labels = rng.integers(0, 6, n)
    orientation = rng.integers(0, 4, n)
    projections = np.stack([_YY, _XX, _YY + _XX, _YY - _XX])[orientation]
    phase = rng.uniform(0, _STRIPE_PERIOD, n).astype(np.float32)[:, None, None]
    lines = np.mod(projections + phase, _STRIPE_PERIOD) < 1.5
    return labels, _paint(image, lines, _colour_of(labels, rng))


def _glyph_count(image, rng, subset):
    n = len(image)
    labels = rng.integers(0, 4, n)
    order = _distinct_quadrants(n, rng)
    alpha = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for slot in range(4):
        top, left = _quadrant_corner(order[:, slot], 11, rng)
        glyph = _place(_glyph_bank(11, subset, rng, n), top, left)
        alpha = np.maximum(alpha, glyph * (slot <= labels)[:, None, None])
    return labels, _ink(image, alpha)


PAINTERS = {"frame": _frame, "digit_position": _digit_position, "objects": _objects, "outline": _outline,
            "ink": _ink_colour, "band": _band, "dot_colour": _dot_colour, "digit_size": _digit_size,
            "dot_size": _dot_size, "tint": _tint, "stripe_colour": _stripe_colour, "glyph_count": _glyph_count}
