"""TOFU and MUSE figures on hand-built cases."""

import math

import numpy as np
import pytest

from expunge.errors import ExpungeError
from expunge.lm import metrics


def test_truth_ratio_is_the_geometric_mean_of_perturbed_over_paraphrased_length_normalised_probabilities():
    # NLLs per token: paraphrase 1.0; perturbed 2.0 and 4.0 -> P ratio = exp(-3) / exp(-1)
    r = metrics.truth_ratios([1.0, 0.5], [[2.0, 4.0], [0.5, 0.5]])
    np.testing.assert_allclose(r, [math.exp(-2.0), 1.0])
    p_para, p_pert = math.exp(-1.0), math.sqrt(math.exp(-2.0) * math.exp(-4.0))
    assert r[0] == pytest.approx(p_pert / p_para)
    with pytest.raises(ExpungeError, match="shape"):
        metrics.truth_ratios([1.0], [2.0, 3.0])


def test_truth_ratio_scores_on_forget_and_other_splits():
    r = np.array([0.5, 2.0, 1.0, 0.25])
    assert metrics.truth_ratio_score(r, forget=True) == pytest.approx((0.5 + 0.5 + 1 + 0.25) / 4)
    assert metrics.truth_ratio_score(r, forget=False) == pytest.approx((0.5 + 0 + 0 + 0.75) / 4)


def test_forget_quality_is_the_ks_p_value():
    from scipy.stats import ks_2samp

    same = np.linspace(0.1, 2.0, 40)
    assert metrics.forget_quality(same, same.copy()) == 1.0
    far = metrics.forget_quality(np.linspace(0.01, 0.1, 40), np.linspace(0.9, 1.1, 40))
    assert far < 1e-10 and far == pytest.approx(ks_2samp(np.linspace(0.01, 0.1, 40), np.linspace(0.9, 1.1, 40)).pvalue)
    with pytest.raises(ExpungeError, match="both models"):
        metrics.forget_quality([], same)


def test_answer_probabilities():
    assert metrics.answer_probability([0.0, math.log(2)]) == pytest.approx(0.75)
    # P(answer) = 1, each of two perturbed answers 1/2: 1 / (1 + 1/2 + 1/2)
    assert metrics.normalised_answer_probability([0.0], [[math.log(2), math.log(2)]]) == pytest.approx(0.5)


def test_model_utility_is_a_harmonic_mean_and_zero_with_any_zero():
    assert metrics.model_utility({"a": 0.5, "b": 1.0}) == pytest.approx(2 / 3)
    assert metrics.model_utility([0.2, 0.0, 0.9]) == 0.0
    with pytest.raises(ExpungeError, match="finite and >= 0"):
        metrics.model_utility([0.5, float("nan")])


def test_rouge_l_recall_and_f1():
    recall = metrics.rouge_l(["the cat sat"], ["the cat sat on the mat"], "recall")
    f1 = metrics.rouge_l(["the cat sat"], ["the cat sat on the mat"], "f1")
    assert recall[0] == pytest.approx(0.5) and f1[0] == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert metrics.rouge_l(["Cats sitting."], ["cat sits"], "recall")[0] == pytest.approx(1.0)  # stemmed, case-free
    assert metrics.rouge_l([""], ["anything"], "f1")[0] == 0.0
    with pytest.raises(ExpungeError, match="predictions for"):
        metrics.rouge_l(["a"], ["a", "b"])


def test_min_k_takes_the_lowest_fraction_of_token_log_probabilities():
    scores = metrics.min_k_scores([[-1.0, -5.0, -2.0, -4.0, -3.0], [-0.5, -0.1]], k=0.4)
    assert scores[0] == pytest.approx(-4.5) and scores[1] == pytest.approx(-0.5)  # at least one token
    assert metrics.min_k_scores([[-1.0, -3.0]], k=1.0)[0] == pytest.approx(-2.0)
    with pytest.raises(ExpungeError, match="K must lie"):
        metrics.min_k_scores([[-1.0]], k=0)


def test_membership_auc_and_privleak():
    assert metrics.membership_auc([-1.0, -0.5], [-3.0, -2.0]) == 1.0
    assert metrics.membership_auc([-3.0, -2.0], [-1.0, -0.5]) == 0.0
    assert metrics.membership_auc([-1.0, -3.0], [-2.0, -4.0]) == pytest.approx(0.75)
    assert metrics.privleak(0.6, 0.5) == pytest.approx(0.2)
    assert metrics.privleak(0.5, 0.5) == 0.0
