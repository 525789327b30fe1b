"""The durable request queue: requests, per-run policies and batches, in the service's database.

A request is committed before its submitter hears ``202``. Statuses::

    queued --claim--> applying --worker--> applied   (its own ledger row, or answered: its rows were already gone)
                                      \\--> refused   (with the reason)

Deduplication: a token that submits the same request (run, kind, ids) while an identical one of its own is still
queued or applying gets that request back, not a second one (a retried POST is harmless).

A worker claims a batch for one run only while it holds that run's lock (worker.py), so claims of one run never
race; on PostgreSQL the claim also reads the queue with ``FOR UPDATE SKIP LOCKED``. A batch the database still
says is ``applying`` when a worker gets the run's lock was left by a worker that died: ``claim`` hands it back to
be settled first (worker.py decides from the run itself whether it committed).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass

from sqlalchemy import and_, func, insert, select, text, update

from ..errors import ExpungeError
from ..ledger import canonical, ids_digest, sha256_hex
from .store import Database, advisory_key, batches, policies, requests
from .tokens import Principal

QUEUED, APPLYING, APPLIED, REFUSED = "queued", "applying", "applied", "refused"
OPEN = (QUEUED, APPLYING)
MAX_ATTEMPTS = 3  # a batch that fails this often for an unexpected reason pauses its run


@dataclass(frozen=True)
class Policy:
    """How a run's requests are batched: at most ``max_batch`` per batch, none waiting longer than ``max_wait_s``
    (nor past its deadline) once the run is not paused; ``method`` (None: the run's own); ``deadline_s``: the time
    a request has to be applied, from its arrival (GDPR: one month)."""

    max_batch: int = 256
    max_wait_s: float = 5.0
    method: str | None = None
    deadline_s: float = 30 * 86400.0
    paused: bool = False
    note: str | None = None  # why a worker paused the run

    def __post_init__(self):
        if not 1 <= self.max_batch <= 100_000:
            raise ExpungeError(f"max_batch must be between 1 and 100000, got {self.max_batch}")
        if not 0 <= self.max_wait_s <= 86400:
            raise ExpungeError(f"max_wait_s must be between 0 and 86400 seconds, got {self.max_wait_s}")
        if not 1 <= self.deadline_s <= 366 * 86400:
            raise ExpungeError(f"deadline_s must be between 1 second and a year, got {self.deadline_s}")


@dataclass(frozen=True)
class Batch:
    id: str
    run: str
    kind: str
    method: str | None
    resumed: bool  # left 'applying' by a worker that stopped


def request_digest(kind: str, ids: list[int] | None, rows: dict | None) -> str:
    if kind == "forget":
        return ids_digest(ids)
    return sha256_hex(canonical({"ids": ids, "rows": rows}))


class Queue:
    def __init__(self, db: Database):
        self.db = db

    # ------------------------------------------------------------------ policies

    def policy(self, run: str, c=None) -> Policy:
        if c is None:
            with self.db.read() as c:
                return self.policy(run, c)
        row = c.execute(select(policies).where(policies.c.run == run)).mappings().first()
        if row is None:
            return Policy()
        return Policy(row["max_batch"], row["max_wait_s"], row["method"], row["deadline_s"], bool(row["paused"]),
                      row["note"])

    def set_policy(self, run: str, by: str, **changes) -> Policy:
        """Change some of a run's settings (the others stay); returns the new policy."""
        with self.db.write() as c:
            self._set_policy(c, run, by, **changes)
        return self.policy(run)

    def _set_policy(self, c, run: str, by: str, **changes) -> None:
        old = self.policy(run, c)
        if "paused" in changes and "note" not in changes:
            changes["note"] = None  # an operator's pause or resume clears a worker's note
        new = Policy(**{**asdict(old), **changes})
        values = dict(asdict(new), updated_at=time.time(), updated_by=by)
        if c.execute(select(policies.c.run).where(policies.c.run == run)).first() is None:
            c.execute(insert(policies).values(run=run, **values))
        else:
            c.execute(update(policies).where(policies.c.run == run).values(**values))

    # ------------------------------------------------------------------ requests

    def submit(self, run: str, kind: str, principal: Principal, *, ids: list[int] | None = None,
               rows: dict | None = None, group: str | None = None, requested_by: str | None = None,
               reason: str | None = None, reference: str | None = None) -> tuple[dict, bool]:
        """Queue a request (committed when this returns); returns it and whether it was a duplicate of an open one."""
        return self.submit_many([dict(run=run, kind=kind, principal=principal, ids=ids, rows=rows, group=group,
                                      requested_by=requested_by, reason=reason, reference=reference)])[0]

    def submit_many(self, items: list[dict]) -> list[tuple[dict, bool]]:
        """Queue several requests (``submit``'s arguments as dicts) in one transaction: one commit, one flush to
        disk for all of them."""
        now = time.time()
        keyed = []
        for item in items:
            digest = request_digest(item["kind"], item.get("ids"), item.get("rows"))
            keyed.append(((item["principal"].token_id, item["run"], item["kind"], digest), item))
        out, fresh = [], {}
        with self.db.write() as c:
            if self.db.kind == "postgresql":  # identical submissions to two servers at once: the second sees the first
                for key in sorted({k for k, _ in keyed}):  # in one order, so that two servers never deadlock
                    c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key("expunge-submit", *key)})
            found = {}  # open requests identical to one of these, in one query for the whole group
            for row in c.execute(select(requests).where(and_(
                    requests.c.ids_sha256.in_({k[3] for k, _ in keyed}), requests.c.status.in_(OPEN)))).mappings():
                found.setdefault((row["token_id"], row["run"], row["kind"], row["ids_sha256"]), dict(row))
            deadlines = {run: self.policy(run, c).deadline_s for run in {k[1] for k, _ in keyed}}
            for key, item in keyed:
                same = found.get(key) or fresh.get(key)
                if same is not None:
                    out.append((same, True))
                    continue
                token_id, run, kind, digest = key
                ids, rows = item.get("ids"), item.get("rows")
                fresh[key] = dict(id=uuid.uuid4().hex, run=run, kind=kind, ids=None if ids is None else json.dumps(ids),
                                  ids_sha256=digest, rows=None if rows is None else json.dumps(rows),
                                  group_name=item.get("group"), token_id=token_id,
                                  requested_by=item.get("requested_by"), reason=item.get("reason"),
                                  reference=item.get("reference"), status=QUEUED, attempts=0, created_at=now,
                                  deadline_at=now + deadlines[run])
                out.append((fresh[key], False))
            if fresh:
                c.execute(insert(requests), list(fresh.values()))
        return out

    def get(self, request_id: str) -> dict | None:
        with self.db.read() as c:
            row = c.execute(select(requests).where(requests.c.id == request_id)).mappings().first()
        return None if row is None else dict(row)

    def listing(self, token_id: str | None = None, run: str | None = None, status: str | None = None,
                limit: int = 100) -> list[dict]:
        """Requests, newest first (only ``token_id``'s when given)."""
        query = select(requests).order_by(requests.c.position.desc()).limit(limit)
        for column, value in ((requests.c.token_id, token_id), (requests.c.run, run), (requests.c.status, status)):
            if value is not None:
                query = query.where(column == value)
        with self.db.read() as c:
            return [dict(r) for r in c.execute(query).mappings()]

    def count(self) -> int:
        with self.db.read() as c:
            return c.execute(select(func.count()).select_from(requests)).scalar()

    def depth(self) -> dict[str, dict]:
        """Per run: requests queued and applying, and the oldest open request's arrival and deadline."""
        query = (select(requests.c.run, requests.c.status, func.count(), func.min(requests.c.created_at),
                        func.min(requests.c.deadline_at))
                 .where(requests.c.status.in_(OPEN)).group_by(requests.c.run, requests.c.status))
        out: dict[str, dict] = {}
        with self.db.read() as c:
            for run, status, n, oldest, deadline in c.execute(query):
                entry = out.setdefault(run, {QUEUED: 0, APPLYING: 0, "oldest_at": None, "oldest_deadline_at": None})
                entry[status] = n
                entry["oldest_at"] = min(x for x in (entry["oldest_at"], oldest) if x is not None)
                entry["oldest_deadline_at"] = min(x for x in (entry["oldest_deadline_at"], deadline) if x is not None)
        return out

    def totals(self) -> dict[tuple[str, str], int]:
        """(run, status) -> number of requests."""
        with self.db.read() as c:
            rows = c.execute(select(requests.c.run, requests.c.status, func.count())
                             .group_by(requests.c.run, requests.c.status)).all()
        return {(run, status): n for run, status, n in rows}

    # ------------------------------------------------------------------ workers

    def runs_with_work(self) -> list[str]:
        with self.db.read() as c:
            return [r for (r,) in c.execute(select(requests.c.run).where(requests.c.status.in_(OPEN)).distinct())]

    def claim(self, run: str, worker: str, force: bool = False) -> tuple[Batch | None, float | None]:
        """The next batch of ``run`` to settle (the caller holds the run's lock): a batch a stopped worker left
        applying, else the oldest queued requests (of one kind, in arrival order, at most max_batch) once the batch
        is full or its oldest request has waited max_wait_s (or reached its deadline). Returns (batch, None), or
        (None, when the next batch falls due) when there is nothing to do yet. ``force``: do not wait for the batch
        to fill (tests, draining)."""
        now = time.time()
        with self.db.write() as c:
            left = c.execute(select(batches).where(and_(batches.c.run == run, batches.c.status == APPLYING))
                             .order_by(batches.c.created_at).limit(1)).mappings().first()
            if left is not None:
                c.execute(update(batches).where(batches.c.id == left["id"]).values(worker=worker))
                return Batch(left["id"], run, left["kind"], left["method"], True), None
            policy = self.policy(run, c)
            if policy.paused:
                return None, None
            head = c.execute(select(requests.c.id, requests.c.kind, requests.c.created_at, requests.c.deadline_at)
                             .where(and_(requests.c.run == run, requests.c.status == QUEUED))
                             .order_by(requests.c.position).limit(policy.max_batch)
                             .with_for_update(skip_locked=True)).all()
            if not head:
                return None, None
            due = min(head[0].created_at + policy.max_wait_s, head[0].deadline_at)
            if len(head) < policy.max_batch and now < due and not force:
                return None, due
            kind = head[0].kind
            taken = []
            for row in head:  # one kind per batch, and never out of arrival order
                if row.kind != kind:
                    break
                taken.append(row.id)
            batch = Batch(uuid.uuid4().hex, run, kind, policy.method, False)
            c.execute(insert(batches).values(id=batch.id, run=run, kind=kind, status=APPLYING, worker=worker,
                                             size=len(taken), method=policy.method, created_at=now))
            c.execute(update(requests).where(requests.c.id.in_(taken))
                      .values(status=APPLYING, batch_id=batch.id, attempts=requests.c.attempts + 1))
        return batch, None

    def members(self, batch_id: str, status: str = APPLYING) -> list[dict]:
        """The batch's requests in ``status``, in arrival order."""
        with self.db.read() as c:
            return [dict(r) for r in c.execute(select(requests).where(and_(
                requests.c.batch_id == batch_id, requests.c.status == status)).order_by(requests.c.position)).mappings()]

    def settle(self, batch_id: str, outcomes: dict[str, dict]) -> None:
        """Record final outcomes of some of a batch's requests (request id -> columns: status, refusal, version,
        ledger_seq, applied_ids, answered_by) at once. Only requests still applying change: settling twice is
        harmless."""
        now = time.time()
        with self.db.write() as c:
            for request_id, outcome in outcomes.items():
                values = {k: (json.dumps(v) if k in ("applied_ids", "answered_by") and v is not None else v)
                          for k, v in outcome.items()}
                if values.get("status") in (APPLIED, REFUSED):
                    values["finished_at"] = now
                c.execute(update(requests).where(and_(requests.c.id == request_id, requests.c.batch_id == batch_id,
                                                      requests.c.status == APPLYING)).values(**values))

    def close(self, batch_id: str, status: str, *, seconds: float | None = None, version: int | None = None,
              figures: dict | None = None, error: str | None = None) -> None:
        with self.db.write() as c:
            c.execute(update(batches).where(batches.c.id == batch_id).values(
                status=status, seconds=seconds, version=version, finished_at=time.time(), error=error,
                figures=None if figures is None else json.dumps(figures)))

    def requeue(self, batch_id: str, run: str, error: str) -> bool:
        """A batch that failed before committing anything: its requests go back to the queue, the batch is closed
        as failed; after MAX_ATTEMPTS tries of the same requests the run is paused with the error as its note (the
        requests stay queued: an operator fixes the run and resumes it). Returns whether it paused the run."""
        now = time.time()
        with self.db.write() as c:
            attempts = c.execute(select(func.max(requests.c.attempts)).where(and_(
                requests.c.batch_id == batch_id, requests.c.status == APPLYING))).scalar() or 0
            c.execute(update(requests).where(and_(requests.c.batch_id == batch_id, requests.c.status == APPLYING))
                      .values(status=QUEUED, batch_id=None))
            c.execute(update(batches).where(batches.c.id == batch_id)
                      .values(status="failed", error=error, finished_at=now))
            if attempts >= MAX_ATTEMPTS:
                self._set_policy(c, run, "worker", paused=True, note=f"paused after {attempts} failed updates: {error}")
                return True
        return False

    def batches(self, run: str | None = None, limit: int = 50) -> list[dict]:
        query = select(batches).order_by(batches.c.created_at.desc()).limit(limit)
        if run is not None:
            query = query.where(batches.c.run == run)
        with self.db.read() as c:
            out = []
            for row in c.execute(query).mappings():
                row = dict(row)
                row["figures"] = json.loads(row["figures"]) if row["figures"] else None
                out.append(row)
            return out

    def update_totals(self) -> dict[str, tuple[int, float]]:
        """Per run: batches that made a version, and their update seconds in all."""
        with self.db.read() as c:
            rows = c.execute(select(batches.c.run, func.count(), func.sum(batches.c.seconds))
                             .where(batches.c.status == "committed").group_by(batches.c.run)).all()
        return {run: (n, float(s or 0.0)) for run, n, s in rows}


class GroupCommit:
    """Submissions from many threads committed together (one transaction, one flush to disk for all that arrive
    while the previous commit runs), each caller answered only once its request is committed. Under many concurrent
    clients this is what keeps the time to a durable ``202`` short."""

    def __init__(self, queue: Queue, most: int = 512):
        self.queue, self.most = queue, most
        self.pending: list[tuple[dict, Future]] = []
        self.ready = threading.Condition()
        self.thread = threading.Thread(target=self._commit_forever, name="expunge-group-commit", daemon=True)
        self.thread.start()

    def submit(self, **item) -> Future:
        """Queue ``item`` (``Queue.submit``'s arguments); the future gives (request, duplicate) once committed."""
        future: Future = Future()
        with self.ready:
            self.pending.append((item, future))
            self.ready.notify()
        return future

    def _commit_forever(self) -> None:
        while True:
            with self.ready:
                while not self.pending:
                    self.ready.wait()
                group, self.pending = self.pending[: self.most], self.pending[self.most:]
            try:
                results = self.queue.submit_many([item for item, _ in group])
            except BaseException as e:  # every caller of the group hears of it; none was committed
                for _, future in group:
                    future.set_exception(e)
                continue
            for (_, future), result in zip(group, results):
                future.set_result(result)
