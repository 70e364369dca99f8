"""The tables of scripts/train_demo_models.sh: per-class Dice and lesion detection by size of each model on each
held-out set, from the ``eval_<set>.json`` reports ``dinomed evaluate`` wrote beside each model, and the wall time of
each stage from ``timings.txt``. Prints Markdown (the script tees it to WORK_DIR/summary.md).

    python scripts/demo_models_summary.py WORK_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SETS = {"heldout": "wide held-out phantoms (seeds 9000+)", "standard": "standard-generator phantoms (seeds 9500+)"}
MODELS = {"demo": "PET/CT, pretrained encoders", "demo_random_init": "PET/CT, random encoders (same budget)",
          "demo_ct_organs": "CT organs, pretrained CT encoder"}


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _model_steps(model_dir: Path) -> str:
    doc = json.loads((model_dir / "model.json").read_text())
    metrics = (doc.get("provenance") or {}).get("metrics") or {}
    dice = metrics.get("dice")
    return f"best validation step {metrics.get('step', '?')} (validation mean Dice {_fmt(dice)})"


def summarize(work: Path) -> str:
    lines = [f"# Demo models: {work}", ""]
    timings = work / "timings.txt"
    if timings.is_file():
        lines += ["Stages (UTC):", "", "```", timings.read_text().strip(), "```", ""]
    for set_name, set_title in SETS.items():
        reports = {m: work / "models" / m / f"eval_{set_name}.json" for m in MODELS}
        reports = {m: json.loads(p.read_text()) for m, p in reports.items() if p.is_file()}
        if not reports:
            continue
        labels: list[str] = []
        for rep in reports.values():
            labels += [name for name in rep["per_class"] if name not in labels]
        n_cases = max(len(rep["cases"]) for rep in reports.values())
        lines += [f"## {set_title}: {n_cases} cases", "",
                  "Dice per class (mean over the cases that hold the class; – where the model has no such class)", "",
                  "| model | " + " | ".join(labels) + " | mean |", "|---" * (len(labels) + 2) + "|"]
        for m, rep in reports.items():
            cells = [_fmt((rep["per_class"].get(name) or {}).get("dice")) for name in labels]
            lines.append(f"| {m} ({MODELS[m]}) | " + " | ".join(cells) + f" | {_fmt(rep['mean'].get('dice'))} |")
        lines.append("")
        strata_rows = []
        for m, rep in reports.items():
            for label, strata in (rep.get("strata") or {}).items():
                cells = []
                for key in ("small", "medium", "large"):
                    s = strata.get(key) or {}
                    cells.append(f"{s.get('detected', 0)}/{s.get('lesions', 0)}")
                fp = sum(int((strata.get(k) or {}).get("false_positives", 0)) for k in ("small", "medium", "large"))
                strata_rows.append(f"| {m} | {label} | " + " | ".join(cells) + f" | {fp} |")
        if strata_rows:
            thresholds = next(iter(reports.values()))["settings"]["strata"]
            lines += ["Lesions detected / reference lesions, by volume "
                      f"(small {thresholds['small']}, medium {thresholds['medium']}, large {thresholds['large']})", "",
                      "| model | label | small | medium | large | false-positive components |", "|---|---|---|---|---|---|",
                      *strata_rows, ""]
    lines += ["## Models", ""]
    for m in MODELS:
        folder = work / "models" / m
        if (folder / "model.json").is_file():
            lines.append(f"- {m}: {_model_steps(folder)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: demo_models_summary.py WORK_DIR")
    sys.stdout.write(summarize(Path(sys.argv[1])))
