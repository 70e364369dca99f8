"""``dinomed info CHECKPOINT``: what a backbone checkpoint is and whether it loads exactly."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe a DINOv3 backbone checkpoint (format, architecture, parameters, missing/unexpected keys)",
        description="Detect a checkpoint's format (Meta .pth, DINOv3/MedDINOv3 training checkpoint with a teacher dict, "
        "Hugging Face DINOv3ViTModel folder or safetensors, timm safetensors), infer its architecture and load it "
        "into timm's layout, reporting every tensor that did not fit.",
    )
    p.add_argument("checkpoint", help="a checkpoint file or folder")
    p.add_argument("--arch", default=None, help="architecture to load into (default: inferred), e.g. vit_small")
    p.add_argument("--in-chans", type=int, default=None, help="adapt the patch embedding to this many input channels")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from dataclasses import asdict

    from ..backbones import load_backbone

    model = load_backbone(args.checkpoint, arch=args.arch, in_chans=args.in_chans, strict=False)
    report = model.load_report
    print(json.dumps(asdict(report), indent=2) if args.json else report.summary())
    return 0 if not report.missing else 1
