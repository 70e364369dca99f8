"""``dinomed export-backbone RUN_DIR --out backbone.pth``: the pretrained teacher as a DINOv3 backbone file."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-backbone",
        help="export the teacher of a pretraining run as a backbone in Meta's DINOv3 format",
        description=(
            "Write the EMA teacher backbone of a `dinomed pretrain` run (RUN_DIR or its teacher_checkpoint.pth) as "
            "Meta's DINOv3 backbone .pth (plain tensors), which load_backbone and every model of the project load."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a pretraining run folder (or its teacher_checkpoint.pth)")
    parser.add_argument("--out", required=True, metavar="FILE", help="backbone file to write, e.g. backbone.pth")
    parser.add_argument("--events", action="store_true", help="write JSON-lines events on stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..events import EventWriter
    from ..pretrain import export_backbone

    from pathlib import Path

    from ..safety import check_writable, refuse_output_over_input

    events = EventWriter(enabled=args.events)
    check_writable(args.out, "backbone")
    run = Path(args.run_dir)
    sources = [("RUN_DIR", run)] + ([("the run's teacher_checkpoint.pth", run / "teacher_checkpoint.pth")] if run.is_dir() else [])
    refuse_output_over_input([("--out", args.out)], sources)
    path, report = export_backbone(args.run_dir, args.out)
    events.log(report.summary())
    events.artifact("backbone", str(path))
    events.done()
    return 0
