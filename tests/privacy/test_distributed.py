"""make_private over torch.distributed (gloo, CPU): DDP, FSDP2 and a plain replicated model, 2 and 3 ranks.

Each world size is one torch.multiprocessing.spawn that runs every scenario and saves what it saw; the
tests compare that with the one-process engine in this process. The shared row stream makes the ranks'
union of rows the one-process engine's logical batch for the same seed, so "the same logical batch" is
literal. Clipping is active everywhere (C far below every per-sample gradient norm, checked)."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from expunge.errors import ExpungeError
from expunge.privacy import causal_lm_loss, make_private
from expunge.privacy.distributed import load_checkpoint, save_checkpoint, spawn

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier 0")

DT = torch.float64
N, STEPS, C = 60, 5, 1e-3
VOCAB, T = 11, 5


def data(kind):
    g = torch.Generator().manual_seed(0)
    if kind in ("lm", "conv1d"):
        return (torch.randint(0, VOCAB, (N, T), generator=g),)
    return torch.randn(N, 6, generator=g, dtype=DT), torch.randint(0, 3, (N,), generator=g)


class TiedLM(nn.Module):
    """Token embedding and output head share one weight (non-square), with a layer norm (a hooked layer)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.norm = nn.LayerNorm(4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.norm(self.emb(ids)))))


