"""Standardized uptake values from PET DICOM, the way QIBA's vendor-neutral SUV pseudo-code computes them.

Body-weight SUV: ``SUVbw = C * weight[g] / decayed dose[Bq]`` with C in Bq/ml (Units BQML, decay corrected
to the series start, DecayCorrection START) and the injected dose (RadionuclideTotalDose) decayed with
RadionuclideHalfLife from the injection time (RadiopharmaceuticalStartDateTime, else SeriesDate +
RadiopharmaceuticalStartTime) to the scan reference time. QIBA's rule for that reference time:

* if SeriesDate/SeriesTime is not after the (earliest) AcquisitionDate/AcquisitionTime of the series, it is
  the series date and time (this covers dynamic series such as ACRIN-FLT-Breast 028, whose SeriesTime equals
  the injection time and whose frames are decay corrected to it);
* otherwise the series was post-processed and its series time says nothing about the acquisition: use GE's
  private scan date-time (0009,100D) when present, else back-compute it from a frame's AcquisitionDate/Time,
  FrameReferenceTime and ActualFrameDuration (the time of the frame's average count rate), else the
  earliest AcquisitionDate/Time of the series.

Other units: Philips ``CNTS`` images carry the SUV scale factor in the private tag (7053,1000); ``GML`` images
are already SUVbw. With PatientSize and PatientSex also: SUL (lean body mass, Janmahasatian et al. 2005),
SUVbsa (body surface area, Du Bois) and SUVibw (ideal body weight, Devine). Reference: QIBA FDG-PET/CT
profile and the "Standardized Uptake Value (SUV)" vendor-neutral pseudo-code on the QIBA wiki.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk

from ..errors import DinomedError

SUV_KINDS = ("bw", "lbm", "bsa", "ibw")
PHILIPS_SUV_FACTOR = (0x7053, 0x1000)
GE_SCAN_DATETIME = (0x0009, 0x100D)


@dataclass
class SUVFactors:
    """What turns a PET series' values into SUV: the factors per kind and every number they came from."""

    units: str
    bw: float  # SUVbw per stored value unit (after RescaleSlope/Intercept)
    lbm: float | None = None  # SUL
    bsa: float | None = None
    ibw: float | None = None
    weight_kg: float | None = None
    height_m: float | None = None
    sex: str | None = None
    injected_dose_bq: float | None = None
    decayed_dose_bq: float | None = None
    half_life_s: float | None = None
    injection_time: str | None = None
    reference_time: str | None = None
    decay_time_s: float | None = None
    reference_rule: str = ""
    tags: dict = field(default_factory=dict)

    def factor(self, kind: str = "bw") -> float:
        if kind not in SUV_KINDS:
            raise DinomedError(f"unknown SUV kind {kind!r}; expected one of {SUV_KINDS}")
        value = getattr(self, kind)
        if value is None:
            raise DinomedError(
                f"SUV{kind} needs PatientSize (0010,1020) and PatientSex (0010,0040), which this series lacks"
            )
        return value

    def as_dict(self) -> dict:
        return asdict(self)


# --- DICOM date/time parsing ------------------------------------------------------------------------------

def _parse_time(value: str, tag: str, path) -> _dt.time:
    text = str(value).strip().replace(":", "")
    try:
        main, _, frac = text.partition(".")
        if len(main) < 2 or not main.isdigit():
            raise ValueError
        hh, mm, ss = int(main[0:2]), int(main[2:4] or 0), int(main[4:6] or 0)
        micro = int((frac + "000000")[:6]) if frac else 0
        return _dt.time(hh, mm, ss, micro)
    except ValueError:
        raise DinomedError(f"{path}: {tag} is {value!r}; expected a DICOM time HHMMSS[.FFFFFF]") from None


def _parse_date(value: str, tag: str, path) -> _dt.date:
    text = str(value).strip().replace("-", "").replace(".", "")
    try:
        return _dt.date(int(text[0:4]), int(text[4:6]), int(text[6:8]))
    except (ValueError, IndexError):
        raise DinomedError(f"{path}: {tag} is {value!r}; expected a DICOM date YYYYMMDD") from None


