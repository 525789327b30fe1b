"""The `expunge` command line end to end on scikit-learn's digits (small settings, for speed): train, forget, add.

Bad inputs must exit with code 2, say what is wrong without a traceback, and leave the run
directory byte-for-byte as it was.
"""

import json

import numpy as np
import pytest
import torch

from ..bench.shared_data import DATA
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
    assert_clean_failure(result, "exactly one of --ids FILE, --ratio R, --class K or --group G")
    assert snapshot(run) == before


def test_neither_ids_nor_ratio_is_a_clean_error(run):
    before = snapshot(run)
    result = invoke("forget", run)
    assert_clean_failure(result, "exactly one of --ids FILE, --ratio R, --class K or --group G")
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
    assert_clean_failure(invoke("add", run, "--rows", rows), "labels must be integers")
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


# ----------------------------------------------------------------------------- text tables read strictly

WORK = ["State-gov", "Private", "Self-emp", "?"]
SCHOOL = ["Bachelors", "HS-grad", "Masters", "11th"]


def write_adult_like(path, n_rows, seed=0, labels=("<=50K", ">50K"), work=WORK):
    """Rows shaped like UCI Adult: ', '-separated, no header, text columns, '?' for missing, text labels."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_rows):
        age, school = int(rng.integers(18, 80)), SCHOOL[rng.integers(len(SCHOOL))]
        rich = (age > 40) + (school in ("Bachelors", "Masters")) + rng.random() > 1.5
        lines.append(f"{age}, {work[rng.integers(len(work))]}, {int(rng.integers(10_000, 400_000))}, {school}, "
                     f"{labels[int(rich)]}")
    path.write_text("\n".join(lines) + "\n")
    return path


ADULT_OPTIONS = ["--encode-categories", "--encode-labels", "--missing", "impute", "--standardize"]


def test_a_table_with_categories_and_missing_values_trains_reopens_and_adds(tmp_path):
    table, run = write_adult_like(tmp_path / "adult.data", 120), tmp_path / "run"
    result = invoke("train", "--data", table, "--out", run, "--epochs", "2", "--batch-size", "32", *ADULT_OPTIONS)
    assert result.exit_code == 0, result.output
    output = squash(result.output)
    for said in ("delimiter:comma(inferred", "header:none(inferred", "label:column4,thelast(thedefault",
                 "'<=50K'->0,'>50K'->1", "imputedmissingcells"):
        assert said in output, said
    read = json.loads((run / "manifest.json").read_text())["data"]["read"]
    assert read["classes"] == ["<=50K", ">50K"] and read["delimiter"] == "," and read["header"] is False
    assert [f["kind"] for f in read["features"]] == ["numeric", "categorical", "numeric", "categorical"]
    info = invoke("info", run, "--json", "-")  # re-reads the table with the recorded spec: same fingerprint
    assert info.exit_code == 0, info.output
    rows = write_adult_like(tmp_path / "rows.csv", 3, seed=1)
    out = tmp_path / "add.json"
    result = invoke("add", run, "--rows", rows, "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["metrics"]["rows"] == 123
    result = invoke("forget", run, "--ratio", "0.02", "--no-compare")  # reopens base table and added rows
    assert result.exit_code == 0, result.output


def test_a_moved_table_is_read_with_the_recorded_spec(tmp_path):
    table, run = write_adult_like(tmp_path / "adult.data", 80), tmp_path / "run"
    assert invoke("train", "--data", table, "--out", run, "--epochs", "1", *ADULT_OPTIONS).exit_code == 0
    moved = tmp_path / "elsewhere.data"
    table.rename(moved)
    assert_clean_failure(invoke("forget", run, "--ratio", "0.05"), "not found")
    result = invoke("forget", run, "--ratio", "0.05", "--no-compare", "--data", moved)
    assert result.exit_code == 0, result.output


def test_new_rows_with_an_unknown_category_are_a_clean_error(tmp_path):
    table, run = write_adult_like(tmp_path / "adult.data", 60), tmp_path / "run"
    assert invoke("train", "--data", table, "--out", run, "--epochs", "1", *ADULT_OPTIONS).exit_code == 0
    rows = write_adult_like(tmp_path / "rows.csv", 2, work=["Never-worked"])
    before = snapshot(run)
    assert_clean_failure(invoke("add", run, "--rows", rows), "'Never-worked'", "a category the training table does not have")
    assert_clean_failure(invoke("add", run, "--rows", rows, "--delimiter", "tab"), "drop the reading options")
    assert snapshot(run) == before


def test_a_table_of_text_is_refused_with_the_options_that_read_it(tmp_path):
    table = write_adult_like(tmp_path / "adult.data", 40)
    assert_clean_failure(invoke("train", "--data", table, "--out", tmp_path / "r", *TRAIN), "missing value", "--missing impute")
    assert_clean_failure(invoke("train", "--data", table, "--out", tmp_path / "r", *TRAIN, "--missing", "drop"),
                         "labels", "hold text", "--encode-labels")
    assert_clean_failure(invoke("train", "--data", table, "--out", tmp_path / "r", *TRAIN, "--missing", "drop",
                                "--encode-labels"), "holds text", "--encode-categories")
    assert not (tmp_path / "r").exists()


def test_a_label_first_tab_file_is_refused_until_its_label_column_is_named(tmp_path):
    rng = np.random.default_rng(0)
    table = tmp_path / "binary.train"
    table.write_text("".join("\t".join([str(int(rng.integers(2)))] + [f"{v:.3f}" for v in rng.normal(size=4)]) + "\n"
                             for _ in range(50)))
    result = invoke("train", "--data", table, "--out", tmp_path / "r", *TRAIN)
    assert_clean_failure(result, "the last column by default", "non-integer", "--label-column")
    assert not (tmp_path / "r").exists()
    result = invoke("train", "--data", table, "--out", tmp_path / "r", *TRAIN, "--label-column", "0")
    assert result.exit_code == 0, result.output
    assert "delimiter:tab(inferred" in squash(result.output)
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["data"]["n_features"] == 4


def test_float_labels_and_ids_are_clean_errors(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("0.1,0.2,1\n0.3,0.4,0.5\n")
    assert_clean_failure(invoke("train", "--data", labels, "--out", tmp_path / "r", *TRAIN), "non-integer", "0.5", "line 2")
    ids = tmp_path / "ids.csv"
    ids.write_text("id,a,label\n1.5,0.1,1\n2,0.3,0\n")
    assert_clean_failure(invoke("train", "--data", ids, "--out", tmp_path / "r", *TRAIN), "ids", "1.5")
    assert not (tmp_path / "r").exists()


def test_float_labels_in_added_rows_are_a_clean_error(run, tmp_path):
    rows = tmp_path / "rows.npz"
    np.savez(rows, X=np.zeros((2, N_FEATURES)), y=np.array([1.0, 2.5]))
    before = snapshot(run)
    assert_clean_failure(invoke("add", run, "--rows", rows), "non-integer", "2.5")
    assert snapshot(run) == before


def test_table_options_on_digits_are_a_clean_error(tmp_path):
    result = invoke("train", "--data", "digits", "--out", tmp_path / "r", *TRAIN, "--delimiter", "tab")
    assert_clean_failure(result, "--delimiter applies to text tables")


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "adult").exists(), reason=f"{DATA / 'adult'} not found (set EXPUNGE_DATA)")
def test_uci_adult_trains_from_its_own_files(tmp_path):
    adult, run = DATA / "adult", tmp_path / "adult"
    result = invoke("train", "--data", adult / "adult.data", "--test-data", adult / "adult.test", "--comment", "|",
                    "--strip-label-suffix", ".", *ADULT_OPTIONS, "--out", run, "--epochs", "2", "--batch-size", "4096",
                    "--json", tmp_path / "train.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["metrics"]["rows"] == 32561
    assert report["metrics"]["test_acc"] > 0.8  # above the 76% of always answering '<=50K'


def test_train_lr_auto_records_gens_rates_and_forget_retrains_them(tmp_path, digits_train):
    from expunge.train import train
    from expunge.trajectory import Trajectory
    from expunge.unlearn import Fitted

    run = tmp_path / "auto"
    assert_clean_failure(invoke("train", "--data", "digits", "--out", run, *TRAIN, "--lr", "auto"), "--method retrain")
    assert_clean_failure(invoke("train", "--data", "digits", "--out", run, *TRAIN, "--lr", "fast"), "'auto'")
    assert not run.exists()
    result = invoke("train", "--data", "digits", "--out", run, *TRAIN, "--lr", "auto", "--lr-start", "0.05",
                    "--method", "retrain")
    assert result.exit_code == 0, result.output
    assert "GeN learning rate" in result.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recipe"]["lr_auto"] is True and manifest["recipe"]["lr"] == 0.05
    assert (run / "versions" / "000001" / "trajectory" / "rates.npy").is_file()
    before = snapshot(run)
    ids_file = write_ids(tmp_path / "ids.txt", digits_train.ids[[0, 5, 100]])
    assert_clean_failure(invoke("forget", run, "--ids", ids_file, "--method", "deltagrad"), "only exact retraining")
    assert snapshot(run) == before
    result = invoke("forget", run, "--ids", ids_file, "--no-compare")
    assert result.exit_code == 0, result.output
    fitted = Fitted.load(run)
    traj = Trajectory.create(None, fitted.plan.n_iterations, fitted.flat.n_params, fitted.flat.dtype)
    w = train(fitted.ws, fitted.active, fitted.w0, traj)  # training from scratch on the remaining rows
    assert torch.equal(fitted.w, w)
    np.testing.assert_array_equal(fitted.rates, traj.rates)


def test_nproc_without_dp_is_a_clean_error(tmp_path):
    assert_clean_failure(invoke("train", "--data", "digits", "--out", tmp_path / "r", *TRAIN, "--nproc", "2"),
                         "--nproc trains privately")
    assert not (tmp_path / "r").exists()
