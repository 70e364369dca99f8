"""Segmenting a patient's CT or PET/CT with a model folder: the whole-volume job behind ``dinomed segment``.

The pipeline, in the order a reader of a PET/CT would expect it:

1. read the CT (any format of :mod:`dinomed.io`, a DICOM series folder too) and the PET (a PET DICOM folder is
   converted to SUV with :func:`dinomed.petct.suv_from_dicom`; a file is taken to be in SUV already and refused
   when it is obviously in Bq/ml), and refuse NaN voxels;
2. resample the PET onto the CT grid (physical space, identity transform; an error when the two do not overlap);
3. normalise the channels in ``model.json["inputs"]`` order with :func:`dinomed.preprocess.normalize_channel`,
   on the model's grid (:func:`model_grid`: ``preprocessing.target_spacing`` and the high-resolution
   ``input_scale``, as the model was trained) when that differs from the CT's; the labels are put back onto the
   CT grid exactly (:func:`labels_to_reference`);
4. predict with :func:`dinomed.inference.predict.predict_volume` (slice batches for 2D models, MONAI sliding
   windows for 3D models), on the chosen device and, on a GPU, under bf16/fp16 autocast;
5. post-process: for every label, connected components smaller than ``inference.min_component_ml`` are removed;
6. write the label map on the CT grid (uint8, ``CopyInformation`` from the CT), the label table sidecar
   (:func:`label_sidecar_path`) and, with a PET, the lesion statistics of the labels flagged ``lesion: true``.

Every input and output path is checked before the model runs, so bad input fails in a second with one line and
leaves no output file behind; outputs are written atomically.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_write_text
from ..errors import DinomedError, InputImageError
from ..runtime import resolve_device
from .profile import stage, timed_stage

LABELS_FORMAT = "dinomed-labels/1"
STATS_SUFFIXES = (".csv", ".json")
# The profile stage of importing the model code (timm): paid once per process, reported apart by the benchmark.
IMPORT_STAGE = "import models"


# ---------------------------------------------------------------------------------------------------------
# devices and precision


def autocast_dtype(device):
    """The reduced precision inference runs in on ``device``: bf16 on a CUDA GPU that has it, else fp16 there;
    None (fp32) on the CPU and on MPS. A segmentation is an argmax of logits, which bf16 leaves unchanged but
    at class boundaries; CPU autocast is slower than fp32 on most machines."""
    from ..runtime import autocast_dtype as resolved

    return resolved(device, "auto")


def amp_setting(device) -> str:
    """The ``amp`` argument of :func:`dinomed.inference.predict.predict_volume` for ``device``."""
    import torch

    dtype = autocast_dtype(device)
    return "off" if dtype is None else ("bf16" if dtype == torch.bfloat16 else "fp16")


# ---------------------------------------------------------------------------------------------------------
# inputs


def modalities(model_json: dict) -> list[str]:
    """The input modalities of a model in channel order (``model.json["inputs"]``), upper case."""
    inputs = model_json.get("inputs") or [{"modality": "CT"}]
    return [str(i.get("modality", "") if isinstance(i, dict) else i).upper() for i in inputs]


def check_finite(image: sitk.Image, name: str) -> None:
    """Refuse a volume with NaN or infinite voxels (a broken conversion; a model would spread them)."""
    from ..io.volumes import check_finite_voxels

    check_finite_voxels(image, name)


@timed_stage("read")
def read_ct(path: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """The CT (HU) from a file or a DICOM series folder (``series_uid`` picks one series of a mixed folder),
    checked to be a finite 3D volume."""
    from ..io import read_image

    return read_image(path, series_uid=series_uid)


@timed_stage("read")
def read_pet_suv(path: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """The PET in SUV (body weight): a DICOM folder is converted with :func:`dinomed.petct.suv_from_dicom`
    (``series_uid`` picks one series of a mixed folder); a file (NIfTI, NRRD, …) is taken to be in SUV already
    and refused when its values look like Bq/ml or like a CT in HU."""
    from ..io import read_image
    from ..preprocess import check_pet_is_suv

    path = Path(path)
    if path.is_dir():
        from ..petct import suv_from_dicom
        from ..safety import dicom_modality

        tag = dicom_modality(path, series_uid)
        if tag and tag.upper() == "CT":  # before the SUV conversion, whose missing-tag message would mislead
            raise DinomedError(f"PET {path}: given as the PET but its DICOM Modality is CT; check that --pet is the "
                               "PET and --ct the CT")
        pet = suv_from_dicom(path, series_uid=series_uid)
        check_finite(pet, str(path))  # (read_image refuses a file's NaN itself)
    else:
        pet = read_image(path)
    check_pet_is_suv(sitk.GetArrayViewFromImage(pet), str(path))
    return pet


@timed_stage("resample PET")
def pet_on_ct_grid(pet: sitk.Image, ct: sitk.Image, pet_name: str = "PET", ct_name: str = "CT") -> sitk.Image:
    """The PET (SUV, float32) resampled linearly onto the CT grid; 0 outside the PET field of view."""
    from ..petct import resample_to_reference

    pet = sitk.Cast(pet, sitk.sitkFloat32)
    return resample_to_reference(pet, ct, "linear", 0.0, name=pet_name, reference_name=ct_name)


def model_spacing(image: sitk.Image, preprocessing: dict | None) -> np.ndarray | None:
    """The voxel spacing (x, y, z mm) the model works at for ``image``: ``preprocessing.target_spacing`` (or the
    image's own spacing) with the in-plane spacing divided by ``preprocessing.input_scale`` (high-resolution input,
    MedDINOv3); None when that is the image's own grid."""
    pre = preprocessing or {}
    target, scale = pre.get("target_spacing"), float(pre.get("input_scale") or 1.0)
    old = np.asarray(image.GetSpacing(), dtype=float)
    if target:
        # a null z (2D models) keeps the image's own slice spacing
        try:
            spacing = np.asarray([old[i] if (i == 2 and v is None) else float(v) for i, v in enumerate(target)])
        except (TypeError, ValueError):
            spacing = np.asarray([-1.0])
        if spacing.shape != (3,) or np.any(spacing <= 0):
            raise DinomedError(f"model.json preprocessing.target_spacing must be three positive millimetre values [x, y, z] "
                               f"(z may be null), found {target}")
    else:
        spacing = old.copy()
    if scale <= 0:
        raise DinomedError(f"model.json preprocessing.input_scale must be a positive factor, found {pre.get('input_scale')}")
    spacing[:2] /= scale
    return None if np.allclose(old, spacing, rtol=1e-3) else spacing


