"""The HTTP API (FastAPI): requests in, status and receipts out, policies for operators, ledgers for auditors.

Every call but the documentation (``/docs``, ``/openapi.json``) carries a token (``Authorization: Bearer ...``; the
status page also takes it from the cookie its login form sets). What each role may do::

    requester  POST /v1/runs/{run}/requests              submit a deletion (ids or a group) or an addition (rows)
               GET  /v1/requests[/{id}[/receipt]]        its own requests only (others' are "not found")
    operator   PUT  /v1/runs/{run}/policy, POST .../pause, .../resume; GET /v1/requests, /v1/batches, /metrics
    auditor    GET  /v1/runs/{run}/ledger, /v1/runs/{run}/verify, POST /v1/receipts/verify; any request and receipt
    everyone   GET  /v1/runs, /v1/runs/{run}

A submission is checked in full (the run exists, the ids are integers, distinct, rows of the run; added rows
have the run's features and labels) before it is committed to the queue; the ``202`` answer means it is on disk.
Bad input gets a 4xx whose ``detail`` says what is wrong, and nothing is queued.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..artifact import RunDirectory
from ..errors import ExpungeError
from ..integrity import reconcile
from ..unlearn.audit import check_receipt, make_receipt, verify_run
from ..unlearn.run import MAX_TEXT, reading_verifier
from .metrics import Metrics
from .queue import APPLIED, GroupCommit, Queue
from .runs import RunCatalog, UnknownRun, run_summary
from .store import Database
from .tokens import Principal, TokenCache

log = logging.getLogger("expunge.service.api")

COOKIE = "expunge_token"
MAX_BODY = 1 << 20   # bytes of a request body, by default
MAX_IDS = 100_000    # ids in one request, by default
INT64 = (-(2**63), 2**63 - 1)

Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


# ------------------------------------------------------------------ request and response bodies


class Rows(BaseModel):
    """Rows to add: features, integer labels, and optional integer ids (fresh ones are assigned when absent)."""

    model_config = ConfigDict(extra="forbid")
    X: list[list[Finite]] = Field(min_length=1, description="One list of features per row")
    y: list[StrictInt] = Field(min_length=1, description="One integer label per row")
    ids: list[StrictInt] | None = Field(None, description="One id per row; fresh ids when absent")

    @model_validator(mode="after")
    def _shape(self):
        if len(self.X) != len(self.y):
            raise ValueError(f"{len(self.X)} rows of features but {len(self.y)} labels")
        if len({len(x) for x in self.X}) != 1:
            raise ValueError("every row of X must have the same number of features")
        if self.ids is not None:
            if len(self.ids) != len(self.X):
                raise ValueError(f"{len(self.X)} rows but {len(self.ids)} ids")
            _distinct(self.ids)
        return self


def _distinct(ids: list[int]) -> None:
    if any(not INT64[0] <= i <= INT64[1] for i in ids):
        raise ValueError("ids must fit in 64-bit signed integers")
    if len(set(ids)) != len(ids):
        seen, dup = set(), []
        for i in ids:
            if i in seen:
                dup.append(i)
            seen.add(i)
        raise ValueError(f"ids appear more than once: {dup[:5]}; list each once")


class Submission(BaseModel):
    """A deletion (``ids`` or a ``group``) or an addition (``rows``) for one run."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"kind": "forget", "ids": [17, 42], "requested_by": "jane@example.org", "reason": "GDPR art. 17",
         "reference": "T-1234"},
        {"kind": "forget", "group": "class-3"},
        {"kind": "add", "rows": {"X": [[0.1, 0.2]], "y": [1]}}]})
    kind: Literal["forget", "add"] = "forget"
    ids: list[StrictInt] | None = Field(None, description="forget: the ids of the rows to delete")
    group: str | None = Field(None, min_length=1, max_length=200,
                              description="forget: a named group of rows instead of ids (see GET /v1/runs/{run})")
    rows: Rows | None = Field(None, description="add: the rows to add")
    requested_by: Text | None = Field(None, description="Who asked (recorded in the ledger with the token's id)")
    reason: Text | None = Field(None, description="Why (recorded in the ledger)")
    reference: Text | None = Field(None, description="The asker's own reference, e.g. a ticket (recorded)")

    @model_validator(mode="after")
    def _shape(self):
        if self.kind == "forget":
            if self.rows is not None:
                raise ValueError("a forget request names ids or a group, not rows (rows are for kind 'add')")
            if (self.ids is None) == (self.group is None):
                raise ValueError("a forget request names either ids or a group (one of the two)")
            if self.ids is not None:
                if not self.ids:
                    raise ValueError("ids is empty: name at least one row to forget")
                _distinct(self.ids)
        else:
            if self.rows is None or self.ids is not None or self.group is not None:
                raise ValueError("an add request gives rows (with their ids inside rows, or none for fresh ids)")
        return self


