"""Resampling onto a reference grid keeps physical positions; volumes that do not overlap are refused."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from dinomed.errors import InputImageError
from dinomed.io import array_to_image
from dinomed.petct import physical_bounding_box, resample_to_reference


def _ramp(shape, spacing, origin, direction=None) -> sitk.Image:
    """Voxel value = physical x (mm) + 2 * physical z (mm): linear, so linear interpolation is exact."""
    image = sitk.Image([int(s) for s in shape[::-1]], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    array = np.zeros(shape, np.float32)
    for k in range(shape[0]):
        for j in range(shape[1]):
            for i in range(shape[2]):
                p = image.TransformIndexToPhysicalPoint((i, j, k))
                array[k, j, i] = p[0] + 2 * p[2]
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def test_pet_onto_ct_grid_is_physically_exact():
    pet = _ramp((12, 14, 14), (4.0, 4.0, 4.0), (-28.0, -28.0, -24.0))
    ct = sitk.Image([20, 20, 16], sitk.sitkInt16)
    ct.SetSpacing((2.0, 2.0, 2.5))
    ct.SetOrigin((-19.0, -19.0, -18.0))
    out = resample_to_reference(pet, ct)
    assert out.GetSize() == ct.GetSize() and out.GetSpacing() == ct.GetSpacing() and out.GetOrigin() == ct.GetOrigin()
    assert out.GetPixelID() == pet.GetPixelID()
    arr = sitk.GetArrayFromImage(out)
    for index in [(0, 0, 0), (7, 3, 11), (19, 19, 15)]:
        p = ct.TransformIndexToPhysicalPoint(index)
        assert arr[index[2], index[1], index[0]] == pytest.approx(p[0] + 2 * p[2], abs=1e-3)


def test_oblique_reference_and_nearest_labels():
    labels = array_to_image(np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6), spacing=(3, 3, 3))
    rot = sitk.VersorTransform((0, 0, 1), 0.3).GetMatrix()
    ref = sitk.Image([6, 5, 4], sitk.sitkFloat32)
    ref.SetSpacing((3, 3, 3))
    ref.SetDirection(rot)
    out = resample_to_reference(labels, ref, interpolator="nearest", default_value=255)
    assert out.GetPixelID() == sitk.sitkUInt8
    values = set(np.unique(sitk.GetArrayFromImage(out)).tolist())
    assert values <= set(range(120)) | {255}  # nearest neighbour never invents labels
    assert 255 in values and len(values) > 10


def test_no_overlap_is_refused():
    a = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    b = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    b.SetOrigin((0.0, 0.0, 500.0))
    with pytest.raises(InputImageError, match="do not overlap in physical space"):
        resample_to_reference(a, b, name="pet.nii.gz", reference_name="ct.nii.gz")


def test_bounding_box_includes_voxel_extent():
    image = sitk.Image([10, 4, 2], sitk.sitkUInt8)
    image.SetSpacing((2.0, 1.0, 5.0))
    lo, hi = physical_bounding_box(image)
    np.testing.assert_allclose(lo, (-1.0, -0.5, -2.5))
    np.testing.assert_allclose(hi, (19.0, 3.5, 7.5))
