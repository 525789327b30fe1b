"""The `expunge` application object and what every command group shares: consoles, the friendly error
frame, JSON output, and the options common to several commands."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import ExpungeError

app = typer.Typer(
    help="Keep trained models right when their training data changes: train once, then forget or add "
    "rows without retraining from scratch, with the distance to exact retraining as evidence.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# wide tables stay readable when output goes to a file or a pipe (rich assumes 80 columns there)
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True)

JSON_HELP = "Also write the result as JSON to this file ('-' for standard output)."


def friendly(command):
    """Turn ExpungeError into a one-line message and exit code 2, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ExpungeError as e:
            errors.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None

    return wrapper


def write_json(target: Optional[str], payload) -> None:
    if target is None:
        return
    text = json.dumps(payload, indent=2)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text + "\n")


# options shared by several commands
RUN_ARGUMENT = typer.Argument(..., help="Run directory made by `expunge train`.")
DATA_OPTION = typer.Option(None, help="The run's training data, if it moved from where it was at training.")
JSON_OPTION = typer.Option(None, "--json", help=JSON_HELP)
QUIET_OPTION = typer.Option(False, help="Print nothing but errors.")
