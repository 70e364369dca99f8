"""``dinomed demo``: segment the bundled synthetic PET/CT sample case with the bundled demo model.

Writes the label map, the lesion table (CSV + JSON) and an overview PNG (CT, PET fused over the CT, the
segmentation's contours, for a few axial slices) into ``--out`` and prints what was found, with the Dice of
each label against the sample's ground truth. The demo model knows only synthetic phantoms.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[4]  # core_lib/src/dinomed/commands -> the repository
DEMO_MODEL_DIR = REPO_ROOT / "Resources" / "Models" / "demo"
SAMPLE_DIR = REPO_ROOT / "Resources" / "SampleData"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="segment the bundled synthetic PET/CT sample with the bundled demo model (label map, lesion table, overview PNG)",
        description="Segment Resources/SampleData (a synthetic PET/CT phantom) with Resources/Models/demo (a small "
        "DINOv3 model trained on synthetic phantoms only) and write segmentation.nii.gz, its label table, "
        "lesions.csv, lesions.json and overview.png into --out; print the lesions found and the Dice of each label "
        "against the sample's ground truth.",
    )
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--model", default=None, help=f"model folder (default: the bundled {DEMO_MODEL_DIR})")
    p.add_argument("--sample", default=None, help=f"sample case folder with ct.nii.gz, pet.nii.gz, labels.nii.gz (default: {SAMPLE_DIR})")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    p.add_argument("--events", action="store_true", help="write JSON-lines events on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import DinomedError
    from ..events import EventWriter
    from ..inference.demo import run_demo

    model_dir = Path(args.model) if args.model else DEMO_MODEL_DIR
    sample_dir = Path(args.sample) if args.sample else SAMPLE_DIR
    if not (model_dir / "model.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise DinomedError(
            f"{model_dir}: the demo model folder is missing or incomplete (expected model.json and model.safetensors); "
            "train it with `dinomed finetune demo --data DATASET --out MODEL_DIR` (scripts/train_demo_models.sh makes the "
            "data set and runs it) and place the model folder there, or pass --model MODEL_DIR"
        )
    for name in ("ct.nii.gz", "pet.nii.gz"):
        if not (sample_dir / name).is_file():
            raise DinomedError(f"{sample_dir}: the sample case has no {name}; see Resources/SampleData/README.md to make it")
    events = EventWriter(enabled=args.events)
    report = run_demo(model_dir, sample_dir, Path(args.out), device=args.device, events=events)
    if not args.events:
        print(report.summary())
    events.done(**report.as_event())
    return 0