def _parse_datetime(value: str, tag: str, path) -> _dt.datetime:
    text = str(value).strip()
    for sign in ("+", "-"):  # drop a UTC offset suffix &ZZXX
        if sign in text[8:]:
            text = text[: 8 + text[8:].index(sign)]
    if len(text) < 8:
        raise DinomedError(f"{path}: {tag} is {value!r}; expected a DICOM date-time YYYYMMDDHHMMSS[.FFFFFF]")
    date = _parse_date(text[:8], tag, path)
    time = _parse_time(text[8:] or "000000", tag, path) if len(text) > 8 else _dt.time(0, 0)
    return _dt.datetime.combine(date, time)


# --- reading and checking the headers ---------------------------------------------------------------------

def _require(ds, keyword: str, path, tag: str):
    value = ds.get(keyword)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DinomedError(f"{path}: the PET header lacks {keyword} {tag}, which SUV needs")
    return value


def _positive(ds, keyword: str, path, tag: str) -> float:
    value = _require(ds, keyword, path, tag)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DinomedError(f"{path}: {keyword} {tag} is {value!r}; expected a number") from None
    if not math.isfinite(number) or number <= 0:
        raise DinomedError(f"{path}: {keyword} {tag} is {value!r}; expected a positive number")
    return number


def _series_datetime(ds, path, date_kw, time_kw, date_tag, time_tag) -> _dt.datetime:
    date = _parse_date(_require(ds, date_kw, path, date_tag), date_kw, path)
    time = _parse_time(_require(ds, time_kw, path, time_tag), time_kw, path)
    return _dt.datetime.combine(date, time)


def _private_value(ds, tag):
    element = ds.get(tag)
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "ignore").strip("\x00 ")
    return value


def _consistent(datasets, paths, keyword: str, tag: str, getter=None) -> None:
    """Raise unless every slice carries the same value of ``keyword`` (SUV needs one value per series)."""
    get = getter or (lambda ds: ds.get(keyword))
    first = get(datasets[0])
    for ds, path in zip(datasets[1:], paths[1:]):
        value = get(ds)
        if str(value) != str(first):
            raise DinomedError(
                f"{path}: {keyword} {tag} is {value!r} but {paths[0]} has {first!r}; the slices of one PET series "
                "must agree on it for SUV"
            )


def _radiopharmaceutical(ds, path):
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        raise DinomedError(f"{path}: the PET header lacks RadiopharmaceuticalInformationSequence (0054,0016), which SUV needs")
    return seq[0]


def _average_count_rate_offset_s(duration_s: float, half_life_s: float) -> float:
    """Time after a frame's start at which the count rate equals its average over the frame (QIBA)."""
    lam = math.log(2.0) / half_life_s
    decay_in_frame = lam * duration_s
    return math.log(decay_in_frame / (1.0 - math.exp(-decay_in_frame))) / lam


def _reference_time(datasets, paths, half_life_s: float) -> tuple[_dt.datetime, str]:
    """QIBA's scan reference date-time for a series decay corrected to START."""
    ds0, path0 = datasets[0], paths[0]
    series_dt = _series_datetime(ds0, path0, "SeriesDate", "SeriesTime", "(0008,0021)", "(0008,0031)")
    acquisitions = [
        _series_datetime(ds, p, "AcquisitionDate", "AcquisitionTime", "(0008,0022)", "(0008,0032)")
        for ds, p in zip(datasets, paths)
    ]
    earliest = min(acquisitions)
    if series_dt <= earliest:
        return series_dt, "SeriesDate/SeriesTime (not after the earliest AcquisitionDate/Time)"
    ge = _private_value(ds0, GE_SCAN_DATETIME)
    if ge:
        return _parse_datetime(ge, "GE private scan date-time (0009,100D)", path0), (
            "GE private scan date-time (0009,100D): SeriesTime is after AcquisitionTime"
        )
    frame_ref = ds0.get("FrameReferenceTime")
    duration = ds0.get("ActualFrameDuration")
    if frame_ref is not None and duration is not None and float(frame_ref) > 0 and float(duration) > 0:
        offset = _average_count_rate_offset_s(float(duration) / 1000.0, half_life_s)
        scan = acquisitions[0] - _dt.timedelta(seconds=float(frame_ref) / 1000.0) + _dt.timedelta(seconds=offset)
        return scan, (
            "AcquisitionDate/Time - FrameReferenceTime + average-count-rate time of the frame "
            "(SeriesTime is after AcquisitionTime)"
        )
    return earliest, "earliest AcquisitionDate/Time of the series (SeriesTime is after AcquisitionTime)"


