"""Structured logs: one JSON object per line (time, level, logger, message, and the event's fields), on stderr,
for whatever collects the service's output. Records are formatted and written by a background thread
(``QueueHandler``/``QueueListener``), so that a request never waits for the log's I/O."""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time

_listener: logging.handlers.QueueListener | None = None


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "event": record.getMessage(),
                "pid": record.process}
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: int = logging.INFO, stream=None) -> None:
    """Send the service's logs (``expunge.service.*``) as JSON lines to ``stream`` (default stderr)."""
    global _listener
    if _listener is not None:
        _listener.stop()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    records: queue.SimpleQueue = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, handler)
    _listener.start()
    atexit.register(stop)
    logger = logging.getLogger("expunge.service")
    logger.handlers[:] = [logging.handlers.QueueHandler(records)]
    logger.setLevel(level)
    logger.propagate = False


def stop() -> None:
    """Write what is queued and stop the writer (also at exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
