"""The worker: applies each run's queued requests in batches, exactly once.

For each run with work, the worker takes the run's lock (the run directory's own lock; on PostgreSQL also an
advisory lock, so that servers sharing the database take turns), claims a batch (queue.py) and settles it:

1. Requests that need no update are answered at once: ids the run deleted earlier are named with the ledger rows
   that deleted them (``answered_by``); a request all of whose ids are gone is ``applied`` without a new row.
   Requests that cannot be applied at all (ids the run never held, rows it refuses) are ``refused`` with the reason.
2. The rest are applied as one update (``RunModel.forget_batch``/``add_batch``): one new version, one ledger row
   per request, each naming the batch and the request.
3. Their outcomes (version, ledger row, ids) are recorded in the database.

A worker killed anywhere leaves a batch the database calls ``applying``. The next worker to hold the run's lock
gets it back from ``claim`` and asks the run itself whether it committed (``RunModel.batch_rows``: the ledger, and
the manifest's copy of rows a crash kept out of the ledger file): if so it appends any missing rows and records
the outcomes, else it applies the batch (step 1 already recorded stays recorded). The check and the update happen
under the run's lock, so no request is lost, applied twice, or half-applied.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid

import numpy as np
from sqlalchemy import text

from ..artifact import RunDirectory
from ..errors import ExpungeError
from ..integrity import batch_of
from ..unlearn.run import BatchItem, Request, RunModel
from .queue import APPLIED, APPLYING, REFUSED, Batch, Queue
from .runs import RunCatalog, UnknownRun
from .store import Database, advisory_key

log = logging.getLogger("expunge.service.worker")

# fault injection for the tests and the benchmark: the worker process dies (os._exit) at this stage of a batch
CRASH_ENV = "EXPUNGE_SERVICE_CRASH_AT"
STAGES = ("claimed", "committed", "appended")
# and for a kill from outside: the worker holds each batch it claims this many seconds before applying it, so that a
# SIGKILL aimed at "a batch being applied" lands there on any machine, however fast the update itself is
HOLD_ENV = "EXPUNGE_SERVICE_HOLD_S"


class Worker:
    def __init__(self, runs, db: Database | str, worker_id: str | None = None, signing_key=None,
                 poll_s: float = 0.2, crash_at: str | None = None):
        self.catalog = runs if isinstance(runs, RunCatalog) else RunCatalog(runs)
        self.db = Database(db).create() if isinstance(db, str) else db
        self.queue = Queue(self.db)
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.signing_key, self.poll_s = signing_key, poll_s
        self.crash_at = crash_at if crash_at is not None else os.environ.get(CRASH_ENV) or None
        if self.crash_at is not None and self.crash_at not in STAGES:
            raise ExpungeError(f"{CRASH_ENV}={self.crash_at!r}: choose one of {', '.join(STAGES)}")
        self.hold_s = _seconds(os.environ.get(HOLD_ENV), HOLD_ENV)
        self._models: dict[str, RunModel] = {}

    # ------------------------------------------------------------------ loop

    def run_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        log.info("worker started", extra={"fields": {"worker": self.id}})
        while not stop.is_set():
            worked, due = self.step()
            if not worked:
                wait = self.poll_s if due is None else min(max(due - time.time(), 0.01), self.poll_s)
                stop.wait(wait)

    def step(self) -> tuple[bool, float | None]:
        """One pass over the runs with work: settle at most one batch per run. Returns whether a batch was
        settled, and when the next batch falls due (None: unknown)."""
        worked, next_due = False, None
        for name in self.queue.runs_with_work():
            try:
                done, due = self.serve_run(name)
            except Exception:  # one run's trouble never stops the others; the batch is settled on the next pass
                log.exception("batch failed", extra={"fields": {"worker": self.id, "run": name}})
                continue
            worked = worked or done
            if due is not None:
                next_due = due if next_due is None else min(next_due, due)
        return worked, next_due

    def drain(self, timeout: float = 60.0) -> None:
        """Settle batches until no request is queued or applying (ignoring max wait), for tests and tools."""
        deadline = time.time() + timeout
        while self.queue.runs_with_work():
            if time.time() > deadline:
                raise ExpungeError(f"requests still open after {timeout:g} s")
            for name in self.queue.runs_with_work():
                if self.queue.policy(name).paused:
                    continue
                with self._run_lock(name) as held:
                    if held:
                        batch, _ = self.queue.claim(name, self.id, force=True)
                        if batch is not None:
                            self.settle(batch)
            if all(self.queue.policy(n).paused for n in self.queue.runs_with_work()):
                return

    def serve_run(self, name: str) -> tuple[bool, float | None]:
        with self._run_lock(name) as held:
            if not held:
                return False, None
            batch, due = self.queue.claim(name, self.id)
            if batch is None:
                return False, due
            self.settle(batch)
            return True, None

    @contextlib.contextmanager
    def _run_lock(self, name: str):
        """Hold run ``name`` for one batch: True if this worker got it, False if another holds it."""
        try:
            path = self.catalog.path(name)
        except UnknownRun:
            path = None
        with contextlib.ExitStack() as stack:
            if self.db.kind == "postgresql":
                conn = stack.enter_context(self.db.engine.connect())
                key = advisory_key("expunge-run", name)
                got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
                conn.commit()
                if not got:
                    yield False
                    return

                def unlock():
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()

                stack.callback(unlock)
            if path is not None:
                try:
                    stack.enter_context(RunDirectory(path).lock(wait=0))
                except ExpungeError:  # another process is writing the run (a worker, or `expunge forget`)
                    yield False
                    return
            yield True

    # ------------------------------------------------------------------ one batch

    def settle(self, batch: Batch) -> None:
        """Bring ``batch`` to its end (the caller holds the run's lock)."""
        started = time.perf_counter()
        fields = {"worker": self.id, "run": batch.run, "batch": batch.id, "kind": batch.kind}
        try:
            path = self.catalog.path(batch.run)
        except UnknownRun as e:
            self._refuse_all(batch, f"the run is no longer served ({e})")
            return
        try:
            rows = RunModel.batch_rows(path, batch.id) if batch.resumed else []
            if rows:  # it committed before its worker stopped: finish the ledger and the records
                model = self._model(batch.run, path)
                repaired = model.repair()
                self._record(batch, rows)
                log.info("batch resumed after commit", extra={"fields": {**fields, "rows": len(rows),
                                                                          "rows_appended": len(repaired)}})
                return
            if batch.resumed:
                log.info("batch resumed before commit", extra={"fields": fields})
            self._crash("claimed")
            if self.hold_s:
                time.sleep(self.hold_s)
            model = self._model(batch.run, path)
            items = self._plan(model, batch)
            if not items:
                self.queue.close(batch.id, "answered")
                log.info("batch answered without an update", extra={"fields": fields})
                return
            method = None if batch.method in (None, model.manifest["method"]["name"]) else batch.method
            apply = model.forget_batch if batch.kind == "forget" else model.add_batch
            try:
                report, entries = apply(batch.id, items, method, signing_key=self.signing_key,
                                        committed=lambda: self._crash("committed"))
            except ExpungeError as e:  # the run refuses the update (budget, guarantee, every row deleted...)
                self._refuse_all(batch, str(e))
                log.warning("batch refused", extra={"fields": {**fields, "reason": str(e)}})
                return
            self._crash("appended")
            self._record(batch, entries, report.to_dict())
            log.info("batch applied", extra={"fields": {**fields, "requests": len(entries), "version": report.version,
                                                         "update_s": round(report.seconds, 4),
                                                         "total_s": round(time.perf_counter() - started, 4)}})
        except Exception as e:
            # nothing committed unless the run says so: then record it, else requeue
            self._models.pop(batch.run, None)
            rows = RunModel.batch_rows(path, batch.id)
            if rows:
                self._model(batch.run, path).repair()
                self._record(batch, rows)
            elif self.queue.requeue(batch.id, batch.run, f"{type(e).__name__}: {e}"):
                log.error("run paused after repeated failures", extra={"fields": {**fields, "error": str(e)}})
            raise

    def _plan(self, model: RunModel, batch: Batch) -> list[BatchItem]:
        """Step 1 (see the module docstring): record at once what needs no update; return the rest as items."""
        members = self.queue.members(batch.id)
        outcomes, items = {}, []
        earlier = None
        if batch.kind == "forget":
            universe = model.universe
            order = np.argsort(universe.ids, kind="stable")
            known_sorted = universe.ids[order]
            for member in members:
                ids = np.asarray(_loads(member["ids"]), dtype=np.int64)
                pos = np.minimum(np.searchsorted(known_sorted, ids), len(known_sorted) - 1)
                known = known_sorted[pos] == ids
                if not known.all():
                    outcomes[member["id"]] = {"status": REFUSED, "refusal": f"{int((~known).sum())} id(s) are not rows "
                                              f"of this run, e.g. {ids[~known][:5].tolist()}"}
                    continue
                active = model.active[order[pos]]
                if not active.all():
                    earlier = earlier if earlier is not None else _deleting_rows(model)
                    answered = sorted({earlier.get(int(i)) for i in ids[~active]} - {None})
                    if active.any():
                        outcomes[member["id"]] = {"answered_by": answered}
                    else:
                        outcomes[member["id"]] = {"status": APPLIED, "answered_by": answered, "version": model.version,
                                                  "applied_ids": []}
                        continue
                items.append(BatchItem(member["id"], tuple(ids[active].tolist()), _request(member)))
        else:
            seen: set[int] = set()
            for member in members:
                rows = _loads(member["rows"])
                given = _loads(member["ids"])
                X, y = np.asarray(rows["X"], dtype=np.float32), np.asarray(rows["y"], dtype=np.int64)
                try:  # each request on its own, so that one bad request does not refuse the others
                    model._added(X, y, given)
                    if given is not None and seen & set(given):
                        raise ExpungeError(f"ids {sorted(seen & set(given))[:5]} are added by an earlier request of "
                                           "this batch")
                except ExpungeError as e:
                    outcomes[member["id"]] = {"status": REFUSED, "refusal": str(e)}
                    continue
                seen |= set(given or ())
                items.append(BatchItem(member["id"], None if given is None else tuple(given), _request(member),
                                       rows=(X, y)))
        if outcomes:
            self.queue.settle(batch.id, outcomes)
        return items

    def _record(self, batch: Batch, entries, report: dict | None = None) -> None:
        """Step 3: each request of the batch gets its ledger row's version, seq and ids; the batch its figures."""
        outcomes = {}
        for entry in entries:
            outcomes[entry.body["request_id"]] = {"status": APPLIED, "version": entry.version, "ledger_seq": entry.seq,
                                                  "applied_ids": entry.body["report"].get("ids", [])}
        self.queue.settle(batch.id, outcomes)
        for member in self.queue.members(batch.id, APPLYING):  # cannot happen: a request of the batch with no row
            log.error("request of a committed batch has no ledger row", extra={"fields": {
                "batch": batch.id, "request": member["id"]}})
        report = report or entries[0].body["report"]
        self.queue.close(batch.id, "committed", seconds=report.get("seconds"), version=entries[0].version,
                         figures={"method": report.get("method"), "guarantee": report.get("guarantee"),
                                  "metrics": report.get("metrics"), "rows": len(entries),
                                  "ids": len({i for e in entries for i in e.body["report"].get("ids", [])})})

    def _refuse_all(self, batch: Batch, reason: str) -> None:
        self.queue.settle(batch.id, {m["id"]: {"status": REFUSED, "refusal": reason}
                                     for m in self.queue.members(batch.id)})
        self.queue.close(batch.id, "refused", error=reason)

    def _model(self, name: str, path) -> RunModel:
        """The run, loaded once and kept while nobody else writes it (reloaded when its ledger head moves)."""
        model = self._models.get(name)
        manifest = RunDirectory(path).read_manifest()
        if model is None or model.manifest.get("ledger") != manifest.get("ledger"):
            model = self._models[name] = RunModel.load(path)
        return model

    def _crash(self, stage: str) -> None:
        if self.crash_at == stage:
            from .logs import stop

            log.warning("crashing on purpose", extra={"fields": {"worker": self.id, "stage": stage}})
            stop()
            os._exit(86)


def _seconds(value: str | None, name: str) -> float:
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ExpungeError(f"{name}={value!r}: give a number of seconds >= 0 (or leave it unset)")
    return seconds


def _loads(value):
    import json

    return None if value is None else json.loads(value)


def _request(member: dict) -> Request:
    return Request(member["requested_by"], member["reason"], member["reference"])


def _deleting_rows(model: RunModel) -> dict[int, int]:
    """id -> the ledger row that last removed it (for requests whose ids are already gone)."""
    rows = model.ledger.read() + model.pending_rows
    out: dict[int, int] = {}
    for entry in rows:
        for i in entry.body.get("report", {}).get("ids", []):
            if entry.body.get("kind") == "forget":
                out[int(i)] = entry.seq
            else:
                out.pop(int(i), None)
    return out


def run_worker(runs, db_url: str, signing_key=None, stop: threading.Event | None = None) -> None:
    """A worker process's main: set up structured logs and serve until stopped (or killed)."""
    from .logs import configure

    configure()
    Worker(runs, db_url, signing_key=signing_key).run_forever(stop)


__all__ = ["Worker", "batch_of", "run_worker"]
