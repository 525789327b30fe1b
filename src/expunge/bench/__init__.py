"""Benchmarks behind `expunge bench NAME --data DIR --json OUT`: each prints a table, writes its
JSON rows and a plot beside them. Speed is measured here, side by side, never in unit tests."""

BENCHMARKS = {"deltagrad": "expunge.bench.deltagrad", "certified": "expunge.bench.certified",
              "sisa": "expunge.bench.sisa", "forgetting": "expunge.bench.forgetting",
              "dp-engine": "expunge.bench.dp_engine", "dp-mnist": "expunge.bench.dp_mnist",
              "dp-optimizers": "expunge.bench.dp_optimizers",
              "dp-filters": "expunge.bench.dp_filters", "dp-optimizers-long": "expunge.bench.dp_optimizers_long",
              "gen": "expunge.bench.gen", "merge": "expunge.bench.merge",
              "llm-unlearning": "expunge.bench.llm_unlearning"}


def report(rows: list[dict], json_out, table, plot, console=None) -> list[dict]:
    """Print the benchmark's table, write its JSON rows, and the plot beside them (same name, .png)."""
    import json
    from pathlib import Path

    if console is not None:
        console.print(table(rows))
    json_out = Path(json_out)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, json_out.with_suffix(".png"))
    return rows
