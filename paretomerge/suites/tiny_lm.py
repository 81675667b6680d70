"""`TinyLMSuite`: the embedded language-model merging problem, built from nothing on a CPU in under a minute.

A tiny Llama (`transformers.LlamaForCausalLM` from a config) is pretrained here on a noisy mixture of four synthetic
languages (`tiny_lm_text`), then fine-tuned on each (`tiny_lm_build`); the task vectors are the four fine-tunes' and
each task's score is its next-token loss (nats per token, lower is better) on that language's held-out test text. The
languages share a meaning layer, so merging helps (Task Arithmetic beats θ0), and conflict in word order and word
forms, so it costs something (Task Arithmetic trails each fine-tune on its own language): benchmarks/README.md,
"tiny_lm_regime.py".

Splits per language (`text.TextSuite`): ``train`` (the unlabeled adaptation text the merging methods train on),
``val`` and ``test`` (the text the fine-tunes' builds were measured on), each generated from its own seed, none the
fine-tuning text.

Cache (``<root>/tiny_lm/<hash>``): θ0 and all four fine-tunes of one (seed, recipe), whatever ``tasks`` this instance
merges, so every subset (a pair, three languages) shares one build.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from paretomerge.kernels import ModuleSpec, TaskVectors
from paretomerge.kernels.builders import hf_causal_lm_settings
from paretomerge.suites import cache
from paretomerge.suites.loaders import derive_seed
from paretomerge.suites.text import TextSuite, Tokens, require_transformers
from paretomerge.suites.tiny_build import check_positive, recipe_from
from paretomerge.suites.tiny_lm_build import (
    FAST_LM_RECIPE,
    LMRecipe,
    documents,
    encode,
    finetune,
    lm_config,
    make_tokenizer,
    pretrain,
)
from paretomerge.suites.tiny_lm_text import GENERATOR_VERSION, LANGUAGES, generate

__all__ = ["FAST_LM_RECIPE", "LANGUAGES", "TinyLMSuite"]


class TinyLMSuite(TextSuite):
    """The embedded language-model suite.

    tasks:       the merged languages, 2 to 4 of ``svo sov vso osv`` (default: all four).
    seed:        everything (text, θ0, fine-tuning) derives from it.
    batch_size:  sequences of adaptation text per language per training step.
    train_docs, val_docs: documents per language in the adaptation and validation splits; the test split is the
                 recipe's ``test_docs``.
    recipe:      overrides of `tiny_lm_build.LMRecipe` (model size, text sizes, schedules); `FAST_LM_RECIPE` is
                 the tests' ~13 s variant.
    cache_dir:   cache root (default ``$PARETOMERGE_CACHE`` or ``~/.cache/paretomerge``); the suite lives in
                 ``<root>/tiny_lm/``.
    progress:    progress bars while building.
    """

    def __init__(self, tasks: Sequence[str] | None = None, seed: int = 0, batch_size: int = 16,
                 eval_batch_size: int = 128, train_docs: int = 1024, val_docs: int = 128,
                 recipe: dict[str, Any] | None = None, cache_dir: str | None = None, progress: bool = True) -> None:
        require_transformers('TinyLMSuite (a tiny Llama)')
        super().__init__(batch_size, eval_batch_size, seed)
        tasks = list(LANGUAGES) if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in LANGUAGES]
        if unknown:
            raise ValueError(f"unknown TinyLM language(s) {unknown}; choose from {list(LANGUAGES)}")
        if len(tasks) < 2 or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must name at least 2 distinct languages, got {tasks}")
        for name, value in (("train_docs", train_docs), ("val_docs", val_docs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if batch_size > train_docs:
            raise ValueError(f"batch_size={batch_size} exceeds train_docs={train_docs} (the adaptation split)")
        self.recipe = _check_recipe(recipe)
        self.save_hyperparameters()
        self.tasks = tuple(tasks)
        self._loaded: tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, Any]] | None = None
        self._task_vectors: TaskVectors | None = None
        self._tokens: dict[tuple[str, str], Tokens] = {}

    # ------------------------------------------------------------------ identity and cache
    @property
    def config(self) -> dict[str, Any]:
        """Everything the built weights depend on (not the tasks: every build holds all four); its hash names the
        cache directory."""
        return {"suite": "tiny-lm", "generator_version": GENERATOR_VERSION, "seed": self.seed,
                "recipe": self.recipe.to_dict()}

    @property
    def cache_path(self) -> Path:
        return cache.cache_root(self.hparams.cache_dir) / "tiny_lm" / cache.config_key(self.config)

    def prepare_data(self) -> None:
        """Build the suite into the cache if it is not there (Lightning runs this on one process per node)."""
        self._load()

    def setup(self, stage: str) -> None:
        self._load()

    def _load(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, Any]]:
        if self._loaded is None:
            self._loaded = cache.read_or_build(
                self.cache_path, self.config, self._build, self._from_cache, lambda m: print(f"TinyLMSuite: {m}"),
                lambda err: rank_zero_warn(f"TinyLMSuite cache is not usable: {err}. Rebuilding it."))
        return self._loaded

    def _from_cache(self, tensors: dict, documents_: dict) -> tuple[dict, dict, dict]:
        missing = [name for name in ("theta0", *(f"finetuned_{t}" for t in LANGUAGES)) if name not in tensors]
        if missing or "build" not in documents_:
            raise cache.CacheError(f"{self.cache_path} lacks {missing or ['build.json']}")
        return tensors["theta0"], {t: tensors[f"finetuned_{t}"] for t in LANGUAGES}, documents_["build"]

    def _build(self) -> tuple[dict, dict]:
        recipe, seed, progress = self.recipe, self.seed, self.hparams.progress
        rank_zero_info(f"Building TinyLMSuite (four languages: {', '.join(LANGUAGES)}) into {self.cache_path}")
        start = time.perf_counter()
        theta0 = pretrain(recipe, seed, progress)
        pretraining = time.perf_counter() - start
        tensors = {"theta0": {k: v.detach().clone() for k, v in theta0.state_dict().items()}}
        for k, language in enumerate(LANGUAGES):
            rank_zero_info(f"TinyLMSuite: fine-tuning {language} ({k + 1}/{len(LANGUAGES)})")
            tensors[f"finetuned_{language}"] = finetune(recipe, theta0, language, seed, progress)
        seconds = time.perf_counter() - start
        rank_zero_info(f"TinyLMSuite built in {seconds:.0f} s ({pretraining:.0f} s pretraining)")
        return tensors, {"build": {"build_seconds": seconds, "pretraining_seconds": pretraining}}

    # ------------------------------------------------------------------ what users call
    def backbone(self) -> nn.Module:
        """θ0: the pretrained tiny ``LlamaForCausalLM`` (a new copy, eval mode)."""
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(lm_config(self.recipe))
        model.load_state_dict(self._load()[0])
        return model.eval()

    def task_vectors(self) -> TaskVectors:
        """θ0, τ ``[K, *shape]`` of the merged languages (the whole model: embeddings and ``lm_head`` included), and
        identity heads; built into the cache the first time."""
        if self._task_vectors is None:
            pretrained = self.backbone()
            spec = ModuleSpec("paretomerge.kernels.builders:hf_causal_lm",
                              {"config": hf_causal_lm_settings(pretrained.config)})
            finetuned = self._load()[1]
            self._task_vectors = TaskVectors.from_state_dicts(
                pretrained, [finetuned[t] for t in self.tasks], list(self.tasks),
                {t: nn.Identity() for t in self.tasks}, backbone_spec=spec, copy_backbone=False)
        return self._task_vectors

    def tokenizer(self) -> Any:
        """The suite's Hugging Face tokenizer (a word-level ``PreTrainedTokenizerFast``, built offline)."""
        return make_tokenizer()

    def token_split(self, task: str, split: str) -> Tokens:
        """One language's ``train`` (adaptation), ``val`` or ``test`` text, tokenized and right-padded to the recipe's
        ``seq_len``."""
        self._check_split(split)
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; this suite has {list(self.tasks)}")
        if (task, split) not in self._tokens:
            recipe = self.recipe
            if split == "test":  # the text the build was measured on (benchmarks/tiny_lm_regime.py)
                docs = documents(recipe, task, "test", self.seed)
            else:
                count = self.hparams.train_docs if split == "train" else self.hparams.val_docs
                docs = generate(task, count, derive_seed(self.seed, "adaptation" if split == "train" else "val"),
                                recipe.sentences)
            self._tokens[task, split] = encode(make_tokenizer(), docs, recipe.seq_len)
        return self._tokens[task, split]

    @property
    def build_report(self) -> dict[str, Any]:
        """`TextSuite.build_report` (θ0, individual, Task Arithmetic, TIES and weight-averaging test loss per
        language) and the build's wall time in seconds."""
        return {**super().build_report, **self._load()[2]}


def _check_recipe(overrides: dict[str, Any] | None) -> LMRecipe:
    """`LMRecipe` with ``overrides``, each checked: unknown keys and wrong types are refused with a message."""
    recipe = recipe_from(LMRecipe, overrides, "TinyLM recipe", tuples=("sentences",))
    for f in fields(LMRecipe):
        value = getattr(recipe, f.name)
        if f.name == "sentences":
            if len(value) != 2 or not all(isinstance(v, int) and v >= 1 for v in value) or value[0] > value[1]:
                raise ValueError(f"recipe sentences must be (min, max) positive ints, got {value!r}")
        elif f.name in ("noise", "weight_decay"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"recipe {f.name} must be in [0, 1), got {value!r}")
        else:
            check_positive(f.name, value, f.type)
    if recipe.hidden_size % recipe.heads:
        raise ValueError(f"recipe hidden_size={recipe.hidden_size} must be a multiple of heads={recipe.heads}")
    return recipe
