"""Throughput and peak memory of one private training step: expunge against plain torch and Opacus.

Models (synthetic inputs of the right shapes; the data folder is not needed):

- mlp: 784 -> 512 -> 256 -> 10 with ReLU, MNIST-shaped rows, batch 256;
- cnn: the CNN of Opacus's MNIST example (conv 16@8x8/2, max-pool, conv 32@4x4/2, max-pool, linear 32,
  linear 10; tanh), 28x28x1 images, batch 256;
- gpt: expunge.gpt.GPT with its default config (vocab 4096, 128 positions, width 256, 4 layers, 4 heads,
  5.3M parameters), next-token loss over sequences of 128 tokens, batch 16.

Modes: ``non-private`` (plain torch), ``expunge all-layer`` and ``expunge group-wise`` (layer-wise
clipping: one group per layer), ``opacus hooks`` and ``opacus ghost`` (Opacus 1.6
``PrivacyEngine().make_private(..., grad_sample_mode="hooks" | "ghost")``; ghost mode gets the criterion
and trains with the wrapped one it returns, which runs its two backward passes). Every private mode
clips at C = 1 and adds noise of multiplier 1 on every step; all batches are fixed (no Poisson
sampling, so every step has the same size); the optimizer is plain SGD. One step = zero_grad, forward,
loss, backward, optimizer step.

Timing. Each (model, mode) lives in REPLICAS worker processes (multiprocessing, spawn), set up once and
kept alive; the parent asks the workers of a model in turn for a round of steps (A B C D E A' B' C' D'
E', A B C ...), so that drift on the shared machine hits every mode alike and only one worker computes at
a time; the same mode's speed differed by up to 10% between two processes, hence the replicas, pooled.
A warm-up round of one step is discarded; then rounds, in each of which a mode runs steps for at least
ROUND_S seconds in all (at least one step per worker). In each round a mode's throughput is its batch size
over the median of that round's steps (replicas pooled), and its ratio is that over the non-private
throughput of the same round; rounds are added until every mode's ratio is stable (rounds.py: IQR under 5%
of the median, 5 to 25 rounds, at most ~5 minutes a model past the first 5; ``repeats`` fixes the count).
``throughput_ratio`` is the median of the per-round ratios, reported with its IQR, min and max;
``step_ms`` is the median over all measured steps and ``samples_per_s`` = batch size / that time.
``cpu_ms`` is the same median of process CPU time (robust to other processes taking the cores,
since with one thread it counts only this step's work). Workers run ONE intra-op thread
(EXPUNGE_BENCH_THREADS overrides): the machine this was written on has 2 cores shared with other jobs,
and with 2 OpenMP threads any outside load stalls each parallel region on its slowest thread (steps
varied 4x); one thread keeps the comparison about the work each mode does.

Peak memory on CPU, measured apart from the timing: for each (model, mode) a fresh worker process
imports the same libraries whatever its mode (torch, Opacus, expunge), fixes glibc's mmap threshold at
64 KiB (mallopt: every tensor of 64 KiB or more is mapped on allocation and unmapped on free, so the
resident set follows the live tensors instead of whatever the allocator keeps), runs one tiny operation,
reads its resident set (VmRSS) as the baseline and resets the kernel's resident high-water mark (writing
5 to /proc/self/clear_refs). It then builds the model, optimizer, batch and private wrapper and trains
one warm-up step and MEMORY_STEPS more; ``peak_mem_mb`` is the high-water mark (VmHWM) minus the
baseline: all the memory the training needs (parameters, gradients, batch, activations, per-sample
buffers, noise), without the interpreter and libraries, which are the same in every mode. This is the CPU
analogue of CUDA's max_memory_allocated after a reset. Where clear_refs cannot be written, getrusage's
ru_maxrss stands in (the import peak is then included; ``mem_method`` says which was used).
"""
from __future__ import annotations

import gc
import math
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import report
from .rounds import SPREAD_HEADER, RoundRule, Rounds, error_bars, rounds_text, spread_text

