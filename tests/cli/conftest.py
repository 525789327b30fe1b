"""Fixtures of the command-line tests: one digits run trained once per session, private copies of it."""

import shutil

import pytest

from expunge.data import load_dataset

from .helpers import TRAIN, invoke


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One training run shared by the module (read-only: tests that change a run use `run`)."""
    root = tmp_path_factory.mktemp("trained")
    run, report = root / "run", root / "train.json"
    result = invoke("train", "--data", "digits", "--out", run, *TRAIN, "--json", report)
    return run, report, result


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run directory."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


@pytest.fixture(scope="session")
def digits_train():
    return load_dataset("digits")[0]
