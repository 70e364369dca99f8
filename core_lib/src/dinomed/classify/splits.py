"""Train/validation/test splits by patient: a hold-out split, k-fold cross-validation, or the table's own split.

All of a patient's cases land in the same part (no leakage between train and test); the parts are stratified by
the label pattern as far as the patients allow (scikit-learn's ``StratifiedGroupKFold``). The benchmark's
defaults: official splits where a dataset has them (``--split column``, section 2.2 for CT-RATE); otherwise a
7:1:2 train:val:test ratio, and 5-fold cross-validation with a 7:1:2 split inside each fold (section 2.1, BCNB).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import DinomedError
from .labels import LabelTable

STRATEGIES = ("auto", "holdout", "kfold", "column")


@dataclass
class Fold:
    name: str
    train: list[str]
    val: list[str]
    test: list[str]

    def parts(self):
        return {"train": self.train, "val": self.val, "test": self.test}


def _strata(table: LabelTable) -> list[np.ndarray]:
    """Candidate stratifications, finest first: the class, or the whole label pattern, then each label alone
    (rarest first, so that its few positives are spread over the parts), then none."""
    if table.task == "multiclass":
        return [table.y.astype(np.int64), np.zeros(len(table.y), np.int64)]
    bits = (table.y > 0.5).astype(np.int64)
    minority = np.minimum(bits.sum(axis=0), len(bits) - bits.sum(axis=0))
    single = [bits[:, j] for j in np.argsort(minority, kind="stable")]
    return [(bits * (1 << np.arange(bits.shape[1]))).sum(axis=1), *single, np.zeros(len(bits), np.int64)]


def _group_folds(indices: np.ndarray, strata: list[np.ndarray], groups: np.ndarray, n_splits: int, seed: int):
    """``n_splits`` folds of ``indices`` by group, stratified by the finest candidate of ``strata`` that has a
    class of at least ``n_splits`` cases; a list of index arrays."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(set(groups[indices]))
    if n_groups < n_splits:
        raise DinomedError(f"cannot split {n_groups} patient(s) into {n_splits} parts; add cases, or use fewer folds / "
                           "a larger fraction")
    y = next(c[indices] for c in strata if np.bincount(c[indices]).max() >= n_splits)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # rare label patterns cannot be spread over every fold: expected, not an error
        warnings.simplefilter("ignore", UserWarning)
        return [indices[test] for _, test in splitter.split(indices, y, groups[indices])]


def _holdout(indices, strata, groups, fraction, seed):
    """Split ``indices`` into (rest, part) with about ``fraction`` of the patients in part."""
    n = max(2, int(round(1.0 / fraction)))
    part = _group_folds(indices, strata, groups, n, seed)[0]
    rest = np.setdiff1d(indices, part)
    return rest, part


def make_folds(
    table: LabelTable,
    strategy: str = "auto",
    seed: int = 0,
    folds: int = 5,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> list[Fold]:
    """The splits of ``table``'s cases (see the module docstring).

    ``holdout``: one split, ``test_fraction`` and ``val_fraction`` of the patients in test and validation;
    ``kfold``: ``folds`` folds, each patient in exactly one test part, a validation part of ``val_fraction`` of
    all patients taken from the rest; ``column``: the table's ``split`` column; ``auto``: ``column`` when the
    table has a split column, else ``holdout``. ``val_fraction`` 0 gives no validation part.
    """
    if strategy not in STRATEGIES:
        raise DinomedError(f"unknown split {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        strategy = "column" if table.split is not None else "holdout"
    ids = np.asarray(table.case_ids)
    if strategy == "column":
        if table.split is None:
            raise DinomedError(f"{table.path}: --split column needs a 'split' column (train/val/test)")
        parts = {p: [c for c, s in zip(table.case_ids, table.split) if s == p] for p in ("train", "val", "test")}
        if not parts["train"] or not parts["test"]:
            raise DinomedError(f"{table.path}: the split column needs train and test cases, found "
                               f"{len(parts['train'])} train and {len(parts['test'])} test")
        by_patient: dict[str, set] = {}
        for p, s in zip(table.patients, table.split):
            by_patient.setdefault(p, set()).add(s)
        leaking = [p for p, s in by_patient.items() if len(s) > 1]
        if leaking:
            raise DinomedError(f"{table.path}: patient {leaking[0]!r} has cases in several splits {sorted(by_patient[leaking[0]])}; "
                               "a patient's cases must stay in one split")
        return [Fold("official", parts["train"], parts["val"], parts["test"])]
    if not 0.0 < test_fraction < 1.0:
        raise DinomedError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise DinomedError(f"--val-fraction must be at least 0 and leave room for training (with test {test_fraction}), got {val_fraction}")
    strata = _strata(table)
    groups = np.asarray(table.patients)
    everything = np.arange(len(ids))
    out = []
    if strategy == "holdout":
        rest, test = _holdout(everything, strata, groups, test_fraction, seed)
        tests = [test]
    else:
        if folds < 2:
            raise DinomedError(f"--folds must be at least 2, got {folds}")
        tests = _group_folds(everything, strata, groups, folds, seed)
    for k, test in enumerate(tests):
        rest = np.setdiff1d(everything, test)
        val = np.array([], dtype=np.int64)
        if val_fraction > 0:
            rest, val = _holdout(rest, strata, groups, val_fraction * len(ids) / len(rest), seed + 1 + k)
        name = "holdout" if strategy == "holdout" else f"fold{k}"
        out.append(Fold(name, sorted(ids[rest].tolist()), sorted(ids[val].tolist()), sorted(ids[test].tolist())))
    return out
