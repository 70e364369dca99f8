"""Segmentation metrics per case and class: Dice, HD95 (mm), precision, recall (MONAI metrics).

The columns of the DINOv3 medical benchmark's PET/CT lesion table. Conventions for empty structures: a class
absent from both the reference and the prediction has no Dice, HD95, precision or recall (NaN, left out of the
means); a class present in only one of them has Dice 0 and no HD95 (the distance to an empty set is undefined).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

METRIC_NAMES = ("dice", "hd95", "precision", "recall")


def class_metrics(pred: np.ndarray, truth: np.ndarray, values: Sequence[int],
                  spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[int, dict]:
    """Metrics of each label value in ``values`` for one case: ``pred`` and ``truth`` are ``(Z, Y, X)`` label maps
    on the same grid; ``spacing_xyz`` (mm, SimpleITK order) makes HD95 a physical distance."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, compute_confusion_matrix_metric, get_confusion_matrix

    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and reference {truth.shape} are not on one grid")
    spacing_zyx = [float(s) for s in reversed(list(spacing_xyz))]
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    out: dict[int, dict] = {}
    for value in values:
        p = torch.from_numpy(np.ascontiguousarray(pred == value))[None, None].float()
        t = torch.from_numpy(np.ascontiguousarray(truth == value))[None, None].float()
        n_pred, n_truth = int(p.sum()), int(t.sum())
        row = {"truth_voxels": n_truth, "pred_voxels": n_pred}
        if n_pred == 0 and n_truth == 0:
            row.update(dice=math.nan, hd95=math.nan, precision=math.nan, recall=math.nan)
        else:
            row["dice"] = float(dice_metric(p, t)[0, 0])
            if n_pred and n_truth:
                with warnings.catch_warnings():  # MONAI's own deprecation notice inside HausdorffDistanceMetric
                    warnings.simplefilter("ignore", FutureWarning)
                    row["hd95"] = float(hd_metric(p, t, spacing=spacing_zyx)[0, 0])
            else:
                row["hd95"] = math.nan
            confusion = get_confusion_matrix(p, t, include_background=True)
            precision = compute_confusion_matrix_metric("precision", confusion)
            recall = compute_confusion_matrix_metric("recall", confusion)
            row["precision"] = float(precision.reshape(-1)[0]) if n_pred else math.nan
            row["recall"] = float(recall.reshape(-1)[0]) if n_truth else math.nan
        out[int(value)] = row
    dice_metric.reset()
    hd_metric.reset()
    return out


def nanmean(values) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else math.nan


def summarize(per_case: dict[str, dict[int, dict]], names: dict[int, str]) -> dict:
    """Per-class means over cases and the mean over classes: ``{"per_class": {name: {metric: mean}}, "mean": {…}}``."""
    per_class = {}
    for value, name in names.items():
        per_class[name] = {m: nanmean(case[value][m] for case in per_case.values() if value in case) for m in METRIC_NAMES}
    mean = {m: nanmean(per_class[n][m] for n in per_class) for m in METRIC_NAMES}
    return {"per_class": per_class, "mean": mean}
