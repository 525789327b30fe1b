"""The dp-distributed benchmark at a tiny size: every (processes, mode) group stays alive and is timed in each
round, rows carry their ratios with spread, FSDP2 holds about half of DDP's bytes per rank at 2 processes (an
exact count from the tensors, not a timing). Speed is not asserted here; `expunge bench dp-distributed` measures
it side by side."""
import math

import pytest

pytest.importorskip("transformers")

from expunge.bench import dp_distributed as bench
from expunge.bench import read_results

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]


def test_every_group_is_timed_in_every_round_and_fsdp2_shards_what_ranks_hold(tmp_path):
    rows, rule = bench.run(repeats=2, tiny=True, steps_per_round=1, progress=False)
    assert [(r["world"], r["mode"]) for r in rows] == [(w, m) for w in bench.WORLDS for m in bench.MODES]
    assert rule.fixed == 2 and all(r["rounds"] == 2 and r["rounds_stop"] == "fixed" for r in rows)
    for r in rows:
        assert r["tokens_per_s"] > 0 and math.isfinite(r["ratio_vs_one_process"])
        if r["mode"] != "non-private DDP":
            assert len(r["throughput_vs_non_private_rounds"]) == 2
            assert r["throughput_vs_non_private_min"] <= r["throughput_vs_non_private"] <= r["throughput_vs_non_private_max"]
    fsdp = next(r for r in rows if r["world"] == 2 and r["mode"] == "private FSDP2")
    assert fsdp["held_vs_private_ddp"] == pytest.approx(0.5, abs=0.05)
    out = tmp_path / "dp-distributed.json"
    bench.report(rows, out, bench.table, bench.plot, settings={"repeats": 2})
    assert read_results(out)[0][0]["world"] == 1 and out.with_suffix(".png").stat().st_size > 0
