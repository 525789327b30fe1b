"""End to end on real MNIST rows: `expunge serve` and a worker killed twice serve deletion requests from concurrent
clients, each applied exactly once. Speed is not asserted here; `expunge bench service` measures it."""

from expunge.bench import service as bench

from .shared_data import DATA, needs

pytestmark = needs("mnist/mnist.npz")


def test_the_service_applies_every_request_once_while_its_worker_is_killed_twice():
    row = bench.run_case("deltagrad", DATA, requests=80, clients=8, limit=2000, sample=2)
    assert row["lost"] == row["duplicated"] == row["wrong_ids"] == 0
    assert row["all_applied"] and row["deleted_exactly"] and row["run_verified"]
    assert [k["how"] for k in row["worker_kills"]] == ["SIGKILL", "died after committing a version (fault injection)"]
    assert "batch resumed after commit" in row["resumes"]
    assert row["versions"] == row["batches"] >= 1
