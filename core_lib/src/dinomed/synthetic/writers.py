"""Writing phantoms: one case folder (NIfTI, optionally DICOM series with the SUV tags) and an nnU-Net dataset.

A case folder holds ``ct.nii.gz`` (HU), ``pet.nii.gz`` (SUV, on the PET's own grid), ``labels.nii.gz``
(organs + lesions on the CT grid, lesion overrides organ), ``organs.nii.gz``, ``lesions.nii.gz`` (1 = lesion),
``lesion_ids.nii.gz``, ``phantom.json`` (seed, grids, patient, lesions) and ``dataset.json`` (the label table).
With DICOM, ``ct_dicom/`` (CT Image Storage, HU via RescaleSlope 1) and ``pet_dicom/`` (PET Image Storage,
Units BQML, DecayCorrection START, with weight, height, sex, injected dose, injection and series times) are
added; :func:`dinomed.petct.suv_from_dicom` recovers the SUV from ``pet_dicom/``.

The dataset writer follows the nnU-Net raw layout of docs/CONTRACTS.md: ``imagesTr/<case>_0000.nii.gz``
(CT), ``imagesTr/<case>_0001.nii.gz`` (PET resampled onto the CT grid), ``labelsTr/<case>.nii.gz``.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_write_text
from ..io import write_dicom_series, write_image
from .labels import dataset_labels, label_entries
from .phantom import Phantom, make_phantom

CHANNEL_NAMES = {"0": "CT", "1": "PET"}


def _dataset_json(num_training: int, name: str = "dinomed-synthetic-petct") -> dict:
    return {
        "name": name,
        "description": "Synthetic PET/CT phantoms (dinomed.synthetic): CT in HU, PET in SUV (body weight)",
        "channel_names": dict(CHANNEL_NAMES),
        "labels": dataset_labels(),
        "numTraining": int(num_training),
        "file_ending": ".nii.gz",
        "label_entries": label_entries(),  # colours and SNOMED-CT codes, model.json format
    }


def _pet_times(phantom: Phantom) -> tuple[_dt.datetime, _dt.datetime]:
    """Injection and series start (= injection + uptake) of the phantom's PET, on a date drawn from the seed."""
    date = _dt.datetime(2024, 1, 1) + _dt.timedelta(days=int(phantom.seed) % 365)
    injection = date + _dt.timedelta(seconds=phantom.patient["injection_seconds_of_day"])
    return injection, injection + _dt.timedelta(seconds=phantom.patient["uptake_seconds"])


def pet_bqml_scale(phantom: Phantom) -> float:
    """Bq/ml per SUV unit for the phantom's patient: decayed dose (Bq) / body weight (g), QIBA's SUVbw inverted."""
    p = phantom.patient
    decayed = p["injected_dose_bq"] * math.pow(2.0, -p["uptake_seconds"] / p["half_life_s"])
    return decayed / (p["weight_kg"] * 1000.0)