MODES = ("non-private", "expunge all-layer", "expunge group-wise", "opacus hooks", "opacus ghost")
MODELS = ("mlp", "cnn", "gpt")
BATCH = {"mlp": 256, "cnn": 256, "gpt": 16}
NOISE, CLIP = 1.0, 1.0


# -- models --------------------------------------------------------------------------------------------

def build_model(name: str, tiny: bool = False) -> nn.Module:
    if name == "mlp":
        hidden = (16, 8) if tiny else (512, 256)
        return nn.Sequential(nn.Linear(784, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
                             nn.Linear(hidden[1], 10))
    if name == "cnn":
        c1, c2, h = (4, 8, 8) if tiny else (16, 32, 32)
        return nn.Sequential(
            nn.Conv2d(1, c1, 8, 2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(c1, c2, 4, 2), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Flatten(), nn.Linear(c2 * 16, h), nn.Tanh(), nn.Linear(h, 10))
    if name == "gpt":
        from ..gpt import GPT, GPTConfig
        config = GPTConfig(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2) if tiny else GPTConfig()
        return GPT(config)
    raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODELS)}")


def make_batch(name: str, model: nn.Module, batch_size: int, generator: torch.Generator):
    if name == "mlp":
        return torch.randn(batch_size, 784, generator=generator), torch.randint(0, 10, (batch_size,), generator=generator)
    if name == "cnn":
        return (torch.randn(batch_size, 1, 28, 28, generator=generator),
                torch.randint(0, 10, (batch_size,), generator=generator))
    c = model.config
    ids = torch.randint(0, c.vocab_size, (batch_size, c.n_positions + 1), generator=generator)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def loss_fn(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name == "gpt":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


# -- one case: a model, a mode, a batch, and its step ------------------------------------------------

class Case:
    """Builds the model, optimizer, batch and private wrapper of one (model, mode); step() trains once."""

    def __init__(self, model_name: str, mode: str, batch_size: int, tiny: bool = False, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        torch.manual_seed(seed)
        self.model_name, self.mode, self.batch_size = model_name, mode, batch_size
        model = build_model(model_name, tiny)
        self.params = sum(p.numel() for p in model.parameters())
        self.x, self.y = make_batch(model_name, model, batch_size, torch.Generator().manual_seed(seed))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        self.criterion = None
        self.engine = None
        if mode == "non-private":
            pass
        elif mode.startswith("expunge"):
            from ..privacy import make_private
            self.engine = make_private(model, optimizer, (self.x, self.y), batch_size=batch_size,
                                       noise_multiplier=NOISE, max_grad_norm=CLIP, seed=seed,
                                       clipping="all-layer" if mode == "expunge all-layer" else "layer-wise")
            optimizer = self.engine.optimizer
        else:
            from opacus import PrivacyEngine
            from torch.utils.data import DataLoader, TensorDataset

            loader = DataLoader(TensorDataset(self.x, self.y), batch_size=batch_size)
            kwargs = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE,
                          max_grad_norm=CLIP, poisson_sampling=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if mode == "opacus hooks":
                    model, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(**kwargs, grad_sample_mode="hooks")
                else:
                    model, optimizer, self.criterion, _ = PrivacyEngine(accountant="rdp").make_private(
                        **kwargs, criterion=nn.CrossEntropyLoss(), grad_sample_mode="ghost")
        self.model, self.optimizer = model, optimizer

    def loss(self):
        out = self.model(self.x)
        if self.criterion is None:
            return loss_fn(self.model_name, out, self.y)
        if self.model_name == "gpt":  # Opacus's wrapped criterion: the row is the sequence
            return self.criterion(out.reshape(-1, out.shape[-1]), self.y.reshape(-1), shape=out.shape)
        return self.criterion(out, self.y)

    def step(self) -> None:
        self.optimizer.zero_grad()
        self.loss().backward()
        self.optimizer.step()

    def timed_step(self) -> float:
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start


# -- memory --------------------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _exact_malloc() -> bool:
    """glibc: serve every allocation of 64 KiB or more by mmap and give it back on free (a fixed threshold
    also stops glibc from raising it), so that the resident set follows the live tensors."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 64 * 1024))  # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Resident memory above a baseline: VmHWM after a reset of the high-water mark, or ru_maxrss."""

    def __init__(self):
        gc.collect()
        torch.ones(64, 64) @ torch.ones(64, 64)  # thread pools and kernels initialised before the baseline
        self.baseline_kb = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM - VmRSS after imports"
        except OSError:
            self.method = "ru_maxrss - VmRSS after imports"
        if self.baseline_kb is None:
            self.baseline_kb, self.method = 0, "ru_maxrss"

    def peak_mb(self) -> float:
        hwm = _status_kb("VmHWM") if self.method.startswith("VmHWM") else None
        if hwm is None:
            import resource
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, hwm - self.baseline_kb) / 1024


def _round(case: Case, n: int, min_s: float = 0.0):
    """At least n steps, and more until min_s seconds have passed: (wall seconds, CPU seconds) per step."""
    wall, cpu = [], []
    start = time.perf_counter()
    while len(wall) < n or time.perf_counter() - start < min_s:
        c0, w0 = time.process_time(), time.perf_counter()
        case.step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def _serve(conn, factory, model_name: str, mode: str, batch_size: int, tiny: bool, threads: int,
           memory_only: bool) -> None:
    """Worker process: the same imports in every mode, the baseline, the case, then rounds on request.
    ``factory(model_name, mode, batch_size, tiny)`` builds the case (Case here; other benchmarks pass theirs)."""
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    import opacus  # noqa: F401  (imported in every mode, so that the baseline is the same)

    from .. import privacy  # noqa: F401
    try:
        exact = _exact_malloc() if memory_only else False
        memory = PeakMemory()
        if exact:
            memory.method += ", mmap threshold 64 KiB"
        case = factory(model_name, mode, batch_size, tiny)
        conn.send(("ready", case.params, memory.method))
        while True:
            command, n, min_s = conn.recv()
            if command == "stop":
                break
            wall, cpu = _round(case, n, min_s)
            conn.send(("done", wall, cpu, memory.peak_mb()))
    except Exception as exc:  # reported to the parent, which raises it
        import traceback
        conn.send(("error", f"{model_name} / {mode}: {exc!r}\n{traceback.format_exc()}"))
    finally:
        conn.close()


class _InProcess:
    """The same protocol without a process (for tests: memory figures are then only indicative)."""

    def __init__(self, factory, model_name, mode, batch_size, tiny, threads, memory_only):
        self.memory = PeakMemory()
        self.case = factory(model_name, mode, batch_size, tiny)
        self.ready = ("ready", self.case.params, self.memory.method + " (in process)")

    def round(self, n, min_s=0.0):
        return (*_round(self.case, n, min_s), self.memory.peak_mb())

    def stop(self):
        pass


class _Worker:
    def __init__(self, ctx, *args):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, *args), daemon=True)
        self.process.start()
        child.close()
        self.ready = self._receive()

    def _receive(self):
        try:
            message = self.conn.recv()
        except EOFError:
            self.process.join(timeout=5)
            raise RuntimeError(f"the benchmark worker died (exit code {self.process.exitcode})") from None
        if message[0] == "error":
            self.process.join(timeout=5)
            raise RuntimeError(message[1])
        return message

    def round(self, n, min_s=0.0):
        self.conn.send(("run", n, min_s))
        return self._receive()[1:]

    def stop(self):
        try:
            self.conn.send(("stop", 0, 0.0))
        except OSError:
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)


