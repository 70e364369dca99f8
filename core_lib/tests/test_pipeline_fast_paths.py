"""The separable resampler for grids that share their axes (dinomed.petct.axis_resample) against SimpleITK's
``Resample`` voxel by voxel: linear within float32 rounding, nearest neighbour and the field-of-view box equal,
the geometry of the reference exactly; grids it does not handle are left to SimpleITK. Also the other fast parts of
dinomed segment's post-processing: label bounding boxes (as scipy's find_objects) and label counts."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from dinomed.petct import field_of_view_mask, resample_to_reference
from dinomed.petct.axis_resample import axis_indices, field_of_view_box, resample_axis_aligned
from dinomed.inference.segment import labels_to_reference, model_grid

FLIP = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)
PERMUTED = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _image(array: np.ndarray, spacing, origin, direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection(direction)
    return image


def _grid(size, spacing, origin, direction=None) -> sitk.Image:
    return _image(np.zeros(size[::-1], dtype=np.uint8), spacing, origin, direction)


def _cases(seed: int, n: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        direction = [None, FLIP, PERMUTED][i % 3]
        size_in = rng.integers(5, 24, 3)
        spacing_in = rng.uniform(0.6, 3.0, 3)
        size_out = rng.integers(5, 40, 3)
        spacing_out = rng.uniform(0.4, 3.0, 3)
        origin_in = rng.uniform(-20, 20, 3)
        # the output box overlaps the input and reaches past it on some sides (offset along the image's own axes)
        d = np.eye(3) if direction is None else np.asarray(direction).reshape(3, 3)
        origin_out = origin_in + d @ (rng.uniform(-0.3, 0.6, 3) * size_in * spacing_in)
        yield size_in, spacing_in, origin_in, size_out, spacing_out, origin_out, direction


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_equals_simpleitk(seed):
    rng = np.random.default_rng(100 + seed)
    for size_in, sp_in, o_in, size_out, sp_out, o_out, direction in _cases(seed, 9):
        image = _image(rng.uniform(-5, 20, size_in[::-1]).astype(np.float32), sp_in, o_in, direction)
        reference = _grid(size_out, sp_out, o_out, direction)
        expected = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -3.0, sitk.sitkFloat32)
        before = sitk.GetArrayFromImage(image)
        got = resample_axis_aligned(image, reference, "linear", -3.0, sitk.sitkFloat32, threads=2)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), before)  # the input is only read
        again = resample_axis_aligned(image, reference, "linear", -3.0, sitk.sitkFloat32, threads=1)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(again), sitk.GetArrayViewFromImage(got))
        for key in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
            assert getattr(got, key)() == getattr(expected, key)()
        a, b = sitk.GetArrayViewFromImage(expected), sitk.GetArrayViewFromImage(got)
        assert b.dtype == np.float32
        assert (a == -3.0).sum() > 0 and (a != -3.0).sum() > 0  # both inside and outside the input's extents
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5)


def test_linear_from_an_integer_ct_onto_a_coarser_grid():
    """The CT (int16 HU) onto a model grid as dinomed segment builds it (model_grid), float32 out."""
    rng = np.random.default_rng(3)
    ct = _image(rng.integers(-1024, 1500, (12, 40, 36)).astype(np.int16), (0.74, 0.74, 1.0), (-12.0, 5.0, 30.0), FLIP)
    grid = model_grid(ct, {"target_spacing": [1.5, 1.5, 1.0]})
    expected = sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    got = resample_axis_aligned(ct, grid, "linear", -1000.0, sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(expected), rtol=0, atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_nearest_equals_simpleitk_voxel_for_voxel(seed):
    rng = np.random.default_rng(200 + seed)
    for size_in, sp_in, o_in, size_out, sp_out, o_out, direction in _cases(seed + 10, 9):
        labels = _image(rng.integers(0, 6, size_in[::-1]).astype(np.uint8), sp_in, o_in, direction)
        reference = _grid(size_out, sp_out, o_out, direction)
        expected = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        got = resample_axis_aligned(labels, reference, "nearest", 0, sitk.sitkUInt8)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(expected))
        box = field_of_view_box(labels, reference)
        ones = sitk.Image(labels.GetSize(), sitk.sitkUInt8) + 1
        ones.CopyInformation(labels)
        fov = sitk.Resample(ones, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(box), sitk.GetArrayViewFromImage(fov))


def test_labels_back_onto_the_ct_grid_exactly():
    """dinomed segment's path: the model-grid labels put back onto the CT are the CT's grid and SimpleITK's voxels."""
    rng = np.random.default_rng(5)
    ct = _image(np.zeros((20, 50, 46), np.int16), (0.7465, 0.7465, 1.0), (-215.86, -201.27, -493.2))
    grid = model_grid(ct, {"target_spacing": [1.5, 1.5, 1.0]})
    labels = _image(rng.integers(0, 4, grid.GetSize()[::-1]).astype(np.uint8), grid.GetSpacing(), grid.GetOrigin())
    back = labels_to_reference(labels, ct)
    expected = sitk.Resample(labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    assert back.GetSize() == ct.GetSize() and back.GetOrigin() == ct.GetOrigin()
    assert back.GetSpacing() == ct.GetSpacing() and back.GetDirection() == ct.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(expected))


