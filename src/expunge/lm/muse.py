"""The MUSE-News evaluation of a causal LM: verbatim memorisation, knowledge memorisation and privacy leakage.

    data = load_muse("…/muse_news")
    ref = evaluate_muse(retrained, tokenizer, data)
    out = evaluate_muse(unlearned, tokenizer, data, reference=ref)

- VerbMem: greedy continuation (``max_new_tokens``, MUSE: 128) of each ``verbmem/forget.json`` prompt, scored
  by ROUGE-L F1 against the true continuation cut to the same number of tokens. ``prompt_tokens`` keeps only
  the last N tokens of each prompt (MUSE's prompts run to ~900 tokens: a CPU budget's option, off by default).
- KnowMem: each question of ``knowmem/{forget,retain2}_qa.json`` after the split's in-context examples
  (``*_qa_icl.json``) in MUSE's plain ``Question: …\\nAnswer: …`` layout, greedy answers of at most 32 tokens
  cut at a blank line or the next "Question", ROUGE-L F1 against the answer (open-unlearning's settings).
- PrivLeak: Min-K% Prob (K = 40%) of ``privleak/forget.json`` (members) and ``privleak/holdout.json`` (never
  trained on) texts, the AUC of telling them apart, and (AUC - AUC_retrain) / AUC_retrain against the
  retrained model. Texts are encoded as documents (BOS, text, EOS) and cut at ``max_length`` tokens.

What the shared copy lacks (its README): ``raw/retain1``, ``raw/retain2``, ``raw/holdout`` and ``scal/``. So a
target cannot be trained on MUSE's full corpus as the benchmark's (forget + retain1 + retain2 news), the
utility set (KnowMem on retain2) has QA but not the articles behind them, and there is no scalability split; the
privleak texts (100 forget, 100 holdout, 100 retain2) and the 889 forget articles are there. A run trained on
some of these texts is judged on what it was trained on: pass the items that apply (``MuseData.take``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import ExpungeError
from .metrics import membership_auc, min_k_scores, privleak, rouge_l
from .corpus import Corpus
from .data import encode
from .models import max_positions
from .scoring import generate, token_logprobs

KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")


@dataclass(frozen=True)
class MuseData:
    """MUSE-News evaluation items: VerbMem (prompt, continuation) pairs, KnowMem QA with their in-context
    examples, and the PrivLeak member / non-member texts."""

    verbmem: tuple[tuple[str, str], ...] = ()
    knowmem_forget: tuple[tuple[str, str], ...] = ()
    knowmem_retain: tuple[tuple[str, str], ...] = ()
    icl_forget: tuple[tuple[str, str], ...] = ()
    icl_retain: tuple[tuple[str, str], ...] = ()
    privleak_forget: tuple[str, ...] = ()
    privleak_holdout: tuple[str, ...] = ()

    def take(self, **counts) -> MuseData:
        """The first ``n`` items of each named part, e.g. ``take(verbmem=20, knowmem_forget=30)``."""
        unknown = sorted(set(counts) - set(self.__dataclass_fields__))
        if unknown:
            raise ExpungeError(f"unknown MUSE part(s) {unknown}; the parts are {sorted(self.__dataclass_fields__)}")
        return replace(self, **{k: getattr(self, k)[:n] for k, n in counts.items()})


def load_muse(folder) -> MuseData:
    """The MUSE-News evaluation files under ``folder`` (see the module docstring)."""
    folder = Path(folder)

    def read(relative):
        path = folder / relative
        if not path.is_file():
            raise ExpungeError(f"{path} not found; MUSE-News lives in the shared data folder's muse_news/")
        return json.loads(path.read_text(encoding="utf-8"))

    qa = lambda rows: tuple((r["question"], r["answer"]) for r in rows)  # noqa: E731
    return MuseData(verbmem=tuple((r["prompt"], r["gt"]) for r in read("verbmem/forget.json")),
                    knowmem_forget=qa(read("knowmem/forget_qa.json")), knowmem_retain=qa(read("knowmem/retain2_qa.json")),
                    icl_forget=qa(read("knowmem/forget_qa_icl.json")), icl_retain=qa(read("knowmem/retain2_qa_icl.json")),
                    privleak_forget=tuple(read("privleak/forget.json")),
                    privleak_holdout=tuple(read("privleak/holdout.json")))


def verbmem(model, tokenizer, items, *, max_new_tokens: int = 128, prompt_tokens: int | None = None,
            batch_size: int = 8) -> np.ndarray:
    """ROUGE-L F1 of the greedy continuation of each (prompt, continuation) against the continuation."""
    lead = tokenizer("", add_special_tokens=True)["input_ids"]
    prompts = []
    for prompt, _ in items:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prompts.append(list(lead) + (ids[-prompt_tokens:] if prompt_tokens else ids))
    truths = [tokenizer.decode(tokenizer(gt, add_special_tokens=False)["input_ids"][:max_new_tokens]) for _, gt in items]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return rouge_l(outputs, truths, "f1")


def knowmem(model, tokenizer, qa, icl=(), *, max_new_tokens: int = 32, batch_size: int = 8) -> np.ndarray:
    """ROUGE-L F1 of the greedy answer to each question (after the in-context examples) against its answer."""
    context = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in icl)
    lead = tokenizer("", add_special_tokens=True)["input_ids"]
    prompts = [list(lead) + tokenizer(f"{context}Question: {q}\nAnswer:", add_special_tokens=False)["input_ids"]
               for q, _ in qa]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop=KNOWMEM_STOP)
    return rouge_l(outputs, [a for _, a in qa], "f1")


def min_k_of_texts(model, tokenizer, texts, *, k: float = 0.4, max_length: int | None = None,
                   batch_size: int = 8) -> np.ndarray:
    """Min-K% Prob of each text, encoded as a document cut at ``max_length`` tokens."""
    max_length = max_length or max_positions(model) or 2048
    corpus = Corpus((None,) * len(texts), tuple(texts), np.arange(len(texts)), ("privleak",) * len(texts))
    with warnings.catch_warnings():  # cutting long texts at max_length is this function's documented behaviour
        warnings.filterwarnings("ignore", message=".*longer than max_length.*")
        data = encode(corpus, tokenizer, max_length)
    return min_k_scores(token_logprobs(model, data, batch_size), k)


@dataclass
class MuseEvaluation:
    figures: dict
    auc: float | None
    details: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return dict(self.figures)


def evaluate_muse(model, tokenizer, data: MuseData, *, reference=None, k: float = 0.4, verbmem_new_tokens: int = 128,
                  prompt_tokens: int | None = None, knowmem_new_tokens: int = 32, max_length: int | None = None,
                  batch_size: int = 8) -> MuseEvaluation:
    """MUSE's figures on whichever parts ``data`` holds: ``verbmem_forget``, ``knowmem_forget``,
    ``knowmem_retain``, ``privleak_auc`` and, with the retrained model's evaluation (or AUC) as ``reference``,
    ``privleak``."""
    figures, details, auc = {}, {}, None
    if data.verbmem:
        details["verbmem"] = verbmem(model, tokenizer, data.verbmem, max_new_tokens=verbmem_new_tokens,
                                     prompt_tokens=prompt_tokens, batch_size=batch_size)
        figures["verbmem_forget"] = float(details["verbmem"].mean())
    knowmem_parts = (("forget", data.knowmem_forget, data.icl_forget), ("retain", data.knowmem_retain, data.icl_retain))
    for part, qa, icl in knowmem_parts:
        if qa:
            details[f"knowmem_{part}"] = knowmem(model, tokenizer, qa, icl, max_new_tokens=knowmem_new_tokens,
                                                 batch_size=batch_size)
            figures[f"knowmem_{part}"] = float(details[f"knowmem_{part}"].mean())
    if data.privleak_forget and data.privleak_holdout:
        options = dict(k=k, max_length=max_length, batch_size=batch_size)
        members = min_k_of_texts(model, tokenizer, data.privleak_forget, **options)
        others = min_k_of_texts(model, tokenizer, data.privleak_holdout, **options)
        auc = membership_auc(members, others)
        details.update(min_k_forget=members, min_k_holdout=others)
        figures["privleak_auc"] = auc
        ref = reference.auc if isinstance(reference, MuseEvaluation) else reference
        figures["privleak"] = privleak(auc, ref) if ref is not None else None
    if not figures:
        raise ExpungeError("the MUSE data holds nothing to evaluate")
    return MuseEvaluation(figures, auc, details)
