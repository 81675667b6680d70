"""Building the TinyLM suite: four synthetic languages, a tiny Llama pretrained on their noisy mixture, and one
fine-tune per language (the language-model counterpart of `tiny_build`).

1. **Text** (`tiny_lm_text.generate`): four languages that express one shared meaning layer in their own word
   orders, function words, agreement and word forms, with no tag naming the language, so the fine-tunes compete for
   the same parameters. 137 words plus ``<pad> <unk> <s> </s>``; 30 tokens per document on average, so most
   documents are padded to ``seq_len`` 48 and some are cut.
2. **θ0** (`pretrain`): a ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, MLP 192, untied embeddings, 125k
   parameters) trained from random initialisation on the mixture of the four languages as noisy web text: 30% of the
   words replaced by random words of the vocabulary.
3. **θ_k** (`finetune`): a copy of θ0 fine-tuned on language k's clean text, AdamW with a one-cycle schedule.

Why noisy pretraining, measured with benchmarks/tiny_lm_regime.py (seed 0, mean test loss in nats per token over the
four languages: θ0 / Task Arithmetic / individual fine-tunes):

- clean pretraining: 1.390 / 1.459 / 1.330. θ0 already knows every language; a fine-tune only adds knowing which one
  comes, the task vectors are pure conflict and Task Arithmetic is worse than θ0. Code-switching plus scrambled word
  order as the pretraining noise did the same (1.494 / 1.544 / 1.334).
- 15% random words: 1.577 / 1.527 / 1.356, TA recovers 23% of the gap.
- 30% random words (the default): 1.858 / 1.666 / 1.405, TA recovers 42% (CLIP ViT-B/32 on its 8 tasks: 49%), and
  still trails each fine-tune on its own language by 52-67% of that language's gap. ‖τ_k‖/‖θ0‖ ≈ 0.18, the task
  vectors' cosines -0.03 to 0.15; each θ_k is worse than θ0 on the other languages, so TA with a one-hot preference
  (θ0 + 1.2 τ_k) beats TA on k and loses to it on the other three. Seeds 1, 2, 3 and `FAST_LM_RECIPE` agree.

Build time of the default recipe on 2 shared CPU cores: 27 s pretraining, 4 s per fine-tune, 42 s in all (20 s and 3 s
on idle cores); a forward+backward of 64 sequences of 48 tokens takes 22-30 ms. `FAST_LM_RECIPE`: ~13 s in all.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from paretomerge.progress import progress_bar
from paretomerge.suites.loaders import derive_seed
from paretomerge.suites.tiny_lm_text import LANGUAGES, generate, vocabulary

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0, 1, 2, 3


@dataclass(frozen=True)
class LMRecipe:
    """Everything that determines the built weights; its JSON is part of the cache key."""

    # the model (transformers.LlamaConfig)
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 192
    seq_len: int = 48
    # the text: documents per language and split, sentences per document
    pretrain_docs: int = 4096
    finetune_docs: int = 2048
    test_docs: int = 256
    sentences: tuple[int, int] = (1, 7)
    # pretraining text is noisy web text: each word is replaced by a random word of the vocabulary with this chance
    noise: float = 0.3
    # pretraining on the mixture of the four languages
    pretrain_steps: int = 800
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    # fine-tuning a copy of θ0 on each language's clean text
    finetune_steps: int = 200
    finetune_batch: int = 32
    finetune_lr: float = 1e-3
    weight_decay: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# Overrides of `LMRecipe` for tests: a ~13 s build that keeps the regime on seeds 0-3 (benchmarks/tiny_lm_regime.py).
FAST_LM_RECIPE = {"pretrain_docs": 1024, "finetune_docs": 512, "test_docs": 128, "pretrain_steps": 250,
                  "finetune_steps": 60}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer (``PreTrainedTokenizerFast``) over the closed vocabulary: words split on whitespace,
    one id per word, ``<s>`` before and ``</s>`` after each document, ``<pad>`` = 0. Built offline; it saves and
    reloads with ``AutoTokenizer`` alone."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", padding_side="right")


def encode(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], seq_len: int) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask``, ``[N, seq_len]`` int64 each: ``<s> words </s>`` padded on the right with
    the pad id, or cut at ``seq_len`` (a cut document loses its ``</s>``)."""
    ids = tokenizer(list(texts))["input_ids"]
    input_ids = np.full((len(ids), seq_len), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(ids), seq_len), dtype=np.int64)
    for row, doc in enumerate(ids):
        doc = doc[:seq_len]
        input_ids[row, :len(doc)], mask[row, :len(doc)] = doc, 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}


