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


def _label_values(text: str) -> list[int]:
    from ..errors import DinomedError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DinomedError(f"--labels must be comma-separated label values (integers 1-255), got {text!r}") from None
    if not values:
        raise DinomedError(f"--labels names no label value, got {text!r}")
    bad = [v for v in values if v < 1]
    if bad:
        raise DinomedError(f"--labels {text}: label values are positive integers (0 is background), found {bad[0]}")
    return values


def run(args) -> int:
    import json

    import numpy as np
    import SimpleITK as sitk

    from ..errors import DinomedError
    from ..events import EventWriter
    from ..inference.segment import label_sidecar_path
    from ..io import read_image
    from ..petct import (
        field_of_view_mask,
        fov_warnings,
        lesion_statistics,
        resample_to_reference,
        same_grid,
        write_lesion_table,
    )
    from ..preprocess import check_pet_is_suv
    from ..safety import check_writable, dicom_modality, pet_warnings, refuse_ct_as_pet, refuse_output_over_input

    events = EventWriter(enabled=args.events)
    # every output checked before anything is read or written: a bad --json must not leave the CSV behind
    check_writable(args.out, "lesion table", (".csv",))
    if args.json:
        check_writable(args.json, "lesion table (JSON)", (".json",))
    refuse_output_over_input([("--out", args.out), ("--json", args.json)],
                             [("--pet", args.pet), ("--seg", args.seg), ("the label table", label_sidecar_path(args.seg))])
    values = _label_values(args.labels) if args.labels else None

    pet = read_image(args.pet)
    refuse_ct_as_pet(pet, f"PET {args.pet}", dicom_modality(args.pet))
    check_pet_is_suv(sitk.GetArrayViewFromImage(pet), f"PET {args.pet}")
    warnings = [m for m in pet_warnings(pet, f"PET {args.pet}")]
    seg = read_image(args.seg)
    if args.labels:
        array = sitk.GetArrayViewFromImage(seg)
        present = sorted(int(v) for v in np.unique(array[array != 0])) if array.size else []
        missing = [v for v in values if v not in present]
        if missing:
            raise DinomedError(
                f"{args.seg}: --labels {args.labels}: label value(s) {', '.join(map(str, missing))} do not occur in the "
                f"label map; it holds {', '.join(map(str, present)) or 'no label (all background)'}"
            )
    if not same_grid(pet, seg):
        events.log("the PET is not on the label grid: resampling it onto the label grid (linear)")
        fov = field_of_view_mask(pet, seg)
        pet = resample_to_reference(pet, seg, "linear", 0.0, name=str(args.pet), reference_name=str(args.seg))
    else:
        fov = None
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
    rows = lesion_statistics(pet, seg, label_values=values, label_names=names, pet_fov=fov)
    warnings += fov_warnings(rows, f"the PET {args.pet}")
    for message in warnings:
        events.warning(message)
    write_lesion_table(rows, args.out)
    events.artifact("table", str(args.out))
    if args.json:
        write_lesion_table(rows, args.json)
        events.artifact("table", str(args.json))
    for row in rows:
        if row.lesion == "total":
            events.log(f"{row.name}: {sum(1 for r in rows if r.label == row.label) - 1} lesions, MTV {row.mtv_ml:.2f} ml, "
                       f"SUVmax {row.suv_max:.2f}, SUVpeak {row.suv_peak:.2f}, TLG {row.tlg:.2f}")
    if not rows:
        events.warning(f"{args.seg}: no lesion voxels in the label map: the table is empty")
    events.done(warnings=len(warnings))
    return 0
