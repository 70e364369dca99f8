"""dinomed.io: volumes keep origin, spacing and direction through every format; bad files give clear errors."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from dinomed.errors import InputImageError
from dinomed.io import (
    array_to_image,
    check_volume,
    list_dicom_series,
    read_image,
    write_dicom_series,
    write_image,
)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def oblique_volume() -> sitk.Image:
    rng = np.random.default_rng(1)
    array = rng.integers(-1000, 2000, size=(12, 20, 24)).astype(np.int16)
    return array_to_image(
        array,
        spacing=(0.73, 1.21, 3.3),
        origin=(-120.5, 33.25, -410.0),
        direction=_rotation(0.2, -0.15, 0.35).ravel(),
    )


def _assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_oblique_anisotropic_round_trip(tmp_path, oblique_volume, suffix):
    path = tmp_path / f"vol{suffix}"
    write_image(oblique_volume, path)
    back = read_image(path)
    _assert_same_geometry(oblique_volume, back, 1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(oblique_volume))
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temporary file"


def test_dicom_series_round_trip(tmp_path, oblique_volume):
    files = write_dicom_series(oblique_volume, tmp_path / "ct", modality="CT")
    assert len(files) == 12 and all(f.exists() for f in files)
    back = read_image(tmp_path / "ct")
    # DICOM stores positions/cosines as decimal strings (6-8 digits here)
    _assert_same_geometry(oblique_volume, back, 1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(oblique_volume))


def test_float_dicom_series_per_slice_rescale(tmp_path):
    rng = np.random.default_rng(2)
    array = (rng.random((6, 16, 16)) * np.linspace(0.5, 30, 6)[:, None, None]).astype(np.float32)
    image = array_to_image(array, spacing=(4.0, 4.0, 3.0), origin=(1, 2, 3))
    write_dicom_series(image, tmp_path / "pet", modality="PT")
    back = sitk.GetArrayFromImage(read_image(tmp_path / "pet"))
    # int16 with one slope per slice: error at most half a quantisation step of each slice
    step = np.abs(array).reshape(6, -1).max(1) / 32767
    assert np.all(np.abs(back - array) <= step[:, None, None] * 0.51 + 1e-6)


def test_folder_with_two_series_needs_uid(tmp_path, oblique_volume):
    folder = tmp_path / "mixed"
    write_dicom_series(oblique_volume, tmp_path / "a", modality="CT", series_description="first")
    second = sitk.Cast(oblique_volume, sitk.sitkInt16) + 5
    write_dicom_series(second, tmp_path / "b", modality="CT", series_description="second")
    folder.mkdir()
    for sub in ("a", "b"):
        for f in (tmp_path / sub).iterdir():
            shutil.copy(f, folder / f"{sub}_{f.name}")
    series = list_dicom_series(folder)
    assert len(series) == 2
    with pytest.raises(InputImageError, match="holds 2 DICOM series"):
        read_image(folder)
    uid = next(s["uid"] for s in series if s["description"] == "second")
    back = read_image(folder, series_uid=uid)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(second))
    with pytest.raises(InputImageError, match="no series with SeriesInstanceUID 1.2.3"):
        read_image(folder, series_uid="1.2.3")


def test_real_multiframe_ct(tmp_path, shared_data):
    src = shared_data / "real_dicom" / "ct_multiframe_cornerstone.dcm"
    path = tmp_path / "ct.dcm"
    shutil.copy(src, path)
    image = read_image(path)
    assert image.GetSize() == (512, 512, 2)
    np.testing.assert_allclose(image.GetSpacing()[:2], (0.388672, 0.388672), atol=1e-6)
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(src, folder / "ct.dcm")
    assert read_image(folder).GetSize() == (512, 512, 2)


def test_missing_file(tmp_path):
    with pytest.raises(InputImageError, match="no such file"):
        read_image(tmp_path / "nothing.nii.gz")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("hello")
    with pytest.raises(InputImageError, match="not a readable image"):
        read_image(path)


def test_2d_image_rejected(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(path))
    with pytest.raises(InputImageError, match="expected a 3D volume, found a 2D image"):
        read_image(path)


def test_4d_image_rejected(tmp_path):
    path = tmp_path / "dynamic.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(path))
    with pytest.raises(InputImageError, match="4D image"):
        read_image(path)


def test_all_nan_rejected(tmp_path):
    path = tmp_path / "nan.mha"  # (ITK NIfTI I/O writes NaN as 0)
    sitk.WriteImage(array_to_image(np.full((4, 5, 6), np.nan, np.float32)), str(path))
    with pytest.raises(InputImageError, match="NaN"):
        read_image(path)


def test_empty_and_vector_rejected():
    with pytest.raises(InputImageError, match="empty"):
        check_volume(np.zeros((0, 4, 4)), "empty.nii.gz")
    vector = sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3)
    with pytest.raises(InputImageError, match="3 components"):
        check_volume(vector, "rgb.nrrd")


def test_write_rejects_unknown_format(tmp_path, oblique_volume):
    with pytest.raises(InputImageError, match="cannot write this format"):
        write_image(oblique_volume, tmp_path / "vol.png")
