"""`expunge` commands, by group. Thin: parse, call the Python API, print with rich, write JSON.

    app.py         the application object, consoles, the error frame, shared options
    updates.py     training and updates: train, forget, add
    inspection.py  inspection: info, evaluate, ledger
    audit.py       audit: verify, receipt, migrate, keygen
    merging.py     model merging: merge, tradeoff
    benchmarks.py  benchmarks: bench
    demo.py        the README's demo
    service.py     the deletion-request service: serve, worker, token
"""

from .app import app
from . import updates, merging, inspection, audit, benchmarks, demo  # noqa: E402,F401  (registration order is the order of --help)
from . import service  # noqa: E402,F401


def main():  # pragma: no cover - console script entry
    app()
