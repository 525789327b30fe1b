"""The LM trainer: answer-only loss, exact retraining after a deletion, the schedule, private training."""

import math

import numpy as np
import pytest
import torch

from expunge.errors import ExpungeError
from expunge.lm import (LMRecipe, dp_hook, lm_plan, load_state, make_schedule, row_losses, save_state, train_lm,
                        weights_hash)
from expunge.lm.corpus import Corpus
from expunge.lm.train import auto_rate, make_optimizer

from .tiny import qa_corpus, tiny_setup


def test_row_losses_equal_a_hand_computed_nll_over_the_answer_tokens(tmp_path):
    corpus = qa_corpus(tmp_path, 4)
    setup = tiny_setup(corpus)
    model, tok, data = setup.model.eval(), setup.tokenizer, setup.data
    got = row_losses(model, data.batch([0, 1, 2, 3])).detach()  # padded together
    for row in range(4):
        ids = torch.from_numpy(data.input_ids[row])
        with torch.no_grad():  # each row alone, unpadded
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
        answer = tok(" " + corpus.targets[row], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        start = len(ids) - len(answer)
        assert ids[start:].tolist() == answer
        nll = -sum(logp[t - 1, ids[t]] for t in range(start, len(ids))) / len(answer)
        assert float(got[row]) == pytest.approx(float(nll), abs=1e-5)


def test_a_step_descends_the_mean_of_row_losses_however_it_is_split_into_micro_batches(tmp_path):
    corpus = qa_corpus(tmp_path, 4)
    weights = []
    for batch_size, grad_accum in [(4, 1), (1, 4), (2, 2)]:
        setup = tiny_setup(corpus, batch_size=batch_size, grad_accum=grad_accum, optimizer="sgd", lr=0.5)
        if not weights:  # the reference: one SGD step along the gradient of mean_i loss_i, by hand
            reference = tiny_setup(corpus).model
            row_losses(reference, setup.data.batch(np.arange(4))).mean().backward()
            with torch.no_grad():
                expected = {n: p - 0.5 * p.grad for n, p in reference.named_parameters()}
        result = train_lm(setup.model, setup.data, setup.recipe)
        assert result.steps == 1 and result.rows == 4
        weights.append(dict(setup.model.named_parameters()))
    for name, value in expected.items():
        for w in weights:
            torch.testing.assert_close(w[name], value, atol=2e-6, rtol=1e-5)


def states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("model, config, settings", [
    ("tiny-llama", None, dict(optimizer="adamw", schedule="cosine", warmup_steps=2, max_grad_norm=0.5, grad_accum=2,
                              batch_size=1)),
    ("tiny-gpt2", dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),  # dropout: seeded per step
     dict(optimizer="sgd", momentum=0.9, schedule="linear", batch_size=2)),
    # GeN's rate, probing on the probe stream (where removed rows leave holes too), a cosine horizon
    ("tiny-gpt2", {"resid_pdrop": 0.1}, {"optimizer": "adamw", "schedule": "cosine", "lr_auto": True, "lr_every": 1,
                                         "batch_size": 2}),
])
def test_retraining_after_a_deletion_equals_training_from_scratch_on_the_remaining_rows(tmp_path, model, config,
                                                                                       settings):
    corpus = qa_corpus(tmp_path, 12)
    recipe = dict(settings, epochs=2, seed=5, lr=0.05)
    first = tiny_setup(corpus, model, config, **recipe)
    save_state(first.model, tmp_path / "initial.safetensors")
    full = train_lm(first.model, first.data, first.recipe)

    steps = lm_plan(first.recipe, len(corpus)).iterations(np.ones(len(corpus), bool), first.data.ids)
    removed = sorted({*steps[1].tolist(), int(steps[3][0])})  # all of step 1 (a hole) and one row of step 3
    active = np.ones(len(corpus), bool)
    active[removed] = False

    # retraining: a model whose weights were scrambled, restored from the saved initial weights
    again = tiny_setup(corpus, model, config, **recipe)
    with torch.no_grad():
        for p in again.model.parameters():
            p.normal_()
    load_state(again.model, tmp_path / "initial.safetensors")
    retrained = train_lm(again.model, again.data, again.recipe, active)

    # from scratch, on a corpus whose removed rows hold other texts (same tokenizer): they must not matter at all
    targets = list(corpus.targets)
    for r in removed:
        targets[r] = "Nothing at all."
    other = Corpus(corpus.prompts, tuple(targets), corpus.ids, corpus.groups)
    scratch = tiny_setup(other, model, config, tokenizer=first.tokenizer, **recipe)
    from_scratch = train_lm(scratch.model, scratch.data, scratch.recipe, active)

    assert states_equal(again.model, scratch.model)  # bit for bit
    assert weights_hash(again.model) == weights_hash(scratch.model) != weights_hash(first.model)
    assert retrained.losses == from_scratch.losses and retrained.rates == from_scratch.rates
    assert len(full.rates) == full.steps and len(retrained.rates) == retrained.steps
    if recipe.get("lr_auto"):  # GeN moved the rate, and differently once rows were removed
        assert len(set(full.rates)) > 1 and retrained.rates != full.rates[:len(retrained.rates)]
    holes = sum(len(rows) == 0 for rows in lm_plan(first.recipe, len(corpus)).iterations(active, first.data.ids))
    assert full.skipped == 0 and retrained.skipped == holes >= 1
    assert retrained.steps == full.steps - holes and retrained.rows == full.rows - 2 * len(removed)
    assert retrained.losses[0] == full.losses[0]  # the step before the first hole is untouched: nothing shifts


