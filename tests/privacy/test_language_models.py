"""make_private on Hugging Face causal LMs (tiny configs, float64) against a per-row autograd loop.

GPT-2, Llama, Qwen2 and GPT-NeoX, each with tied and untied input/output embeddings, padded batches with an
attention mask and labels masked with -100 (padding and a prompt), all-layer and group-wise clipping, LoRA
adapters through peft; a threshold at the median per-row norm, so that some rows are clipped and some not.
"""
import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from expunge.errors import ExpungeError
from expunge.privacy import causal_lm_loss, make_private

from .tiny_lms import ARCHITECTURES, VOCAB, build, with_lora

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier 0")

TOL = 1e-6
B, T = 6, 10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is faster, and immune to a busy machine's other jobs
    (with two threads on two shared cores, each small product waits for the slower thread: 40x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(seed=0, left_pad=False):
    """Token ids (B, T), an attention mask with padding on rows 1, 3 and 4, and labels: the ids, with -100 on
    padding and on a prompt of 3 tokens in rows 0 and 2 (loss on the answer only)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for row, pad in ((1, 3), (3, 5), (4, 1)):
        if left_pad:
            mask[row, :pad] = 0
        else:
            mask[row, T - pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = labels[2, :3] = -100
    return ids, mask, labels


def row_loss(model, ids, mask, labels, reduction="mean"):
    return causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels, reduction=reduction)


def per_row_grads(model, ids, mask, labels):
    named = OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    rows = []
    for i in range(len(ids)):
        value = row_loss(model, ids[i:i + 1], mask[i:i + 1], labels[i:i + 1])
        grads = torch.autograd.grad(value, list(named.values()), allow_unused=True)
        rows.append([torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, named.values())])
    return OrderedDict((n, torch.stack([r[j] for r in rows])) for j, n in enumerate(named))


def reference(per_row, groups, C):
    threshold = C / math.sqrt(len(groups))
    assert sorted(n for g in groups for n in g) == sorted(per_row)
    total = {n: torch.zeros_like(g[0]) for n, g in per_row.items()}
    factors = np.zeros((B, len(groups)))
    for i in range(B):
        for k, group in enumerate(groups):
            norm = math.sqrt(sum(per_row[n][i].pow(2).sum().item() for n in group))
            factors[i, k] = c = min(1.0, threshold / norm)
            for n in group:
                total[n] += c * per_row[n][i]
    return total, factors


def reference_groups(names, clipping):
    """Groups of parameter names as the engine documents them: module by module (layer-wise), or runs that
    start at each head in the list (names before the first head join the first group)."""
    if clipping == "all-layer":
        return [names]
    if clipping == "layer-wise":
        out = OrderedDict()
        for n in names:
            out.setdefault(n.rsplit(".", 1)[0], []).append(n)
        return list(out.values())
    groups, current = [], None
    for n in names:
        head = next((h for h in clipping if n == h or n.startswith(h + ".")), None)
        if not groups or (head is not None and head != current):
            groups.append([])
            current = head if head is not None else current
        groups[-1].append(n)
    return groups


def engine_sum(model, data, C, clipping):
    ids, mask, labels = data
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine = make_private(model, opt, data, batch_size=B, noise_multiplier=0.0, max_grad_norm=C, clipping=clipping)
    engine.optimizer.zero_grad()
    row_loss(model, ids, mask, labels).backward()
    engine.optimizer.step()
    out = OrderedDict((n, p.grad * B) for n, p in model.named_parameters() if p.requires_grad)
    frozen = [p.grad for p in model.parameters() if not p.requires_grad]
    engine.detach()
    return out, engine, frozen


def check(model, clipping="all-layer", data=None):
    data = data or batch()
    per_row = per_row_grads(copy.deepcopy(model), *data)
    norms = torch.sqrt(sum(g.reshape(B, -1).pow(2).sum(1) for g in per_row.values()))
    C = float(norms.quantile(0.5))  # half the rows clipped
    groups = reference_groups(list(per_row), clipping)
    ref, factors = reference(per_row, groups, C)
    assert (factors < 1).any() and (factors == 1).any(), "the threshold must clip some rows and not others"
    got, engine, frozen = engine_sum(model, data, C, clipping)
    assert list(got) == list(ref)
    assert all(gr is None for gr in frozen), "frozen parameters must get no gradient"
    err = max(((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref)
    assert err < TOL, f"relative error {err:.3g}"
    return engine


HEADS = {"gpt2": ["transformer.h.0", "transformer.h.1", "transformer.ln_f"],
         "llama": ["model.layers.0", "model.layers.1", "model.norm"],
         "qwen2": ["model.layers.0", "model.layers.1", "model.norm"],
         "gpt-neox": ["gpt_neox.layers.0", "gpt_neox.layers.1", "gpt_neox.final_layer_norm"]}


@pytest.mark.parametrize("clipping", ["all-layer", "layer-wise", "heads"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_clipped_sum_equals_the_per_row_loop(arch, tied, clipping):
    model = build(arch, tied)
    engine = check(model, HEADS[arch] if clipping == "heads" else clipping)
    if tied:  # the tied weight is one parameter: in one group, used by two layers
        weight = model.get_input_embeddings().weight
        group = [g for g in engine.groups if any(h.params[p] is weight for h, p in g.members)]
        assert len(group) == 1 and len(group[0].tied) == 1 and len(group[0].tied[0]) == 2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_left_padding(arch):
    check(build(arch, tied=True, seed=1), data=batch(seed=1, left_pad=True))


@pytest.mark.parametrize("clipping", ["all-layer", "layer-wise"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_adapters_clip_the_trainable_parameters_only(arch, tied, clipping):
    model = with_lora(build(arch, tied, seed=2), arch)
    engine = check(model, clipping)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all("lora_" in h.name for h in engine.handlers)


def test_hugging_face_loss_summed_over_tokens():
    """The model's own loss with num_items_in_batch=1 is the sum over every counted token: a sum over rows
    (loss_reduction="sum") of each row's summed token losses; the engine clips those rows exactly."""
    model = build("llama", tied=True, seed=3)
    ids, mask, labels = batch(seed=3)
    named = OrderedDict((n, p) for n, p in model.named_parameters())
    rows = []
    for i in range(B):
        out = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], labels=labels[i:i + 1],
                    num_items_in_batch=1)
        # (the model's loss is taken in float32 even for a float64 model)
        assert torch.allclose(out.loss.double(), causal_lm_loss(out.logits, labels[i:i + 1], per_row="sum"), rtol=1e-6)
        rows.append(torch.autograd.grad(out.loss, list(named.values())))
    per_row = OrderedDict((n, torch.stack([r[j] for r in rows])) for j, n in enumerate(named))
    norms = torch.sqrt(sum(g.reshape(B, -1).pow(2).sum(1) for g in per_row.values()))
    C = float(norms.quantile(0.5))
    ref, _ = reference(per_row, [list(named)], C)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = make_private(model, opt, (ids, mask, labels), batch_size=B, noise_multiplier=0.0, max_grad_norm=C,
                          loss_reduction="sum")
    model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=1).loss.backward()
    engine.optimizer.step()
    err = max(((p.grad * B - ref[n]).norm() / ref[n].norm()).item() for n, p in named.items())
    assert err < TOL