class Submitted(BaseModel):
    request_id: str
    run: str
    kind: str
    status: str
    duplicate: bool = Field(description="True when an identical open request of this token was found and returned")
    n_ids: int | None
    status_url: str


class RequestStatus(BaseModel):
    request_id: str
    run: str
    kind: str
    status: Literal["queued", "applying", "applied", "refused"]
    refusal: str | None = None
    ids: list[int] | None = None
    group: str | None = None
    requested_by: str | None = None
    reason: str | None = None
    reference: str | None = None
    token_id: str
    created_at: float
    deadline_at: float
    finished_at: float | None = None
    batch_id: str | None = None
    version: int | None = Field(None, description="The version that holds the request's outcome")
    ledger_seq: int | None = Field(None, description="The request's own ledger row (None: answered by earlier rows)")
    applied_ids: list[int] | None = Field(None, description="The ids the request's ledger row lists")
    answered_by: list[int] | None = Field(None, description="Earlier ledger rows that had already deleted some ids")
    receipt_url: str | None = None


class PolicyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_batch: int | None = Field(None, ge=1, le=100_000, description="Most requests in one batch")
    max_wait_s: float | None = Field(None, ge=0, le=86400, description="Longest a request waits for its batch to fill")
    method: str | None = Field(None, description="Update method (default: the run's own); checked against the run")
    deadline_s: float | None = Field(None, ge=1, le=366 * 86400,
                                     description="Time a new request has to be applied (default 30 days)")


class PolicyOut(BaseModel):
    run: str
    max_batch: int
    max_wait_s: float
    method: str | None
    deadline_s: float
    paused: bool
    note: str | None


class ReceiptCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")
    receipt: dict = Field(description="A receipt as GET /v1/requests/{id}/receipt returned it")
    id: StrictInt | None = Field(None, description="Also check that this id is among the request's")


# ------------------------------------------------------------------ the app


