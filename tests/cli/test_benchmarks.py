"""The `expunge` command line end to end on scikit-learn's digits (small settings, for speed): bench.

Bad inputs must exit with code 2, say what is wrong without a traceback, and leave the run
directory byte-for-byte as it was.
"""

import json

import numpy as np

from .helpers import assert_clean_failure, invoke

BENCH_KEYS = {"task", "ratio", "T0", "j0", "m", "retrain_s", "deltagrad_s", "speedup", "speedup_bound",
              "dist_full_retrain", "dist_deltagrad_retrain", "acc_retrain", "acc_deltagrad"}


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
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        assert BENCH_KEYS <= set(row), BENCH_KEYS - set(row)
        assert row["retrain_s"] > 0 and row["deltagrad_s"] > 0 and row["speedup_bound"] >= 1
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


def test_unknown_benchmark_is_a_clean_error(tmp_path):
    result = invoke("bench", "nope", "--data", tmp_path)
    assert_clean_failure(result, "unknown benchmark 'nope'")


def test_bench_device_is_checked_before_anything_runs(tmp_path):
    import torch

    out = tmp_path / "out.json"
    assert_clean_failure(invoke("bench", "dp-lm", "--device", "tpu", "--json", out), "--device must be cpu or cuda")
    assert_clean_failure(invoke("bench", "deltagrad", "--device", "cuda", "--json", out), "runs on the CPU only")
    if not torch.cuda.is_available():
        assert_clean_failure(invoke("bench", "dp-lm", "--device", "cuda", "--json", out), "no CUDA device")
    assert not out.exists()
