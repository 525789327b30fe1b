"""The on-disk run directory, written so that a crash at any moment loses nothing.

    RUN/manifest.json            the current version: recipe, data, method, file hashes, the ledger's head
    RUN/ledger.sqlite            hash-chained record of every request (see ledger.py, integrity.py)
    RUN/base.npz                 the training data, only when it has no loadable source (base.json for a corpus)
    RUN/versions/000007/         one complete, self-contained state:
        weights.safetensors        final and initial weights
        rows.npz                   added rows and the mask of active rows
        trajectory/params.npy      w_t of every iteration (memory-mapped; a cache)
        trajectory/grads.npy       g_t of every iteration

An update stages a new version in a temporary folder, fsyncs and hashes it (``seal``), renames it into
place and only then replaces manifest.json (temp file + fsync + rename). Until that last rename the
previous manifest, and so the previous model, trajectory and ledger, stay current.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

from .errors import ExpungeError
from .integrity import Problem
from .ledger import Ledger

FORMAT = "expunge-run/2"
OLD_FORMATS = ("expunge-run/1",)
CACHES = ("trajectory/",)  # files a retraining rebuilds: damage there does not block opening the run
LOCK_WAIT = 600.0  # seconds a writer waits for another to finish by default

_held = threading.local()  # locks this thread holds: path -> [handle, depth] (re-entrant per thread)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RunDirectory:
    def __init__(self, path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def versions(self) -> Path:
        return self.path / "versions"

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.path / "ledger.sqlite")

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def read_manifest(self, formats: tuple[str, ...] = (FORMAT,)) -> dict:
        if not self.exists():
            raise ExpungeError(f"{self.path} is not a run directory (no manifest.json); create one with `expunge train`")
        restore = (f"restore manifest.json from a backup of this run and check it with `expunge verify {self.path}` "
                   "(the ledger's last row records the version and digest it must have)")
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExpungeError(f"{self.manifest_path} is not valid JSON ({e}): the run directory is damaged; {restore}") from None
        if not isinstance(manifest, dict):
            raise ExpungeError(f"{self.manifest_path} is not a JSON object: the run directory is damaged; {restore}")
        if manifest.get("format") not in formats:
            if manifest.get("format") in OLD_FORMATS:
                raise ExpungeError(f"{self.path} was written by an earlier expunge (format {manifest['format']}, whose "
                                   f"ledger is not hash-chained); run `expunge migrate {self.path}` once to chain it "
                                   "(its rows are kept and marked as migrated)")
            raise ExpungeError(f"{self.path} has format {manifest.get('format')!r}; this expunge reads {FORMAT}")
        missing = [k for k in ("version", "files", "method", "data") if k not in manifest]
        if missing or not isinstance(manifest.get("version"), int) or not isinstance(manifest.get("files"), dict):
            raise ExpungeError(f"{self.manifest_path} lacks or garbles {', '.join(missing) or 'version/files'}: the run "
                               f"directory is damaged; {restore}")
        return manifest

    def current(self, manifest: dict) -> Path:
        return self.versions / f"{manifest['version']:06d}"

    def check_files(self, manifest: dict) -> list[Problem]:
        """Every file of the current version against its recorded hash (and the stored data's)."""
        folder, problems = self.current(manifest), []
        for rel, digest in sorted(manifest["files"].items()):
            path, cache = folder / rel, rel.startswith(CACHES)
            fix = ("the next update with --method retrain rebuilds it" if cache
                   else f"restore {folder.name} from a backup of this run, or retrain")
            where = f"versions/{folder.name}/{rel}"
            if not path.is_file():
                problems.append(Problem(where, "it is missing", fix, cache))
            elif file_sha256(path) != digest:
                problems.append(Problem(where, "it is corrupted (its hash does not match the manifest)", fix, cache))
        base = manifest["data"].get("base_sha256")
        if base is not None:
            name = manifest["data"].get("base_file", "base.npz")
            path = self.path / name
            if not path.is_file() or file_sha256(path) != base:
                problems.append(Problem(name, "the stored training data is missing or corrupted",
                                        f"restore {name} from a backup of this run"))
        return problems

    def verify(self, manifest: dict) -> Path:
        """Check every file of the current version against its recorded hash; raise on the first mismatch
        that is not a cache (see ``check_files`` for all of them)."""
        for problem in self.check_files(manifest):
            if not problem.cache:
                raise ExpungeError(f"{self.path / problem.where} is {problem.what.removeprefix('it is ')}; {problem.fix}")
        return self.current(manifest)

    @contextlib.contextmanager
    def lock(self, wait: float = LOCK_WAIT):
        """Exclusive lock for the length of an update: two writers never interleave. Waits up to ``wait``
        seconds for another writer to finish; re-entrant within one thread (a command that holds the lock
        across loading and updating calls methods that take it again)."""
        self.path.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path / ".lock")
        held = _held.__dict__.setdefault("locks", {})
        if key in held:
            held[key][1] += 1
            try:
                yield
            finally:
                held[key][1] -= 1
            return
        with open(self.path / ".lock", "w") as handle:
            deadline = time.monotonic() + max(wait, 0)
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ExpungeError(f"{self.path} is being updated by another process (waited {wait:g} s for its "
                                           "lock); try again when it has finished, or wait longer (--wait)") from None
                    time.sleep(0.05)
            held[key] = [handle, 1]
            try:
                yield
            finally:
                del held[key]

    @contextlib.contextmanager
    def staging(self):
        """A temporary folder for the next version; removed if anything inside the block fails."""
        self.versions.mkdir(parents=True, exist_ok=True)
        folder = self.versions / f".staging-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        try:
            yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @staticmethod
    def seal(staged: Path) -> dict:
        """Push the staged files to stable storage and return their hashes (relative path -> sha256)."""
        files = {}
        for path in sorted(p for p in staged.rglob("*") if p.is_file()):
            fsync_path(path)
            files[path.relative_to(staged).as_posix()] = file_sha256(path)
        for folder in sorted({p.parent for p in staged.rglob("*")} | {staged}):
            fsync_path(folder)
        return files

    def commit(self, staged: Path, manifest: dict) -> dict:
        """Make ``staged`` (sealed, its hashes in ``manifest["files"]``) the version ``manifest["version"]``
        and write the manifest; return it."""
        final = self.current(manifest)
        if final.exists():  # left over by a crash after its rename but before its manifest
            shutil.rmtree(final)
        os.replace(staged, final)
        fsync_path(self.versions)
        write_atomic(self.manifest_path, json.dumps(manifest, indent=2).encode())
        self._prune(keep=final)
        return manifest

    def _prune(self, keep: Path) -> None:
        """Remove versions the manifest no longer points to (and staging left by crashes)."""
        for folder in self.versions.iterdir():
            if folder != keep and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
