"""IndexedDataset and the loaders for the formats users bring (digits, .npz, .csv, IDX, ids files)."""

import gzip
import struct

import numpy as np
import pytest

from expunge.data import IndexedDataset, load_dataset, load_ids, load_rows, make_synthetic
from expunge.errors import ExpungeError
from expunge.tables import ReadOptions


def small(n=6, d=3, ids=None, name="small"):
    rng = np.random.default_rng(0)
    X = rng.random((n, d)).astype(np.float32)
    y = np.arange(n) % 3
    return IndexedDataset(X, y, np.arange(n) if ids is None else np.asarray(ids), name)


# ----------------------------------------------------------------------------- IndexedDataset


def test_mismatched_lengths_raise():
    with pytest.raises(ExpungeError, match="must match"):
        IndexedDataset(np.zeros((4, 2)), np.zeros(3), np.arange(4))
    with pytest.raises(ExpungeError, match="must match"):
        IndexedDataset(np.zeros((4, 2)), np.zeros(4), np.arange(5))


def test_duplicate_ids_raise():
    with pytest.raises(ExpungeError, match="unique"):
        IndexedDataset(np.zeros((3, 2)), np.zeros(3), np.array([1, 2, 1]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_raise(bad):
    X = np.zeros((3, 2))
    X[1, 0] = bad
    with pytest.raises(ExpungeError, match="NaN or infinity"):
        IndexedDataset(X, np.zeros(3), np.arange(3))


def test_arrays_are_normalised_to_float32_int64_2d():
    ds = IndexedDataset(np.zeros((4, 2, 3), np.float64), np.array([0, 1, 0, 1], np.uint8), np.arange(4, dtype=np.int32))
    assert ds.X.dtype == np.float32 and ds.X.shape == (4, 6)
    assert ds.y.dtype == np.int64 and ds.ids.dtype == np.int64
    assert ds.n_features == 6 and ds.n_classes == 2 and len(ds) == 4


def test_rows_of_finds_positions_of_shuffled_ids():
    ids = np.array([40, 10, 30, 0, 20, 50])
    ds = small(ids=ids)
    query = np.array([20, 40, 0, 50])
    rows = ds.rows_of(query)
    np.testing.assert_array_equal(rows, [4, 0, 3, 5])
    np.testing.assert_array_equal(ds.ids[rows], query)


def test_rows_of_unknown_ids_raise_naming_them():
    ds = small(ids=[40, 10, 30, 0, 20, 50])
    with pytest.raises(ExpungeError) as e:
        ds.rows_of([10, 999, 31])
    message = str(e.value)
    assert "2 id(s)" in message and "999" in message and "31" in message


def test_rows_of_id_beyond_largest_raises():
    ds = small(ids=[0, 1, 2, 3, 4, 5])
    with pytest.raises(ExpungeError, match=r"e\.g\. \[6\]"):
        ds.rows_of([6])


def test_concat_with_wrong_feature_count_raises():
    a, b = small(d=3), small(d=4, ids=np.arange(100, 106))
    with pytest.raises(ExpungeError, match="4 features"):
        a.concat(b)


def test_concat_appends_rows():
    a, b = small(n=4), small(n=2, ids=[10, 11])
    both = a.concat(b)
    assert len(both) == 6
    np.testing.assert_array_equal(both.ids, [0, 1, 2, 3, 10, 11])
    np.testing.assert_array_equal(both.X[4:], b.X)


def test_fingerprint_equal_for_equal_data():
    a = small()
    b = IndexedDataset(a.X.copy(), a.y.copy(), a.ids.copy(), "another name")
    assert a.fingerprint() == b.fingerprint()


def test_fingerprint_changes_with_one_value():
    a = small()
    X = a.X.copy()
    X[2, 1] += 0.001
    assert IndexedDataset(X, a.y, a.ids).fingerprint() != a.fingerprint()


def test_fingerprint_changes_with_one_label():
    a = small()
    y = a.y.copy()
    y[0] = (y[0] + 1) % 3
    assert IndexedDataset(a.X, y, a.ids).fingerprint() != a.fingerprint()


def test_fingerprint_changes_with_one_id():
    a = small()
    ids = a.ids.copy()
    ids[-1] = 1000
    assert IndexedDataset(a.X, a.y, ids).fingerprint() != a.fingerprint()


# ----------------------------------------------------------------------------- digits


def test_digits_split_and_scaling():
    train, test = load_dataset("digits")
    assert len(train) == 1437 and len(test) == 360
    assert train.n_features == 64 and test.n_features == 64
    for ds in (train, test):
        assert ds.X.min() >= 0.0 and ds.X.max() <= 1.0
    assert train.X.max() == 1.0  # scaled by 16, not left in 0..16
    assert not set(train.ids) & set(test.ids)
    assert set(train.ids) | set(test.ids) == set(range(1797))
    assert set(np.unique(train.y)) == set(range(10))


def test_digits_is_deterministic():
    a, _ = load_dataset("digits")
    b, _ = load_dataset("digits")
    assert a.fingerprint() == b.fingerprint()


# ----------------------------------------------------------------------------- .npz


def test_npz_with_train_and_test_uint8_is_scaled(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (20, 4, 4), dtype=np.uint8)
    x_train[0, 0, 0] = 255
    x_test = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    y_train, y_test = rng.integers(0, 10, 20), rng.integers(0, 10, 5)
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    train, test = load_dataset(str(path))
    assert train.X.shape == (20, 16) and test.X.shape == (5, 16)
    np.testing.assert_allclose(train.X, x_train.reshape(20, -1) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(test.X, x_test.reshape(5, -1) / 255.0, rtol=1e-6)
    assert train.X.max() == 1.0
    np.testing.assert_array_equal(train.y, y_train)
    np.testing.assert_array_equal(train.ids, np.arange(20))


def test_folder_holding_mnist_npz_loads(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((3, 2, 2), np.uint8), y_train=np.array([0, 1, 2]))
    train, test = load_dataset(str(tmp_path))
    assert len(train) == 3 and test is None


def test_npz_with_X_y_ids(tmp_path):
    X = np.arange(12, dtype=np.float64).reshape(4, 3)
    path = tmp_path / "rows.npz"
    np.savez(path, X=X, y=np.array([0, 1, 1, 0]), ids=np.array([7, 3, 9, 1]))
    train, test = load_dataset(str(path))
    assert test is None
    np.testing.assert_array_equal(train.ids, [7, 3, 9, 1])
    np.testing.assert_allclose(train.X, X)  # float features are not rescaled


def test_npz_with_unexpected_keys_raises(tmp_path):
    path = tmp_path / "odd.npz"
    np.savez(path, features=np.zeros((2, 2)))
    with pytest.raises(ExpungeError, match="features"):
        load_dataset(str(path))


def test_npz_with_string_labels_is_refused_or_encoded(tmp_path):
    path = tmp_path / "labels.npz"
    np.savez(path, X=np.zeros((3, 2)), y=np.array(["cat", "dog", "cat"]))
    with pytest.raises(ExpungeError, match="text such as 'cat'.*--encode-labels"):
        load_dataset(str(path))
    train, _ = load_dataset(str(path), ReadOptions(encode_labels=True))
    np.testing.assert_array_equal(train.y, [0, 1, 0])
    assert train.read_spec == {"format": "npz", "classes": ["cat", "dog"], "notes": train.read_spec["notes"]}
    again, _ = load_dataset(str(path), read_spec=train.read_spec)
    assert again.fingerprint() == train.fingerprint()


def test_npz_float_labels_are_refused_not_truncated(tmp_path):
    path = tmp_path / "floats.npz"
    np.savez(path, X=np.zeros((3, 2)), y=np.array([0.0, 1.5, 2.0]))
    with pytest.raises(ExpungeError, match=r"labels in y include non-integer values such as 1\.5 at position 1"):
        load_dataset(str(path))
    np.savez(path, X=np.zeros((3, 2)), y=np.array([0.0, 1.0, 2.0]))  # integral floats are integers
    np.testing.assert_array_equal(load_dataset(str(path))[0].y, [0, 1, 2])


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def pickled(path):
    import pickle

    path.write_bytes(pickle.dumps({"X": [[0.0]], "y": [0]}))
    return path


def bare_npy(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    return path


def broken_zip(path):
    path.write_bytes(b"PK\x03\x04 broken")
    return path


MALFORMED_NPZ = {
    "missing keys": (lambda p: save_npz(p, X=np.zeros((2, 2))), "expected x_train/y_train or X/y"),
    "x_test without y_test": (lambda p: save_npz(p, x_train=np.zeros((2, 2)), y_train=np.zeros(2, int),
                                                 x_test=np.zeros((1, 2))), "x_test without its partner"),
    "1-D features": (lambda p: save_npz(p, X=np.zeros(4), y=np.zeros(4, int)), "needs a row per sample"),
    "2-D labels": (lambda p: save_npz(p, X=np.zeros((4, 2)), y=np.zeros((4, 1), int)), "must be a 1-D array"),
    "object array": (lambda p: save_npz(p, X=np.array([[0.0], [1.0]], dtype=object), y=np.zeros(2, int)),
                     "holds Python objects"),
    "mismatched lengths": (lambda p: save_npz(p, X=np.zeros((4, 2)), y=np.zeros(3, int)), "has 4 rows"),
    "mismatched ids": (lambda p: save_npz(p, X=np.zeros((4, 2)), y=np.zeros(4, int), ids=np.arange(5)), "ids has shape"),
    "NaN features": (lambda p: save_npz(p, X=np.array([[0.0], [np.nan]]), y=np.zeros(2, int)), "NaN or infinity"),
    "text features": (lambda p: save_npz(p, X=np.array([["a"], ["b"]]), y=np.zeros(2, int)), "must be numbers"),
    "NaN labels": (lambda p: save_npz(p, X=np.zeros((2, 1)), y=np.array([0.0, np.nan])), "non-integer values such as nan"),
    "float ids": (lambda p: save_npz(p, X=np.zeros((2, 1)), y=np.zeros(2, int), ids=np.array([0.5, 1.0])),
                  "ids in ids include non-integer values such as 0.5"),
    "pickled content": (pickled, "unpickle"),
    "not an archive": (broken_zip, "not a readable .npz archive"),
    "a bare .npy": (bare_npy, "one bare array"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_NPZ))
def test_malformed_npz_is_a_clear_error(tmp_path, case):
    make, words = MALFORMED_NPZ[case]
    path = make(tmp_path / "bad.npz")
    with pytest.raises(ExpungeError, match=words):
        load_dataset(str(path))


@pytest.mark.parametrize("case", ["object array", "pickled content", "2-D labels", "float ids", "not an archive"])
def test_malformed_npz_rows_are_a_clear_error(tmp_path, case):
    make, words = MALFORMED_NPZ[case]
    with pytest.raises(ExpungeError, match=words):
        load_rows(make(tmp_path / "rows.npz"))


def test_the_pickled_npz_is_never_unpickled(tmp_path, monkeypatch):
    import pickle

    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(ExpungeError):
        load_dataset(str(pickled(tmp_path / "evil.npz")))


# ----------------------------------------------------------------------------- IndexedDataset labels and ids


@pytest.mark.parametrize("y, ids, words", [([0, 1.5], [0, 1], "labels include non-integer"),
                                           ([0, 1], [0, 2.5], "ids include non-integer"),
                                           (["a", "b"], [0, 1], "labels hold text")])
def test_indexed_dataset_never_truncates_labels_or_ids(y, ids, words):
    with pytest.raises(ExpungeError, match=words):
        IndexedDataset(np.zeros((2, 1)), np.array(y), np.array(ids))


# ----------------------------------------------------------------------------- .csv


def test_csv_with_header_and_id_column(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,ID,b,label\n0.5,10,1.5,1\n2.5,11,3.5,0\n4.5,12,5.5,2\n")
    train, test = load_dataset(str(path))
    assert test is None
    np.testing.assert_array_equal(train.ids, [10, 11, 12])
    np.testing.assert_allclose(train.X, [[0.5, 1.5], [2.5, 3.5], [4.5, 5.5]])
    np.testing.assert_array_equal(train.y, [1, 0, 2])


def test_csv_without_header(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("0.1,0.2,1\n0.3,0.4,0\n")
    train, _ = load_dataset(str(path))
    np.testing.assert_allclose(train.X, [[0.1, 0.2], [0.3, 0.4]], rtol=1e-6)
    np.testing.assert_array_equal(train.y, [1, 0])
    np.testing.assert_array_equal(train.ids, [0, 1])  # row numbers when there is no id column


def test_csv_with_text_cell_raises(tmp_path):
    path = tmp_path / "text.csv"
    path.write_text("x,label\n0.1,1\nred,0\n")
    with pytest.raises(ExpungeError, match="number"):
        load_dataset(str(path))


def test_empty_csv_raises(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(ExpungeError, match="empty"):
        load_dataset(str(path))


# ----------------------------------------------------------------------------- IDX


def write_idx(path, array, gz):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_loads(tmp_path, gz):
    rng = np.random.default_rng(2)
    folder = tmp_path / "fashion"
    folder.mkdir()
    suffix = ".gz" if gz else ""
    train_images = rng.integers(0, 256, (12, 5, 4), dtype=np.uint8)
    train_labels = rng.integers(0, 10, 12).astype(np.uint8)
    test_images = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    test_labels = rng.integers(0, 10, 3).astype(np.uint8)
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", train_images, gz)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", train_labels, gz)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", test_images, gz)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", test_labels, gz)
    train, test = load_dataset(str(folder))
    assert train.X.shape == (12, 20) and test.X.shape == (3, 20)
    np.testing.assert_allclose(train.X, train_images.reshape(12, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(train.y, train_labels)
    np.testing.assert_array_equal(test.y, test_labels)


def test_idx_folder_without_train_files_raises(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 2, 2), np.uint8), False)
    with pytest.raises(ExpungeError, match="train"):
        load_dataset(str(tmp_path))


# ----------------------------------------------------------------------------- load_rows


def test_load_rows_csv_without_id_column(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("0.1,0.2,3\n0.4,0.5,1\n")
    rows = load_rows(path)
    assert rows.ids is None
    np.testing.assert_allclose(rows.X, [[0.1, 0.2], [0.4, 0.5]])
    np.testing.assert_array_equal(rows.y, [3, 1])


def test_load_rows_npz_with_ids(tmp_path):
    path = tmp_path / "rows.npz"
    np.savez(path, X=np.ones((2, 3)), y=np.array([1, 2]), ids=np.array([100, 101]))
    rows = load_rows(path)
    assert rows.X.shape == (2, 3)
    np.testing.assert_array_equal(rows.y, [1, 2])
    np.testing.assert_array_equal(rows.ids, [100, 101])


def test_load_rows_npz_without_X_raises(tmp_path):
    path = tmp_path / "rows.npz"
    np.savez(path, y=np.array([1, 2]))
    with pytest.raises(ExpungeError, match="X and y"):
        load_rows(path)


def test_load_rows_unknown_suffix_raises(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_text("1,2,3\n")
    with pytest.raises(ExpungeError, match="expected .npz or a delimited text table"):
        load_rows(path)


# ----------------------------------------------------------------------------- load_ids


def test_load_ids_commas_newlines_and_comments(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# requests from March\n3, 5,7\n11   # the last one\n\n  13\n#99\n")
    np.testing.assert_array_equal(load_ids(path), [3, 5, 7, 11, 13])
    assert load_ids(path).dtype == np.int64


@pytest.mark.parametrize("token", ["1.5", "abc", "0x10"])
def test_load_ids_non_integers_raise(tmp_path, token):
    path = tmp_path / "ids.txt"
    path.write_text(f"1, 2\n{token}\n")
    with pytest.raises(ExpungeError, match="integers"):
        load_ids(path)


# ----------------------------------------------------------------------------- missing files


def test_missing_dataset_raises(tmp_path):
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(ExpungeError, match="not found") as e:
        load_dataset(str(missing))
    assert "nowhere.npz" in str(e.value)


def test_missing_rows_file_raises(tmp_path):
    with pytest.raises(ExpungeError, match="rows file .*not found"):
        load_rows(tmp_path / "rows.csv")


def test_missing_ids_file_raises(tmp_path):
    with pytest.raises(ExpungeError, match="ids file .*not found"):
        load_ids(tmp_path / "ids.txt")


def test_unsupported_extension_raises(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ExpungeError, match="expected .npz, a delimited text table"):
        load_dataset(str(path))


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_learnable():
    train, test = load_dataset("synthetic")
    assert len(train) == 20_000 and len(test) == 5_000 and train.n_features == 200 and train.n_classes == 10
    assert not set(train.ids) & set(test.ids)
    again, _ = load_dataset("synthetic")
    assert again.fingerprint() == train.fingerprint()
    counts = np.bincount(train.y, minlength=10)
    assert counts.min() > 0.02 * len(train)  # every class occurs


def test_make_synthetic_sizes():
    train, test = make_synthetic(n_train=30, n_test=10, n_features=4, n_classes=3, seed=1)
    assert train.X.shape == (30, 4) and test.X.shape == (10, 4) and set(train.y) <= {0, 1, 2}
    np.testing.assert_array_equal(test.ids, np.arange(30, 40))