def _body_size_factors(weight_kg: float, height_m: float | None, sex: str | None, decayed_dose: float):
    if not height_m or sex not in ("M", "F"):
        return None, None, None
    bmi = weight_kg / (height_m * height_m)
    if sex == "M":
        lbm = 9270.0 * weight_kg / (6680.0 + 216.0 * bmi)
        ibw = 50.0 + 2.3 * (height_m * 100.0 / 2.54 - 60.0)
    else:
        lbm = 9270.0 * weight_kg / (8780.0 + 244.0 * bmi)
        ibw = 45.5 + 2.3 * (height_m * 100.0 / 2.54 - 60.0)
    bsa_m2 = 0.007184 * weight_kg**0.425 * (height_m * 100.0) ** 0.725
    return lbm * 1000.0 / decayed_dose, bsa_m2 * 1e4 / decayed_dose, ibw * 1000.0 / decayed_dose


def suv_factors(datasets: list, paths: list | None = None) -> SUVFactors:
    """The SUV factors of one PET series given its pydicom datasets (every slice, for the consistency checks)."""
    paths = paths or [f"slice {i + 1}" for i in range(len(datasets))]
    ds, path = datasets[0], paths[0]
    if str(ds.get("Modality", "PT")).upper() not in ("PT", "PET"):
        raise DinomedError(f"{path}: Modality (0008,0060) is {ds.get('Modality')!r}; SUV needs a PET series (PT)")
    units = str(_require(ds, "Units", path, "(0054,1001)")).strip().upper()
    _consistent(datasets, paths, "Units", "(0054,1001)")
    tags = {"Units": units}

    if units == "GML":
        weight = float(ds.get("PatientWeight") or 0) or None
        return SUVFactors(units=units, bw=1.0, weight_kg=weight, reference_rule="GML: values are SUVbw already",
                          tags=tags)
    if units == "CNTS":
        value = _private_value(ds, PHILIPS_SUV_FACTOR)
        if value in (None, ""):
            raise DinomedError(
                f"{path}: Units are CNTS but the Philips private SUV scale factor (7053,1000) is missing; "
                "cannot convert counts to SUV"
            )
        _consistent(datasets, paths, "Philips SUV scale factor", "(7053,1000)", lambda d: _private_value(d, PHILIPS_SUV_FACTOR))
        factor = float(value)
        if not factor > 0:
            raise DinomedError(f"{path}: the Philips SUV scale factor (7053,1000) is {value!r}; expected a positive number")
        tags["PhilipsSUVScaleFactor(7053,1000)"] = factor
        return SUVFactors(units=units, bw=factor, reference_rule="Philips private SUV scale factor (7053,1000)",
                          tags=tags)
    if units != "BQML":
        raise DinomedError(f"{path}: Units (0054,1001) is {units!r}; SUV is defined for BQML, CNTS (Philips) or GML")

    decay = str(_require(ds, "DecayCorrection", path, "(0054,1102)")).strip().upper()
    _consistent(datasets, paths, "DecayCorrection", "(0054,1102)")
    if decay not in ("START", "ADMIN"):
        raise DinomedError(f"{path}: DecayCorrection (0054,1102) is {decay!r}; SUV needs START (or ADMIN)")
    corrected = [str(v).upper() for v in (ds.get("CorrectedImage") or [])]
    if "DECY" not in corrected or "ATTN" not in corrected:
        raise DinomedError(
            f"{path}: CorrectedImage (0028,0051) is {corrected or 'missing'}; SUV needs an attenuation (ATTN) and "
            "decay (DECY) corrected image"
        )
    weight = _positive(ds, "PatientWeight", path, "(0010,1030)")
    _consistent(datasets, paths, "PatientWeight", "(0010,1030)")
    radio = _radiopharmaceutical(ds, path)
    dose = _positive(radio, "RadionuclideTotalDose", path, "(0018,1074)")
    half_life = _positive(radio, "RadionuclideHalfLife", path, "(0018,1075)")
    for keyword, tag in (("SeriesDate", "(0008,0021)"), ("SeriesTime", "(0008,0031)")):
        _consistent(datasets, paths, keyword, tag)
    _consistent(datasets, paths, "RadionuclideTotalDose", "(0018,1074)",
                lambda d: _radiopharmaceutical(d, path).get("RadionuclideTotalDose"))

    start_dt = radio.get("RadiopharmaceuticalStartDateTime")
    if start_dt:
        injection = _parse_datetime(start_dt, "RadiopharmaceuticalStartDateTime (0018,1078)", path)
        tags["RadiopharmaceuticalStartDateTime"] = str(start_dt)
    else:
        start_time = radio.get("RadiopharmaceuticalStartTime")
        if not start_time:
            raise DinomedError(
                f"{path}: the PET header has neither RadiopharmaceuticalStartDateTime (0018,1078) nor "
                "RadiopharmaceuticalStartTime (0018,1072); the injection time is needed for SUV"
            )
        series_date = _parse_date(_require(ds, "SeriesDate", path, "(0008,0021)"), "SeriesDate", path)
        injection = _dt.datetime.combine(series_date, _parse_time(start_time, "RadiopharmaceuticalStartTime", path))
        tags["RadiopharmaceuticalStartTime"] = str(start_time)

    if decay == "ADMIN":
        reference, rule = injection, "DecayCorrection ADMIN: the image is decay corrected to the injection"
    else:
        reference, rule = _reference_time(datasets, paths, half_life)
    decay_time = (reference - injection).total_seconds()
    if decay_time < 0:
        raise DinomedError(
            f"{path}: the injection time {injection.isoformat()} is after the scan reference time "
            f"{reference.isoformat()} ({rule}); check RadiopharmaceuticalStartTime/DateTime and SeriesDate/Time"
        )
    decayed = dose * math.pow(2.0, -decay_time / half_life)
    height = ds.get("PatientSize")
    height_m = float(height) if height not in (None, "") and float(height) > 0 else None
    if height_m is not None and height_m > 3.0:  # some scanners write centimetres
        height_m /= 100.0
    sex = str(ds.get("PatientSex") or "").strip().upper() or None
    lbm, bsa, ibw = _body_size_factors(weight, height_m, sex, decayed)
    tags.update({
        "DecayCorrection": decay, "CorrectedImage": corrected, "PatientWeight": weight,
        "PatientSize": height_m, "PatientSex": sex, "RadionuclideTotalDose": dose, "RadionuclideHalfLife": half_life,
        "SeriesDate": str(ds.get("SeriesDate")), "SeriesTime": str(ds.get("SeriesTime")),
        "AcquisitionTime": str(ds.get("AcquisitionTime")),
    })
    return SUVFactors(
        units=units, bw=weight * 1000.0 / decayed, lbm=lbm, bsa=bsa, ibw=ibw, weight_kg=weight, height_m=height_m,
        sex=sex, injected_dose_bq=dose, decayed_dose_bq=decayed, half_life_s=half_life,
        injection_time=injection.isoformat(), reference_time=reference.isoformat(), decay_time_s=decay_time,
        reference_rule=rule, tags=tags,
    )


