"""The `expunge` command line end to end on scikit-learn's digits (small settings, for speed): train, forget, add.

Bad inputs must exit with code 2, say what is wrong without a traceback, and leave the run
directory byte-for-byte as it was.
"""

import json

import numpy as np
import pytest

from .helpers import N_FEATURES, N_TRAIN, TRAIN, assert_clean_failure, invoke, snapshot, squash, write_ids, write_rows


def test_train_writes_a_run_and_json(trained):
    run, report_path, result = trained
    assert result.exit_code == 0, result.output
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["version"] == 1
    assert manifest["recipe"]["epochs"] == 4 and manifest["recipe"]["batch_size"] == 256
    assert manifest["data"]["n_base"] == N_TRAIN and manifest["data"]["source"] == "digits"
    assert (run / "ledger.sqlite").exists()
    version = run / "versions" / "000001"
    for rel in ("weights.safetensors", "rows.npz", "trajectory/params.npy", "trajectory/grads.npy"):
        assert (version / rel).is_file(), rel
    report = json.loads(report_path.read_text())
    assert report["kind"] == "train" and report["version"] == 1
    assert report["model_hash_after"] == manifest["model_hash"]
    assert report["metrics"]["rows"] == N_TRAIN
    assert 0.5 < report["metrics"]["test_acc"] <= 1.0
    assert squash("trained logreg on 1437 rows") in squash(result.stdout)


