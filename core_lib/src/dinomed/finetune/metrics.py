"""Segmentation metrics per case and class: Dice, HD95 (mm), precision, recall, NSD (MONAI metrics); and
per-lesion detection and Dice by lesion size.

The columns of the DINOv3 medical benchmark's PET/CT lesion table, plus the normalised surface Dice (NSD: the
share of both surfaces within ``nsd_tolerance_mm`` of the other; ``monai.metrics.compute_surface_dice``, as the
official MedDINOv3 evaluation ``nnunetv2/compute_metrics.py`` computes it, at its tolerance of 1 mm by default).
Conventions for empty structures: a class absent from both the reference and the prediction has no Dice, HD95,
precision, recall or NSD (NaN, left out of the means); a class present in only one of them has Dice 0, NSD 0 and no
HD95 (the distance to an empty set is undefined).

Lesion size strata (:func:`lesion_metrics`): each connected reference lesion (26-connectivity, as
``dinomed lesions``) is small, medium or large by its volume. Dual-DINOv3 (MIDL 2026) reports results "across all
tumor sizes" but the text we build from gives no thresholds, so the defaults are ours: small < 1 ml (a sphere of
12.4 mm), medium 1-10 ml, large >= 10 ml (26.7 mm); ``dinomed evaluate --size-thresholds-ml`` changes them.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

METRIC_NAMES = ("dice", "hd95", "precision", "recall", "nsd")
NSD_TOLERANCE_MM = 1.0  # official MedDINOv3 evaluation (compute_metrics.py: class_thresholds=[1.0])
SIZE_THRESHOLDS_ML = (1.0, 10.0)  # ours (see the module docstring): small < 1 ml <= medium < 10 ml <= large
STRATA = ("small", "medium", "large")


def class_metrics(pred: np.ndarray, truth: np.ndarray, values: Sequence[int],
                  spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0),
                  nsd_tolerance_mm: float = NSD_TOLERANCE_MM) -> dict[int, dict]:
    """Metrics of each label value in ``values`` for one case: ``pred`` and ``truth`` are ``(Z, Y, X)`` label maps
    on the same grid; ``spacing_xyz`` (mm, SimpleITK order) makes HD95 and the NSD tolerance physical distances."""
    from monai.metrics import (DiceMetric, HausdorffDistanceMetric, compute_confusion_matrix_metric, compute_surface_dice,
                               get_confusion_matrix)

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
            row.update(dice=math.nan, hd95=math.nan, precision=math.nan, recall=math.nan, nsd=math.nan)
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
            if n_pred and n_truth:
                with warnings.catch_warnings():  # MONAI's own deprecation notice inside compute_surface_dice
                    warnings.simplefilter("ignore", FutureWarning)
                    row["nsd"] = float(compute_surface_dice(p, t, class_thresholds=[float(nsd_tolerance_mm)],
                                                            include_background=True, spacing=spacing_zyx)[0, 0])
            else:
                row["nsd"] = 0.0
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


def size_stratum(volume_ml: float, thresholds_ml: Sequence[float] = SIZE_THRESHOLDS_ML) -> str:
    """``small`` below the first threshold, ``large`` at or above the second, ``medium`` between."""
    low, high = thresholds_ml
    return "small" if volume_ml < low else ("large" if volume_ml >= high else "medium")


def lesion_metrics(pred: np.ndarray, truth: np.ndarray, value: int, spacing_xyz: Sequence[float],
                   thresholds_ml: Sequence[float] = SIZE_THRESHOLDS_ML) -> dict:
    """Per connected lesion of label ``value``: each reference lesion's volume (ml), stratum, whether the prediction
    touches it (detected), and its Dice against the predicted components that touch it; predicted components touching
    no reference lesion are false positives, stratified by their own volume.

    Returns ``{"lesions": [row, …], "false_positives": {stratum: count}}``."""
    from scipy import ndimage

    structure = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, as dinomed lesions
    voxel_ml = float(np.prod([float(s) for s in spacing_xyz])) / 1000.0
    t_mask, p_mask = truth == value, pred == value
    t_lab, n_t = ndimage.label(t_mask, structure)
    p_lab, n_p = ndimage.label(p_mask, structure)
    rows = []
    touched_pred: set[int] = set()
    for i, sl in enumerate(ndimage.find_objects(t_lab), start=1):
        lesion = t_lab == i
        hits = np.unique(p_lab[lesion])
        hits = [int(h) for h in hits if h]
        touched_pred.update(hits)
        matched = np.isin(p_lab, hits) if hits else np.zeros_like(lesion)
        inter = int(np.count_nonzero(lesion & matched))
        volume = int(np.count_nonzero(lesion)) * voxel_ml
        centre = [float(c) for c in np.argwhere(lesion).mean(0)[::-1]]  # x, y, z voxel index
        rows.append({"lesion": i, "volume_ml": round(volume, 4), "stratum": size_stratum(volume, thresholds_ml),
                     "detected": bool(hits),
                     "dice": 2 * inter / (np.count_nonzero(lesion) + np.count_nonzero(matched)),
                     "centre_xyz_index": [round(c, 2) for c in centre]})
    fps = {s: 0 for s in STRATA}
    for j in range(1, n_p + 1):
        if j not in touched_pred:
            fps[size_stratum(int(np.count_nonzero(p_lab == j)) * voxel_ml, thresholds_ml)] += 1
    return {"lesions": rows, "false_positives": fps}


def summarize_strata(per_case: dict[str, dict], name: str) -> dict:
    """Per stratum over cases: reference lesions, detected, sensitivity, mean per-lesion Dice, false positives."""
    out = {}
    for stratum in STRATA:
        rows = [r for case in per_case.values() for r in case["lesions"] if r["stratum"] == stratum]
        detected = sum(r["detected"] for r in rows)
        out[stratum] = {"label": name, "lesions": len(rows), "detected": detected,
                        "sensitivity": detected / len(rows) if rows else math.nan,
                        "lesion_dice": nanmean(r["dice"] for r in rows),
                        "false_positives": sum(case["false_positives"][stratum] for case in per_case.values())}
    return out
