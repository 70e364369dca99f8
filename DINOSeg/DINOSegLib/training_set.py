""""Add this case": the current image(s) and the (corrected) segmentation into a dataset folder in the
nnU-Net raw layout that ``dinomed finetune`` reads (docs/CONTRACTS.md, "A dataset folder")::

    dataset.json                      channel_names, labels, numTraining, file_ending
    imagesTr/<case>_0000.nii.gz       CT
    imagesTr/<case>_0001.nii.gz       PET in SUV, resampled onto the CT grid
    labelsTr/<case>.nii.gz            label map on the CT grid
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .segmentation import add_labelmap_node, labelmap_array_from_segmentation
from .volumes import add_volume_from_array, write_volume

FILE_ENDING = ".nii.gz"


class TrainingSetError(ValueError):
    """A case that cannot be added; the message names the dataset, case or segment."""


def _read_dataset_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TrainingSetError(f"{path} is not valid JSON: {exc}") from None


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def dataset_labels(seg_node, existing: dict | None) -> dict[str, int]:
    """{name: value} with background 0: the dataset's labels when it has some (each segment must be one of
    them), else the segments' label values in segment order."""
    segmentation = seg_node.GetSegmentation()
    names = [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
             for i in range(segmentation.GetNumberOfSegments())]
    if existing and existing.get("labels"):
        labels = {str(k): int(v) for k, v in existing["labels"].items()}
        unknown = [n for n in names if n not in labels]
        if unknown:
            raise TrainingSetError(f"segment(s) {', '.join(map(repr, unknown))} are not labels of the dataset "
                                   f"(labels: {', '.join(k for k in labels if labels[k] != 0)}); rename them")
        return labels
    labels = {"background": 0}
    used = set()
    for i, name in enumerate(names):
        segment = segmentation.GetSegment(segmentation.GetNthSegmentID(i))
        value = segment.GetLabelValue() or (i + 1)
        if value in used:
            value = max(used) + 1
        used.add(value)
        labels[name] = int(value)
    return labels


def add_case(dataset_dir: str | os.PathLike, case_id: str, ct_node, seg_node, pet_node=None,
             overwrite: bool = False) -> dict[str, Path]:
    """Write one case (CT, optional PET on the CT grid, the segmentation as labels) into the dataset and
    update ``dataset.json``; returns the written paths. Every case of a dataset must have the same channels."""
    if configured_path(dataset_dir) is None:
        raise TrainingSetError("choose a dataset folder first (an empty path is never the current folder)")
    dataset = Path(dataset_dir)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", case_id):
        raise TrainingSetError(f"case id {case_id!r}: use letters, digits, '_', '-', '.' only")
    if ct_node is None or seg_node is None:
        raise TrainingSetError("adding a case needs a CT volume and a segmentation")
    meta_path = dataset / "dataset.json"
    existing = _read_dataset_json(meta_path)
    channels = {"0": "CT", "1": "PET"} if pet_node is not None else {"0": "CT"}
    if existing and existing.get("channel_names") and existing["channel_names"] != channels:
        raise TrainingSetError(f"{meta_path} has channels {existing['channel_names']} but this case has {channels}")
    label_path = dataset / "labelsTr" / f"{case_id}{FILE_ENDING}"
    if label_path.exists() and not overwrite:
        raise TrainingSetError(f"case {case_id!r} already exists in {dataset}")
    labels = dataset_labels(seg_node, existing)

    scene = ct_node.GetScene()
    written: dict[str, Path] = {}
    temporaries = []
    try:
        written["ct"] = write_volume(ct_node, dataset / "imagesTr" / f"{case_id}_0000{FILE_ENDING}")
        if pet_node is not None:
            from .volumes import resample_to_grid

            pet = resample_to_grid(pet_node, ct_node)
            pet_on_ct = add_volume_from_array(scene, pet, ct_node, "__dinoseg_pet_on_ct__")
            temporaries.append(pet_on_ct)
            written["pet"] = write_volume(pet_on_ct, dataset / "imagesTr" / f"{case_id}_0001{FILE_ENDING}")
        names = {name: value for name, value in labels.items() if value != 0}
        label_array = labelmap_array_from_segmentation(seg_node, ct_node, names)
        label_node = add_labelmap_node(scene, label_array.astype(np.uint8), ct_node, "__dinoseg_labels__")
        temporaries.append(label_node)
        written["labels"] = write_volume(label_node, label_path)
    finally:
        for node in temporaries:
            display = node.GetDisplayNode()
            scene.RemoveNode(node)
            if display is not None:
                scene.RemoveNode(display)

    count = len(list((dataset / "labelsTr").glob(f"*{FILE_ENDING}")))
    meta = dict(existing or {})
    meta.update({"channel_names": channels, "labels": labels, "numTraining": count, "file_ending": FILE_ENDING})
    meta.setdefault("name", dataset.name)
    _atomic_write_json(meta_path, meta)
    written["dataset.json"] = meta_path
    return written


def configured_path(value) -> Path | None:
    """A path parameter as the user set it, or None when unset. Slicer's parameter node turns an empty
    path into ``Path("")``, which prints as ``"."``: neither may ever mean "the current folder"."""
    text = str(value).strip() if value is not None else ""
    return None if text in ("", ".") else Path(text)


def can_add_case(ct_node, seg_node, dataset_dir) -> bool:
    """Whether "Add this case" can run: a CT with voxels, a segmentation, and a dataset folder chosen."""
    return bool(ct_node is not None and ct_node.GetImageData() is not None and seg_node is not None
                and configured_path(dataset_dir) is not None)


def next_case_id(dataset_dir: str | os.PathLike, prefix: str = "case") -> str:
    """The first ``<prefix>_NNNN`` not yet in the dataset."""
    labels = Path(dataset_dir) / "labelsTr"
    n = 0
    while (labels / f"{prefix}_{n:04d}{FILE_ENDING}").exists():
        n += 1
    return f"{prefix}_{n:04d}"
