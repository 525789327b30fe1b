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

Each (world size, mode) is one torch.multiprocessing.spawn of W ranks, kept alive for the whole benchmark (9
processes in all): it builds its model, warms up (WARMUP steps), then times STEPS_PER_ROUND steps whenever it is
told to (a barrier before and after each step, so the slowest rank sets the time). Rounds run every group in
turn, so load on the machine falls on all of them alike; a round's ratios are private/non-private at each world
size, and rounds are added until those ratios are stable (rounds.py: IQR under 5% of the median, 5 to 25
rounds; ``--repeats N`` fixes the count). Reported: tokens/s over all ranks (median over rounds); per rank the
bytes of parameters + gradients + optimizer state that rank holds (exact, from the tensors: FSDP2's shards vs
DDP's replicas) and the peak resident memory during the timed steps (VmHWM, reset after set-up where the kernel
allows); the private/non-private throughput ratio at each world size with its spread across rounds, and that
ratio at W processes over the same ratio at 1.

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
from .rounds import SPREAD_HEADER, RoundRule, Rounds, rounds_text, spread_text

MODES = ("non-private DDP", "private DDP", "private FSDP2")
WORLDS = (1, 2)
LAYERS, BATCH, SEQ, WARMUP = 2, 4, 128, 1
STEPS_PER_ROUND = 2
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


class _Step:
    """One rank's model, data and training step for ``mode`` (built after the process group is up)."""

    def __init__(self, rank: int, world: int, mode: str, tiny: bool):
        from ..privacy import causal_lm_loss, make_private
        from .dp_lm import build_model

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
        ids = torch.randint(0, 100 if tiny else 50257, (BATCH, SEQ), generator=g)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if mode != "non-private DDP":
            optimizer = make_private(model, optimizer, (ids,), batch_size=BATCH, noise_multiplier=NOISE,
                                     max_grad_norm=CLIP, clipping="layer-wise", seed=0).optimizer
        self.model, self.optimizer, self.ids, self.loss = model, optimizer, ids, causal_lm_loss

    def __call__(self):
        self.optimizer.zero_grad()
        self.loss(self.model(input_ids=self.ids).logits, self.ids).backward()
        self.optimizer.step()

    def held_bytes(self) -> int:
        held = sum(_tensor_bytes(p) + (_tensor_bytes(p.grad) if p.grad is not None else 0)
                   for p in self.model.parameters())
        return held + sum(_tensor_bytes(v) for state in self.optimizer.state.values() for v in state.values()
                          if isinstance(v, torch.Tensor) and v.dim() > 0)


