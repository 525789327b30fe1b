"""Trajectory: the cached (w_t, g_t) DeltaGrad replays, on disk (memory-mapped) or in memory."""

import numpy as np
import pytest
import torch

from expunge.errors import ExpungeError
from expunge.trajectory import Trajectory


def is_memmapped(a: np.ndarray) -> bool:
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base if isinstance(a.base, np.ndarray) else None
    return False


def fill(traj: Trajectory, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T, P = traj.params.shape
    ws = torch.randn(T, P, generator=gen, dtype=dtype)
    gs = torch.randn(T, P, generator=gen, dtype=dtype)
    for t in range(T):
        traj.write(t, ws[t], gs[t])
    return ws.numpy(), gs.numpy()


def test_disk_round_trip_is_identical_and_memory_mapped(tmp_path):
    traj = Trajectory.create(tmp_path / "traj", 5, 7, torch.float64)
    ws, gs = fill(traj)
    traj.flush()
    opened = Trajectory.open(tmp_path / "traj")
    assert len(opened) == 5
    assert opened.params.dtype == np.float64
    np.testing.assert_array_equal(opened.params, ws)
    np.testing.assert_array_equal(opened.grads, gs)
    assert is_memmapped(opened.params) and is_memmapped(opened.grads)
    assert not opened.params.flags.writeable


def test_create_writes_both_files(tmp_path):
    Trajectory.create(tmp_path / "t", 2, 3, "float32")
    assert (tmp_path / "t" / "params.npy").exists() and (tmp_path / "t" / "grads.npy").exists()


def test_float32_trajectory_keeps_its_dtype(tmp_path):
    traj = Trajectory.create(tmp_path / "t", 3, 4, torch.float32)
    ws, _ = fill(traj, dtype=torch.float32)
    traj.flush()
    opened = Trajectory.open(tmp_path / "t")
    assert opened.params.dtype == np.float32
    np.testing.assert_array_equal(opened.params, ws)


def test_at_returns_tensors_of_iteration(tmp_path):
    traj = Trajectory.create(tmp_path / "t", 4, 3, torch.float64)
    ws, gs = fill(traj)
    traj.flush()
    w, g = Trajectory.open(tmp_path / "t").at(2)
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float64
    np.testing.assert_array_equal(w.numpy(), ws[2])
    np.testing.assert_array_equal(g.numpy(), gs[2])


def test_in_memory_create():
    traj = Trajectory.create(None, 3, 4, torch.float64)
    assert traj.folder is None
    assert not isinstance(traj.params, np.memmap)
    assert traj.params.shape == traj.grads.shape == (3, 4)
    ws, gs = fill(traj)
    traj.flush()  # a no-op in memory
    w, g = traj.at(1)
    np.testing.assert_array_equal(w.numpy(), ws[1])
    np.testing.assert_array_equal(g.numpy(), gs[1])


def test_truncated_params_raise_mentioning_retrain(tmp_path):
    traj = Trajectory.create(tmp_path / "t", 6, 5, torch.float64)
    fill(traj)
    traj.flush()
    del traj
    path = tmp_path / "t" / "params.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-17])
    with pytest.raises(ExpungeError, match="retrain") as e:
        Trajectory.open(tmp_path / "t")
    assert "params.npy" in str(e.value)


def test_missing_grads_raise(tmp_path):
    traj = Trajectory.create(tmp_path / "t", 2, 2, torch.float64)
    traj.flush()
    del traj
    (tmp_path / "t" / "grads.npy").unlink()
    with pytest.raises(ExpungeError, match="grads.npy.*retrain"):
        Trajectory.open(tmp_path / "t")


def test_params_grads_shape_mismatch_raises(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    np.save(folder / "params.npy", np.zeros((4, 3)))
    np.save(folder / "grads.npy", np.zeros((3, 3)))
    with pytest.raises(ExpungeError, match="inconsistent") as e:
        Trajectory.open(folder)
    assert "retrain" in str(e.value)