def test_training_twice_gives_the_same_bits_and_leaves_the_callers_random_state_alone(tmp_path):
    corpus = qa_corpus(tmp_path, 6)
    a = tiny_setup(corpus, "tiny-gpt2", dict(resid_pdrop=0.2), epochs=2)
    b = tiny_setup(corpus, "tiny-gpt2", dict(resid_pdrop=0.2), epochs=2)
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    train_lm(a.model, a.data, a.recipe)
    assert torch.equal(torch.random.get_rng_state(), state)
    train_lm(b.model, b.data, b.recipe)
    assert states_equal(a.model, b.model)


@pytest.mark.parametrize("schedule, expected", [
    ("constant", lambda t: min(1.0, t / 2)),
    ("linear", lambda t: t / 2 if t < 2 else (10 - t) / 8),
    ("cosine", lambda t: t / 2 if t < 2 else 0.5 * (1 + math.cos(math.pi * (t - 2) / 8))),
])
def test_schedules_warm_up_then_hold_or_decay(schedule, expected):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_schedule(optimizer, LMRecipe(schedule=schedule, warmup_steps=2, lr=0.1), 10)
    for t in range(10):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * expected(t), abs=1e-12), t
        optimizer.step()
        sched.step()
    with pytest.raises(ExpungeError, match="longer than the training"):
        make_schedule(optimizer, LMRecipe(warmup_steps=11), 10)


def test_private_training_through_the_hook_is_reproducible_and_accounted(tmp_path):
    corpus = qa_corpus(tmp_path, 8)
    runs = []
    for _ in range(2):
        setup = tiny_setup(corpus, batch_size=2, grad_accum=2, epochs=2)  # untied Llama: the engine handles it today
        result = train_lm(setup.model, setup.data, setup.recipe,
                          private=dp_hook(noise_multiplier=1.0, target_delta=1e-3, max_grad_norm=1.0))
        runs.append((setup.model, result))
    (a, ra), (b, rb) = runs
    assert ra.steps == 2 * round(8 / 4) and math.isfinite(ra.engine.epsilon()) and ra.engine.epsilon() > 0
    assert states_equal(a, b) and ra.losses == rb.losses
    fresh = tiny_setup(corpus).model
    assert weights_hash(a) != weights_hash(fresh)


def test_gens_probe_is_the_mean_row_loss_on_the_probe_streams_rows_with_dropout_off(tmp_path):
    corpus = qa_corpus(tmp_path, 12)
    setup = tiny_setup(corpus, "tiny-gpt2", {"resid_pdrop": 0.3, "embd_pdrop": 0.3}, lr_auto=True, epochs=2)
    active = np.ones(12, bool)
    active[[0, 5]] = False
    plan = lm_plan(setup.recipe, 12)
    optimizer = make_optimizer(setup.model, setup.recipe)
    gen, probe_at = auto_rate(setup.model, setup.data, setup.recipe, active, plan, optimizer, 12)
    probes = plan.probes().iterations(active, setup.data.ids)
    assert not all(np.array_equal(p, t) for p, t in zip(probes, plan.iterations(active, setup.data.ids)))
    setup.model.train()
    for t in (0, 3):
        probe_at(t)
        with torch.no_grad():  # as GeN calls it
            measured = float(gen.probe.closure()())
        assert setup.model.training  # the probe leaves the model as it found it
        setup.model.eval()
        with torch.no_grad():
            expected = float(row_losses(setup.model, setup.data.batch(probes[t])).mean())
        setup.model.train()
        assert measured == pytest.approx(expected, rel=1e-6)
    emptied = tiny_setup(corpus, lr_auto=True)
    hole = np.ones(12, bool)
    hole[lm_plan(emptied.recipe, 12).probes().iterations(hole, emptied.data.ids)[0]] = False
    gen, probe_at = auto_rate(emptied.model, emptied.data, emptied.recipe, hole, lm_plan(emptied.recipe, 12),
                              make_optimizer(emptied.model, emptied.recipe), 6)
    probe_at(0)
    assert math.isnan(float(gen.probe.closure()()))  # no probe rows: no estimate, GeN keeps the rate


def test_bad_training_requests_are_refused(tmp_path):
    setup = tiny_setup(qa_corpus(tmp_path, 4))
    with pytest.raises(ExpungeError, match="mark each of the 4 rows"):
        train_lm(setup.model, setup.data, setup.recipe, np.ones(3, bool))
    with pytest.raises(ExpungeError, match="no active rows"):
        train_lm(setup.model, setup.data, setup.recipe, np.zeros(4, bool))
    clipped = tiny_setup(qa_corpus(tmp_path, 4), max_grad_norm=1.0)
    with pytest.raises(ExpungeError, match="does not apply to private training"):
        train_lm(clipped.model, clipped.data, clipped.recipe, private=dp_hook(noise_multiplier=1.0))
    auto = tiny_setup(qa_corpus(tmp_path, 4), lr_auto=True)
    with pytest.raises(ExpungeError, match="not available for private training"):
        train_lm(auto.model, auto.data, auto.recipe, private=dp_hook(noise_multiplier=1.0))


def test_bfloat16_weights_train_with_float32_losses(tmp_path):
    setup = tiny_setup(qa_corpus(tmp_path, 4), dtype="bfloat16", epochs=3, lr=0.02)
    assert next(setup.model.parameters()).dtype == torch.bfloat16
    assert row_losses(setup.model, setup.data.batch([0])).dtype == torch.float32
    result = train_lm(setup.model, setup.data, setup.recipe)
    assert all(math.isfinite(x) for x in result.losses) and result.losses[-1] < result.losses[0]
