"""The TOFU evaluation of a causal LM: forget quality, model utility and the figures under them.

    splits = load_tofu_splits("…/tofu", forget="forget01")              # forget, retain, real_authors, world_facts
    ref = evaluate_tofu(retrained, tokenizer, splits)                     # the reference: exact retraining
    out = evaluate_tofu(unlearned, tokenizer, splits, reference=ref)
    out.figures["forget_quality"], out.figures["model_utility"]

Splits (TOFU's files): ``forget01/05/10.json`` (question, answer, paraphrased_answer, 5 perturbed_answer),
``retain_perturbed.json`` (the same fields, 400 questions of retained authors), ``real_authors_perturbed.json``
and ``world_facts_perturbed.json`` (question, answer, 3 perturbed_answer; the answer stands in for the
paraphrase). QA pairs are formatted as in training (data.encode: the tokenizer's chat template, or the plain
``Question: … Answer:`` format) and answers scored by their per-token NLL (scoring.row_nlls).

Figures (see metrics.py for the definitions, which follow TOFU's reference code and open-unlearning):
- forget split: ``forget_truth_ratio`` (mean min(R, 1/R)), ``forget_quality`` (KS p-value against the
  reference's ratios; None without a reference), ``forget_prob``, ``forget_rouge`` (ROUGE-L recall of greedy
  answers against the answer);
- ``retain_*``, ``real_authors_*``, ``world_facts_*``: probability (plain on retain; normalised over the
  perturbed answers on real authors and world facts), ROUGE-L recall, truth ratio (mean max(0, 1 - R));
- ``model_utility``: the harmonic mean of those nine. A model with no world knowledge (a tiny model trained
  from scratch on the run's texts) knows no real author and no world fact, and its utility there would be
  noise: ``world_knowledge=False`` leaves those splits out, reports the harmonic mean of the three retain
  figures, and says so in ``model_utility_scope``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ExpungeError
from .metrics import (answer_probability, forget_quality, model_utility, normalised_answer_probability,
                      rouge_l, truth_ratio_score, truth_ratios)
from .corpus import Corpus
from .data import encode, prompt_ids
from .models import max_positions
from .scoring import generate, row_nlls

FORGET_SPLITS = ("forget01", "forget05", "forget10")
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
FILES = {"retain": "retain_perturbed.json", "real_authors": "real_authors_perturbed.json",
         "world_facts": "world_facts_perturbed.json"}


@dataclass(frozen=True)
class TofuSplit:
    """Questions with their answer, paraphrased answer (None on real authors / world facts) and the same
    number of perturbed (false) answers each."""

    name: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    paraphrased: tuple[str, ...] | None
    perturbed: tuple[tuple[str, ...], ...]

    def __post_init__(self):
        n = len(self.questions)
        if n == 0:
            raise ExpungeError(f"TOFU split {self.name} has no questions")
        lengths = {len(self.answers), len(self.perturbed), n if self.paraphrased is None else len(self.paraphrased)}
        if lengths != {n}:
            raise ExpungeError(f"TOFU split {self.name}: questions, answers, paraphrases and perturbed answers must "
                               "have one entry per question")
        counts = {len(p) for p in self.perturbed}
        if len(counts) != 1 or 0 in counts:
            raise ExpungeError(f"TOFU split {self.name}: every question needs the same number (>= 1) of perturbed "
                               f"answers, got {sorted(counts)}")

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def is_forget(self) -> bool:
        return self.name.startswith("forget")

    def take(self, rows) -> TofuSplit:
        rows = [int(r) for r in rows]
        pick = lambda xs: tuple(xs[r] for r in rows)  # noqa: E731
        return TofuSplit(self.name, pick(self.questions), pick(self.answers),
                         None if self.paraphrased is None else pick(self.paraphrased), pick(self.perturbed))


def load_tofu_split(path, name: str | None = None) -> TofuSplit:
    """One of TOFU's perturbed files (a JSON array or JSON lines)."""
    path = Path(path)
    if not path.is_file():
        raise ExpungeError(f"{path} not found; TOFU's evaluation files live in the shared data folder's tofu/")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    name = name or path.stem.removesuffix("_perturbed")
    try:
        paraphrased = tuple(r["paraphrased_answer"] for r in records) if "paraphrased_answer" in records[0] else None
        return TofuSplit(name, tuple(r["question"] for r in records), tuple(r["answer"] for r in records), paraphrased,
                         tuple(tuple(r["perturbed_answer"]) for r in records))
    except (KeyError, TypeError, IndexError) as e:
        raise ExpungeError(f"{path} is not a TOFU perturbed file (question, answer, perturbed_answer): {e}") from e


def load_tofu_splits(folder, forget: str = "forget01", world_knowledge: bool = True,
                     retain_rows=None) -> dict[str, TofuSplit]:
    """The forget split and the utility splits from TOFU's folder; ``retain_rows`` keeps only those rows of
    retain_perturbed (e.g. the questions of authors a run trained on)."""
    if forget not in FORGET_SPLITS:
        raise ExpungeError(f"unknown TOFU forget split {forget!r}; choose one of {', '.join(FORGET_SPLITS)}")
    folder = Path(folder)
    splits = {"forget": load_tofu_split(folder / f"{forget}.json", forget)}
    for name in UTILITY_SPLITS if world_knowledge else ("retain",):
        splits[name] = load_tofu_split(folder / FILES[name], name)
    if retain_rows is not None:
        splits["retain"] = splits["retain"].take(retain_rows)
    return splits


