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

Timing follows the round rule (rounds.py). Every (world size, mode) case is set up once, as W rank processes
(multiprocessing, spawn) in a gloo group of their own, and kept alive; after WARMUP_STEPS steps each, the parent asks
the cases in turn for a round of STEPS_PER_ROUND steps (1 process: A B C, then 2 processes: A' B' C', then
again), so that the machine's load drifts over the one- and two-process measurements alike and only one case
computes at a time. Each step is timed between two barriers on every rank (the slowest rank sets its time). In
each round a case's tokens/s is its tokens over the median of that round's steps, and the round gives the
ratios the issue's targets are about: each private mode's throughput over non-private DDP's at the same world
size, and that ratio at 2 processes over the ratio at 1. Rounds are added until every one is stable (IQR
under 5% of the median, 5 to 25 rounds, ~5 minutes past the first 5; ``repeats`` fixes the count); rows report
the median over rounds with its IQR, min and max. Reported besides: per rank the bytes of parameters +
gradients + optimizer state that rank holds (exact, from the tensors: FSDP2's shards vs DDP's replicas) and the
peak resident memory during the timed steps (VmHWM, reset after the warm-up where the kernel allows). All
cases are alive together (9 processes at W = 1, 2), about 2 GB each at the full size.

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
from .rounds import SPREAD_HEADER, RoundRule, Rounds, error_bars, rounds_text, spread_text

MODES = ("non-private DDP", "private DDP", "private FSDP2")
WORLDS = (1, 2)
LAYERS, BATCH, SEQ = 2, 4, 128
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


WARMUP_STEPS, STEPS_PER_ROUND = 1, 1


