"""Benchmarks: `expunge bench NAME`, dispatched on the registry expunge.bench.BENCHMARKS (which also makes the
help and the error for an unknown name)."""

from __future__ import annotations

import importlib
import inspect
import os
import shlex
from pathlib import Path
from typing import Optional

import typer

from ..bench import BENCHMARKS
from ..errors import ExpungeError
from .app import app, console, friendly


def benchmark_list() -> str:
    """One line per registered benchmark: its name, how long a full run takes on 2 cores, what it measures."""
    width = max(map(len, BENCHMARKS))
    return "\n".join(f"  {name:<{width}}  {b.duration:>8}  {b.summary}" for name, b in BENCHMARKS.items())


def rerun_command(name: str, data: Path, out: Path, repeats: int | None, limit: int | None,
                  tasks: str | None = None, methods: str | None = None) -> str:
    """The command that reruns this benchmark as parsed: every option spelled out, and the EXPUNGE_BENCH_*
    environment variables that change it in front."""
    words = ["expunge", "bench", name, "--data", str(data), "--json", str(out)]
    words += ["--repeats", str(repeats)] if repeats is not None else []
    words += ["--limit", str(limit)] if limit is not None else []
    words += ["--tasks", tasks] if tasks is not None else []
    words += ["--methods", methods] if methods is not None else []
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("EXPUNGE_BENCH_")]
    return " ".join(env + [shlex.join(words)])


REPEATS_HELP = ("Timing benchmarks: run exactly N interleaved rounds (default: add rounds until each headline "
                "ratio's interquartile range is under 5% of its median, 5 to 25 rounds). Benchmarks with seeds: "
                "the number of seeds (default: the benchmark's).")


@app.command(epilog="Benchmarks (name, a full run on 2 cores, what it measures):\n" + benchmark_list())
@friendly
def bench(
    name: str = typer.Argument(..., help=f"Benchmark to run: {', '.join(BENCHMARKS)} (listed below)."),
    data: Path = typer.Option(Path("../shared/data"), help="Data folder (holds mnist/mnist.npz, ...)."),
    json_out: Path = typer.Option(None, "--json", help="Where to write the results (default benchmarks/results/NAME.json): "
                                  "the rows and their provenance; a plot is written beside it."),
    repeats: Optional[int] = typer.Option(None, help=REPEATS_HELP),
    limit: Optional[int] = typer.Option(None, help="Train on the first N rows only (a quick smoke run)."),
    device: str = typer.Option("cpu", help="cpu, or cuda for the benchmarks that run on a GPU (dp-lm)."),
    tasks: Optional[str] = typer.Option(None, help="Benchmarks with several tasks (gen, dp-optimizers-long): run only "
                                        "these, comma-separated (e.g. tofu-qa); the other tasks' rows already in --json "
                                        "are kept."),
    methods: Optional[str] = typer.Option(None, help="Benchmarks that compare methods (llm-unlearning, "
                                          "dp-optimizers-long): run only these, comma-separated, e.g. ngdiff,npo "
                                          "(default: all)."),
):
    """Run a benchmark side by side with its baseline: prints a table, writes JSON (rows and provenance) and a
    plot."""
    from ..bench import provenance

    if name not in BENCHMARKS:
        raise ExpungeError(f"unknown benchmark {name!r}; choose one of:\n{benchmark_list()}")
    if repeats is not None and repeats < 1:
        raise ExpungeError(f"--repeats must be at least 1, got {repeats}")
    if device not in ("cpu", "cuda"):
        raise ExpungeError(f"--device must be cpu or cuda, got {device!r}")
    module = importlib.import_module(BENCHMARKS[name].module)
    extra = {}
    if device != "cpu":
        if "device" not in inspect.signature(module.main).parameters:
            raise ExpungeError(f"benchmark {name} runs on the CPU only: drop --device {device}")
        import torch

        if not torch.cuda.is_available():
            raise ExpungeError("--device cuda: no CUDA device is available to torch here")
        extra["device"] = device
    if tasks is not None:
        if "tasks" not in inspect.signature(module.main).parameters:
            raise ExpungeError(f"benchmark {name} has no tasks to choose from: drop --tasks")
        extra["tasks"] = tasks
    if methods is not None:
        if "methods" not in inspect.signature(module.main).parameters:
            raise ExpungeError(f"benchmark {name} has no choice of methods: drop --methods")
        extra["methods"] = methods
    out = json_out or Path("benchmarks/results") / f"{name}.json"
    provenance.mark_start(rerun_command(name, data, out, repeats, limit, tasks, methods))
    optional = {"repeats": repeats} if repeats is not None else {}
    module.main(data, out, limit=limit, progress=True, console=console, **optional, **extra)
    console.print(f"wrote {out} and {Path(out).with_suffix('.png')}")