def lm_config(recipe: LMRecipe) -> LlamaConfig:
    """The tiny Llama's ``transformers.LlamaConfig`` (untied embeddings: every weight is its own task-vector entry)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(SPECIAL_TOKENS) + len(vocabulary()), hidden_size=recipe.hidden_size,
                       intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.layers,
                       num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
                       max_position_embeddings=recipe.seq_len, tie_word_embeddings=False, pad_token_id=0,
                       bos_token_id=2, eos_token_id=3)


def _loss(model: LlamaForCausalLM, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the predicted tokens that are not padding."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    keep = attention_mask[:, 1:].bool()
    return F.cross_entropy(logits[keep], input_ids[:, 1:][keep])


def _batches(num_items: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices of ``steps`` shuffled mini-batches, reshuffling every pass."""
    order, position = torch.randperm(num_items, generator=generator), 0
    for _ in range(steps):
        if position + batch_size > num_items:
            order, position = torch.randperm(num_items, generator=generator), 0
        yield order[position:position + batch_size]
        position += batch_size


def _train(model: LlamaForCausalLM, data: dict[str, Tensor], steps: int, batch_size: int, lr: float,
           weight_decay: float, seed: int, desc: str, progress: bool) -> None:
    """``steps`` AdamW steps of `_loss` on shuffled mini-batches of ``data``, one-cycle learning rate (a 10% warm-up,
    at least 2 steps; a constant rate below 3 steps, where one cycle has no room)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=max(0.1, 2 / steps)) \
        if steps >= 3 else torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with progress_bar(total=steps, desc=desc, enabled=progress) as bar:
        for index in _batches(len(data["input_ids"]), batch_size, steps, generator):
            loss = _loss(model, data["input_ids"][index], data["attention_mask"][index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()
    model.eval().requires_grad_(False)


def documents(recipe: LMRecipe, language: str, split: str, seed: int) -> list[str]:
    """A split's documents (``pretrain``: noisy; ``finetune`` and ``test``: clean), deterministic in the seed."""
    count = {"pretrain": recipe.pretrain_docs, "finetune": recipe.finetune_docs, "test": recipe.test_docs}[split]
    noise = recipe.noise if split == "pretrain" else 0.0
    return generate(language, count, derive_seed(seed, split), recipe.sentences, noise)


def pretrain(recipe: LMRecipe, seed: int, progress: bool = True) -> LlamaForCausalLM:
    """θ0: a ``LlamaForCausalLM`` from random initialisation, trained on the mixture of the four languages'
    pretraining text. Torch's global random state is left as it was."""
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer()
    docs = [d for language in LANGUAGES for d in documents(recipe, language, "pretrain", seed)]
    data = encode(tokenizer, docs, recipe.seq_len)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(lm_config(recipe))
    _train(model, data, recipe.pretrain_steps, recipe.pretrain_batch, recipe.pretrain_lr, recipe.weight_decay,
           derive_seed(seed, "pretrain"), "pretraining the tiny Llama (four languages)", progress)
    return model


def finetune(recipe: LMRecipe, theta0_model: LlamaForCausalLM, language: str, seed: int,
             progress: bool = True) -> dict[str, Tensor]:
    """θ_k: the state dict of a copy of ``theta0_model`` fine-tuned on ``language``'s clean text; θ0 is not
    modified."""
    model = copy.deepcopy(theta0_model).requires_grad_(True)
    data = encode(make_tokenizer(), documents(recipe, language, "finetune", seed), recipe.seq_len)
    _train(model, data, recipe.finetune_steps, recipe.finetune_batch, recipe.finetune_lr, recipe.weight_decay,
           derive_seed(seed, "finetune", language), f"fine-tuning on {language}", progress)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
