"""Run a classifier over the splits of a labels table and write the results table (CSV + JSON) and predictions.

``results.csv`` has one row per (seed, fold, part, label) with ``auc, acc, precision, recall, n, n_pos``, the
rows of label ``mean`` (mean over the labels), and, for the test part, rows with fold ``all`` holding the mean
(and in ``results.json`` the standard deviation) over every seed and fold. ``predictions.csv`` holds each
case's probabilities per seed and fold. ``results.json`` also records the method, its parameters, the
features' source and the case ids of every split, so that a result can be traced and rerun.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_write_text
from ..errors import DinomedError
from .embeddings import FeatureSet
from .labels import LabelTable
from .metrics import METRICS, classification_metrics
from .probes import abmil, knn_probabilities, linear_probe
from .splits import Fold

METHODS = ("knn", "linear-probe", "abmil")


@dataclass
class Results:
    method: str
    params: dict
    outputs: list[str]
    rows: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    splits: list[dict] = field(default_factory=list)
    losses: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def test_mean(self, metric: str = "auc") -> float:
        row = next(r for r in self.summary if r["label"] == "mean")
        return row[metric]


def run_classifier(method: str, features: FeatureSet, table: LabelTable, folds_by_seed: dict[int, list[Fold]],
                   token: str, params: dict, threshold: float = 0.5, device: str | None = "cpu", events=None) -> Results:
    """Train and evaluate ``method`` (knn, linear-probe, abmil) on every fold of every seed."""
    if method not in METHODS:
        raise DinomedError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    start = time.perf_counter()
    outputs = table.outputs
    targets = table.targets()
    row_of = {c: i for i, c in enumerate(table.case_ids)}
    res = Results(method, {"token": token, "threshold": threshold, **params}, outputs)
    runs = [(seed, fold) for seed, folds in folds_by_seed.items() for fold in folds]
    for n_run, (seed, fold) in enumerate(runs, start=1):
        parts = fold.parts()
        t = {p: targets[[row_of[c] for c in ids]] for p, ids in parts.items()}
        train_t = t["train"]
        for k, name in enumerate(outputs):
            if len(np.unique(train_t[:, k])) < 2:
                if events is not None:
                    events.log(f"warning: seed {seed} {fold.name}: the training part has only one class of {name!r}")
        query_parts = [p for p in ("val", "test") if parts[p]]
        if method == "abmil":
            bags = {p: features.bags(token, parts[p]) for p in ("train", *query_parts)}

            def on_epoch(epoch, loss, _seed=seed, _fold=fold.name):
                if events is not None and (epoch % 5 == 0 or epoch == params.get("epochs", 20)):
                    events.metric(seed=_seed, fold=_fold, epoch=epoch, loss=round(loss, 6))

            probs, log, _ = abmil(bags["train"], train_t, [bags[p] for p in query_parts], task=table.task,
                                  seed=seed, device=device, on_epoch=on_epoch, **params)
            res.losses.append({"seed": seed, "fold": fold.name, "loss": log.losses})
        else:
            x = {p: features.volume_vectors(token, parts[p]) for p in ("train", *query_parts)}
            if method == "knn":
                probs = [knn_probabilities(x["train"], train_t, x[p], **params) for p in query_parts]
            else:
                def on_epoch(epoch, loss, _seed=seed, _fold=fold.name):
                    if events is not None and (epoch % 10 == 0 or epoch == params.get("epochs", 50)):
                        events.metric(seed=_seed, fold=_fold, epoch=epoch, loss=round(loss, 6))

                probs, log = linear_probe(x["train"], train_t, [x[p] for p in query_parts], task=table.task,
                                          seed=seed, device=device, on_epoch=on_epoch, **params)
                res.losses.append({"seed": seed, "fold": fold.name, "loss": log.losses})
        for part, p in zip(query_parts, probs):
            label_rows, mean = classification_metrics(table.task, outputs, t[part], p, threshold)
            for r in [*label_rows, mean]:
                res.rows.append({"seed": seed, "fold": fold.name, "part": part, **r})
            for case, values in zip(parts[part], p):
                res.predictions.append({"seed": seed, "fold": fold.name, "part": part, "case": case,
                                        **{f"p_{o}": float(v) for o, v in zip(outputs, values)},
                                        **{f"y_{o}": float(v) for o, v in zip(outputs, targets[row_of[case]])}})
        res.splits.append({"seed": seed, "fold": fold.name, **{p: list(ids) for p, ids in parts.items()}})
        if events is not None:
            events.progress(n_run, len(runs), f"{method} runs")
    # the test summary: mean and spread over every seed and fold
    for label in [*outputs, "mean"]:
        test_rows = [r for r in res.rows if r["part"] == "test" and r["label"] == label]
        entry = {"label": label}
        for m in METRICS + (("top1_acc",) if table.task == "multiclass" and label == "mean" else ()):
            vals = [r[m] for r in test_rows if not math.isnan(r[m])]
            entry[m] = float(np.mean(vals)) if vals else math.nan
            entry[f"{m}_std"] = float(np.std(vals)) if len(vals) > 1 else 0.0 if vals else math.nan
        entry["runs"] = len(test_rows)
        res.summary.append(entry)
    res.seconds = time.perf_counter() - start
    return res


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_fmt(r.get(c, "")) for c in columns])
    return buf.getvalue()


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def write_results(res: Results, out_dir: str | Path, features: FeatureSet, table: LabelTable,
                  features_path: str) -> dict[str, Path]:
    """Write ``results.csv``, ``results.json`` and ``predictions.csv`` into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    columns = ["method", "seed", "fold", "part", "label", *METRICS, "n", "n_pos"]
    rows = [{"method": res.method, **r} for r in res.rows]
    rows += [{"method": res.method, "seed": "all", "fold": "all", "part": "test", **r} for r in res.summary]
    paths = {"results_csv": out / "results.csv", "results_json": out / "results.json",
             "predictions_csv": out / "predictions.csv"}
    atomic_write_text(paths["results_csv"], _csv(rows, columns))
    pred_columns = ["seed", "fold", "part", "case", *[f"p_{o}" for o in res.outputs], *[f"y_{o}" for o in res.outputs]]
    atomic_write_text(paths["predictions_csv"], _csv(res.predictions, pred_columns))
    document = {
        "format": "dinomed-classify-results/1",
        "method": res.method,
        "params": res.params,
        "task": table.task,
        "labels": table.names,
        "outputs": res.outputs,
        "labels_table": str(Path(table.path).resolve()),
        "features": str(Path(features_path).resolve()),
        "encoder": {k: features.meta.get(k) for k in ("model", "weights_hash", "layer", "modalities", "resize", "embed_dim")},
        "summary": res.summary,
        "rows": res.rows,
        "splits": res.splits,
        "losses": res.losses,
        "seconds": round(res.seconds, 3),
    }
    atomic_write_text(paths["results_json"], json.dumps(_json_safe(document), indent=1))
    return paths


def summary_text(res: Results, title: str = "") -> str:
    """The printed summary: test metrics per label and their mean (mean ± std over seeds and folds)."""
    runs = res.summary[0]["runs"] if res.summary else 0
    lines = [f"{title or res.method}: test metrics, mean over {runs} run(s) (seeds × folds)"]
    width = max(8, *(len(r["label"]) for r in res.summary))
    lines.append(f"  {'label':<{width}}  " + "  ".join(f"{m:>13}" for m in METRICS))
    for r in res.summary:
        cells = []
        for m in METRICS:
            v, s = r[m], r[f"{m}_std"]
            cells.append(f"{'n/a':>13}" if math.isnan(v) else (f"{v:.3f} ± {s:.3f}".rjust(13) if runs > 1 else f"{v:>13.3f}"))
        lines.append(f"  {r['label']:<{width}}  " + "  ".join(cells))
    mean = next((r for r in res.summary if r["label"] == "mean"), None)
    if mean is not None and "top1_acc" in mean:
        lines.append(f"  top-1 accuracy over the classes: {mean['top1_acc']:.3f}")
    return "\n".join(lines)
