"""Corpus: the texts of a language-model run, one row per QA pair or document, each with a stable id and a group.

A row is a (prompt, target) pair. A QA pair's prompt is its question and its target its answer: the loss is
on the answer only. A document has no prompt; its whole text is the target. Ids are what a deletion request
names: the row's position in the corpus (sources in the order given, rows in file order), so they never
change for the life of a run. Groups are what ``--group`` names: a whole author or split at once.

Sources (``load_corpus``), one path or several, a folder meaning its .json/.jsonl/.txt files by name:
- QA (TOFU): a JSON array, or JSON lines, of objects with ``question`` and ``answer``. Group: the object's
  ``group`` field when it has one, else the author ``author-K``, K = (QA rows before it in the corpus) // 20,
  TOFU's 20 consecutive pairs per author; so ``full.json`` (or ``retain90.json`` then ``forget10.json``)
  gives authors 0..199 as TOFU numbers them.
- Documents: a JSON array of strings (MUSE-News), JSON lines (or an array) of objects with ``text``, or a
  plain ``.txt`` file (one document). Group: the object's ``group`` field, else the file's stem, so MUSE's
  ``privleak/forget.json`` and ``privleak/retain2.json`` give groups ``forget`` and ``retain2``.
An empty question or answer is refused (a QA row would train on nothing, or on a question alone). An empty
document is skipped with a warning and its id left unused (MUSE's ``raw/forget.json`` has one, row 821), so
ids stay the rows' positions in the sources.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExpungeError

TOFU_AUTHOR_ROWS = 20
SUFFIXES = (".json", ".jsonl", ".txt")


@dataclass(frozen=True)
class Corpus:
    """Rows of texts: ``prompts[i]`` (None for a document), ``targets[i]``, unique int64 ``ids``, ``groups``."""

    prompts: tuple[str | None, ...]
    targets: tuple[str, ...]
    ids: np.ndarray
    groups: tuple[str, ...]
    name: str = "corpus"

    def __post_init__(self):
        ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "groups", tuple(str(g) for g in self.groups))
        if not (len(self.prompts) == len(self.targets) == len(ids) == len(self.groups)):
            raise ExpungeError(f"{self.name}: prompts, targets, ids and groups must have one entry per row")
        if len(np.unique(ids)) != len(ids):
            raise ExpungeError(f"{self.name}: ids must be unique; found duplicates")

    def __len__(self) -> int:
        return len(self.ids)

    def is_qa(self, row: int) -> bool:
        return self.prompts[row] is not None

    def texts(self) -> list[str]:
        """Every text of the corpus (questions and answers, documents), e.g. to train a tokenizer on."""
        return [t for p, a in zip(self.prompts, self.targets) for t in ((a,) if p is None else (p, a))]

    def rows_of(self, ids) -> np.ndarray:
        """Row positions of ``ids``; unknown ids raise an error that lists a few of them."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        position = {int(i): r for r, i in enumerate(self.ids)}
        missing = [int(i) for i in ids if int(i) not in position]
        if missing:
            raise ExpungeError(f"{len(missing)} id(s) are not in {self.name}, e.g. {missing[:5]}; ids are the rows' "
                               "positions in the sources, in the order given (from 0)")
        return np.array([position[int(i)] for i in ids], dtype=np.int64)

    def group_names(self) -> list[str]:
        return list(dict.fromkeys(self.groups))

    def ids_in_groups(self, groups) -> np.ndarray:
        """Ids of every row in the named groups (a TOFU author ``author-7``, a MUSE split ``forget``)."""
        groups = [groups] if isinstance(groups, str) else [str(g) for g in groups]
        known = set(self.groups)
        unknown = [g for g in groups if g not in known]
        if unknown:
            names = self.group_names()
            more = f" (and {len(names) - 8} more)" if len(names) > 8 else ""
            raise ExpungeError(f"unknown group(s) {unknown} in {self.name}; its groups are {', '.join(names[:8])}{more}")
        wanted = set(groups)
        return self.ids[[g in wanted for g in self.groups]]

    def take(self, rows) -> "Corpus":
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return Corpus(tuple(self.prompts[r] for r in rows), tuple(self.targets[r] for r in rows), self.ids[rows],
                      tuple(self.groups[r] for r in rows), self.name)

    def fingerprint(self) -> str:
        """Content hash of every row's texts, id and group: tells one corpus from another."""
        h = hashlib.sha256()
        for p, a, i, g in zip(self.prompts, self.targets, self.ids.tolist(), self.groups):
            h.update(json.dumps([p, a, i, g]).encode())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------- loading


