"""TIES and DARE against slow per-element references written from the papers."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from expunge import ExpungeError
from expunge.merge import TaskVectors, dare, ties


def family(seed=0, tasks=3):
    """A base and ``tasks`` fine-tuned copies whose task vectors conflict in sign and have exact ties."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    models = []
    for n in range(tasks):
        model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
        model.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(100 + n)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
            # equal magnitudes across tasks, and masses that cancel exactly (the elected sign falls back to the majority)
            shift = torch.tensor([[0.25, -0.25, 0.0], [-0.25, 0.25, 0.0], [0.0, 0.0, 0.0]])[n % 3]
            model[2].bias.copy_(base[2].bias + shift)
        models.append(model)
    return base, models


def flat(vectors: TaskVectors, n: int) -> list[float]:
    return [float(x) for k in vectors.keys for x in vectors.stack[k][n].reshape(-1)]


def ties_reference(tau: list[list[float]], density: float) -> list[list[float]]:
    """Yadav et al. 2023, entry by entry: trim each task to its top ceil(density * d) magnitudes (ties at the
    threshold kept), elect the sign of the summed mass (0 -> the sign of the summed elected signs), each task's
    share of the disjoint mean over agreeing non-zero entries."""
    T, d = len(tau), len(tau[0])
    trimmed = []
    for n in range(T):
        threshold = sorted((abs(x) for x in tau[n]), reverse=True)[math.ceil(density * d) - 1]
        trimmed.append([x if abs(x) >= threshold else 0.0 for x in tau[n]])
    sign = lambda x: (x > 0) - (x < 0)
    elected = [sign(sum(trimmed[n][i] for n in range(T))) for i in range(d)]
    majority = sign(sum(elected)) or 1
    elected = [e if e != 0 else majority for e in elected]
    shares = [[0.0] * d for _ in range(T)]
    for i in range(d):
        agreeing = [n for n in range(T) if trimmed[n][i] != 0 and sign(trimmed[n][i]) == elected[i]]
        for n in agreeing:
            shares[n][i] = trimmed[n][i] / len(agreeing)
    return shares


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_the_slow_reference(density):
    base, models = family()
    vectors = TaskVectors.from_models(base, models)
    tau = [flat(vectors, n) for n in range(len(models))]
    processed = ties(vectors, density)
    expected = ties_reference(tau, density)
    for n in range(len(models)):
        assert np.allclose(flat(processed, n), expected[n], atol=1e-6)
    assert processed.processing == {"ties": {"density": density}}


def test_ties_with_a_shared_coefficient_is_the_ties_merge():
    """theta_0 + lambda * disjoint-mean(trimmed, elected) is what TIES-Merging outputs."""
    base, models = family(1)
    vectors = TaskVectors.from_models(base, models)
    processed = ties(vectors, 0.3)
    expected_shares = ties_reference([flat(vectors, n) for n in range(3)], 0.3)
    merged_vector = np.sum(expected_shares, axis=0)
    merged = processed.merge([0.8, 0.8, 0.8])
    theta0 = np.concatenate([base.state_dict()[k].reshape(-1).numpy() for k in vectors.keys])
    got = np.concatenate([merged[k].reshape(-1).numpy() for k in vectors.keys])
    assert np.allclose(got, theta0 + 0.8 * merged_vector, atol=1e-5)


def test_ties_of_one_untrimmed_vector_is_that_vector():
    base, models = family(tasks=1)
    vectors = TaskVectors.from_models(base, models)
    assert np.allclose(flat(ties(vectors, 1.0), 0), flat(vectors, 0))


def dare_reference(tau: list[list[float]], p: float, seed: int, sizes: list[int]) -> list[list[float]]:
    """Yu et al. 2024, entry by entry, drawing the same uniform numbers (task by task, entry by entry)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for row in tau:
        draws = [float(u) for size in sizes for u in torch.rand(size, generator=generator, dtype=torch.float64)]
        out.append([x / (1 - p) if u >= p else 0.0 for x, u in zip(row, draws)])
    return out


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_dare_matches_the_slow_reference(p):
    base, models = family()
    vectors = TaskVectors.from_models(base, models)
    tau = [flat(vectors, n) for n in range(3)]
    sizes = [vectors.stack[k][0].numel() for k in vectors.keys]
    processed = dare(vectors, p, seed=7)
    expected = dare_reference(tau, p, 7, sizes)
    for n in range(3):
        assert np.allclose(flat(processed, n), expected[n], rtol=1e-6, atol=1e-7)


def test_dare_is_seeded_and_keeps_the_expectation():
    base, models = family(tasks=1)
    big = nn.Linear(200, 100)
    tuned = nn.Linear(200, 100)
    with torch.no_grad():
        tuned.weight.copy_(big.weight + 0.01)
        tuned.bias.copy_(big.bias + 0.01)
    vectors = TaskVectors.from_models(big, [tuned])
    a, b, c = dare(vectors, 0.5, seed=1), dare(vectors, 0.5, seed=1), dare(vectors, 0.5, seed=2)
    assert torch.equal(a.stack["weight"], b.stack["weight"]) and not torch.equal(a.stack["weight"], c.stack["weight"])
    kept = (a.stack["weight"] != 0).double().mean()
    assert abs(float(kept) - 0.5) < 0.02
    mean = torch.stack([dare(vectors, 0.5, seed=s).stack["weight"] for s in range(200)]).mean(0)
    assert abs(float(mean.mean()) - 0.01) < 5e-4  # each entry's expectation is its own value


def test_bad_parameters_are_refused():
    base, models = family()
    vectors = TaskVectors.from_models(base, models)
    with pytest.raises(ExpungeError, match="density"):
        ties(vectors, 0.0)
    with pytest.raises(ExpungeError, match="drop probability"):
        dare(vectors, 1.0)
    processed = ties(vectors, 0.5)
    merged = processed.merge([1.0, 0.0, 0.0])  # no exact shortcut for processed vectors: base + share
    assert not torch.equal(merged["0.weight"], models[0].state_dict()["0.weight"])


def test_ties_on_hand_built_vectors():
    """Masses 0, 0 and 5: the first two entries take the majority sign (+), each keeps its agreeing task."""
    vectors = TaskVectors({"w": torch.zeros(3)}, {"w": torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, 3.0]])}, ["a", "b"])
    shares = ties(vectors, 1.0).stack["w"]
    assert torch.equal(shares, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.5]]))
    tied = ties(vectors, 0.5).stack["w"]  # top ceil(1.5) = 2 per task: the tied 1s are both kept
    assert torch.equal(tied, shares)
    trimmed = ties(vectors, 0.3).stack["w"]  # top 1 per task: only the third entries survive
    assert torch.equal(trimmed, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.5]]))
