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

    events = EventWriter(enabled=args.events)
    path, report = export_backbone(args.run_dir, args.out)
    events.log(report.summary())
    events.artifact("backbone", str(path))
    events.done()
    return 0
