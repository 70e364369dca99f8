"""Synthetic PET/CT phantoms: seeded, fast, anatomically plausible, varied, and exported losslessly."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from dinomed.io import read_image
from dinomed.petct import resample_to_reference, same_grid, suv_from_dicom
from dinomed.synthetic import (
    LABEL_VALUES,
    ORGAN_LABELS,
    make_phantom,
    write_nnunet_dataset,
    write_phantom_case,
)

SMALL = (32, 64, 64)


def _arr(image):
    return sitk.GetArrayFromImage(image)


def test_same_seed_same_phantom_and_seeds_differ():
    a, b, c = make_phantom(5, SMALL), make_phantom(5, SMALL), make_phantom(6, SMALL)
    np.testing.assert_array_equal(_arr(a.ct), _arr(b.ct))
    np.testing.assert_array_equal(_arr(a.pet), _arr(b.pet))
    assert a.lesion_list == b.lesion_list
    assert a.ct.GetSpacing() != c.ct.GetSpacing() or not np.array_equal(_arr(a.ct), _arr(c.ct))


def test_default_size_is_fast():
    make_phantom(0, SMALL)  # warm up imports
    start = time.perf_counter()
    phantom = make_phantom(1, (64, 128, 128))
    elapsed = time.perf_counter() - start
    assert phantom.ct.GetSize() == (128, 128, 64)
    assert elapsed < 5.0, f"64x128x128 phantom took {elapsed:.2f} s"


@pytest.mark.parametrize("seed", [3, 8])
def test_anatomy_intensities_and_grids(seed):
    phantom = make_phantom(seed, (48, 96, 96), n_lesions=5)
    ct, organs, lesions = _arr(phantom.ct), _arr(phantom.organs), _arr(phantom.lesions)
    assert ct.dtype == np.int16 and -1024 <= ct.min() and ct.max() <= 3071
    assert _arr(phantom.pet).dtype == np.float32 and _arr(phantom.pet).min() >= 0
    assert set(np.unique(organs)) <= {0} | {e["value"] for e in ORGAN_LABELS}
    assert set(np.unique(lesions)) <= {0, 1}
    # the PET has its own, coarser grid
    assert not same_grid(phantom.pet, phantom.ct)
    assert phantom.pet.GetSpacing()[0] > phantom.ct.GetSpacing()[0]
    pet_on_ct = _arr(resample_to_reference(phantom.pet, phantom.ct))
    present = {name: organs == value for name, value in LABEL_VALUES.items() if (organs == value).sum() > 200}
    assert present, "no organ in the field of view"
    if "lung" in present:
        assert ct[present["lung"]].mean() < -600
    if "liver" in present:
        assert 30 < ct[present["liver"]].mean() < 140
        assert 1.0 < np.median(pet_on_ct[present["liver"]]) < 3.5
    if "bone" in present:
        assert ct[present["bone"]].mean() > 150
    if "brain" in present:
        assert np.median(pet_on_ct[present["brain"]]) > 3.0
    combined = _arr(phantom.labels)
    assert np.all(combined[lesions == 1] == LABEL_VALUES["lesion"])
    assert np.array_equal(combined[lesions == 0], organs[lesions == 0])
    if lesions.sum() > 50:
        # hot lesions: the lesion voxels are hotter on average than the body around them
        body = ct > -500
        assert pet_on_ct[lesions == 1].mean() > pet_on_ct[body & (lesions == 0)].mean()


def test_phantoms_vary_with_the_seed():
    phantoms = [make_phantom(s, SMALL) for s in range(8)]
    spacings = {round(p.ct.GetSpacing()[0], 3) for p in phantoms}
    pet_spacings = {round(p.pet.GetSpacing()[0], 3) for p in phantoms}
    counts = {len(p.lesion_list) for p in phantoms}
    kinds = {les.kind for p in phantoms for les in p.lesion_list}
    sizes = [les.diameter_mm for p in phantoms for les in p.lesion_list]
    assert len(spacings) == 8 and len(pet_spacings) == 8
    assert len(counts) >= 3 and len(kinds) >= 3
    assert min(sizes) < 15 and max(sizes) > 20


def test_oblique_grids():
    phantom = make_phantom(2, SMALL, oblique=True)
    assert not np.allclose(phantom.ct.GetDirection(), np.eye(3).ravel())
    assert not np.allclose(phantom.ct.GetDirection(), phantom.pet.GetDirection())
    for les in phantom.lesion_list:
        assert np.allclose(phantom.ct.TransformContinuousIndexToPhysicalPoint(les.center_index), les.center_lps, atol=3 * max(phantom.ct.GetSpacing()))


def test_label_table_matches_model_json_format():
    values = [e["value"] for e in ORGAN_LABELS]
    assert len(set(values)) == len(values) and 0 not in values
    for entry in ORGAN_LABELS:
        assert len(entry["color"]) == 3 and all(0 <= c <= 255 for c in entry["color"])
        for key in ("category", "type"):
            scheme, code, meaning = entry["terminology"][key]
            assert scheme == "SCT" and code.isdigit() and meaning
    assert [e for e in ORGAN_LABELS if e.get("lesion")] == [ORGAN_LABELS[0]]


@pytest.mark.parametrize("seed", [4, 7])  # even seed: RadiopharmaceuticalStartDateTime; odd: StartTime only
def test_case_with_dicom_round_trips(tmp_path, seed):
    phantom = make_phantom(seed, SMALL)
    paths = write_phantom_case(phantom, tmp_path / "case", dicom=True)
    for kind in ("ct", "pet", "labels", "organs", "lesions"):
        assert paths[kind].exists()
    pet_nii = read_image(paths["pet"])
    assert same_grid(pet_nii, phantom.pet)
    np.testing.assert_allclose(_arr(pet_nii), _arr(phantom.pet))
    suv = suv_from_dicom(paths["pet_dicom"])
    assert same_grid(suv, phantom.pet, tol=1e-3)
    truth = _arr(phantom.pet)
    assert np.abs(_arr(suv) - truth).max() <= 0.01 * truth.max()  # SUV recovered within 1 %
    ct_back = read_image(paths["ct_dicom"])
    assert same_grid(ct_back, phantom.ct, tol=1e-3)
    np.testing.assert_array_equal(_arr(ct_back), _arr(phantom.ct))
    summary = json.loads(paths["phantom_json"].read_text())
    assert summary["seed"] == seed and len(summary["lesions"]) == len(phantom.lesion_list)


def test_nnunet_dataset_layout(tmp_path):
    path = write_nnunet_dataset(tmp_path / "ds", seeds=[10, 11], shape=(24, 48, 48))
    meta = json.loads(path.read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "PET"}
    assert meta["labels"]["background"] == 0 and meta["labels"]["lesion"] == 1
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    for case in ("case_0010", "case_0011"):
        ct = read_image(tmp_path / "ds" / "imagesTr" / f"{case}_0000.nii.gz")
        pet = read_image(tmp_path / "ds" / "imagesTr" / f"{case}_0001.nii.gz")
        lab = read_image(tmp_path / "ds" / "labelsTr" / f"{case}.nii.gz")
        assert same_grid(ct, pet) and same_grid(ct, lab)
        assert set(np.unique(_arr(lab))) <= set(meta["labels"].values())


def test_wide_variety_draws_spacing_matrix_and_anatomy_from_wider_ranges(tmp_path):
    """variety="standard" is the default generator unchanged; "wide" draws the spacing (0.7-4 mm in-plane, 1-5 mm
    slices) with the matrix following the field of view up to ``shape``, and still paints organs and lesions."""
    from dinomed.errors import DinomedError
    from dinomed.synthetic.phantom import VARIETIES

    a, b = make_phantom(4, SMALL), make_phantom(4, SMALL, variety="standard")
    np.testing.assert_array_equal(_arr(a.ct), _arr(b.ct))
    spacings, sizes = [], []
    for seed in range(6):
        p = make_phantom(seed, (48, 160, 160), variety="wide")
        sx, sy, sz = p.ct.GetSpacing()
        nx, ny, nz = p.ct.GetSize()
        assert 0.7 <= sx <= 4.0 and sx == sy and 1.0 <= sz <= 5.0
        assert nx == ny <= 160 and nz <= 48
        organs = set(np.unique(_arr(p.organs)).tolist())
        assert len(organs - {0}) >= 1  # anatomy in every field of view
        spacings.append(sx)
        sizes.append(nx)
    assert max(spacings) / min(spacings) > 1.5 and len(set(sizes)) > 1
    assert VARIETIES["wide"].lesion_mm[0] < VARIETIES["standard"].lesion_mm[0]
    with pytest.raises(DinomedError, match="variety 'odd'"):
        make_phantom(1, SMALL, variety="odd")
    path = write_nnunet_dataset(tmp_path / "ds", seeds=[20], shape=(24, 64, 64), variety="wide")
    assert json.loads(path.read_text())["numTraining"] == 1