def load_corpus(sources, name: str | None = None) -> Corpus:
    """Read QA pairs and documents from one path or several (see the module docstring for the formats)."""
    paths = _expand([sources] if isinstance(sources, (str, Path)) else list(sources))
    prompts, targets, groups, ids, empty = [], [], [], [], []
    qa_rows = position = 0
    for path in paths:
        for k, record in enumerate(_records(path)):
            position += 1
            row = _row(record, f"{path} row {k}")
            if row is None:
                empty.append(f"{path.name} row {k}")
                continue
            prompt, target, group = row
            if group is None:
                group = f"author-{qa_rows // TOFU_AUTHOR_ROWS}" if prompt is not None else path.stem
            qa_rows += prompt is not None
            prompts.append(prompt)
            targets.append(target)
            groups.append(group)
            ids.append(position - 1)
    if empty:
        warnings.warn(f"skipped {len(empty)} empty document(s) ({', '.join(empty[:3])}); their ids stay unused",
                      stacklevel=2)
    if not targets:
        raise ExpungeError(f"no rows in {', '.join(map(str, paths))}; give QA pairs or documents")
    return Corpus(tuple(prompts), tuple(targets), np.array(ids), tuple(groups), name or ("+".join(p.stem for p in paths)))


def _expand(paths: list) -> list[Path]:
    out = []
    if not paths:
        raise ExpungeError("no data given; name a QA file, a document file or a folder of them")
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SUFFIXES)
            if not files:
                raise ExpungeError(f"{p} holds no {', '.join(SUFFIXES)} files")
            out.extend(files)
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise ExpungeError(f"{p}: unknown format {p.suffix!r}; give {', '.join(SUFFIXES)} files")
            out.append(p)
        else:
            raise ExpungeError(f"{p} does not exist")
    return out


def _records(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ExpungeError(f"{path} is not UTF-8 text ({e})") from e
    if path.suffix == ".txt":
        return [text]
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    value.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ExpungeError(f"{path} line {line_no} is neither part of a JSON array nor a JSON line ({e})") from e
    if not isinstance(value, list):
        raise ExpungeError(f"{path} must hold a JSON array (or JSON lines) of rows, not a {type(value).__name__}")
    return value


def _row(record, where: str) -> tuple[str | None, str, str | None] | None:
    """(prompt, target, group or None) of one record; None for an empty document."""
    if isinstance(record, str):
        return (None, record, None) if record.strip() else None
    if not isinstance(record, dict):
        raise ExpungeError(f"{where}: a row must be a string (a document) or an object, not {type(record).__name__}")
    group = record.get("group")
    group = None if group is None else str(group)
    if "question" in record or "answer" in record:
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise ExpungeError(f"{where}: the question is missing or empty; every QA row needs a question")
        if not isinstance(answer, str) or not answer.strip():
            raise ExpungeError(f"{where}: the answer is empty; an empty answer has no tokens to train on, remove the row")
        return question, answer, group
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise ExpungeError(f"{where}: the text must be a string, not {type(text).__name__}")
        return (None, text, group) if text.strip() else None
    raise ExpungeError(f"{where}: a row object needs 'question' and 'answer' (QA) or 'text' (a document); "
                       f"it has {sorted(record)[:6]}")
