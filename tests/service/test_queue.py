"""The queue: batches fill up to max_batch or wait max_wait, hold one kind in arrival order, wait while paused, and a
batch a stopped worker left is handed back first; identical open requests of one token are one request."""

import time

import pytest

from expunge.errors import ExpungeError
from expunge.service import Policy, Queue, tokens


@pytest.fixture
def queue(sqlite_db):
    return Queue(sqlite_db)


@pytest.fixture
def principal(sqlite_db):
    return tokens.create(sqlite_db, "requester", "portal")[1]


def test_a_batch_waits_for_max_wait_unless_it_is_full(queue, principal):
    queue.set_policy("r", "op", max_batch=3, max_wait_s=30)
    for i in range(2):
        queue.submit("r", "forget", principal, ids=[i])
    batch, due = queue.claim("r", "w")
    assert batch is None and 29 < due - time.time() <= 30
    queue.submit("r", "forget", principal, ids=[2])
    batch, _ = queue.claim("r", "w")
    assert batch is not None and batch.kind == "forget" and len(queue.members(batch.id)) == 3


def test_a_request_nearing_its_deadline_does_not_wait_for_the_batch(queue, principal):
    queue.set_policy("r", "op", max_batch=100, max_wait_s=3600, deadline_s=1)
    queue.submit("r", "forget", principal, ids=[1])
    time.sleep(1.05)
    batch, _ = queue.claim("r", "w")
    assert batch is not None


def test_a_batch_holds_one_kind_in_arrival_order(queue, principal):
    queue.set_policy("r", "op", max_batch=10, max_wait_s=0)
    queue.submit("r", "forget", principal, ids=[1])
    queue.submit("r", "forget", principal, ids=[2])
    queue.submit("r", "add", principal, rows={"X": [[0.0]], "y": [0]})
    queue.submit("r", "forget", principal, ids=[3])
    first, _ = queue.claim("r", "w")
    assert [m["ids"] for m in queue.members(first.id)] == ["[1]", "[2]"]
    queue.close(first.id, "committed")
    queue.settle(first.id, {m["id"]: {"status": "applied"} for m in queue.members(first.id)})
    second, _ = queue.claim("r", "w")
    assert second.kind == "add"


def test_a_paused_run_keeps_its_requests_queued(queue, principal):
    queue.set_policy("r", "op", paused=True, max_wait_s=0)
    queue.submit("r", "forget", principal, ids=[1])
    assert queue.claim("r", "w") == (None, None)
    queue.set_policy("r", "op", paused=False)
    assert queue.claim("r", "w")[0] is not None


def test_a_batch_left_applying_is_handed_back_before_anything_new(queue, principal):
    queue.set_policy("r", "op", max_wait_s=0)
    queue.submit("r", "forget", principal, ids=[1])
    left, _ = queue.claim("r", "dead worker")
    queue.submit("r", "forget", principal, ids=[2])
    again, _ = queue.claim("r", "new worker")
    assert again.id == left.id and again.resumed and not left.resumed
    assert queue.batches()[0]["worker"] == "new worker"


def test_settling_is_idempotent_and_only_touches_the_batchs_open_requests(queue, principal):
    queue.set_policy("r", "op", max_wait_s=0)
    request = queue.submit("r", "forget", principal, ids=[1])[0]["id"]
    batch, _ = queue.claim("r", "w")
    queue.settle(batch.id, {request: {"status": "applied", "version": 2, "ledger_seq": 2, "applied_ids": [1]}})
    queue.settle(batch.id, {request: {"status": "refused", "refusal": "late"}})  # a second settle changes nothing
    row = queue.get(request)
    assert row["status"] == "applied" and row["version"] == 2 and row["refusal"] is None


def test_identical_open_requests_of_one_token_are_one_request(queue, principal, sqlite_db):
    first, dup = queue.submit("r", "forget", principal, ids=[1, 2])
    again, dup_again = queue.submit("r", "forget", principal, ids=[1, 2])
    other = tokens.create(sqlite_db, "requester", "other")[1]
    third, dup_third = queue.submit("r", "forget", other, ids=[1, 2])
    assert not dup and dup_again and again["id"] == first["id"] and not dup_third and third["id"] != first["id"]


@pytest.mark.parametrize("fields, words", [({"max_batch": 0}, "max_batch"), ({"max_wait_s": -1}, "max_wait_s"),
                                           ({"deadline_s": 0}, "deadline_s")])
def test_bad_policies_are_refused(fields, words):
    with pytest.raises(ExpungeError, match=words):
        Policy(**fields)