def _rank(rank: int, world: int, mode: str, folder: str, tiny: bool, orders, answers) -> None:
    """One rank of a (world, mode) group that stays alive for the whole benchmark: set up and warm up, report
    what it holds, then on each order of rank 0 (relayed to the others) time that many steps; None ends it."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        step = _Step(rank, world, mode, tiny)
        for _ in range(WARMUP):
            step()
        held, reset = step.held_bytes(), _reset_peak()
        facts = [None] * world
        dist.all_gather_object(facts, {"held_bytes": held, "peak_reset": reset})
        if rank == 0:
            answers.put({"held_bytes": max(f["held_bytes"] for f in facts),
                         "peak_reset": all(f["peak_reset"] for f in facts),
                         "params": sum(p.numel() for p in step.model.parameters())})
        while True:
            order = [orders.get() if rank == 0 else None]
            dist.broadcast_object_list(order, src=0)
            if order[0] is None:
                break
            times = []
            for _ in range(order[0]):
                dist.barrier()  # the slowest rank sets the time
                start = time.perf_counter()
                step()
                dist.barrier()
                times.append(time.perf_counter() - start)
            peaks = [None] * world
            dist.all_gather_object(peaks, (_status_kb("VmHWM") or 0) / 1024)
            if rank == 0:
                answers.put({"seconds": statistics.median(times), "peak_rss_mb": max(peaks)})
    finally:
        dist.destroy_process_group()


class Group:
    """A live (world, mode) group of ranks, spawned once and kept for every round."""

    def __init__(self, world: int, mode: str, tiny: bool):
        import torch.multiprocessing as mp

        context = mp.get_context("spawn")
        self.world, self.mode = world, mode
        self.folder = tempfile.TemporaryDirectory()
        self.orders, self.answers = context.Queue(), context.Queue()
        self.processes = mp.spawn(_rank, args=(world, mode, self.folder.name, tiny, self.orders, self.answers),
                                  nprocs=world, join=False)
        self.facts = self._answer()

    def _answer(self, timeout_s: float = 900) -> dict:
        import queue

        deadline = time.time() + timeout_s
        while True:
            try:
                return self.answers.get(timeout=1)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in self.processes.processes) or time.time() > deadline:
                    self.close()
                    raise RuntimeError(f"{self.mode} with {self.world} process(es) stopped without answering")

    def time(self, steps: int) -> dict:
        self.orders.put(steps)
        return self._answer()

    def close(self) -> None:
        if all(p.is_alive() for p in self.processes.processes):
            self.orders.put(None)
        for p in self.processes.processes:
            p.join(60)
            if p.is_alive():
                p.terminate()
        self.folder.cleanup()


def run(repeats: int | None = None, tiny: bool = False, steps_per_round: int = STEPS_PER_ROUND, progress: bool = True,
        console=None, rule: RoundRule | None = None) -> tuple[list[dict], RoundRule]:
    """Every (world size, mode) as a live group; rounds in which each group times ``steps_per_round`` steps in
    turn (1 process: the three modes, then 2 processes: the three modes), until the private/non-private ratios
    at each world size are stable (rounds.py) or ``repeats`` rounds ran. A row per (world, mode): medians over
    rounds, the ratio with its spread."""
    rule = rule or RoundRule.for_repeats(repeats)
    say = console.print if (progress and console is not None) else (lambda *a, **k: None)
    groups = {}
    try:
        for world in WORLDS:
            for mode in MODES:
                say(f"starting {mode}, {world} process{'es' if world > 1 else ''} ...")
                groups[world, mode] = Group(world, mode, tiny)
        rounds = Rounds(rule)
        seconds = {key: [] for key in groups}
        peaks = dict.fromkeys(groups, 0.0)
        while rounds.more():
            for key, group in groups.items():
                answer = group.time(steps_per_round)
                seconds[key].append(answer["seconds"])
                peaks[key] = max(peaks[key], answer["peak_rss_mb"])
            ratios = {_ratio_name(w, m): seconds[w, "non-private DDP"][-1] / seconds[w, m][-1]
                      for w, m in groups if m != "non-private DDP"}
            rounds.add(**ratios)
            say(f"round {rounds.count}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    finally:
        for group in groups.values():
            group.close()
    rows = []
    for (world, mode), group in groups.items():
        step_s = statistics.median(seconds[world, mode])
        row = {"world": world, "mode": mode, "model": "gpt2-tiny" if tiny else f"gpt2 {LAYERS} blocks",
               "params": group.facts["params"], "batch_per_rank": BATCH, "seq_len": SEQ,
               "steps_per_round": steps_per_round, "step_s": step_s, "tokens_per_s": world * BATCH * SEQ / step_s,
               "held_mb_per_rank": group.facts["held_bytes"] / 2**20, "peak_rss_mb_per_rank": peaks[world, mode],
               "peak_reset": group.facts["peak_reset"], "rounds": rounds.count, "rounds_stop": rounds.stop}
        if mode == "non-private DDP":
            row["throughput_vs_non_private"] = 1.0
        else:
            row.update(rounds.ratio_fields(_ratio_name(world, mode), "throughput_vs_non_private"))
        rows.append(row)
    for row in rows:
        ddp = next(r for r in rows if r["world"] == row["world"] and r["mode"] == "private DDP")
        row["held_vs_private_ddp"] = row["held_mb_per_rank"] / ddp["held_mb_per_rank"]
        one = next(r for r in rows if r["world"] == 1 and r["mode"] == row["mode"])
        # the target: the private/non-private ratio at W processes against the same ratio at 1 (within 10%)
        row["ratio_vs_one_process"] = row["throughput_vs_non_private"] / one["throughput_vs_non_private"]
    return rows, rule


def _ratio_name(world: int, mode: str) -> str:
    return f"{mode.replace(' ', '_').replace('-', '_')}_w{world}"


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="private data parallel (gloo, CPU): tokens/s and per-rank memory")
    for col in ("processes", "mode", "tokens/s", "vs non-private", SPREAD_HEADER, "vs 1 process", "rounds",
                "params+grads+optim MB/rank", "vs private DDP", "peak RSS MB/rank"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        t.add_row(str(r["world"]), r["mode"], f"{r['tokens_per_s']:.0f}", f"{r['throughput_vs_non_private']:.2f}",
                  spread_text(r, "throughput_vs_non_private"), f"{r['ratio_vs_one_process']:.2f}", rounds_text(r),
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


def main(data_dir, json_out, repeats: int | None = None, limit: int | None = None, progress: bool = True,
         console=None) -> list[dict]:
    """The data folder is not needed (random tokens). ``limit`` (any value) runs a tiny GPT-2 for 2 rounds: a
    smoke run whose figures mean nothing."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows, rule = run(repeats=2 if limit and repeats is None else repeats, tiny=bool(limit), progress=progress,
                     console=console)
    return report(rows, json_out, table, plot, console,
                  settings={"steps_per_round": STEPS_PER_ROUND, "smoke": bool(limit),
                            "threads_per_rank": os.environ["OMP_NUM_THREADS"], "round_rule": rule.describe(),
                            "rounds": "interleaved: each round times every (processes, mode) group in turn"})
