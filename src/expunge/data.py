"""IndexedDataset: features, labels and stable ids, plus loaders for the formats users bring.

Ids are what deletion requests name, so they must survive reordering and additions: a row keeps
its id for the life of a run. Loaders return ``(train, test)``; ``test`` may be ``None``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ExpungeError


@dataclass(frozen=True)
class IndexedDataset:
    """Rows of features ``X`` (float32), integer labels ``y`` and unique int64 ``ids``."""

    X: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    name: str = "data"

    def __post_init__(self):
        X = np.ascontiguousarray(self.X, dtype=np.float32)
        if X.ndim == 1:
            X = X[:, None]
        if X.ndim != 2:
            X = X.reshape(len(X), -1)
        y = np.ascontiguousarray(self.y).astype(np.int64)
        ids = np.ascontiguousarray(self.ids).astype(np.int64)
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
    def from_arrays(cls, X, y, ids=None, name: str = "data") -> "IndexedDataset":
        ids = np.arange(len(y), dtype=np.int64) if ids is None else ids
        return cls(np.asarray(X), np.asarray(y), np.asarray(ids), name)

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


def load_dataset(spec: str) -> tuple[IndexedDataset, IndexedDataset | None]:
    """Load a dataset by spec.

    - ``digits``: scikit-learn's bundled 8x8 digits (1797 rows), features scaled to [0, 1],
      a fixed 80/20 train/test split.
    - ``PATH.npz`` (or a folder holding ``mnist.npz``): arrays ``x_train``/``y_train``
      (and ``x_test``/``y_test``) or ``X``/``y`` (and optional ``ids``); uint8 images scaled to [0, 1].
    - ``PATH.csv``: numeric CSV, label in the last column; a header row and an ``id`` column are
      recognised.
    - ``PATH`` of IDX files (``*-images-idx3-ubyte[.gz]``): MNIST-format folders such as
      Fashion-MNIST's.
    - ``PATH/location`` (or its ``bangkok`` file): the Location check-in dataset of Shokri et al.
      (label 1..30 first, 446 binary features), a fixed 80/20 train/test split.
    """
    if spec == "digits":
        return _load_digits()
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "mnist.npz").exists():
            path = path / "mnist.npz"
        elif any(path.glob("*idx3-ubyte*")):
            return _load_idx_folder(path)
    if path.is_dir() and (path / "bangkok").exists():
        path = path / "bangkok"
    if not path.exists():
        raise ExpungeError(
            f"dataset {spec!r} not found; give 'digits', an .npz or .csv file, or a folder of IDX files"
        )
    if path.name == "bangkok":
        return _load_location(path)
    if path.suffix == ".npz":
        return _load_npz(path)
    if path.suffix == ".csv":
        return load_csv(path), None
    raise ExpungeError(f"cannot read {path.name}: expected .npz or .csv (or a folder of IDX files)")


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


def _load_npz(path: Path):
    with np.load(path) as z:
        keys = set(z.files)
        name = path.stem
        if {"x_train", "y_train"} <= keys:
            train = IndexedDataset.from_arrays(_scaled(z["x_train"]), z["y_train"], name=name)
            test = None
            if {"x_test", "y_test"} <= keys:
                test = IndexedDataset.from_arrays(_scaled(z["x_test"]), z["y_test"], name=f"{name}-test")
            return train, test
        if {"X", "y"} <= keys:
            ids = z["ids"] if "ids" in keys else None
            return IndexedDataset.from_arrays(_scaled(z["X"]), z["y"], ids, name=name), None
    raise ExpungeError(f"{path} holds {sorted(keys)}; expected x_train/y_train or X/y (optional ids)")


def read_csv(path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Numeric CSV, label last; an optional header, and an ``id`` column if the header names one.
    Returns ``(X, y, ids)`` with ``ids=None`` when the file has no id column."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows:
        raise ExpungeError(f"{path} is empty")
    header = None
    try:
        [float(v) for v in rows[0]]
    except ValueError:
        header, rows = [c.strip().lower() for c in rows[0]], rows[1:]
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError as e:
        raise ExpungeError(f"{path}: every cell must be a number ({e}); encode categories first") from e
    if table.ndim != 2 or table.shape[1] < 2:
        raise ExpungeError(f"{path}: need at least one feature column and a label column")
    ids = None
    if header and "id" in header:
        col = header.index("id")
        ids = table[:, col].astype(np.int64)
        table = np.delete(table, col, axis=1)
    return table[:, :-1], table[:, -1].astype(np.int64), ids


def load_csv(path, name: str | None = None) -> IndexedDataset:
    X, y, ids = read_csv(path)
    return IndexedDataset.from_arrays(X, y, ids, name or Path(path).stem)


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


def load_rows(path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rows to add: a .csv (label last, optional id column) or an .npz with X, y (and ids).
    Returns ``(X, y, ids)``; ``ids=None`` lets the run assign fresh ids."""
    path = Path(path)
    if not path.exists():
        raise ExpungeError(f"rows file {path} not found")
    if path.suffix == ".csv":
        return read_csv(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            if not {"X", "y"} <= set(z.files):
                raise ExpungeError(f"{path} must hold arrays X and y (and optionally ids)")
            return _scaled(z["X"]), z["y"], (z["ids"] if "ids" in z.files else None)
    raise ExpungeError(f"cannot read rows from {path.name}: expected .csv or .npz")


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
        ds = IndexedDataset(ds.X[keep], np.array([relabel[v] for v in ds.y[keep]]), ds.ids[keep], ds.name)
    if l2_normalize:
        norms = np.linalg.norm(ds.X, axis=1, keepdims=True)
        ds = IndexedDataset(ds.X / np.maximum(norms, 1e-12), ds.y, ds.ids, ds.name)
    return ds
