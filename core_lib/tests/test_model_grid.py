"""The model grid (preprocessing.target_spacing and the high-resolution input_scale): the input is resampled to it,
and the labels come back onto the CT grid exactly: same size, spacing, origin, direction, and a known shape lands
where it is (the bundled CT organ model segments the liver of a phantom seen through an oblique, finer CT grid)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dinomed.errors import DinomedError
from dinomed.inference.segment import labels_to_reference, model_grid, model_spacing, segment_images
from dinomed.models import load_model_folder
from dinomed.synthetic import LABEL_VALUES, make_phantom

REPO = Path(__file__).resolve().parents[2]


def _ct(size=(40, 36, 12), spacing=(0.8, 0.7, 2.5), origin=(-12.0, 30.0, 5.0), angle=0.3):
    ct = sitk.Image(list(size), sitk.sitkInt16)
    ct.SetSpacing(spacing)
    ct.SetOrigin(origin)
    c, s = np.cos(angle), np.sin(angle)
    ct.SetDirection([c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0])
    return ct


def _sphere_on(image: sitk.Image, centre, radius) -> np.ndarray:
    """A physical sphere rasterised on ``image``'s grid (voxel centres inside), as a (z, y, x) mask."""
    size = image.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3).astype(float)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    points = np.asarray(image.GetOrigin()) + (idx * np.asarray(image.GetSpacing())) @ direction.T
    inside = np.linalg.norm(points - np.asarray(centre), axis=1) <= radius
    return inside.reshape(size).transpose(2, 1, 0)


def test_model_spacing_combines_target_spacing_and_input_scale():
    ct = _ct()
    assert model_spacing(ct, None) is None and model_grid(ct, {"input_scale": 1.0}) is None
    np.testing.assert_allclose(model_spacing(ct, {"input_scale": 2.0}), [0.4, 0.35, 2.5])
    np.testing.assert_allclose(model_spacing(ct, {"target_spacing": [1.0, 1.0, 2.0], "input_scale": 1.75}),
                               [1 / 1.75, 1 / 1.75, 2.0])
    grid = model_grid(ct, {"target_spacing": [1.6, 1.4, 5.0]})
    assert grid.GetSize() == (20, 18, 6) and grid.GetDirection() == ct.GetDirection()
    # a null z keeps the image's own slice spacing (2D models), with or without an input scale
    np.testing.assert_allclose(model_spacing(ct, {"target_spacing": [1.6, 1.4, None]}), [1.6, 1.4, 2.5])
    np.testing.assert_allclose(model_spacing(ct, {"target_spacing": [3.0, 3.0, None], "input_scale": 2.0}),
                               [1.5, 1.5, 2.5])
    assert model_grid(ct, {"target_spacing": [1.6, 1.4, None]}).GetSize() == (20, 18, 12)
    for bad in ([None, 1.0, 1.0], [1.0, 1.0], [1.0, 1.0, 0.0]):
        with pytest.raises(DinomedError, match="target_spacing"):
            model_spacing(ct, {"target_spacing": bad})


@pytest.mark.parametrize("pre", [{"target_spacing": [1.5, 1.2, 4.0]}, {"input_scale": 1.75},
                                 {"target_spacing": [0.5, 0.5, 1.0], "input_scale": 1.5}])
def test_labels_come_back_onto_the_ct_grid_exactly(pre):
    ct = _ct()
    grid = model_grid(ct, pre)
    centre, radius = np.asarray(ct.TransformContinuousIndexToPhysicalPoint((20.0, 18.0, 6.0))), 8.0
    on_grid = sitk.GetImageFromArray(_sphere_on(grid, centre, radius).astype(np.uint8) * 3)
    on_grid.CopyInformation(grid)
    back = labels_to_reference(on_grid, ct)
    assert back.GetSize() == ct.GetSize() and back.GetSpacing() == ct.GetSpacing()
    assert back.GetOrigin() == ct.GetOrigin() and back.GetDirection() == ct.GetDirection()
    got, truth = sitk.GetArrayFromImage(back) == 3, _sphere_on(ct, centre, radius)
    dice = 2 * (got & truth).sum() / (got.sum() + truth.sum())
    assert dice > 0.85, dice
    # the shape's centre lands where it is (within half the coarser voxel)
    zyx = np.argwhere(got).mean(0)
    found = np.asarray(ct.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in zyx[::-1])))
    assert np.linalg.norm(found - centre) < 0.5 * max(max(grid.GetSpacing()), max(ct.GetSpacing()))


