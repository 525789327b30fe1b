"""Results files: what `report()` writes for every benchmark, and how to read them back.

A results file is ``{"provenance": {...}, "rows": [...]}`` (provenance: see provenance.py); files written
before provenance was recorded are a bare list of rows, and ``read_rows`` reads both.
"""

from __future__ import annotations

import json
from pathlib import Path

from .provenance import capture


def report(rows: list[dict], json_out, table, plot, console=None, settings: dict | None = None) -> list[dict]:
    """Print the benchmark's table, write its rows with their provenance to ``json_out``, and the plot beside
    them (same name, .png). ``settings``: what the benchmark wants recorded beside the provenance (its rounds
    rule, worker threads, ...)."""
    if console is not None:
        console.print(table(rows))
    json_out = Path(json_out)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps({"provenance": capture(settings), "rows": rows}, indent=2) + "\n")
    plot(rows, json_out.with_suffix(".png"))
    return rows


def read_results(path) -> tuple[list[dict], dict | None]:
    """(rows, provenance) of a results file; provenance is None for a file from before it was recorded."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return data, None
    return data["rows"], data.get("provenance")


def read_rows(path) -> list[dict]:
    return read_results(path)[0]
