"""The deletion-request service: `expunge serve`, `expunge worker`, `expunge token create|list|revoke`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import ExpungeError
from .app import app, console, errors, friendly, write_json

token_app = typer.Typer(help="API tokens of the deletion-request service (stored hashed; a new token is shown once).",
                        no_args_is_help=True)
app.add_typer(token_app, name="token")

RUNS_OPTION = typer.Option(..., "--runs", help="Folder holding the run directories to serve (each named by its "
                           "folder name).")
DB_HELP = ("The service's database: sqlite:///FILE or postgresql://USER@HOST/DB (several servers can share one "
           "PostgreSQL database). Default: sqlite:///RUNS/service.sqlite.")
SIGNING_KEY_OPTION = typer.Option(None, help="Key to sign ledger rows with (runs that are signed need it); default "
                                  "$EXPUNGE_SIGNING_KEY.")


def _db_url(db: Optional[str], runs: Optional[Path]) -> str:
    if db:
        return db
    if runs is None:
        raise ExpungeError("give --db URL, or --runs DIR to use the default sqlite:///DIR/service.sqlite")
    from ..service.store import sqlite_url

    if not runs.is_dir():
        raise ExpungeError(f"--runs {runs}: no such folder")
    return sqlite_url(runs / "service.sqlite")


@app.command()
@friendly
def serve(
    runs: Path = RUNS_OPTION,
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    workers: int = typer.Option(1, min=0, help="Worker processes applying batches (0: only the API; run "
                                "`expunge worker` elsewhere)."),
    signing_key: Optional[Path] = SIGNING_KEY_OPTION,
    max_body: int = typer.Option(1 << 20, min=1024, help="Largest request body accepted, in bytes."),
):
    """Serve deletion and addition requests over HTTP: an authenticated API (docs at /docs), a durable queue, batched
    updates with a ledger row and receipt per request, a status page at /, and /metrics."""
    from ..service.runs import RunCatalog
    from ..service.server import serve as run_server

    RunCatalog(runs)  # a missing folder is refused here, before anything starts
    console.print(f"serving {runs} on http://{host}:{port} (status page /, API docs /docs) with {workers} worker(s)",
                  highlight=False)
    run_server(runs, _db_url(db, runs), host, port, workers, signing_key, max_body)


@app.command()
@friendly
def worker(
    runs: Path = RUNS_OPTION,
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    signing_key: Optional[Path] = SIGNING_KEY_OPTION,
):
    """Apply queued requests in batches, without the API (for more workers, or on another machine sharing a
    PostgreSQL database and the run folder). Stops after the batch in hand on Ctrl-C or SIGTERM."""
    from ..service.server import _worker_main

    _worker_main(str(runs), _db_url(db, runs), signing_key)


def _token_db(db: Optional[str], runs: Optional[Path]):
    from ..service.store import Database

    return Database(_db_url(db, runs)).create()


TOKEN_DB_OPTION = typer.Option(None, help=DB_HELP)
TOKEN_RUNS_OPTION = typer.Option(None, "--runs", help="The served folder (for the default database).")


@token_app.command("create")
@friendly
def token_create(
    role: str = typer.Option(..., help="requester (submits requests, sees its own), operator (policies, pause), or "
                             "auditor (ledgers, receipts)."),
    name: str = typer.Option(..., help="Who holds the token, e.g. 'privacy-portal' (shown in logs and the ledger)."),
    db: Optional[str] = TOKEN_DB_OPTION,
    runs: Optional[Path] = TOKEN_RUNS_OPTION,
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write {id, role, name, token} as JSON here "
                                           "('-' for standard output)."),
):
    """Issue an API token. It is printed once and stored only as a hash: keep it now."""
    from ..service import tokens

    token, principal = tokens.create(_token_db(db, runs), role, name)
    if json_out != "-":
        console.print(f"token {principal.token_id} ({principal.role}, {principal.name}); shown once, keep it now:",
                      highlight=False)
        typer.echo(token)
    write_json(json_out, {"id": principal.token_id, "role": principal.role, "name": principal.name, "token": token})


@token_app.command("list")
@friendly
def token_list(
    db: Optional[str] = TOKEN_DB_OPTION,
    runs: Optional[Path] = TOKEN_RUNS_OPTION,
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the list as JSON here."),
):
    """List tokens (never their secrets): id, role, name, when made, when revoked."""
    import datetime

    from ..service import tokens

    rows = tokens.listing(_token_db(db, runs))
    when = (lambda t: "" if t is None else datetime.datetime.fromtimestamp(t).isoformat(timespec="seconds"))
    table = Table("id", "role", "name", "created", "revoked")
    for row in rows:
        table.add_row(row["id"], row["role"], row["name"], when(row["created_at"]), when(row["revoked_at"]))
    console.print(table)
    write_json(json_out, rows)


@token_app.command("revoke")
@friendly
def token_revoke(
    token_id: str = typer.Argument(..., help="The token's id (see `expunge token list`)."),
    db: Optional[str] = TOKEN_DB_OPTION,
    runs: Optional[Path] = TOKEN_RUNS_OPTION,
):
    """Revoke a token: a running service refuses it within a second (it trusts a checked token that long)."""
    from ..service import tokens

    tokens.revoke(_token_db(db, runs), token_id)
    errors.print(f"revoked token {token_id}")
