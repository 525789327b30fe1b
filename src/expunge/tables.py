"""Delimited text tables (comma-, tab- or semicolon-separated) read strictly into features, labels and ids.

Nothing is guessed silently. What the user leaves unsaid is inferred from the file's content by a stated rule,
and reported in ``Table.notes``:

- the delimiter is the one of comma, tab and semicolon that splits every line into the same number (at least
  two) of fields; when none or several do, the reader refuses and asks for ``delimiter``;
- the first row is a header when it holds only text and some column below it holds only numbers; a first row of
  text over text columns cannot be told apart from data, and the reader asks for ``header``;
- the label is the last column unless ``label_column`` names another; ids come from ``id_column``, else from a
  column a header names ``id`` (any case), else they are row numbers (0 for the first data row).

Labels and ids must be integers (``1.0`` is, ``0.5`` is not); ``encode_labels`` maps any labels to 0..K-1 in
sorted order instead. Text feature columns are refused unless ``encode_categories`` one-hot encodes them.
Missing cells (empty or ``?``) are refused, imputed (median of a numeric column, most frequent value of a text
column) or their rows dropped, as ``missing`` says. The encoders are scikit-learn's.

Reading a training table *fits* a spec: a JSON-able dict of the resolved format, the columns and the fitted
encoders. A run records it in its manifest; reading with it *applies* it (nothing is refitted), so re-opening the
run gives the same rows, and its test file and rows added later are encoded the same way.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ExpungeError

MISSING = ("", "?")
DELIMITERS = {",": "comma", "\t": "tab", ";": "semicolon"}
MISSING_POLICIES = ("refuse", "impute", "drop")
SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".data", ".dat", ".train", ".test")
_SNIFF_LINES = 1000
_EXACT_INT = 2**53  # beyond this a float no longer holds every integer


@dataclass(frozen=True)
class ReadOptions:
    """How to read a text table; ``None`` means: infer it by the rule in the module's docstring."""

    delimiter: str | None = None
    header: bool | None = None
    label_column: str | int | None = None  # a header name, or a 0-based index (negative counts from the end)
    id_column: str | int | None = None
    comment: str | None = None  # skip lines that start with this
    encode_labels: bool = False
    encode_categories: bool = False
    standardize: bool = False  # scale numeric feature columns to mean 0, variance 1 (fitted on the training table)
    missing: str = "refuse"
    strip_label_suffix: str | None = None  # e.g. '.': UCI Adult's test labels are '<=50K.' and '>50K.'
    test: str | None = None  # a held-out table read with the training table's spec

    def __post_init__(self):
        if self.delimiter is not None and len(self.delimiter) != 1:
            names = ", ".join(f"{name} {d!r}" for d, name in DELIMITERS.items())
            raise ExpungeError(f"--delimiter must be one character ({names}), got {self.delimiter!r}")
        if self.comment is not None and len(self.comment) != 1:
            raise ExpungeError(f"--comment must be one character, got {self.comment!r}")
        if self.missing not in MISSING_POLICIES:
            raise ExpungeError(f"--missing must be one of {', '.join(MISSING_POLICIES)}, got {self.missing!r}")

    def is_default(self) -> bool:
        return self == ReadOptions()


@dataclass
class Table:
    """Rows read from a table: float features, int64 labels, int64 ids (``None``: the file names none)."""

    X: np.ndarray
    y: np.ndarray
    ids: np.ndarray | None
    spec: dict
    notes: list[str] = field(default_factory=list)


def column_choice(text: str | None) -> str | int | None:
    """A command-line column choice: digits are an index, anything else a header name."""
    if text is None:
        return None
    return int(text) if re.fullmatch(r"-?\d+", text.strip()) else text


# ---------------------------------------------------------------------------------- reading