def model_grid(image: sitk.Image, preprocessing: dict | None) -> sitk.Image | None:
    """The grid the model runs on for ``image`` (see :func:`model_spacing`): the image's direction, the same
    physical extent (the outer edge of the first voxel stays where it was), the model's spacing; None when the
    model wants the image's own grid."""
    spacing = model_spacing(image, preprocessing)
    if spacing is None:
        return None
    old = np.asarray(image.GetSpacing())
    size = np.maximum(1, np.round(np.asarray(image.GetSize()) * old / spacing)).astype(int)
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    # keep the physical edge of the first voxel where it was: origin moves by half the change of voxel size
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    shift = direction @ ((spacing - old) / 2.0)
    grid.SetOrigin((np.asarray(image.GetOrigin()) + shift).tolist())
    grid.SetDirection(image.GetDirection())
    return grid


def _target_grid(ct: sitk.Image, target_spacing) -> sitk.Image | None:
    """:func:`model_grid` for a target spacing alone (no input scale)."""
    return model_grid(ct, {"target_spacing": target_spacing})


@timed_stage("post-process")
def labels_to_reference(labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A label map on the model grid put back onto ``reference`` (the CT grid) by nearest neighbour: the result has
    the reference's size, spacing, origin and direction exactly; outside the model grid is background."""
    from ..petct import resample_to_reference

    if labels.GetPixelID() != sitk.sitkUInt8:
        labels = sitk.Cast(labels, sitk.sitkUInt8)
    out = resample_to_reference(labels, reference, "nearest", 0, name="the model-grid labels",
                                reference_name="the CT")
    out.CopyInformation(reference)
    return out


@timed_stage("normalise")
def model_channels(model_json: dict, ct: sitk.Image, pet: sitk.Image | None, grid: sitk.Image | None = None
                   ) -> list[np.ndarray]:
    """The normalised input, one ``(z, y, x)`` float32 array per channel in ``model.json["inputs"]`` order, on
    ``grid`` (default: the CT grid). ``pet`` must already be on the CT grid. On a model grid each channel is
    normalised in place in its resampled image's own buffer (:func:`dinomed.io.volumes.writable_array`, which
    keeps that image alive): no second volume is allocated; on the CT grid the inputs are only read."""
    from ..io.volumes import writable_array
    from ..preprocess import default_spec, normalize_channel

    mods = modalities(model_json)
    specs = (model_json.get("preprocessing") or {}).get("channels") or [default_spec(m) for m in mods]
    if len(specs) != len(mods):
        raise DinomedError(f"expected {len(specs)} input channel(s) ({[s.get('modality', '?') for s in specs]}), "
                           f"found {len(mods)}")  # normalize_channels' words
    out = []
    for mod, spec in zip(mods, specs):
        if mod == "CT":
            image = ct
        elif mod == "PET":
            if pet is None:
                raise DinomedError(
                    f"model {model_json.get('name', '?')!r} needs a PET (inputs: {', '.join(mods)}) but none was given; "
                    "pass --pet PET (SUV image or PET DICOM folder)"
                )
            image = pet
        else:
            raise DinomedError(f"model {model_json.get('name', '?')!r}: unsupported input modality {mod!r}; expected CT or PET")
        if grid is not None:
            # straight from the stored type: the linear interpolator computes in double either way, so a float32
            # cast first gives the same voxels and costs a whole-volume copy
            resampled = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear,
                                      -1000.0 if mod == "CT" else 0.0, sitk.sitkFloat32)
            array = writable_array(resampled)
            out.append(normalize_channel(array, spec, out=array))
        else:
            out.append(normalize_channel(sitk.GetArrayViewFromImage(image), spec))  # ct and pet are only read
    return out


