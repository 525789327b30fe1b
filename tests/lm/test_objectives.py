"""Unlearning objectives against hand computations on a tiny model, and NGDiff's normalised direction."""

import math

import numpy as np
import pytest
import torch

from expunge.errors import ExpungeError
from expunge.lm.objectives import (ascent_loss, global_norm, graddiff_loss, ngdiff_direction, npo_loss,
                                   sequence_logprobs, simnpo_loss)
from expunge.lm.train import row_losses

from .tiny import hand_logprob, qa_corpus, tiny_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s = tiny_setup(qa_corpus(tmp_path_factory.mktemp("qa"), 6))
    s.model.eval()
    return s


def hand_nll(model, data, rows) -> float:
    return float(np.mean([-lp / n for lp, n in (hand_logprob(model, data, r) for r in rows)]))


def test_sequence_logprobs_sum_the_target_tokens(setup):
    logp, counts = sequence_logprobs(setup.model, setup.data.batch([0, 1, 2]))
    logp = logp.detach()
    for k, row in enumerate([0, 1, 2]):
        expected, n = hand_logprob(setup.model, setup.data, row)
        assert float(logp[k]) == pytest.approx(expected, abs=2e-4) and int(counts[k]) == n


def test_ascent_and_graddiff_equal_their_hand_computed_losses(setup):
    model, data = setup.model, setup.data
    forget, retain = data.batch([0, 1]), data.batch([2, 3, 4])
    nll_f, nll_r = hand_nll(model, data, [0, 1]), hand_nll(model, data, [2, 3, 4])
    ascent = ascent_loss(model, forget)
    assert float(ascent.loss.detach()) == pytest.approx(-nll_f, abs=1e-5) and ascent.retain_nll is None
    diff = graddiff_loss(model, forget, retain, alpha=0.7, gamma=1.3)
    assert float(diff.loss.detach()) == pytest.approx(-1.3 * nll_f + 0.7 * nll_r, abs=1e-5)
    assert diff.forget_nll == pytest.approx(nll_f, abs=1e-5) and diff.retain_nll == pytest.approx(nll_r, abs=1e-5)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_npo_equals_its_hand_computation_against_another_reference(setup):
    model, data = setup.model, setup.data
    reference = np.array([hand_logprob(model, data, r)[0] for r in (0, 1)]) + np.array([3.0, -2.0])
    beta, alpha, gamma = 0.1, 0.5, 2.0
    got = npo_loss(model, data.batch([0, 1]), torch.tensor(reference, dtype=torch.float32), data.batch([2, 3]), beta,
                   alpha, gamma)
    forget_part = np.mean([-(2 / beta) * log_sigmoid(-beta * (hand_logprob(model, data, r)[0] - reference[k]))
                           for k, r in enumerate((0, 1))])
    assert float(got.loss.detach()) == pytest.approx(gamma * forget_part + alpha * hand_nll(model, data, [2, 3]), abs=1e-4)


def test_npo_with_the_model_as_its_own_reference_is_two_over_beta_log_two_plus_the_retain_part(setup):
    model, data = setup.model, setup.data
    forget, retain = data.batch([0, 1, 5]), data.batch([2, 3])
    reference = sequence_logprobs(model, forget)[0].detach()
    for beta in (0.1, 0.5):
        got = npo_loss(model, forget, reference, retain, beta=beta, alpha=1.0)
        expected = 2 / beta * math.log(2) + float(row_losses(model, retain).mean().detach())
        assert float(got.loss.detach()) == pytest.approx(expected, abs=1e-6)
    alone = npo_loss(model, forget, reference, None, beta=0.1)
    assert float(alone.loss.detach()) == pytest.approx(20 * math.log(2), abs=1e-6) and alone.retain_nll is None


def test_simnpo_is_length_normalised_and_needs_no_reference(setup):
    model, data = setup.model, setup.data
    beta, margin, alpha, gamma = 4.5, 0.3, 1.0, 0.125
    got = simnpo_loss(model, data.batch([0, 1]), data.batch([2]), beta, margin, alpha, gamma)
    per_token = [-lp / n for lp, n in (hand_logprob(model, data, r) for r in (0, 1))]
    forget_part = np.mean([-(2 / beta) * log_sigmoid(beta * nll - margin) for nll in per_token])
    assert float(got.loss.detach()) == pytest.approx(gamma * forget_part + alpha * hand_nll(model, data, [2]), abs=1e-5)
    assert got.forget_nll == pytest.approx(np.mean(per_token), abs=1e-5)


def test_ngdiff_direction_is_the_difference_of_two_unit_vectors(setup):
    model, data = setup.model, setup.data
    params = [p for p in model.parameters() if p.requires_grad]
    g_r = torch.autograd.grad(row_losses(model, data.batch([2, 3, 4])).mean(), params)
    g_f = torch.autograd.grad(row_losses(model, data.batch([0, 1])).mean(), params)
    direction, norm_r, norm_f = ngdiff_direction(g_r, g_f)
    assert norm_r == pytest.approx(global_norm(g_r)) and norm_f == pytest.approx(global_norm(g_f))
    unit_r = [g / norm_r for g in g_r]
    unit_f = [g / norm_f for g in g_f]
    assert global_norm(unit_r) == pytest.approx(1.0, abs=1e-6) and global_norm(unit_f) == pytest.approx(1.0, abs=1e-6)
    for d, ur, uf in zip(direction, unit_r, unit_f):
        torch.testing.assert_close(d, ur - uf)
    dot = lambda a, b: sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))  # noqa: E731
    cos = dot(unit_r, unit_f)
    assert global_norm(direction) == pytest.approx(math.sqrt(2 - 2 * cos), abs=1e-6)
    assert dot(direction, g_r) >= 0 >= dot(direction, g_f)  # descends the retain loss, ascends the forget loss


def test_ngdiff_direction_with_a_zero_or_broken_gradient(setup):
    g = [torch.ones(3), torch.ones(2)]
    zero = [torch.zeros(3), torch.zeros(2)]
    direction, _, norm_f = ngdiff_direction(g, zero)
    assert norm_f == 0 and global_norm(direction) == pytest.approx(1.0)
    with pytest.raises(ExpungeError, match="forget gradient is not finite"):
        ngdiff_direction(g, [torch.full((3,), float("nan")), torch.ones(2)])
    with pytest.raises(ExpungeError, match="same parameters"):
        ngdiff_direction(g, g[:1])
