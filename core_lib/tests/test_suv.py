"""SUV from PET DICOM: pydicom-written series with known dose, times and weight against the QIBA formula
computed here by hand; the real ACRIN-FLT-Breast slices; one test per error case."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dinomed.errors import DinomedError
from dinomed.io import array_to_image, write_dicom_series
from dinomed.petct import suv_from_dicom

HALF_LIFE = 6586.2
DOSE = 370e6
WEIGHT = 75.0


def _bqml_volume() -> sitk.Image:
    rng = np.random.default_rng(3)
    array = (rng.random((5, 12, 14)) * 20000.0 + 100.0).astype(np.float32)
    return array_to_image(array, spacing=(4.0, 4.0, 3.27), origin=(-200.0, -180.0, -700.0))


def _write_pet(folder: Path, tags: dict | None = None, per_slice: dict | None = None, radio: dict | None = None,
               image: sitk.Image | None = None) -> Path:
    """A PET series whose header holds the standard tags, overridden by ``tags`` (None deletes a tag),
    ``per_slice`` {slice index: {tag: value}} and ``radio`` (RadiopharmaceuticalInformationSequence item)."""
    base = {
        "Units": "BQML", "DecayCorrection": "START", "CorrectedImage": ["ATTN", "DECY"],
        "PatientWeight": f"{WEIGHT}", "SeriesDate": "20240301", "SeriesTime": "101500.000000",
        "AcquisitionDate": "20240301", "AcquisitionTime": "101500.000000",
    }
    base.update(tags or {})
    item = {"RadiopharmaceuticalStartDateTime": "20240301091500.000000", "RadionuclideTotalDose": f"{DOSE}",
            "RadionuclideHalfLife": f"{HALF_LIFE}"}
    item.update(radio or {})

    def hook(ds, k):
        for key, value in {**base, **(per_slice or {}).get(k, {})}.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            elif isinstance(key, tuple):
                ds.add_new(key, "DS", value)
            else:
                setattr(ds, key, value)
        info = Dataset()
        for key, value in item.items():
            if value is not None:
                setattr(info, key, value)
        ds.RadiopharmaceuticalInformationSequence = [info]

    write_dicom_series(image or _bqml_volume(), folder, modality="PT", per_slice_rescale=True, dataset_hook=hook)
    return folder


def _stored_bqml(folder: Path) -> np.ndarray:
    """The values the files hold (stored x RescaleSlope + RescaleIntercept), sorted by z position."""
    files = sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    planes = []
    for f in files:
        ds = pydicom.dcmread(f)
        planes.append(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(planes)


def _qiba_bw(weight_kg, dose, decay_s, half_life=HALF_LIFE):
    return weight_kg * 1000.0 / (dose * math.pow(2.0, -decay_s / half_life))


def test_bqml_matches_hand_formula(tmp_path):
    folder = _write_pet(tmp_path / "pet")
    image, factors = suv_from_dicom(folder, return_factors=True)
    expected_factor = _qiba_bw(WEIGHT, DOSE, 3600.0)  # 09:15 injection, 10:15 series
    assert factors.bw == pytest.approx(expected_factor, rel=1e-12)
    assert factors.decay_time_s == pytest.approx(3600.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), _stored_bqml(folder) * expected_factor, rtol=1e-5)
    # geometry of the written series comes back
    np.testing.assert_allclose(image.GetOrigin(), (-200.0, -180.0, -700.0), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), (4.0, 4.0, 3.27), atol=1e-4)


def test_start_time_only_uses_series_date(tmp_path):
    folder = _write_pet(tmp_path / "pet", radio={"RadiopharmaceuticalStartDateTime": None,
                                                 "RadiopharmaceuticalStartTime": "094000.500000"})
    factors = suv_from_dicom(folder, return_factors=True)[1]
    assert factors.decay_time_s == pytest.approx(35 * 60 - 0.5)
    assert factors.bw == pytest.approx(_qiba_bw(WEIGHT, DOSE, 35 * 60 - 0.5), rel=1e-12)


def test_series_after_acquisition_uses_frame_reference_time(tmp_path):
    # a post-processed series: SeriesTime 11:00 is after AcquisitionTime 10:15; QIBA back-computes the scan
    # start from the frame's acquisition time, FrameReferenceTime and ActualFrameDuration
    frame_ref_ms, duration_ms = 150000.0, 300000.0
    folder = _write_pet(tmp_path / "pet", tags={"SeriesTime": "110000", "FrameReferenceTime": f"{frame_ref_ms}",
                                                "ActualFrameDuration": int(duration_ms)})
    factors = suv_from_dicom(folder, return_factors=True)[1]
    lam = math.log(2) / HALF_LIFE
    d = lam * duration_ms / 1000
    average_offset = math.log(d / (1 - math.exp(-d))) / lam
    decay = 3600.0 - frame_ref_ms / 1000 + average_offset
    assert factors.decay_time_s == pytest.approx(decay, abs=1e-3)
    assert "FrameReferenceTime" in factors.reference_rule


def test_series_after_acquisition_without_frame_times_uses_earliest_acquisition(tmp_path):
    folder = _write_pet(tmp_path / "pet", tags={"SeriesTime": "110000"},
                        per_slice={2: {"AcquisitionTime": "100500"}, 3: {"AcquisitionTime": "102000"}})
    factors = suv_from_dicom(folder, return_factors=True)[1]
    assert factors.decay_time_s == pytest.approx(50 * 60)  # 09:15 -> earliest acquisition 10:05
    assert "earliest AcquisitionDate/Time" in factors.reference_rule


def test_sul_bsa_ibw_with_height_and_sex(tmp_path):
    folder = _write_pet(tmp_path / "pet", tags={"PatientSize": "1.80", "PatientSex": "M"})
    factors = suv_from_dicom(folder, return_factors=True)[1]
    decayed = DOSE * 2 ** (-3600 / HALF_LIFE)
    bmi = WEIGHT / 1.8**2
    lbm = 9270 * WEIGHT / (6680 + 216 * bmi)  # Janmahasatian, male
    assert factors.lbm == pytest.approx(lbm * 1000 / decayed, rel=1e-12)
    bsa = 0.007184 * WEIGHT**0.425 * 180**0.725
    assert factors.bsa == pytest.approx(bsa * 1e4 / decayed, rel=1e-12)
    ibw = 50 + 2.3 * (180 / 2.54 - 60)
    assert factors.ibw == pytest.approx(ibw * 1000 / decayed, rel=1e-12)
    sul = suv_from_dicom(folder, kind="lbm")
    bw = suv_from_dicom(folder)
    np.testing.assert_allclose(sitk.GetArrayFromImage(sul), sitk.GetArrayFromImage(bw) * lbm / WEIGHT, rtol=1e-5)
    with pytest.raises(DinomedError, match="PatientSize"):
        suv_from_dicom(_write_pet(tmp_path / "nosize"), kind="lbm")


def test_philips_cnts_private_factor(tmp_path):
    folder = _write_pet(tmp_path / "pet", tags={"Units": "CNTS", (0x7053, 0x1000): "0.000123"})
    image, factors = suv_from_dicom(folder, return_factors=True)
    assert factors.bw == pytest.approx(0.000123)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), _stored_bqml(folder) * 0.000123, rtol=1e-5)


def test_gml_is_already_suv(tmp_path):
    folder = _write_pet(tmp_path / "pet", tags={"Units": "GML"})
    image = suv_from_dicom(folder)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), _stored_bqml(folder), rtol=1e-6)


@pytest.mark.parametrize("name, weight, dose, decay_s", [
    ("pet_acrin_flt_breast_029.dcm", 69.7344, 178340011.59668, 3976.921),  # 14:17:00 -> 15:23:16.921
    # dynamic series: SeriesTime 11:19:59.109 is before AcquisitionTime 11:35:59.109, so QIBA takes the series
    # time, 0.109 s after the injection (11:19:59.000)
    ("pet_acrin_flt_breast_028.dcm", 82.174, 173529998.7793, 0.109),
])
def test_real_acrin_slices(tmp_path, shared_data, name, weight, dose, decay_s):
    path = tmp_path / name
    shutil.copy(shared_data / "real_dicom" / name, path)
    image, factors = suv_from_dicom(path, return_factors=True)
    assert factors.decay_time_s == pytest.approx(decay_s, abs=1e-3)
    assert factors.bw == pytest.approx(_qiba_bw(weight, dose, decay_s), rel=1e-9)
    assert image.GetSize() == (168, 168, 1)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) * factors.bw
    np.testing.assert_allclose(sitk.GetArrayFromImage(image)[0], expected, rtol=1e-5)
    assert 1.0 < float(expected.max()) < 30.0  # plausible FLT SUVmax


# --- error cases ------------------------------------------------------------------------------------------

def test_missing_weight(tmp_path):
    with pytest.raises(DinomedError, match=r"PatientWeight \(0010,1030\)"):
        suv_from_dicom(_write_pet(tmp_path / "pet", tags={"PatientWeight": None}))


def test_zero_weight(tmp_path):
    with pytest.raises(DinomedError, match="PatientWeight.*positive"):
        suv_from_dicom(_write_pet(tmp_path / "pet", tags={"PatientWeight": "0"}))


def test_missing_dose(tmp_path):
    with pytest.raises(DinomedError, match=r"RadionuclideTotalDose \(0018,1074\)"):
        suv_from_dicom(_write_pet(tmp_path / "pet", radio={"RadionuclideTotalDose": None}))


def test_missing_half_life(tmp_path):
    with pytest.raises(DinomedError, match=r"RadionuclideHalfLife \(0018,1075\)"):
        suv_from_dicom(_write_pet(tmp_path / "pet", radio={"RadionuclideHalfLife": None}))


def test_missing_injection_time(tmp_path):
    with pytest.raises(DinomedError, match="RadiopharmaceuticalStartTime"):
        suv_from_dicom(_write_pet(tmp_path / "pet", radio={"RadiopharmaceuticalStartDateTime": None}))


def test_missing_radiopharmaceutical_sequence(tmp_path):
    folder = _write_pet(tmp_path / "pet")
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        del ds.RadiopharmaceuticalInformationSequence
        ds.save_as(f)
    with pytest.raises(DinomedError, match="RadiopharmaceuticalInformationSequence"):
        suv_from_dicom(folder)


def test_missing_series_time(tmp_path):
    with pytest.raises(DinomedError, match=r"SeriesTime \(0008,0031\)"):
        suv_from_dicom(_write_pet(tmp_path / "pet", tags={"SeriesTime": None}))


def test_missing_units(tmp_path):
    with pytest.raises(DinomedError, match=r"Units \(0054,1001\)"):
        suv_from_dicom(_write_pet(tmp_path / "pet", tags={"Units": None}))


def test_unknown_units(tmp_path):
    with pytest.raises(DinomedError, match="Units.*'PROPCPS'"):
        suv_from_dicom(_write_pet(tmp_path / "pet", tags={"Units": "PROPCPS"}))


def test_decay_correction_none(tmp_path):
    with pytest.raises(DinomedError, match="DecayCorrection.*'NONE'"):
        suv_from_dicom(_write_pet(tmp_path / "pet", tags={"DecayCorrection": "NONE"}))


def test_not_decay_corrected_image(tmp_path):
    with pytest.raises(DinomedError, match="CorrectedImage"):
        suv_from_dicom(_write_pet(tmp_path / "pet", tags={"CorrectedImage": ["ATTN"]}))


def test_cnts_without_philips_factor(tmp_path):
    with pytest.raises(DinomedError, match=r"\(7053,1000\)"):
        suv_from_dicom(_write_pet(tmp_path / "pet", tags={"Units": "CNTS"}))


def test_injection_after_scan(tmp_path):
    with pytest.raises(DinomedError, match="injection time .* is after the scan reference time"):
        suv_from_dicom(_write_pet(tmp_path / "pet", radio={"RadiopharmaceuticalStartDateTime": "20240301120000"}))


def test_inconsistent_weight_between_slices(tmp_path):
    folder = _write_pet(tmp_path / "pet", per_slice={3: {"PatientWeight": "80"}})
    with pytest.raises(DinomedError, match=r"PatientWeight \(0010,1030\) is .*80.* must agree"):
        suv_from_dicom(folder)


def test_inconsistent_series_time_between_slices(tmp_path):
    folder = _write_pet(tmp_path / "pet", per_slice={1: {"SeriesTime": "101600"}})
    with pytest.raises(DinomedError, match="SeriesTime"):
        suv_from_dicom(folder)


def test_bad_time_string(tmp_path):
    with pytest.raises(DinomedError, match="RadiopharmaceuticalStartDateTime.*expected a DICOM"):
        suv_from_dicom(_write_pet(tmp_path / "pet", radio={"RadiopharmaceuticalStartDateTime": "yesterday"}))


def test_missing_file(tmp_path):
    with pytest.raises(DinomedError, match="no such PET DICOM"):
        suv_from_dicom(tmp_path / "nothing")


def test_ct_series_is_not_pet(tmp_path):
    write_dicom_series(_bqml_volume(), tmp_path / "ct", modality="CT")
    with pytest.raises(DinomedError, match="Modality"):
        suv_from_dicom(tmp_path / "ct")
