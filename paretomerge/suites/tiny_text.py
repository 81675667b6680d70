"""The TinySuite's words: generated captions for pretraining, prompt templates for the zero-shot heads (the class
names are `tiny_images.FACTORS`), the unseen tasks, and a word-level tokenizer for a vocabulary of ~100 words.

Captions describe an image the way web alt-text describes a photo: partially and unevenly. Each visible factor is named
with its own probability (the object's shape often, its colour rarely), in one of several phrasings and orders. The
prompts reuse the caption words in other sentences, as CLIP's prompt templates do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from paretomerge.suites.tiny_images import FACTORS

# Tasks with a zero-shot head and no fine-tuned model (the Pareto Merging paper's unseen tasks, §4.3): coarse
# relabellings of a factor, on that factor's dataset. name -> (factor, class of each of the factor's classes, names).
UNSEEN: dict[str, tuple[str, tuple[int, ...], tuple[str, ...]]] = {
    "warmth": ("colour", (0, 1, 1, 0, 0, 1), ("warm", "cool")),
    "parity": ("digit", (0, 1, 0, 1, 0, 1, 0, 1, 0, 1), ("even", "odd")),
}
_COARSE_RATE = 0.1  # how often a caption also uses the coarse word (warm or cool, even or odd) of a visible factor

# Prompt templates per task, in the style of CLIP's: what the image shows, in a few phrasings. "{}" is the class name.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": ("a photo of a {}.", "a picture of a {} shape.", "an image with a {} in it."),
    "colour": ("a photo of a {} shape.", "a picture of a {} object.", "an image of something {}."),
    "digit": ("a photo of the digit {}.", "a handwritten {}.", "an image of the number {}."),
    "position": ("a photo of a shape in the {}.", "an object at the {}.", "a picture with something in the {} corner."),
    "stripes": ("a photo with {} stripes.", "a picture of a {} striped background.", "an image with {} lines."),
    "size": ("a photo of a {} shape.", "a picture of a {} object.", "an image of something {}."),
    "count": ("a photo of {}.", "a picture with {}.", "an image of {} on a background."),
    "background": ("a photo on a {} background.", "a shape on a {} background.", "an image with a {} backdrop."),
    "warmth": ("a photo of a {} coloured shape.", "a picture of an object in {} colours."),
    "parity": ("a photo of an {} number.", "a handwritten {} digit."),
}

# The added factors' prompts (`tiny_images.ADDED_FACTORS`). They use only words of the pretraining vocabulary (tested),
# and are kept out of `TEMPLATES` so that the vocabulary, the text tower and θ0 stay what they were. Some must describe
# a new element with old words ("a picture in red colours" for a red frame): zero-shot transfer is partial by design.
ADDED_TEMPLATES: dict[str, tuple[str, ...]] = {
    "frame": ("a photo of something {}.", "a picture in {} colours.", "a {} coloured image."),
    "digit_position": ("a handwritten digit in the {}.", "a photo of a number at the {}.",
                       "the digit in the {} corner."),
    "objects": ("a photo of {} shape.", "a picture with {} object.", "an image of {} thing."),
    "outline": ("a photo of a {}.", "a picture of a {} shape.", "a drawing of a {}."),
    "ink": ("a {} handwritten digit.", "a photo of the number in {}.", "a {} coloured digit."),
    "band": ("a photo with {} lines.", "a picture of {} stripes.", "an image with a {} thing."),
    "dot_colour": ("a photo of {} dots.", "a picture with {} dots.", "an image of a {} dot."),
    "digit_size": ("a photo of a {} digit.", "a {} handwritten number.", "an image of a {} number."),
    "dot_size": ("a photo of {} dots.", "a picture with {} dots.", "an image of a {} dot."),
    "tint": ("an image in {} colours.", "a {} coloured picture.", "a photo of something {}."),
    "stripe_colour": ("a photo with {} stripes.", "a picture with {} lines.", "an image with a {} striped background."),
    "glyph_count": ("a photo of {} digit.", "a picture with {} handwritten number.", "an image of {} number."),
}

_PREFIXES = ("", "a photo of", "an image of", "a picture of", "a drawing of", "a photo with", "an image with")
_NOUNS = ("shape", "object", "thing")
_SPECIAL = ("<pad>", "<unk>")  # ids 0 and 1; <sot> and <eot> take the last two ids


def _caption_words() -> list[str]:
    words = set()
    for names in FACTORS.values():
        for name in names:
            words.update(name.split())
    for _, _, names in UNSEEN.values():
        words.update(names)
    for templates in TEMPLATES.values():
        for template in templates:
            words.update(_split(template.replace("{}", "")))
    for phrase in _PREFIXES + _NOUNS:
        words.update(phrase.split())
    words.update(["a", "an", "the", "in", "at", "on", "with", "and", "of", "digit", "number", "handwritten",
                  "background", "stripes"])
    return sorted(words)


def _split(text: str) -> list[str]:
    return text.lower().replace(".", " ").replace(",", " ").replace('"', " ").split()


class WordTokenizer:
    """open_clip's tokenizer interface for a closed vocabulary: ``tokenizer(texts) -> [N, context_length]`` int64,
    ``<sot> words... <eot>`` then ``<pad>`` (0), ``<eot>`` the highest id as in CLIP's BPE tokenizer. Words outside the
    vocabulary become ``<unk>``; a text longer than the context is cut and still ends with ``<eot>``."""

    def __init__(self, context_length: int = 24, words: Sequence[str] | None = None) -> None:
        words = list(words) if words is not None else _caption_words()
        self.itos = list(_SPECIAL) + words + ["<sot>", "<eot>"]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        unk, sot, eot = self.stoi["<unk>"], self.stoi["<sot>"], self.stoi["<eot>"]
        for row, text in enumerate(texts):
            ids = [sot] + [self.stoi.get(w, unk) for w in _split(text)][: self.context_length - 2] + [eot]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def captions(factors: Mapping[str, Tensor], seed: int, mention: Mapping[str, float],
             visible: Tensor | None = None) -> tuple[list[str], Tensor]:
    """One caption per image, and what it names of each factor ``[N, F]`` (the class index, -1 where it names none; F in
    `FACTORS` order).

    factors: name -> labels ``[N]`` (`tiny_images.render`).
    mention: factor -> the chance that a caption names it.
    visible: ``[N, F]`` bool, the factors each image shows (`Images.visible`); a caption names only those.

    Every caption names at least one visible factor. The coarse words of the unseen tasks (warm or cool, even or odd)
    come with a visible colour or digit in 10% of captions. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    names = list(FACTORS)
    n = len(next(iter(factors.values())))
    values = np.stack([factors[f].numpy() for f in names], axis=1)  # [N, F]
    seen = visible.numpy() if visible is not None else np.ones((n, len(names)), dtype=bool)
    probabilities = np.array([mention.get(f, 0.0) for f in names])[None] * seen
    named = rng.random((n, len(names))) < probabilities
    for i in np.flatnonzero(~named.any(1)):  # name one visible factor, drawn in proportion to the probabilities
        named[i, rng.choice(len(names), p=probabilities[i] / probabilities[i].sum())] = True
    coarse = {task: (rng.random(n) < _COARSE_RATE) & seen[:, names.index(factor)]
              for task, (factor, _, _) in UNSEEN.items()}
    order = rng.permuted(np.tile(np.arange(4), (n, 1)), axis=1)  # the clauses' order
    choices = rng.integers(0, 1 << 30, (n, 4))
    out = []
    for i in range(n):
        said = {f: FACTORS[f][values[i, j]] for j, f in enumerate(names) if named[i, j]}
        coarse_word = {task: UNSEEN[task][2][UNSEEN[task][1][values[i, names.index(UNSEEN[task][0])]]]
                       for task in UNSEEN if coarse[task][i]}
        pick = choices[i]
        adjectives = [coarse_word["warmth"]] if "warmth" in coarse_word else []
        adjectives += [said[f] for f in ("size", "colour") if f in said]
        thing = None
        if adjectives or {"shape", "position"} & set(said):
            noun = said.get("shape", _NOUNS[pick[0] % len(_NOUNS)])
            thing = " ".join(["a", *adjectives, noun]) + (f" in the {said['position']}" if "position" in said else "")
        clauses = []
        if "background" in said:
            clauses.append(f"on a {said['background']} background")
        if "stripes" in said:
            clauses.append(f"with {said['stripes']} stripes")
        if "digit" in said:
            clauses.append(("the digit ", "the number ", "a handwritten ")[pick[1] % 3] + said["digit"])
        elif "parity" in coarse_word:
            clauses.append(f"an {coarse_word['parity']} number")
        if "count" in said:
            clauses.append(said["count"])
        clauses = [clauses[k] for k in order[i] if k < len(clauses)]
        parts = ([thing] if thing else []) + clauses
        prefix = _PREFIXES[pick[2] % len(_PREFIXES)]
        joiner = (" and ", ", ")[pick[3] % 2]
        out.append(" ".join(w for w in (prefix, joiner.join(parts)) if w))
    return out, torch.from_numpy(np.where(named, values, -1))