def test_causal_lm_loss_is_the_mean_over_each_rows_counted_tokens():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 1, -100], [2, 0, -100, 4]])
    logp = torch.log_softmax(logits, -1)
    row0 = -(logp[0, 0, 3] + logp[0, 1, 1]) / 2  # position t predicts label t + 1
    row1 = -(logp[1, 0, 0] + logp[1, 2, 4]) / 2
    assert torch.allclose(causal_lm_loss(logits, labels), (row0 + row1) / 2)
    assert torch.allclose(causal_lm_loss(logits, labels, reduction="sum", per_row="sum"), 2 * (row0 + row1))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bfloat16_model_gets_float32_norms_and_clipped_sums(arch, monkeypatch):
    """A bfloat16 model keeps bfloat16 activations; its norms and clipped sums are float32, and the step
    agrees with the same weights run in float32 to bfloat16's precision."""
    from expunge.privacy import engine as engine_module

    m16 = build(arch, tied=True, seed=5, dtype=torch.bfloat16)
    m32 = copy.deepcopy(m16).float()  # the same weights
    data = batch(seed=5)
    per_row = per_row_grads(copy.deepcopy(m32), *data)
    C = float(torch.sqrt(sum(g.reshape(B, -1).pow(2).sum(1) for g in per_row.values())).quantile(0.5))
    seen, summed = [], []
    clip_factors, release = engine_module.clip_factors, engine_module.PrivacyEngine._release_gradient

    def spy_clip(norms, *args, **kwargs):
        seen.append(norms.dtype)
        return clip_factors(norms, *args, **kwargs)

    def spy_release(self):
        summed.extend(s.dtype for s in self.summed.values())
        return release(self)

    monkeypatch.setattr(engine_module, "clip_factors", spy_clip)
    monkeypatch.setattr(engine_module.PrivacyEngine, "_release_gradient", spy_release)
    got32, _, _ = engine_sum(m32, data, C, "all-layer")
    got16, _, _ = engine_sum(m16, data, C, "all-layer")
    assert seen == [torch.float32, torch.float32] and set(summed) == {torch.float32}
    assert all(p.grad.dtype == torch.bfloat16 for p in m16.parameters())
    err = max(((got16[n].float() - got32[n]).norm() / got32[n].norm()).item() for n in got32)
    assert err < 0.03, f"bfloat16 step differs from float32 by {err:.3g}"  # measured: 0.0085