# --- the volume ---------------------------------------------------------------------------------------

def _pet_files(source, series_uid: str | None) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        if not source.exists():
            raise DinomedError(f"{source}: no such PET DICOM file or folder")
        if source.is_dir():
            from ..io.dicom import select_series_files

            return [Path(f) for f in select_series_files(source, series_uid)]
        return [source]
    files = [Path(f) for f in source]
    if not files:
        raise DinomedError("no PET DICOM files given")
    for f in files:
        if not f.is_file():
            raise DinomedError(f"{f}: no such PET DICOM file")
    return files


def _geometry(datasets, paths):
    """Sort slices along the slice normal; return (order, origin, spacing, direction) of the volume."""
    iop = np.array([float(v) for v in _require(datasets[0], "ImageOrientationPatient", paths[0], "(0020,0037)")])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    positions = []
    for ds, path in zip(datasets, paths):
        _consistent([datasets[0], ds], [paths[0], path], "ImageOrientationPatient", "(0020,0037)",
                    lambda d: [round(float(v), 4) for v in d.get("ImageOrientationPatient", [])])
        positions.append(np.array([float(v) for v in _require(ds, "ImagePositionPatient", path, "(0020,0032)")]))
    along = np.array([float(np.dot(p, normal)) for p in positions])
    order = np.argsort(along, kind="stable")
    spacing_xy = [float(v) for v in _require(datasets[0], "PixelSpacing", paths[0], "(0028,0030)")]
    if len(order) > 1:
        gaps = np.diff(along[order])
        if np.any(gaps <= 1e-3):
            i = int(np.argmin(gaps))
            raise DinomedError(
                f"{paths[order[i + 1]]}: ImagePositionPatient (0020,0032) repeats the position of {paths[order[i]]}; "
                "two slices at one position (several time frames or series mixed?)"
            )
        if np.ptp(gaps) > max(0.01 * gaps.mean(), 1e-3):
            raise DinomedError(
                f"{paths[0]}: the slice positions are not evenly spaced (gaps {gaps.min():.3f} to {gaps.max():.3f} mm); "
                "missing slices?"
            )
        dz = float(gaps.mean())
    else:
        ds0 = datasets[0]
        dz = float(ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness") or 1.0)
    direction = np.stack([row, col, normal], axis=1)
    origin = positions[int(order[0])]
    return order, origin, (spacing_xy[1], spacing_xy[0], dz), direction


def suv_from_dicom(
    source: str | os.PathLike | Iterable[str | os.PathLike],
    series_uid: str | None = None,
    kind: str = "bw",
    return_factors: bool = False,
):
    """A PET DICOM series (a folder, a file, or a list of files) as a float32 ``sitk.Image`` in SUV.

    ``kind`` is ``bw`` (body weight, default), ``lbm`` (SUL), ``bsa`` or ``ibw``. Each slice's RescaleSlope
    and RescaleIntercept are applied before the SUV factor; slices are sorted along the slice normal and the
    image gets their origin, spacing and direction. With ``return_factors`` returns ``(image, SUVFactors)``.
    Raises :class:`DinomedError` naming the tag and the file when one is missing or inconsistent.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = _pet_files(source, series_uid)
    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f))
        except (InvalidDicomError, OSError) as exc:
            raise DinomedError(f"{f}: not a readable DICOM file ({exc})") from None
    uids = {str(ds.get("SeriesInstanceUID")) for ds in datasets}
    if len(uids) > 1:
        raise DinomedError(f"{files[0]}: the files belong to {len(uids)} series (SeriesInstanceUID differs); pass one series")
    factors = suv_factors(datasets, files)
    factor = factors.factor(kind)
    order, origin, spacing, direction = _geometry(datasets, files)
    planes = []
    for i in order:
        ds = datasets[i]
        try:
            stored = ds.pixel_array.astype(np.float64)
        except Exception as exc:  # pydicom raises several types for undecodable pixel data
            raise DinomedError(f"{files[i]}: the pixel data cannot be decoded ({exc})") from None
        if stored.ndim != 2:
            raise DinomedError(f"{files[i]}: expected one 2D PET slice per file, found pixel data of shape {stored.shape}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        planes.append((stored * slope + intercept) * factor)
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise DinomedError(f"{files[0]}: the slices differ in size ({sorted(shapes)}); Rows/Columns must agree")
    image = sitk.GetImageFromArray(np.stack(planes).astype(np.float32))
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    return (image, factors) if return_factors else image

