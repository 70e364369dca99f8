"""The labels table of a classification task: a CSV with a case id column and one column per label.

- Multi-label binary (CT-RATE's 18 abnormalities, benchmark section 2.2): every label column holds 0/1
  (also true/false, yes/no, 0.0/1.0); each label is its own binary task.
- Multi-class: a single label column with more than two values (text or numbers); one task over its classes.

Reserved columns, never labels: the case id (``--case-column``, default the first column), ``patient`` or
``patient_id`` (the splits keep a patient's cases together; default: every case is its own patient) and
``split`` (train/val/test: an official split, used with ``--split column``).

Every problem is reported as one line naming the file, the row or column, what was expected and what was found.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DinomedError

PATIENT_COLUMNS = ("patient", "patient_id")
SPLIT_COLUMN = "split"
SPLIT_VALUES = ("train", "val", "test")
_TRUE = {"1", "1.0", "true", "yes", "y", "t", "positive", "pos"}
_FALSE = {"0", "0.0", "false", "no", "n", "f", "negative", "neg"}


@dataclass
class LabelTable:
    path: str
    case_ids: list[str]
    patients: list[str]
    names: list[str]          # label columns (multi-label) or [the column] (multi-class)
    task: str                 # "multilabel" or "multiclass"
    y: np.ndarray             # (N, L) float32 0/1, or (N,) int64 class indices
    classes: list[str]        # multi-class: the class names in index order; multi-label: []
    split: list[str] | None   # per case train/val/test when the table has a split column

    @property
    def outputs(self) -> list[str]:
        """The names of the classifier's outputs: the labels, or the classes of a multi-class column."""
        return list(self.classes) if self.task == "multiclass" else list(self.names)

    def targets(self) -> np.ndarray:
        """``(N, K)`` 0/1 targets, one column per output (one-hot classes for a multi-class task)."""
        if self.task == "multiclass":
            return np.eye(len(self.classes), dtype=np.float32)[self.y]
        return self.y

    def subset(self, case_ids: Sequence[str]) -> "LabelTable":
        index = {c: i for i, c in enumerate(self.case_ids)}
        rows = [index[c] for c in case_ids]
        return LabelTable(self.path, [self.case_ids[i] for i in rows], [self.patients[i] for i in rows], self.names,
                          self.task, self.y[rows], self.classes, None if self.split is None else [self.split[i] for i in rows])


def _binary(value: str) -> int | None:
    v = value.strip().lower()
    return 1 if v in _TRUE else 0 if v in _FALSE else None


