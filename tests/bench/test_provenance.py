"""Provenance: the git state of the code that ran, the command, nothing that names the machine."""

import subprocess
import sys
from pathlib import Path

import pytest

from expunge.bench import provenance


def test_git_state_of_a_checkout_and_of_a_folder_outside_one(tmp_path):
    outside = provenance.git_state(tmp_path)
    assert outside == {"commit": None, "dirty": None}
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)  # noqa: E731
    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    (repo / "pkg" / "m.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    clean = provenance.git_state(repo / "pkg")
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (repo / "elsewhere.json").write_text("{}")  # results beside the package do not count
    assert provenance.git_state(repo / "pkg")["dirty"] is False
    (repo / "pkg" / "m.py").write_text("x = 2\n")
    assert provenance.git_state(repo / "pkg") == {"commit": clean["commit"], "dirty": True}


def test_command_line_names_the_program_not_its_path():
    main = str(Path("/some/where/expunge/__main__.py"))
    assert provenance.command_line([main, "bench", "sisa", "--data", "a b"]) == "python -m expunge bench sisa --data 'a b'"
    assert provenance.command_line(["/venv/bin/expunge", "bench", "sisa"]) == "expunge bench sisa"


def test_mark_start_keeps_the_command_and_state_of_the_start(monkeypatch):
    monkeypatch.setattr(provenance, "_start", None)
    provenance.mark_start("expunge bench x --data d --json o.json")
    record = provenance.capture({"k": 1})
    assert record["command"] == "expunge bench x --data d --json o.json" and record["started"]
    assert record["settings"] == {"k": 1} and record["started"] <= record["written"]
    monkeypatch.setattr(provenance, "_start", None)
    assert provenance.capture()["command"] == provenance.command_line(sys.argv)
