"""Benchmarks: `expunge bench NAME`."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import typer

from ..errors import ExpungeError
from .app import app, console, friendly


@app.command()
@friendly
def bench(
    name: str = typer.Argument(..., help="Benchmark to run: deltagrad, certified, sisa or forgetting."),
    data: Path = typer.Option(Path("../shared/data"), help="Data folder (holds mnist/mnist.npz, ...)."),
    json_out: Path = typer.Option(None, "--json", help="Where to write the JSON rows (default benchmarks/results/NAME.json); "
                                  "a plot is written beside it."),
    repeats: int = typer.Option(3, help="Repeats per case; the median is reported."),
    limit: Optional[int] = typer.Option(None, help="Train on the first N rows only (a quick smoke run)."),
):
    """Run a benchmark side by side with its baseline: prints a table, writes JSON and a plot."""
    from ..bench import BENCHMARKS

    if name not in BENCHMARKS:
        raise ExpungeError(f"unknown benchmark {name!r}; available: {', '.join(sorted(BENCHMARKS))}")
    module = importlib.import_module(BENCHMARKS[name])
    out = json_out or Path("benchmarks/results") / f"{name}.json"
    module.main(data, out, repeats=repeats, limit=limit, progress=True, console=console)
    console.print(f"wrote {out} and {Path(out).with_suffix('.png')}")
