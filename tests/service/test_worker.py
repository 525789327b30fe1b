"""The worker: batches per run, exactly once across a crash at each stage (SQLite and PostgreSQL), two workers on one
database never applying a batch twice, refusals with their reason, failures that requeue and then pause, and runs
of other kinds served the same way."""

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import expunge
from expunge import IndexedDataset, TrainRecipe
from expunge.service import Database, Queue, Worker, tokens
from expunge.errors import ExpungeError
from expunge.service.worker import CRASH_ENV, HOLD_ENV, STAGES
from expunge.unlearn.audit import verify_run
from expunge.unlearn.run import RunModel

SRC = str(Path(expunge.__file__).resolve().parents[1])


def environment(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **extra)
    env.pop(CRASH_ENV, None)
    env.pop(HOLD_ENV, None)
    env.update(extra)
    return env


def submit_all(db, run, id_lists, requester="portal"):
    queue = Queue(db)
    _, principal = tokens.create(db, "requester", requester)
    return [queue.submit(run, "forget", principal, ids=sorted(ids), reason=f"request {i}")[0]["id"]
            for i, ids in enumerate(id_lists)]


def exactly_once(run_path, db, request_ids, id_lists):
    """Every request applied, each in exactly one ledger row, each batch one version, the run verified."""
    model = RunModel.load(run_path)
    rows = model.ledger.read()
    assert model.pending_rows == []
    counts = Counter(e.body.get("request_id") for e in rows[1:])
    assert counts == Counter(request_ids), counts  # none lost, none twice
    versions = {}
    for e in rows[1:]:
        versions.setdefault(e.body["batch"]["id"], set()).add(e.version)
    assert all(len(v) == 1 for v in versions.values())  # a batch is one version
    assert sorted(v.pop() for v in versions.values()) == list(range(2, model.version + 1))  # and versions are batches
    gone = set().union(*map(set, id_lists))
    assert set(model.universe.ids[~model.active].tolist()) == gone  # exactly these rows deleted
    queue = Queue(db)
    statuses = {r: queue.get(r) for r in request_ids}
    assert {s["status"] for s in statuses.values()} == {"applied"}
    by_request = {e.body["request_id"]: e for e in rows[1:]}
    assert all(s["ledger_seq"] == by_request[r].seq and s["version"] == by_request[r].version
               for r, s in statuses.items())
    committed = [b for b in queue.batches(limit=1000) if b["status"] == "committed"]
    assert sorted(b["version"] for b in committed if b["run"] == run_path.name) == sorted(
        v for v in range(2, model.version + 1))
    assert verify_run(run_path).ok, verify_run(run_path).problems
    return model


@pytest.mark.parametrize("stage", STAGES)
def test_a_worker_killed_at_any_stage_resumes_without_losing_duplicating_or_half_applying(runs, db_url, digits_ids,
                                                                                          stage):
    db = Database(db_url).create()
    id_lists = [digits_ids[0:2], digits_ids[1:4], digits_ids[10:11]]  # two requests share an id
    request_ids = submit_all(db, "digits", id_lists)
    code = "import sys; from expunge.service.worker import Worker; Worker(sys.argv[1], sys.argv[2]).drain()"
    done = subprocess.run([sys.executable, "-c", code, str(runs), db_url], env=environment(**{CRASH_ENV: stage}),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 86, done.stderr[-2000:]
    left = RunModel.load(runs / "digits")
    queue = Queue(db)
    assert {queue.get(r)["status"] for r in request_ids} == {"applying"}
    if stage == "claimed":  # nothing done to the run
        assert left.version == 1 and left.ledger.length() == 1
    elif stage == "committed":  # the version is there, its rows only in the manifest
        assert left.version == 2 and left.ledger.length() == 1 and len(left.pending_rows) == 3
    else:  # version and rows are there, the database does not know yet
        assert left.version == 2 and left.ledger.length() == 4 and left.pending_rows == []
    Worker(runs, db).drain()
    model = exactly_once(runs / "digits", db, request_ids, id_lists)
    assert model.version == 2  # one batch, applied once
    db.dispose()


def test_a_worker_sigkilled_while_it_holds_a_batch_leaves_it_for_the_next_worker(runs, db_url, digits_ids, tmp_path):
    db = Database(db_url).create()
    id_lists = [digits_ids[20:22], digits_ids[30:31]]
    request_ids = submit_all(db, "digits", id_lists)
    queue = Queue(db)
    queue.set_policy("digits", "test", max_batch=10, max_wait_s=0.0)
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "expunge", "worker", "--runs", str(runs), "--db", db_url],
                                  env=environment(**{HOLD_ENV: "120"}), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while not any(b["status"] == "applying" for b in queue.batches(limit=5)):
                assert worker.poll() is None and time.time() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
                time.sleep(0.1)
        finally:
            worker.kill()
            worker.wait()
    assert RunModel.load(runs / "digits").version == 1  # killed holding the batch: nothing done to the run
    Worker(runs, db).drain()
    exactly_once(runs / "digits", db, request_ids, id_lists)
    db.dispose()


