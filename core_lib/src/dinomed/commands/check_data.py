"""``dinomed check-data finetune|pretrain CONFIG [key=value …] --data DIR``: check a dataset before training.

The same checks, with the same one-line errors, as ``dinomed finetune`` / ``dinomed pretrain`` run before their
first step (the code is theirs: ``open_dataset`` + ``validate_dataset``; ``scan_volume_folder`` +
``check_first_volume``), and a summary: how many volumes, the modality, the spacing range; for finetuning the
cases per class and the training / held-out split. With ``--events`` the summary is the final ``done`` event.
"""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check-data",
        help="check a dataset for finetuning or pretraining before training (counts, modality, spacing, labels)",
        description="Check DIR as dinomed finetune|pretrain CONFIG would before its first step, without training: "
        "finetuning: dataset.json, every case's channels and label map (cases without labels, label values not in "
        "dataset.json or not named by the recipe, label maps off their image grid); pretraining: the volumes under "
        "DIR (unreadable files, a PET not in SUV). Prints the number of volumes, the modality and the spacing range "
        "(with --events: the final done event carries them). Exit status 0 when the data can be trained on, 2 with "
        "one line naming the file and the problem otherwise.",
    )
    p.add_argument("kind", choices=("finetune", "pretrain"), help="what the data is for")
    p.add_argument("config", metavar="CONFIG", help="the recipe or stage config (a YAML file or a bundled name)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for the training command")
    p.add_argument("--data", required=True, metavar="DIR", help="labeled dataset (finetune) or folder of volumes (pretrain)")
    p.add_argument("--events", action="store_true", help="JSON-lines events on stdout (progress, log, done with the summary)")
    p.set_defaults(func=run)


def _spacing_range(spacings: list) -> dict:
    if not spacings:
        return {"spacing_min": None, "spacing_max": None}
    columns = list(zip(*spacings))
    return {"spacing_min": [round(min(c), 4) for c in columns], "spacing_max": [round(max(c), 4) for c in columns]}


def check_finetune(cfg: dict, data_dir, events) -> dict:
    from ..finetune.dataset import open_dataset, read_header, split_cases, validate_dataset

    spec = open_dataset(data_dir, cfg["inputs"], cfg["labels"], cfg["background_labels"])
    counts = validate_dataset(spec, progress=events.progress)
    train, val = split_cases(spec.case_names, cfg["data"])
    spacings = [tuple(read_header(c.label).GetSpacing()) for c in spec.cases]
    cases_with = {e["name"]: sum(1 for c in counts.values() if c[e["value"]] > 0) for e in spec.labels.entries}
    return {"kind": "finetune", "volumes": len(spec.cases), "cases": len(spec.cases), "modality": list(cfg["inputs"]),
            "labels": spec.labels.names, "cases_with_label": cases_with, "train_cases": len(train),
            "heldout_cases": len(val), **_spacing_range(spacings)}


def check_pretrain(cfg: dict, data_dir, events) -> dict:
    import SimpleITK as sitk

    from ..pretrain.data import SliceSource, scan_volume_folder

    scan = scan_volume_folder(data_dir, cfg["modality"])
    data = cfg["data"]
    SliceSource(scan, cfg["modality"], data["normalization"], data["body_threshold"], data["empty_slice_weight"],
                data["cache_volumes"]).check_first_volume()
    spacings = []
    for i, volume in enumerate(scan.volumes, start=1):
        if volume.series_uid is None:  # DICOM series: counted, spacing not read (it needs every file)
            reader = sitk.ImageFileReader()
            reader.SetFileName(volume.path)
            reader.ReadImageInformation()
            spacings.append(tuple(reader.GetSpacing()))
        events.progress(i, len(scan.volumes), "reading headers")
    return {"kind": "pretrain", "volumes": len(scan.volumes), "modality": cfg["modality"],
            "dicom_series": sum(v.series_uid is not None for v in scan.volumes),
            "unreadable": [f"{path}: {why}" for path, why in scan.skipped], **_spacing_range(spacings)}


def describe(summary: dict) -> list[str]:
    """The summary in a few lines for a person."""
    lines = []
    modality = summary["modality"]
    modality = "+".join(modality) if isinstance(modality, list) else modality
    spacing = ""
    if summary.get("spacing_min"):
        lo, hi = summary["spacing_min"], summary["spacing_max"]
        spacing = "; spacing " + " x ".join(f"{a:g}" if a == b else f"{a:g}-{b:g}" for a, b in zip(lo, hi)) + " mm (x, y, z)"
    if summary["kind"] == "finetune":
        lines.append(f"{summary['cases']} labeled case(s), {modality}{spacing}")
        lines.append(f"split: {summary['train_cases']} training / {summary['heldout_cases']} held-out case(s)")
        lines.append("cases holding each label: " + ", ".join(f"{k} {v}" for k, v in summary["cases_with_label"].items()))
    else:
        lines.append(f"{summary['volumes']} {modality} volume(s){spacing}")
        if summary.get("dicom_series"):
            lines.append(f"{summary['dicom_series']} of them DICOM series (spacing not read)")
        for item in summary["unreadable"]:
            lines.append(f"skipped: {item}")
    return lines


def run(args) -> int:
    from ..events import EventWriter

    events = EventWriter(enabled=args.events)
    if args.kind == "finetune":
        from ..finetune import load_config

        summary = check_finetune(load_config(args.config, args.overrides), args.data, events)
    else:
        from ..pretrain import load_config

        summary = check_pretrain(load_config(args.config, args.overrides), args.data, events)
    for line in describe(summary):
        events.log(line)
    events.done(ok=True, **summary)
    return 0
