"""Benchmarks behind `expunge bench NAME --data DIR --json OUT`: each prints a table, writes its rows with
their provenance (results.py) and a plot beside them. Speed is measured here, side by side, never in unit
tests.

A benchmark is a module with

    main(data_dir, json_out, repeats=..., limit=None, progress=True, console=None) -> rows

that ends with ``return report(rows, json_out, table, plot, console, settings=...)`` (provenance comes with
it), and one line in BENCHMARKS below: the module, what it measures, how long a full run takes on the 2-core
machine. `expunge bench --help` and the error for an unknown name are made from BENCHMARKS. The CLI passes
``repeats`` only when the user gives ``--repeats N``, so each module's default stands otherwise. A timing
benchmark takes ``repeats: int | None = None`` and times its comparison in rounds chosen by
``rounds.RoundRule.for_repeats(repeats)`` (None: until its ratio is stable; N: exactly N rounds), reporting
``Rounds.fields()`` in its rows (rounds.py).
"""

from dataclasses import dataclass

from .results import read_results, read_rows, report  # noqa: F401  (the benchmarks' shared API)


@dataclass(frozen=True)
class Benchmark:
    module: str    # imported by `expunge bench NAME`; has main(...)
    summary: str   # what it measures, one line of about 50 characters (the help lists it at 80 columns)
    duration: str  # a full run on the 2-core machine, e.g. "~15 min"


BENCHMARKS = {
    "deltagrad": Benchmark("expunge.bench.deltagrad", "DeltaGrad vs retraining (MNIST): speedup, distance", "~15 min"),
    "certified": Benchmark("expunge.bench.certified", "certified removal (MNIST): budget, speedup, accuracy", "~25 min"),
    "sisa": Benchmark("expunge.bench.sisa", "SISA (MNIST, Location): deletion speedup vs shards", "~20 min"),
    "forgetting": Benchmark("expunge.bench.forgetting", "Fisher and baselines vs retraining: forgetting, MIA", "~10 min"),
    "dp-engine": Benchmark("expunge.bench.dp_engine", "DP step vs non-private and Opacus: speed, memory", "~15 min"),
    "dp-mnist": Benchmark("expunge.bench.dp_mnist", "DP-SGD on MNIST: test accuracy at epsilon 1, 2, 3, 8", "~20 min"),
    "dp-optimizers": Benchmark("expunge.bench.dp_optimizers", "DP optimizers on (Fashion-)MNIST: accuracy vs epsilon", "~40 min"),
    "dp-filters": Benchmark("expunge.bench.dp_filters", "DP optimizers' filters on a noisy quadratic: stability", "~3 min"),
    "dp-optimizers-long": Benchmark("expunge.bench.dp_optimizers_long", "DP optimizers at full length, tuned: CNN, tiny LM",
                                    "~5 h"),
    "gen": Benchmark("expunge.bench.gen", "GeN rate vs tuned schedules: accuracy, loss, cost", "~40 min"),
    "merge": Benchmark("expunge.bench.merge", "MAP model merging vs a dense grid: Pareto fronts", "~6 min"),
    "dp-lm": Benchmark("expunge.bench.dp_lm", "DP step of tied HF causal LMs vs Opacus: speed, memory", "~10 min"),
    "dp-distributed": Benchmark("expunge.bench.dp_distributed", "private DDP/FSDP2, 1 vs 2 processes: tokens/s, memory",
                                "~15 min"),
    "service": Benchmark("expunge.bench.service", "deletion service: latency, batching, worker kills", "~30 min"),
    "llm-unlearning": Benchmark("expunge.bench.llm_unlearning", "NGDiff and LLM unlearning baselines: TOFU, MUSE",
                                "~75 min"),
}