# -- the benchmark -------------------------------------------------------------------------------------

MEMORY_STEPS = 2  # after one warm-up step, in the memory process
ROUND_S = 2.0  # each mode's share of a round: at least this long (and at least one step per worker)
REPLICAS = 2  # timing workers per (model, mode): a process's own speed varies (about 5%), so two are pooled


def default_threads() -> int:
    """One intra-op thread unless EXPUNGE_BENCH_THREADS says otherwise (see the module docstring)."""
    import os

    return int(os.environ.get("EXPUNGE_BENCH_THREADS", "1"))


def run(repeats: int | None = None, models=MODELS, modes=MODES, batch_sizes: dict | None = None, round_s: float = ROUND_S,
        replicas: int = REPLICAS, tiny: bool = False, isolate: bool = True, threads: int | None = None,
        progress: bool = True, console=None, factory=None) -> list[dict]:
    """Measure every (model, mode): peak memory in a fresh process each, then step times in ``replicas``
    persistent workers each, in rounds that interleave the modes of a model (``repeats`` of them, or as many
    as the ratios need: rounds.py). ``tiny`` shrinks the models (tests); ``isolate=False`` runs every case in
    this process (tests: memory figures are rough). ``factory`` builds a case with a ``step()`` and ``params``
    (Case by default; picklable: a module-level class or function, or a functools.partial of one)."""
    import multiprocessing

    factory = factory or Case
    batch_sizes = {**BATCH, **(batch_sizes or {})}
    threads = threads or default_threads()
    ctx = multiprocessing.get_context("spawn")

    def say(text):
        if progress and console is not None:
            console.print(f"[dim]{text}[/dim]")

    def start(model_name, mode, memory_only):
        args = (factory, model_name, mode, batch_sizes[model_name], tiny, threads, memory_only)
        return _Worker(ctx, *args) if isolate else _InProcess(*args)

    rows = []
    for model_name in models:
        peaks, methods = {}, {}
        for mode in modes:  # memory: a fresh process per mode, one warm-up step, then MEMORY_STEPS
            say(f"{model_name}: peak memory of {mode}")
            worker = start(model_name, mode, True)
            try:
                worker.round(1)
                peaks[mode] = worker.round(MEMORY_STEPS)[-1]
                methods[mode] = worker.ready[2]
            finally:
                worker.stop()
        workers = {}  # (replica, mode) -> worker
        n_replicas = replicas if isolate else 1
        try:
            for k in range(n_replicas):
                for mode in modes:
                    say(f"{model_name}: setting up {mode} for timing ({k + 1}/{n_replicas})")
                    workers[k, mode] = start(model_name, mode, False)
            wall = {mode: [] for mode in modes}  # per round: the step times of every replica
            cpu = {mode: [] for mode in modes}
            for (k, mode), worker in workers.items():  # warm-up round: one step each, discarded
                worker.round(1, 0.0)
            rounds = Rounds(RoundRule.for_repeats(repeats))
            while rounds.more():  # A B C D E A' B' C' D' E', A B C ...
                for mode in modes:
                    wall[mode].append([])
                    cpu[mode].append([])
                for (k, mode), worker in workers.items():
                    w, c, _ = worker.round(1, round_s / n_replicas)
                    wall[mode][-1] += w
                    cpu[mode][-1] += c
                speed = {mode: batch_sizes[model_name] / statistics.median(wall[mode][-1]) for mode in modes}
                rounds.add(**{mode: speed[mode] / speed["non-private"] for mode in modes
                              if mode != "non-private" and "non-private" in modes})
                say(f"{model_name}: round {rounds.count}: "
                    + ", ".join(f"{m} {1e3 * statistics.median(wall[m][-1]):.0f} ms" for m in modes))
        finally:
            for w in workers.values():
                w.stop()
        for mode in modes:
            steps_wall = [t for rnd in wall[mode] for t in rnd]
            steps_cpu = [t for rnd in cpu[mode] for t in rnd]
            seconds, cpu_seconds = statistics.median(steps_wall), statistics.median(steps_cpu)
            b = batch_sizes[model_name]
            rows.append({
                "model": model_name, "mode": mode, "batch_size": b, "params": workers[0, mode].ready[1],
                "step_ms": 1e3 * seconds, "samples_per_s": b / seconds,
                "samples_per_s_rounds": [b / statistics.median(rnd) for rnd in wall[mode]],
                "cpu_ms": 1e3 * cpu_seconds, "cpu_samples_per_s": b / cpu_seconds,
                "peak_mem_mb": peaks[mode], "mem_method": methods[mode],
                "steps": len(steps_wall), "replicas": n_replicas, "threads": threads,
                **(rounds.ratio_fields(mode, "throughput_ratio") if mode in rounds.ratios else
                   {"throughput_ratio": 1.0 if mode == "non-private" else math.nan}),
                "rounds": rounds.count, "rounds_stop": rounds.stop,
            })
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["mode"] == "non-private"), None)
        row["cpu_throughput_ratio"] = row["cpu_samples_per_s"] / base["cpu_samples_per_s"] if base else math.nan
        row["memory_ratio"] = row["peak_mem_mb"] / base["peak_mem_mb"] if base and base["peak_mem_mb"] else math.nan
    return rows


