"""Audit: `expunge verify`, `receipt`, `migrate`, `keygen`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import ExpungeError
from .app import JSON_HELP, app, console, errors, friendly, write_json

PUBLIC_KEY_OPTION = typer.Option(None, help="The operator's published Ed25519 public key (PEM): every signature must "
                                 "be by this key.")
SIGNING_KEY_OPTION = typer.Option(None, help="The signing key itself (Ed25519 private key or HMAC secret), to check "
                                  "HMAC signatures; default $EXPUNGE_SIGNING_KEY.")


def _verifier(public_key: Optional[Path], signing_key: Optional[Path]):
    """The pinned key to check signatures with (or None: the key the run or receipt records)."""
    from ..signing import load_signer, load_verifier

    if public_key is not None and signing_key is not None:
        raise ExpungeError("give --public-key or --signing-key, not both")
    if public_key is not None:
        return load_verifier(public_key)
    signer = load_signer(signing_key)
    return signer.verifier() if signer is not None else None


def _print(result) -> None:
    for line in result.checked:
        console.print(f"[green]checked[/] {line}", highlight=False)
    for warning in result.warnings:
        console.print(f"[yellow]note[/] {warning}", highlight=False)
    if result.ok:
        console.print(f"[bold green]OK[/] {result.subject}: everything checked matches", highlight=False)
        return
    console.print(f"[bold red]{len(result.problems)} mismatch(es)[/] in {result.subject}:", highlight=False)
    for p in result.problems:
        console.print(f"[bold red]mismatch[/] {p.where}: {p.what}\n  [bold]fix:[/] {p.fix}", highlight=False)


@app.command()
@friendly
def verify(
    run: Optional[Path] = typer.Argument(None, help="Run directory to verify (with --receipt: the run to check it against)."),
    receipt: Optional[Path] = typer.Option(None, help="A receipt from `expunge receipt` to check (the run is optional)."),
    public_key: Optional[Path] = PUBLIC_KEY_OPTION,
    signing_key: Optional[Path] = SIGNING_KEY_OPTION,
    id_: Optional[int] = typer.Option(None, "--id", help="With --receipt: also check that this id is among the request's."),
    json_out: Optional[str] = typer.Option(None, "--json", help=JSON_HELP),
):
    """Recompute a run's ledger chain, manifest, file hashes and model hashes (or check a receipt), and say exactly
    what does not match. Exit code 0: everything matches; 1: a mismatch; 2: bad input."""
    from ..unlearn.audit import check_receipt, read_receipt, verify_run

    if run is None and receipt is None:
        raise ExpungeError("give a run directory, a --receipt FILE, or both")
    if id_ is not None and receipt is None:
        raise ExpungeError("--id checks a receipt: give --receipt FILE too")
    verifier = _verifier(public_key, signing_key)
    pinned = verifier is not None
    if receipt is not None:
        result = check_receipt(read_receipt(receipt), verifier, pinned, run=run, contains_id=id_, subject=str(receipt))
    else:
        result = verify_run(run, verifier, pinned)
    _print(result)
    write_json(json_out, result.to_dict())
    if not result.ok:
        raise typer.Exit(1)


@app.command()
@friendly
def receipt(
    run: Path = typer.Argument(..., help="Run directory."),
    version: Optional[int] = typer.Option(None, help="The version whose request the receipt is for (see `expunge ledger`)."),
    seq: Optional[int] = typer.Option(None, help="Or the request's ledger row (a version made by a batch of requests "
                                      "holds one row per request)."),
    out: Optional[Path] = typer.Option(None, help="Write the receipt here (default: standard output)."),
):
    """A self-contained receipt of one request: its ledger row, hash, signature and public key. Anyone can check it
    with `expunge verify --receipt FILE --public-key KEY.pub`, without the run."""
    from ..unlearn.audit import make_receipt

    if version is None and seq is None:
        raise ExpungeError("name the request: --version V (see `expunge ledger`) or --seq ROW")
    text = json.dumps(make_receipt(run, version, seq), indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        if out.exists():
            raise ExpungeError(f"{out} exists; choose another --out")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        errors.print(f"wrote {out}")


@app.command()
@friendly
def migrate(
    run: Path = typer.Argument(..., help="Run directory written by an earlier expunge (format expunge-run/1)."),
    signing_key: Optional[Path] = typer.Option(None, help="Sign the chained rows with this key (default "
                                               "$EXPUNGE_SIGNING_KEY); later writes must then use it."),
    json_out: Optional[str] = typer.Option(None, "--json", help=JSON_HELP),
):
    """Chain the ledger of a run of the earlier format once: rows are kept in order and marked as migrated, the
    old ledger stays beside it as ledger.v1.sqlite."""
    from ..unlearn.audit import migrate_run

    summary = migrate_run(run, signing_key)
    console.print(f"migrated {run}: {summary['rows']} ledger row(s) chained" + (", signed" if summary["signed"] else "")
                  + f"; the old ledger is kept as {run / summary['old_ledger']}", highlight=False)
    for warning in summary["warnings"]:
        console.print(f"[yellow]note[/] {warning}", highlight=False)
    write_json(json_out, summary)


@app.command()
@friendly
def keygen(
    out: Path = typer.Argument(..., help="Where to write the key (readable by you only); Ed25519 also writes OUT.pub."),
    hmac: bool = typer.Option(False, "--hmac", help="An HMAC-SHA256 secret instead of an Ed25519 key pair (only holders "
                              "of the secret can then check signatures)."),
):
    """Make a signing key for ledger rows: pass it to train/forget/add with --signing-key (or $EXPUNGE_SIGNING_KEY)
    and publish OUT.pub for whoever checks receipts."""
    from ..signing import ED25519, HMAC, generate

    signer = generate(out, HMAC if hmac else ED25519)
    console.print(f"wrote {out} ({signer.alg}, key id {signer.key_id})"
                  + ("" if hmac else f" and its public key {out}.pub"), highlight=False)
