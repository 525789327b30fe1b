"""RunDirectory: atomic writes, staged versions, hashes, pruning, failure cleanup and locking."""

import json

import pytest

from expunge.artifact import FORMAT, RunDirectory, file_sha256, write_atomic
from expunge.errors import ExpungeError


def stage_version(run: RunDirectory, files: dict, manifest: dict | None = None) -> dict:
    with run.staging() as stage:
        for rel, content in files.items():
            path = stage / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        return run.commit(stage, manifest or {"note": "test"})


def test_write_atomic_replaces_content_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "manifest.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_read_manifest_on_non_run_dir_raises(tmp_path):
    with pytest.raises(ExpungeError, match="not a run directory"):
        RunDirectory(tmp_path).read_manifest()


def test_read_manifest_with_invalid_json_raises(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ExpungeError, match="not valid JSON"):
        RunDirectory(tmp_path).read_manifest()


def test_read_manifest_with_other_format_raises(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(ExpungeError, match="something-else/9"):
        RunDirectory(tmp_path).read_manifest()


def test_commit_makes_version_1_then_2_and_prunes(tmp_path):
    run = RunDirectory(tmp_path / "run")
    first = stage_version(run, {"weights.bin": b"one"})
    assert first["version"] == 1 and first["format"] == FORMAT
    assert (run.versions / "000001" / "weights.bin").read_bytes() == b"one"
    second = stage_version(run, {"weights.bin": b"two"})
    assert second["version"] == 2
    assert run.read_manifest()["version"] == 2
    assert [p.name for p in run.versions.iterdir()] == ["000002"]
    assert run.current(run.read_manifest()) == run.versions / "000002"


def test_commit_records_sha256_of_every_file(tmp_path):
    run = RunDirectory(tmp_path / "run")
    manifest = stage_version(run, {"a.bin": b"alpha", "trajectory/params.npy": b"p", "trajectory/grads.npy": b"g"},
                             {"note": "kept"})
    folder = run.current(manifest)
    assert set(manifest["files"]) == {"a.bin", "trajectory/params.npy", "trajectory/grads.npy"}
    for rel, digest in manifest["files"].items():
        assert digest == file_sha256(folder / rel)
    assert manifest["note"] == "kept"
    assert run.read_manifest() == manifest
    assert run.verify(manifest) == folder


def test_commit_removes_leftover_staging_folders(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.versions.mkdir(parents=True)
    (run.versions / ".staging-deadbeef").mkdir()
    stage_version(run, {"x": b"1"})
    assert [p.name for p in run.versions.iterdir()] == ["000001"]


def test_verify_raises_when_a_file_is_altered(tmp_path):
    run = RunDirectory(tmp_path / "run")
    manifest = stage_version(run, {"weights.bin": b"weights"})
    (run.current(manifest) / "weights.bin").write_bytes(b"weightz")
    with pytest.raises(ExpungeError, match="corrupted"):
        run.verify(manifest)


def test_verify_raises_when_a_trajectory_file_is_altered_pointing_to_retrain(tmp_path):
    run = RunDirectory(tmp_path / "run")
    manifest = stage_version(run, {"trajectory/params.npy": b"params"})
    (run.current(manifest) / "trajectory" / "params.npy").write_bytes(b"param")
    with pytest.raises(ExpungeError, match="retrain"):
        run.verify(manifest)


def test_verify_raises_when_a_file_is_missing(tmp_path):
    run = RunDirectory(tmp_path / "run")
    manifest = stage_version(run, {"weights.bin": b"w", "rows.npz": b"r"})
    (run.current(manifest) / "rows.npz").unlink()
    with pytest.raises(ExpungeError, match="missing"):
        run.verify(manifest)


def test_failure_inside_staging_removes_it_and_keeps_manifest(tmp_path):
    run = RunDirectory(tmp_path / "run")
    stage_version(run, {"weights.bin": b"one"})
    before = run.manifest_path.read_bytes()
    staged = []
    with pytest.raises(RuntimeError, match="boom"):
        with run.staging() as stage:
            staged.append(stage)
            (stage / "weights.bin").write_bytes(b"half-written")
            raise RuntimeError("boom")
    assert not staged[0].exists()
    assert run.manifest_path.read_bytes() == before
    assert [p.name for p in run.versions.iterdir()] == ["000001"]
    assert (run.versions / "000001" / "weights.bin").read_bytes() == b"one"


def test_lock_is_exclusive(tmp_path):
    run = RunDirectory(tmp_path / "run")
    with run.lock():
        with pytest.raises(ExpungeError, match="another process"):
            with RunDirectory(tmp_path / "run").lock():
                pass  # pragma: no cover


def test_lock_is_released_after_the_block(tmp_path):
    run = RunDirectory(tmp_path / "run")
    with run.lock():
        pass
    with run.lock():  # would raise if the first lock were still held
        pass
