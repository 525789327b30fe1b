"""IndexedDataset: features, labels and stable ids, plus loaders for the formats users bring.

Ids are what deletion requests name, so they must survive reordering and additions: a row keeps
its id for the life of a run. Loaders return ``(train, test)``; ``test`` may be ``None``. Labels and
ids must be integers: a float label or id is refused, never truncated. Text tables are read by
tables.py; the spec a training table is read with travels on the dataset (``read_spec``) so that a
run records it and reads its source back the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ExpungeError
from .tables import (SUFFIXES, ReadOptions, Table, apply_classes, class_note, fit_classes, integer_values,
                     read_table)

LABEL_HINT = "labels must be integers 0..K-1 (or map them with --encode-labels)"


@dataclass(frozen=True)
class IndexedDataset:
    """Rows of features ``X`` (float32), integer labels ``y`` and unique int64 ``ids``.

    ``read_spec`` is how the rows were read from their source (None: nothing to record), a JSON-able
    dict a run keeps in its manifest; it is not part of the fingerprint."""

    X: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    name: str = "data"
    read_spec: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        try:
            X = np.ascontiguousarray(self.X, dtype=np.float32)
        except (ValueError, TypeError) as e:
            raise ExpungeError(f"{self.name}: features must be numbers ({e})") from None
        if X.ndim == 1:
            X = X[:, None]
        if X.ndim != 2:
            X = X.reshape(len(X), -1)
        y = integer_values(np.ravel(self.y), f"{self.name}: the labels", LABEL_HINT)
        ids = integer_values(np.ravel(self.ids), f"{self.name}: the ids", "ids must be integers")
        if not (len(X) == len(y) == len(ids)):
            raise ExpungeError(
                f"{self.name}: X has {len(X)} rows, y {len(y)} and ids {len(ids)}; they must match"
            )
        if len(np.unique(ids)) != len(ids):
            raise ExpungeError(f"{self.name}: ids must be unique; found duplicates")
        if not np.isfinite(X).all():
            raise ExpungeError(f"{self.name}: features contain NaN or infinity; clean or impute them first")
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "ids", ids)

    @classmethod
    def from_arrays(cls, X, y, ids=None, name: str = "data", read_spec: dict | None = None) -> "IndexedDataset":
        ids = np.arange(len(y), dtype=np.int64) if ids is None else ids
        return cls(np.asarray(X), np.asarray(y), np.asarray(ids), name, read_spec)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    @property
    def n_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0

    def rows_of(self, ids) -> np.ndarray:
        """Row positions of ``ids``; unknown ids raise an error that lists a few of them."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
        known = sorted_ids[pos] == ids if len(sorted_ids) else np.zeros(len(ids), bool)
        if not known.all():
            missing = ids[~known]
            raise ExpungeError(
                f"{len(missing)} id(s) are not in {self.name}, e.g. {missing[:5].tolist()}; "
                "ids must come from the dataset's id column (row numbers when it has none)"
            )
        rows = order[pos]
        return rows

    def take(self, rows) -> "IndexedDataset":
        rows = np.asarray(rows)
        return IndexedDataset(self.X[rows], self.y[rows], self.ids[rows], self.name)

    def concat(self, other: "IndexedDataset") -> "IndexedDataset":
        if other.n_features != self.n_features:
            raise ExpungeError(
                f"new rows have {other.n_features} features but {self.name} has {self.n_features}; "
                "add rows with the same columns, in the same order"
            )
        return IndexedDataset(
            np.concatenate([self.X, other.X]),
            np.concatenate([self.y, other.y]),
            np.concatenate([self.ids, other.ids]),
            self.name,
            self.read_spec,
        )

    def fingerprint(self) -> str:
        """Content hash of features, labels and ids: tells one dataset from another."""
        h = hashlib.sha256()
        h.update(np.asarray(self.X.shape, np.int64).tobytes())
        h.update(self.X.tobytes())
        h.update(self.y.tobytes())
        h.update(self.ids.tobytes())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------- loaders


