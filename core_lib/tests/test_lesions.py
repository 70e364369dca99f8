"""Lesion statistics: analytic spheres give exact SUVmax/SUVmean and MTV within 5 %; real lesion masks."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from dinomed.errors import InputImageError
from dinomed.io import array_to_image
from dinomed.petct import lesion_statistics, resample_to_reference, write_lesion_table

SPACING = (1.5, 1.5, 2.0)  # x, y, z mm


def _spheres():
    """Two spheres (radius 12 mm and 8 mm) of known uptake on a 1.5 x 1.5 x 2 mm grid, and their labels."""
    shape = (40, 64, 64)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, SPACING[::-1])], indexing="ij")
    pet = np.full(shape, 1.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    spheres = [((20.0, 30.0, 30.0), 12.0, 8.0), ((60.0, 70.0, 50.0), 8.0, 4.0)]  # centre (z,y,x) mm, r, SUV
    for (cz, cy, cx), r, suv in spheres:
        inside = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r
        pet[inside] = suv
        labels[inside] = 1
    pet[10, 20, 20] = 12.0  # the hottest voxel of sphere 1 (z=20 mm, y=30 mm, x=30 mm)
    origin = (-50.0, 20.0, 100.0)
    return (array_to_image(pet, spacing=SPACING, origin=origin), array_to_image(labels, spacing=SPACING, origin=origin),
            spheres, pet, labels)


def test_analytic_spheres():
    pet_img, lab_img, spheres, pet, labels = _spheres()
    rows = lesion_statistics(pet_img, lab_img, label_names={1: "lesion"})
    lesions = [r for r in rows if r.lesion != "total"]
    total = [r for r in rows if r.lesion == "total"][0]
    assert len(lesions) == 2 and lesions[0].mtv_ml > lesions[1].mtv_ml
    voxel_ml = np.prod(SPACING) / 1000
    for row, ((cz, cy, cx), r, suv) in zip(lesions, spheres):
        assert row.mtv_ml == pytest.approx(4 / 3 * math.pi * r**3 / 1000, rel=0.05)
        assert row.mtv_ml == pytest.approx(row.voxels * voxel_ml, rel=1e-12)
        # centroid in physical mm = origin + centre (identity direction)
        assert row.centroid_x_mm == pytest.approx(-50.0 + cx, abs=0.3)
        assert row.centroid_y_mm == pytest.approx(20.0 + cy, abs=0.3)
        assert row.centroid_z_mm == pytest.approx(100.0 + cz, abs=0.3)
        assert row.tlg == pytest.approx(row.suv_mean * row.mtv_ml)
    big, small = lesions
    assert big.suv_max == 12.0
    assert big.suv_mean == pytest.approx((8.0 * (big.voxels - 1) + 12.0) / big.voxels, rel=1e-12)
    assert small.suv_max == 4.0 and small.suv_mean == 4.0
    # SUVpeak of the big sphere: mean of the voxels within 6.2 mm of the hottest voxel (all inside the sphere)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in pet.shape], indexing="ij")
    near = ((zz - 10) * 2.0) ** 2 + ((yy - 20) * 1.5) ** 2 + ((xx - 20) * 1.5) ** 2 <= 6.2**2
    assert big.suv_peak == pytest.approx(pet[near].mean(), rel=1e-12)
    assert small.suv_peak == pytest.approx(4.0)  # the 6.2 mm sphere fits inside the 8 mm lesion
    assert total.voxels == big.voxels + small.voxels
    assert total.mtv_ml == pytest.approx(big.mtv_ml + small.mtv_ml)
    assert total.tlg == pytest.approx(big.tlg + small.tlg)
    assert total.suv_max == 12.0 and total.name == "lesion"


def test_26_connectivity_joins_corner_neighbours():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1, 1, 1] = labels[2, 2, 2] = 1  # touch at a corner only
    labels[4, 4, 4] = 1
    rows = lesion_statistics(array_to_image(np.ones((6, 6, 6), np.float32)), array_to_image(labels))
    assert [r.voxels for r in rows if r.lesion != "total"] == [2, 1]


def test_pet_must_be_on_label_grid():
    pet_img, lab_img, *_ = _spheres()
    coarse = sitk.Image([20, 20, 10], sitk.sitkFloat32)
    coarse.SetSpacing((4.0, 4.0, 4.0))
    coarse.SetOrigin(lab_img.GetOrigin())
    with pytest.raises(InputImageError, match="resample it first"):
        lesion_statistics(resample_to_reference(pet_img, coarse), lab_img)
    rows = lesion_statistics(resample_to_reference(resample_to_reference(pet_img, coarse), lab_img), lab_img)
    assert rows[-1].lesion == "total"


def test_tables_csv_and_json(tmp_path):
    pet_img, lab_img, *_ = _spheres()
    rows = lesion_statistics(pet_img, lab_img)
    write_lesion_table(rows, tmp_path / "stats.csv")
    write_lesion_table(rows, tmp_path / "stats.json")
    with open(tmp_path / "stats.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["lesion"] for r in table] == ["1", "2", "total"]
    assert float(table[0]["suv_max"]) == 12.0
    data = json.loads((tmp_path / "stats.json").read_text())
    assert data[2]["voxels"] == rows[2].voxels and data[0]["mtv_ml"] == pytest.approx(rows[0].mtv_ml)


@pytest.mark.parametrize("name", ["psma_label.nii.gz", "psma_nnunet_prediction.nii.gz"])
def test_real_lesion_masks(shared_data, name):
    labels = sitk.ReadImage(str(shared_data / "real_lesion_masks" / name))
    mask = sitk.GetArrayFromImage(labels)
    # a PET stand-in with a known value per voxel: SUV = 1 + (z index mod 7)
    pet = array_to_image((1.0 + (np.arange(mask.shape[0]) % 7))[:, None, None].repeat(mask.shape[1], 1)
                         .repeat(mask.shape[2], 2).astype(np.float32), reference=labels)
    rows = lesion_statistics(pet, labels)
    lesions = [r for r in rows if r.lesion != "total"]
    total = rows[-1]
    voxel_ml = np.prod(labels.GetSpacing()) / 1000
    assert total.voxels == int(np.count_nonzero(mask))
    assert total.mtv_ml == pytest.approx(total.voxels * voxel_ml)
    assert sum(r.voxels for r in lesions) == total.voxels
    assert 10 <= len(lesions) <= 300  # a whole-body PSMA case with many separate lesions
    assert all(1.0 <= r.suv_mean <= r.suv_max <= 7.0 for r in lesions)
    if name == "psma_label.nii.gz":
        assert total.voxels == 12996