class Conv1DLM(nn.Module):
    """GPT-2's layers (transformers' Conv1D, the weight stored transposed as (in, out)) on sequences: each row's
    gradient is materialised, and its clipped sum comes back as a transposed view."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.mix = Conv1D(4, 4)
        self.head = Conv1D(VOCAB, 4)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def build(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "lm":
        return TiedLM().to(DT)
    if kind == "conv1d":
        return Conv1DLM().to(DT)
    if kind == "wide":
        return nn.Sequential(nn.Linear(6, 400), nn.Tanh(), nn.Linear(400, 3)).to(DT)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3)).to(DT)


def loss_of(kind, model, batch):
    if kind in ("lm", "conv1d"):
        (ids,) = batch
        return causal_lm_loss(model(ids), ids)
    x, y = batch
    return F.cross_entropy(model(x), y)


# (model, wrapper, clipping, physical batch, noise multiplier, momentum)
SCENARIOS = {
    "ddp all-layer": ("mlp", "ddp", "all-layer", 2, 0.0, 0.0),
    "ddp layer-wise": ("mlp", "ddp", "layer-wise", 2, 0.0, 0.0),
    "fsdp all-layer": ("mlp", "fsdp", "all-layer", 2, 0.0, 0.0),
    "fsdp layer-wise": ("mlp", "fsdp", "layer-wise", 2, 0.0, 0.0),
    "plain all-layer": ("mlp", "plain", "all-layer", 3, 0.0, 0.0),
    "ddp tied": ("lm", "ddp", "all-layer", 2, 0.0, 0.0),
    "fsdp tied": ("lm", "fsdp", "layer-wise", 2, 0.0, 0.0),
    "ddp noisy": ("mlp", "ddp", "layer-wise", 2, 0.7, 0.9),  # shared noise seed: the one-process draw
    "ddp conv1d": ("conv1d", "ddp", "all-layer", 2, 0.0, 0.0),  # its clipped sum is a transposed view
    "fsdp conv1d": ("conv1d", "fsdp", "layer-wise", 2, 0.0, 0.0),
}
# gradient transforms over DDP: (transform, clipping, noise multiplier); trained with optimizer.step(closure)
TRANSFORMED = {
    "ddp disk": ("disk", "all-layer", 0.0),
    "ddp disk noisy": ("disk", "layer-wise", 0.7),
    "ddp doppler": ("doppler", "all-layer", 0.0),
    "ddp dicesgd": ("dicesgd", "layer-wise", 0.0),
}
BATCH = 4  # q = 1/15: with seed 5 one rank draws 6 rows (3 physical batches) while another draws none


def wrap(model, wrapper):
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)
    if wrapper == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for child in model.children():  # units per layer (tied weights need one unit holding both uses: the root)
            if isinstance(child, nn.Linear) and child.weight.shape[0] != VOCAB:
                fully_shard(child, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def transform(name):
    from expunge.privacy import DOPPLER, DiceSGD, DiSK

    return {"disk": DiSK, "doppler": DOPPLER, "dicesgd": DiceSGD}[name]()


def private(kind, model, noise=0.0, clipping="all-layer", physical=2, momentum=0.0, seed=5, distributed=None,
            transforms=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=50.0, momentum=momentum)  # clipped steps are small
    return make_private(model, optimizer, data(kind), batch_size=BATCH, physical_batch_size=physical,
                        noise_multiplier=noise, max_grad_norm=C, clipping=clipping, seed=seed, target_delta=1e-5,
                        distributed=distributed, transforms=transforms)


def train(kind, engine, model, steps, started=None, closure=False):
    """Logical steps through the loader; returns the rows this process saw in each. `started` collects, for
    each last physical batch with rows, how many clipping groups' reductions the backward pass launched.
    `closure`: step with optimizer.step(closure), as DiSK needs."""
    rows, seen, target = [], 0, engine.steps + steps
    while engine.steps < target:
        for batch in engine.loader:
            seen += len(batch[0])
            if closure:
                def evaluate(batch=batch):
                    engine.optimizer.zero_grad()
                    loss = loss_of(kind, model, batch)
                    loss.backward()
                    return loss

                engine.optimizer.step(evaluate)
                if engine.optimizer._logical_end:
                    rows.append(seen)
                    seen = 0
                if engine.steps == target:
                    return rows
                continue
            engine.optimizer.zero_grad()
            loss_of(kind, model, batch).backward()
            if started is not None and engine.optimizer._logical_end and len(batch[0]):
                started.append(engine.dist._next)
            engine.optimizer.step()
            if engine.optimizer._logical_end:
                rows.append(seen)
                seen = 0
            if engine.steps == target:
                return rows
    return rows


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def params(model):
    model = getattr(model, "module", model)  # DDP's names without its "module." prefix
    return {n: full(p).detach().clone() for n, p in model.named_parameters()}


def grads(model):
    model = getattr(model, "module", model)
    return {n: full(p.grad).detach().clone() for n, p in model.named_parameters()}


# -- what each rank runs ---------------------------------------------------------------------------------

def worker(rank, world, folder):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        out = {}
        for name, (kind, wrapper, clipping, physical, noise, momentum) in SCENARIOS.items():
            model = wrap(build(kind), wrapper)
            engine = private(kind, model, noise, clipping, physical, momentum)
            started = []
            rows = train(kind, engine, model, STEPS, started)
            out[name] = {"params": params(model), "rows": rows, "epsilon": engine.epsilon(), "started": started,
                         "groups": len(engine.groups)}
            engine.detach()
        for name, (name_of_transform, clipping, noise) in TRANSFORMED.items():
            model = wrap(build("mlp"), "ddp")
            engine = private("mlp", model, noise, clipping, transforms=[transform(name_of_transform)])
            rows = train("mlp", engine, model, STEPS, closure=True)
            out[name] = {"params": params(model), "rows": rows, "epsilon": engine.epsilon()}
            engine.detach()
        for wrapper, secure in (("ddp", False), ("fsdp", False), ("ddp", True), ("fsdp", True)):
            # a step with no rows on any rank: its gradient is the noise alone, over q n
            model = wrap(build("wide"), wrapper)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            engine = make_private(model, optimizer, data("mlp"), batch_size=BATCH, noise_multiplier=2.0,
                                  max_grad_norm=C, seed=11, secure_rng=secure)
            engine.optimizer.zero_grad()
            engine.optimizer.step()
            out[f"{wrapper}{' secure' if secure else ''} noise"] = grads(model)
            engine.detach()
        for wrapper in ("ddp", "fsdp"):
            out[f"{wrapper} resume"] = resume(wrapper, Path(folder) / wrapper)
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def resume(wrapper, folder):
    """Train 2 + 2 steps straight, and 2 steps, a checkpoint, then 2 steps in a fresh set-up from it."""
    def setup(seed):
        model = wrap(build("mlp", seed=seed), wrapper)
        return model, private("mlp", model, noise=0.5, clipping="layer-wise", momentum=0.9)

    model, engine = setup(0)
    train("mlp", engine, model, 2)
    folder.mkdir(exist_ok=True)
    save_checkpoint(folder, model, engine.optimizer, engine)
    train("mlp", engine, model, 2)
    straight = params(model)
    engine.detach()
    model, engine = setup(99)  # another init: everything must come from the checkpoint
    load_checkpoint(folder, model, engine.optimizer, engine)
    steps_at_load = engine.steps
    train("mlp", engine, model, 2)
    return {"straight": straight, "resumed": params(model), "steps_at_load": steps_at_load}


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)])
def ranks(request):
    """(world size, each rank's results)."""
    world = request.param
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(world, folder), nprocs=world, join=True)
        yield world, [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def one_process(name):
    kind, _, clipping, _, noise, momentum = SCENARIOS[name]  # in one physical batch
    model = build(kind)
    engine = private(kind, model, noise, clipping, physical=BATCH, momentum=momentum, distributed=False)
    train(kind, engine, model, STEPS)
    return params(model), engine.epsilon()


def one_process_transformed(name):
    name_of_transform, clipping, noise = TRANSFORMED[name]
    model = build("mlp")
    engine = private("mlp", model, noise, clipping, physical=BATCH, distributed=False,
                     transforms=[transform(name_of_transform)])
    train("mlp", engine, model, STEPS, closure=True)
    return params(model), engine.epsilon()


# -- the tests ---------------------------------------------------------------------------------------------

def test_clipping_is_active():
    """C is below every row's gradient norm, so every row is clipped: the exactness tests test clipping."""
    for kind in ("mlp", "lm", "conv1d"):
        model = build(kind)
        batch = data(kind)
        for i in range(N):
            model.zero_grad()
            loss_of(kind, model, tuple(t[i:i + 1] for t in batch)).backward()
            norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
            assert norm > 20 * C


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_update_equals_one_process_on_the_same_logical_batch(ranks, name):
    world, results = ranks
    expected, eps = one_process(name)
    for r in range(world):
        got = results[r][name]
        for n, p in expected.items():
            assert torch.allclose(got["params"][n], p, rtol=0, atol=1e-6), (name, r, n)
        assert got["epsilon"] == pytest.approx(eps, rel=1e-12)
    moved = max((expected[n] - build(SCENARIOS[name][0]).state_dict()[n]).abs().max() for n in expected)
    assert moved > 1e-3  # the update is not a no-op


@pytest.mark.parametrize("name", list(TRANSFORMED))
def test_transforms_over_ddp_equal_one_process(ranks, name):
    """DiSK (two evaluation points, its Kalman filter), DOPPLER (a filter over steps) and DiceSGD (error feedback
    from the unclipped sums) over DDP: one process's update to rounding, with noise 0 and with the shared noise."""
    world, results = ranks
    expected, eps = one_process_transformed(name)
    start = build("mlp").state_dict()
    moved = max((expected[n] - start[n]).abs().max() for n in expected)
    assert moved > 1e-3  # the update is not a no-op
    for r in range(world):
        got = results[r][name]
        for n, p in expected.items():
            assert torch.allclose(got["params"][n], p, rtol=0, atol=1e-6), (name, r, n)
            assert torch.equal(got["params"][n], results[0][name]["params"][n]), (name, r, n)  # replicas alike
        assert got["epsilon"] == pytest.approx(eps, rel=1e-12)
    plain = build("mlp")
    without = private("mlp", plain, TRANSFORMED[name][2], TRANSFORMED[name][1], physical=BATCH, distributed=False)
    train("mlp", without, plain, STEPS)
    assert max((params(plain)[n] - expected[n]).abs().max() for n in expected) > 1e-4  # the transform mattered


def test_ranks_draw_uneven_and_empty_shares_of_one_batch(ranks):
    world, results = ranks
    rows = np.array([results[r]["ddp all-layer"]["rows"] for r in range(world)])  # (ranks, steps)
    assert rows.shape == (world, STEPS)
    assert (rows == 0).any()  # some rank had nothing in some step, and still took every step
    assert (rows.max(0) != rows.min(0)).any()
    model = build("mlp")
    engine = private("mlp", model, distributed=False)
    assert rows.sum(0).tolist() == train("mlp", engine, model, STEPS)  # the union is one process's batch


@pytest.mark.parametrize("name", ["ddp layer-wise", "fsdp layer-wise", "ddp all-layer"])
def test_reductions_start_inside_the_backward_pass(ranks, name):
    """Every group's reduction is launched by the backward pass (overlapping it), none left for step()."""
    world, results = ranks
    started = [(n, results[r][name]["groups"]) for r in range(world) for n in results[r][name]["started"]]
    assert started and all(n == groups for n, groups in started)
    assert results[0][name]["groups"] == (1 if name.endswith("all-layer") else 3)


def test_replicas_are_bit_identical(ranks):
    world, results = ranks
    for name in [*SCENARIOS, "ddp noise", "ddp secure noise"]:
        first = results[0][name]["params"] if name in SCENARIOS else results[0][name]
        for r in range(1, world):
            other = results[r][name]["params"] if name in SCENARIOS else results[r][name]
            for n in first:
                assert torch.equal(first[n], other[n]), (name, r, n)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp", "ddp secure", "fsdp secure"])
def test_injected_noise_has_std_sigma_c_once(ranks, wrapper):
    """A step without rows, times q n, over ~4,000 coordinates: std sigma * C, not sqrt(W) off (secure_rng:
    rank 0 draws for DDP, each shard its own for FSDP2)."""
    _, results = ranks
    noise = torch.cat([v.flatten() for v in results[0][f"{wrapper} noise"].values()]) * BATCH
    std = noise.std().item()
    assert std == pytest.approx(2.0 * C, rel=0.05)
    assert abs(noise.mean().item()) < 0.1 * std


def test_fsdp_shards_draw_independent_noise(ranks):
    world, results = ranks
    first = results[0]["fsdp noise"]["0.weight"]  # (400, 6), rows sharded over the ranks
    chunk = -(-400 // world)
    a, b = first[:chunk].flatten(), first[chunk:2 * chunk].flatten()
    assert not torch.allclose(a, b)  # not one stream replayed on every shard
    corr = torch.corrcoef(torch.stack([a[:len(b)], b]))[0, 1].abs().item()
    assert corr < 0.1


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_checkpoint_resumes_exactly(ranks, wrapper):
    world, results = ranks
    for r in range(world):
        got = results[r][f"{wrapper} resume"]
        assert got["steps_at_load"] == 2
        for n in got["straight"]:
            assert torch.equal(got["straight"][n], got["resumed"][n]), (r, n)


def test_distributed_without_a_process_group_is_refused():
    with pytest.raises(ExpungeError, match="process group"):
        private("mlp", build("mlp"), distributed=True)


def test_no_process_group_trains_in_one_process():
    model = build("mlp")
    assert private("mlp", model).dist is None


def test_refusals_leave_a_ddp_model_as_it_was(tmp_path):
    """A process group of one rank in this process: refusals come before the engine touches DDP's reducer."""
    from torch.nn.parallel import DistributedDataParallel

    from expunge.privacy import DiSK, Phase, PublicCoupling

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(build("mlp"))
        public = (data("mlp")[0][:8], data("mlp")[1][:8])
        with pytest.raises(ExpungeError, match=r"transforms \['PublicCoupling'\] do not run data parallel"):
            make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), data("mlp"), batch_size=BATCH,
                         noise_multiplier=1.0, transforms=[DiSK(), PublicCoupling(public)])
        sharded = wrap(build("mlp"), "fsdp")
        with pytest.raises(ExpungeError, match="not under FSDP2"):
            make_private(sharded, torch.optim.SGD(sharded.parameters(), lr=0.1), data("mlp"), batch_size=BATCH,
                         noise_multiplier=1.0, transforms=[DiSK()])
        with pytest.raises(ExpungeError, match="loss probes"):
            make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), data("mlp"), batch_size=BATCH,
                         noise_multiplier=1.0, reserve=[Phase(1.0, 0.1, 1)])
        with pytest.raises(ExpungeError, match="distributed=False"):
            private("mlp", model, distributed=False)
        assert model.require_backward_grad_sync
        engine = private("mlp", model)  # detected: a DDP model
        assert engine.dist is not None and not model.require_backward_grad_sync
        engine.detach()
        assert model.require_backward_grad_sync
    finally:
        dist.destroy_process_group()


def _echo(rank, value):
    return rank, value, dist.get_world_size()


def _refuse(rank):
    if rank == 1:
        raise ExpungeError("rank 1 refuses")
    dist.barrier()  # rank 0 waits on a collective that never completes: spawn must end it


@pytest.mark.slow
def test_spawn_returns_rank_zeros_result_and_raises_a_ranks_refusal():
    assert spawn(_echo, 2, "x") == (0, "x", 2)
    with pytest.raises(ExpungeError, match="rank 1 refuses"):
        spawn(_refuse, 2)
    with pytest.raises(ExpungeError, match="--nproc must be a positive"):
        spawn(_echo, 0, "x")
