"""Benchmarks behind `expunge bench NAME --data DIR --json OUT`: each prints a table, writes its
JSON rows and a plot beside them. Speed is measured here, side by side, never in unit tests."""

BENCHMARKS = {"deltagrad": "expunge.bench.deltagrad", "certified": "expunge.bench.certified",
              "sisa": "expunge.bench.sisa"}
