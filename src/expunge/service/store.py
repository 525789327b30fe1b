"""The service's database: tables, and connections that are safe for several processes.

SQLite (one file, the default) and PostgreSQL (when several servers share the queue), through SQLAlchemy Core.

    tokens     API tokens: role, name, the SHA-256 of the secret (the secret itself is shown once, never stored)
    policies   per run: max batch size, max wait, method, deadline, paused
    requests   every request received: its run, kind, ids (or rows), who asked, status, and where it ended up
               (the batch, the version, the ledger row)
    batches    every batch a worker claimed: its run, status, the version it made, seconds and figures

Writes go through ``Database.write()``: one transaction, committed (and on disk: SQLite's synchronous=FULL,
PostgreSQL's default fsync) before the block returns. On SQLite a write transaction starts with BEGIN IMMEDIATE,
so two processes never interleave a read and a write (the claim of a batch reads and then writes); reads use
``Database.read()`` and never block writers (write-ahead log).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from sqlalchemy import (Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text, create_engine, event,
                        text)
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ..errors import ExpungeError

metadata = MetaData()

tokens = Table(
    "tokens", metadata,
    Column("id", String(32), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("name", Text, nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

policies = Table(
    "policies", metadata,
    Column("run", String(255), primary_key=True),
    Column("max_batch", Integer, nullable=False),
    Column("max_wait_s", Float, nullable=False),
    Column("method", String(64)),
    Column("deadline_s", Float, nullable=False),
    Column("paused", Boolean, nullable=False),
    Column("note", Text),  # why the run was paused, when a worker paused it
    Column("updated_at", Float, nullable=False),
    Column("updated_by", String(32)),
)

requests = Table(
    "requests", metadata,
    Column("position", Integer, primary_key=True, autoincrement=True),  # arrival order
    Column("id", String(32), nullable=False, unique=True),
    Column("run", String(255), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("ids", Text),            # JSON list of the ids named (forget), or given (add; null: fresh ids)
    Column("ids_sha256", String(64), nullable=False),  # what deduplication compares
    Column("rows", Text),           # add: JSON {"X": [[...]], "y": [...]}
    Column("group_name", Text),     # forget: the group named, resolved to ``ids`` at submission
    Column("token_id", String(32), nullable=False),
    Column("requested_by", Text),
    Column("reason", Text),
    Column("reference", Text),
    Column("status", String(16), nullable=False),  # queued, applying, applied, refused
    Column("refusal", Text),
    Column("batch_id", String(32)),
    Column("version", Integer),
    Column("ledger_seq", Integer),
    Column("applied_ids", Text),    # JSON list of the ids this request's ledger row lists
    Column("answered_by", Text),    # JSON list of earlier ledger rows that had already deleted some of its ids
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("deadline_at", Float, nullable=False),
    Column("finished_at", Float),
    Index("requests_queue", "run", "status", "position"),
    Index("requests_dedup", "ids_sha256", "status"),
    Index("requests_batch", "batch_id"),
)

batches = Table(
    "batches", metadata,
    Column("id", String(32), primary_key=True),
    Column("run", String(255), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("status", String(16), nullable=False),  # applying, committed, answered, refused, failed
    Column("worker", Text),
    Column("size", Integer, nullable=False),
    Column("method", String(64)),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("seconds", Float),       # the update itself (the method's compute)
    Column("version", Integer),
    Column("figures", Text),        # JSON: guarantee and metrics of the update
    Column("error", Text),
    Index("batches_run", "run", "status", "created_at"),
)


def sqlite_url(path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def advisory_key(*parts: str) -> int:
    """A signed 64-bit key for PostgreSQL's advisory locks."""
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big", signed=True)


class Database:
    """Connections to the service's database (``url``: sqlite:///FILE or postgresql://...)."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite"):
            self.kind = "sqlite"
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            args = {"timeout": 30, "check_same_thread": False}
            self.engine = create_engine(url, connect_args=args, pool_size=4, max_overflow=64)
            self.reader = create_engine(url, connect_args=args, pool_size=4, max_overflow=64)
            for engine, begin in ((self.engine, "BEGIN IMMEDIATE"), (self.reader, "BEGIN")):
                self._sqlite_transactions(engine, begin)
        elif url.startswith(("postgresql", "postgres")):
            self.kind = "postgresql"
            if url.startswith("postgres://") or url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, not the older psycopg2
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=32)
            self.reader = self.engine
        else:
            raise ExpungeError(f"--db {url!r}: give sqlite:///FILE or postgresql://USER@HOST/DBNAME")
        self.pid = os.getpid()

    @staticmethod
    def _sqlite_transactions(engine, begin: str) -> None:
        """SQLAlchemy's recipe for pysqlite: let SQLAlchemy, not the driver, emit BEGIN, so that it can be IMMEDIATE."""

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection):
            connection.exec_driver_sql(begin)

    def create(self) -> "Database":
        """Create the tables that are missing (idempotent; safe when several processes start at once)."""
        try:
            with self.engine.begin() as c:
                if self.kind == "postgresql":  # CREATE TABLE IF NOT EXISTS races between servers: serialise it
                    c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key("expunge-schema")})
                metadata.create_all(c)
        except SQLAlchemyError as e:
            raise self.unreachable(e) from None
        return self

    def unreachable(self, e: Exception) -> ExpungeError:
        shown = self.url.split("@")[-1] if "@" in self.url else self.url  # no password in messages
        return ExpungeError(f"the service database {shown} cannot be used ({str(e).splitlines()[0]}); check --db and "
                            "that the server is running")

    @contextlib.contextmanager
    def write(self):
        """A write transaction, committed when the block ends (rolled back if it raises)."""
        self._check_fork()
        with self.engine.begin() as c:
            yield c

    @contextlib.contextmanager
    def read(self):
        self._check_fork()
        with self.reader.connect() as c:
            yield c

    def _check_fork(self) -> None:
        """A child process must not use its parent's pooled connections: start its own pool."""
        if os.getpid() != self.pid:
            self.engine.dispose(close=False)
            if self.reader is not self.engine:
                self.reader.dispose(close=False)
            self.pid = os.getpid()

    def dispose(self) -> None:
        self.engine.dispose()
        if self.reader is not self.engine:
            self.reader.dispose()


__all__ = ["Database", "metadata", "tokens", "policies", "requests", "batches", "sqlite_url", "advisory_key",
           "OperationalError"]
