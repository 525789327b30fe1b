"""The LM unlearning loop: batch pairing, determinism, NGDiff's step by hand, LoRA, failure recovery, errors."""

import copy

import numpy as np
import pytest
import torch

from expunge.errors import ExpungeError
from expunge.lm import apply_lora, train_lm
from expunge.lm.objectives import ngdiff_direction, sequence_logprobs
from expunge.lm.train import row_losses
from expunge.lm.unlearning import METHODS, NGDiff, GradDiff, make_unlearner, paired_batches

from .tiny import qa_corpus, tiny_setup


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    s = tiny_setup(qa_corpus(tmp_path_factory.mktemp("qa"), 12), epochs=2)
    train_lm(s.model, s.data, s.recipe)
    return s


def split(data):
    return data.take(np.arange(4)), data.take(np.arange(4, 12))


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_paired_batches_cover_the_forget_rows_each_epoch_and_stream_the_retain_rows():
    steps = paired_batches(5, 7, 2, 3, epochs=2, seed=4)
    assert len(steps) == 6  # 3 batches (2, 2, 1 rows) per epoch
    for epoch in (steps[:3], steps[3:]):
        assert sorted(np.concatenate([f for f, _ in epoch]).tolist()) == [0, 1, 2, 3, 4]
    stream = np.concatenate([r for _, r in steps])
    assert all(len(r) == 3 for _, r in steps) and sorted(stream[:7].tolist()) == list(range(7))  # a permutation first
    again = paired_batches(5, 7, 2, 3, epochs=2, seed=4)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(steps, again))
    assert len(paired_batches(5, 7, 2, 3, epochs=2, seed=4, max_steps=4)) == 4
    assert all(len(r) == 0 for _, r in paired_batches(5, 0, 2, 3, epochs=1, seed=0))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_deterministic_from_its_seed_and_changes_the_model(trained, name):
    forget, retain = split(trained.data)
    before = state(trained.model)
    models, results = [], []
    for seed in (3, 3, 4):
        model = copy.deepcopy(trained.model)
        results.append(make_unlearner(name, lr=3e-3, epochs=2, batch_size=2, seed=seed).update(model, forget, retain))
        models.append(state(model))
    assert same(models[0], models[1]) and results[0].losses == results[1].losses
    assert not same(models[0], models[2])  # another seed, another batch order
    assert not same(models[0], before) and same(state(trained.model), before)  # the copies changed, not the original
    r = results[0]
    assert r.steps == 4 and len(r.forget_nlls) == 4 and len(r.rates) == 4 and r.tokens > 0 and r.seconds > 0
    assert (len(r.retain_nlls) == 4) == METHODS[name].uses_retain
    assert r.forget_nll > r.forget_nlls[0]  # forgetting: the forget loss went up


def test_ngdiff_with_sgd_and_a_fixed_rate_steps_along_the_normalised_difference(trained):
    forget, retain = split(trained.data)
    model = copy.deepcopy(trained.model)
    method = NGDiff(lr=0.05, epochs=1, max_steps=1, batch_size=2, retain_batch_size=3, optimizer="sgd", rate="fixed",
                    seed=1)
    (forget_rows, retain_rows), = paired_batches(len(forget), len(retain), 2, 3, 1, seed=1, max_steps=1)
    hand = copy.deepcopy(trained.model)
    params = [p for p in hand.parameters() if p.requires_grad]
    g_r = torch.autograd.grad(row_losses(hand, retain.batch(retain_rows)).mean(), params)
    g_f = torch.autograd.grad(row_losses(hand, forget.batch(forget_rows)).mean(), params)
    direction, _, _ = ngdiff_direction(g_r, g_f)
    result = method.update(model, forget, retain)
    assert result.rates == [0.05]
    for p, h, d in zip(model.parameters(), params, direction):
        torch.testing.assert_close(p, h - 0.05 * d, atol=1e-6, rtol=1e-5)


def test_ngdiff_adapts_its_rate_on_the_retain_loss(trained):
    forget, retain = split(trained.data)
    result = NGDiff(lr=1e-3, epochs=2, batch_size=2, seed=0).update(copy.deepcopy(trained.model), forget, retain)
    assert result.rates[0] != 1e-3 and all(np.isfinite(result.rates)) and min(result.rates) > 0
    assert make_unlearner("ngdiff", **NGDiff(lr=1e-3).config()).config() == NGDiff(lr=1e-3).config()


def test_ngdiff_measures_its_rate_on_fresh_retain_rows_by_default(trained):
    forget, retain = split(trained.data)
    seen = []

    def rule(update, loss_along, lr):  # records the loss at the step's start, keeps the rate
        seen.append(loss_along(0.0))
        return lr

    plan = paired_batches(len(forget), len(retain), 2, 2 + 2, epochs=1, seed=0, max_steps=1)
    step_rows, probe_rows = plan[0][1][:2], plan[0][1][2:]
    assert not set(step_rows) & set(probe_rows)
    model = copy.deepcopy(trained.model).eval()
    with torch.no_grad():
        on_probe = float(row_losses(model, retain.batch(probe_rows, "cpu")).mean())
        on_step = float(row_losses(model, retain.batch(step_rows, "cpu")).mean())
    fresh = NGDiff(lr=1e-3, epochs=1, max_steps=1, batch_size=2, seed=0, rate=rule)
    assert fresh.rate_probe == "fresh" and NGDiff().rate == "gen" and fresh.probe_size() == 2
    result = fresh.update(model, forget, retain)
    assert seen == [pytest.approx(on_probe, rel=1e-5)]
    assert result.retain_nlls == [pytest.approx(on_step, rel=1e-5)]  # the step's own loss: the step's rows
    seen.clear()
    NGDiff(lr=1e-3, epochs=1, max_steps=1, batch_size=2, seed=0, rate=rule, rate_probe="batch").update(
        copy.deepcopy(trained.model), forget, retain)
    assert seen == [pytest.approx(on_step, rel=1e-5)]
    assert NGDiff(rate="fixed").probe_size() == 0
    with pytest.raises(ExpungeError, match="rate_probe"):
        NGDiff(rate_probe="same")


