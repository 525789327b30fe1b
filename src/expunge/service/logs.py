"""Structured logs: one JSON object per line (time, level, logger, message, and the event's fields), on stderr,
for whatever collects the service's output."""

from __future__ import annotations

import json
import logging
import sys
import time


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
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("expunge.service")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
