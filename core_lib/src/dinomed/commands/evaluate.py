"""``dinomed evaluate``: score a model folder on a labeled dataset (per case and class Dice, HD95, precision, recall,
NSD; per lesion by size stratum)."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a model folder on a labeled dataset (Dice, HD95, precision, recall per case and label)",
        description="Segment every case of DATASET_DIR (nnU-Net raw layout) with the model, as dinomed segment does, "
        "and compare with labelsTr/ (labels matched by name; dataset labels the model does not know count as "
        "background). Writes METRICS.csv (one row per case and label, then per-label means and the overall mean; "
        "HD95 in mm; NSD = normalised surface Dice at --nsd-tolerance-mm; empty cells where a metric is undefined) and "
        "METRICS.json beside it. For the lesion labels (flagged lesion: true in model.json, or --lesion-labels): "
        "METRICS.lesions.csv (one row per reference lesion: volume, size stratum, detected, Dice) and "
        "METRICS.strata.csv (per stratum: lesions, detected, sensitivity, mean lesion Dice, false positives).",
    )
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="model folder (model.json + model.safetensors)")
    p.add_argument("--data", required=True, metavar="DATASET_DIR", help="labeled dataset folder (nnU-Net raw layout)")
    p.add_argument("--out", required=True, metavar="METRICS.csv",
                   help="output table: METRICS.csv (the JSON report is written beside it as METRICS.json) or "
                        "METRICS.json (the CSV beside it as METRICS.csv)")
    p.add_argument("--cases", default="all",
                   help="all (default), heldout (the model's validation cases from its provenance), or NAME,NAME,…")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--nsd-tolerance-mm", type=float, default=1.0, metavar="MM",
                   help="NSD tolerance in mm (default 1.0, the official MedDINOv3 evaluation's)")
    p.add_argument("--size-thresholds-ml", default="1,10", metavar="SMALL,LARGE",
                   help="lesion volume thresholds in ml: small < SMALL <= medium < LARGE <= large (default 1,10: ours; "
                   "the Dual-DINOv3 text we build from reports by tumour size without giving thresholds)")
    p.add_argument("--lesion-labels", default=None, metavar="NAME,NAME",
                   help="labels scored per lesion (default: those flagged lesion: true in model.json)")
    p.add_argument("--events", action="store_true", help="JSON-lines events on stdout (progress, metric, artifact, done)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..events import EventWriter
    from ..evaluate import evaluate_model

    from pathlib import Path

    from ..errors import DinomedError
    from ..safety import check_writable, refuse_output_over_input

    events = EventWriter(enabled=args.events)
    try:
        thresholds = [float(v) for v in args.size_thresholds_ml.split(",")]
    except ValueError:
        raise DinomedError(f"--size-thresholds-ml: expected two volumes in ml such as 1,10, found {args.size_thresholds_ml!r}") from None
    lesion_labels = [n.strip() for n in args.lesion_labels.split(",") if n.strip()] if args.lesion_labels else None
    out = check_writable(args.out, "metrics table", (".csv", ".json"))
    both = [("--out", out), ("the metrics beside --out", out.with_suffix(".json" if out.suffix.lower() == ".csv" else ".csv"))]
    model = Path(args.model)
    refuse_output_over_input(both, [("--model", model / "model.json"), ("--model weights", model / "model.safetensors"),
                                    ("the dataset's dataset.json", Path(args.data) / "dataset.json")])
    report = evaluate_model(args.model, args.data, args.out, cases=args.cases, device=args.device, events=events,
                            nsd_tolerance_mm=args.nsd_tolerance_mm, size_thresholds_ml=thresholds,
                            lesion_labels=lesion_labels)
    mean = report["mean"]
    events.metric(phase="evaluate", cases=len(report["cases"]),
                  **{k: v for k, v in mean.items() if v is not None})
    events.done(cases=len(report["cases"]))
    return 0