def test_ngdiff_estimates_its_rate_every_rate_every_steps_and_keeps_it_in_between(trained):
    forget, retain = split(trained.data)
    calls = []

    def rule(update, loss_along, lr):  # halves the rate at each estimate
        calls.append(lr)
        return lr / 2

    settings = dict(lr=1e-3, epochs=3, max_steps=7, batch_size=1, seed=0, rate=rule)
    lazy = NGDiff(rate_every=3, **settings).update(copy.deepcopy(trained.model), forget, retain)
    assert lazy.steps == 7 and len(calls) == 3  # steps 0, 3 and 6
    assert lazy.rates == [5e-4] * 3 + [2.5e-4] * 3 + [1.25e-4]
    calls.clear()
    eager = NGDiff(rate_every=1, **settings).update(copy.deepcopy(trained.model), forget, retain)
    assert len(calls) == 7 and eager.rates == [1e-3 / 2 ** (k + 1) for k in range(7)]
    assert NGDiff().rate_every == 4  # GeN's default laziness
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ExpungeError, match="rate_every"):
            NGDiff(rate_every=bad)


def test_npo_takes_its_reference_from_the_model_before_the_request(trained):
    forget, retain = split(trained.data)
    model = copy.deepcopy(trained.model).eval()
    with torch.no_grad():
        expected = sequence_logprobs(model, forget.batch(np.arange(len(forget))))[0]
    method = make_unlearner("npo", lr=1e-3, epochs=1, batch_size=2)
    method.update(model, forget, retain)
    torch.testing.assert_close(method._reference, expected, atol=1e-5, rtol=1e-6)


def test_under_lora_only_the_adapters_change(trained):
    forget, retain = split(trained.data)
    model = apply_lora(copy.deepcopy(trained.model), rank=2, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    make_unlearner("graddiff", lr=1e-2, epochs=1, batch_size=2).update(model, forget, retain)
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    assert any(not torch.equal(now[n], v) for n, v in adapters.items())
    with pytest.raises(ExpungeError, match="already carries LoRA adapters"):
        make_unlearner("graddiff", lora_rank=2).update(model, forget, retain)


def test_lora_rank_on_a_plain_model_merges_a_low_rank_change_into_it(trained):
    forget, retain = split(trained.data)
    model = copy.deepcopy(trained.model)
    before = state(model)
    make_unlearner("ngdiff", lr=1e-2, epochs=1, batch_size=2, lora_rank=2, rate="fixed").update(model, forget, retain)
    assert type(model) is type(trained.model) and not any("lora" in n for n in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert all(torch.linalg.matrix_rank(after[k] - before[k]) <= 2 for k in changed)


class FailsAtStep3(GradDiff):
    calls = 0

    def objective(self, model, forget, retain, forget_rows):
        FailsAtStep3.calls += 1
        if FailsAtStep3.calls == 3:
            raise RuntimeError("power cut")
        return super().objective(model, forget, retain, forget_rows)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_a_crash_in_the_middle_leaves_the_model_as_it_was(trained, lora_rank):
    forget, retain = split(trained.data)
    model = copy.deepcopy(trained.model)
    before = state(model)
    FailsAtStep3.calls = 0
    with pytest.raises(RuntimeError, match="power cut"):
        FailsAtStep3(lr=1e-2, epochs=2, batch_size=2, lora_rank=lora_rank).update(model, forget, retain)
    assert FailsAtStep3.calls == 3 and same(state(model), before)
    assert type(model) is type(trained.model) and all(p.requires_grad for p in model.parameters())


def test_bad_requests_are_refused_before_anything_changes(trained):
    forget, retain = split(trained.data)
    model = copy.deepcopy(trained.model)
    before = state(model)
    with pytest.raises(ExpungeError, match="needs retain rows"):
        make_unlearner("npo").update(model, forget, None)
    with pytest.raises(ExpungeError, match="share ids"):
        make_unlearner("graddiff").update(model, forget, trained.data)
    with pytest.raises(ExpungeError, match="forget set is empty"):
        make_unlearner("ascent").update(model, forget.take([]), retain)
    with pytest.raises(ExpungeError, match="unknown LM unlearning method"):
        make_unlearner("fisher")
    with pytest.raises(ExpungeError, match="has no setting"):
        make_unlearner("ascent", beta=0.1)
    with pytest.raises(ExpungeError, match="learning rate"):
        make_unlearner("npo", lr=0)
    with pytest.raises(ExpungeError, match="optimizer"):
        make_unlearner("simnpo", optimizer="lion")
    assert same(state(model), before)
    make_unlearner("ascent", lr=1e-3, epochs=1, batch_size=4).update(model, forget, None)  # ascent needs no retain set