def read_labels_table(
    path: str | Path,
    case_column: str | None = None,
    patient_column: str | None = None,
    label_columns: Sequence[str] | None = None,
    task: str = "auto",
) -> LabelTable:
    """Read and validate a labels table (see the module docstring). ``task``: auto, multilabel or multiclass."""
    path = Path(path)
    if not path.is_file():
        raise DinomedError(f"{path}: no such labels table (expected a CSV: case id, then one column per label)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            sample = fh.read(4096)
            fh.seek(0)
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel
            rows = list(csv.reader(fh, dialect))
    except (OSError, UnicodeDecodeError) as exc:
        raise DinomedError(f"{path}: cannot read the labels table: {exc}") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise DinomedError(f"{path}: expected a header and at least two rows (case id, labels), found {len(rows)} line(s)")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise DinomedError(f"{path}: duplicate column name(s) {dup} in the header")
    col = {h: i for i, h in enumerate(header)}
    case_column = case_column or header[0]
    if case_column not in col:
        raise DinomedError(f"{path}: no case id column {case_column!r}; the columns are {header}")
    if patient_column is None:
        patient_column = next((c for c in PATIENT_COLUMNS if c in col and c != case_column), None)
    elif patient_column not in col:
        raise DinomedError(f"{path}: no patient column {patient_column!r}; the columns are {header}")
    reserved = {case_column, patient_column, SPLIT_COLUMN}
    if label_columns:
        unknown = [c for c in label_columns if c not in col]
        if unknown:
            raise DinomedError(f"{path}: no label column(s) {unknown}; the columns are {header}")
        names = list(label_columns)
    else:
        names = [h for h in header if h not in reserved]
    if not names:
        raise DinomedError(f"{path}: no label column (the columns are {header}; the case id is {case_column!r})")

    body = rows[1:]
    for n, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise DinomedError(f"{path}, line {n}: expected {len(header)} fields like the header, found {len(r)}")
    cases = [r[col[case_column]].strip() for r in body]
    for n, c in enumerate(cases, start=2):
        if not c:
            raise DinomedError(f"{path}, line {n}: empty case id in column {case_column!r}")
    seen: dict[str, int] = {}
    for n, c in enumerate(cases, start=2):
        if c in seen:
            raise DinomedError(f"{path}, line {n}: case id {c!r} appears twice (first on line {seen[c]})")
        seen[c] = n
    patients = [r[col[patient_column]].strip() or c for r, c in zip(body, cases)] if patient_column else list(cases)
    split = None
    if SPLIT_COLUMN in col and SPLIT_COLUMN not in names:
        split = [r[col[SPLIT_COLUMN]].strip().lower() for r in body]
        for n, s in enumerate(split, start=2):
            if s not in SPLIT_VALUES:
                raise DinomedError(f"{path}, line {n}: split {s!r}; expected one of {', '.join(SPLIT_VALUES)}")

    values = {name: [r[col[name]].strip() for r in body] for name in names}
    for name in names:
        for n, v in enumerate(values[name], start=2):
            if v == "":
                raise DinomedError(f"{path}, line {n}: missing value of label {name!r} for case {cases[n - 2]!r}")
    if task not in ("auto", "multilabel", "multiclass"):
        raise DinomedError(f"unknown task {task!r}; expected auto, multilabel or multiclass")
    all_binary = all(_binary(v) is not None for name in names for v in values[name])
    if task == "multiclass" or (task == "auto" and len(names) == 1 and not all_binary):
        if len(names) != 1:
            raise DinomedError(f"{path}: a multi-class task has one label column, found {len(names)} {names}; "
                               "pick it with --label-columns NAME")
        name = names[0]
        raw = values[name]
        try:
            classes = sorted(set(raw), key=float)
        except ValueError:
            classes = sorted(set(raw))
        if len(classes) < 2:
            raise DinomedError(f"{path}: label {name!r} has only one class ({classes[0]!r} for all {len(raw)} cases); "
                               "a classifier needs at least two")
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[v] for v in raw], dtype=np.int64)
        return LabelTable(str(path), cases, patients, [name], "multiclass", y, classes, split)

    y = np.zeros((len(cases), len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        for n, v in enumerate(values[name], start=2):
            b = _binary(v)
            if b is None:
                hint = (" (a multi-class label must be the only label column: choose it with --label-columns "
                        f"{name})") if len(names) > 1 else " (use --task multiclass for a multi-class label)"
                raise DinomedError(f"{path}, line {n}: label {name!r} of case {cases[n - 2]!r} is {v!r}; expected a "
                                   f"binary value 0/1 (or true/false, yes/no){hint}")
            y[n - 2, j] = b
        positives = int(y[:, j].sum())
        if positives in (0, len(cases)):
            raise DinomedError(f"{path}: label {name!r} has only one class (all {len(cases)} cases are "
                               f"{positives and 1}); drop the column or add cases of the other class")
    return LabelTable(str(path), cases, patients, names, "multilabel", y, [], split)


def align_cases(table: LabelTable, feature_cases: Sequence[str], features_path: str, allow_unlabelled: bool = False) -> LabelTable:
    """The table restricted to, and checked against, the cases that have features.

    A case in the table without features is an error (an unknown case id, or a case whose image was not
    extracted); a case with features but no row in the table is an error unless ``allow_unlabelled`` (then it
    is left out).
    """
    have = set(feature_cases)
    unknown = [c for c in table.case_ids if c not in have]
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DinomedError(f"{table.path}: {len(unknown)} case id(s) not in the feature set {features_path}: {shown} "
                           f"(its cases are e.g. {', '.join(repr(c) for c in list(feature_cases)[:3])})")
    labelled = set(table.case_ids)
    missing = [c for c in feature_cases if c not in labelled]
    if missing and not allow_unlabelled:
        shown = ", ".join(repr(c) for c in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DinomedError(f"{table.path}: {len(missing)} case(s) of the feature set {features_path} have no row: {shown} "
                           "(add their labels, or leave them out with --allow-unlabelled)")
    return table