def test_forget_ratio_prints_and_writes_a_report_closer_to_retraining(run, tmp_path):
    out = tmp_path / "forget.json"
    before = snapshot(run)
    result = invoke("forget", run, "--ratio", "0.01", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["kind"] == "forget" and report["method"] == "deltagrad" and report["version"] == 2
    assert len(report["ids"]) == round(0.01 * N_TRAIN)
    metrics = report["metrics"]
    assert metrics["rows"] == N_TRAIN - len(report["ids"])
    assert metrics["dist_to_retrain"] < metrics["dist_previous_to_retrain"]
    assert report["guarantee"]["kind"] == "approximate"
    assert squash("forget 14 row(s)") in squash(result.stdout)
    assert "w_retrain" in result.stdout
    assert json.loads((run / "manifest.json").read_text())["version"] == 2
    assert snapshot(run) != before  # the snapshot the bad-input tests compare does see changes


def test_forget_ids_with_retrain_and_no_compare(run, tmp_path, digits_train):
    chosen = digits_train.ids[[0, 5, 100]]
    ids_file = write_ids(tmp_path / "ids.txt", chosen)
    out = tmp_path / "forget.json"
    result = invoke("forget", run, "--ids", ids_file, "--method", "retrain", "--no-compare", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["method"] == "retrain" and report["guarantee"]["kind"] == "exact"
    assert sorted(report["ids"]) == sorted(chosen.tolist())
    assert "dist_to_retrain" not in report["metrics"]
    assert report["metrics"]["rows"] == N_TRAIN - 3


def test_add_rows_from_csv_without_id_column(run, tmp_path, digits_train):
    rows = write_rows(tmp_path / "rows.csv", 5, N_FEATURES)
    out = tmp_path / "add.json"
    result = invoke("add", run, "--rows", rows, "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["kind"] == "add" and report["version"] == 2
    assert len(report["ids"]) == 5
    assert min(report["ids"]) > digits_train.ids.max()  # fresh ids
    assert report["metrics"]["rows"] == N_TRAIN + 5


def test_unknown_id_is_a_clean_error(run, tmp_path):
    ids_file = write_ids(tmp_path / "ids.txt", [999_999])
    before = snapshot(run)
    result = invoke("forget", run, "--ids", ids_file)
    assert_clean_failure(result, "999999", "not in")
    assert snapshot(run) == before


def test_ratio_out_of_range_is_a_clean_error(run):
    before = snapshot(run)
    result = invoke("forget", run, "--ratio", "1.5")
    assert_clean_failure(result, "ratio must be between 0 and 1", "1.5")
    assert snapshot(run) == before


def test_both_ids_and_ratio_is_a_clean_error(run, tmp_path):
    ids_file = write_ids(tmp_path / "ids.txt", [0])
    before = snapshot(run)
    result = invoke("forget", run, "--ids", ids_file, "--ratio", "0.01")
    assert_clean_failure(result, "exactly one of --ids FILE, --ratio R or --class K")
    assert snapshot(run) == before


def test_neither_ids_nor_ratio_is_a_clean_error(run):
    before = snapshot(run)
    result = invoke("forget", run)
    assert_clean_failure(result, "exactly one of --ids FILE, --ratio R or --class K")
    assert snapshot(run) == before


def test_rows_with_wrong_feature_count_is_a_clean_error(run, tmp_path):
    rows = write_rows(tmp_path / "rows.csv", 4, 10)
    before = snapshot(run)
    result = invoke("add", run, "--rows", rows)
    assert_clean_failure(result, "10 features", str(N_FEATURES))
    assert snapshot(run) == before


def test_train_into_an_existing_run_is_a_clean_error(run):
    before = snapshot(run)
    result = invoke("train", "--data", "digits", "--out", run, *TRAIN)
    assert_clean_failure(result, "already holds a run")
    assert snapshot(run) == before


def test_unknown_method_on_forget_is_a_clean_error(run):
    before = snapshot(run)
    result = invoke("forget", run, "--ratio", "0.01", "--method", "bogus")
    assert_clean_failure(result, "unknown method 'bogus'", "deltagrad, retrain")
    assert snapshot(run) == before


def test_unknown_method_on_train_is_a_clean_error(tmp_path):
    out = tmp_path / "new"
    result = invoke("train", "--data", "digits", "--out", out, *TRAIN, "--method", "bogus")
    assert_clean_failure(result, "unknown method 'bogus'")
    assert not out.exists()


def test_forget_with_another_dataset_is_a_clean_error(run, tmp_path):
    other = tmp_path / "other.npz"
    rng = np.random.default_rng(0)
    np.savez(other, X=rng.random((50, N_FEATURES)), y=rng.integers(0, 10, 50))
    before = snapshot(run)
    result = invoke("forget", run, "--ratio", "0.01", "--data", other)
    assert_clean_failure(result, "is not the one")
    assert snapshot(run) == before


def test_negative_seed_on_train_is_a_clean_error(tmp_path):
    result = invoke("train", "--data", "digits", "--out", tmp_path / "new", *TRAIN, "--seed", "-1")
    assert_clean_failure(result, "seed")
    assert not (tmp_path / "new").exists()


def test_negative_seed_on_forget_is_a_clean_error(run):
    before = snapshot(run)
    result = invoke("forget", run, "--ratio", "0.01", "--seed", "-1")
    assert_clean_failure(result, "seed")
    assert snapshot(run) == before


def test_certified_train_and_forget_report_the_certificate(tmp_path):
    run = tmp_path / "cert"
    result = invoke("train", "--data", "digits", "--out", run, "--method", "certified", "--classes", "3,8",
                    "--l2-normalize", "--lambda", "1e-2", "--sigma", "1")
    assert result.exit_code == 0, result.output
    assert "certified removal" in squash(result.output) or "certificate" in result.output
    report = tmp_path / "forget.json"
    result = invoke("forget", run, "--ratio", "0.01", "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["guarantee"]["kind"] == "certified"
    assert data["guarantee"]["spent"] <= data["guarantee"]["budget"]
    assert data["metrics"]["dist_to_retrain"] < data["metrics"]["dist_previous_to_retrain"]
    result = invoke("info", run, "--json", "-")
    assert result.exit_code == 0 and '"certificate"' in result.output


def test_certified_on_unscaled_features_is_a_clean_error(tmp_path):
    result = invoke("train", "--data", "digits", "--out", tmp_path / "cert", "--method", "certified")
    assert_clean_failure(result, "rescale", "--l2-normalize")
    assert not (tmp_path / "cert").exists()


def test_certified_with_an_mlp_is_a_clean_error(tmp_path):
    result = invoke("train", "--data", "digits", "--out", tmp_path / "cert", "--method", "certified",
                    "--l2-normalize", "--model", "mlp")
    assert_clean_failure(result, "linear model")


def test_sisa_train_and_forget_is_exact(tmp_path):
    run = tmp_path / "sisa"
    result = invoke("train", "--data", "digits", "--out", run, "--method", "sisa", "--shards", "3", "--slices", "2",
                    "--model", "mlp", "--hidden", "16", "--optimizer", "Adam", "--lr", "0.01", "--epochs", "2",
                    "--batch-size", "64", "--dtype", "float32", "--workers", "1")
    assert result.exit_code == 0, result.output
    report = tmp_path / "forget.json"
    result = invoke("forget", run, "--ratio", "0.002", "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["guarantee"] == {"kind": "exact"}
    assert data["metrics"]["identical_to_retrain"] is True
    assert data["metrics"]["rows_processed"] < data["metrics"]["rows_full_retrain"]


def test_deltagrad_with_adam_is_a_clean_error(tmp_path):
    result = invoke("train", "--data", "digits", "--out", tmp_path / "r", *TRAIN, "--optimizer", "Adam")
    assert_clean_failure(result, "plain SGD", "sisa")


@pytest.mark.parametrize("extra, words", [
    (["--method", "sisa", "--workers", "-1"], "workers"),
    (["--classes", "3,99"], "label(s) [99]"),
])
def test_more_bad_training_settings_are_clean_errors(tmp_path, extra, words):
    result = invoke("train", "--data", "digits", "--out", tmp_path / "r", *TRAIN, *extra)
    assert_clean_failure(result, words)
    assert not (tmp_path / "r").exists()


def test_out_that_is_a_file_is_a_clean_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert_clean_failure(invoke("train", "--data", "digits", "--out", target, *TRAIN), "is a file")


def test_ids_too_large_and_string_labels_are_clean_errors(run, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("99999999999999999999\n")
    before = snapshot(run)
    assert_clean_failure(invoke("forget", run, "--ids", ids), "integers")
    rows = tmp_path / "rows.npz"
    np.savez(rows, X=np.zeros((2, N_FEATURES)), y=np.array(["a", "b"]))
    assert_clean_failure(invoke("add", run, "--rows", rows), "integer labels")
    assert snapshot(run) == before


def test_a_fisher_run_uses_the_settings_given_on_forget(tmp_path):
    run = tmp_path / "fisher"
    assert invoke("train", "--data", "digits", "--out", run, *TRAIN, "--method", "fisher").exit_code == 0
    report = tmp_path / "f.json"
    result = invoke("forget", run, "--ratio", "0.01", "--scrub-lam", "1e-6", "--no-compare", "--json", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["guarantee"]["lam"] == 1e-6


def test_private_train_records_epsilon_and_forget_retrains_privately(tmp_path):
    run = tmp_path / "dp"
    result = invoke("train", "--data", "digits", "--out", run, "--dp", "--epsilon", "3", "--delta", "1e-5",
                    "--batch-size", "128", "--epochs", "2", "--model", "mlp", "--lr", "0.5", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "epsilon" in result.output and "PLD" in result.output
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["method"]["name"] == "dp" and manifest["privacy"]["epsilon_pld"] <= 3.0
    assert manifest["privacy"]["delta"] == 1e-5
    out = tmp_path / "forget.json"
    result = invoke("forget", run, "--ratio", "0.01", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["method"] == "dp" and report["guarantee"]["privacy"]["epsilon_pld"] <= 3.0
    result = invoke("info", run, "--json", "-")
    assert result.exit_code == 0 and '"privacy"' in result.output


@pytest.mark.parametrize("extra, words", [
    (["--epsilon", "3"], ["--batch-size"]),
    (["--epsilon", "3", "--batch-size", "64", "--delta", "0.01"], ["below 1/n"]),
    (["--batch-size", "64"], ["--epsilon", "--noise-multiplier"]),
    (["--epsilon", "3", "--batch-size", "64", "--clip-fn", "max"], ["clip-fn"]),
    (["--epsilon", "3", "--batch-size", "5000"], ["larger than the data"]),
])
def test_bad_private_settings_are_clean_errors(tmp_path, extra, words):
    result = invoke("train", "--data", "digits", "--out", tmp_path / "dp", "--dp", *extra)
    assert_clean_failure(result, *words)
    assert not (tmp_path / "dp").exists()
