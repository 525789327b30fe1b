"""Where a results file came from: the code, the libraries, the machine (without its name) and the command.

``capture()`` returns the record that `report()` writes at the top of every results file:

    commit, dirty       the git commit of the expunge source that ran, and whether the package's files (src/expunge,
                        untracked ones included) differed from it; results files elsewhere do not count
    expunge, torch, numpy, python, platform
    threads             torch's intra-op threads in the process that wrote the file (benchmarks with worker
                        processes record their workers' threads in ``settings``)
    cpu, cpus           the CPU model and the cores this process may use
    cuda                the GPU's name, or None
    load_before, load_after   the 1-minute load average when the run started and when its file was written
                        (a busy machine shows here)
    started, written    UTC dates
    command             the command that reruns it: `expunge bench` builds it from the options it parsed (every
                        option spelled out, EXPUNGE_BENCH_* variables in front); otherwise the process's
                        command line, the program's path shortened to its name

No host name, user name or environment is recorded. The git state and the start are taken by ``mark_start()``
when the command starts (the CLI calls it), so that edits made while a long benchmark runs do not show as its
code; without it they are read when the file is written.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

_start: dict | None = None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def git_state(source: Path | None = None) -> dict:
    """The commit checked out where the expunge package was imported from, and whether the package's files
    differ from it (None for both when that is not a git checkout, e.g. an installed wheel)."""
    source = source or Path(__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=30, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--", ".")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, with the program's path shortened: `expunge bench ...` or `python -m expunge ...`."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    program = Path(argv[0])
    if program.name == "__main__.py" and program.parent.name == "expunge":
        head = ["python", "-m", "expunge"]
    elif argv[0] == "-c":
        head = ["python", "-c", "..."]
    else:
        head = [program.name]
    return shlex.join(head + argv[1:])


def mark_start(command: str | None = None) -> None:
    """Record the git state, the date, the load and the command (default: this process's) now; the CLI calls
    it when a benchmark starts."""
    global _start
    _start = {**git_state(), "started": _now(), "load_before": _load(), "command": command or command_line()}


def capture(settings: dict | None = None) -> dict:
    """The provenance record; ``settings`` are the benchmark's own (rounds rule, worker threads, ...)."""
    import numpy
    import torch

    from .. import __version__

    start = _start or {**git_state(), "started": None, "load_before": None, "command": command_line()}
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    return {
        "commit": start["commit"], "dirty": start["dirty"], "expunge": __version__, "torch": torch.__version__,
        "numpy": numpy.__version__, "python": platform.python_version(), "platform": f"{platform.system()}-{platform.machine()}",
        "threads": torch.get_num_threads(), "cpu": cpu_model(), "cpus": cpus,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_before": start["load_before"], "load_after": _load(), "started": start["started"], "written": _now(),
        "command": start["command"], "settings": settings or {},
    }