def test_grids_it_does_not_handle_go_to_simpleitk():
    rng = np.random.default_rng(7)
    pet = _image(rng.uniform(0, 10, (6, 8, 9)).astype(np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    oblique = _grid((10, 12, 8), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.9950042, -0.0998334, 0.0, 0.0998334, 0.9950042,
                                                                     0.0, 0.0, 0.0, 1.0))
    assert axis_indices(pet, oblique) is None and resample_axis_aligned(pet, oblique, "linear") is None
    assert field_of_view_box(pet, oblique) is None
    straight = _grid((10, 12, 8), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    assert resample_axis_aligned(pet, straight, "bspline") is None
    assert resample_axis_aligned(pet, straight, "linear", 0, sitk.sitkInt16) is None  # ITK's integer cast: not ours
    vector = sitk.Compose(pet, pet)
    assert resample_axis_aligned(vector, straight, "nearest") is None
    # resample_to_reference and field_of_view_mask still give SimpleITK's answer on the oblique grid
    expected = sitk.Resample(pet, oblique, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    got = resample_to_reference(pet, oblique)  # (kept in a name: an array view does not keep its image alive)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(expected))
    assert field_of_view_mask(pet, oblique).GetSize() == oblique.GetSize()
    # and on a straight grid the fast path's answer, which is SimpleITK's within float32 rounding
    expected = sitk.Resample(pet, straight, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    got = resample_to_reference(pet, straight)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_values", [1, 3, 6])
def test_label_runs_bound_what_find_objects_finds(n_values):
    """The bounding boxes that post-processing and lesion statistics label components in: the projection path
    (up to FEW_LABELS values) and scipy's find_objects give the same slices, absent values give None."""
    from scipy import ndimage

    from dinomed.inference.segment import label_counts
    from dinomed.petct.lesions import FEW_LABELS, label_runs

    rng = np.random.default_rng(n_values)
    array = np.zeros((40, 33, 37), dtype=np.uint8)
    for value in range(1, 8):
        for _ in range(3):
            z, y, x = rng.integers(0, 36), rng.integers(0, 30), rng.integers(0, 34)
            array[z:z + rng.integers(1, 5), y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = value
    array[-1, -1, -1] = 2  # a box that reaches the last voxel
    array[array == 5] = 0  # an absent value
    values = [1, 2, 5, 7, 6, 4][:n_values]
    got = {}  # the union of each value's runs is its bounding box
    for v, runs in label_runs(array, values).items():
        got[v] = tuple(slice(min(r[a].start for r in runs), max(r[a].stop for r in runs)) for a in range(3)) if runs else None
    found = ndimage.find_objects(array)
    for v in values:
        expected = found[v - 1] if v <= len(found) else None
        assert got[v] == expected, (v, got[v], expected)
    assert (n_values <= FEW_LABELS) or len(values) > FEW_LABELS
    counts = label_counts(sitk.GetImageFromArray(array))
    np.testing.assert_array_equal(counts, np.bincount(array.ravel(), minlength=256))


def test_components_labelled_in_runs_of_slices_equal_one_box(monkeypatch):
    """Lesion statistics and small-component removal label each run of slices that holds a label on its own
    (label_runs); forcing one bounding box per label (find_objects' path) gives the same rows in the same order
    and the same cleaned label map."""
    from dinomed.inference.segment import remove_small_components
    from dinomed.petct import lesions
    from dinomed.petct.lesions import label_runs, lesion_statistics

    rng = np.random.default_rng(11)
    array = np.zeros((48, 40, 44), dtype=np.uint8)
    array[5:40, 3:30, 4:36] = 2  # an organ across many slices
    for _ in range(14):  # scattered lesions, some touching, some one voxel
        z, y, x = rng.integers(0, 45), rng.integers(0, 37), rng.integers(0, 41)
        array[z:z + rng.integers(1, 4), y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = 1
    array[47, 39, 43] = 1
    labels = _image(array, (1.5, 1.2, 2.0), (3.0, -4.0, 10.0))
    pet = _image(rng.uniform(0, 12, array.shape).astype(np.float32), (1.5, 1.2, 2.0), (3.0, -4.0, 10.0))
    runs = label_runs(array, [1, 2])
    assert len(runs[1]) > 1 and len(runs[2]) == 1  # the lesions fall into several runs of slices
    fast_rows = lesion_statistics(pet, labels, label_values=[1, 2])
    fast_clean = sitk.GetArrayFromImage(remove_small_components(labels, {1: 5, 2: 3}))
    monkeypatch.setattr(lesions, "FEW_LABELS", 0)  # one box per label from find_objects
    assert all(len(v) == 1 for v in label_runs(array, [1, 2]).values())
    box_rows = lesion_statistics(pet, labels, label_values=[1, 2])
    box_clean = sitk.GetArrayFromImage(remove_small_components(labels, {1: 5, 2: 3}))
    assert [r.as_dict() for r in fast_rows] == [r.as_dict() for r in box_rows]
    assert sum(1 for r in fast_rows if r.label == 1 and r.lesion != "total") > 5
    np.testing.assert_array_equal(fast_clean, box_clean)
    assert (fast_clean != array).any()  # something was removed


def test_gzipped_nifti_read_with_one_decompression_equals_itk(tmp_path):
    """read_image inflates a plain .nii.gz once, straight into the image (checked for truncation, CRC and NaN on
    the way): the voxels, type and geometry ITK reads; big-endian files too; a scaled or multi-member file goes
    through ITK's own reader after the check; damage is still refused."""
    import gzip

    import nibabel as nib

    from dinomed.errors import InputImageError
    from dinomed.io import read_image

    rng = np.random.default_rng(0)
    affine = np.array([[-0.8, 0, 0, 12.5], [0, -0.8, 0, -30.0], [0, 0, 2.0, -400.0], [0, 0, 0, 1]])
    cases = {
        "ct_int16": rng.integers(-1024, 3000, (21, 17, 9)).astype(np.int16),
        "pet_float32": rng.uniform(0, 20, (21, 17, 9)).astype(np.float32),
        "labels_uint8": rng.integers(0, 5, (21, 17, 9)).astype(np.uint8),
        "big_endian": rng.integers(-1024, 3000, (21, 17, 9)).astype(">i2"),
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(path))
        got, expected = read_image(path), sitk.ReadImage(str(path))
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(expected))
        assert got.GetPixelID() == expected.GetPixelID(), name
        assert got.GetOrigin() == expected.GetOrigin() and got.GetSpacing() == expected.GetSpacing()
        assert got.GetDirection() == expected.GetDirection()
    # scaled intensities (ITK applies slope and intercept): ITK reads it
    scaled = nib.Nifti1Image(cases["ct_int16"], affine)
    scaled.header.set_slope_inter(2.0, -5.0)
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    got, expected = read_image(tmp_path / "scaled.nii.gz"), sitk.ReadImage(str(tmp_path / "scaled.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(expected))
    # two gzip members (cat a.gz b.gz): ITK's reader after the check
    raw = gzip.decompress((tmp_path / "ct_int16.nii.gz").read_bytes())
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    got = read_image(tmp_path / "members.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), cases["ct_int16"].T)
    # damage: truncated, a flipped byte (CRC), NaN in a float volume
    # (a volume big enough that ITK's header read stops long before the end of the stream)
    nib.save(nib.Nifti1Image(rng.integers(-1024, 3000, (64, 64, 48)).astype(np.int16), affine), str(tmp_path / "big.nii.gz"))
    assert read_image(tmp_path / "big.nii.gz").GetSize() == (64, 64, 48)
    blob = (tmp_path / "big.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    flipped = bytearray(blob)
    flipped[-8] ^= 0xFF  # the CRC-32 in the gzip trailer: only a check of the whole stream sees it
    (tmp_path / "flipped.nii.gz").write_bytes(bytes(flipped))
    nan = cases["pet_float32"].copy()
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), str(tmp_path / "nan.nii.gz"))
    for bad, words in [("cut", "truncated"), ("flipped", "damaged"), ("nan", "NaN")]:
        with pytest.raises(InputImageError, match=words):
            read_image(tmp_path / f"{bad}.nii.gz")


def test_model_input_normalised_in_the_resampled_images_buffers():
    """model_channels on a model grid: each channel normalised in place in its resampled image's buffer (no stacked
    copy), the same values as resampling then normalize_channel into a new array, the CT and PET untouched; the
    arrays keep their images alive; predict_volume's check takes the list as it is."""
    import gc

    from dinomed.inference.predict import check_channels
    from dinomed.inference.segment import model_channels
    from dinomed.preprocess import default_spec, normalize_channel

    rng = np.random.default_rng(3)
    ct = _image(rng.integers(-1100, 1500, (12, 40, 36)).astype(np.int16), (0.8, 0.8, 2.0), (-10, 5, 30))
    pet = _image(rng.gamma(2.0, 2.0, (12, 40, 36)).astype(np.float32), (0.8, 0.8, 2.0), (-10, 5, 30))
    before = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(pet)
    mj = {"name": "t", "inputs": [{"modality": "CT"}, {"modality": "PET"}],
          "preprocessing": {"target_spacing": [1.5, 1.5, 2.0]}}
    grid = model_grid(ct, mj["preprocessing"])
    channels = model_channels(mj, ct, pet, grid)
    assert isinstance(channels, list) and len(channels) == 2
    for array, image, mod, fill in zip(channels, (ct, pet), ("CT", "PET"), (-1000.0, 0.0)):
        assert array.dtype == np.float32 and array.shape == grid.GetSize()[::-1]
        base = array
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base.image, sitk.Image)  # the resampled image's own buffer
        resampled = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, fill, sitk.sitkFloat32)
        expected = normalize_channel(sitk.GetArrayViewFromImage(resampled), default_spec(mod))
        np.testing.assert_array_equal(array, expected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct), before[0])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(pet), before[1])
    copy = [c.copy() for c in channels]
    gc.collect()  # nothing else holds the resampled images: the arrays do
    np.testing.assert_array_equal(channels[1], copy[1])
    checked = check_channels(mj, channels)
    assert checked[0] is channels[0] and checked[1] is channels[1]  # not stacked, not copied
    stacked = check_channels(mj, np.stack(copy))  # a (C, Z, Y, X) array still goes
    np.testing.assert_array_equal(stacked[1], copy[1])
    with pytest.raises(Exception, match="one shape"):
        check_channels(mj, [copy[0], copy[1][:-1]])
    with pytest.raises(Exception, match=r"reads 2 channel\(s\)"):
        check_channels(mj, [copy[0]])


def test_normalize_channel_in_place_equals_into_a_new_array():
    from dinomed.errors import DinomedError
    from dinomed.preprocess import default_spec, normalize_channel

    rng = np.random.default_rng(4)
    for mod, values in (("CT", rng.uniform(-1500, 2500, (9, 33, 31))), ("PET", rng.gamma(2.0, 3.0, (9, 33, 31)))):
        array = values.astype(np.float32)
        expected = normalize_channel(array, default_spec(mod))
        assert not np.array_equal(expected, array)
        assert normalize_channel(array, default_spec(mod), out=array) is array
        np.testing.assert_array_equal(array, expected)
    with pytest.raises(DinomedError, match="overlaps"):
        normalize_channel(array[1:], default_spec("PET"), out=array[:-1])
