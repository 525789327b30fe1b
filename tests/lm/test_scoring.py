"""Batched scoring against one row at a time: NLLs, token log-probabilities, greedy generation."""

import numpy as np
import pytest
import torch

from expunge.lm import train_lm
from expunge.lm.data import prompt_ids
from expunge.lm.scoring import generate, row_nlls, token_logprobs

from .tiny import qa_corpus, tiny_setup


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    s = tiny_setup(qa_corpus(tmp_path_factory.mktemp("qa"), 8), epochs=4, lr=2e-2)
    train_lm(s.model, s.data, s.recipe)
    return s


def test_batched_log_probabilities_equal_each_row_alone(trained):
    model, data = trained.model, trained.data
    model.train()  # scoring switches to eval mode and back
    got = token_logprobs(model, data, batch_size=3)
    assert model.training
    for row in range(len(data)):
        ids = torch.from_numpy(data.input_ids[row])
        with torch.no_grad():
            logp = torch.log_softmax(model.eval()(input_ids=ids[None]).logits[0].double(), -1)
        model.train()
        targets = [t for t in range(1, len(ids)) if data.labels[row][t] != -100]
        np.testing.assert_allclose(got[row], [float(logp[t - 1, ids[t]]) for t in targets], atol=2e-5)
    np.testing.assert_allclose(row_nlls(model, data, 5), [-g.mean() for g in got])


def greedy_alone(model, prompt, max_new, eos):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return ids[0, len(prompt):].tolist()


def test_greedy_generation_of_left_padded_batches_equals_each_prompt_alone(tmp_path):
    untrained = tiny_setup(qa_corpus(tmp_path, 8), seed=3)  # random weights: long, arbitrary continuations
    model, tok = untrained.model.eval(), untrained.tokenizer
    questions = ["What does alpha write about?", "What does beta gamma delta write about?", "Who?"]
    prompts = [prompt_ids(tok, q) for q in questions]
    assert len({len(p) for p in prompts}) == 3  # different lengths: the batch is padded
    got = generate(model, tok, prompts, max_new_tokens=12, batch_size=3)
    for prompt, text in zip(prompts, got):
        expected = tok.decode(greedy_alone(model, prompt, 12, tok.eos_token_id), skip_special_tokens=True).strip()
        assert text == expected
    assert got == generate(model, tok, prompts, max_new_tokens=12, batch_size=2)  # deterministic, any batching
    assert min(len(g) for g in got) > 5
    cut, = generate(model, tok, prompts[:1], max_new_tokens=12, stop=("zzz", got[0][4:6]))
    assert cut == got[0].split(got[0][4:6], 1)[0].strip()


def test_prompt_ids_are_the_tokens_training_puts_before_the_answer(trained):
    data, tok, corpus_question = trained.data, trained.tokenizer, "What does alpha write about?"
    ids = prompt_ids(tok, corpus_question)
    first = data.input_ids[0].tolist()
    assert first[:len(ids)] == ids and (data.labels[0][:len(ids)] == -100).all() and data.labels[0][len(ids)] != -100