@dataclass
class TofuScores:
    """What a model says on one split: per-question NLL of the answer, the paraphrase (if any) and each perturbed
    answer (shape questions x k), its greedy answers and their ROUGE-L recall."""

    answer_nll: np.ndarray
    paraphrased_nll: np.ndarray | None
    perturbed_nll: np.ndarray
    generations: list[str]
    rouge: np.ndarray

    @property
    def ratios(self) -> np.ndarray:
        """Truth ratios, against the paraphrase where the split has one, else against the answer."""
        base = self.paraphrased_nll if self.paraphrased_nll is not None else self.answer_nll
        return truth_ratios(base, self.perturbed_nll)


def score_split(model, tokenizer, split: TofuSplit, *, max_new_tokens: int = 128, batch_size: int = 16,
                max_length: int | None = None) -> TofuScores:
    """Score every answer of ``split`` and generate the model's own (see the module docstring)."""
    max_length = max_length or max_positions(model) or 2048
    n, k = len(split), len(split.perturbed[0])

    def nlls(questions, answers):
        corpus = Corpus(tuple(questions), tuple(answers), np.arange(len(answers)), ("tofu",) * len(answers), split.name)
        return row_nlls(model, encode(corpus, tokenizer, max_length), batch_size)

    answer = nlls(split.questions, split.answers)
    paraphrased = nlls(split.questions, split.paraphrased) if split.paraphrased is not None else None
    perturbed = nlls([q for q in split.questions for _ in range(k)],
                     [a for answers in split.perturbed for a in answers]).reshape(n, k)
    answers = generate(model, tokenizer, [prompt_ids(tokenizer, q) for q in split.questions], max_new_tokens, batch_size)
    return TofuScores(answer, paraphrased, perturbed, answers, rouge_l(answers, split.answers, "recall"))


@dataclass
class TofuEvaluation:
    """The figures (see the module docstring), the forget split's truth ratios (what a later evaluation's
    forget quality is tested against) and each split's scores."""

    figures: dict
    forget_ratios: np.ndarray
    scores: dict[str, TofuScores] = field(repr=False)

    def to_dict(self) -> dict:
        return dict(self.figures, forget_truth_ratios=self.forget_ratios.tolist())


def evaluate_tofu(model, tokenizer, splits: dict[str, TofuSplit], *, reference=None, max_new_tokens: int = 128,
                  world_new_tokens: int | None = None, batch_size: int = 16,
                  max_length: int | None = None) -> TofuEvaluation:
    """TOFU's figures for ``model`` on ``splits`` (``forget`` and ``retain`` required; ``real_authors`` and
    ``world_facts`` both or neither). ``reference``: the retrained model's TofuEvaluation (or its forget truth
    ratios) for the forget quality. Greedy answers stop after ``max_new_tokens``; on real authors and world facts,
    whose answers are a few words, after ``world_new_tokens`` (default the same)."""
    if "forget" not in splits or "retain" not in splits:
        raise ExpungeError("the TOFU evaluation needs a forget split and the retain split")
    world = [s for s in ("real_authors", "world_facts") if s in splits]
    if len(world) == 1:
        raise ExpungeError("give both real_authors and world_facts (a model with world knowledge) or neither")
    unknown = sorted(set(splits) - {"forget", *UTILITY_SPLITS})
    if unknown:
        raise ExpungeError(f"unknown TOFU split name(s) {unknown}; use forget, retain, real_authors, world_facts")
    options = dict(batch_size=batch_size, max_length=max_length)
    tokens = {name: world_new_tokens if name in ("real_authors", "world_facts") and world_new_tokens else max_new_tokens
              for name in splits}
    scores = {name: score_split(model, tokenizer, split, max_new_tokens=tokens[name], **options)
              for name, split in splits.items()}
    forget = scores["forget"]
    figures = {"forget_split": splits["forget"].name, "forget_rows": len(splits["forget"]),
               "forget_truth_ratio": truth_ratio_score(forget.ratios, forget=True),
               "forget_prob": answer_probability(forget.answer_nll),
               "forget_rouge": float(forget.rouge.mean())}
    if reference is not None:
        ref = reference.forget_ratios if isinstance(reference, TofuEvaluation) else np.asarray(reference)
        figures["forget_quality"] = forget_quality(forget.ratios, ref)
    else:
        figures["forget_quality"] = None
    utility = {}
    for name in ("retain", *world):
        s = scores[name]
        prob = (answer_probability(s.answer_nll) if name == "retain"
                else normalised_answer_probability(s.answer_nll, s.perturbed_nll))
        utility.update({f"{name}_prob": prob, f"{name}_rouge": float(s.rouge.mean()),
                        f"{name}_truth_ratio": truth_ratio_score(s.ratios, forget=False)})
    figures.update(utility)
    figures["model_utility"] = model_utility(utility)
    figures["model_utility_scope"] = ("retain, real authors, world facts" if world else
                                      "retain only (no real-author or world-fact splits: a model without world knowledge)")
    return TofuEvaluation(figures, forget.ratios, scores)
