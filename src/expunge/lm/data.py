"""TokenDataset: a corpus tokenized for a causal LM, with loss masks, stable ids and padded batches.

``encode(corpus, tokenizer, max_length)`` turns each row into ``input_ids`` and ``labels`` (Hugging Face's
convention: ``labels[t]`` is the token at t where the loss counts, -100 elsewhere; the model predicts token
t from tokens < t, so the first position is never a target).

- A QA pair, when the tokenizer has a chat template: the prompt is the template applied to the user's question
  with the generation prompt (``add_generation_prompt=True``); the answer is what the template adds for the
  assistant's reply (the answer text and the template's end-of-turn tokens). Otherwise the plain format:
  ``"Question: {q}\\nAnswer:"`` (with the tokenizer's own special tokens in front, e.g. BOS) then
  ``" {a}"`` and EOS. Only answer tokens are targets; the question is masked with -100.
- A document: the tokenizer's own special tokens in front, the text, then EOS; every token is a target.

Prompt and answer are tokenized separately and joined, so no BPE merge crosses the boundary.

Too long (more than ``max_length`` tokens): a QA pair is refused, since cutting it would cut the answer it is
there to teach; a document is truncated to its first ``max_length`` tokens (no EOS) with one warning that says
how many and by how much, or refused with ``truncate_documents=False``.

Batches (``batch(rows)``) are dicts for Hugging Face models: ``input_ids``, ``attention_mask`` and ``labels``,
right-padded to the longest row of the batch (padding: mask 0, label -100, token ``pad_id``).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ExpungeError
from .corpus import Corpus

IGNORE = -100
PLAIN_PROMPT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class TokenDataset:
    """One row per corpus row: ``input_ids[i]`` and ``labels[i]`` (int64 arrays of equal length), ``ids``,
    ``groups``; ``pad_id`` pads; ``qa_format`` is ``chat``, ``plain`` or None (no QA rows)."""

    input_ids: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    ids: np.ndarray
    groups: tuple[str, ...]
    pad_id: int
    qa_format: str | None = None
    name: str = "tokens"

    def __post_init__(self):
        object.__setattr__(self, "ids", np.ascontiguousarray(self.ids, dtype=np.int64))
        if not (len(self.input_ids) == len(self.labels) == len(self.ids) == len(self.groups)):
            raise ExpungeError(f"{self.name}: input_ids, labels, ids and groups must have one entry per row")
        for i, (x, y) in enumerate(zip(self.input_ids, self.labels)):
            if len(x) != len(y):
                raise ExpungeError(f"{self.name}: row {i} has {len(x)} tokens but {len(y)} labels")
            if not (y[1:] != IGNORE).any():
                raise ExpungeError(f"{self.name}: row {i} (id {self.ids[i]}) has no target token; it would train on nothing")
        if len(np.unique(self.ids)) != len(self.ids):
            raise ExpungeError(f"{self.name}: ids must be unique; found duplicates")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids], dtype=np.int64)

    @property
    def width(self) -> int:
        """The longest row: what ``__getitem__`` pads to."""
        return int(self.lengths.max()) if len(self) else 0

    def target_counts(self) -> np.ndarray:
        """Target tokens per row (what each row's mean NLL averages over)."""
        return np.array([int((y[1:] != IGNORE).sum()) for y in self.labels], dtype=np.int64)

    def batch(self, rows, device=None) -> dict[str, torch.Tensor]:
        """The rows (positions, not ids) as a right-padded batch on ``device``."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        width = max((len(self.input_ids[r]) for r in rows), default=0)
        return self._padded(rows, width, device)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        """One row padded to ``width`` (all rows the same shape), for samplers that collate rows themselves,
        such as the private-training engine's Poisson loader; trim with ``trim_padding``."""
        batch = self._padded(np.array([row]), self.width, None)
        return {k: v[0] for k, v in batch.items()}

    def _padded(self, rows: np.ndarray, width: int, device) -> dict[str, torch.Tensor]:
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for k, r in enumerate(rows):
            n = len(self.input_ids[r])
            input_ids[k, :n], labels[k, :n], mask[k, :n] = self.input_ids[r], self.labels[r], 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        return {k: torch.from_numpy(v).to(device) if device is not None else torch.from_numpy(v) for k, v in batch.items()}

    def rows_of(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        position = {int(i): r for r, i in enumerate(self.ids)}
        missing = [int(i) for i in ids if int(i) not in position]
        if missing:
            raise ExpungeError(f"{len(missing)} id(s) are not in {self.name}, e.g. {missing[:5]}")
        return np.array([position[int(i)] for i in ids], dtype=np.int64)

    def take(self, rows) -> TokenDataset:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return TokenDataset(tuple(self.input_ids[r] for r in rows), tuple(self.labels[r] for r in rows),
                            self.ids[rows], tuple(self.groups[r] for r in rows), self.pad_id, self.qa_format, self.name)

    def fingerprint(self) -> str:
        """Content hash of tokens, labels, ids and groups."""
        h = hashlib.sha256()
        for x, y, i, g in zip(self.input_ids, self.labels, self.ids.tolist(), self.groups):
            h.update(np.int64(len(x)).tobytes() + x.tobytes() + y.tobytes() + np.int64(i).tobytes() + g.encode() + b"\0")
        return h.hexdigest()[:16]


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the columns past the longest row of a right-padded batch."""
    mask = batch["attention_mask"]
    width = int(mask.sum(1).max()) if mask.numel() else 0
    return {k: v[:, :width] for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ encoding


def qa_format(tokenizer) -> str:
    """``chat`` when the tokenizer has a chat template, else ``plain``."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def encode(corpus: Corpus, tokenizer, max_length: int, truncate_documents: bool = True) -> TokenDataset:
    """Tokenize every row of ``corpus`` (see the module docstring for the formats and the length policy)."""
    if max_length < 2:
        raise ExpungeError(f"max_length must be at least 2 tokens, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ExpungeError("the tokenizer has no EOS token; an answer or document would have no end to learn")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    fmt = qa_format(tokenizer) if any(p is not None for p in corpus.prompts) else None
    lead = tokenizer("", add_special_tokens=True)["input_ids"]  # the tokenizer's own leading tokens (BOS), context
    input_ids, labels, too_long, truncated = [], [], [], []
    for row, (prompt, target) in enumerate(zip(corpus.prompts, corpus.targets)):
        if prompt is None:
            context, answer = list(lead), tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
        else:
            context, answer = _qa_tokens(tokenizer, prompt, target, fmt, lead, eos)
        n = len(context) + len(answer)
        if n > max_length:
            if prompt is not None or not truncate_documents:
                too_long.append((row, n))
                continue
            truncated.append((row, n))
            answer = answer[:max_length - len(context)]
        input_ids.append(np.array(context + answer, dtype=np.int64))
        labels.append(np.array([IGNORE] * len(context) + answer, dtype=np.int64))
    if too_long:
        longest = max(n for _, n in too_long)
        kinds = "QA pair(s)" if all(corpus.is_qa(r) for r, _ in too_long) else "row(s)"
        raise ExpungeError(f"{len(too_long)} {kinds} are longer than max_length {max_length} tokens (longest {longest}, "
                           f"ids {[int(corpus.ids[r]) for r, _ in too_long[:5]]}); QA pairs are never cut, since that "
                           f"would cut the answer: raise --max-length to {longest} (within the model's positions) "
                           "or remove those rows")
    if truncated:
        warnings.warn(f"{len(truncated)} document(s) are longer than max_length {max_length} tokens (longest "
                      f"{max(n for _, n in truncated)}, ids {[int(corpus.ids[r]) for r, _ in truncated[:5]]}); "
                      f"each keeps its first {max_length} tokens. Raise --max-length to keep more.", stacklevel=2)
    return TokenDataset(tuple(input_ids), tuple(labels), corpus.ids, corpus.groups, pad, fmt, corpus.name)


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The tokens a QA pair's answer follows, as ``encode`` builds them (chat template with the generation
    prompt, or the plain ``Question: ... Answer:`` format): what a model is prompted with to answer."""
    if qa_format(tokenizer) == "chat":
        user = [{"role": "user", "content": question}]
        return tokenizer(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)["input_ids"]
    lead = tokenizer("", add_special_tokens=True)["input_ids"]
    return list(lead) + tokenizer(PLAIN_PROMPT.format(question=question), add_special_tokens=False)["input_ids"]


def _qa_tokens(tokenizer, question: str, answer: str, fmt: str, lead: list[int], eos: int) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) of one QA pair in the chat or plain format."""
    if fmt == "chat":
        user = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise ExpungeError("the tokenizer's chat template does not render the question as a prefix of the "
                               "conversation, so the answer cannot be told apart; use a tokenizer without a chat "
                               "template (plain Question/Answer format) or a standard template")
        return (tokenizer(prompt, add_special_tokens=False)["input_ids"],
                tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"])
    prompt = list(lead) + tokenizer(PLAIN_PROMPT.format(question=question), add_special_tokens=False)["input_ids"]
    return prompt, tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [eos]