def write_phantom_dicom(phantom: Phantom, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write the CT (HU) and the PET (Bq/ml, every SUV tag set) as two DICOM series: ``ct_dicom/``, ``pet_dicom/``."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    out_dir = Path(out_dir)
    study_uid, frame_uid = generate_uid(), generate_uid()
    injection, series_time = _pet_times(phantom)
    patient = phantom.patient
    use_datetime = phantom.seed % 2 == 0  # odd seeds carry only RadiopharmaceuticalStartTime, as older scanners

    def common(ds, _k):
        ds.PatientWeight = f"{patient['weight_kg']:.2f}"
        ds.PatientSize = f"{patient['height_m']:.3f}"
        ds.PatientSex = patient["sex"]
        ds.StudyDate = series_time.strftime("%Y%m%d")
        ds.StudyTime = injection.strftime("%H%M%S.%f")

    def ct_hook(ds, k):
        common(ds, k)
        ds.SeriesDate = ds.AcquisitionDate = series_time.strftime("%Y%m%d")
        ds.SeriesTime = ds.AcquisitionTime = (series_time - _dt.timedelta(minutes=3)).strftime("%H%M%S.%f")
        ds.KVP = "120"

    def pet_hook(ds, k):
        common(ds, k)
        ds.SeriesDate = ds.AcquisitionDate = series_time.strftime("%Y%m%d")
        ds.SeriesTime = ds.AcquisitionTime = series_time.strftime("%H%M%S.%f")
        ds.Units = "BQML"
        ds.DecayCorrection = "START"
        ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM"]
        ds.SeriesType = ["WHOLE BODY", "IMAGE"]
        ds.NumberOfSlices = phantom.pet.GetSize()[2]
        ds.ImageIndex = k + 1
        info = Dataset()
        info.Radiopharmaceutical = patient["radiopharmaceutical"]
        info.RadiopharmaceuticalStartTime = injection.strftime("%H%M%S.%f")
        if use_datetime:
            info.RadiopharmaceuticalStartDateTime = injection.strftime("%Y%m%d%H%M%S.%f")
        info.RadionuclideTotalDose = f"{patient['injected_dose_bq']:.1f}"
        info.RadionuclideHalfLife = f"{patient['half_life_s']}"
        info.RadionuclidePositronFraction = "0.9673"
        ds.RadiopharmaceuticalInformationSequence = [info]

    ct_dir = out_dir / "ct_dicom"
    pet_dir = out_dir / "pet_dicom"
    write_dicom_series(phantom.ct, ct_dir, modality="CT", study_uid=study_uid, frame_of_reference_uid=frame_uid,
                       series_description=f"synthetic CT seed {phantom.seed}", series_number=2, dataset_hook=ct_hook)
    bqml = sitk.Cast(phantom.pet, sitk.sitkFloat32) * pet_bqml_scale(phantom)
    write_dicom_series(bqml, pet_dir, modality="PT", study_uid=study_uid, frame_of_reference_uid=frame_uid,
                       series_description=f"synthetic PET seed {phantom.seed}", series_number=3,
                       per_slice_rescale=True, dataset_hook=pet_hook)
    return ct_dir, pet_dir


def write_phantom_case(phantom: Phantom, out_dir: str | os.PathLike, dicom: bool = False) -> dict[str, Path]:
    """Write one phantom into ``out_dir`` (created if needed); returns the written paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "ct": write_image(phantom.ct, out_dir / "ct.nii.gz"),
        "pet": write_image(phantom.pet, out_dir / "pet.nii.gz"),
        "labels": write_image(phantom.labels, out_dir / "labels.nii.gz"),
        "organs": write_image(phantom.organs, out_dir / "organs.nii.gz"),
        "lesions": write_image(phantom.lesions, out_dir / "lesions.nii.gz"),
        "lesion_ids": write_image(phantom.lesion_ids, out_dir / "lesion_ids.nii.gz"),
    }
    summary = phantom.summary()
    summary["pet_bqml_per_suv"] = pet_bqml_scale(phantom)
    atomic_write_text(out_dir / "phantom.json", json.dumps(summary, indent=2))
    atomic_write_text(out_dir / "dataset.json", json.dumps(_dataset_json(1), indent=2))
    paths["phantom_json"] = out_dir / "phantom.json"
    paths["dataset_json"] = out_dir / "dataset.json"
    if dicom:
        paths["ct_dicom"], paths["pet_dicom"] = write_phantom_dicom(phantom, out_dir)
    return paths


def write_nnunet_dataset(
    out_dir: str | os.PathLike,
    seeds: Iterable[int],
    shape: tuple[int, int, int] = (64, 128, 128),
    progress: Callable[[int, int, str], None] | None = None,
    lesion_free_fraction: float = 0.0,
    classification_csv: bool = False,
    **phantom_kwargs,
) -> Path:
    """Write one phantom per seed as an nnU-Net raw dataset (CT ``_0000``, PET on the CT grid ``_0001``,
    labels) with its ``dataset.json``; returns the path of ``dataset.json``. ``progress(done, total, msg)``
    is called after each case.

    For the classification task (``dinomed classify``): ``lesion_free_fraction`` draws about that fraction of
    the cases without lesions (decided per seed, :func:`~dinomed.synthetic.classification.lesion_free`; the
    other cases are the same phantoms as without it), and ``classification_csv`` also writes
    ``classification.csv`` (case, patient, one 0/1 column per label of
    :func:`~dinomed.synthetic.classification.classification_labels`)."""
    from .classification import CLASSIFICATION_LABELS, classification_labels, lesion_free

    from ..petct import resample_to_reference

    out_dir = Path(out_dir)
    seeds = [int(s) for s in seeds]
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    rows = []
    for done, seed in enumerate(seeds, start=1):
        kwargs = dict(phantom_kwargs)
        if lesion_free(seed, lesion_free_fraction):
            kwargs["n_lesions"] = 0
        phantom = make_phantom(seed, shape=shape, **kwargs)
        case = f"case_{seed:04d}"
        rows.append({"case": case, "patient": case, **classification_labels(phantom)})
        pet_on_ct = resample_to_reference(phantom.pet, phantom.ct, "linear", 0.0, "PET", "CT")
        write_image(phantom.ct, out_dir / "imagesTr" / f"{case}_0000.nii.gz")
        write_image(pet_on_ct, out_dir / "imagesTr" / f"{case}_0001.nii.gz")
        write_image(phantom.labels, out_dir / "labelsTr" / f"{case}.nii.gz")
        if progress is not None:
            progress(done, len(seeds), "phantoms")
    if classification_csv:
        columns = ["case", "patient", *CLASSIFICATION_LABELS]
        lines = [",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in rows]
        atomic_write_text(out_dir / "classification.csv", "\n".join(lines) + "\n")
    path = out_dir / "dataset.json"
    atomic_write_text(path, json.dumps(_dataset_json(len(seeds)), indent=2))
    return path


def label_volume_ml(labels: sitk.Image, value: int) -> float:
    """Volume (ml) of the voxels of ``labels`` equal to ``value``."""
    count = int(np.count_nonzero(sitk.GetArrayViewFromImage(labels) == value))
    return count * float(np.prod(labels.GetSpacing())) / 1000.0