# ---------------------------------------------------------------------------------------------------------
# post-processing


def min_component_voxels(model_json: dict, spacing) -> dict[int, int]:
    """The minimum component size in voxels per label value, from ``inference.min_component_ml``.

    ``min_component_ml`` is a number (every label) or a dict keyed by label name or value; the key ``lesion``
    also applies to every label flagged ``lesion: true`` that has no entry of its own.
    """
    spec = (model_json.get("inference") or {}).get("min_component_ml") or {}
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    labels = model_json.get("labels") or []
    out = {}
    for lab in labels:
        value, name = int(lab["value"]), str(lab.get("name", ""))
        if isinstance(spec, (int, float)):
            ml = float(spec)
        else:
            ml = spec.get(name, spec.get(str(value)))
            if ml is None and lab.get("lesion"):
                ml = spec.get("lesion")
        if ml:
            out[value] = int(np.ceil(float(ml) / voxel_ml - 1e-9))
    return out


@timed_stage("post-process")
def remove_small_components(labels: sitk.Image, minimum_voxels: dict[int, int], in_place: bool = False) -> sitk.Image:
    """``labels`` with every connected component (26-connected) of a label smaller than its minimum set to
    background 0; labels without a minimum are kept as they are.

    One pass over the volume finds where each label is (:func:`dinomed.petct.lesions.label_runs`); components are
    labelled inside those boxes only, so a whole-body volume with small lesions costs about one pass. Inside a box,
    SimpleITK's ``ConnectedComponent`` (fully connected: 26-connectivity; multithreaded, 31 vs 76 ms for scipy's
    ``ndimage.label`` on a 10.6 M-voxel box on 2 cores) labels the components, and sizes and the voxels to clear
    are taken at the label's own voxels only (flat indices), not over the whole box: 117 vs 290 ms for the demo
    model's lesions on 512x512x300. ``labels`` is not changed unless ``in_place`` (what ``dinomed segment`` does
    with the label map it made: no whole-volume copy in and out)."""
    from ..io.volumes import writable_array
    from ..petct.lesions import label_runs

    wanted = {int(v): int(m) for v, m in minimum_voxels.items() if int(m) > 1 and 0 < int(v) < 256}
    if not wanted:
        return labels
    array = sitk.GetArrayViewFromImage(labels)
    if not np.issubdtype(array.dtype, np.integer) or (
            not np.issubdtype(array.dtype, np.unsignedinteger) and array.min(initial=0) < 0):
        raise DinomedError(f"post-processing expects a label map of non-negative integers, found {array.dtype}")
    runs = label_runs(array, wanted)
    drops = []  # (box, its shape, flat indices inside it of the voxels to clear)
    for value, minimum in sorted(wanted.items()):
        for box in runs.get(value, []):
            mask = array[box] == value
            labelled = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.view(np.uint8)), True)
            components = sitk.GetArrayViewFromImage(labelled)  # a view: ``labelled`` must outlive it
            where = np.flatnonzero(mask)  # the label's voxels in the box
            ids = components.ravel()[where]
            small = np.bincount(ids) < minimum
            small[0] = False
            if small.any():
                drops.append((box, mask.shape, where[small[ids]]))
    if not drops:
        return labels
    # a copy shares the buffer until writable_array makes it the copy's own: ``labels`` stays as it was
    out = labels if in_place else sitk.Image(labels)
    target = writable_array(out)
    for box, shape, flat in drops:
        target[box][np.unravel_index(flat, shape)] = 0
    return out


