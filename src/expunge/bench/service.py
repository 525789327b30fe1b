"""The deletion-request service under load: 2,000 single-id deletion requests from 32 concurrent clients to one run,
over loopback, while the worker is killed twice mid-batch and restarted (see ``Killer``).

Two runs, one at a time: a DeltaGrad MNIST logistic regression (the deltagrad benchmark's recipe: batch 16384,
20 epochs, float64, T0=5, j0=20, m=2) and a SISA MNIST ensemble (20 shards x 5 slices of the sisa benchmark's MLP).
`expunge serve --workers 0` answers the clients; `expunge worker` (a separate process, so that it can be killed)
applies batches (max 1000 requests, max wait 1 s). Measured: submission latency (p50, p99, from the client),
submissions per second, time until every request is applied, versions created, the update seconds of all batches;
then each request checked exactly once (every 202 in exactly one ledger row, the rows deleted exactly the ids asked,
the run verified). The one-by-one baseline applies single-id deletions to a copy of the same trained run with the
same method and extrapolates their mean update seconds to all requests (the report says how many were timed).
Update seconds are the method's compute as the update report records it, the same measure for both.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..data import load_dataset
from ..errors import ExpungeError
from ..service.worker import CRASH_ENV, HOLD_ENV
from . import report
from .deltagrad import RECIPE as DELTAGRAD_RECIPE
from .sisa import RECIPES as SISA_RECIPES

REQUESTS, CLIENTS = 2000, 32
MAX_BATCH, MAX_WAIT_S = 1000, 1.0
TIMEOUT_S = 1200  # bound on waiting for everything to be applied


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))


def _train(case: str, train, test, out: Path, source: str):
    from ..unlearn import make_updater

    if case == "deltagrad":
        return make_updater("deltagrad", T0=5, j0=20, m=2).fit(train, DELTAGRAD_RECIPE, out=out, test=test, source=source)
    return make_updater("sisa", shards=20, slices=5).fit(train, SISA_RECIPES["mnist"], out=out, test=test, source=source)


def one_by_one(run: Path, ids: list[int], sample: int) -> list[float]:
    """Update seconds of ``sample`` single-id deletions, one request each, on ``run`` (a copy)."""
    from ..unlearn.run import RunModel

    model = RunModel.load(run)
    return [model.forget([i]).seconds for i in ids[:sample]]


async def _submit_all(port: int, token: str, run: str, ids: list[int], clients: int) -> tuple[list, list]:
    """Each of ``clients`` connections (HTTP/1.1 keep-alive) posts one single-id deletion after another until all
    ``ids`` are sent; returns the latencies (request written -> whole response read) and (request id, id) of each 202.
    The load generator speaks HTTP over asyncio streams itself: on two shared cores httpx spent ~5 ms of CPU per
    request, more than the server, and would have measured the client."""
    latencies, accepted, failures = [], [], []
    todo = list(ids)

    async def one_client():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while todo:
                i = todo.pop()
                body = json.dumps({"ids": [i], "reason": "benchmark"}).encode()
                head = (f"POST /v1/runs/{run}/requests HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()
                start = time.perf_counter()
                writer.write(head + body)
                lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                length = next(int(line.split(":", 1)[1]) for line in lines[1:]
                              if line.lower().startswith("content-length:"))
                payload = await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                status = int(lines[0].split()[1])
                if status == 202:
                    accepted.append((json.loads(payload)["request_id"], i))
                else:
                    failures.append((i, status, payload[:200]))
        finally:
            writer.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    if failures:
        raise ExpungeError(f"{len(failures)} submissions failed, e.g. {failures[:3]}")
    return latencies, accepted


class Killer(threading.Thread):
    """Kills the worker twice and restarts it at once each time (what ``expunge serve`` does for its workers): first
    with SIGKILL at a random moment while a batch is being applied; then the restarted worker dies by itself right
    after it commits a version, before the ledger rows and the database hear of it (``EXPUNGE_SERVICE_CRASH_AT=
    committed``: the worst moment, which a kill from outside would hit only by luck).

    The first worker holds each batch it claims ``HOLD_S`` seconds before applying it (``EXPUNGE_SERVICE_HOLD_S``),
    and the SIGKILL lands a random delay inside that hold: on a fast machine a whole batch can be applied between two
    looks at the queue, and a kill aimed at it would miss."""

    HOLD_S = 2.0

    def __init__(self, start_worker, queue, seed: int = 0):
        super().__init__(daemon=True)
        self.start_worker, self.queue = start_worker, queue
        self.rng = random.Random(seed)
        self.worker = start_worker(hold_s=self.HOLD_S)
        self.killed: list[dict] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():  # 1: SIGKILL while a batch is being applied
            applying = [b["id"] for b in self.queue.batches(limit=5) if b["status"] == "applying"]
            if applying:
                delay = self.rng.uniform(0.1, 0.75 * self.HOLD_S)
                time.sleep(delay)
                self.worker.send_signal(signal.SIGKILL)
                self.worker.wait()
                self.killed.append({"how": "SIGKILL", "batch": applying[0], "after_s": round(delay, 3)})
                break
            time.sleep(0.02)
        if self.done.is_set():
            return
        self.worker = self.start_worker(crash_at="committed")  # 2: dies right after its next commit
        while not self.done.is_set() and self.worker.poll() is None:
            time.sleep(0.05)
        if self.worker.poll() is not None:
            self.killed.append({"how": "died after committing a version (fault injection)",
                                "exit_code": self.worker.returncode})
            self.worker = self.start_worker()

    def stop(self):
        self.done.set()
        self.join(30)
        if self.worker.poll() is None:
            self.worker.terminate()
            self.worker.wait(60)


def run_case(case: str, data_dir: Path, requests: int = REQUESTS, clients: int = CLIENTS, limit: int | None = None,
             sample: int = 10, console=None) -> dict:
    from ..service import Database, Queue, sqlite_url, tokens
    from ..unlearn.audit import verify_run
    from ..unlearn.run import RunModel

    say = console.print if console is not None else (lambda *a, **k: None)
    path = data_dir / "mnist" / "mnist.npz"
    if not path.exists():
        raise ExpungeError(f"{path} not found; pass --data pointing at the shared data folder (it holds mnist/mnist.npz)")
    train, test = load_dataset(str(path))
    source = str(path.resolve())
    if limit:
        train, source = train.take(np.arange(min(limit, len(train)))), None
    with tempfile.TemporaryDirectory(prefix="expunge-bench-service-") as tmp:
        tmp = Path(tmp)
        runs, baseline = tmp / "runs", tmp / "baseline"
        start = time.perf_counter()
        _train(case, train, test, runs / case, source)
        train_s = time.perf_counter() - start
        shutil.copytree(runs / case, baseline, ignore=shutil.ignore_patterns(".lock"))
        say(f"{case}: trained in {train_s:.1f} s; serving {requests} requests from {clients} clients", highlight=False)
        ids = [int(i) for i in np.random.default_rng(0).choice(train.ids, requests + sample, replace=False)]
        served, single = ids[:requests], ids[requests:]

        db_url = sqlite_url(tmp / "service.sqlite")
        db = Database(db_url).create()
        queue = Queue(db)
        token = tokens.create(db, "requester", "benchmark")[0]
        operator = tokens.create(db, "operator", "benchmark")[0]
        queue.set_policy(case, "benchmark", max_batch=MAX_BATCH, max_wait_s=MAX_WAIT_S)
        port, env = free_port(), _env()
        logs = []

        def start_worker(crash_at=None, hold_s=None):
            log = open(tmp / f"worker{len(logs)}.log", "w")
            logs.append(log)
            faults = {**({CRASH_ENV: crash_at} if crash_at else {}), **({HOLD_ENV: str(hold_s)} if hold_s else {})}
            return subprocess.Popen([sys.executable, "-m", "expunge", "worker", "--runs", str(runs), "--db", db_url],
                                    env=dict(env, **faults), stdout=log, stderr=subprocess.STDOUT)

        server_log = open(tmp / "serve.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "expunge", "serve", "--runs", str(runs), "--db", db_url,
                                   "--port", str(port), "--workers", "0"], env=env, stdout=server_log,
                                  stderr=subprocess.STDOUT)
        killer = None
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_for(base, server, tmp / "serve.log")
            killer = Killer(start_worker, queue)
            killer.start()
            load_before = os.getloadavg()[0]
            t0 = time.perf_counter()
            latencies, accepted = asyncio.run(_submit_all(port, token, case, served, clients))
            submit_s = time.perf_counter() - t0
            load_after = os.getloadavg()[0]
            handler_s = _handler_seconds(base, operator)
            while queue.runs_with_work():
                if time.perf_counter() - t0 > TIMEOUT_S:
                    raise ExpungeError(f"requests still open after {TIMEOUT_S} s")
                time.sleep(0.05)
            applied_s = time.perf_counter() - t0
        finally:
            if killer is not None:
                killer.stop()
            server.terminate()
            server.wait(60)
            for log in logs + [server_log]:
                log.close()
        resumed = [json.loads(line)["event"] for log in logs[1:] for line in Path(log.name).read_text().splitlines()
                   if line.startswith("{") and "resumed" in line]

        model = RunModel.load(runs / case)
        rows = model.ledger.read()[1:]
        by_request = {}
        for e in rows:
            by_request.setdefault(e.body["request_id"], []).append(e)
        wanted = dict(accepted)
        lost = [r for r in wanted if r not in by_request]
        duplicated = [r for r, es in by_request.items() if len(es) > 1]
        wrong = [r for r, es in by_request.items() if r in wanted and es[0].body["report"]["ids"] != [wanted[r]]]
        deleted = set(model.universe.ids[~model.active].tolist())
        statuses = {queue.get(r)["status"] for r in wanted}
        batches = [b for b in queue.batches(run=case, limit=10_000) if b["status"] == "committed"]
        batched_s = sum(b["seconds"] for b in batches)
        say(f"{case}: timing {sample} single-id deletions for the one-by-one baseline", highlight=False)
        singles = one_by_one(baseline, single, sample)
        verified = verify_run(runs / case).ok
        db.dispose()
    lat = np.asarray(latencies) * 1000
    one_by_one_s = statistics.mean(singles) * requests
    return {
        "run": case, "requests": requests, "clients": clients, "train_rows": len(train), "train_s": train_s,
        "submit_p50_ms": float(np.percentile(lat, 50)), "submit_p99_ms": float(np.percentile(lat, 99)),
        "submit_max_ms": float(lat.max()), "submissions_per_s": requests / submit_s, "submit_s": submit_s,
        "all_applied_s": applied_s, "versions": model.version - 1, "batches": len(batches),
        "batch_sizes": sorted((b["size"] for b in batches), reverse=True),
        "batched_update_s": batched_s, "one_by_one_update_s": one_by_one_s,
        "one_by_one_sampled": len(singles), "one_by_one_mean_s": statistics.mean(singles),
        "one_by_one_single_s": singles, "one_by_one_extrapolated": len(singles) < requests,
        "update_ratio": one_by_one_s / batched_s, "update_ratio_range": [min(singles) * requests / batched_s,
                                                                         max(singles) * requests / batched_s],
        "worker_kills": killer.killed if killer else [], "resumes": resumed,
        "lost": len(lost), "duplicated": len(duplicated), "wrong_ids": len(wrong),
        "all_applied": statuses == {"applied"}, "deleted_exactly": deleted == set(served), "run_verified": verified,
        "max_batch": MAX_BATCH, "max_wait_s": MAX_WAIT_S,
        # the machine while the clients submitted: the 1-minute load average (runnable processes) on its CPUs, and the
        # server's own mean seconds per submission (validate and commit; /metrics), apart from waiting for a CPU
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)], "cpus": os.cpu_count(),
        "server_mean_ms": handler_s * 1000,
    }


def _handler_seconds(base: str, token: str) -> float:
    """Mean seconds the API spent on a submission (its own histogram on /metrics)."""
    import httpx

    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("expunge_submission_seconds_")}
    return values["expunge_submission_seconds_sum"] / values["expunge_submission_seconds_count"]


def _wait_for(base: str, server, log: Path, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            break
        try:
            if httpx.get(f"{base}/openapi.json", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise ExpungeError(f"expunge serve did not start: {log.read_text()[-2000:]}")


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title=f"Deletion-request service: {rows[0]['requests']} requests from {rows[0]['clients']} clients, "
                    "the worker killed twice (* one-by-one extrapolated from a sample)")
    for col in ("run", "p50 ms", "p99 ms", "server ms", "load/CPUs", "req/s", "all applied s", "versions", "batched update s",
                "one-by-one update s", "ratio", "lost", "dup", "verified"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["run"], f"{r['submit_p50_ms']:.1f}", f"{r['submit_p99_ms']:.1f}", f"{r['server_mean_ms']:.1f}",
                  f"{max(r['load_avg_1m']):.0f}/{r['cpus']}", f"{r['submissions_per_s']:.0f}",
                  f"{r['all_applied_s']:.1f}", str(r["versions"]), f"{r['batched_update_s']:.1f}",
                  f"{r['one_by_one_update_s']:.0f}" + ("*" if r["one_by_one_extrapolated"] else ""),
                  f"{r['update_ratio']:.0f}x ({r['update_ratio_range'][0]:.0f}-{r['update_ratio_range'][1]:.0f})",
                  str(r["lost"]), str(r["duplicated"]),
                  "yes" if r["run_verified"] and r["deleted_exactly"] and r["all_applied"] else "NO")
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    left.bar(x - 0.2, [r["batched_update_s"] for r in rows], 0.4, label="batched (measured)")
    left.bar(x + 0.2, [r["one_by_one_update_s"] for r in rows], 0.4,
             label=f"one by one (mean of {rows[0]['one_by_one_sampled']} x {rows[0]['requests']})")
    left.set_yscale("log")
    left.set_xticks(x, [f"{r['run']}\n{r['versions']} versions" for r in rows])
    left.set_ylabel("update seconds for all requests")
    left.legend()
    right.bar(x - 0.27, [r["submit_p50_ms"] for r in rows], 0.27, label="p50 (client)")
    right.bar(x, [r["submit_p99_ms"] for r in rows], 0.27, label="p99 (client)")
    right.bar(x + 0.27, [r["server_mean_ms"] for r in rows], 0.27, label="mean in the server")
    right.axhline(50, color="gray", linestyle="--", label="target p99 50 ms")
    right.set_xticks(x, [r["run"] for r in rows])
    right.set_ylabel("submission latency (ms)")
    right.legend()
    fig.suptitle(f"{rows[0]['requests']} deletion requests, {rows[0]['clients']} clients, the worker killed twice "
                 f"(load average up to {max(max(r['load_avg_1m']) for r in rows):.0f} on {rows[0]['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(data_dir, json_out, repeats: int | None = None, limit: int | None = None, progress: bool = True,
         console=None) -> list[dict]:
    """``limit``: train on that many rows and send a tenth as many requests (a smoke run). ``repeats``: how many
    single-id deletions are timed for the one-by-one side (default 10, 3 with ``limit``). This is one load run, not
    interleaved rounds: its headline ratio is in the tens to hundreds, and each row gives the ratio's range over
    the single deletions timed."""
    requests = min(REQUESTS, max(50, limit // 10)) if limit else REQUESTS
    sample = repeats if repeats is not None else (3 if limit else 10)
    rows = [run_case(case, Path(data_dir), requests=requests, limit=limit, sample=sample, console=console)
            for case in ("deltagrad", "sisa")]
    settings = {"requests": requests, "clients": CLIENTS, "max_batch": MAX_BATCH, "max_wait_s": MAX_WAIT_S,
                "limit": limit, "one_by_one_timed": sample, "server": "expunge serve --workers 0, one process",
                "worker": "expunge worker, one process, killed twice and restarted", "database": "SQLite",
                "rounds": "none: one load run per case; the one-by-one side is the mean of the single deletions timed"}
    return report(rows, json_out, table, plot, console, settings=settings)
