"""The dp-distributed benchmark at a tiny size: every (world size, mode) case runs in its own processes, in
interleaved rounds, and the rows carry the ratios with their spread. Speed is not asserted here."""
import importlib.util

import pytest

from expunge.bench import dp_distributed as bench
from expunge.bench import read_results

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.mark.slow
def test_smoke_run_interleaves_one_and_two_processes_in_rounds(tmp_path):
    out = tmp_path / "dp-distributed.json"
    bench.main(None, out, repeats=2, limit=1, progress=False)
    rows, provenance = read_results(out)
    assert provenance["settings"]["rounds"] == {"fixed": 2} and out.with_suffix(".png").exists()
    assert [(r["world"], r["mode"]) for r in rows] == [(w, m) for w in bench.WORLDS for m in bench.MODES]
    for r in rows:
        assert r["rounds"] == 2 and r["rounds_stop"] == "fixed" and len(r["tokens_per_s_rounds"]) == 2
        assert r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"] and r["tokens_per_s"] > 0
        if r["mode"] == "non-private DDP":
            assert r["throughput_vs_non_private"] == 1.0
        else:  # a ratio per round (both sides timed in that round), the median with its spread
            assert len(r["throughput_vs_non_private_rounds"]) == 2
            assert r["throughput_vs_non_private_min"] <= r["throughput_vs_non_private"] \
                <= r["throughput_vs_non_private_max"]
            assert ("ratio_vs_one_process" in r) == (r["world"] == 2)
    fsdp, ddp = (next(r for r in rows if r["world"] == 2 and r["mode"] == m) for m in ("private FSDP2", "private DDP"))
    assert fsdp["held_mb_per_rank"] < 0.6 * ddp["held_mb_per_rank"]  # the shards: about half of the replicas
