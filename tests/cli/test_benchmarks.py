"""The `expunge` command line end to end on scikit-learn's digits (small settings, for speed): bench.

Bad inputs must exit with code 2, say what is wrong without a traceback, and leave the run
directory byte-for-byte as it was.
"""

import json
import re

import numpy as np

from expunge.bench import BENCHMARKS

from .helpers import assert_clean_failure, invoke, squash

BENCH_KEYS = {"task", "ratio", "T0", "j0", "m", "retrain_s", "deltagrad_s", "speedup", "speedup_bound",
              "dist_full_retrain", "dist_deltagrad_retrain", "acc_retrain", "acc_deltagrad", "speedup_iqr",
              "speedup_min", "speedup_max", "rounds", "rounds_stop"}
PROVENANCE_KEYS = {"commit", "dirty", "torch", "threads", "cpu", "started", "written", "command", "settings"}


def test_bench_deltagrad_on_a_small_fake_mnist(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    np.savez(tmp_path / "data" / "mnist" / "mnist.npz",
             x_train=rng.integers(0, 256, (800, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 800),
             x_test=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 200))
    out = tmp_path / "results" / "bench.json"
    result = invoke("bench", "deltagrad", "--data", tmp_path / "data", "--limit", "600", "--repeats", "1",
                    "--json", out)
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    rows, provenance = results["rows"], results["provenance"]
    assert rows and PROVENANCE_KEYS <= set(provenance), PROVENANCE_KEYS - set(provenance)
    assert "bench deltagrad" in provenance["command"] and provenance["settings"]["rounds"] == {"fixed": 1}
    for row in rows:
        assert BENCH_KEYS <= set(row), BENCH_KEYS - set(row)
        assert row["retrain_s"] > 0 and row["deltagrad_s"] > 0 and row["speedup_bound"] >= 1
        assert row["rounds"] == 1 and row["rounds_stop"] == "fixed" and row["speedup_rounds"] == [row["speedup"]]
        assert 0 <= row["acc_retrain"] <= 1 and 0 <= row["acc_deltagrad"] <= 1
    assert {r["task"] for r in rows} == {"delete", "add"}
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_without_mnist_is_a_clean_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("bench", "deltagrad", "--data", empty, "--json", tmp_path / "out.json")
    assert_clean_failure(result, "mnist.npz")
    assert not (tmp_path / "out.json").exists()


def listed(output: str) -> list[str]:
    """The benchmark names of a listing: lines 'NAME  DURATION  summary' (rich may wrap a summary)."""
    return re.findall(r"^\s*([a-z0-9-]+)\s+(?:\S+ (?:s|min|h))\s{2}", output, flags=re.MULTILINE)


def test_help_lists_exactly_the_registered_benchmarks():
    result = invoke("bench", "--help")
    assert result.exit_code == 0, result.output
    assert listed(result.output) == list(BENCHMARKS), result.output
    for entry in BENCHMARKS.values():
        assert squash(entry.summary) in squash(result.output), entry


def test_unknown_benchmark_is_a_clean_error(tmp_path):
    result = invoke("bench", "nope", "--data", tmp_path)
    assert_clean_failure(result, "unknown benchmark 'nope'")
    assert listed(result.stderr) == list(BENCHMARKS), result.stderr


def test_bench_device_is_checked_before_anything_runs(tmp_path):
    import torch

    out = tmp_path / "out.json"
    assert_clean_failure(invoke("bench", "dp-lm", "--device", "tpu", "--json", out), "--device must be cpu or cuda")
    assert_clean_failure(invoke("bench", "deltagrad", "--device", "cuda", "--json", out), "runs on the CPU only")
    if not torch.cuda.is_available():
        assert_clean_failure(invoke("bench", "dp-lm", "--device", "cuda", "--json", out), "no CUDA device")
    assert not out.exists()


def test_bench_tasks_are_checked_before_anything_runs(tmp_path):
    out = tmp_path / "out.json"
    assert_clean_failure(invoke("bench", "deltagrad", "--tasks", "mnist", "--json", out), "no tasks to choose from")
    assert_clean_failure(invoke("bench", "gen", "--tasks", "cifar", "--data", tmp_path, "--json", out),
                         "unknown task(s) ['cifar']")
    assert_clean_failure(invoke("bench", "gen", "--tasks", "tofu-qa", "--data", tmp_path, "--json", out),
                         "tofu/full.json not found")
    assert not out.exists()


def test_registry_entries_name_importable_benchmarks():
    import importlib

    for name, entry in BENCHMARKS.items():
        assert callable(importlib.import_module(entry.module).main), name