def load_dataset(spec: str, options: ReadOptions | None = None,
                 read_spec: dict | None = None) -> tuple[IndexedDataset, IndexedDataset | None]:
    """Load a dataset by spec.

    - ``digits``: scikit-learn's bundled 8x8 digits (1797 rows), features scaled to [0, 1],
      a fixed 80/20 train/test split.
    - ``synthetic``: a generated multinomial logistic-regression problem (``make_synthetic``'s
      defaults: 20,000 training and 5,000 test rows, 200 features, 10 classes), the same every time.
    - ``PATH.npz`` (or a folder holding ``mnist.npz``): numeric arrays ``x_train``/``y_train``
      (and ``x_test``/``y_test``) or ``X``/``y`` (and optional ``ids``); uint8 images scaled to [0, 1].
      Pickled content is never loaded.
    - a text table (``.csv``, ``.tsv``, ``.txt``, ``.data``, ...): comma-, tab- or semicolon-separated,
      read by tables.py with ``options`` (delimiter, header, label and id columns, label and category
      encoding, missing values, a held-out ``test`` table read the same way). By default the label is
      the last column, ids are row numbers unless a header names an ``id`` column, and the delimiter and
      header are inferred from the content; what was inferred is listed in ``train.read_spec["notes"]``.
    - ``PATH`` of IDX files (``*-images-idx3-ubyte[.gz]``): MNIST-format folders such as
      Fashion-MNIST's.
    - ``PATH/location`` (or its ``bangkok`` file): the Location check-in dataset of Shokri et al.
      (label 1..30 first, 446 binary features), a fixed 80/20 train/test split.

    ``read_spec`` is the spec of an earlier read (``train.read_spec``, as a run records it): it is
    applied as it stands, nothing is refitted, so the same file gives the same rows.
    """
    options = options or ReadOptions()
    if read_spec is not None and not options.is_default():
        raise ExpungeError("give reading options or a recorded read spec, not both")
    if spec == "digits":
        _refuse_options(options, "digits")
        return _load_digits()
    if spec == "synthetic":
        _refuse_options(options, "synthetic")
        return make_synthetic()
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "mnist.npz").exists():
            path = path / "mnist.npz"
        elif any(path.glob("*idx3-ubyte*")):
            _refuse_options(options, f"{path} (a folder of IDX files)")
            return _load_idx_folder(path)
    if path.is_dir() and (path / "bangkok").exists():
        path = path / "bangkok"
    if not path.exists():
        raise ExpungeError(
            f"dataset {spec!r} not found; give 'digits', an .npz file, a text table, or a folder of IDX files"
        )
    if path.name == "bangkok":
        _refuse_options(options, f"{path} (the Location dataset)")
        return _load_location(path)
    if path.suffix == ".npz":
        return _load_npz(path, options, read_spec)
    if path.suffix.lower() in SUFFIXES:
        return _load_table(path, options, read_spec)
    raise ExpungeError(f"cannot read {path.name}: expected .npz, a delimited text table ({', '.join(SUFFIXES)}) "
                       "or a folder of IDX files")


def _refuse_options(options: ReadOptions, what: str, allowed=()) -> None:
    """Reading options that do not apply to a format are an error, not ignored."""
    flags = {"test": "--test-data", "header": "--header/--no-header"}
    default = ReadOptions()
    given = [flags.get(k, "--" + k.replace("_", "-")) for k in ReadOptions.__dataclass_fields__
             if k not in allowed and getattr(options, k) != getattr(default, k)]
    if given:
        raise ExpungeError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to text tables, and {what} "
                           "is not one; drop it")


