"""``dinomed lesions``: PET lesion statistics (SUVmax, SUVpeak, SUVmean, MTV, TLG) from a PET and a label map."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "lesions",
        help="PET lesion statistics per connected lesion and in total (SUVmax, SUVpeak, SUVmean, MTV, TLG)",
        description="Split each label of SEG into connected lesions (26-connectivity) and measure them on the PET "
        "(in SUV). The PET is resampled (linear) onto the label grid when the grids differ.",
    )
    p.add_argument("--pet", required=True, help="PET volume in SUV (file, or a DICOM folder read as stored values)")
    p.add_argument("--seg", required=True, help="label map (0 = background)")
    p.add_argument("--out", required=True, help="CSV table to write")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--labels", default=None, help="comma-separated label values to measure (default: the labels marked "
                   "as lesions in SEG's .labels.json written by dinomed segment, else all non-zero labels)")
    p.add_argument("--events", action="store_true", help="write JSON-lines events on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..errors import DinomedError
    from ..events import EventWriter
    from ..inference.segment import label_sidecar_path
    from ..io import read_image
    from ..petct import lesion_statistics, resample_to_reference, same_grid, write_lesion_table

    events = EventWriter(enabled=args.events)
    pet = read_image(args.pet)
    seg = read_image(args.seg)
    if not same_grid(pet, seg):
        events.log("the PET is not on the label grid: resampling it onto the label grid (linear)")
        pet = resample_to_reference(pet, seg, "linear", 0.0, name=str(args.pet), reference_name=str(args.seg))
    values = None
    if args.labels:
        try:
            values = [int(v) for v in args.labels.split(",")]
        except ValueError:
            raise DinomedError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
    names = None
    sidecar = label_sidecar_path(args.seg)
    if sidecar.is_file():
        # a label map written by `dinomed segment`: name the labels, and measure its lesion labels by default
        try:
            entries = json.loads(sidecar.read_text())["labels"]
            names = {int(e["value"]): str(e["name"]) for e in entries}
        except (ValueError, KeyError, TypeError) as exc:
            raise DinomedError(f"{sidecar}: not a dinomed label table ({exc})") from None
        lesion_values = [int(e["value"]) for e in entries if e.get("lesion")]
        if values is None and lesion_values:
            values = lesion_values
            events.log(f"measuring the lesion label(s) of {sidecar.name}: "
                       + ", ".join(f"{v} ({names[v]})" for v in values) + " (--labels to choose others)")
    rows = lesion_statistics(pet, seg, label_values=values, label_names=names)
    write_lesion_table(rows, args.out)
    events.artifact("table", str(args.out))
    if args.json:
        write_lesion_table(rows, args.json)
        events.artifact("table", str(args.json))
    for row in rows:
        if row.lesion == "total":
            events.log(f"{row.name}: {sum(1 for r in rows if r.label == row.label) - 1} lesions, MTV {row.mtv_ml:.2f} ml, "
                       f"SUVmax {row.suv_max:.2f}, SUVpeak {row.suv_peak:.2f}, TLG {row.tlg:.2f}")
    events.done()
    return 0
