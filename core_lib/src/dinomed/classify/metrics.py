"""The benchmark's classification metrics (section 4, Table 5): AUC, accuracy, precision and recall per label, and
their mean over the labels. Computed with scikit-learn (``roc_auc_score`` and friends), the reference
implementation every paper's numbers are compared with.

Multi-label: each label is a binary task; a prediction is positive when its probability is at least
``threshold`` (0.5). Multi-class: each class one-vs-rest for AUC (its probability as the score) and for the
thresholded metrics the predicted class is the argmax; the top-1 accuracy is reported beside the mean.
A label whose part holds only one class has an undefined AUC (reported as empty/NaN, left out of the mean).
"""
from __future__ import annotations

import math

import numpy as np

METRICS = ("auc", "acc", "precision", "recall")


def binary_metrics(y_true: np.ndarray, score: np.ndarray, predicted: np.ndarray | None = None,
                   threshold: float = 0.5) -> dict:
    """AUC, accuracy, precision, recall (positive class 1), number of cases and of positives."""
    from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score

    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    pred = (s >= threshold).astype(np.int64) if predicted is None else np.asarray(predicted).astype(np.int64).ravel()
    auc = float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else math.nan
    return {
        "auc": auc,
        "acc": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "n": int(y.size),
        "n_pos": int(y.sum()),
    }


def classification_metrics(task: str, outputs: list[str], targets: np.ndarray, probs: np.ndarray,
                           threshold: float = 0.5) -> tuple[list[dict], dict]:
    """Per-output metric rows (``label`` + :func:`binary_metrics`) and the mean row (``label`` = "mean").

    ``targets`` and ``probs`` are ``(N, K)``: 0/1 targets and probabilities (one-hot targets and class
    probabilities for a multi-class task).
    """
    rows = []
    if task == "multiclass":
        pred = probs.argmax(axis=1)
        for k, name in enumerate(outputs):
            rows.append({"label": name, **binary_metrics(targets[:, k], probs[:, k], pred == k)})
    else:
        for k, name in enumerate(outputs):
            rows.append({"label": name, **binary_metrics(targets[:, k], probs[:, k], threshold=threshold)})
    mean = {"label": "mean"}
    for m in METRICS:
        values = [r[m] for r in rows if not math.isnan(r[m])]
        mean[m] = float(np.mean(values)) if values else math.nan
    mean["n"] = int(targets.shape[0])
    mean["n_pos"] = int(targets.sum())
    if task == "multiclass":
        mean["top1_acc"] = float((probs.argmax(axis=1) == targets.argmax(axis=1)).mean())
    return rows, mean
