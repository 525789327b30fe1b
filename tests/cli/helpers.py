"""What the command-line tests share: invoking the app, comparing rich output, snapshots of run folders."""

import hashlib

import numpy as np
from typer.testing import CliRunner

from expunge.cli import app

TRAIN = ["--epochs", "4", "--batch-size", "256"]


N_TRAIN = 1437  # digits' 80% training split


N_FEATURES = 64


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def squash(text: str) -> str:
    """Rich wraps long lines at the console width; compare text with all whitespace removed."""
    return "".join(text.split())


def snapshot(run) -> dict:
    """sha256 of every file under the run directory except the lock file."""
    return {
        p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def assert_clean_failure(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert "error:" in result.stderr
    for word in words:
        assert squash(word) in squash(result.output), (word, result.output)


def write_ids(path, ids):
    path.write_text("# ids to forget\n" + ",\n".join(str(int(i)) for i in ids) + "\n")
    return path


def write_rows(path, n_rows, n_features, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n_rows, n_features)).round(4)
    y = np.arange(n_rows) % 10
    path.write_text("\n".join(",".join([*map(str, x), str(label)]) for x, label in zip(X, y)) + "\n")
    return path