def _load_digits():
    from sklearn.datasets import load_digits

    bundle = load_digits()
    X = bundle.data.astype(np.float32) / 16.0
    y = bundle.target
    order = np.random.default_rng(0).permutation(len(y))
    n_train = int(0.8 * len(y))
    tr, te = np.sort(order[:n_train]), np.sort(order[n_train:])
    return (
        IndexedDataset(X[tr], y[tr], tr, "digits"),
        IndexedDataset(X[te], y[te], te, "digits-test"),
    )


def make_synthetic(n_train: int = 20_000, n_test: int = 5_000, n_features: int = 200, n_classes: int = 10,
                   seed: int = 0) -> tuple[IndexedDataset, IndexedDataset]:
    """A multinomial logistic-regression problem: Gaussian features, labels drawn from the softmax of a
    random linear model (so the Bayes accuracy is below 100%). Deterministic for a seed; ids are row
    numbers, the test rows numbered after the training rows."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    X = rng.standard_normal((n, n_features))
    W = rng.standard_normal((n_features, n_classes)) * (5.0 / np.sqrt(n_features))
    y = (X @ W + rng.gumbel(size=(n, n_classes))).argmax(axis=1)  # Gumbel-max: a sample of softmax(X W)
    ids = np.arange(n)
    return (IndexedDataset(X[:n_train], y[:n_train], ids[:n_train], "synthetic"),
            IndexedDataset(X[n_train:], y[n_train:], ids[n_train:], "synthetic-test"))


def _load_location(path: Path):
    table = np.loadtxt(path, delimiter=",", converters={0: lambda v: float(str(v).strip('"'))}, dtype=np.float32)
    X, y = table[:, 1:], table[:, 0].astype(np.int64) - 1
    order = np.random.default_rng(0).permutation(len(y))
    n_train = int(0.8 * len(y))
    tr, te = np.sort(order[:n_train]), np.sort(order[n_train:])
    return (IndexedDataset(X[tr], y[tr], tr, "location"), IndexedDataset(X[te], y[te], te, "location-test"))


def _scaled(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def _load_table(path: Path, options: ReadOptions, read_spec: dict | None):
    if read_spec is not None and read_spec.get("format") != "table":
        raise ExpungeError(f"{path} is a text table, but the run was trained on a {read_spec.get('format')} file")
    table = read_table(path, None if read_spec else options, spec=read_spec)
    spec = table.spec
    train = IndexedDataset.from_arrays(table.X, table.y, table.ids, path.stem, spec)
    test = None
    if spec.get("test"):
        held_out = Path(spec["test"])
        if not held_out.is_file():
            raise ExpungeError(f"the held-out table {held_out} is not found; restore it (or open the run with "
                               "--data TRAINING_TABLE, which leaves the test split out)")
        read = read_table(held_out, spec=spec)
        if read_spec is None:
            spec["notes"] = spec["notes"] + read.notes
        test = IndexedDataset.from_arrays(read.X, read.y, read.ids, f"{path.stem}-test")
    return train, test


def _open_npz(path: Path):
    """The archive, opened without pickle (unpickling can run code)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError:
        raise ExpungeError(f"{path} is not an .npz archive of arrays (numpy would have to unpickle it, which "
                           "expunge never does: it can run code); save arrays with numpy.savez") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ExpungeError(f"{path} is not a readable .npz archive ({e}); save arrays with numpy.savez") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ExpungeError(f"{path} holds one bare array, not an .npz archive of named arrays; save X and y "
                           "(or x_train and y_train) with numpy.savez")
    return archive


