"""``expunge serve``: the API (uvicorn) in this process, and N worker processes beside it, restarted when one dies
(a restarted worker first settles the batch its predecessor left, worker.py)."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
import threading

from .logs import configure
from .store import Database

log = logging.getLogger("expunge.service.server")


def _worker_main(runs: str, db_url: str, signing_key) -> None:
    """A worker process: stop after the batch in hand on SIGTERM."""
    from .worker import run_worker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_worker(runs, db_url, signing_key=signing_key, stop=stop)


class Workers:
    """N worker processes (spawned, so that none inherits the server's threads or connections), kept running."""

    def __init__(self, n: int, runs: str, db_url: str, signing_key=None, check_s: float = 1.0):
        self.n, self.args, self.check_s = n, (str(runs), db_url, signing_key), check_s
        self.context = multiprocessing.get_context("spawn")
        self.processes: list = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="expunge-workers", daemon=True)

    def start(self) -> Workers:
        self.processes = [self._spawn() for _ in range(self.n)]
        self.thread.start()
        return self

    def _spawn(self):
        process = self.context.Process(target=_worker_main, args=self.args, name="expunge-worker")
        process.start()
        return process

    def _watch(self) -> None:
        while not self.stopping.wait(self.check_s):
            for i, process in enumerate(self.processes):
                if not process.is_alive() and not self.stopping.is_set():
                    log.warning("worker stopped; starting another", extra={"fields": {
                        "pid": process.pid, "exitcode": process.exitcode}})
                    self.processes[i] = self._spawn()

    def stop(self, timeout: float = 60.0) -> None:
        self.stopping.set()
        for process in self.processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker finishes the batch in hand
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()


def serve(runs, db_url: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, signing_key=None,
          max_body: int | None = None) -> None:
    import uvicorn

    from .api import MAX_BODY, create_app
    from .runs import RunCatalog

    configure()
    # the API's event loop shares the interpreter with the group-commit and log threads: hand the GIL back and forth
    # often, so that a request never waits a whole default switch interval (5 ms) behind them
    sys.setswitchinterval(0.0005)
    database = Database(db_url).create()
    catalog = RunCatalog(runs)
    catalog.warm()  # every run's ids in memory before the first request
    app = create_app(catalog, database, max_body=max_body or MAX_BODY)
    pool = Workers(workers, runs, db_url, signing_key).start() if workers else None
    log.info("service started", extra={"fields": {"runs": str(runs), "db": db_url.split("@")[-1], "host": host,
                                                  "port": port, "workers": workers}})
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        if pool is not None:
            pool.stop()
        database.dispose()
