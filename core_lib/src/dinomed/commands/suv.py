"""``dinomed suv``: convert a PET DICOM series to an SUV volume (QIBA)."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "suv",
        help="convert a PET DICOM series to SUV (QIBA; BQML, Philips CNTS, GML) and write it as a volume",
        description="Read a PET DICOM series (a folder, or a file), compute the SUV the way QIBA's vendor-neutral "
        "pseudo-code does (body weight by default; SUL, BSA or ideal body weight with --kind), and write it "
        "with the series' geometry. Prints the SUV factor and the header tags it came from.",
    )
    p.add_argument("pet", help="PET DICOM folder or file")
    p.add_argument("--out", required=True, help="output volume (.nii.gz, .nrrd, .mha)")
    p.add_argument("--series-uid", default=None, help="SeriesInstanceUID when the folder holds several series")
    p.add_argument("--kind", default="bw", choices=["bw", "lbm", "bsa", "ibw"], help="SUV normalisation (default bw)")
    p.add_argument("--json", action="store_true", help="print the factors as JSON")
    p.add_argument("--events", action="store_true", help="write JSON-lines events on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..events import EventWriter
    from ..io import write_image
    from ..petct import suv_from_dicom

    from pathlib import Path

    from ..io import IMAGE_SUFFIXES
    from ..safety import check_writable, refuse_output_over_input

    events = EventWriter(enabled=args.events)
    source = Path(args.pet)
    inputs = [("PET_DICOM", f) for f in (sorted(source.iterdir()) if source.is_dir() else [source])]
    refuse_output_over_input([("--out", args.out)], inputs)
    check_writable(args.out, "SUV image", tuple(x for x in IMAGE_SUFFIXES if x not in (".nhdr", ".mhd")))
    image, factors = suv_from_dicom(args.pet, series_uid=args.series_uid, kind=args.kind, return_factors=True)
    write_image(image, args.out)
    if args.json:
        if not args.events:
            print(json.dumps(factors.as_dict(), indent=2, default=str))
    else:
        factor = factors.factor(args.kind)
        lines = [f"SUV{args.kind} factor: {factor:.8g} per {factors.units} unit", f"reference time rule: {factors.reference_rule}"]
        if factors.decay_time_s is not None:
            lines.append(f"decay time: {factors.decay_time_s:.1f} s (injection {factors.injection_time}, "
                         f"reference {factors.reference_time}); decayed dose {factors.decayed_dose_bq:.6g} Bq")
        lines += [f"  {k}: {v}" for k, v in factors.tags.items()]
        stream_print = events.log if args.events else print
        for line in lines:
            stream_print(line)
    events.metric(suv_factor=factors.factor(args.kind), kind=args.kind, units=factors.units)
    events.artifact("suv", str(args.out))
    events.done()
    return 0
