"""The application as a whole: its commands in the order users know, and `python -m expunge`."""

import subprocess
import sys

from .helpers import invoke

COMMANDS = ["train", "forget", "add", "info", "evaluate", "ledger", "verify", "receipt", "migrate", "keygen", "bench", "demo"]


def test_help_lists_every_command_in_order():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    positions = [result.output.find(f" {name} ") for name in COMMANDS]
    assert all(p >= 0 for p in positions), result.output
    assert positions == sorted(positions)


def test_forget_help_names_every_registered_method_that_forgets():
    from expunge.unlearn import registry

    output = "".join(invoke("forget", "--help").output.replace("│", " ").split())  # unwrap rich's box
    for name in registry.names(serves="forget"):
        assert f"{name}(" in output, name
    for name in set(registry.names()) - set(registry.names(serves="forget")):  # tradeoff, merge: commands of their own
        assert f"{name}(" not in output, name


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "expunge", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "forget" in result.stdout
