"""API tokens: who may call the service, and as what.

A token is ``exp_<id>_<secret>``: the id names it (in logs, in the ledger, in ``expunge token list``), the secret
(256 random bits) proves it. Only the SHA-256 of the secret is stored, so the database cannot hand a token back;
it is shown once, when made. A plain hash (not a slow password hash) is enough because the secret is random, not
chosen by a person. Roles:

    requester   submits deletion and addition requests, and sees its own requests and their receipts
    operator    sets each run's batching policy, pauses and resumes runs, watches the queue
    auditor     reads the ledgers, verifies runs and receipts, reads any request and receipt
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import insert, select, update

from ..errors import ExpungeError
from .store import Database, tokens

ROLES = ("requester", "operator", "auditor")
PREFIX = "exp_"


@dataclass(frozen=True)
class Principal:
    """The caller a valid token stands for."""

    token_id: str
    role: str
    name: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(db: Database, role: str, name: str) -> tuple[str, Principal]:
    """Issue a token; returns the token (to show once) and whom it stands for."""
    if role not in ROLES:
        raise ExpungeError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if not name or not name.strip() or len(name) > 200:
        raise ExpungeError("a token needs a name of at most 200 characters saying who holds it (e.g. 'privacy-portal')")
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    with db.write() as c:
        c.execute(insert(tokens).values(id=token_id, role=role, name=name.strip(), secret_sha256=_digest(secret),
                                        created_at=time.time(), revoked_at=None))
    return f"{PREFIX}{token_id}_{secret}", Principal(token_id, role, name.strip())


def authenticate(db: Database, token: str | None) -> Principal | None:
    """Whom a presented token stands for, or None (malformed, unknown, wrong secret, revoked)."""
    if not token or not token.startswith(PREFIX) or token.count("_") < 2:
        return None
    token_id, secret = token[len(PREFIX):].split("_", 1)
    with db.read() as c:
        row = c.execute(select(tokens).where(tokens.c.id == token_id)).mappings().first()
    if row is None or row["revoked_at"] is not None:
        return None
    if not hmac.compare_digest(row["secret_sha256"], _digest(secret)):
        return None
    return Principal(row["id"], row["role"], row["name"])


def listing(db: Database) -> list[dict]:
    """Every token, without secrets: id, role, name, created_at, revoked_at."""
    with db.read() as c:
        rows = c.execute(select(tokens.c.id, tokens.c.role, tokens.c.name, tokens.c.created_at, tokens.c.revoked_at)
                         .order_by(tokens.c.created_at)).mappings().all()
    return [dict(r) for r in rows]


def revoke(db: Database, token_id: str) -> None:
    with db.write() as c:
        found = c.execute(select(tokens.c.revoked_at).where(tokens.c.id == token_id)).first()
        if found is None:
            raise ExpungeError(f"no token {token_id!r}; `expunge token list` shows the ids")
        if found[0] is not None:
            raise ExpungeError(f"token {token_id} is already revoked")
        c.execute(update(tokens).where(tokens.c.id == token_id).values(revoked_at=time.time()))


class TokenCache:
    """``authenticate`` remembered for ``seconds`` (a valid token only), so that a busy API does not read the token
    table on every call: a revoked token is refused within that many seconds (0: at once)."""

    def __init__(self, db: Database, seconds: float = 1.0):
        self.db, self.seconds = db, seconds
        self.known: dict[str, tuple[Principal, float]] = {}

    def lookup(self, token: str | None) -> Principal | None:
        """The principal if the token was found valid less than ``seconds`` ago, else None (ask ``authenticate``)."""
        if not token or self.seconds <= 0:
            return None
        found = self.known.get(_digest(token))
        return found[0] if found and found[1] > time.monotonic() else None

    def authenticate(self, token: str | None) -> Principal | None:
        principal = self.lookup(token)
        if principal is None:
            principal = authenticate(self.db, token)
            if principal is not None and self.seconds > 0:
                if len(self.known) > 10_000:
                    self.known.clear()
                self.known[_digest(token)] = (principal, time.monotonic() + self.seconds)
        return principal
