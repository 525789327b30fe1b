"""Private training data parallel: 1 vs 2 processes (gloo on the CPU), non-private DDP vs private DDP vs
private FSDP2, on the GPT-2-shaped model of the dp-lm benchmark.

Model: dp-lm's GPT2LMHeadModel (n_embd 768, 12 heads, vocabulary 50257, tied input/output embeddings),
LAYERS blocks on the CPU, freshly initialised; random token ids. Every rank trains on its own fixed batch of
BATCH sequences of SEQ tokens (weak scaling: W ranks see W times the tokens of one), one intra-op thread per
rank. One step = zero_grad, forward, causal_lm_loss (each row's mean next-token loss, mean over rows),
backward, AdamW step. Modes:

- ``non-private DDP``: DistributedDataParallel, its bucketed all-reduce of the (non-private) gradients;
- ``private DDP``: the same DDP model under make_private (group-wise clipping, one group per layer, C = 1,
  noise multiplier 1): the clipped sums are all-reduced a group at a time from the backward pass, noise once;
- ``private FSDP2``: fully_shard on every block and the root, make_private (group-wise): the clipped sums are
  reduce-scattered, each rank noises its shard.

Per (world size, mode) one torch.multiprocessing.spawn of W ranks: WARMUP steps, then the median of
`repeats` timed steps (a barrier before and after each, so the slowest rank sets the time). Reported: tokens/s
over all ranks; per rank the bytes of parameters + gradients + optimizer state that rank holds (exact, from
the tensors: FSDP2's shards vs DDP's replicas) and the peak resident memory during the timed steps (VmHWM,
reset after set-up where the kernel allows); the private/non-private throughput ratio at each world size.

Targets (issue 14): the ratio at 2 processes within 10% of the ratio at 1, and FSDP2's per-rank parameter +
optimizer memory about 1/W of DDP's. On a shared 2-core machine two ranks contend with each other and with
every other job: the tokens/s of 2 ranks are not twice one's, and the ratios are the figure to read.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import report

MODES = ("non-private DDP", "private DDP", "private FSDP2")
WORLDS = (1, 2)
LAYERS, BATCH, SEQ, WARMUP = 2, 4, 128, 1
NOISE, CLIP = 1.0, 1.0


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


def _tensor_bytes(t) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _rank(rank: int, world: int, mode: str, folder: str, repeats: int, tiny: bool) -> None:
    import torch.distributed as dist

    from ..privacy import causal_lm_loss, make_private
    from .dp_lm import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model = build_model("gpt2", 1 if tiny else LAYERS, tiny=tiny, seed=0)
        if mode == "private FSDP2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model)
        g = torch.Generator().manual_seed(rank)
        vocab = 100 if tiny else 50257
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine = None
        if mode != "non-private DDP":
            engine = make_private(model, optimizer, (ids,), batch_size=BATCH, noise_multiplier=NOISE,
                                  max_grad_norm=CLIP, clipping="layer-wise", seed=0)
            optimizer = engine.optimizer

        def step():
            optimizer.zero_grad()
            causal_lm_loss(model(input_ids=ids).logits, ids).backward()
            optimizer.step()

        for _ in range(WARMUP):
            step()
        held = sum(_tensor_bytes(p) + (_tensor_bytes(p.grad) if p.grad is not None else 0)
                   for p in model.parameters())
        held += sum(_tensor_bytes(v) for state in optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0)
        reset = _reset_peak()
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            step()
            dist.barrier()
            times.append(time.perf_counter() - start)
        result = {"seconds": statistics.median(times), "held_bytes": held,
                  "peak_rss_mb": (_status_kb("VmHWM") or 0) / 1024, "peak_reset": reset,
                  "params": sum(p.numel() for p in model.parameters())}
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def measure(world: int, mode: str, repeats: int, tiny: bool) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(world, mode, folder, repeats, tiny), nprocs=world, join=True)
        ranks = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    seconds = max(r["seconds"] for r in ranks)
    return {"world": world, "mode": mode, "model": "gpt2-tiny" if tiny else f"gpt2 {LAYERS} blocks",
            "params": ranks[0]["params"], "batch_per_rank": BATCH, "seq_len": SEQ, "repeats": repeats,
            "step_s": seconds, "tokens_per_s": world * BATCH * SEQ / seconds,
            "held_mb_per_rank": max(r["held_bytes"] for r in ranks) / 2**20,
            "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in ranks),
            "peak_reset": all(r["peak_reset"] for r in ranks)}


def run(repeats: int = 3, tiny: bool = False, progress: bool = True, console=None) -> list[dict]:
    rows = []
    for world in WORLDS:
        for mode in MODES:
            if progress and console is not None:
                console.print(f"{mode}, {world} process{'es' if world > 1 else ''} ...")
            rows.append(measure(world, mode, repeats, tiny))
    for row in rows:
        base = next(r for r in rows if r["world"] == row["world"] and r["mode"] == "non-private DDP")
        row["throughput_vs_non_private"] = row["tokens_per_s"] / base["tokens_per_s"]
        ddp = next(r for r in rows if r["world"] == row["world"] and r["mode"] == "private DDP")
        row["held_vs_private_ddp"] = row["held_mb_per_rank"] / ddp["held_mb_per_rank"]
    return rows


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="private data parallel (gloo, CPU): tokens/s and per-rank memory")
    for col in ("processes", "mode", "tokens/s", "vs non-private", "params+grads+optim MB/rank", "vs private DDP",
                "peak RSS MB/rank"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        t.add_row(str(r["world"]), r["mode"], f"{r['tokens_per_s']:.0f}", f"{r['throughput_vs_non_private']:.2f}",
                  f"{r['held_mb_per_rank']:.0f}", f"{r['held_vs_private_ddp']:.2f}", f"{r['peak_rss_mb_per_rank']:.0f}")
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.25
    for i, mode in enumerate(MODES):
        mine = [next(r for r in rows if r["world"] == w and r["mode"] == mode) for w in WORLDS]
        xs = [k + (i - 1) * width for k in range(len(WORLDS))]
        left.bar(xs, [r["tokens_per_s"] for r in mine], width, label=mode)
        right.bar(xs, [r["held_mb_per_rank"] for r in mine], width, label=mode)
    for ax, label in ((left, "tokens/s (all ranks)"), (right, "params + grads + optimizer MB per rank")):
        ax.set_xticks(range(len(WORLDS)), [f"{w} process{'es' if w > 1 else ''}" for w in WORLDS])
        ax.set_ylabel(label)
    left.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['model']}, batch {rows[0]['batch_per_rank']} x {rows[0]['seq_len']} tokens per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(data_dir, json_out, repeats: int = 3, limit: int | None = None, progress: bool = True,
         console=None) -> list[dict]:
    """The data folder is not needed (random tokens). ``limit`` (any value) runs a tiny GPT-2: a smoke run
    whose figures mean nothing."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = run(repeats=repeats, tiny=bool(limit), progress=progress, console=console)
    return report(rows, json_out, table, plot, console,
                  settings={"steps_per_case": repeats, "smoke": bool(limit), "threads_per_rank": os.environ["OMP_NUM_THREADS"],
                            "rounds": "not interleaved (a case's steps run together); the round rule is not applied yet"})
