"""The TOFU evaluation: figures from hand-computed NLLs, forget quality against the retrained model, the
world-knowledge mode, and the shared TOFU files."""

import copy

import numpy as np
import pytest
import torch

from expunge.errors import ExpungeError
from expunge.lm import metrics, train_lm
from expunge.lm.corpus import Corpus
from expunge.lm.data import encode
from expunge.lm.tofu import TofuSplit, evaluate_tofu, load_tofu_split, load_tofu_splits, score_split

from .tiny import WORDS, hand_logprob, qa_rows, tiny_setup, without_shared

ROWS = qa_rows(12)


def split(name, rows, paraphrase="is writing", k=3):
    shift = lambda text, j: " ".join(WORDS[(WORDS.index(w) + j) % len(WORDS)] if w in WORDS else w  # noqa: E731
                                     for w in text.split())
    return TofuSplit(name, tuple(r["question"] for r in rows), tuple(r["answer"] for r in rows),
                     tuple(r["answer"].replace("writes", paraphrase) for r in rows) if paraphrase else None,
                     tuple(tuple(shift(r["answer"], j + 1) for j in range(k)) for r in rows))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    corpus = Corpus(tuple(r["question"] for r in ROWS), tuple(r["answer"] for r in ROWS), np.arange(len(ROWS)),
                    tuple(f"author-{i // 4}" for i in range(len(ROWS))))
    s = tiny_setup(corpus, epochs=20, lr=2e-2, vocab_size=400, max_length=64)  # long enough to answer
    train_lm(s.model, s.data, s.recipe)
    return s


def hand_nlls(model, tok, questions, answers):
    data = encode(Corpus(tuple(questions), tuple(answers), np.arange(len(answers)), ("x",) * len(answers)), tok, 64)
    return np.array([-lp / n for lp, n in (hand_logprob(model, data, r) for r in range(len(answers)))])


def test_split_scores_and_figures_follow_from_hand_computed_nlls(trained):
    model, tok = trained.model.eval(), trained.tokenizer
    forget, retain = split("forget01", ROWS[:4]), split("retain", ROWS[4:10], paraphrase="writes")  # as trained
    scores = score_split(model, tok, forget, max_new_tokens=8, batch_size=3)
    np.testing.assert_allclose(scores.answer_nll, hand_nlls(model, tok, forget.questions, forget.answers), atol=2e-5)
    np.testing.assert_allclose(scores.paraphrased_nll, hand_nlls(model, tok, forget.questions, forget.paraphrased), atol=2e-5)
    for j in range(3):
        np.testing.assert_allclose(scores.perturbed_nll[:, j],
                                   hand_nlls(model, tok, forget.questions, [p[j] for p in forget.perturbed]), atol=2e-5)
    np.testing.assert_allclose(scores.rouge, metrics.rouge_l(scores.generations, forget.answers, "recall"))

    out = evaluate_tofu(model, tok, {"forget": forget, "retain": retain}, max_new_tokens=8)
    f = out.figures
    ratios = np.exp(scores.paraphrased_nll - scores.perturbed_nll.mean(1))
    np.testing.assert_allclose(out.forget_ratios, ratios, rtol=1e-5)  # other batches: float32 rounding
    assert f["forget_truth_ratio"] == pytest.approx(np.mean(np.minimum(ratios, 1 / ratios)), rel=1e-5)
    assert f["forget_prob"] == pytest.approx(np.mean(np.exp(-scores.answer_nll)), rel=1e-5)
    r = out.scores["retain"]
    retain_ratios = np.exp(r.paraphrased_nll - r.perturbed_nll.mean(1))
    assert f["retain_truth_ratio"] == pytest.approx(np.mean(np.maximum(0, 1 - retain_ratios)))
    assert min(f["retain_prob"], f["retain_rouge"], f["retain_truth_ratio"]) > 0
    expected_utility = 3 / sum(1 / v for v in (f["retain_prob"], f["retain_rouge"], f["retain_truth_ratio"]))
    assert f["model_utility"] == pytest.approx(expected_utility)
    assert f["forget_quality"] is None and f["model_utility_scope"].startswith("retain only")


