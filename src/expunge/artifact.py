"""The on-disk run directory, written so that a crash at any moment loses nothing.

    RUN/manifest.json            the current version: recipe, data, method, file hashes
    RUN/ledger.sqlite            append-only record of every request (see ledger.py)
    RUN/base.npz                 the training data, only when it has no loadable source
    RUN/versions/000007/         one complete, self-contained state:
        weights.safetensors        final and initial weights
        rows.npz                   added rows and the mask of active rows
        trajectory/params.npy      w_t of every iteration (memory-mapped)
        trajectory/grads.npy       g_t of every iteration

An update stages a new version in a temporary folder, fsyncs it, renames it into place and only
then replaces manifest.json (temp file + fsync + rename). Until that last rename the previous
manifest, and so the previous model, trajectory and ledger, stay current.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from .errors import ExpungeError

FORMAT = "expunge-run/1"


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

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def read_manifest(self) -> dict:
        if not self.exists():
            raise ExpungeError(f"{self.path} is not a run directory (no manifest.json); create one with `expunge train`")
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise ExpungeError(f"{self.manifest_path} is not valid JSON ({e}); the run directory is damaged") from e
        if manifest.get("format") != FORMAT:
            raise ExpungeError(f"{self.path} has format {manifest.get('format')!r}; this expunge reads {FORMAT}")
        return manifest

    def current(self, manifest: dict) -> Path:
        return self.versions / f"{manifest['version']:06d}"

    def verify(self, manifest: dict) -> Path:
        """Check every file of the current version against its recorded hash."""
        folder = self.current(manifest)
        for rel, digest in manifest["files"].items():
            path = folder / rel
            if not path.exists():
                raise ExpungeError(f"{path} is missing; the run directory is damaged (restore it or retrain)")
            if file_sha256(path) != digest:
                hint = "update with --method retrain, which rebuilds it" if rel.startswith("trajectory") else "restore it or retrain"
                raise ExpungeError(f"{path} is corrupted (its hash does not match the manifest); {hint}")
        return folder

    @contextlib.contextmanager
    def lock(self):
        """Exclusive lock for the length of an update: two writers never interleave."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise ExpungeError(f"{self.path} is being updated by another process; wait for it to finish") from e
            yield

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

    def commit(self, staged: Path, manifest: dict) -> dict:
        """Make ``staged`` the current version and write the manifest; return the manifest."""
        previous = self.read_manifest()["version"] if self.exists() else 0
        files = {}
        for path in sorted(p for p in staged.rglob("*") if p.is_file()):
            fsync_path(path)
            files[path.relative_to(staged).as_posix()] = file_sha256(path)
        for folder in sorted({p.parent for p in staged.rglob("*")} | {staged}):
            fsync_path(folder)
        manifest = dict(manifest, format=FORMAT, version=previous + 1, files=files)
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
