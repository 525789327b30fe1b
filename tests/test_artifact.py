"""RunDirectory: atomic writes, staged versions, hashes, pruning, failure cleanup and locking."""

import json
import threading
import time

import pytest

from expunge.artifact import FORMAT, RunDirectory, file_sha256, write_atomic
from expunge.errors import ExpungeError


def stage_version(run: RunDirectory, files: dict, manifest: dict | None = None) -> dict:
    version = run.read_manifest()["version"] + 1 if run.exists() else 1
    with run.staging() as stage:
        for rel, content in files.items():
            path = stage / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        return run.commit(stage, {"note": "test", "method": {}, "data": {}, **(manifest or {}), "format": FORMAT,
                                  "version": version, "files": run.seal(stage)})


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


def test_a_run_of_the_earlier_format_names_the_migration(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "expunge-run/1", "version": 3}))
    with pytest.raises(ExpungeError, match=f"expunge migrate {tmp_path}"):
        RunDirectory(tmp_path).read_manifest()


@pytest.mark.parametrize("content", ["[1, 2]", json.dumps({"format": FORMAT, "version": "3", "files": {}}),
                                     json.dumps({"format": FORMAT, "files": {}})])
def test_a_garbled_manifest_names_the_recovery(tmp_path, content):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ExpungeError, match="restore manifest.json from a backup"):
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


def test_an_altered_trajectory_is_a_cache_problem_naming_retrain(tmp_path):
    run = RunDirectory(tmp_path / "run")
    manifest = stage_version(run, {"trajectory/params.npy": b"params", "weights.bin": b"w"})
    (run.current(manifest) / "trajectory" / "params.npy").write_bytes(b"param")
    (problem,) = run.check_files(manifest)
    assert problem.cache and problem.where == "versions/000001/trajectory/params.npy"
    assert "retrain" in problem.fix
    assert run.verify(manifest) == run.current(manifest)  # a cache does not block opening the run


def test_check_files_reports_every_mismatch(tmp_path):
    run = RunDirectory(tmp_path / "run")
    manifest = stage_version(run, {"a.bin": b"a", "b.bin": b"b", "c.bin": b"c"})
    (run.current(manifest) / "a.bin").write_bytes(b"A")
    (run.current(manifest) / "c.bin").unlink()
    problems = run.check_files(manifest)
    assert [(p.where, p.what) for p in problems] == [
        ("versions/000001/a.bin", "it is corrupted (its hash does not match the manifest)"),
        ("versions/000001/c.bin", "it is missing")]
    assert not any(p.cache for p in problems)


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


def _try_lock(path, wait, outcome):
    try:
        with RunDirectory(path).lock(wait=wait):
            outcome.append(("locked", time.monotonic()))
    except ExpungeError as e:
        outcome.append(("refused", str(e)))


def test_lock_is_exclusive_between_threads_and_says_how_long_it_waited(tmp_path):
    run = RunDirectory(tmp_path / "run")
    outcome = []
    with run.lock():
        thread = threading.Thread(target=_try_lock, args=(tmp_path / "run", 0.2, outcome))
        thread.start()
        thread.join()
    assert outcome[0][0] == "refused" and "another process" in outcome[0][1] and "waited 0.2 s" in outcome[0][1]


def test_a_waiting_writer_gets_the_lock_when_the_holder_finishes(tmp_path):
    run = RunDirectory(tmp_path / "run")
    outcome = []
    with run.lock():
        thread = threading.Thread(target=_try_lock, args=(tmp_path / "run", 30, outcome))
        thread.start()
        time.sleep(0.3)
        released = time.monotonic()
    thread.join()
    assert outcome[0][0] == "locked" and outcome[0][1] >= released


def test_lock_is_reentrant_within_a_thread(tmp_path):
    run = RunDirectory(tmp_path / "run")
    with run.lock():
        with RunDirectory(tmp_path / "run").lock(wait=0):  # the same thread: a command holding it across calls
            pass
        outcome = []
        thread = threading.Thread(target=_try_lock, args=(tmp_path / "run", 0, outcome))
        thread.start()
        thread.join()
        assert outcome[0][0] == "refused"  # still held after the inner block


def test_lock_is_released_after_the_block(tmp_path):
    run = RunDirectory(tmp_path / "run")
    with run.lock():
        pass
    with run.lock():  # would raise if the first lock were still held
        pass