def create_app(runs, db, *, max_body: int = MAX_BODY, max_ids: int = MAX_IDS, token_cache_s: float = 1.0) -> FastAPI:
    """The service's API over the run directories under ``runs`` and the database ``db`` (URL or Database).
    ``token_cache_s``: how long a checked token is trusted without reading the token table again (a revoked token
    is refused within that time)."""
    catalog = runs if isinstance(runs, RunCatalog) else RunCatalog(runs)
    database = Database(db).create() if isinstance(db, str) else db
    queue = Queue(database)
    commits = GroupCommit(queue)
    token_cache = TokenCache(database, token_cache_s)
    metrics = Metrics(queue)
    threading.Thread(target=catalog.warm, name="expunge-warm", daemon=True).start()
    app = FastAPI(title="expunge deletion-request service", version=__version__, description=__doc__.split("\n\n")[1])
    app.state.catalog, app.state.db, app.state.queue, app.state.metrics = catalog, database, queue, metrics
    app.state.tokens = token_cache
    app.add_middleware(Guard, max_body=max_body, metrics=metrics)

    bearer = HTTPBearer(auto_error=False, description="A token from `expunge token create`")

    async def caller(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Principal:
        token = credentials.credentials if credentials else None
        if token is None and request.method == "GET":  # the status page's login cookie, for reading only
            token = request.cookies.get(COOKIE)
        principal = token_cache.lookup(token) or await run_in_threadpool(token_cache.authenticate, token)
        if principal is None:
            raise HTTPException(401, "missing, unknown or revoked token: send 'Authorization: Bearer <token>' "
                                "(an operator makes one with `expunge token create --role ...`)",
                                headers={"WWW-Authenticate": "Bearer"})
        return principal

    def role(*allowed: str):
        async def check(principal: Principal = Depends(caller)) -> Principal:
            if principal.role not in allowed:
                raise HTTPException(403, f"{_a(principal.role)} token cannot do this; it takes "
                                    f"{' or '.join(_a(r) for r in allowed)} token")
            return principal
        return check

    anyone = role("requester", "operator", "auditor")
    app.state.role = role

    def run_path(run: str):
        try:
            return catalog.path(run)
        except UnknownRun as e:
            raise HTTPException(404, str(e)) from None

    def visible(request_id: str, principal: Principal) -> dict:
        row = queue.get(request_id)
        if row is None or (principal.role == "requester" and row["token_id"] != principal.token_id):
            raise HTTPException(404, f"no request {request_id!r} for this token")
        return row

    # ---------------------------------------------------------------- requesters

    @app.post("/v1/runs/{run}/requests", status_code=202, response_model=Submitted, tags=["requests"],
              responses={404: {"description": "Unknown run"}, 413: {"description": "Body too large"},
                         415: {"description": "Not JSON"}, 422: {"description": "Invalid request"}})
    async def submit(run: str, body: Submission, response: Response,
                     principal: Principal = Depends(role("requester"))) -> Submitted:
        """Queue a deletion or addition; ``202`` once it is committed to the queue's database."""
        start = time.perf_counter()
        run_path(run)
        try:  # ids checked against the run's view in memory; anything that reads the disk runs in a thread
            ids, rows = _checked(catalog, run, body, max_ids, inline=True)
        except _Later:
            ids, rows = await run_in_threadpool(_checked, catalog, run, body, max_ids)
        who = f"{body.requested_by} (token {principal.token_id})" if body.requested_by else \
            f"{principal.name} (token {principal.token_id})"
        committed = commits.submit(run=run, kind=body.kind, principal=principal, ids=ids, rows=rows, group=body.group,
                                   requested_by=who, reason=body.reason, reference=body.reference)
        row, duplicate = await asyncio.wrap_future(committed)
        metrics.submit_seconds.observe(time.perf_counter() - start)
        response.headers["Location"] = f"/v1/requests/{row['id']}"
        log.info("request submitted", extra={"fields": {"request": row["id"], "run": run, "kind": body.kind,
                                                        "n_ids": None if ids is None else len(ids),
                                                        "token": principal.token_id, "duplicate": duplicate}})
        return Submitted(request_id=row["id"], run=run, kind=body.kind, status=row["status"], duplicate=duplicate,
                         n_ids=None if ids is None else len(ids), status_url=f"/v1/requests/{row['id']}")

    @app.get("/v1/requests/{request_id}", response_model=RequestStatus, tags=["requests"])
    def status(request_id: str, principal: Principal = Depends(anyone)) -> RequestStatus:
        """A request's status: queued, applying, applied (with its version and ledger row) or refused (with why)."""
        return _status(visible(request_id, principal))

    @app.get("/v1/requests", response_model=list[RequestStatus], tags=["requests"])
    def requests_(principal: Principal = Depends(anyone), run: str | None = None,
                  status: Literal["queued", "applying", "applied", "refused"] | None = None,
                  limit: int = Query(100, ge=1, le=1000)) -> list[RequestStatus]:
        """Requests, newest first: a requester sees its own, operators and auditors all."""
        mine = principal.token_id if principal.role == "requester" else None
        return [_status(r) for r in queue.listing(mine, run, status, limit)]

    @app.get("/v1/requests/{request_id}/receipt", tags=["requests"])
    def receipt(request_id: str, principal: Principal = Depends(role("requester", "auditor"))) -> dict:
        """The signed receipt of an applied request (its ledger row, self-contained), and the receipts of earlier
        requests that had already deleted some of its ids."""
        row = visible(request_id, principal)
        if row["status"] != APPLIED:
            raise HTTPException(409, f"request {request_id} is {row['status']}: a receipt exists once it is applied"
                                + (f" (refused: {row['refusal']})" if row["refusal"] else ""))
        path = run_path(row["run"])
        try:
            own = make_receipt(path, seq=row["ledger_seq"]) if row["ledger_seq"] else None
            earlier = [make_receipt(path, seq=s) for s in json.loads(row["answered_by"] or "[]")]
        except ExpungeError as e:
            raise HTTPException(409, f"the run cannot issue receipts now: {e}") from None
        return {"request_id": request_id, "run": row["run"], "receipt": own, "earlier": earlier}

    # ---------------------------------------------------------------- everyone

    @app.get("/v1/runs", tags=["runs"])
    def runs_(principal: Principal = Depends(anyone)) -> list[dict]:
        """Every run served: its method, guarantees and queue."""
        depth = queue.depth()
        return [run_summary(catalog, queue, name, depth) for name in catalog.names()]

    @app.get("/v1/runs/{run}", tags=["runs"])
    def run_(run: str, principal: Principal = Depends(anyone)) -> dict:
        """One run: method, guarantees and their figures, policy, queue, and the groups a request can name."""
        run_path(run)
        summary = run_summary(catalog, queue, run, queue.depth())
        view = catalog.view(run, groups=True)
        summary["groups"] = {g: len(v) for g, v in view.groups.items()}
        summary["rows"] = int(view.active.sum())
        return summary

    # ---------------------------------------------------------------- operators

    @app.put("/v1/runs/{run}/policy", response_model=PolicyOut, tags=["operators"])
    def set_policy(run: str, body: PolicyBody, principal: Principal = Depends(role("operator"))) -> PolicyOut:
        """Change a run's batching policy (fields left out stay as they are)."""
        run_path(run)
        changes = body.model_dump(exclude_unset=True)
        if "method" in changes:
            catalog.check_method(run, changes["method"])
        policy = queue.set_policy(run, principal.token_id, **changes)
        log.info("policy set", extra={"fields": {"run": run, "token": principal.token_id, **changes}})
        return PolicyOut(run=run, **vars(policy))

    @app.get("/v1/runs/{run}/policy", response_model=PolicyOut, tags=["operators"])
    def get_policy(run: str, principal: Principal = Depends(anyone)) -> PolicyOut:
        run_path(run)
        return PolicyOut(run=run, **vars(queue.policy(run)))

    @app.post("/v1/runs/{run}/pause", response_model=PolicyOut, tags=["operators"])
    def pause(run: str, principal: Principal = Depends(role("operator"))) -> PolicyOut:
        """Stop applying this run's requests (they keep being accepted and queued)."""
        run_path(run)
        log.info("run paused", extra={"fields": {"run": run, "token": principal.token_id}})
        return PolicyOut(run=run, **vars(queue.set_policy(run, principal.token_id, paused=True)))

    @app.post("/v1/runs/{run}/resume", response_model=PolicyOut, tags=["operators"])
    def resume(run: str, principal: Principal = Depends(role("operator"))) -> PolicyOut:
        run_path(run)
        log.info("run resumed", extra={"fields": {"run": run, "token": principal.token_id}})
        return PolicyOut(run=run, **vars(queue.set_policy(run, principal.token_id, paused=False)))

    @app.get("/v1/batches", tags=["operators"])
    def batches_(principal: Principal = Depends(role("operator", "auditor")), run: str | None = None,
                 limit: int = Query(50, ge=1, le=1000)) -> list[dict]:
        """Recent batches: run, requests, status, the version made, update seconds and figures."""
        return queue.batches(run, limit)

    @app.get("/metrics", tags=["operators"], response_class=Response)
    def metrics_(principal: Principal = Depends(role("operator", "auditor"))) -> Response:
        """Prometheus figures (queue depth, oldest age and deadline, requests by status, batches, update seconds)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------- auditors

    @app.get("/v1/runs/{run}/ledger", tags=["auditors"])
    def ledger(run: str, principal: Principal = Depends(role("auditor")), offset: int = Query(0, ge=0),
               limit: int = Query(100, ge=1, le=10_000)) -> dict:
        """The run's ledger rows (with rows a crash left only in the manifest, marked), and the chain's check."""
        path = run_path(run)
        directory = RunDirectory(path)
        manifest = directory.read_manifest()
        state = reconcile(manifest, directory.ledger, str(path), full=True, verifier=reading_verifier(manifest))
        rows = [dict(e.to_dict(), in_ledger_file=True) for e in state.entries or []]
        rows += [dict(e.to_dict(), in_ledger_file=False) for e in state.pending_rows]
        return {"run": run, "rows": len(rows), "chain_ok": state.ok, "problems": [p.to_dict() for p in state.problems],
                "entries": rows[offset:offset + limit]}

    @app.get("/v1/runs/{run}/verify", tags=["auditors"])
    def verify(run: str, principal: Principal = Depends(role("auditor"))) -> dict:
        """Recompute everything the run claims (chain, signatures, manifest, file and model hashes)."""
        return verify_run(run_path(run)).to_dict()

    @app.post("/v1/receipts/verify", tags=["auditors"])
    def verify_receipt(body: ReceiptCheck, principal: Principal = Depends(role("auditor"))) -> dict:
        """Check a receipt: its hash and signature, and that the run that issued it still holds its row."""
        run_id = body.receipt.get("run_id")
        issuer = next((catalog.path(n) for n in catalog.names() if catalog.manifest(n).get("run_id") == run_id), None)
        result = check_receipt(body.receipt, run=issuer, contains_id=body.id)
        out = result.to_dict()
        out["run"] = None if issuer is None else issuer.name
        if issuer is None:
            out["warnings"].append(f"no run served here has run_id {run_id!r}: the receipt was checked on its own")
        return out

    # ---------------------------------------------------------------- errors

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(status_code=422, content={"detail": _explain(exc.errors()), "errors": _plain(exc.errors())})

    @app.exception_handler(UnknownRun)
    async def unknown_run(request: Request, exc: UnknownRun):
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(ExpungeError)
    async def refused(request: Request, exc: ExpungeError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    from .web import register  # the status page and its login

    register(app)
    return app


# ------------------------------------------------------------------ helpers


class _Later(Exception):
    """The check needs the disk: run it in a thread."""


def _checked(catalog: RunCatalog, run: str, body: Submission, max_ids: int, inline: bool = False):
    """The request's ids (sorted) and rows, checked against the run; ExpungeError says what is wrong. ``inline``:
    only what the view in memory can tell (else _Later)."""
    if inline and (body.kind != "forget" or body.group is not None or catalog.cached(run) is None):
        raise _Later()
    if body.kind == "forget":
        if body.group is not None:
            view = catalog.view(run, groups=True)
            if body.group not in view.groups:
                names = sorted(view.groups)
                raise ExpungeError(f"run {run} has no group {body.group!r}; its groups: {', '.join(names[:20])}"
                                   + (" ..." if len(names) > 20 else ""))
            ids = view.groups[body.group]
        else:
            ids = np.asarray(sorted(body.ids), dtype=np.int64)
        if len(ids) > max_ids:
            raise ExpungeError(f"{len(ids)} ids in one request; at most {max_ids}: split it into several requests")
        unknown = catalog.view(run).unknown(ids)
        if len(unknown) and inline:
            raise _Later()
        if len(unknown):  # perhaps added since the view was taken: look again before refusing
            unknown = catalog.view(run, fresh=True).unknown(ids)
        if len(unknown):
            raise ExpungeError(f"{len(unknown)} id(s) are not rows of run {run}, e.g. {unknown[:5].tolist()}; ids "
                               "come from the run's id column (row numbers when its data had none)")
        return ids.tolist(), None
    rows = body.rows
    if len(rows.X) > max_ids:
        raise ExpungeError(f"{len(rows.X)} rows in one request; at most {max_ids}: split it into several requests")
    view = catalog.view(run, fresh=True)
    if len(rows.X[0]) != view.n_features:
        raise ExpungeError(f"the rows have {len(rows.X[0])} features but run {run} takes {view.n_features}")
    bad = [v for v in rows.y if not 0 <= v < view.n_classes]
    if bad:
        raise ExpungeError(f"labels must lie in 0..{view.n_classes - 1} (the run's classes); got {sorted(set(bad))[:5]}")
    if rows.ids is not None:
        given = np.asarray(rows.ids, dtype=np.int64)
        known = given[np.isin(given, view.ids)]
        present = known[~np.isin(known, view.deleted(known))]
        if len(present):
            raise ExpungeError(f"{len(present)} id(s) are already rows of run {run}, e.g. {present[:5].tolist()}; give "
                               "new rows new ids (or none)")
    return rows.ids, {"X": rows.X, "y": rows.y}


def _status(row: dict) -> RequestStatus:
    loads = (lambda v: None if v is None else json.loads(v))
    return RequestStatus(request_id=row["id"], run=row["run"], kind=row["kind"], status=row["status"],
                         refusal=row["refusal"], ids=loads(row["ids"]), group=row["group_name"],
                         requested_by=row["requested_by"], reason=row["reason"], reference=row["reference"],
                         token_id=row["token_id"], created_at=row["created_at"], deadline_at=row["deadline_at"],
                         finished_at=row["finished_at"], batch_id=row["batch_id"], version=row["version"],
                         ledger_seq=row["ledger_seq"], applied_ids=loads(row["applied_ids"]),
                         answered_by=loads(row["answered_by"]),
                         receipt_url=f"/v1/requests/{row['id']}/receipt" if row["status"] == APPLIED else None)


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _plain(errors: list[dict]) -> list[dict]:
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]


def _explain(errors: list[dict]) -> str:
    """One readable line per validation error: where, and what."""
    lines = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            msg = "the body is not valid JSON"
        lines.append(f"{where}: {msg}")
    return "; ".join(lines[:10]) + (f"; and {len(lines) - 10} more" if len(lines) > 10 else "")


class Guard:
    """Pure ASGI middleware: refuse bodies over ``max_body`` bytes (413) and API writes that are not JSON (415)
    before any handler runs, and count every call by route and status."""

    def __init__(self, app, max_body: int, metrics: Metrics):
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None and self._streamed(scope):  # no Content-Length: read it here, counting
                receive, refusal = await self._buffered(receive)
            if refusal is not None:
                code, detail = refusal
                return await JSONResponse(status_code=code, content={"detail": detail})(scope, receive, counting_send)
            return await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            self.metrics.http.labels(scope["method"], getattr(route, "path", "unmatched"), str(status["code"])).inc()

    def _too_large(self, size: int | None = None) -> str:
        got = f"{size} bytes" if size is not None else "more bytes"
        return (f"the request body has {got}, over the limit of {self.max_body}; split it into several requests "
                "(or start the service with a larger --max-body)")

    def _refusal(self, scope) -> tuple[int, str] | None:
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return 413, self._too_large(int(length))
        if scope["method"] in ("POST", "PUT", "PATCH") and scope["path"].startswith("/v1/"):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if (length not in (None, "0") or "transfer-encoding" in headers) and ctype != "application/json":
                return 415, (f"the body must be JSON (Content-Type: application/json), not "
                             f"{ctype or 'a body without a content type'}")
        return None

    @staticmethod
    def _streamed(scope) -> bool:
        names = {k.lower() for k, _ in scope.get("headers", [])}
        return scope["method"] in ("POST", "PUT", "PATCH") and b"content-length" not in names

    async def _buffered(self, receive):
        """The whole body, read up to the limit: a replaying ``receive``, or a 413 refusal."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, (400, "the client went away before sending its body")
            size += len(message.get("body", b""))
            if size > self.max_body:
                return receive, (413, self._too_large())
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = {"done": False}

        async def replay():
            if sent["done"]:
                return await receive()
            sent["done"] = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay, None



