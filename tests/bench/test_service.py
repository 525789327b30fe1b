"""End to end on real MNIST rows: `expunge serve` and a worker killed twice serve deletion requests from concurrent
clients, each applied exactly once; the row's table, plot and results file. Speed is not asserted here; `expunge
bench service` measures it."""

from expunge.bench import read_results
from expunge.bench import service as bench

from .shared_data import DATA, needs

pytestmark = needs("mnist/mnist.npz")


def test_the_service_applies_every_request_once_while_its_worker_is_killed_twice(tmp_path):
    row = bench.run_case("deltagrad", DATA, requests=80, clients=8, limit=2000, sample=2)
    assert row["lost"] == row["duplicated"] == row["wrong_ids"] == 0
    assert row["all_applied"] and row["deleted_exactly"] and row["run_verified"]
    assert [k["how"] for k in row["worker_kills"]] == ["SIGKILL", "died after committing a version (fault injection)"]
    assert "batch resumed after commit" in row["resumes"]
    assert row["versions"] == row["batches"] >= 1
    assert row["update_ratio_range"][0] <= row["update_ratio"] <= row["update_ratio_range"][1]
    out = tmp_path / "service.json"
    bench.report([row], out, bench.table, bench.plot, settings={"requests": 80})
    rows, provenance = read_results(out)
    assert rows[0]["run"] == "deltagrad" and provenance["settings"] == {"requests": 80}
    assert out.with_suffix(".png").stat().st_size > 0
