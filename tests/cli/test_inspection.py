"""The `expunge` command line end to end on scikit-learn's digits (small settings, for speed): info, evaluate, ledger.

Bad inputs must exit with code 2, say what is wrong without a traceback, and leave the run
directory byte-for-byte as it was.
"""

import json
import shutil

from .helpers import N_FEATURES, N_TRAIN, assert_clean_failure, invoke, write_rows


def test_info_json_to_stdout(trained):
    result = invoke("info", trained[0], "--json", "-")
    assert result.exit_code == 0, result.output
    start = result.stdout.index('{\n  "run"')
    summary, _ = json.JSONDecoder().raw_decode(result.stdout, start)
    assert summary["version"] == 1
    assert summary["rows"] == N_TRAIN and summary["rows_deleted"] == 0 and summary["rows_added"] == 0
    assert summary["recipe"]["epochs"] == 4
    assert summary["method"]["name"] == "deltagrad"
    assert 0.5 < summary["test_acc"] <= 1.0


def test_ledger_lists_train_forget_add_in_order(run, tmp_path):
    assert invoke("forget", run, "--ratio", "0.01", "--no-compare", "--quiet").exit_code == 0
    rows = write_rows(tmp_path / "rows.csv", 3, N_FEATURES)
    assert invoke("add", run, "--rows", rows, "--no-compare", "--quiet").exit_code == 0
    out = tmp_path / "ledger.json"
    result = invoke("ledger", run, "--json", out)
    assert result.exit_code == 0, result.output
    entries = json.loads(out.read_text())
    assert [e["kind"] for e in entries] == ["train", "forget", "add"]
    assert [e["version"] for e in entries] == [1, 2, 3]
    assert entries[2]["n_rows"] == 3
    info = invoke("info", run, "--json", "-")
    summary, _ = json.JSONDecoder().raw_decode(info.stdout, info.stdout.index('{\n  "run"'))
    assert summary["rows_added"] == 3 and summary["rows_deleted"] == 14


def test_not_a_run_directory_is_a_clean_error(tmp_path):
    result = invoke("info", tmp_path)
    assert_clean_failure(result, "not a run directory")
    assert_clean_failure(invoke("forget", tmp_path / "absent", "--ratio", "0.01"), "not a run directory")
    assert not (tmp_path / "absent").exists()


def test_forget_a_class_with_fisher_then_evaluate_against_retraining(tmp_path):
    args = ["--model", "mlp", "--hidden", "16", "--epochs", "4", "--batch-size", "64", "--dtype", "float32"]
    original = tmp_path / "original"
    assert invoke("train", "--data", "digits", "--out", original, *args).exit_code == 0
    scrubbed, reference = tmp_path / "scrubbed", tmp_path / "reference"
    for copy_to in (scrubbed, reference):
        shutil.copytree(original, copy_to)
    result = invoke("forget", scrubbed, "--class", "3", "--method", "fisher", "--json", tmp_path / "f.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "f.json").read_text())["guarantee"]["classes_dropped"] == [3]
    assert invoke("forget", reference, "--class", "3", "--method", "retrain", "--no-compare").exit_code == 0
    report = tmp_path / "report"
    result = invoke("evaluate", scrubbed, "--reference", reference, "--original", original, "--out", report,
                    "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "e.json").read_text())
    assert figures["model"]["forget_acc"] == 0.0  # the class is gone
    assert {"kl_to_retrain", "mia_auc", "relearn_steps"} <= set(figures["model"])
    assert (report / "report.md").exists() and (report / "report.png").exists()
    # after scrubbing there is no trajectory: DeltaGrad says what to do
    assert_clean_failure(invoke("forget", scrubbed, "--ratio", "0.01"), "retrain")


def test_evaluate_without_deletions_is_a_clean_error(trained):
    run, _, _ = trained
    assert_clean_failure(invoke("evaluate", run), "no forget set")
