"""End-to-end on the real Location dataset: SISA's deletion cost falls with shards and slices.

Speed is not asserted here; `expunge bench sisa` measures it side by side."""

from expunge.bench import sisa as bench

from .shared_data import DATA, needs

pytestmark = needs("location/bangkok")


def test_sisa_on_location_reprocesses_a_fraction_of_the_rows():
    train, test = bench.datasets(DATA, None)["location"]
    assert len(train) + len(test) == 5010
    row = bench.run_config("location", train, test, shards=5, slices=5, requests=20, repeats=1)
    assert row["rounds"] == 1 and row["deletions_timed"] == 5  # a round deletes one row from each slice
    assert row["rows_speedup"] >= 5 / 2 * 5 / 2  # the target shape, S/2 x R/2, in rows
    assert row["test_acc"] > 1 / 30  # better than chance on 30 classes