def _serve(rank: int, world: int, mode: str, folder: str, conn, tiny: bool) -> None:
    """One rank of one case: set up, warm up, report what it holds, then timed rounds on request."""
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
        if mode != "non-private DDP":
            engine = make_private(model, optimizer, (ids,), batch_size=BATCH, noise_multiplier=NOISE,
                                  max_grad_norm=CLIP, clipping="layer-wise", seed=0)
            optimizer = engine.optimizer

        def step():
            optimizer.zero_grad()
            causal_lm_loss(model(input_ids=ids).logits, ids).backward()
            optimizer.step()

        for _ in range(WARMUP_STEPS):
            step()
        held = sum(_tensor_bytes(p) + (_tensor_bytes(p.grad) if p.grad is not None else 0)
                   for p in model.parameters())
        held += sum(_tensor_bytes(v) for state in optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0)
        conn.send(("ready", {"held_bytes": held, "peak_reset": _reset_peak(),
                             "params": sum(p.numel() for p in model.parameters())}))
        while True:
            command, n = conn.recv()
            if command == "stop":
                break
            times = []
            for _ in range(n):
                dist.barrier()
                start = time.perf_counter()
                step()
                dist.barrier()
                times.append(time.perf_counter() - start)
            conn.send(("done", times, (_status_kb("VmHWM") or 0) / 1024))
    except Exception as exc:  # reported to the parent, which stops the case and raises it
        import traceback

        conn.send(("error", f"{world} x {mode}, rank {rank}: {exc!r}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


class _Case:
    """The W rank processes of one (world size, mode), kept alive between rounds."""

    def __init__(self, ctx, world: int, mode: str, tiny: bool):
        self.world, self.mode = world, mode
        self.folder = tempfile.TemporaryDirectory()
        self.conns, self.processes = [], []
        for rank in range(world):
            conn, child = ctx.Pipe()
            process = ctx.Process(target=_serve, args=(rank, world, mode, self.folder.name, child, tiny), daemon=True)
            process.start()
            child.close()
            self.conns.append(conn)
            self.processes.append(process)

    def _gather(self) -> list[tuple]:
        """One message from every rank; a rank's error (or death) stops the whole case and is raised."""
        from multiprocessing.connection import wait

        messages, waiting = {}, dict(enumerate(self.conns))
        while waiting:
            for conn in wait(list(waiting.values()), timeout=60):
                rank = next(r for r, c in waiting.items() if c is conn)
                try:
                    message = conn.recv()
                except EOFError:
                    message = ("error", f"{self.world} x {self.mode}: rank {rank} died "
                                        f"(exit code {self.processes[rank].exitcode})")
                if message[0] == "error":
                    self.stop()
                    raise RuntimeError(message[1])
                messages[rank] = message
                del waiting[rank]
        return [messages[r] for r in range(self.world)]

    def ready(self) -> dict:
        infos = [m[1] for m in self._gather()]
        return {"held_bytes": max(i["held_bytes"] for i in infos), "params": infos[0]["params"],
                "peak_reset": all(i["peak_reset"] for i in infos)}

    def round(self, steps: int) -> tuple[list[float], float]:
        """Each step's time (the slowest rank's) and the largest peak RSS of a rank so far, in MB."""
        for conn in self.conns:
            conn.send(("run", steps))
        done = self._gather()
        return [max(times) for times in zip(*(m[1] for m in done))], max(m[2] for m in done)

    def stop(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop", 0))
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        self.folder.cleanup()


def _ratio_name(world: int, mode: str) -> str:
    return f"{mode} / non-private, {world} process{'es' if world > 1 else ''}"


def _scaling_name(mode: str) -> str:
    return f"{mode}: ratio at 2 processes / at 1"


def run(repeats: int | None = None, tiny: bool = False, progress: bool = True, console=None) -> list[dict]:
    """Every (world size, mode) in interleaved rounds (module docstring); ``repeats`` fixes the number of rounds."""
    import multiprocessing

    def say(text):
        if progress and console is not None:
            console.print(f"[dim]{text}[/dim]")

    ctx = multiprocessing.get_context("spawn")
    keys = [(world, mode) for world in WORLDS for mode in MODES]
    cases, info = {}, {}
    try:
        say(f"setting up {len(keys)} cases ({sum(WORLDS) * len(MODES)} processes)")
        for key in keys:
            cases[key] = _Case(ctx, *key, tiny)
        for key in keys:
            info[key] = cases[key].ready()
        times = {key: [] for key in keys}  # per round: that case's step times
        peak = {key: 0.0 for key in keys}
        rounds = Rounds(RoundRule.for_repeats(repeats))
        while rounds.more():
            speed = {}
            for key in keys:  # 1 process: A B C, then 2 processes: A' B' C'
                steps, peak[key] = cases[key].round(STEPS_PER_ROUND)
                times[key].append(steps)
                speed[key] = key[0] * BATCH * SEQ / statistics.median(steps)
            ratios = {_ratio_name(w, m): speed[w, m] / speed[w, MODES[0]] for w, m in keys if m != MODES[0]}
            for mode in MODES[1:]:
                if 1 in WORLDS and 2 in WORLDS:
                    ratios[_scaling_name(mode)] = ratios[_ratio_name(2, mode)] / ratios[_ratio_name(1, mode)]
            rounds.add(**ratios)
            say(f"round {rounds.count}: " + ", ".join(f"{w}x {m} {speed[w, m]:.0f} tok/s" for w, m in keys))
    finally:
        for case in cases.values():
            case.stop()
    rows = []
    for world, mode in keys:
        per_round = [world * BATCH * SEQ / statistics.median(steps) for steps in times[world, mode]]
        step_s = statistics.median([t for steps in times[world, mode] for t in steps])
        row = {"world": world, "mode": mode, "model": "gpt2-tiny" if tiny else f"gpt2 {LAYERS} blocks",
               "params": info[world, mode]["params"], "batch_per_rank": BATCH, "seq_len": SEQ,
               "step_s": step_s, "tokens_per_s": statistics.median(per_round), "tokens_per_s_rounds": per_round,
               "tokens_per_s_min": min(per_round), "tokens_per_s_max": max(per_round),
               "held_mb_per_rank": info[world, mode]["held_bytes"] / 2**20,
               "peak_rss_mb_per_rank": peak[world, mode], "peak_reset": info[world, mode]["peak_reset"],
               "rounds": rounds.count, "rounds_stop": rounds.stop}
        if mode == MODES[0]:
            row["throughput_vs_non_private"] = 1.0
        else:
            row.update(rounds.ratio_fields(_ratio_name(world, mode), "throughput_vs_non_private"))
            if world == 2 and _scaling_name(mode) in rounds.ratios:
                row.update(rounds.ratio_fields(_scaling_name(mode), "ratio_vs_one_process"))
        rows.append(row)
    for row in rows:
        ddp = next(r for r in rows if r["world"] == row["world"] and r["mode"] == "private DDP")
        row["held_vs_private_ddp"] = row["held_mb_per_rank"] / ddp["held_mb_per_rank"]
    return rows


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="private data parallel (gloo, CPU): tokens/s and per-rank memory; ratios: median over "
                    "interleaved rounds")
    for col in ("processes", "mode", "tokens/s", "vs non-private", SPREAD_HEADER, "2 vs 1 proc (min-max)",
                "params+grads+optim MB/rank", "vs private DDP", "peak RSS MB/rank", "rounds"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        scaling = r.get("ratio_vs_one_process")
        t.add_row(str(r["world"]), r["mode"], f"{r['tokens_per_s']:.0f}", f"{r['throughput_vs_non_private']:.2f}",
                  spread_text(r, "throughput_vs_non_private"),
                  "-" if scaling is None else f"{scaling:.2f} ({r['ratio_vs_one_process_min']:.2f}-"
                                              f"{r['ratio_vs_one_process_max']:.2f})",
                  f"{r['held_mb_per_rank']:.0f}", f"{r['held_vs_private_ddp']:.2f}", f"{r['peak_rss_mb_per_rank']:.0f}",
                  rounds_text(r))
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
        left.bar(xs, [r["tokens_per_s"] for r in mine], width, label=mode, yerr=error_bars(mine, "tokens_per_s"),
                 capsize=3)
        right.bar(xs, [r["held_mb_per_rank"] for r in mine], width, label=mode)
    for ax, label in ((left, "tokens/s (all ranks; whiskers: min-max over rounds)"),
                      (right, "params + grads + optimizer MB per rank")):
        ax.set_xticks(range(len(WORLDS)), [f"{w} process{'es' if w > 1 else ''}" for w in WORLDS])
        ax.set_ylabel(label)
    left.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['model']}, batch {rows[0]['batch_per_rank']} x {rows[0]['seq_len']} tokens per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(data_dir, json_out, repeats: int | None = None, limit: int | None = None, progress: bool = True,
         console=None) -> list[dict]:
    """The data folder is not needed (random tokens). ``limit`` (any value) runs a tiny GPT-2: a smoke run
    whose figures mean nothing."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = run(repeats=repeats, tiny=bool(limit), progress=progress, console=console)
    return report(rows, json_out, table, plot, console,
                  settings={"rounds": RoundRule.for_repeats(repeats).describe(), "warmup_steps": WARMUP_STEPS,
                            "steps_per_round": STEPS_PER_ROUND, "smoke": bool(limit),
                            "threads_per_rank": os.environ["OMP_NUM_THREADS"]})
