"""Evaluating a model folder on a labeled dataset: per case and class Dice, HD95, precision, recall, NSD, and means;
per-lesion detection and Dice by lesion size.

The model segments each case whole as ``dinomed segment`` does: on the model's grid (``preprocessing.target_spacing``
and ``input_scale``) with :func:`dinomed.inference.predict.predict_volume`, the labels put back onto the case's own
grid, where they are scored. The reference labels are mapped onto the model's labels by name (dataset labels the
model does not know count as background). Written atomically: ``METRICS.csv`` (one row per case and label, then the
per-label means and the overall mean), ``METRICS.json`` beside it (everything), and for the lesion labels (those
flagged ``lesion: true`` in model.json, or ``lesion_labels``) ``METRICS.lesions.csv`` (one row per reference
lesion: volume, size stratum, detected, Dice) and ``METRICS.strata.csv`` (per label and stratum: lesions, detected,
sensitivity, mean lesion Dice, false-positive components). See :mod:`dinomed.finetune.metrics` for NSD and the
strata defaults.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

from .atomic import atomic_write_text
from .errors import DinomedError
from .events import EventWriter
from .finetune.dataset import _dataset_label_values, load_case, open_dataset, read_dataset_json
from .finetune.metrics import (METRIC_NAMES, NSD_TOLERANCE_MM, SIZE_THRESHOLDS_ML, STRATA, class_metrics,
                               lesion_metrics, summarize, summarize_strata)

CSV_COLUMNS = ("case", "label", "value", *METRIC_NAMES, "truth_voxels", "pred_voxels")
LESION_COLUMNS = ("case", "label", "lesion", "volume_ml", "stratum", "detected", "dice")
STRATA_COLUMNS = ("label", "stratum", "lesions", "detected", "sensitivity", "lesion_dice", "false_positives")


def _select_cases(spec, model_json: dict, cases: str | list[str] | None) -> list[str]:
    names = spec.case_names
    if cases in (None, "all"):
        return names
    if cases == "heldout":
        held = (model_json.get("provenance") or {}).get("val_cases")
        if not held:
            raise DinomedError("--cases heldout: the model.json provenance names no held-out cases (val_cases)")
        missing = [c for c in held if c not in names]
        if missing:
            raise DinomedError(f"--cases heldout: the model's held-out case(s) {', '.join(missing)} are not in {spec.root}")
        return list(held)
    wanted = cases.split(",") if isinstance(cases, str) else list(cases)
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DinomedError(f"--cases: no case named {', '.join(missing)} in {spec.root}")
    return wanted


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _json_value(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _predict_on_case_grid(model, model_json: dict, spec, case, specs) -> tuple:
    """The model's label map on the case's own grid (resampled to the model grid and back, as dinomed segment), the
    reference labels and the case spacing."""
    import numpy as np
    import SimpleITK as sitk

    from .inference.predict import predict_volume
    from .inference.segment import labels_to_reference, model_grid
    from .io import read_image
    from .finetune.dataset import read_case_labels

    pre = model_json.get("preprocessing") or {}
    reference = read_image(case.label)
    grid = model_grid(reference, pre)
    on_grid = load_case(spec, case, specs, pre)
    pred = predict_volume(model, model_json, on_grid.image)
    if grid is None:
        return pred, on_grid.label, on_grid.spacing
    image = sitk.GetImageFromArray(np.asarray(pred, dtype=np.uint8))
    image.CopyInformation(grid)
    back = sitk.GetArrayFromImage(labels_to_reference(image, reference))
    return back, read_case_labels(spec, case), tuple(float(v) for v in reference.GetSpacing())


def evaluate_model(model_dir: str | Path, data_dir: str | Path, out_csv: str | Path, *,
                   cases: str | list[str] | None = "all", device: str = "auto",
                   events: EventWriter | None = None, nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
                   size_thresholds_ml=SIZE_THRESHOLDS_ML, lesion_labels: list[str] | None = None) -> dict:
    """Segment the dataset's cases with the model folder and score them; returns the JSON report.

    ``nsd_tolerance_mm``: the NSD tolerance (official MedDINOv3 evaluation: 1 mm). ``size_thresholds_ml``: (small/
    medium, medium/large) lesion volumes in ml. ``lesion_labels``: the label names scored per lesion (default: those
    flagged ``lesion: true`` in model.json)."""
    from .models import load_model_folder
    from .preprocess import default_spec
    from .runtime import resolve_device

    events = events or EventWriter(enabled=False, quiet=True)
    out_csv = Path(out_csv)
    started = time.perf_counter()
    if not (isinstance(nsd_tolerance_mm, (int, float)) and nsd_tolerance_mm > 0):
        raise DinomedError(f"the NSD tolerance must be a positive number of millimetres, found {nsd_tolerance_mm!r}")
    thresholds = tuple(float(v) for v in size_thresholds_ml)
    if len(thresholds) != 2 or not 0 < thresholds[0] < thresholds[1]:
        raise DinomedError(f"the lesion size thresholds must be two increasing volumes in ml (small/medium, "
                           f"medium/large), found {list(size_thresholds_ml)}")
    model, model_json = load_model_folder(model_dir, device=resolve_device(device))
    inputs = [i["modality"] if isinstance(i, dict) else str(i) for i in model_json.get("inputs", [])]
    labels = model_json.get("labels") or []
    if not labels:
        raise DinomedError(f"{model_dir}/model.json lists no labels to evaluate")
    data = read_dataset_json(data_dir)
    dataset_names = set(_dataset_label_values(data, Path(data_dir) / "dataset.json").values())
    names = [e["name"] for e in labels]
    missing = [n for n in names if n not in dataset_names]
    if missing:
        raise DinomedError(
            f"{Path(data_dir) / 'dataset.json'}: no reference for the model's label(s) {', '.join(missing)} "
            f"(dataset labels: {', '.join(sorted(dataset_names - {'background'}))})"
        )
    background = sorted(dataset_names - set(names) - {"background"})
    spec = open_dataset(data_dir, inputs, names, background, model_values=[int(e["value"]) for e in labels])
    chosen = _select_cases(spec, model_json, cases)
    specs = (model_json.get("preprocessing") or {}).get("channels") or [default_spec(m) for m in inputs]
    values = {int(e["value"]): e["name"] for e in labels}
    if lesion_labels is None:
        lesion_values = [int(e["value"]) for e in labels if e.get("lesion")]
    else:
        unknown = [n for n in lesion_labels if n not in names]
        if unknown:
            raise DinomedError(f"--lesion-labels: the model has no label {', '.join(unknown)} (labels: {', '.join(names)})")
        lesion_values = [int(e["value"]) for e in labels if e["name"] in lesion_labels]
    per_case, per_lesion = {}, {v: {} for v in lesion_values}
    for done, name in enumerate(chosen, start=1):
        pred, truth, spacing = _predict_on_case_grid(model, model_json, spec, spec.case(name), specs)
        per_case[name] = class_metrics(pred, truth, list(values), spacing, nsd_tolerance_mm=float(nsd_tolerance_mm))
        for v in lesion_values:
            per_lesion[v][name] = lesion_metrics(pred, truth, v, spacing, thresholds)
        events.progress(done, len(chosen), "cases")
    summary = summarize(per_case, values)
    strata = {values[v]: summarize_strata(per_lesion[v], values[v]) for v in lesion_values}

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for name, rows in per_case.items():
        for value, row in rows.items():
            writer.writerow([name, values[value], value, *(_fmt(row[m]) for m in METRIC_NAMES),
                             row["truth_voxels"], row["pred_voxels"]])
    for value, label in values.items():
        writer.writerow(["mean", label, value, *(_fmt(summary["per_class"][label][m]) for m in METRIC_NAMES), "", ""])
    writer.writerow(["mean", "all", "", *(_fmt(summary["mean"][m]) for m in METRIC_NAMES), "", ""])
    # --out x.json writes the JSON report there and the CSV beside it (x.csv); any other name is the CSV
    json_path = out_csv if out_csv.suffix.lower() == ".json" else out_csv.with_suffix(".json")
    out_csv = out_csv.with_suffix(".csv") if out_csv.suffix.lower() == ".json" else out_csv
    atomic_write_text(out_csv, buffer.getvalue())
    stem = out_csv.with_suffix("") if out_csv.suffix.lower() == ".csv" else out_csv
    lesions_csv, strata_csv = Path(f"{stem}.lesions.csv"), Path(f"{stem}.strata.csv")
    if lesion_values:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(LESION_COLUMNS)
        for v in lesion_values:
            for case_name, result in per_lesion[v].items():
                for row in result["lesions"]:
                    writer.writerow([case_name, values[v], row["lesion"], _fmt(row["volume_ml"]), row["stratum"],
                                     int(row["detected"]), _fmt(row["dice"])])
        atomic_write_text(lesions_csv, buffer.getvalue())
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(STRATA_COLUMNS)
        for label, by_stratum in strata.items():
            for stratum in STRATA:
                row = by_stratum[stratum]
                writer.writerow([label, stratum, row["lesions"], row["detected"], _fmt(row["sensitivity"]),
                                 _fmt(row["lesion_dice"]), row["false_positives"]])
        atomic_write_text(strata_csv, buffer.getvalue())

    report = {
        "model": str(Path(model_dir).resolve()),
        "model_name": model_json.get("name"),
        "data": str(Path(data_dir).resolve()),
        "cases": {case: {values[v]: {k: _json_value(x) for k, x in row.items()} for v, row in rows.items()}
                  for case, rows in per_case.items()},
        "per_class": {label: {k: _json_value(x) for k, x in m.items()} for label, m in summary["per_class"].items()},
        "mean": {k: _json_value(x) for k, x in summary["mean"].items()},
        "settings": {"nsd_tolerance_mm": float(nsd_tolerance_mm), "size_thresholds_ml": list(thresholds),
                     "strata": {"small": f"< {thresholds[0]:g} ml", "medium": f"{thresholds[0]:g}-{thresholds[1]:g} ml",
                                "large": f">= {thresholds[1]:g} ml"},
                     "lesion_labels": [values[v] for v in lesion_values]},
        "lesions": {values[v]: {case: {"lesions": [{k: _json_value(x) for k, x in r.items()} for r in res["lesions"]],
                                       "false_positives": res["false_positives"]}
                                for case, res in per_lesion[v].items()} for v in lesion_values},
        "strata": {label: {st: {k: _json_value(x) for k, x in row.items()} for st, row in by.items()}
                   for label, by in strata.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    events.artifact("metrics", str(out_csv))
    events.artifact("metrics_json", str(json_path))
    if lesion_values:
        events.artifact("lesion_metrics", str(lesions_csv))
        events.artifact("strata_metrics", str(strata_csv))
    report["json_path"] = str(json_path)
    return report