def read_table(path, options: ReadOptions | None = None, spec: dict | None = None, row_ids: bool = True,
               classes: list | None = None) -> Table:
    """Read a training table with ``options`` (fitting a spec), or any table with a recorded ``spec``.
    Without an id column the ids are the row numbers, unless ``row_ids`` is False (rows to add: the run
    gives them fresh ids). ``classes`` maps labels by classes recorded elsewhere instead of fitting them."""
    path = Path(path)
    fit = spec is None
    options = options or ReadOptions()
    if fit:
        spec = {"format": "table", "comment": options.comment, "missing": options.missing,
                "strip_label_suffix": options.strip_label_suffix,
                "test": str(Path(options.test).expanduser().resolve()) if options.test else None}
    notes: list[str] = []
    lines = _lines(path, spec["comment"])
    if fit:
        spec["delimiter"] = options.delimiter or _sniff(lines, path, notes)
    cells, linenos = _split(lines, spec["delimiter"], path)
    if fit:
        spec["header"] = options.header if options.header is not None else _detect_header(cells, linenos, path, notes)
        spec["n_columns"] = cells.shape[1]
    elif cells.shape[1] != spec["n_columns"]:
        raise ExpungeError(f"{path}: {cells.shape[1]} columns where the training table has {spec['n_columns']}; "
                           "give rows with the same columns, in the same order")
    names = None
    if spec["header"]:
        names, cells, linenos = [str(c) for c in cells[0]], cells[1:], linenos[1:]
        if fit:
            if len(set(names)) != len(names):
                raise ExpungeError(f"{path}: the header names a column twice ({_repeated(names)}); rename it")
            spec["columns"] = names
        elif spec.get("columns") and names != spec["columns"]:
            raise ExpungeError(f"{path}: the header {names} differs from the training table's {spec['columns']}; "
                               "give the same columns, in the same order")
    elif fit:
        spec["columns"] = None
    if len(cells) == 0:
        raise ExpungeError(f"{path} has no data rows")
    if fit:
        if cells.shape[1] < 2:
            raise ExpungeError(f"{path}: need at least one feature column and a label column")
        spec["label_column"], spec["id_column"] = _resolve_columns(options, names, cells.shape[1], path, notes)
        spec["features"] = [{"column": j} for j in range(cells.shape[1])
                            if j not in (spec["label_column"], spec["id_column"])]
        if not spec["features"]:
            raise ExpungeError(f"{path}: no feature columns are left besides the label and the id column")
        spec["classes"] = classes
    return _encode(path, cells, linenos, spec, options, fit, notes, row_ids)



def _lines(path: Path, comment: str | None) -> list[tuple[int, str]]:
    """(line number, text) of the lines that hold data: not blank, not comments."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ExpungeError(f"{path} is not UTF-8 text ({e}); give a delimited text table") from None
    kept = [(n, line) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not (comment and line.lstrip().startswith(comment))]
    if not kept:
        raise ExpungeError(f"{path} is empty")
    return kept


def _records(lines: list[tuple[int, str]], delimiter: str):
    """(line number, fields) of each record, parsed by the csv module (quotes respected)."""
    reader = csv.reader((text for _, text in lines), delimiter=delimiter)
    try:
        for fields in reader:
            yield lines[reader.line_num - 1][0], fields
    except csv.Error as e:
        raise ExpungeError(f"line {lines[reader.line_num - 1][0]}: {e}") from None


def _sniff(lines, path: Path, notes: list[str]) -> str:
    """The one delimiter of comma, tab and semicolon that splits every sampled line alike into >= 2 fields."""
    sample = lines[:_SNIFF_LINES]
    counts = {d: [(n, len(f)) for n, f in _records(sample, d)] for d in DELIMITERS}
    alike = [d for d, c in counts.items() if len({k for _, k in c}) == 1 and c[0][1] >= 2]
    if len(alike) == 1:
        d = alike[0]
        notes.append(f"delimiter: {DELIMITERS[d]} (inferred: the only one of comma, tab and semicolon that splits "
                     f"every line into the same number of fields, {counts[d][0][1]}; set it with --delimiter)")
        return d
    if len(alike) > 1:
        which = " and ".join(f"{DELIMITERS[d]} ({counts[d][0][1]} fields)" for d in alike)
        raise ExpungeError(f"{path}: {which} both split every line alike, so the delimiter is ambiguous; "
                           "set it with --delimiter")
    # none splits alike: point at the first line that breaks the most common split
    best, mode = None, 0
    for d, c in counts.items():
        values, freq = np.unique([k for _, k in c], return_counts=True)
        if values[freq.argmax()] >= 2 and freq.max() > mode:
            best, mode, width = d, freq.max(), int(values[freq.argmax()])
    if best is None:
        raise ExpungeError(f"{path}: no comma, tab or semicolon splits its lines into fields; give a delimited table "
                           "(or set the delimiter with --delimiter)")
    n, k = next((n, k) for n, k in counts[best] if k != width)
    text = dict(lines)[n]
    hint = (f"if it is a comment, skip such lines with --comment '{text.lstrip()[0]}'; "
            if text.lstrip()[:1] and not text.lstrip()[0].isalnum() else "")
    raise ExpungeError(f"{path}: line {n} has {k} field(s) where most lines split by {DELIMITERS[best]} have {width}: "
                       f"{text[:60]!r}; {hint}otherwise fix the line (or set --delimiter)")


def _split(lines, delimiter: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Cells (stripped of surrounding spaces) as a 2-D string array, and each row's line number."""
    rows, linenos, width = [], [], None
    for n, fields in _records(lines, delimiter):
        if width is None:
            width = len(fields)
        elif len(fields) != width:
            raise ExpungeError(f"{path}: line {n} has {len(fields)} field(s) where line {linenos[0]} has {width} "
                               f"(delimiter {DELIMITERS.get(delimiter, repr(delimiter))}); every row needs the same "
                               "columns")
        rows.append([c.strip() for c in fields])
        linenos.append(n)
    return np.array(rows, dtype=str).reshape(len(rows), width), np.array(linenos)


