"""``dinomed phantom``: write synthetic PET/CT phantoms (one case, or an nnU-Net dataset of several)."""
from __future__ import annotations


def _shape(text: str) -> tuple[int, int, int]:
    import argparse

    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 8:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X (three integers of at least 8), got {text!r}")
    return values


# Peak memory per CT voxel of one phantom: 8.25 GB for 800x512x512 (/usr/bin/time -v, maximum resident set).
BYTES_PER_VOXEL = 40


def _check_request(args) -> None:
    """Refuse, before any work, a seed numpy cannot take, an --out that is a file, and a shape whose phantom
    would not fit in this machine's free memory (saying how much it would need)."""
    from pathlib import Path

    import numpy as np
    import psutil

    from ..errors import DinomedError
    from ..safety import check_writable

    if args.seed < 0 or args.seed >= 2**32:
        raise DinomedError(f"--seed must be an integer from 0 to {2**32 - 1}, got {args.seed}")
    if args.lesions is not None and args.lesions < 0:
        raise DinomedError(f"--lesions must be 0 or more, got {args.lesions}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DinomedError(f"{out}: --out must be a folder (the phantom is several files), but a file of that name exists")
    check_writable(out / "phantom.json", "phantom")
    need = int(np.prod(args.shape, dtype=np.float64)) * BYTES_PER_VOXEL
    free = psutil.virtual_memory().available
    if need > free:
        raise DinomedError(
            f"--shape {','.join(map(str, args.shape))} would need about {need / 2**30:.1f} GiB of memory "
            f"({BYTES_PER_VOXEL} bytes per voxel), but {free / 2**30:.1f} GiB are free; choose a smaller shape"
        )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "phantom",
        help="write synthetic PET/CT phantoms (CT in HU, PET in SUV on its own grid, organ and lesion labels)",
        description="Write one seeded synthetic PET/CT case (ct.nii.gz, pet.nii.gz on the native PET grid, "
        "labels.nii.gz with organs and lesions, organs/lesions maps, phantom.json, dataset.json; with --dicom also "
        "ct_dicom/ and pet_dicom/ series with every SUV tag), or with --cases N an nnU-Net raw dataset of N cases "
        "with seeds SEED..SEED+N-1 (imagesTr/case_XXXX_0000 CT, _0001 PET on the CT grid, labelsTr, dataset.json).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (first seed with --cases)")
    p.add_argument("--shape", type=_shape, default=(64, 128, 128), help="CT size Z,Y,X (default 64,128,128)")
    p.add_argument("--dicom", action="store_true", help="also write the CT and PET as DICOM series (single case)")
    p.add_argument("--cases", type=int, default=None, help="write an nnU-Net dataset of this many cases instead")
    p.add_argument("--lesions", type=int, default=None, help="lesions per case (default: 1-8 from the seed)")
    p.add_argument("--lesion-free", type=float, default=0.0, metavar="FRACTION",
                   help="with --cases: draw about this fraction of the cases without lesions (default 0; the other "
                        "cases are unchanged), for a classification task")
    p.add_argument("--classification-csv", action="store_true",
                   help="with --cases: also write classification.csv (case, patient, lesion, liver_lesion, contrast, "
                        "lung_in_view, liver_in_view: 0/1 labels of what each phantom contains), the labels table of dinomed classify")
    p.add_argument("--oblique", action="store_true", help="tilt the CT and PET grids by a few degrees")
    p.add_argument("--variety", choices=["standard", "wide"], default="standard",
                   help="ranges of the random draws: standard (default, the phantoms of earlier versions) or wide "
                        "(body and organ sizes and positions, HU/SUV levels, noise, spacing 0.7-4 mm, slices 1-5 mm, "
                        "0-12 lesions of 4-45 mm and lower contrast; --shape is then the largest matrix)")
    p.add_argument("--events", action="store_true", help="write JSON-lines events on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from ..errors import DinomedError
    from ..events import EventWriter
    from ..synthetic import make_phantom, write_nnunet_dataset, write_phantom_case

    events = EventWriter(enabled=args.events)
    if args.cases is None and (args.lesion_free or args.classification_csv):
        raise DinomedError("--lesion-free and --classification-csv describe a dataset; add --cases N")
    if not 0.0 <= args.lesion_free <= 1.0:
        raise DinomedError(f"--lesion-free must be a fraction between 0 and 1, got {args.lesion_free}")
    _check_request(args)
    if args.cases is not None:
        if args.cases < 1:
            raise DinomedError(f"--cases must be at least 1, got {args.cases}")
        if args.dicom:
            raise DinomedError("--dicom writes one case; leave it out with --cases (the dataset is NIfTI)")
        start = time.perf_counter()
        path = write_nnunet_dataset(args.out, range(args.seed, args.seed + args.cases), shape=args.shape,
                                    progress=events.progress, n_lesions=args.lesions, oblique=args.oblique,
                                    lesion_free_fraction=args.lesion_free, classification_csv=args.classification_csv,
                                    variety=args.variety)
        events.log(f"{args.cases} cases in {time.perf_counter() - start:.1f} s")
        events.artifact("dataset", str(path))
        events.done()
        return 0
    events.progress(0, 1, "phantom")
    phantom = make_phantom(args.seed, shape=args.shape, n_lesions=args.lesions, oblique=args.oblique,
                           variety=args.variety)
    paths = write_phantom_case(phantom, args.out, dicom=args.dicom)
    events.progress(1, 1, "phantom")
    for kind, path in paths.items():
        events.artifact(kind, str(path))
    kinds = ", ".join(f"{les.kind} {les.diameter_mm:.0f} mm" for les in phantom.lesion_list) or "none"
    events.log(f"seed {args.seed}: CT {phantom.ct.GetSize()} voxels, PET {phantom.pet.GetSize()}; lesions: {kinds}")
    events.done()
    return 0
