"""Benchmarks: `expunge bench NAME`."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Optional

import typer

from ..errors import ExpungeError
from .app import app, console, friendly


@app.command()
@friendly
def bench(
    name: str = typer.Argument(..., help="Benchmark to run: deltagrad, certified, sisa, forgetting, dp-engine, "
                                          "dp-mnist, dp-optimizers, dp-filters, dp-optimizers-long, gen, merge, "
                                          "dp-lm or dp-distributed."),
    data: Path = typer.Option(Path("../shared/data"), help="Data folder (holds mnist/mnist.npz, ...)."),
    json_out: Path = typer.Option(None, "--json", help="Where to write the JSON rows (default benchmarks/results/NAME.json); "
                                  "a plot is written beside it."),
    repeats: int = typer.Option(3, help="Repeats per case; the median is reported."),
    limit: Optional[int] = typer.Option(None, help="Train on the first N rows only (a quick smoke run)."),
    device: str = typer.Option("cpu", help="cpu, or cuda for the benchmarks that run on a GPU (dp-lm)."),
):
    """Run a benchmark side by side with its baseline: prints a table, writes JSON and a plot."""
    from ..bench import BENCHMARKS

    if name not in BENCHMARKS:
        raise ExpungeError(f"unknown benchmark {name!r}; available: {', '.join(sorted(BENCHMARKS))}")
    if device not in ("cpu", "cuda"):
        raise ExpungeError(f"--device must be cpu or cuda, got {device!r}")
    module = importlib.import_module(BENCHMARKS[name])
    extra = {}
    if device != "cpu":
        if "device" not in inspect.signature(module.main).parameters:
            raise ExpungeError(f"benchmark {name} runs on the CPU only: drop --device {device}")
        import torch

        if not torch.cuda.is_available():
            raise ExpungeError("--device cuda: no CUDA device is available to torch here")
        extra["device"] = device
    out = json_out or Path("benchmarks/results") / f"{name}.json"
    module.main(data, out, repeats=repeats, limit=limit, progress=True, console=console, **extra)
    console.print(f"wrote {out} and {Path(out).with_suffix('.png')}")
