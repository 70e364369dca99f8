"""``dinomed evaluate``: score a model folder on a labeled dataset (per case and class Dice, HD95, precision, recall)."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a model folder on a labeled dataset (Dice, HD95, precision, recall per case and label)",
        description="Segment every case of DATASET_DIR (nnU-Net raw layout) with the model, as dinomed segment does, "
        "and compare with labelsTr/ (labels matched by name; dataset labels the model does not know count as "
        "background). Writes METRICS.csv (one row per case and label, then per-label means and the overall mean; "
        "HD95 in mm; empty cells where a metric is undefined) and METRICS.json beside it.",
    )
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="model folder (model.json + model.safetensors)")
    p.add_argument("--data", required=True, metavar="DATASET_DIR", help="labeled dataset folder (nnU-Net raw layout)")
    p.add_argument("--out", required=True, metavar="METRICS.csv",
                   help="output table: METRICS.csv (the JSON report is written beside it as METRICS.json) or "
                        "METRICS.json (the CSV beside it as METRICS.csv)")
    p.add_argument("--cases", default="all",
                   help="all (default), heldout (the model's validation cases from its provenance), or NAME,NAME,…")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--events", action="store_true", help="JSON-lines events on stdout (progress, metric, artifact, done)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..events import EventWriter
    from ..finetune.evaluate import evaluate_model

    from pathlib import Path

    from ..safety import check_writable, refuse_output_over_input

    events = EventWriter(enabled=args.events)
    out = check_writable(args.out, "metrics table", (".csv", ".json"))
    both = [("--out", out), ("the metrics beside --out", out.with_suffix(".json" if out.suffix.lower() == ".csv" else ".csv"))]
    model = Path(args.model)
    refuse_output_over_input(both, [("--model", model / "model.json"), ("--model weights", model / "model.safetensors"),
                                    ("the dataset's dataset.json", Path(args.data) / "dataset.json")])
    report = evaluate_model(args.model, args.data, args.out, cases=args.cases, device=args.device, events=events)
    mean = report["mean"]
    events.metric(phase="evaluate", cases=len(report["cases"]),
                  **{k: v for k, v in mean.items() if v is not None})
    events.done(cases=len(report["cases"]))
    return 0
