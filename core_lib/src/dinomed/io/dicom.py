"""DICOM series: reading one series out of a folder (GDCM through SimpleITK) and writing a volume as a series.

Reading sorts the slices along the slice normal (GDCM) and applies each slice's RescaleSlope/Intercept.
Writing (pydicom) stores one file per axial slice with ImagePositionPatient, ImageOrientationPatient and
PixelSpacing taken from the image's geometry, so that a reader rebuilds the same grid. DICOM derives the
slice axis from the cross product of the row and column directions, so a direction matrix with a negative
determinant (a mirrored grid) comes back as the same physical volume on a z-flipped grid.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import DinomedError, InputImageError
from .volumes import _first_line, _read_file, check_volume

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "PT": "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}


def list_dicom_series(folder: str | os.PathLike) -> list[dict]:
    """The DICOM series in ``folder`` (not recursive): ``[{"uid", "files", "modality", "description"}]``."""
    import pydicom

    folder = Path(folder)
    if not folder.is_dir():
        raise InputImageError(f"{folder}: expected a folder of DICOM files, found no such folder")
    reader = sitk.ImageSeriesReader()
    series = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)):
        files = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
        head = pydicom.dcmread(files[0], stop_before_pixels=True)
        series.append(
            {
                "uid": uid,
                "files": files,
                "modality": str(head.get("Modality", "")),
                "description": str(head.get("SeriesDescription", "")),
            }
        )
    return series


def _describe(series: list[dict]) -> str:
    return "; ".join(f"{s['uid']} ({s['modality'] or '?'}, {len(s['files'])} files, {s['description']!r})" for s in series)


def select_series_files(folder: str | os.PathLike, series_uid: str | None = None) -> list[str]:
    """The files of one series in ``folder``: the one named by ``series_uid``, or the only one there is."""
    folder = Path(folder)
    series = list_dicom_series(folder)
    if not series:
        raise InputImageError(f"{folder}: expected DICOM files, found no DICOM series in this folder")
    if series_uid is not None:
        match = [s for s in series if s["uid"] == series_uid]
        if not match:
            raise InputImageError(f"{folder}: no series with SeriesInstanceUID {series_uid}; found {_describe(series)}")
        return match[0]["files"]
    if len(series) > 1:
        raise InputImageError(
            f"{folder}: holds {len(series)} DICOM series; pick one by its SeriesInstanceUID (dinomed segment: "
            f"--ct-series UID or --pet-series UID) or move it into a folder of its own: {_describe(series)}"
        )
    return series[0]["files"]


def check_pixel_bytes(path: str | os.PathLike):
    """The header of one DICOM file, after checking that its (uncompressed) pixel data is complete: GDCM reads
    a truncated slice as zeros without a word. Returns the header (pydicom Dataset, no pixels)."""
    import pydicom

    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = pydicom.dcmread(handle, stop_before_pixels=True)
            pixel_start = handle.tell()
    except Exception as exc:  # pydicom raises several types for a damaged header
        raise InputImageError(f"{path}: not a readable DICOM file ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
    syntax = getattr(getattr(head, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and getattr(syntax, "is_compressed", False):
        return head  # encapsulated frames: their length is not known from the header
    rows, cols = int(head.get("Rows", 0) or 0), int(head.get("Columns", 0) or 0)
    bits = int(head.get("BitsAllocated", 0) or 0)
    if not (rows and cols and bits):
        return head
    frames = int(head.get("NumberOfFrames", 1) or 1)
    samples = int(head.get("SamplesPerPixel", 1) or 1)
    expected = rows * cols * frames * samples * bits // 8
    available = path.stat().st_size - pixel_start - 12  # the PixelData element's tag, VR and length
    if available < expected:
        raise InputImageError(
            f"{path}: the DICOM file is truncated: its header describes {rows}x{cols}x{frames} pixels of {bits} bits "
            f"({expected} bytes) but at most {max(0, available)} bytes follow; copy or export the series again"
        )
    return head


def _refuse_unread_files(folder: Path, series_files: list[str]) -> None:
    """GDCM leaves a truncated or damaged DICOM file out of the series without a word (the volume then lacks a
    slice): refuse a folder in which a file with the DICOM preamble belongs to no series."""
    listed = {os.path.realpath(f) for f in series_files}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.upper() == "DICOMDIR" or os.path.realpath(path) in listed:
            continue
        try:
            with open(path, "rb") as handle:
                handle.seek(128)
                magic = handle.read(4)
        except OSError:
            continue
        if magic != b"DICM":
            continue
        others = list_dicom_series(folder)
        if any(os.path.realpath(path) in {os.path.realpath(f) for f in s["files"]} for s in others):
            continue  # a file of another series of a mixed folder
        check_pixel_bytes(path)  # names the truncation when that is what it is
        raise InputImageError(f"{path}: a DICOM file of this folder could not be read (damaged?), so the series would "
                              "lack a slice; repair or remove it")


def _refuse_missing_slices(folder: Path, positions: list[float]) -> None:
    """Refuse a series whose slice positions have a gap (a missing file): the volume would be stretched."""
    if len(positions) < 3:
        return
    steps = np.diff(np.sort(np.asarray(positions)))
    typical = float(np.median(steps))
    if typical <= 0:
        return
    gaps = np.flatnonzero(steps > 1.5 * typical)
    if gaps.size:
        at = np.sort(np.asarray(positions))[gaps[0]]
        raise InputImageError(
            f"{folder}: the DICOM series has {gaps.size} gap(s) between slices (e.g. {steps[gaps[0]]:.2f} mm after the "
            f"slice at {at:.2f} mm, where the others are {typical:.2f} mm apart): a slice is missing; copy the series again"
        )


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read one DICOM series of ``folder`` as a 3D volume (a single multi-frame file counts as a series)."""
    import pydicom

    files = select_series_files(folder, series_uid)
    if len(files) == 1:
        return _read_file(Path(files[0]))
    # The series reader takes its pixel type from the first slice; PET slices each carry their own float
    # RescaleSlope, so ask for float whenever any slice is rescaled by a non-integer.
    _refuse_unread_files(Path(folder), files)
    rescaled = False
    positions = []
    for f in files:
        head = check_pixel_bytes(f)
        slope, intercept = float(head.get("RescaleSlope", 1) or 1), float(head.get("RescaleIntercept", 0) or 0)
        if slope != round(slope) or intercept != round(intercept) or slope != 1.0:
            rescaled = True
        iop, ipp = head.get("ImageOrientationPatient"), head.get("ImagePositionPatient")
        if iop is not None and ipp is not None and len(iop) == 6:
            normal = np.cross([float(v) for v in iop[:3]], [float(v) for v in iop[3:]])
            positions.append(float(np.dot(normal, [float(v) for v in ipp])))
    _refuse_missing_slices(Path(folder), positions)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    if rescaled:
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputImageError(
            f"{folder}: the DICOM series could not be read as one volume (a truncated or damaged slice?): "
            f"{_first_line(exc)}"
        ) from None


