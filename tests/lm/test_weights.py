"""Weights as a run needs them: HF folders from_pretrained loads, initial states restored bit for bit, hashes."""

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import pytest

from expunge.errors import ExpungeError
from expunge.lm import load_state, save_pretrained, save_state, train_lm, weights_hash

from .tiny import qa_corpus, tiny_setup


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_current_weights_load_with_from_pretrained(tmp_path, lora_rank):
    setup = tiny_setup(qa_corpus(tmp_path, 4), lora_rank=lora_rank)
    train_lm(setup.model, setup.data, setup.recipe)
    save_pretrained(setup.model, setup.tokenizer, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    batch = setup.data.batch([0, 1])
    torch.testing.assert_close(logits(loaded, batch), logits(setup.model, batch), atol=1e-5, rtol=1e-5)
    if not lora_rank:
        assert weights_hash(loaded) == weights_hash(setup.model)


def test_a_saved_state_restores_bit_for_bit_and_stores_tied_weights_once(tmp_path):
    setup = tiny_setup(qa_corpus(tmp_path, 4), "tiny-gpt2")
    path = tmp_path / "initial.safetensors"
    digest = save_state(setup.model, path)
    assert digest == weights_hash(setup.model)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # tied: one copy on disk
    train_lm(setup.model, setup.data, setup.recipe)
    assert weights_hash(setup.model) != digest
    load_state(setup.model, path)
    assert weights_hash(setup.model) == digest
    assert setup.model.lm_head.weight is setup.model.transformer.wte.weight  # still tied


def test_trainable_only_state_restores_the_adapters(tmp_path):
    setup = tiny_setup(qa_corpus(tmp_path, 4), lora_rank=2)
    path = tmp_path / "adapters.safetensors"
    digest = save_state(setup.model, path, trainable_only=True)
    with safe_open(path, "pt") as f:
        assert all("lora_" in k for k in f.keys())
    train_lm(setup.model, setup.data, setup.recipe)
    load_state(setup.model, path)
    assert weights_hash(setup.model) == digest


def test_a_state_that_does_not_fit_is_refused_and_the_model_left_as_it_was(tmp_path):
    corpus = qa_corpus(tmp_path, 4)
    llama, gpt2 = tiny_setup(corpus), tiny_setup(corpus, "tiny-gpt2")
    save_state(gpt2.model, tmp_path / "gpt2.safetensors")
    digest = weights_hash(llama.model)
    with pytest.raises(ExpungeError, match="does not fit this model"):
        load_state(llama.model, tmp_path / "gpt2.safetensors")
    wider = tiny_setup(corpus, config=dict(hidden_size=48, num_attention_heads=2))
    save_state(wider.model, tmp_path / "wider.safetensors")
    with pytest.raises(ExpungeError, match="with shape"):
        load_state(llama.model, tmp_path / "wider.safetensors")
    assert weights_hash(llama.model) == digest
    with pytest.raises(ExpungeError, match="missing"):
        load_state(llama.model, tmp_path / "absent.safetensors")


def test_the_hash_sees_a_single_changed_weight(tmp_path):
    setup = tiny_setup(qa_corpus(tmp_path, 2))
    digest = weights_hash(setup.model)
    with torch.no_grad():
        setup.model.model.norm.weight[3] += 1e-7
    assert weights_hash(setup.model) != digest
