"""`HFTextSuite`: Hugging Face causal LMs fine-tuned from one base, each task's text read from local files.

    data:
      class_path: paretomerge.suites.HFTextSuite
      init_args:
        pretrained: models/Meta-Llama-3-8B-Instruct
        finetuned: {fr: models/French-Alpaca-Llama3-8B-Instruct, ar: models/Arabic-Orpo-Llama-3-8B-Instruct}
        texts: {fr: data/fr.jsonl, ar: data/ar.jsonl}

The models are read by `hf_lm.causal_lm_task_vectors` (checked, then streamed shard by shard). A task's text is a
``.txt`` file (documents separated by blank lines) or a ``.jsonl`` file (one JSON object per line, its ``text``
field); or a mapping ``{train: path, val: path, test: path}`` when the splits are files of their own. Documents are
tokenized with the pretrained model's tokenizer, joined with its end-of-sequence token and cut into sequences of
``seq_len`` tokens (packed: no padding). From one file, a seeded shuffle of the sequences gives ``test_fraction`` to
test, ``val_fraction`` to validation and the rest to adaptation (`text.TextSuite`: they never overlap). Nothing is
downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from paretomerge.kernels import TaskVectors
from paretomerge.suites.hf_lm import causal_lm_task_vectors, load_tokenizer, memory_plan
from paretomerge.suites.loaders import derive_seed
from paretomerge.suites.text import SPLITS, TextSuite, Tokens, require_transformers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_SUFFIXES = (".txt", ".jsonl")


def read_documents(path: str | Path) -> list[str]:
    """The documents of a ``.txt`` file (separated by blank lines) or a ``.jsonl`` file (each line's ``text``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(f"{str(path)!r}: a task's text is a .txt file (documents separated by blank lines) or a "
                         ".jsonl file (one {\"text\": ...} object per line)")
    if path.suffix == ".txt":
        documents = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
    else:
        documents = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{str(path)!r} line {number} is not JSON: {err}") from None
            if not isinstance(record, Mapping) or not isinstance(record.get("text"), str):
                raise ValueError(f"{str(path)!r} line {number}: each line must be an object with a 'text' string")
            documents.append(record["text"].strip())
    documents = [d for d in documents if d]
    if not documents:
        raise ValueError(f"{str(path)!r} holds no text")
    return documents