def test_dp_continual_pretraining_of_a_language_model():
    """A public phase (plain training, equal to training by hand) then a private phase on the same engine;
    epsilon is composed over the private phase only and meets the target it was calibrated for."""
    from expunge.privacy import accounting

    model = build("gpt2", tied=True, seed=6)
    by_hand = copy.deepcopy(model)
    public = batch(seed=7)
    private = tuple(torch.cat([a, b]) for a, b in zip(batch(seed=8), batch(seed=9)))  # 12 rows
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = make_private(model, opt, private, batch_size=4, target_epsilon=2.0, target_delta=1e-3, epochs=1,
                          max_grad_norm=0.5, seed=0)

    def loss(m, rows):
        return row_loss(m, *rows)

    steps = engine.pretrain_public(public, epochs=1, batch_size=3, batch_loss=loss, seed=0)
    assert steps == 2 and engine.epsilon() == 0.0
    hand_opt = torch.optim.SGD(by_hand.parameters(), lr=0.05)
    order = np.random.default_rng(0).permutation(B)
    for start in (0, 3):
        hand_opt.zero_grad()
        loss(by_hand, tuple(t[torch.as_tensor(order[start:start + 3])] for t in public)).backward()
        hand_opt.step()
    for (n, p), q in zip(model.named_parameters(), by_hand.parameters()):
        assert torch.allclose(p, q, atol=1e-12), n
    for rows in engine.loader:
        engine.optimizer.zero_grad()
        loss(model, rows).backward()
        engine.optimizer.step()
    assert engine.steps == len(engine.loader) == 3
    assert [p.private for p in engine.history()] == [False, True]
    private_only = accounting.epsilon([accounting.Phase(engine.noise_multiplier, 4 / 12, 3)], 1e-3)
    assert engine.epsilon() == pytest.approx(private_only) and private_only <= 2.0 + 1e-3
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gradient_checkpointing_stays_exact():
    """Hugging Face's gradient checkpointing recomputes each block's forward during the backward pass; the
    recomputed calls are not backpropagated through, and the clipped sum stays exact."""
    model = build("llama", tied=True, seed=10)
    model.gradient_checkpointing_enable()
    model.train()
    check(model, "layer-wise")


def test_public_phase_of_a_language_model_without_batch_loss_is_refused_before_training():
    model = build("gpt2", tied=True, seed=11)
    before = [p.detach().clone() for p in model.parameters()]
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), batch(seed=11), batch_size=3,
                          noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ExpungeError, match="batch_loss"):
        engine.pretrain_public(batch(seed=12), batch_size=3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert engine.epsilon(1e-5) == 0.0 and not engine.phases
