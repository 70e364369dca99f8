"""``dinomed segment``: segment a CT or PET/CT volume with a model folder; label map on the CT grid + lesion table."""
from __future__ import annotations

import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment a CT or PET/CT with a model folder (label map on the CT grid, PET lesion statistics)",
        description="Read the CT (and PET), resample the PET onto the CT grid, run the model (slice batches for 2D "
        "models, sliding windows for 3D models; bf16/fp16 autocast on a GPU), remove components smaller than the "
        "model's minimum size, and write the label map (uint8, on the CT grid) with its label table "
        "(OUT without its image suffix + .labels.json). With --pet and --stats, write the PET lesion statistics "
        "(SUVmax, SUVpeak, SUVmean, MTV, TLG) of the labels the model flags as lesions.",
    )
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="model folder (model.json + model.safetensors)")
    p.add_argument("--ct", required=True, help="CT image (NIfTI, NRRD, MHA) or CT DICOM series folder")
    p.add_argument("--pet", default=None, help="PET image in SUV, or a PET DICOM folder (converted to SUV)")
    p.add_argument("--out", required=True, metavar="SEG", help="output label map (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("--stats", default=None, metavar="STATS", help="lesion statistics table (.csv or .json); needs --pet")
    p.add_argument("--ct-series", default=None, metavar="UID",
                   help="SeriesInstanceUID of the CT series when the --ct DICOM folder holds several")
    p.add_argument("--pet-series", default=None, metavar="UID",
                   help="SeriesInstanceUID of the PET series when the --pet DICOM folder holds several")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--events", action="store_true", help="write JSON-lines events on stdout (progress, artifact, done)")
    p.add_argument("--compile", action="store_true", default=os.environ.get("DINOMED_COMPILE", "") not in ("", "0"),
                   help="experimental: compile a 2D model with torch.compile (TorchInductor) before running it. "
                   "Each run spends 20-50 s compiling (less when the code is cached) for a model part 2-25%% faster "
                   "on a 2-core CPU, so it did not pay for one volume there (README, Measured figures). Checked "
                   "against the uncompiled model on the first batch, which is used on any failure. Default: off, "
                   "or on when DINOMED_COMPILE=1")
    p.add_argument("--profile", action="store_true",
                   help="time each stage (read, resample, normalise, model, argmax, post-process, lesion statistics, "
                   "write): a table on stderr, and the seconds under 'stages' in the done event")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..events import EventWriter
    from ..inference.profile import profiling
    from ..inference.segment import segment_files

    events = EventWriter(enabled=args.events)
    with profiling() as profile:
        result = segment_files(args.model, args.ct, args.out, pet_path=args.pet, stats_path=args.stats,
                               device=args.device, events=events, ct_series=args.ct_series, pet_series=args.pet_series,
                               compile=args.compile)
    message = f"segmented in {result.seconds:.1f} s on {result.device} ({result.precision})"
    if args.pet:
        message += f"; {result.lesion_count} lesion(s)"
    if result.warnings:
        message += f"; {len(result.warnings)} warning(s), listed in {result.paths.get('labels')}"
    events.log(message)
    extra = {"stages": profile.as_dict()["stages"]} if args.profile else {}
    if args.profile:
        print(profile.summary(), file=sys.stderr)
    events.done(seconds=round(result.seconds, 3), lesions=result.lesion_count, **extra)
    return 0