@pytest.mark.parametrize("value", ["soon", "-1", "inf"])
def test_a_hold_that_is_not_a_number_of_seconds_is_refused(runs, db_url, monkeypatch, value):
    monkeypatch.setenv(HOLD_ENV, value)
    with pytest.raises(ExpungeError, match=HOLD_ENV):
        Worker(runs, db_url)


def test_two_workers_on_one_database_never_apply_a_batch_twice(runs, db_url, digits_ids, tmp_path):
    shutil.copytree(runs / "digits", runs / "second", ignore=shutil.ignore_patterns(".lock"))
    db = Database(db_url).create()
    queue = Queue(db)
    for run in ("digits", "second"):
        queue.set_policy(run, "test", max_batch=3, max_wait_s=0.0)
    lists = {run: [digits_ids[2 * i + 40 * k: 2 * i + 40 * k + 2] for i in range(12)]
             for k, run in enumerate(("digits", "second"))}
    submitted = {run: submit_all(db, run, lists[run]) for run in lists}
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    workers = [subprocess.Popen([sys.executable, "-m", "expunge", "worker", "--runs", str(runs), "--db", db_url],
                                env=environment(), stdout=log, stderr=subprocess.STDOUT) for log in logs]
    try:
        deadline = time.time() + 240
        while queue.runs_with_work() and time.time() < deadline:
            assert all(w.poll() is None for w in workers), (tmp_path / "worker0.log").read_text()[-2000:]
            time.sleep(0.3)
        assert not queue.runs_with_work(), "requests still open after 240 s"
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(60)
        for log in logs:
            log.close()
    for run in ("digits", "second"):
        model = exactly_once(runs / run, db, submitted[run], lists[run])
        assert model.version == 1 + 4  # 12 requests, batches of 3
    applied_by = {b["worker"] for b in queue.batches(limit=100)}
    print(f"batches applied by {len(applied_by)} worker(s)")
    db.dispose()


def test_a_batch_the_run_refuses_is_refused_with_the_reason_and_changes_nothing(runs, sqlite_db, digits_ids):
    before = (runs / "digits" / "manifest.json").read_bytes()
    (request,) = submit_all(sqlite_db, "digits", [digits_ids])  # every row of the run
    Worker(runs, sqlite_db).drain()
    status = Queue(sqlite_db).get(request)
    assert status["status"] == "refused" and "deletes every row" in status["refusal"]
    assert (runs / "digits" / "manifest.json").read_bytes() == before
    assert Queue(sqlite_db).batches()[0]["status"] == "refused"


def test_an_unexpected_failure_requeues_the_batch_then_pauses_the_run(runs, sqlite_db, digits_ids, monkeypatch):
    (request,) = submit_all(sqlite_db, "digits", [digits_ids[:2]])
    queue = Queue(sqlite_db)
    queue.set_policy("digits", "test", max_wait_s=0.0)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(RunModel, "forget_batch", broken)
    worker = Worker(runs, sqlite_db)
    for attempt in range(3):
        worker.step()
        assert queue.get(request)["status"] == "queued"
    policy = queue.policy("digits")
    assert policy.paused and "paused after 3 failed updates: RuntimeError: disk on fire" in policy.note
    assert RunModel.load(runs / "digits").version == 1
    monkeypatch.undo()
    queue.set_policy("digits", "operator", paused=False)
    assert queue.policy("digits").note is None
    Worker(runs, sqlite_db).drain()
    assert queue.get(request)["status"] == "applied"


def small_data(n=240, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, 4)) + y[:, None]
    return IndexedDataset.from_arrays(X / np.linalg.norm(X, axis=1, keepdims=True), y, ids=np.arange(n))


@pytest.mark.parametrize("kind", ["sisa", "certified"])
def test_runs_of_other_kinds_are_served_the_same_way(tmp_path, sqlite_db, kind):
    from expunge.unlearn import make_updater

    folder = tmp_path / "runs"
    recipe = TrainRecipe(model="logreg", epochs=2, batch_size=32, lr=0.1, dtype="float64")
    updater = make_updater("sisa", shards=3, workers=1) if kind == "sisa" else make_updater("certified", sigma=1.0)
    updater.fit(small_data(), recipe, out=folder / kind)
    id_lists = [[1, 2], [2, 50], [100]]
    request_ids = submit_all(sqlite_db, kind, id_lists)
    Worker(folder, sqlite_db).drain()
    model = exactly_once(folder / kind, sqlite_db, request_ids, id_lists)
    guarantee = model.ledger.read()[-1].body["guarantee"]
    assert guarantee["kind"] == ("exact" if kind == "sisa" else "certified")
    assert json.loads(Queue(sqlite_db).get(request_ids[1])["applied_ids"]) == [2, 50]