# ---------------------------------------------------------------------------------------------------------
# outputs


def label_sidecar_path(seg_path: str | os.PathLike) -> Path:
    """Where the label table of a label map is written: the label map's name with its image suffix replaced by
    ``.labels.json`` (``seg.nii.gz`` → ``seg.labels.json``, ``case.seg.nrrd`` → ``case.seg.labels.json``)."""
    from ..io import image_suffix

    seg_path = Path(seg_path)
    suffix = image_suffix(seg_path)
    stem = seg_path.name[: -len(suffix)] if suffix else seg_path.name
    return seg_path.with_name(stem + ".labels.json")


def label_counts(labels: sitk.Image) -> np.ndarray:
    """Voxels per label value 0..255 of a uint8 label map: ``torch.bincount`` on the image's buffer (on every core,
    no copy: 0.12 vs 0.31 s for numpy on 512x512x300), other types with numpy slab by slab (a whole-volume bincount
    would make an int64 copy: 1.7 GB on 512x512x800)."""
    array = sitk.GetArrayViewFromImage(labels)
    if array.dtype == np.uint8 and array.flags.c_contiguous:
        import torch

        from ..io.volumes import voxels_as_tensor

        return torch.bincount(voxels_as_tensor(labels), minlength=256).numpy().astype(np.int64)
    counts = np.zeros(256, dtype=np.int64)
    step = max(1, (16 << 20) // max(1, array[0].size))
    for start in range(0, array.shape[0], step):
        counts += np.bincount(array[start:start + step].ravel(), minlength=256)[:256]
    return counts


def label_table(model_json: dict, labels: sitk.Image | None = None, warnings: list[str] | None = None) -> dict:
    """The sidecar document: format, model name, and each label (value, name, colour, lesion flag, SNOMED-CT
    terminology) with, when ``labels`` is given, its voxel count and volume in ml; ``warnings`` lists what was
    suspicious about the inputs (wrong units or modality, an unused PET), so that a reader of the label map
    later sees it too."""
    entries = [dict(lab) for lab in (model_json.get("labels") or [])]
    if labels is not None:
        counts = label_counts(labels)
        voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
        for lab in entries:
            lab["voxels"] = int(counts[int(lab["value"])])
            lab["volume_ml"] = round(lab["voxels"] * voxel_ml, 4)
    doc = {"format": LABELS_FORMAT, "model": model_json.get("name"), "background": 0, "labels": entries}
    if warnings:
        doc["warnings"] = list(warnings)
    return doc


def check_output_path(path: str | os.PathLike, what: str, suffixes: tuple[str, ...]) -> Path:
    """Refuse, before any work, an output path that cannot be written: unknown suffix, a folder in the way, or
    a parent that is a file or not writable (:func:`dinomed.safety.check_writable`)."""
    from ..safety import check_writable

    return check_writable(path, what, suffixes)


# ---------------------------------------------------------------------------------------------------------
# the job


@dataclass
class SegmentationResult:
    """What a segmentation run produced: the label map on the CT grid and, with a PET, the lesion statistics."""

    labels: sitk.Image
    model_json: dict
    device: str
    precision: str
    seconds: float
    lesions: list = field(default_factory=list)
    paths: dict = field(default_factory=dict)  # kind -> written path
    warnings: list = field(default_factory=list)  # suspicious inputs, also in the label table

    @property
    def lesion_count(self) -> int:
        """Connected lesions found (the per-label ``total`` rows of the statistics not counted)."""
        return sum(1 for row in self.lesions if str(getattr(row, "lesion", "")) != "total")


def segment_images(
    model,
    model_json: dict,
    ct: sitk.Image,
    pet_on_ct: sitk.Image | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    compile: bool = False,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> sitk.Image:
    """The post-processed label map (uint8) of ``model`` on the CT grid for a CT and a PET already on that grid.

    The model runs on the device its parameters are on, in the precision :func:`autocast_dtype` gives there;
    ``compile``, ``log``, ``warn``: see :func:`dinomed.inference.predict.predict_volume`.
    """
    from .predict import model_device, predict_volume

    grid = model_grid(ct, model_json.get("preprocessing"))  # target spacing and high-resolution input scale
    channels = model_channels(model_json, ct, pet_on_ct, grid)
    predicted = predict_volume(model, model_json, channels, amp=amp_setting(model_device(model)), progress=progress,
                               compile=compile, log=log, warn=warn)
    del channels
    predicted = np.asarray(predicted)
    if predicted.max(initial=0) > 255 or predicted.min(initial=0) < 0:
        raise DinomedError(f"the model predicted label values outside 0..255 ({predicted.min()}..{predicted.max()})")
    labels = sitk.GetImageFromArray(predicted.astype(np.uint8, copy=False))
    if grid is not None:
        labels.CopyInformation(grid)
        labels = labels_to_reference(labels, ct)
    else:
        labels.CopyInformation(ct)
    labels = remove_small_components(labels, min_component_voxels(model_json, ct.GetSpacing()), in_place=True)
    labels.CopyInformation(ct)
    return labels


def segment_files(
    model_dir: str | os.PathLike,
    ct_path: str | os.PathLike,
    out_path: str | os.PathLike,
    pet_path: str | os.PathLike | None = None,
    stats_path: str | os.PathLike | None = None,
    device: str = "auto",
    events=None,
    ct_series: str | None = None,
    pet_series: str | None = None,
    compile: bool = False,
) -> SegmentationResult:
    """``dinomed segment``: segment the CT (and PET) files with the model folder and write the outputs.

    Writes ``out_path`` (label map, uint8, on the CT grid), its label table (:func:`label_sidecar_path`) and,
    with a PET and ``stats_path``, the lesion statistics (CSV or JSON by suffix). Everything is validated
    before the model runs; nothing is written when an input is bad, and no output may name an input.
    ``ct_series`` / ``pet_series`` pick a series (SeriesInstanceUID) of a DICOM folder that holds several.
    Suspicious inputs (see :mod:`dinomed.safety`) are warned about and listed under ``warnings`` in the label
    table. ``compile``: the opt-in compiled forward pass (:mod:`dinomed.inference.compiled`; ``--compile``).
    """
    from ..safety import ct_warnings, dicom_modality, pet_warnings, refuse_ct_as_pet, refuse_output_over_input

    import time

    from ..events import EventWriter
    from ..io import IMAGE_SUFFIXES, write_image
    from ..models import available_models, load_model_folder, read_model_json

    events = events or EventWriter(enabled=False)
    started = time.perf_counter()
    write_suffixes = tuple(s for s in IMAGE_SUFFIXES if s not in (".nhdr", ".mhd"))
    out_path = check_output_path(out_path, "label map", write_suffixes)
    if stats_path is not None:
        stats_path = check_output_path(stats_path, "lesion statistics", STATS_SUFFIXES)
        if pet_path is None:
            raise DinomedError(f"{stats_path}: lesion statistics need a PET (SUV); pass --pet or leave out --stats")
    outputs = [("--out", out_path), ("the label table", label_sidecar_path(out_path)), ("--stats", stats_path)]
    refuse_output_over_input(outputs, [("--ct", ct_path), ("--pet", pet_path), ("--model", Path(model_dir) / "model.json"),
                                       ("--model weights", Path(model_dir) / "model.safetensors")])

    with stage(IMPORT_STAGE):
        # the model modules, and timm and torchvision with them, without TorchDynamo (dinomed._timm): 0.8-1.2 s the
        # first time in a process (2-3 s with Dynamo), nothing after it. Every `dinomed segment` pays it, also those
        # that the Slicer module and the web page start as child processes; a script calling segment_files again does not
        available_models()
    model_json = read_model_json(model_dir)
    if not (Path(model_dir) / "model.safetensors").is_file():
        raise DinomedError(f"{model_dir}: model.safetensors is missing (the model folder holds only model.json)")
    mods = modalities(model_json)
    if "PET" in mods and pet_path is None:
        raise DinomedError(
            f"model {model_json.get('name', model_dir)!r} ({model_dir}) needs a PET (inputs: {', '.join(mods)}) but none "
            "was given; pass --pet PET (SUV image or PET DICOM folder)"
        )
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        if emit_now:
            events.warning(message)

    emit_now = False  # the input warnings are shown once both inputs are known to be readable

    ct = read_ct(ct_path, ct_series)
    for message in ct_warnings(ct, f"CT {ct_path}", dicom_modality(ct_path, ct_series)):
        warn(message)
    pet = pet_fov = None
    if pet_path is not None:
        pet_native = read_pet_suv(pet_path, pet_series)
        refuse_ct_as_pet(pet_native, f"PET {pet_path}", dicom_modality(pet_path, pet_series))
        for message in pet_warnings(pet_native, f"PET {pet_path}"):
            warn(message)
        pet = pet_on_ct_grid(pet_native, ct, pet_name=f"PET {pet_path}", ct_name=f"CT {ct_path}")
        if lesion_label_values(model_json):
            from ..petct import field_of_view_mask

            pet_fov = field_of_view_mask(pet_native, ct)
        del pet_native
        if "PET" not in mods:
            lesion_note = ("its lesion statistics come from the labels it predicts on the CT alone"
                           if lesion_label_values(model_json) else
                           "it has no lesion labels, so no lesion is measured on the PET")
            warn(f"model {model_json.get('name', model_dir)!r} reads only {', '.join(mods)}: the PET {pet_path} is not "
                 f"used for the segmentation; {lesion_note}. Use a PET/CT model to segment lesions")
    for message in warnings:
        events.warning(message)
    emit_now = True
    torch_device = resolve_device(device)
    with stage("load model"):
        from .predict import prepare_for_inference

        model, model_json = load_model_folder(model_dir, device=torch_device)
        model = prepare_for_inference(model, torch_device)
    dtype = autocast_dtype(torch_device)
    precision = "fp32" if dtype is None else str(dtype).replace("torch.", "")
    events.log(f"segmenting {ct_path} with {model_json.get('name', model_dir)} on {torch_device} ({precision})")

    def progress(done: int, total: int) -> None:
        events.progress(done, total, "slices" if model_json.get("inference", {}).get("mode", "slicewise2d") == "slicewise2d" else "windows")

    labels = segment_images(model, model_json, ct, pet, progress=progress, compile=compile, log=events.log,
                            warn=events.warning)  # about this run, not the inputs: not in the label table
    del model

    lesions = []
    if pet is not None:
        from ..petct import fov_warnings

        lesions = _lesion_statistics(labels, pet, model_json, pet_fov)
        for message in fov_warnings(lesions, f"the PET {pet_path}"):
            warn(message)

    paths = {}
    with stage("write"):
        write_image(labels, out_path)
        paths["segmentation"] = out_path
        sidecar = label_sidecar_path(out_path)
        atomic_write_text(sidecar, json.dumps(label_table(model_json, labels, warnings), indent=2) + "\n")
        paths["labels"] = sidecar
        if stats_path is not None:
            _write_stats(lesions, stats_path)
            paths["lesion_table"] = stats_path
    for kind, path in paths.items():
        events.artifact(kind, str(path))
    seconds = time.perf_counter() - started
    return SegmentationResult(labels=labels, model_json=model_json, device=str(torch_device), precision=precision,
                              seconds=seconds, lesions=lesions, paths=paths, warnings=warnings)


def lesion_label_values(model_json: dict) -> list[int]:
    """The label values flagged ``lesion: true`` in model.json (tumours, lymph nodes)."""
    return [int(lab["value"]) for lab in (model_json.get("labels") or []) if lab.get("lesion")]


@timed_stage("lesion statistics")
def _lesion_statistics(labels: sitk.Image, pet_on_ct: sitk.Image, model_json: dict, pet_fov=None) -> list:
    """PET statistics (SUVmax, SUVpeak, SUVmean, MTV, TLG) per connected lesion of each lesion label, and
    per label in total (:func:`dinomed.petct.lesion_statistics`)."""
    from ..petct import lesion_statistics

    values = lesion_label_values(model_json)
    if not values:
        return []
    names = {int(lab["value"]): str(lab.get("name", lab["value"])) for lab in model_json.get("labels") or []}
    return lesion_statistics(pet_on_ct, labels, label_values=values, label_names=names, pet_fov=pet_fov)


def _write_stats(lesions: list, path: Path) -> None:
    from ..petct import write_lesion_table

    write_lesion_table(lesions, path)
