"""The queue: batches fill up to max_batch or wait max_wait, hold one kind in arrival order, wait while paused, and a
batch a stopped worker left is handed back first; identical open requests of one token are one request, also when
submitted together from many threads and committed as one group."""

import threading
import time

import pytest

from expunge.errors import ExpungeError
from expunge.service import Database, Policy, Queue, tokens
from expunge.service.queue import GroupCommit


@pytest.fixture
def queue(sqlite_db):
    return Queue(sqlite_db)


@pytest.fixture
def principal(sqlite_db):
    return tokens.create(sqlite_db, "requester", "portal")[1]


def test_a_batch_waits_for_max_wait_unless_it_is_full(queue, principal):
    queue.set_policy("r", "op", max_batch=3, max_wait_s=30)
    before = time.time()
    for i in range(2):
        queue.submit("r", "forget", principal, ids=[i])
    batch, due = queue.claim("r", "w")
    # due is 30 s after the first request arrived, whenever that was between `before` and now (no wall-clock
    # margin: a loaded machine may stall for seconds between these lines)
    assert batch is None and before + 30 - 1e-3 <= due <= time.time() + 30
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


def test_submissions_from_many_threads_are_committed_in_groups_each_once(db_url):
    db = Database(db_url).create()
    queue = Queue(db)
    one, two = (tokens.create(db, "requester", name)[1] for name in ("one", "two"))
    commits = GroupCommit(queue, most=16)
    # 40 threads at once: 20 distinct requests of token one, each sent twice; and token two's copy of the first
    items = [dict(run="r", kind="forget", principal=one, ids=[i]) for i in range(20)] * 2
    items.append(dict(run="r", kind="forget", principal=two, ids=[0]))
    futures, start = [None] * len(items), threading.Barrier(len(items))

    def send(k):
        start.wait()
        futures[k] = commits.submit(**items[k])

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answers = [f.result(timeout=60) for f in futures]
    assert queue.count() == 21  # each distinct request once, whichever group its copies fell in
    by_ids = {}
    for item, (row, duplicate) in zip(items, answers):
        by_ids.setdefault((item["principal"].token_id, tuple(item["ids"])), []).append((row["id"], duplicate))
    assert all(len({r for r, _ in copies}) == 1 for copies in by_ids.values())  # the copies got one request id
    assert all(sorted(d for _, d in copies) == [False, True] for key, copies in by_ids.items() if key[0] == one.token_id)
    assert queue.get(by_ids[(two.token_id, (0,))][0][0])["token_id"] == two.token_id
    db.dispose()


def test_a_failed_group_commit_answers_every_caller_and_the_next_group_is_committed(sqlite_db, principal, monkeypatch):
    queue = Queue(sqlite_db)
    real = queue.submit_many
    monkeypatch.setattr(queue, "submit_many", lambda items: (_ for _ in ()).throw(RuntimeError("disk full")))
    commits = GroupCommit(queue)
    with pytest.raises(RuntimeError, match="disk full"):
        commits.submit(run="r", kind="forget", principal=principal, ids=[1]).result(timeout=30)
    assert queue.count() == 0
    monkeypatch.setattr(queue, "submit_many", real)
    row, duplicate = commits.submit(run="r", kind="forget", principal=principal, ids=[1]).result(timeout=30)
    assert not duplicate and queue.get(row["id"])["status"] == "queued"


@pytest.mark.parametrize("fields, words", [({"max_batch": 0}, "max_batch"), ({"max_wait_s": -1}, "max_wait_s"),
                                           ({"deadline_s": 0}, "deadline_s")])
def test_bad_policies_are_refused(fields, words):
    with pytest.raises(ExpungeError, match=words):
        Policy(**fields)
