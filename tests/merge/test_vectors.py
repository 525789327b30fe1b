"""Task vectors over state dicts: exact one-hot merges, the merge formula, and refusals."""

import numpy as np
import pytest
import torch
from torch import nn

from expunge import ExpungeError
from expunge.merge import TaskVectors, interpolation, load_state, state_hash
from expunge.models import small_cnn


def nudged(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """A copy of ``model`` moved a little, as fine-tuning would."""
    import copy

    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return out


def cnn(seed=0):
    torch.manual_seed(seed)
    return small_cnn(64, 3)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("build", [cnn, tiny_llama], ids=["zoo-cnn", "hf-llama"])
def test_one_hot_merge_is_the_fine_tuned_model_bit_for_bit(build):
    base = build()
    models = [nudged(base, 1), nudged(base, 2), nudged(base, 3)]
    vectors = TaskVectors.from_models(base, models)
    for n, model in enumerate(models):
        merged = vectors.merge(np.eye(3)[n])
        expected = model.state_dict()
        assert merged.keys() == expected.keys()
        assert all(torch.equal(merged[k], expected[k]) for k in expected)
    zero = vectors.merge([0, 0, 0])
    assert all(torch.equal(zero[k], v) for k, v in base.state_dict().items())


def test_merge_is_base_plus_weighted_task_vectors():
    base = cnn()
    models = [nudged(base, 1), nudged(base, 2)]
    vectors = TaskVectors.from_models(base, models, names=["a", "b"])
    c = [0.3, 0.7]
    merged = vectors.merge(c)
    for k, theta0 in base.state_dict().items():
        expected = theta0.double() + sum(w * (m.state_dict()[k].double() - theta0.double()) for w, m in zip(c, models))
        assert torch.allclose(merged[k].double(), expected, atol=1e-6)
        assert merged[k].dtype == theta0.dtype
    module = load_state(base, merged)
    assert torch.equal(module[1].weight, merged["1.weight"])


def test_integer_buffers_come_from_the_base_and_half_precision_vectors_are_float32():
    base = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(torch.bfloat16)
    tuned = nudged(base, 1)
    tuned[1].num_batches_tracked += 5
    vectors = TaskVectors.from_models(base, [tuned])
    assert "1.num_batches_tracked" not in vectors.stack
    assert all(v.dtype == torch.float32 for v in vectors.stack.values())
    merged = vectors.merge([0.5])
    assert merged["1.num_batches_tracked"] == base[1].num_batches_tracked
    assert merged["0.weight"].dtype == torch.bfloat16


def test_models_of_another_architecture_are_refused():
    base = cnn()
    with pytest.raises(ExpungeError, match="different architecture"):
        TaskVectors.from_models(base, [nudged(base, 1), small_cnn(64, 4)])  # another head
    with pytest.raises(ExpungeError, match="different architecture"):
        TaskVectors.from_models(base, [nn.Sequential(nn.Linear(64, 3))])
    with pytest.raises(ExpungeError, match="different architecture"):
        TaskVectors.from_models(base, [nudged(base, 1).double()])


def test_a_model_from_another_base_is_refused_unless_asked():
    base = cnn(0)
    stranger = cnn(1)  # same architecture, independent initialisation
    with pytest.raises(ExpungeError, match="does not look fine-tuned from this base"):
        TaskVectors.from_models(base, [nudged(base, 1), stranger])
    assert len(TaskVectors.from_models(base, [stranger], min_cosine=None)) == 1
    far = nudged(base, 2, scale=0.15)  # moved further than the stranger lies (5.6 vs 4.4), yet along the base
    assert len(TaskVectors.from_models(base, [far])) == 1


def test_empty_model_list_and_bad_names_are_refused():
    with pytest.raises(ExpungeError, match="no models to merge"):
        TaskVectors.from_models(cnn(), [])
    with pytest.raises(ExpungeError, match="distinct name"):
        TaskVectors.from_models(cnn(), [nudged(cnn(), 1), nudged(cnn(), 2)], names=["a", "a"])
    with pytest.raises(ExpungeError, match="state dict"):
        TaskVectors.from_models("model.pt", [cnn()])


def test_coefficients_outside_bounds_or_of_wrong_length_are_refused():
    base = cnn()
    vectors = TaskVectors.from_models(base, [nudged(base, 1), nudged(base, 2)])
    with pytest.raises(ExpungeError, match="outside the bounds"):
        vectors.merge([1.2, 0.0])
    with pytest.raises(ExpungeError, match="outside the bounds"):
        vectors.merge([-0.1, 0.0])
    with pytest.raises(ExpungeError, match="2 task vector"):
        vectors.merge([0.5])
    with pytest.raises(ExpungeError, match="finite"):
        vectors.merge([np.nan, 0.5])
    merged = vectors.merge([1.5, -0.5], bounds=(-1.0, 2.0))  # widened explicitly: allowed
    assert merged.keys() == base.state_dict().keys()


def test_interpolation_runs_from_before_to_after():
    before = cnn()
    after = nudged(before, 4, scale=1.0)
    family = interpolation(before, after)
    assert all(torch.equal(family.merge([1.0])[k], v) for k, v in after.state_dict().items())
    half = family.merge([0.5])
    assert torch.allclose(half["1.weight"], (before[1].weight + after[1].weight) / 2, atol=1e-6)


def test_hashes_identify_content():
    base = cnn()
    a, b = nudged(base, 1), nudged(base, 2)
    vectors = TaskVectors.from_models(base, [a, b])
    assert state_hash(a.state_dict()) == state_hash(nudged(base, 1).state_dict())
    assert state_hash(a.state_dict()) != state_hash(b.state_dict())
    described = vectors.describe()
    assert described["hashes"][0] != described["hashes"][1] and described["base_hash"] == state_hash(base.state_dict())