def table(rows: list[dict]):
    from rich.table import Table

    threads = rows[0]["threads"] if rows else 1
    t = Table(title=f"One training step (forward, backward, optimizer step) on CPU, {threads} thread(s): "
                    "ratios to non-private, median over interleaved rounds with its min-max and IQR")
    for col in ("model", "mode", "batch", "samples/s", "ms/step", "throughput ratio", SPREAD_HEADER, "rounds",
                "CPU-time ratio", "peak MB", "memory ratio"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["model"], r["mode"], str(r["batch_size"]), f"{r['samples_per_s']:.1f}", f"{r['step_ms']:.1f}",
                  f"{r['throughput_ratio']:.2f}", spread_text(r, "throughput_ratio"), rounds_text(r),
                  f"{r['cpu_throughput_ratio']:.2f}", f"{r['peak_mem_mb']:.1f}", f"{r['memory_ratio']:.2f}")
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    x = np.arange(len(models))
    width = 0.8 / max(1, len(modes))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, title, target in ((axes[0], "throughput_ratio", "throughput / non-private (higher is better)", 0.8),
                                   (axes[1], "memory_ratio", "peak memory / non-private (lower is better)", 1.3)):
        for k, mode in enumerate(modes):
            picked = [next((r for r in rows if r["model"] == m and r["mode"] == mode), {key: np.nan}) for m in models]
            values = [r[key] for r in picked]
            yerr = error_bars(picked, key) if key == "throughput_ratio" else None
            bars = ax.bar(x + (k - (len(modes) - 1) / 2) * width, values, width, label=mode, yerr=yerr,
                          error_kw={"lw": 0.6, "capsize": 1.5})
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.axhline(target, color="k", lw=0.8, ls="--")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xticks(x, [f"{m} (batch {next(r['batch_size'] for r in rows if r['model'] == m)})" for m in models])
        ax.set_title(title, fontsize=10)
    axes[1].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(modes), fontsize=8, frameon=False)
    threads = rows[0].get("threads", 1) if rows else 1
    fig.suptitle(f"DP training step on CPU ({threads} thread): expunge vs Opacus 1.6 "
                 "(dashed: targets 0.8x throughput, 1.3x memory; whiskers: min-max over rounds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(data_dir, json_out, repeats: int | None = None, limit: int | None = None, progress: bool = True,
         console=None) -> list[dict]:
    """``limit`` is accepted for the common CLI; any value runs the tiny models (a smoke run)."""
    rows = run(repeats=repeats, tiny=bool(limit), progress=progress, console=console)
    settings = {"rounds": RoundRule.for_repeats(repeats).describe(), "worker_threads": default_threads(),
                "replicas": REPLICAS, "round_s": ROUND_S, "memory_steps": MEMORY_STEPS}
    return report(rows, json_out, table, plot, console, settings=settings)
