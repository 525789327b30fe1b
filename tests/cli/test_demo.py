"""`expunge demo`, the README's first command: it trains on generated data, forgets and adds back with DeltaGrad,
retrains exactly alongside, and says how much faster and how close DeltaGrad was."""

import json

import pytest

from .helpers import invoke, squash


def check_demo(result, out, n_rows):
    assert result.exit_code == 0, result.output
    text = squash(result.output)
    assert squash(f"{n_rows:,} training rows") in text
    for said in ("whatthisshows", "DeltaGradforgot", "DeltaGradaddedback", "retrainingfromscratchtook",
                 "aspeedupof", "ofthedistancetherequestmovedthem", "v3adddeltagrad"):
        assert said in text, said
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["data"]["n_base"] == n_rows
    return manifest


def test_the_demo_runs_on_a_small_generated_problem(tmp_path):
    out = tmp_path / "demo"
    manifest = check_demo(invoke("demo", "--out", out, "--rows", "400"), out, 400)
    assert manifest["data"]["source"] is None  # a non-default size is stored in the run
    assert invoke("info", out).exit_code == 0


def test_the_demo_replaces_an_earlier_demo_and_refuses_tiny_problems(tmp_path):
    out = tmp_path / "demo"
    assert invoke("demo", "--out", out, "--rows", "200").exit_code == 0
    check_demo(invoke("demo", "--out", out, "--rows", "300"), out, 300)
    result = invoke("demo", "--out", tmp_path / "tiny", "--rows", "10")
    assert result.exit_code == 2 and "at least 100" in result.output


@pytest.mark.slow
def test_the_default_demo_reads_its_data_back_by_name(tmp_path):
    out = tmp_path / "demo"
    manifest = check_demo(invoke("demo", "--out", out), out, 20_000)
    assert manifest["data"]["source"] == "synthetic"
    result = invoke("forget", out, "--ratio", "0.001", "--no-compare")  # reopens: regenerates the same rows
    assert result.exit_code == 0, result.output
