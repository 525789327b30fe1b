"""LoRA through peft: default targets per architecture, only adapters train, merged copies predict the same."""

import pytest
import torch

from expunge.errors import ExpungeError
from expunge.lm import apply_lora, default_lora_targets, is_lora, merged, train_lm, weights_hash

from .tiny import qa_corpus, tiny_setup


@pytest.mark.parametrize("model, targets", [("tiny-llama", ["q_proj", "v_proj"]), ("tiny-gpt2", ["c_attn"])])
def test_lora_training_changes_only_the_adapters(tmp_path, model, targets):
    setup = tiny_setup(qa_corpus(tmp_path, 6), model, lora_rank=4, epochs=2, lr=0.05)
    peft_model = setup.model
    assert is_lora(peft_model) and sorted(peft_model.peft_config["default"].target_modules) == targets
    assert peft_model.peft_config["default"].lora_alpha == 8  # 2 * rank by default
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    result = train_lm(peft_model, setup.data, setup.recipe)
    assert result.steps == 6 and result.losses[-1] < result.losses[0]
    after = dict(peft_model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable  # the base weights did not move
    assert any("lora_B" in n for n in changed)  # B starts at zero: it must have learned


def test_adapters_start_from_the_seed_and_the_merged_copy_predicts_the_same(tmp_path):
    corpus = qa_corpus(tmp_path, 4)
    a = tiny_setup(corpus, lora_rank=2, seed=1)
    b = tiny_setup(corpus, lora_rank=2, seed=1)
    c = tiny_setup(corpus, lora_rank=2, seed=2)
    assert weights_hash(a.model) == weights_hash(b.model) != weights_hash(c.model)
    train_lm(a.model, a.data, a.recipe)
    plain = merged(a.model)
    assert not is_lora(plain) and is_lora(a.model)  # a copy: the trained adapters stay separate
    batch = a.data.batch([0, 1])
    with torch.no_grad():
        ours = a.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_unknown_targets_are_refused_with_the_models_linear_layers(tmp_path):
    setup = tiny_setup(qa_corpus(tmp_path, 2))
    with pytest.raises(ExpungeError, match="not modules of this model; its linear layers are.*q_proj"):
        apply_lora(setup.model, 2, targets=["query"])
    with pytest.raises(ExpungeError, match="at least 1"):
        apply_lora(setup.model, 0)

    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "oddformer"})()

    with pytest.raises(ExpungeError, match="no default LoRA target modules for architecture 'oddformer'"):
        default_lora_targets(Odd())
