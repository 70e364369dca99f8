"""Volumes between SimpleITK files (what dinomed reads and writes, LPS) and the MRML scene (RAS)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DINOSegLib import volumes
from dinoseg_testdata import oblique_image

INDICES = [(0, 0, 0), (12, 10, 8), (3, 7, 2), (12, 0, 8), (0, 10, 0)]  # (i, j, k) = (x, y, z)


def assert_same_physical_points(node, image, atol=1e-4):
    """SimpleITK's LPS point of each index, with x and y negated, is the node's RAS point of that index."""
    matrix = volumes.ijk_to_ras(node)
    for index in INDICES:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = (matrix @ np.array([*index, 1.0]))[:3]
        np.testing.assert_allclose(ras, lps * np.array([-1, -1, 1]), atol=atol)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_oblique_ct_lands_where_simpleitk_puts_it(scene, tmp_path, suffix):
    image, array = oblique_image()
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))
    node = volumes.read_volume(scene, path, name="CT")
    assert_same_physical_points(node, image, atol=1e-4 if suffix == ".nrrd" else 1e-3)
    np.testing.assert_array_equal(volumes.array_from_volume(node), array)
    origin, spacing, direction = volumes.lps_geometry(node)
    np.testing.assert_allclose(origin, image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(spacing, image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(direction, image.GetDirection(), atol=1e-5)


def test_label_map_written_by_dinomed_lands_on_the_ct(scene, tmp_path):
    from dinomed.io import write_image

    ct_image, _ = oblique_image()
    labels = np.zeros((9, 11, 13), np.uint8)
    labels[2:5, 3:6, 4:9] = 1
    labels[6, 8, 10] = 2
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(ct_image)
    write_image(label_image, tmp_path / "seg.nii.gz")  # dinomed's own writer, as `dinomed segment` uses
    sitk.WriteImage(ct_image, str(tmp_path / "ct.nrrd"))
    ct = volumes.read_volume(scene, tmp_path / "ct.nrrd")
    label_node = volumes.read_volume(scene, tmp_path / "seg.nii.gz", labelmap=True)
    assert label_node.IsA("vtkMRMLLabelMapVolumeNode")
    assert_same_physical_points(label_node, ct_image, atol=1e-3)
    np.testing.assert_allclose(volumes.ijk_to_ras(label_node), volumes.ijk_to_ras(ct), atol=1e-3)
    np.testing.assert_array_equal(volumes.array_from_volume(label_node), labels)
    # the lesion voxel (x=10, y=8, z=6) is at the same RAS point in both nodes
    np.testing.assert_allclose(volumes.ras_to_ijk(label_node, (volumes.ijk_to_ras(ct) @ [10, 8, 6, 1])[:3]), [10, 8, 6], atol=1e-3)


def test_write_volume_gives_simpleitk_the_same_geometry(scene, tmp_path):
    image, array = oblique_image(dtype=np.float32)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    volumes.update_volume_from_array(node, array)
    volumes.set_ijk_to_ras(node, volumes.ijk_to_ras_from_lps(image.GetOrigin(), image.GetSpacing(), image.GetDirection()))
    assert_same_physical_points(node, image, atol=1e-9)
    out = volumes.write_volume(node, tmp_path / "sub" / "out.nrrd")
    back = sitk.ReadImage(str(out))
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    assert [p.name for p in out.parent.iterdir()] == ["out.nrrd"]  # no temporary left behind


def test_resample_to_grid_matches_simpleitk(scene, tmp_path):
    ct_image, _ = oblique_image()
    pet_array = np.random.default_rng(1).random((6, 7, 8)).astype(np.float32) * 10
    pet_image = sitk.GetImageFromArray(pet_array)
    pet_image.SetSpacing((2.0, 2.2, 4.0))
    pet_image.SetOrigin((5.0, -36.0, 38.0))
    for name, image in (("ct", ct_image), ("pet", pet_image)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nrrd"))
    ct = volumes.read_volume(scene, tmp_path / "ct.nrrd")
    pet = volumes.read_volume(scene, tmp_path / "pet.nrrd")
    ours = volumes.resample_to_grid(pet, ct)
    reference = sitk.GetArrayFromImage(sitk.Resample(pet_image, ct_image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    inside = (reference > 0) & (ours > 0)  # the two libraries treat the outermost half voxel differently
    assert inside.sum() > 0.3 * reference.size
    np.testing.assert_allclose(ours[inside], reference[inside], rtol=1e-4, atol=1e-4)


def test_reading_a_missing_or_bad_file_names_it(scene, refuses_missing_and_unreadable):
    refuses_missing_and_unreadable(lambda path: volumes.read_volume(scene, path), volumes.VolumeIOError,
                                   "bad.nrrd", "not an image")
