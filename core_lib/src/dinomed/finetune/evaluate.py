"""Evaluating a model folder on a labeled dataset: per case and class Dice, HD95, precision, recall, and means.

The model segments each case whole (:func:`dinomed.inference.predict.predict_volume`, as ``dinomed segment`` does);
the reference labels are mapped onto the model's labels by name (dataset labels the model does not know count as
background). The table is written as CSV (one row per case and label, then the per-label means and the overall
mean) and as JSON beside it, both atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import DinomedError
from ..events import EventWriter
from .dataset import _dataset_label_values, load_case, open_dataset, read_dataset_json
from .metrics import METRIC_NAMES, class_metrics, summarize

CSV_COLUMNS = ("case", "label", "value", *METRIC_NAMES, "truth_voxels", "pred_voxels")


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


def evaluate_model(model_dir: str | Path, data_dir: str | Path, out_csv: str | Path, *,
                   cases: str | list[str] | None = "all", device: str = "auto",
                   events: EventWriter | None = None) -> dict:
    """Segment the dataset's cases with the model folder and score them; returns the JSON report."""
    from ..models import load_model_folder
    from ..inference.predict import predict_volume
    from ..preprocess import default_spec
    from ..runtime import resolve_device

    events = events or EventWriter(enabled=False, quiet=True)
    out_csv = Path(out_csv)
    started = time.perf_counter()
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
    per_case = {}
    for done, name in enumerate(chosen, start=1):
        case = load_case(spec, spec.case(name), specs)
        pred = predict_volume(model, model_json, case.image)
        per_case[name] = class_metrics(pred, case.label, list(values), case.spacing)
        events.progress(done, len(chosen), "cases")
    summary = summarize(per_case, values)

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

    report = {
        "model": str(Path(model_dir).resolve()),
        "model_name": model_json.get("name"),
        "data": str(Path(data_dir).resolve()),
        "cases": {case: {values[v]: {k: _json_value(x) for k, x in row.items()} for v, row in rows.items()}
                  for case, rows in per_case.items()},
        "per_class": {label: {k: _json_value(x) for k, x in m.items()} for label, m in summary["per_class"].items()},
        "mean": {k: _json_value(x) for k, x in summary["mean"].items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    events.artifact("metrics", str(out_csv))
    events.artifact("metrics_json", str(json_path))
    report["json_path"] = str(json_path)
    return report
