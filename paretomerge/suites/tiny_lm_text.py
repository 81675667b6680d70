"""The TinyLM suite's four synthetic languages (the language-model counterpart of `tiny_text`).

Every language expresses one shared meaning layer: 20 nouns in five categories, verbs with selectional constraints
(people and animals eat, and they eat food), adjectives restricted by category, and a topic per document (three nouns
its sentences mostly draw from). Each language has its own word order (the names: svo, sov, vso, osv), its own
function words (articles, case particles, pre- or postpositions; some forms do another job in another language: ``ga``
marks the subject in sov and the place in osv), its own agreement (the sov verb, the vso and osv adjectives take the
noun's gender) and its own word forms, 30% of concepts sharing one form across all four languages and 20% across two.
No tag names the language: a model infers it from the words. 137 words; 1 to 7 sentences, 30 words on average.
Why these choices, with the measurements behind them: `tiny_lm_build`'s docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from paretomerge.suites.loaders import derive_seed

#: Bumped whenever the generated text changes (part of the suite's cache key).
GENERATOR_VERSION = 1

LANGUAGES = ("svo", "sov", "vso", "osv")

# The shared meaning layer: nouns by category, what each verb takes (subject categories, object categories), what each
# adjective describes. Every language expresses the same meanings; only the words and their order differ.
NOUNS = {"person": ("child", "farmer", "king", "doctor"), "animal": ("dog", "cat", "bird", "horse"),
         "food": ("bread", "apple", "fish", "rice"), "tool": ("knife", "rope", "box", "stone"),
         "place": ("river", "house", "market", "forest")}
VERBS = {"eat": ("person animal", "food"), "see": ("person animal", "person animal food tool place"),
         "chase": ("person animal", "person animal"), "carry": ("person animal", "food tool"),
         "build": ("person", "tool place"), "visit": ("person", "place"), "cook": ("person", "food"),
         "sell": ("person", "food tool animal"), "break": ("person animal", "tool"),
         "love": ("person", "person animal place")}
ADJECTIVES = {"big": "person animal food tool place", "small": "person animal food tool place",
              "old": "person animal", "young": "person animal", "fresh": "food", "rotten": "food",
              "sharp": "tool", "far": "place"}
# Function words. Some forms are shared with another function ("ga" marks the subject in sov and the place in osv,
# "ni" is a postposition in sov and a preposition in vso), so a word alone does not tell the language.
_FUNCTION = {"svo": ("ta", "en", "."), "sov": ("ga", "wo", "ni", "."), "vso": ("ta", "ni", "."),
             "osv": ("ka", "ga", ".")}
_AGREES = {"sov": "verb", "vso": "adjective", "osv": "adjective"}  # which words take the noun's gender (-n / -s)
_CATEGORY = {noun: category for category, nouns in NOUNS.items() for noun in nouns}
_LEXICON_SEED = derive_seed("tiny_lm", "lexicon")


def _lexicon() -> dict[str, dict[str, tuple[str, str]]]:
    """language -> concept -> its two forms (gender 0, gender 1; the same form twice where the language does not
    agree). A concept's form is shared by all four languages (30%), by two (20%), or each language's own (50%).
    Fixed: the vocabulary does not depend on any seed."""
    rng = np.random.default_rng(_LEXICON_SEED)
    syllables = [c + v for c in "ptkbdmlrsvz" for v in "aeiou"]
    taken = {w for words in _FUNCTION.values() for w in words}
    concepts = [(c, "noun") for nouns in NOUNS.values() for c in nouns]
    concepts += [(c, "verb") for c in VERBS] + [(c, "adjective") for c in ADJECTIVES]

    def fresh() -> str:
        while True:
            word = "".join(syllables[i] for i in rng.integers(len(syllables), size=2))
            if word not in taken:
                taken.add(word)
                return word

    lexicon: dict[str, dict[str, tuple[str, str]]] = {language: {} for language in LANGUAGES}
    for concept, part in concepts:
        u = rng.random()
        if u < 0.3:
            forms = [fresh()] * len(LANGUAGES)
        elif u < 0.5:
            forms = [fresh() for _ in LANGUAGES]
            pair = rng.choice(len(LANGUAGES), size=2, replace=False)
            forms[pair[1]] = forms[pair[0]]
        else:
            forms = [fresh() for _ in LANGUAGES]
        for language, form in zip(LANGUAGES, forms, strict=True):
            agree = _AGREES.get(language) == part
            lexicon[language][concept] = (form + "n", form + "s") if agree else (form, form)
    return lexicon


_LEXICON = _lexicon()
_GENDER = dict(zip(_CATEGORY, np.random.default_rng([_LEXICON_SEED, 1]).integers(2, size=20).tolist(),
                   strict=True))  # noun -> grammatical gender, which agreeing words show


def vocabulary() -> list[str]:
    """Every word of the four languages, sorted (the tokenizer's ids 4.. in this order)."""
    words = {w for words in _FUNCTION.values() for w in words}
    words.update(f for forms in _LEXICON.values() for pair in forms.values() for f in pair)
    return sorted(words)


_WORDS = vocabulary()


class _Draws:
    """Uniform draws from a numpy Generator, taken a block at a time (per-call numpy overhead dominates otherwise)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.block = rng, iter(())

    def random(self) -> float:
        try:
            return next(self.block)
        except StopIteration:
            self.block = iter(self.rng.random(512).tolist())
            return next(self.block)

    def choice(self, items: Sequence):
        return items[int(self.random() * len(items))]


# verb -> (the nouns it takes as subject, as object); noun -> the adjectives that may describe it
_TAKES = {verb: tuple(tuple(n for n, c in _CATEGORY.items() if c in cats.split()) for cats in (subject, obj))
          for verb, (subject, obj) in VERBS.items()}
_DESCRIBES = {n: tuple(a for a, cats in ADJECTIVES.items() if c in cats.split()) for n, c in _CATEGORY.items()}
_PLACES = NOUNS["place"]


def _pick(draws: _Draws, allowed: Sequence[str], topic: Sequence[str], avoid: str = "") -> str:
    """A noun from ``allowed``; 70% of the time one of the document's ``topic`` nouns when one fits."""
    fitting = [n for n in topic if n in allowed and n != avoid]
    if fitting and draws.random() < 0.7:
        return draws.choice(fitting)
    return draws.choice([n for n in allowed if n != avoid])


def _sentence(language: str, topic: Sequence[str], draws: _Draws, noise: float) -> list[str]:
    """One sentence: a meaning drawn from the shared layer, expressed in ``language``'s words and order."""
    verb = draws.choice(list(_TAKES))
    subject = _pick(draws, _TAKES[verb][0], topic)
    obj = _pick(draws, _TAKES[verb][1], topic, avoid=subject)
    place = draws.choice(_PLACES) if draws.random() < 0.25 and obj not in _PLACES else None

    def word(concept: str, gender: int = 0) -> str:
        return _LEXICON[language][concept][gender]

    def phrase(noun: str) -> list[str]:
        adjective = draws.choice(_DESCRIBES[noun]) if draws.random() < 0.3 else None
        out = [word(noun)]
        if adjective and language in ("svo", "sov"):
            out.insert(0, word(adjective))
        elif adjective:
            out.append(word(adjective, _GENDER[noun]))
        return ["ta", *out] if language in ("svo", "vso") else out

    s, o, v = phrase(subject), phrase(obj), [word(verb, _GENDER[subject])]
    p = phrase(place) if place else None
    if language == "svo":
        parts = [s, v, o] + ([["en", *p]] if p else [])
    elif language == "sov":
        parts = [[*s, "ga"], [*o, "wo"]] + ([[*p, "ni"]] if p else []) + [v]
    elif language == "vso":
        parts = [v, s, o] + ([["ni", *p]] if p else [])
    else:
        parts = [[*o, "ka"], s, v] + ([["ga", *p]] if p else [])
    words = [w for part in parts for w in part] + ["."]
    return [draws.choice(_WORDS) if draws.random() < noise else w for w in words] if noise else words


def generate(language: str, count: int, seed: int, sentences: tuple[int, int] = (1, 7),
             noise: float = 0.0) -> list[str]:
    """``count`` documents in ``language``, as space-separated words: each a few sentences about a topic (three nouns
    the sentences mostly draw their subjects and objects from). ``noise``: the chance that each word is replaced by a
    random word of the vocabulary (pretraining text). Deterministic in ``seed``."""
    draws = _Draws(np.random.default_rng(np.random.SeedSequence(derive_seed(seed, "tiny_lm", language))))
    nouns = list(_GENDER)
    docs = []
    for _ in range(count):
        topic = [draws.choice(nouns) for _ in range(3)]
        n = sentences[0] + int(draws.random() * (sentences[1] - sentences[0] + 1))
        docs.append(" ".join(w for _ in range(n) for w in _sentence(language, topic, draws, noise)))
    return docs