def _npz_array(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError:
        raise ExpungeError(f"{path}: array {key!r} holds Python objects, which would have to be unpickled (expunge "
                           "never does: it can run code); save it as a numeric array") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ExpungeError(f"{path}: array {key!r} is damaged ({e})") from None


def _npz_rows(path: Path, archive, x_key: str, y_key: str, ids_key: str | None, name: str,
              classes: list | None) -> IndexedDataset:
    """One split of an archive, checked: numeric features, one label per row, integer labels and ids."""
    X, y = _npz_array(archive, x_key, path), _npz_array(archive, y_key, path)
    ids = _npz_array(archive, ids_key, path) if ids_key else None
    if X.dtype.kind not in "biuf":
        raise ExpungeError(f"{path}: {x_key} has dtype {X.dtype}; features must be numbers")
    if X.ndim < 2:
        raise ExpungeError(f"{path}: {x_key} has shape {X.shape}; it needs a row per sample (rows x features)")
    for key, values in ((y_key, y), (ids_key, ids)):
        if values is not None and values.shape != (len(X),):
            raise ExpungeError(f"{path}: {key} has shape {values.shape}, but {x_key} has {len(X)} rows; "
                               f"{key} must be a 1-D array with one value per row")
    X = _scaled(X)
    bad = ~np.isfinite(X)
    if bad.any():
        raise ExpungeError(f"{path}: {x_key} contains NaN or infinity (row {int(np.argwhere(bad)[0][0])}); clean or "
                           "impute them first")
    y = labels_of(y, f"{path}: the labels in {y_key}", classes)
    if ids is not None:
        ids = integer_values(ids, f"{path}: the ids in {ids_key}", "ids must be integers")
    return IndexedDataset.from_arrays(X, y, ids, name)


def labels_of(values, what: str, classes: list | None) -> np.ndarray:
    """Labels as int64: mapped by recorded ``classes``, else integers 0..K-1 as they are."""
    if classes is not None:
        return apply_classes(values, classes, what)
    y = integer_values(values, what, LABEL_HINT)
    if len(y) and y.min() < 0:
        raise ExpungeError(f"{what} include negative values such as {int(y.min())}; {LABEL_HINT}")
    return y


def _load_npz(path: Path, options: ReadOptions, read_spec: dict | None):
    _refuse_options(options, f"{path} (an .npz archive)", allowed=("encode_labels",))
    with _open_npz(path) as archive:
        keys, name = set(archive.files), path.stem
        if {"x_train", "y_train"} <= keys:
            splits = [("x_train", "y_train", None, name)]
            if ("x_test" in keys) != ("y_test" in keys):
                raise ExpungeError(f"{path} holds {'x_test' if 'x_test' in keys else 'y_test'} without its partner; "
                                   "give both x_test and y_test, or neither")
            if "x_test" in keys:
                splits.append(("x_test", "y_test", None, f"{name}-test"))
        elif {"X", "y"} <= keys:
            splits = [("X", "y", "ids" if "ids" in keys else None, name)]
        else:
            raise ExpungeError(f"{path} holds {sorted(keys)}; expected x_train/y_train or X/y (optional ids)")
        classes = (read_spec or {}).get("classes")
        if options.encode_labels:
            classes = fit_classes(_npz_array(archive, splits[0][1], path).ravel())
        sets = [_npz_rows(path, archive, *split, classes=classes) for split in splits]
    if options.encode_labels:
        spec = {"format": "npz", "classes": classes, "notes": [class_note(classes)]}
        sets[0] = IndexedDataset(sets[0].X, sets[0].y, sets[0].ids, sets[0].name, spec)
    elif read_spec is not None:
        sets[0] = IndexedDataset(sets[0].X, sets[0].y, sets[0].ids, sets[0].name, read_spec)
    return sets[0], (sets[1] if len(sets) > 1 else None)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise ExpungeError(f"{path}: only unsigned-byte IDX files are supported")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_idx_folder(folder: Path):
    def find(prefix, kind):
        hits = sorted(folder.glob(f"{prefix}*{kind}-idx*-ubyte*"))
        return hits[0] if hits else None

    splits = {}
    for prefix in ("train", "t10k"):
        img, lab = find(prefix, "images"), find(prefix, "labels")
        if img is not None and lab is not None:
            splits[prefix] = (_scaled(_read_idx(img)), _read_idx(lab))
    if "train" not in splits:
        raise ExpungeError(f"{folder}: no train-images/train-labels IDX files found")
    train = IndexedDataset.from_arrays(*splits["train"], name=folder.name)
    test = IndexedDataset.from_arrays(*splits["t10k"], name=f"{folder.name}-test") if "t10k" in splits else None
    return train, test


def load_rows(path, read_spec: dict | None = None, options: ReadOptions | None = None) -> Table:
    """Rows to add, read as the run read its training data: a text table with the run's recorded
    spec (same delimiter, header, columns and encoders), else a text table read with ``options``
    (label last by default), or an .npz with X, y (and ids). Labels are mapped with the run's
    classes when it encoded them. ``ids`` is None when the file names none: the run assigns fresh ones."""
    path = Path(path)
    options = options or ReadOptions()
    if not path.exists():
        raise ExpungeError(f"rows file {path} not found")
    recorded = read_spec if read_spec and read_spec.get("format") == "table" else None
    classes = (read_spec or {}).get("classes")
    if path.suffix == ".npz":
        _refuse_options(options, f"{path} (an .npz archive)")
        with _open_npz(path) as archive:
            keys = set(archive.files)
            if not {"X", "y"} <= keys:
                raise ExpungeError(f"{path} must hold arrays X and y (and optionally ids); it holds {sorted(keys)}")
            rows = _npz_rows(path, archive, "X", "y", "ids" if "ids" in keys else None, "new rows", classes)
        return Table(rows.X, rows.y, rows.ids if "ids" in keys else None, read_spec or {})
    if path.suffix.lower() not in SUFFIXES:
        raise ExpungeError(f"cannot read rows from {path.name}: expected .npz or a delimited text table "
                           f"({', '.join(SUFFIXES)})")
    if recorded:
        if not options.is_default():
            raise ExpungeError("this run reads new rows the way it read its training table (its recorded delimiter, "
                               "header, columns and encoders); drop the reading options")
        return read_table(path, spec=recorded, row_ids=False)
    if options.encode_labels or options.encode_categories or options.standardize or options.test:
        raise ExpungeError("encoders are fitted on training data only: new rows cannot be encoded on their own")
    return read_table(path, options, row_ids=False, classes=classes)


def load_ids(path) -> np.ndarray:
    """Ids to delete: whitespace- or comma-separated integers, one file (``#`` starts a comment)."""
    path = Path(path)
    if not path.exists():
        raise ExpungeError(f"ids file {path} not found")
    text = path.read_text()
    tokens = [t for line in text.splitlines() for t in line.split("#")[0].replace(",", " ").split()]
    try:
        return np.array([int(t) for t in tokens], dtype=np.int64)
    except (ValueError, OverflowError) as e:
        raise ExpungeError(f"{path}: ids must be integers ({e})") from e


def preprocess(ds: IndexedDataset, classes=None, l2_normalize: bool = False) -> IndexedDataset:
    """Keep only ``classes`` (relabelled 0..k-1 in the order given, e.g. [3, 8] for 3 vs 8) and/or
    scale every row to unit L2 norm (what certified removal assumes). Ids are kept."""
    if classes:
        classes = [int(c) for c in classes]
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise ExpungeError(f"--classes needs at least two distinct labels, got {classes}")
        keep = np.isin(ds.y, classes)
        missing = sorted(set(classes) - set(ds.y[keep].tolist()))
        if missing:
            raise ExpungeError(f"{ds.name} has no rows with label(s) {missing}; --classes takes labels that occur")
        relabel = {c: i for i, c in enumerate(classes)}
        ds = IndexedDataset(ds.X[keep], np.array([relabel[v] for v in ds.y[keep]], dtype=np.int64), ds.ids[keep],
                            ds.name, ds.read_spec)
    if l2_normalize:
        norms = np.linalg.norm(ds.X, axis=1, keepdims=True)
        ds = IndexedDataset(ds.X / np.maximum(norms, 1e-12), ds.y, ds.ids, ds.name, ds.read_spec)
    return ds
