"""The deletion-request service: an authenticated HTTP API, a durable queue, batched updates, receipts, a status page.

    store.py    the database (SQLite by default, PostgreSQL when several servers share the queue)
    tokens.py   API tokens and roles (requester, operator, auditor), stored hashed
    queue.py    the durable queue: requests, per-run policies, batches
    runs.py     the run directories served, and the views requests are checked against
    worker.py   applies each run's requests in batches, exactly once, across crashes
    api.py      the FastAPI app;  web.py the status page;  metrics.py /metrics;  logs.py JSON logs
    server.py   `expunge serve`: the API and its worker processes
"""

from importlib.util import find_spec

from ..errors import ExpungeError

_NEEDS = ("fastapi", "uvicorn", "pydantic", "sqlalchemy", "prometheus_client", "jinja2")
if any(find_spec(name) is None for name in _NEEDS):  # say how to get them, not a bare ImportError
    raise ExpungeError(f"the service needs {', '.join(n for n in _NEEDS if find_spec(n) is None)}: "
                       "pip install 'expunge[service]'")

from .api import create_app
from .queue import Policy, Queue
from .runs import RunCatalog
from .store import Database, sqlite_url
from .worker import Worker

__all__ = ["Database", "Policy", "Queue", "RunCatalog", "Worker", "create_app", "sqlite_url"]
