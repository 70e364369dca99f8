"""Labeled datasets for finetuning, in the nnU-Net raw / Medical Segmentation Decathlon layout.

``DATASET/dataset.json`` (``channel_names`` {"0": "CT", "1": "PET"}, ``labels`` {"background": 0, "lesion": 1, …},
``numTraining``, ``file_ending``), ``imagesTr/<case>_0000.nii.gz`` (CT, HU), ``imagesTr/<case>_0001.nii.gz``
(PET, SUV, on the CT grid) and ``labelsTr/<case>.nii.gz`` (docs/CONTRACTS.md). Everything is checked before
training starts: an empty dataset, a missing channel, a label map whose grid differs from its image, a label
value that the config does not name: each is a :class:`DatasetError` naming the case and the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DinomedError, read_json_object

GRID_TOLERANCE_MM = 1e-3


class DatasetError(DinomedError):
    """A dataset folder, case or label map that cannot be trained on as it is."""


@dataclass
class Case:
    """One labeled case: its image channels (in the model's input order) and its label map."""

    name: str
    images: list[Path]
    label: Path


@dataclass
class LabelMapping:
    """The model's classes (value 1..K, in this order) and how dataset label values map onto them.

    ``entries`` are model.json label entries (value, name, colour, terminology); ``lut[v]`` is the model value of
    dataset value ``v`` (0 for background and for labels folded into background, -1 for a value nobody named).
    """

    entries: list[dict]
    lut: np.ndarray
    dataset_names: dict[int, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return max(e["value"] for e in self.entries) + 1

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.entries]

    def allowed(self) -> str:
        named = {v: n for v, n in self.dataset_names.items() if self.lut[v] >= 0}
        return ", ".join(f"{v} ({n})" for v, n in sorted(named.items()))

    def apply(self, labels: np.ndarray, where: str) -> np.ndarray:
        """Dataset label values → model values (uint8); an unnamed value is a :class:`DatasetError` naming ``where``."""
        values = np.unique(labels)
        bad = [int(v) for v in values if v < 0 or v >= len(self.lut) or self.lut[int(v)] < 0 or v != int(v)]
        if bad:
            described = []
            for v in bad:
                name = self.dataset_names.get(v)
                described.append(f"{v} ({name}, not among the config's labels or background_labels)" if name
                                 else f"{v} (not in dataset.json labels)")
            raise DatasetError(
                f"{where}: label value(s) {', '.join(described)}; the config names {self.allowed()} "
                "(add the label to 'labels' to learn it, or to 'background_labels' to fold it into background)"
            )
        return self.lut[labels.astype(np.int64)].astype(np.uint8)


@dataclass
class DatasetSpec:
    """A checked dataset folder: its dataset.json, the channel files of each case, the label mapping."""

    root: Path
    dataset_json: dict
    inputs: list[str]
    channel_index: list[int]
    cases: list[Case]
    labels: LabelMapping
    file_ending: str = ".nii.gz"

    @property
    def case_names(self) -> list[str]:
        return [c.name for c in self.cases]

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise DatasetError(f"{self.root}: no case {name!r} (cases: {', '.join(self.case_names[:10])}…)")


def read_dataset_json(root: str | Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder (expected dataset.json, imagesTr/, labelsTr/)")
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{root}: dataset.json is missing (expected the nnU-Net raw layout: dataset.json, imagesTr/, labelsTr/)")
    data = read_json_object(path, DatasetError)
    channels = data.get("channel_names", data.get("modality"))  # nnU-Net v2 / MSD (v1) names
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(f"{path}: no 'channel_names' (expected e.g. {{\"0\": \"CT\", \"1\": \"PET\"}})")
    labels = data.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{path}: no 'labels' (expected e.g. {{\"background\": 0, \"lesion\": 1}})")
    return data


def _dataset_label_values(data: dict, path: Path) -> dict[int, str]:
    """value → name from nnU-Net v2 ``{"name": value}`` or MSD ``{"value": "name"}`` label tables."""
    out: dict[int, str] = {}
    for key, value in data["labels"].items():
        if isinstance(value, int) and not isinstance(value, bool):
            out[value] = str(key)
        elif str(key).lstrip("-").isdigit() and isinstance(value, str):
            out[int(key)] = value
        else:
            raise DatasetError(
                f"{path}: label {key!r}: {value!r} is not supported; expected name: integer value "
                "(nnU-Net region labels with lists of values are not supported)"
            )
    if 0 not in out:
        raise DatasetError(f"{path}: the labels have no background value 0 (found {sorted(out)})")
    return out


def label_mapping(data: dict, labels: list[str] | None, background_labels: list[str], path: Path,
                  model_values: list[int] | None = None) -> LabelMapping:
    """The model's classes from the config's ``labels`` (dataset label names, in model order; None = all), valued
    1..K, or ``model_values`` (an existing model's label values, same order as ``labels``)."""
    values = _dataset_label_values(data, path)
    by_name = {n: v for v, n in values.items()}
    if labels is None:
        labels = [values[v] for v in sorted(values) if v != 0 and values[v] not in background_labels]
    unknown = [n for n in list(labels) + list(background_labels) if n not in by_name]
    if unknown:
        raise DatasetError(
            f"{path}: the config names label(s) {', '.join(map(repr, unknown))} that dataset.json does not have "
            f"(dataset labels: {', '.join(n for v, n in sorted(values.items()) if v)})"
        )
    if len(set(labels)) != len(labels):
        raise DatasetError(f"config labels: a label is named twice in {labels}")
    if not labels:
        raise DatasetError(f"{path}: no label left to learn (every dataset label is in background_labels)")
    extra = {e.get("name"): e for e in data.get("label_entries", []) if isinstance(e, dict)}
    known = _known_label_entries()
    entries = []
    lut = np.full(max(values) + 1, -1, dtype=np.int64)
    lut[0] = 0
    for name in background_labels:
        lut[by_name[name]] = 0
    values_out = model_values if model_values is not None else range(1, len(labels) + 1)
    for model_value, name in zip(values_out, labels):
        lut[by_name[name]] = model_value
        entry = dict(extra.get(name) or known.get(name) or {})
        entry.update(value=model_value, name=name)
        entry.setdefault("color", _fallback_colour(model_value))
        entries.append(entry)
    return LabelMapping(entries=entries, lut=lut, dataset_names=values)


def _known_label_entries() -> dict[str, dict]:
    """Colours and SNOMED-CT terminology of the standard labels by name."""
    from ..labels import standard_label_entries

    return standard_label_entries()


def _fallback_colour(value: int) -> list[int]:
    return [(70 * value + 40) % 256, (150 * value + 90) % 256, (230 * value + 20) % 256]


def open_dataset(root: str | Path, inputs: list[str], labels: list[str] | None = None,
                 background_labels: list[str] | None = None, model_values: list[int] | None = None) -> DatasetSpec:
    """List and check a dataset folder's cases (files present, channels named in dataset.json); no image is read."""
    root = Path(root)
    data = read_dataset_json(root)
    path = root / "dataset.json"
    channels = data.get("channel_names", data.get("modality"))
    by_modality: dict[str, int] = {}
    for key, name in channels.items():
        if not str(key).isdigit():
            raise DatasetError(f"{path}: channel_names key {key!r} is not a channel number")
        by_modality.setdefault(str(name).upper(), int(key))
    channel_index = []
    for modality in inputs:
        if modality.upper() not in by_modality:
            raise DatasetError(
                f"{path}: the model reads a {modality} channel but dataset.json has none "
                f"(channel_names: {', '.join(f'{k}={v}' for k, v in channels.items())})"
            )
        channel_index.append(by_modality[modality.upper()])
    mapping = label_mapping(data, labels, list(background_labels or []), path, model_values)
    ending = str(data.get("file_ending", ".nii.gz"))
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not labels_dir.is_dir():
        raise DatasetError(f"{root}: labelsTr/ is missing; expected one label map per case, labelsTr/<case>{ending}")
    label_files = sorted(p for p in labels_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))
    if not label_files:
        raise DatasetError(f"{root}: the dataset is empty: labelsTr/ holds no <case>{ending} label map")
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: imagesTr/ is missing; expected imagesTr/<case>_0000{ending} per case")
    cases = []
    for label_file in label_files:
        name = label_file.name[: -len(ending)]
        images = []
        for modality, index in zip(inputs, channel_index):
            image = images_dir / f"{name}_{index:04d}{ending}"
            if not image.is_file():
                raise DatasetError(
                    f"case {name}: the {modality} channel is missing: expected {image} (channel _{index:04d})"
                )
            images.append(image)
        cases.append(Case(name=name, images=images, label=label_file))
    # an image without a label map is a case that would silently not be trained on
    named = {c.name for c in cases}
    orphans = sorted({p.name[: -len(ending)].rsplit("_", 1)[0] for p in images_dir.iterdir()
                      if p.name.endswith(ending) and not p.name.startswith(".")} - named)
    if orphans:
        raise DatasetError(
            f"case {orphans[0]}: imagesTr/ has its images but labelsTr/{orphans[0]}{ending} is missing"
            + (f" ({len(orphans)} such cases)" if len(orphans) > 1 else "")
        )
    declared = data.get("numTraining")
    if isinstance(declared, int) and declared != len(cases):
        raise DatasetError(f"{path}: numTraining is {declared} but labelsTr/ holds {len(cases)} case(s)")
    return DatasetSpec(root=root, dataset_json=data, inputs=list(inputs), channel_index=channel_index, cases=cases,
                       labels=mapping, file_ending=ending)


# ---------------------------------------------------------------------------------------------------------
# reading cases


@dataclass
class CaseArrays:
    """A case in memory: normalised channels ``(C, Z, Y, X)`` float32, model label values ``(Z, Y, X)`` uint8,
    and the voxel spacing (x, y, z mm) for HD95."""

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def _grid_differs(a, b) -> str | None:
    """What differs between two image grids (size, spacing, origin, direction), or None."""
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs {b.GetSize()}"
    for what, fa, fb in (("spacing", a.GetSpacing(), b.GetSpacing()), ("origin", a.GetOrigin(), b.GetOrigin()),
                         ("direction", a.GetDirection(), b.GetDirection())):
        if not np.allclose(fa, fb, atol=GRID_TOLERANCE_MM):
            return f"{what} {tuple(round(v, 4) for v in fa)} vs {tuple(round(v, 4) for v in fb)}"
    return None


def read_header(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise DatasetError(f"{path}: not a readable image") from None
    if reader.GetDimension() != 3:
        raise DatasetError(f"{path}: expected a 3D volume, found a {reader.GetDimension()}D image of size {reader.GetSize()}")
    return reader


def check_case_geometry(spec: DatasetSpec, case: Case) -> None:
    """Every channel and the label map must share one grid (nnU-Net raw data are resampled beforehand)."""
    label = read_header(case.label)
    for modality, image in zip(spec.inputs, case.images):
        diff = _grid_differs(read_header(image), label)
        if diff:
            raise DatasetError(
                f"case {case.name}: the label map {case.label.name} is not on the grid of its {modality} image "
                f"{image.name} ({diff}); resample the labels onto the image grid (nearest neighbour)"
            )


def read_case_labels(spec: DatasetSpec, case: Case) -> np.ndarray:
    import SimpleITK as sitk

    from ..io import read_image

    return spec.labels.apply(sitk.GetArrayFromImage(read_image(case.label)), f"case {case.name} ({case.label})")


def load_case(spec: DatasetSpec, case: Case, channel_specs: list[dict], preprocessing: dict | None = None) -> CaseArrays:
    """Read, check and normalise one case (``dinomed.preprocess.normalize_channels``, the model.json specs), on the
    model's grid when ``preprocessing`` names a ``target_spacing`` or an ``input_scale`` (images linear, labels
    nearest neighbour: :func:`dinomed.inference.segment.model_grid`, the grid ``dinomed segment`` uses)."""
    import SimpleITK as sitk

    from ..inference.segment import model_grid
    from ..io import read_image
    from ..preprocess import check_pet_is_suv, normalize_channels

    check_case_geometry(spec, case)
    label = read_case_labels(spec, case)
    label_image = read_image(case.label)
    grid = model_grid(label_image, preprocessing)
    if grid is not None:
        moved = sitk.GetImageFromArray(label)
        moved.CopyInformation(label_image)
        label = sitk.GetArrayFromImage(sitk.Resample(moved, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                     sitk.sitkUInt8))
    arrays = []
    for modality, path in zip(spec.inputs, case.images):
        image = read_image(path)
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        if modality.upper() == "PET":
            check_pet_is_suv(array, f"case {case.name} ({path})")
        if not np.isfinite(array).all():
            array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
        if grid is not None:
            finite = sitk.GetImageFromArray(array)
            finite.CopyInformation(image)
            array = sitk.GetArrayFromImage(sitk.Resample(finite, grid, sitk.Transform(), sitk.sitkLinear,
                                                         -1000.0 if modality.upper() == "CT" else 0.0, sitk.sitkFloat32))
        arrays.append(array)
    image = normalize_channels(arrays, channel_specs)
    spacing = tuple(float(s) for s in (grid if grid is not None else label_image).GetSpacing())
    return CaseArrays(name=case.name, image=image, label=label, spacing=spacing)


def validate_dataset(spec: DatasetSpec, progress=None) -> dict[str, np.ndarray]:
    """Check every case before training: grids agree, every label value is named. Returns the per-case class
    voxel counts (index = model value), so that training knows which classes each case holds."""
    counts = {}
    for i, case in enumerate(spec.cases, start=1):
        check_case_geometry(spec, case)
        labels = read_case_labels(spec, case)
        counts[case.name] = np.bincount(labels.ravel(), minlength=spec.labels.num_classes)
        if progress is not None:
            progress(i, len(spec.cases), "checking cases")
    return counts


# ---------------------------------------------------------------------------------------------------------
# splits


def split_cases(names: list[str], data_cfg: dict) -> tuple[list[str], list[str]]:
    """Training and held-out case names, split by case: explicit ``val_cases``, fold ``fold`` of ``folds``, or a
    ``val_fraction`` share; the order is a permutation seeded by ``split_seed`` (same split on every machine)."""
    names = sorted(names)
    if len(names) < 2:
        raise DatasetError(
            f"the dataset has {len(names)} case(s); finetuning needs at least 2 (one to train on, one held out to validate)"
        )
    if data_cfg.get("val_cases"):
        val = [str(v) for v in data_cfg["val_cases"]]
        missing = [v for v in val if v not in names]
        if missing:
            raise DatasetError(f"config data.val_cases: no case named {', '.join(missing)} in the dataset")
        train = [n for n in names if n not in val]
    else:
        order = [names[i] for i in np.random.default_rng(int(data_cfg.get("split_seed", 0))).permutation(len(names))]
        folds = data_cfg.get("folds")
        if folds:
            if folds > len(names):
                raise DatasetError(f"config data.folds is {folds} but the dataset has only {len(names)} cases")
            val = sorted(order[int(data_cfg.get("fold", 0))::folds])
        else:
            n_val = min(len(names) - 1, max(1, int(round(float(data_cfg.get("val_fraction", 0.2)) * len(names)))))
            val = sorted(order[:n_val])
        train = [n for n in names if n not in val]
    if not train:
        raise DatasetError("the split leaves no training case; hold out fewer cases")
    return train, sorted(val)