def test_a_model_identical_to_the_retrained_one_has_forget_quality_one(trained):
    splits = {"forget": split("forget01", ROWS[:8]), "retain": split("retain", ROWS[8:])}
    retrained = evaluate_tofu(trained.model, trained.tokenizer, splits, max_new_tokens=4)
    same = evaluate_tofu(copy.deepcopy(trained.model), trained.tokenizer, splits, reference=retrained, max_new_tokens=4)
    assert same.figures["forget_quality"] == 1.0
    fresh = tiny_setup(Corpus(tuple(r["question"] for r in ROWS), tuple(r["answer"] for r in ROWS), np.arange(12),
                              ("a",) * 12), tokenizer=trained.tokenizer, seed=9)  # never trained: other ratios
    other = evaluate_tofu(fresh.model, trained.tokenizer, splits, reference=retrained.forget_ratios, max_new_tokens=4)
    from scipy.stats import ks_2samp
    assert other.figures["forget_quality"] == pytest.approx(ks_2samp(other.forget_ratios, retrained.forget_ratios).pvalue)
    assert other.figures["forget_quality"] < 1.0


def test_with_world_knowledge_the_utility_spans_nine_figures(trained):
    splits = {"forget": split("forget01", ROWS[:3]), "retain": split("retain", ROWS[3:6]),
              "real_authors": split("real_authors", ROWS[6:9], paraphrase=False),
              "world_facts": split("world_facts", ROWS[9:], paraphrase=False)}
    out = evaluate_tofu(trained.model, trained.tokenizer, splits, max_new_tokens=4)
    parts = {k: v for k, v in out.figures.items() if k.startswith(("retain_", "real_authors_", "world_facts_"))}
    assert len(parts) == 9 and out.figures["model_utility"] == pytest.approx(metrics.model_utility(parts))
    ra = out.scores["real_authors"]
    assert out.figures["real_authors_prob"] == pytest.approx(metrics.normalised_answer_probability(ra.answer_nll, ra.perturbed_nll))
    np.testing.assert_allclose(ra.ratios, np.exp(ra.answer_nll - ra.perturbed_nll.mean(1)))  # against the answer
    assert out.figures["model_utility_scope"] == "retain, real authors, world facts"
    with pytest.raises(ExpungeError, match="both real_authors and world_facts"):
        evaluate_tofu(trained.model, trained.tokenizer, {k: splits[k] for k in ("forget", "retain", "real_authors")})
    with pytest.raises(ExpungeError, match="needs a forget split"):
        evaluate_tofu(trained.model, trained.tokenizer, {"retain": splits["retain"]})


def test_bad_splits_are_refused(tmp_path):
    with pytest.raises(ExpungeError, match="same number"):
        TofuSplit("forget01", ("q1", "q2"), ("a", "b"), None, (("x", "y"), ("z",)))
    with pytest.raises(ExpungeError, match="one entry per question"):
        TofuSplit("forget01", ("q1",), ("a", "b"), None, (("x",),))
    with pytest.raises(ExpungeError, match="not found"):
        load_tofu_split(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('[{"question": "q"}]')
    with pytest.raises(ExpungeError, match="not a TOFU perturbed file"):
        load_tofu_split(tmp_path / "bad.json")
    with pytest.raises(ExpungeError, match="unknown TOFU forget split"):
        load_tofu_splits(tmp_path, "forget50")


@without_shared("tofu/forget01.json")
def test_the_shared_tofu_files_load_as_splits():
    from .tiny import DATA

    splits = load_tofu_splits(DATA / "tofu", "forget01")
    shapes = {name: (len(s), len(s.perturbed[0]), s.paraphrased is not None) for name, s in splits.items()}
    assert shapes == {"forget": (40, 5, True), "retain": (400, 5, True), "real_authors": (100, 3, False),
                      "world_facts": (117, 3, False)}
    small = load_tofu_splits(DATA / "tofu", "forget05", world_knowledge=False, retain_rows=range(20))
    assert set(small) == {"forget", "retain"} and len(small["forget"]) == 200 and len(small["retain"]) == 20
    assert small["forget"].is_forget and not small["retain"].is_forget
    torch.manual_seed(0)