@pytest.mark.slow
def test_a_real_model_segments_through_its_model_grid_and_lands_on_the_ct(tmp_path):
    """The bundled CT organ model (trained at the phantoms' own spacing) segments a phantom whose CT arrives on an
    oblique grid 1.6x finer in-plane and 1.5x finer in z; with model.json naming the training spacing, the input is
    resampled to it and the liver comes back onto the CT grid where it is."""
    model, model_json = load_model_folder(REPO / "Resources" / "Models" / "demo_ct_organs")
    phantom = make_phantom(9000, shape=(48, 128, 128), n_lesions=0, noise=False)
    native = phantom.ct
    fine_spacing = [native.GetSpacing()[0] / 1.6, native.GetSpacing()[1] / 1.6, native.GetSpacing()[2] / 1.5]
    size = [int(round(n * s / f)) for n, s, f in zip(native.GetSize(), native.GetSpacing(), fine_spacing)]
    angle = 0.12
    c, s = np.cos(angle), np.sin(angle)
    reference = sitk.Image(size, sitk.sitkInt16)
    reference.SetSpacing(fine_spacing)
    reference.SetDirection([c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0])
    centre = np.asarray(native.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in native.GetSize()]))
    extent = np.asarray(reference.GetDirection()).reshape(3, 3) @ (np.asarray(size) - 1) * np.asarray(fine_spacing) / 2
    reference.SetOrigin((centre - extent).tolist())
    ct = sitk.Resample(native, reference, sitk.Transform(), sitk.sitkLinear, -1000, sitk.sitkInt16)
    liver_value = LABEL_VALUES["liver"]
    truth = sitk.GetArrayFromImage(sitk.Resample(phantom.organs, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) == liver_value

    model_json = dict(model_json, preprocessing={**model_json["preprocessing"], "target_spacing": list(native.GetSpacing())})
    labels = segment_images(model, model_json, ct)
    assert labels.GetSize() == ct.GetSize() and labels.GetSpacing() == ct.GetSpacing()
    assert labels.GetOrigin() == ct.GetOrigin() and labels.GetDirection() == ct.GetDirection()
    liver = sitk.GetArrayFromImage(labels) == next(e["value"] for e in model_json["labels"] if e["name"] == "liver")
    dice = 2 * (liver & truth).sum() / (liver.sum() + truth.sum())
    assert dice > 0.75, dice
    found = np.argwhere(liver).mean(0)[::-1]
    expected = np.argwhere(truth).mean(0)[::-1]
    offset = np.asarray(ct.TransformContinuousIndexToPhysicalPoint(tuple(map(float, found)))) - \
        np.asarray(ct.TransformContinuousIndexToPhysicalPoint(tuple(map(float, expected))))
    assert np.linalg.norm(offset) < 2 * max(native.GetSpacing()), offset


def test_two_channel_model_on_its_model_grid(tmp_path):
    """CT and PET both resampled to the model grid (each channel's array outlives its resampled image)."""
    from dinomed.petct import resample_to_reference

    model, model_json = load_model_folder(REPO / "Resources" / "Models" / "demo")  # CT + PET
    phantom = make_phantom(5, shape=(16, 64, 64), n_lesions=2)
    pet = resample_to_reference(phantom.pet, phantom.ct)
    spacing = [2 * s for s in phantom.ct.GetSpacing()]
    model_json = dict(model_json, preprocessing={**model_json["preprocessing"], "target_spacing": spacing,
                                                 "input_scale": 1.5})
    labels = segment_images(model, model_json, phantom.ct, pet)
    assert labels.GetSize() == phantom.ct.GetSize() and labels.GetOrigin() == phantom.ct.GetOrigin()
    assert labels.GetSpacing() == phantom.ct.GetSpacing() and labels.GetDirection() == phantom.ct.GetDirection()
    assert sitk.GetArrayViewFromImage(labels).max() > 0