def _numbers(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells as float64 (NaN where a cell is not a number) and the mask of cells that are numbers."""
    try:
        return cells.astype(np.float64), np.ones(cells.shape, bool)
    except ValueError:
        pass
    distinct, inverse = np.unique(cells, return_inverse=True)  # text columns repeat a few values: parse each once
    values, ok = np.full(len(distinct), np.nan), np.zeros(len(distinct), bool)
    for i, cell in enumerate(distinct):
        try:
            values[i], ok[i] = float(cell), True
        except ValueError:
            pass
    return values[inverse].reshape(cells.shape), ok[inverse].reshape(cells.shape)


def _detect_header(cells: np.ndarray, linenos: np.ndarray, path: Path, notes: list[str]) -> bool:
    first, below = cells[0], cells[1:_SNIFF_LINES + 1]
    _, first_numeric = _numbers(first)
    if first_numeric.all():
        notes.append("header: none (inferred: the first row holds only numbers; set with --header/--no-header)")
        return False
    _, ok = _numbers(below)
    present = ~np.isin(below, MISSING)
    numeric_below = (ok | ~present).all(axis=0) & present.any(axis=0)
    topped = [j for j in range(len(first)) if numeric_below[j] and not first_numeric[j] and first[j] not in MISSING]
    if topped:
        mixed = [j for j in range(len(first)) if first_numeric[j] or first[j] in MISSING]
        if mixed:
            raise ExpungeError(f"{path}: line {linenos[0]} is neither a header nor a data row: column {topped[0]} holds "
                               f"{first[topped[0]]!r} above numbers, but column {mixed[0]} holds {first[mixed[0]]!r}; "
                               "fix the line, or say --header/--no-header")
        notes.append(f"header: line {linenos[0]} (inferred: it holds text above a column of numbers, "
                     f"{first[topped[0]]!r}; set with --header/--no-header)")
        return True
    if not numeric_below.any():
        raise ExpungeError(f"{path}: every column holds text, so whether line {linenos[0]} is a header cannot be told "
                           "from the content; say --header or --no-header")
    notes.append("header: none (inferred: the first row holds numbers where the rows below do and text where they do; "
                 "set with --header/--no-header)")
    return False


def _resolve_columns(options: ReadOptions, names, width: int, path: Path, notes: list[str]) -> tuple[int, int | None]:
    if options.label_column is None:
        label = width - 1
        notes.append(f"label: {_describe(label, names)}, the last (the default; choose another with --label-column)")
    else:
        label = _column_index(options.label_column, names, width, path, "--label-column")
    if options.id_column is not None:
        ids = _column_index(options.id_column, names, width, path, "--id-column")
    else:
        named = [j for j, n in enumerate(names or []) if n.lower() == "id"]
        ids = named[0] if named else None
        notes.append(f"ids: {_describe(ids, names)} (a header column named id)" if ids is not None
                     else "ids: row numbers, 0 for the first data row (no id column; name one with --id-column)")
    if ids == label:
        raise ExpungeError(f"{path}: the label and the id column are the same ({_describe(label, names)})")
    return label, ids


def _column_index(choice: str | int, names, width: int, path: Path, option: str) -> int:
    if isinstance(choice, (int, np.integer)) and not isinstance(choice, bool):
        if not -width <= choice < width:
            raise ExpungeError(f"{option} {choice} is out of range: {path} has {width} columns (0..{width - 1})")
        return int(choice) % width
    if names is None:
        raise ExpungeError(f"{option} {choice!r} names a column, but {path} has no header; give a 0-based index")
    if choice not in names:
        raise ExpungeError(f"{option} {choice!r} is not a column of {path}; its columns are {names}")
    return names.index(choice)


def _describe(j: int | None, names) -> str:
    if j is None:
        return "none"
    return f"column {j} ({names[j]!r})" if names else f"column {j}"


def _repeated(names) -> str:
    seen = set()
    return next(n for n in names if n in seen or seen.add(n))


# ---------------------------------------------------------------------------------- encoding


def _encode(path: Path, cells: np.ndarray, linenos: np.ndarray, spec: dict, options: ReadOptions, fit: bool,
            notes: list[str], row_ids: bool) -> Table:
    names, label_col, id_col = spec["columns"], spec["label_column"], spec["id_column"]
    row_numbers = np.arange(len(cells))
    missing = np.isin(cells, MISSING)
    if missing.any():
        cols = np.flatnonzero(missing.any(axis=0))
        if spec["missing"] == "drop":
            keep = ~missing.any(axis=1)
            notes.append(f"{path.name}: dropped {int((~keep).sum())} row(s) with missing values "
                         f"(e.g. line {linenos[~keep][0]}), as --missing drop asks")
            cells, linenos, row_numbers, missing = cells[keep], linenos[keep], row_numbers[keep], missing[keep]
            if len(cells) == 0:
                raise ExpungeError(f"{path}: every row has a missing value; nothing is left after --missing drop")
        else:
            for j in (label_col, id_col):
                if j is not None and missing[:, j].any():
                    raise ExpungeError(f"{path}: {_describe(j, names)} (the {'label' if j == label_col else 'id'}) "
                                       f"is missing on line {linenos[missing[:, j]][0]}; fill it in, or drop such "
                                       "rows with --missing drop")
            if spec["missing"] == "refuse":
                j = cols[0]
                raise ExpungeError(f"{path}: {_describe(j, names)} has {int(missing[:, j].sum())} missing value(s) "
                                   f"('' or '?'), e.g. on line {linenos[missing[:, j]][0]}"
                                   + (f" ({len(cols)} columns have some)" if len(cols) > 1 else "")
                                   + "; fill them in, or pass --missing impute (median, or most frequent value) "
                                   "or --missing drop (drop those rows)")
    y = _labels(path, cells[:, label_col], linenos, spec, options, fit, notes)
    ids = None
    if id_col is not None:
        ids = integer_values(cells[:, id_col], f"{path}: the ids ({_describe(id_col, names)})",
                             "ids must be integers", linenos)
    elif row_ids:
        ids = row_numbers  # the rows' numbers in the file, dropped rows counted: ids do not shift
    blocks = []
    for feature in spec["features"]:
        j = feature["column"]
        parsed = _numbers(cells[:, j])  # once per column: fitting and applying share it
        if fit:
            _fit_feature(path, cells[:, j], missing[:, j], parsed, feature, names, linenos, spec, options)
        blocks.append(_apply_feature(path, cells[:, j], missing[:, j], parsed, feature, names, linenos))
    if fit:
        _note_encoding(spec, notes, missing)
    X = np.concatenate(blocks, axis=1)
    if not fit and spec["missing"] == "impute" and missing.any():
        notes.append(f"{path.name}: imputed {int(missing.sum())} missing cell(s) with the training table's values")
    if fit:
        spec["notes"] = notes
    return Table(X, y, ids, spec, notes)


def _labels(path, cells, linenos, spec, options, fit: bool, notes) -> np.ndarray:
    suffix = spec["strip_label_suffix"]
    if suffix:
        cells = np.array([c.removesuffix(suffix) for c in cells], dtype=str)
    what = f"{path}: the labels ({_describe(spec['label_column'], spec['columns'])}"
    what += ", the last column by default)" if fit and options.label_column is None else ")"
    if fit and options.encode_labels:
        spec["classes"] = fit_classes(cells)
        notes.append(class_note(spec["classes"]))
    if spec["classes"] is not None:
        return apply_classes(cells, spec["classes"], what, linenos)
    hint = ("labels must be integers 0..K-1; choose the label column with --label-column (a name or a 0-based "
            "index) or map the values to 0..K-1 with --encode-labels")
    y = integer_values(cells, what, hint, linenos)
    if (y < 0).any():
        raise ExpungeError(f"{what} include negative values such as {int(y[y < 0][0])}; {hint}")
    return y


def integer_values(values, what: str, hint: str, linenos=None) -> np.ndarray:
    """Values that must be integers as int64: text or numbers; integral floats (1.0) pass, anything else
    (0.5, NaN, text, beyond int64) is refused naming the first offender."""
    values = np.asarray(values)
    where = (lambda i: f" on line {linenos[i]}") if linenos is not None else (lambda i: f" at position {i}")
    if values.dtype.kind in "US":
        try:
            return values.astype(np.int64)
        except OverflowError:
            raise ExpungeError(f"{what} exceed the int64 range; {hint}") from None
        except ValueError:
            numbers, ok = _numbers(values)
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                raise ExpungeError(f"{what} hold text such as {str(values[i])!r}{where(i)}; {hint}") from None
            values = numbers
    if values.dtype.kind == "b":
        values = values.astype(np.int64)
    if values.dtype.kind in "iu":
        if values.dtype.kind == "u" and values.size and values.max() > np.iinfo(np.int64).max:
            raise ExpungeError(f"{what} exceed the int64 range; {hint}")
        return values.astype(np.int64)
    if values.dtype.kind != "f":
        raise ExpungeError(f"{what} have dtype {values.dtype}, not numbers; {hint}")
    bad = ~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) >= _EXACT_INT)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ExpungeError(f"{what} include non-integer values such as {values[i].item()!r}{where(i)}; {hint}")
    return values.astype(np.int64)


def fit_classes(values) -> list:
    """The sorted distinct labels (numbers when every label is one, else text), for --encode-labels."""
    from sklearn.preprocessing import OrdinalEncoder

    values = np.asarray(values)
    if values.dtype.kind in "US":
        numbers, ok = _numbers(values)
        if ok.all() and np.isfinite(numbers).all():
            values = numbers
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ExpungeError("labels include NaN or infinity; fix them before mapping them with --encode-labels")
    classes = OrdinalEncoder().fit(values.reshape(-1, 1)).categories_[0]
    if classes.dtype.kind in "US":
        return [str(c) for c in classes]
    return [int(c) if float(c).is_integer() else float(c) for c in classes]


def class_note(classes: list) -> str:
    shown = ", ".join(f"{c!r} -> {i}" for i, c in enumerate(classes[:10]))
    return (f"labels: {len(classes)} classes mapped in sorted order ({shown}" + (", ..." if len(classes) > 10 else "")
            + "), as --encode-labels asks")


def apply_classes(values, classes: list, what: str, linenos=None) -> np.ndarray:
    """Labels mapped to their index in the recorded ``classes``; a label outside them is refused."""
    from sklearn.preprocessing import OrdinalEncoder

    values = np.asarray(values)
    numeric = not any(isinstance(c, str) for c in classes)
    if numeric and values.dtype.kind in "US":
        numbers, ok = _numbers(values)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ExpungeError(f"{what} hold {str(values[i])!r}, not one of the training labels {classes[:10]}")
        values = numbers
    categories = np.array(classes, dtype=np.float64 if numeric else str)
    column = values.astype(np.float64 if numeric else str).reshape(-1, 1)
    unknown = ~np.isin(column[:, 0], categories)
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        at = f" on line {linenos[i]}" if linenos is not None else ""
        shown = column[i, 0].item() if numeric else str(column[i, 0])
        raise ExpungeError(f"{what} hold {shown!r}{at}, not one of the training labels {classes[:10]}"
                           + (" (a suffix such as UCI Adult's trailing '.' is removed by --strip-label-suffix)"
                              if not numeric else ""))
    return OrdinalEncoder(categories=[categories]).fit_transform(column)[:, 0].astype(np.int64)


def _fit_feature(path, cells, missing, parsed, feature: dict, names, linenos, spec: dict, options: ReadOptions):
    """Fill in a feature column's kind (numeric or categorical), its fill value, scaling and categories."""
    j = feature["column"]
    if missing.all():
        raise ExpungeError(f"{path}: {_describe(j, names)} holds no values at all; drop the column")
    present = cells[~missing]
    numbers, ok = parsed[0][~missing], parsed[1][~missing]
    impute = spec["missing"] == "impute"  # a fill value for every column: the test file and new rows may need one
    if ok.all():
        feature["kind"] = "numeric"
        if impute:
            from sklearn.impute import SimpleImputer

            feature["fill"] = float(SimpleImputer(strategy="median").fit(numbers.reshape(-1, 1)).statistics_[0])
        if options.standardize:
            from sklearn.preprocessing import StandardScaler

            column = np.full(len(cells), feature.get("fill", np.nan))
            column[~missing] = numbers
            scaler = StandardScaler().fit(column.reshape(-1, 1))
            feature["mean"], feature["scale"] = float(scaler.mean_[0]), float(scaler.scale_[0])
        return
    if not options.encode_categories:
        i = int(np.flatnonzero(~ok)[0])
        raise ExpungeError(f"{path}: {_describe(j, names)} holds text, not a number: {str(present[i])!r} on line "
                           f"{linenos[~missing][i]}; fix the cell, or one-hot encode text columns with "
                           "--encode-categories")
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import OneHotEncoder

    feature["kind"] = "categorical"
    column = cells.astype(object).reshape(-1, 1)
    if impute:
        column[missing, 0] = ""
        feature["fill"] = str(SimpleImputer(missing_values="", strategy="most_frequent").fit(column).statistics_[0])
        column[missing, 0] = feature["fill"]
    feature["categories"] = [str(c) for c in OneHotEncoder().fit(column).categories_[0]]


def _apply_feature(path, cells, missing, parsed, feature: dict, names, linenos) -> np.ndarray:
    j = feature["column"]  # missing cells reach here only under --missing impute, which fitted every fill value
    if feature["kind"] == "numeric":
        numbers, ok = parsed[0].copy(), parsed[1].copy()
        if missing.any():
            numbers[missing], ok[missing] = feature["fill"], True
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ExpungeError(f"{path}: {_describe(j, names)} holds text, {str(cells[i])!r} on line {linenos[i]}, "
                               "where the training table has numbers")
        if "scale" in feature:  # StandardScaler's transform, with the mean and scale fitted on the training table
            numbers = (numbers - feature["mean"]) / feature["scale"]
        return numbers.reshape(-1, 1)
    from sklearn.preprocessing import OneHotEncoder

    column = cells.astype(object).reshape(-1, 1)
    column[missing, 0] = feature.get("fill")
    unknown = ~np.isin(column[:, 0], feature["categories"])
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise ExpungeError(f"{path}: {_describe(j, names)} holds {column[i, 0]!r} on line {linenos[i]}, a category the "
                           f"training table does not have (it has {feature['categories'][:8]}"
                           + ("..." if len(feature["categories"]) > 8 else "") + ")")
    encoder = OneHotEncoder(categories=[np.array(feature["categories"], dtype=object)], sparse_output=False,
                            dtype=np.float64)
    return encoder.fit_transform(column)


def _note_encoding(spec: dict, notes: list[str], missing: np.ndarray) -> None:
    names = spec["columns"]
    categorical = [f for f in spec["features"] if f["kind"] == "categorical"]
    if categorical:
        width = sum(len(f["categories"]) for f in categorical)
        notes.append(f"one-hot encoded {len(categorical)} text column(s) into {width} features "
                     f"({', '.join(_describe(f['column'], names) for f in categorical[:4])}"
                     + (", ..." if len(categorical) > 4 else "") + "), as --encode-categories asks")
    scaled = [f for f in spec["features"] if "scale" in f]
    if scaled:
        notes.append(f"standardized {len(scaled)} numeric column(s) to mean 0 and variance 1 (means and scales "
                     "recorded), as --standardize asks")
    filled = [f for f in spec["features"] if "fill" in f and missing[:, f["column"]].any()]
    if filled and spec["missing"] == "impute":
        shown = ", ".join(f"{_describe(f['column'], names)} <- {f['fill']!r} "
                          f"({int(missing[:, f['column']].sum())})" for f in filled[:4])
        notes.append(f"imputed missing cells (median of a numeric column, most frequent value of a text column), "
                     f"as --missing impute asks: {shown}" + (", ..." if len(filled) > 4 else ""))