def pack(tokenizer: Any, documents: Sequence[str], seq_len: int) -> torch.Tensor:
    """``[N, seq_len]`` token ids: the documents tokenized (with the tokenizer's own special tokens), joined by its
    end-of-sequence token where it has one, and cut into whole sequences (a last partial one is dropped)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer(document)["input_ids"])
        if eos is not None and (not stream or stream[-1] != eos):
            stream.append(eos)
    count = len(stream) // seq_len
    return torch.tensor(stream[:count * seq_len], dtype=torch.long).view(count, seq_len)


class HFTextSuite(TextSuite):
    """Fine-tuned Hugging Face causal LMs and each task's text, as a suite (see the module docstring).

    pretrained:     the base model's directory (θ0; its tokenizer tokenizes every task's text).
    finetuned:      task -> its fine-tuned model's directory; the task names are its keys, in order.
    texts:          task -> a text file, or -> ``{train, val, test}`` files.
    tasks:          a subset of ``finetuned``'s tasks to merge (e.g. a pair), in this order; default: all.
    seq_len:        tokens per sequence.
    val_fraction, test_fraction: the shares of a single file's sequences held out (validation, test).
    max_sequences:  at most this many sequences per task and split (the evaluation of a large model is costly);
                    None keeps all.
    dtype, tau_dtype: θ0's dtype and the task vectors' (``float32``, ``bfloat16``, ``float16``; τ defaults to θ0's).
    """

    def __init__(self, pretrained: str, finetuned: dict[str, str], texts: dict[str, str | dict[str, str]],
                 tasks: list[str] | None = None, seq_len: int = 512, val_fraction: float = 0.05,
                 test_fraction: float = 0.1, max_sequences: int | None = 512, dtype: str = "float32",
                 tau_dtype: str | None = None, batch_size: int = 4, eval_batch_size: int = 8, seed: int = 0,
                 progress: bool = True) -> None:
        require_transformers('HFTextSuite (Hugging Face causal LMs)')
        super().__init__(batch_size, eval_batch_size, seed)
        if not isinstance(finetuned, Mapping) or len(finetuned) < 2:
            raise ValueError(f"finetuned must map at least 2 task names to model directories, got {finetuned!r}")
        chosen = list(finetuned) if tasks is None else list(tasks)
        unknown = [t for t in chosen if t not in finetuned]
        if unknown or len(set(chosen)) != len(chosen) or len(chosen) < 2:
            raise ValueError(f"tasks must name at least 2 distinct tasks of finetuned {list(finetuned)}, got {chosen}")
        missing = [t for t in chosen if t not in texts]
        if missing:
            raise ValueError(f"texts has no file for task(s) {missing}; give texts: {{task: path}} for each task")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {value!r}")
        for name, value in (("seq_len", seq_len), ("max_sequences", max_sequences)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
                raise ValueError(f"{name} must be an int >= 2{' or None' if name == 'max_sequences' else ''}, "
                                 f"got {value!r}")
        for name, value in (("dtype", dtype), ("tau_dtype", tau_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {value!r}")
        self.save_hyperparameters()
        self.tasks = tuple(chosen)
        self._task_vectors: TaskVectors | None = None
        self._tokenizer: Any = None
        self._splits: dict[str, dict[str, Tokens]] = {}

    def tokenizer(self) -> Any:
        """The pretrained model's tokenizer (else the first fine-tune's that has one: `hf_lm.load_tokenizer`)."""
        if self._tokenizer is None:
            hp = self.hparams
            self._tokenizer = load_tokenizer([hp.pretrained, *(hp.finetuned[t] for t in self.tasks)])
        return self._tokenizer

    def task_vectors(self) -> TaskVectors:
        if self._task_vectors is None:
            hp = self.hparams
            dtype, tau_dtype = DTYPES[hp.dtype], None if hp.tau_dtype is None else DTYPES[hp.tau_dtype]
            plan = memory_plan(hp.pretrained, len(self.tasks), dtype, tau_dtype)
            rank_zero_info(f"HFTextSuite: loading θ0 and {len(self.tasks)} task vectors from {hp.pretrained}: "
                           f"{plan['theta0_bytes'] / 2**30:.2f} GiB + {plan['tau_bytes'] / 2**30:.2f} GiB, and at most "
                           f"{plan['largest_shard_bytes'] / 2**30:.2f} GiB (one shard) in flight "
                           "(memory_plan; docs/language-models.md, 'Memory')")
            self._task_vectors = causal_lm_task_vectors(
                hp.pretrained, [hp.finetuned[t] for t in self.tasks], list(self.tasks), dtype=dtype,
                tau_dtype=tau_dtype, progress=hp.progress)
        return self._task_vectors

    def setup(self, stage: str) -> None:
        for task in self.tasks:  # read and tokenize every text before anything trains: a bad file fails first
            self._task_splits(task)

    def token_split(self, task: str, split: str) -> Tokens:
        self._check_split(split)
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; this suite has {list(self.tasks)}")
        return self._task_splits(task)[split]

    def _task_splits(self, task: str) -> dict[str, Tokens]:
        if task not in self._splits:
            hp, source = self.hparams, self.hparams.texts[task]
            if isinstance(source, Mapping):
                if set(source) != set(SPLITS):
                    raise ValueError(f"texts[{task!r}] must be a file or {{train, val, test}} files, got "
                                     f"{list(source)}")
                ids = {split: pack(self.tokenizer(), read_documents(source[split]), hp.seq_len) for split in SPLITS}
            else:
                ids = self._split_one(task, pack(self.tokenizer(), read_documents(source), hp.seq_len))
            for split, rows in ids.items():
                if len(rows) == 0:
                    raise ValueError(f"task {task!r}: its {split} text is shorter than one sequence of {hp.seq_len} "
                                     "tokens")
            cap = hp.max_sequences
            self._splits[task] = {split: {"input_ids": rows[:cap], "attention_mask": torch.ones_like(rows[:cap])}
                                  for split, rows in ids.items()}
        return self._splits[task]

    def _split_one(self, task: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """One file's sequences shuffled (seeded by the suite's seed and the task) and cut into test, val, train."""
        hp = self.hparams
        order = np.random.default_rng(derive_seed(self.seed, task, "split")).permutation(len(rows))
        test, val = round(hp.test_fraction * len(rows)), round(hp.val_fraction * len(rows))
        if test < 1 or val < 1 or len(rows) - test - val < 1:
            raise ValueError(f"task {task!r}: its text gives {len(rows)} sequences of {hp.seq_len} tokens, too few to "
                             f"hold out {hp.test_fraction:g} for test and {hp.val_fraction:g} for validation")
        index = {"test": order[:test], "val": order[test:test + val], "train": order[test + val:]}
        return {split: rows[torch.as_tensor(np.sort(chosen))] for split, chosen in index.items()}