def _stored_values(plane: np.ndarray, integer: bool, slope: float) -> np.ndarray:
    if integer:
        return plane.astype(np.int16)
    return np.clip(np.round(plane / slope), -32768, 32767).astype(np.int16)


def write_dicom_series(
    image: sitk.Image,
    folder: str | os.PathLike,
    modality: str = "CT",
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_description: str = "",
    series_number: int = 1,
    patient_name: str = "Phantom^Synthetic",
    patient_id: str = "DINOMED-PHANTOM",
    per_slice_rescale: bool | None = None,
    dataset_hook: Callable[[object, int], None] | None = None,
) -> list[Path]:
    """Write a 3D volume as a DICOM series, one file per slice, into ``folder`` (created atomically).

    Voxels are stored as int16 with RescaleSlope/Intercept: integer volumes that fit int16 as they are
    (slope 1), others scaled (one slope for the volume, or one per slice when ``per_slice_rescale``, the PET
    default). ``dataset_hook(ds, k)`` adds modality-specific tags to slice ``k`` (e.g. the SUV tags of a PET).
    The folder appears complete or not at all: files are written into a temporary folder that is renamed.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    modality = modality.upper()
    if modality not in SOP_CLASS:
        raise DinomedError(f"cannot write a DICOM series of modality {modality!r}; expected one of {sorted(SOP_CLASS)}")
    check_volume(image, f"the image to write to {folder}")
    array = sitk.GetArrayFromImage(image)
    integer = np.issubdtype(array.dtype, np.integer) and array.min() >= -32768 and array.max() <= 32767
    if per_slice_rescale is None:
        per_slice_rescale = modality == "PT" and not integer
    finite = np.nan_to_num(array.astype(np.float64)) if not integer else array
    global_slope = float(np.abs(finite).max()) / 32767.0 if not integer else 1.0
    global_slope = global_slope if global_slope > 0 else 1e-6

    spacing = image.GetSpacing()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    now = _dt.datetime.now()

    today, time_now = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    # the attributes every slice of the series shares (keywords as pydicom names them)
    series = {
        "SOPClassUID": SOP_CLASS[modality], "Modality": modality, "PatientName": patient_name,
        "PatientID": patient_id, "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": frame_of_reference_uid, "SeriesNumber": series_number,
        "SeriesDescription": series_description, "StudyDate": today, "SeriesDate": today, "AcquisitionDate": today,
        "ContentDate": today, "StudyTime": time_now, "SeriesTime": time_now, "AcquisitionTime": time_now,
        "ContentTime": time_now, "ImageType": ["DERIVED", "SECONDARY"],
        "ImageOrientationPatient": [f"{v:.8f}" for v in np.concatenate([direction[:, 0], direction[:, 1]])],
        "PixelSpacing": [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"],  # row spacing (y), column spacing (x)
        "SliceThickness": f"{spacing[2]:.6f}", "SpacingBetweenSlices": f"{spacing[2]:.6f}",
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
        "Rows": int(array.shape[1]), "Columns": int(array.shape[2]),
        "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 1,
        "RescaleIntercept": "0", "RescaleType": "HU" if modality == "CT" else "US",
    }
    normal = np.cross(direction[:, 0], direction[:, 1])

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    written = []
    try:
        for k in range(array.shape[0]):
            plane = finite[k]
            if integer:
                slope = 1.0
            elif per_slice_rescale:
                peak = float(np.abs(plane).max())
                slope = peak / 32767.0 if peak > 0 else global_slope
            else:
                slope = global_slope
            sop_uid = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.update(series)
            position = origin + k * spacing[2] * direction[:, 2]
            ds.update({
                "SOPInstanceUID": sop_uid, "InstanceNumber": k + 1,
                "ImagePositionPatient": [f"{v:.6f}" for v in position],
                "SliceLocation": f"{float(np.dot(position, normal)):.6f}",
                "RescaleSlope": f"{slope:.10g}" if not integer else "1",
                "PixelData": _stored_values(plane, integer, slope).tobytes(),
            })
            if dataset_hook is not None:
                dataset_hook(ds, k)
            path = tmp_dir / f"{modality.lower()}_{k + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(folder / path.name)
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / "prev")
        os.replace(tmp_dir, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return written

