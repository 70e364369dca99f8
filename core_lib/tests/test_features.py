"""Feature maps: cosine similarity and PCA on hand-made features (independent of any backbone), geometry of
every output on an oblique anisotropic image, the feature cache, an end-to-end run with a real tiny ViT,
and the ``dinomed features`` command."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dinomed.backbones import create_backbone
from dinomed.cli import main
from dinomed.errors import DinomedError
from dinomed.events import parse_event
from dinomed.features import (
    FeatureExtractor,
    FeatureVolume,
    body_mask,
    compute_features,
    cosine_map,
    encoder_from_model,
    extract,
    feature_grid_geometry,
    geometry_of,
    mask_to_feature_grid,
    pca_rgb,
    upsample_to_image,
)

# an oblique direction (rotations about z then x) and anisotropic spacing
_AZ, _AX = np.deg2rad(20.0), np.deg2rad(-10.0)
_RZ = np.array([[np.cos(_AZ), -np.sin(_AZ), 0], [np.sin(_AZ), np.cos(_AZ), 0], [0, 0, 1]])
_RX = np.array([[1, 0, 0], [0, np.cos(_AX), -np.sin(_AX)], [0, np.sin(_AX), np.cos(_AX)]])
DIRECTION = tuple((_RZ @ _RX).ravel())
SPACING = (0.9, 1.4, 3.5)
ORIGIN = (-31.5, 12.25, 104.0)


def hand_phantom(size=(64, 56, 8)):
    """A CT (HU) on an oblique anisotropic grid: air, a body ellipse (40 HU) with an air hole (a lung), and an
    organ disc (120 HU) inside; plus its label map (0 air, 1 body, 2 organ) and a separate blob (a table)."""
    w, h, d = size
    y, x = np.mgrid[0:h, 0:w]
    body = ((x - 30) / 26.0) ** 2 + ((y - 28) / 22.0) ** 2 <= 1
    organ = ((x - 38) / 9.0) ** 2 + ((y - 30) / 9.0) ** 2 <= 1
    lung = ((x - 16) / 5.0) ** 2 + ((y - 24) / 6.0) ** 2 <= 1
    ct = np.full((d, h, w), -1000, dtype=np.int16)
    labels = np.zeros((d, h, w), dtype=np.uint8)
    ct[:, body], labels[:, body] = 40, 1
    ct[:, organ], labels[:, organ] = 120, 2
    ct[:, lung] = -850  # air inside the body: the body mask must fill it
    ct[:, h - 2:, 4:12] = 300  # a small "table" blob, not the largest component
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image, labels


def hand_features(image, labels, channels=8, noise=0.05, seed=0):
    """A fixed simple feature: one direction per tissue (air, body, organ) + a little noise, per patch."""
    rng = np.random.default_rng(seed)
    grid = feature_grid_geometry(geometry_of(image))
    w, h, d = grid["size"]
    organ = mask_to_feature_grid(labels == 2, 16, (d, h, w))
    body = mask_to_feature_grid(labels >= 1, 16, (d, h, w))
    basis = np.eye(channels, dtype=np.float32)
    tissue = np.where(organ, 2, np.where(body, 1, 0))
    array = basis[tissue].transpose(0, 3, 1, 2) + noise * rng.standard_normal((d, channels, h, w)).astype(np.float32)
    return FeatureVolume.from_array(array, image), tissue


def assert_same_geometry(out: sitk.Image, ref: sitk.Image):
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-9)


# ---- cosine maps and PCA on hand-made features ---------------------------------------------------------
def test_cosine_is_one_at_the_reference_and_within_bounds():
    image, labels = hand_phantom()
    feats, _ = hand_features(image, labels, noise=0.5)
    for point in [(0, 0, 0), (40, 30, 3), (63, 55, 7)]:
        k, r, c = feats.feature_index(point)
        sim3 = sitk.GetArrayFromImage(cosine_map(feats, point, mode="3d", resolution="feature"))
        assert sim3[k, r, c] == pytest.approx(1.0, abs=1e-5)
        assert np.isfinite(sim3).all() and sim3.min() >= -1.0 and sim3.max() <= 1.0
        sim2 = sitk.GetArrayFromImage(cosine_map(feats, point, mode="2d", resolution="feature"))
        np.testing.assert_allclose(sim2[k], sim3[k], atol=1e-6)
        others = np.delete(sim2, k, axis=0)
        assert np.isnan(others).all()  # 2d: the other slices are not computed
        up = sitk.GetArrayFromImage(cosine_map(feats, point, mode="3d"))
        assert np.nanmin(up) >= -1.0 and np.nanmax(up) <= 1.0


def test_a_point_in_the_organ_is_more_similar_to_the_organ_than_to_the_background():
    image, labels = hand_phantom()
    feats, tissue = hand_features(image, labels, noise=0.3)
    sim = sitk.GetArrayFromImage(cosine_map(feats, (38, 30, 4), mode="3d", resolution="feature"))
    assert tissue[feats.feature_index((38, 30, 4))] == 2
    assert sim[tissue == 2].mean() > sim[tissue == 1].mean() + 0.3
    assert sim[tissue == 2].mean() > sim[tissue == 0].mean() + 0.3
    # the same on the image grid: organ voxels versus body voxels of the point's slice (2d)
    up = sitk.GetArrayFromImage(cosine_map(feats, (38, 30, 4), mode="2d"))
    assert up[4][labels[4] == 2].mean() > up[4][labels[4] == 1].mean() + 0.2


def test_point_spaces_agree_and_a_point_outside_is_refused():
    image, labels = hand_phantom()
    feats, _ = hand_features(image, labels)
    index = (41, 27, 5)
    lps = image.TransformIndexToPhysicalPoint(index)
    ras = (-lps[0], -lps[1], lps[2])
    by_index = sitk.GetArrayFromImage(cosine_map(feats, index, "index", "3d", "feature"))
    for point, space in [(lps, "lps"), (ras, "ras")]:
        assert feats.feature_index(point, space) == feats.feature_index(index)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(cosine_map(feats, point, space, "3d", "feature")), by_index)
    with pytest.raises(DinomedError, match="outside the image"):
        cosine_map(feats, (64, 0, 0))
    with pytest.raises(DinomedError, match="outside the image"):
        cosine_map(feats, (lps[0] + 500.0, lps[1], lps[2]), "lps")


def test_outputs_carry_the_geometry_of_an_oblique_anisotropic_image():
    image, labels = hand_phantom()
    feats, _ = hand_features(image, labels)
    assert_same_geometry(cosine_map(feats, (10, 20, 2), mode="3d"), image)
    assert_same_geometry(cosine_map(feats, (10, 20, 2), mode="2d"), image)
    rgb = pca_rgb(feats, image=image)
    assert_same_geometry(rgb, image)
    assert rgb.GetNumberOfComponentsPerPixel() == 3 and rgb.GetPixelID() == sitk.sitkVectorUInt8
    # the feature grid: spacing ×16 in-plane, same direction, origin at the centre of the first patch
    grid_map = cosine_map(feats, (10, 20, 2), mode="3d", resolution="feature")
    assert grid_map.GetSize() == (4, 4, 8)
    np.testing.assert_allclose(grid_map.GetSpacing(), (SPACING[0] * 16, SPACING[1] * 16, SPACING[2]))
    np.testing.assert_allclose(grid_map.GetDirection(), DIRECTION, atol=1e-12)
    np.testing.assert_allclose(grid_map.GetOrigin(), image.TransformContinuousIndexToPhysicalPoint((7.5, 7.5, 0.0)), atol=1e-9)
    # upsampling = resampling the feature-grid map onto the image grid (SimpleITK linear, physical space)
    resampled = sitk.GetArrayFromImage(sitk.Resample(grid_map, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    ours = upsample_to_image(sitk.GetArrayFromImage(grid_map), feats)
    np.testing.assert_allclose(ours[:, 8:56, 8:56], resampled[:, 8:56, 8:56], atol=1e-4)


def test_pca_is_fit_on_the_body_and_the_background_is_black():
    image, labels = hand_phantom()
    feats, _ = hand_features(image, labels, noise=0.05)
    mask = body_mask(image)
    rgb = sitk.GetArrayFromImage(pca_rgb(feats, image=image))  # (z, y, x, 3)
    assert (rgb[~mask] == 0).all()
    organ_colour = rgb[labels == 2].reshape(-1, 3).astype(float).mean(axis=0)
    body_colour = rgb[(labels == 1) & mask].reshape(-1, 3).astype(float).mean(axis=0)
    assert np.linalg.norm(organ_colour - body_colour) > 60
    # a user mask (the organ only) replaces the body mask; a mask on the feature grid works too
    organ_only = sitk.GetImageFromArray((labels == 2).astype(np.uint8))
    organ_only.CopyInformation(image)
    rgb_organ = sitk.GetArrayFromImage(pca_rgb(feats, mask=organ_only))
    assert (rgb_organ[labels != 2] == 0).all() and rgb_organ[labels == 2].any()
    small = pca_rgb(feats, mask=mask_to_feature_grid(labels >= 1, 16, feats.shape), resolution="feature")
    assert small.GetSize() == (4, 4, 8)
    with pytest.raises(DinomedError, match="fits neither"):
        pca_rgb(feats, mask=np.ones((3, 3, 3), bool))


def test_body_mask_keeps_the_largest_component_and_fills_the_lungs():
    image, labels = hand_phantom()
    mask = body_mask(image)
    np.testing.assert_array_equal(mask, labels >= 1)  # the lung hole is filled, the table blob left out
    pet = sitk.GetImageFromArray(np.where(labels >= 1, 1.5, 0.05).astype(np.float32))
    np.testing.assert_array_equal(body_mask(pet), labels >= 1)


def test_feature_volume_refuses_a_wrong_shape():
    image, _ = hand_phantom()
    with pytest.raises(DinomedError, match="do not fit the feature grid"):
        FeatureVolume.from_array(np.zeros((8, 4, 3, 4), np.float16), image)


# ---- a real tiny backbone, the cache --------------------------------------------------------------------
def tiny_extractor(seed=0, modalities=("CT",)):
    torch.manual_seed(seed)
    return FeatureExtractor.from_backbone(create_backbone("vit_tiny", in_chans=1).eval(), modalities,
                                          source={"kind": "random", "arch": "vit_tiny", "seed": seed})


@pytest.fixture(scope="module")
def phantom():
    from dinomed.synthetic import make_phantom

    # seed 3 at 12 mm slices: the liver covers ~60 patches of the 8×8×12 feature grid
    return make_phantom(3, shape=(12, 128, 128), n_lesions=0, oblique=True, spacing=(3.2, 3.2, 12.0))


def test_end_to_end_with_a_tiny_vit_on_a_phantom(phantom):
    from dinomed.synthetic import LABEL_VALUES

    ct, organs = phantom.ct, sitk.GetArrayFromImage(phantom.organs)
    feats = compute_features(ct, tiny_extractor(), layer=-1, batch_size=5, device="cpu")
    assert feats.array.dtype == np.float16 and feats.array.shape == (12, 64, 8, 8)
    assert feats.meta["layer"] == 3 and not feats.from_cache
    # a point inside the liver, in the slice where it covers most patches
    organ_patch = mask_to_feature_grid(organs == LABEL_VALUES["liver"], 16, feats.shape)
    air_patch = mask_to_feature_grid(~body_mask(ct), 16, feats.shape)
    k = int(np.argmax(organ_patch.sum(axis=(1, 2))))
    rows, cols = np.nonzero(organ_patch[k])
    point = (int(cols[0]) * 16 + 8, int(rows[0]) * 16 + 8, k)
    sim = sitk.GetArrayFromImage(cosine_map(feats, point, mode="3d", resolution="feature"))
    assert sim[feats.feature_index(point)] == pytest.approx(1.0, abs=1e-5)
    assert sim.min() >= -1.0 and sim.max() <= 1.0
    assert sim[organ_patch].mean() > sim[air_patch].mean()
    rgb = pca_rgb(feats, image=ct)
    assert_same_geometry(rgb, ct)
    assert_same_geometry(cosine_map(feats, point), ct)


def test_the_cache_is_reused_and_invalidated_when_the_image_or_the_model_changes(tmp_path):
    image, _ = hand_phantom(size=(40, 36, 6))
    extractor = tiny_extractor(seed=0)
    count = extract.COMPUTE_COUNT
    first = compute_features(image, extractor, cache_dir=tmp_path, device="cpu")
    assert extract.COMPUTE_COUNT == count + 1 and not first.from_cache
    entries = sorted(tmp_path.glob("*.json"))
    assert len(entries) == 1
    npy = entries[0].with_suffix(".npy")
    stamp = os.stat(npy).st_mtime_ns
    second = compute_features(image, extractor, cache_dir=tmp_path, device="cpu")
    assert second.from_cache and extract.COMPUTE_COUNT == count + 1 and os.stat(npy).st_mtime_ns == stamp
    np.testing.assert_array_equal(second.array, first.array)
    # the same model rebuilt with the same weights still hits the cache
    assert compute_features(image, tiny_extractor(seed=0), cache_dir=tmp_path, device="cpu").from_cache
    # one changed voxel, a moved origin, other weights, another layer: four new entries
    original = image[3, 4, 2]
    changed = sitk.Image(image)
    changed[3, 4, 2] = original + 1
    moved = sitk.Image(image)
    moved.SetOrigin((0.0, 0.0, 0.0))
    for img, ext, layer in [(changed, extractor, -1), (moved, extractor, -1), (image, tiny_extractor(seed=1), -1),
                            (image, extractor, 1)]:
        again = compute_features(img, ext, layer=layer, cache_dir=tmp_path, device="cpu")
        assert not again.from_cache
    assert extract.COMPUTE_COUNT == count + 5 and len(list(tmp_path.glob("*.json"))) == 5
    assert image[3, 4, 2] == original  # the input was not modified


def test_the_cache_files_are_readable_with_numpy_and_json_only(tmp_path):
    image, _ = hand_phantom(size=(40, 36, 6))
    feats = compute_features(image, tiny_extractor(), cache_dir=tmp_path, device="cpu")
    info = json.loads(next(tmp_path.glob("*.json")).read_text())
    array = np.load(tmp_path / info["array"])
    assert info["format"] == "dinomed-features/1" and info["axes"] == ["z", "channel", "y", "x"]
    assert array.dtype == np.float16 and list(array.shape) == info["shape"] == [6, 64, 3, 3]
    assert info["grid"]["size"] == [3, 3, 6] and info["image"] == geometry_of(image)
    np.testing.assert_allclose(info["grid"]["origin"], image.TransformContinuousIndexToPhysicalPoint((7.5, 7.5, 0)))
    # the cosine map as the docstring tells a reader without torch to compute it
    f = array.astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    x, y, z = 20, 17, 2
    by_hand = np.einsum("c,dchw->dhw", f[z, :, y // 16, x // 16], f)
    np.testing.assert_allclose(by_hand, feats.similarity(feats.feature_index((x, y, z)), "3d"), atol=1e-5)


def test_two_streams_are_unit_length_and_concatenated(phantom):
    extractor = tiny_extractor(modalities=("CT", "PET"))
    assert [s.name for s in extractor.streams] == ["CT", "PET"]
    feats = compute_features({"CT": phantom.ct, "PET": phantom.pet}, extractor, device="cpu")
    assert feats.channels == 128 and feats.meta["normalized_streams"]
    norms = np.linalg.norm(feats.array.astype(np.float32).reshape(12, 2, 64, 64), axis=2)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    assert feats.image_geometry == geometry_of(phantom.ct)
    with pytest.raises(DinomedError, match="no PET"):
        compute_features({"CT": phantom.ct}, extractor, device="cpu")


def test_encoder_from_model_finds_the_backbone_of_a_model_folder(tmp_path, phantom):
    from dinomed.models import build_model, model_json_template, save_model_folder

    model = build_model({"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3})
    assert encoder_from_model(model) is model.backbone
    save_model_folder(model, model_json_template(model, name="tiny"), tmp_path / "model")
    extractor = FeatureExtractor.from_model_folder(tmp_path / "model")
    assert extractor.modalities == ["CT", "PET"] and len(extractor.streams) == 1
    feats = compute_features({"CT": phantom.ct, "PET": phantom.pet}, extractor, device="cpu")
    assert feats.array.shape == (12, 64, 8, 8)
    with pytest.raises(DinomedError, match="no encoder"):
        encoder_from_model(torch.nn.Linear(2, 2))


def test_dual_stream_and_single_variant_models_give_their_encoders(tmp_path, phantom):
    from dinomed.models import build_model, model_json_template, save_model_folder

    inputs = {"CT": phantom.ct, "PET": phantom.pet}
    dual = build_model({"name": "dual_petct", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3})
    assert encoder_from_model(dual, "PET") is dual.pet_encoder and encoder_from_model(dual, "ct") is dual.ct_encoder
    with pytest.raises(DinomedError, match="dual-stream"):
        encoder_from_model(dual)
    save_model_folder(dual, model_json_template(dual, name="dual"), tmp_path / "dual")
    both = FeatureExtractor.from_model_folder(tmp_path / "dual")
    assert [s.name for s in both.streams] == ["CT", "PET"]
    assert compute_features(inputs, both, device="cpu").channels == 128
    pet_only = FeatureExtractor.from_model_folder(tmp_path / "dual", "PET")
    assert [s.name for s in pet_only.streams] == ["PET"] and pet_only.streams[0].encoder is not both.streams[0].encoder
    pet_feats = compute_features(inputs, pet_only, device="cpu")
    assert pet_feats.channels == 64 and pet_feats.image_geometry == geometry_of(phantom.ct)  # on the CT grid

    variant = build_model({"name": "dual_petct", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3, "variant": "pet_only"})
    save_model_folder(variant, model_json_template(variant, name="pet-only"), tmp_path / "pet_only")
    extractor = FeatureExtractor.from_model_folder(tmp_path / "pet_only")
    assert extractor.modalities == ["PET"]
    with pytest.raises(DinomedError, match="reads PET, not CT"):
        FeatureExtractor.from_model_folder(tmp_path / "pet_only", "CT")

    med3d = build_model({"name": "dinomed3d", "backbone": "vit_tiny", "in_chans": 1, "num_classes": 3, "stage": 1})
    with pytest.raises(DinomedError, match="not supported"):
        encoder_from_model(med3d)


# ---- the command -----------------------------------------------------------------------------------------
def test_cli_writes_the_maps_with_the_image_geometry_and_the_figures(tmp_path, phantom, capsys):
    ct_path, pet_path = tmp_path / "ct.nii.gz", tmp_path / "pet.nii.gz"
    sitk.WriteImage(phantom.ct, str(ct_path))
    sitk.WriteImage(phantom.pet, str(pet_path))
    args = ["features", "--image", str(ct_path), "--pet", str(pet_path), "--arch", "vit_tiny", "--random-init",
            "--modality", "both", "--pca", str(tmp_path / "pca.nrrd"), "--cosine", "30,34,6",
            "--cosine-out", str(tmp_path / "cos.nii.gz"), "--cosine-mode", "3d", "--png", str(tmp_path / "png"),
            "--cache", str(tmp_path / "cache"), "--device", "cpu", "--events"]
    assert main(args) == 0
    events = [e for e in map(parse_event, capsys.readouterr().out.splitlines()) if e]
    kinds = [e["event"] for e in events]
    assert "progress" in kinds and kinds[-1] == "done"
    artifacts = {e["kind"]: e["path"] for e in events if e["event"] == "artifact"}
    assert {"features", "pca", "cosine", "figure"} <= set(artifacts)
    ct = sitk.ReadImage(str(ct_path))
    pca, cos = sitk.ReadImage(str(tmp_path / "pca.nrrd")), sitk.ReadImage(str(tmp_path / "cos.nii.gz"))
    for out in (pca, cos):
        assert out.GetSize() == ct.GetSize()
        np.testing.assert_allclose(out.GetOrigin(), ct.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(out.GetSpacing(), ct.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(out.GetDirection(), ct.GetDirection(), atol=1e-5)
    assert pca.GetNumberOfComponentsPerPixel() == 3
    values = sitk.GetArrayFromImage(cos)
    assert values.min() >= -1.0 and values.max() <= 1.0
    for name in ("image", "pca", "cosine", "panel"):
        png = tmp_path / "png" / f"features_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # second run: the features come from the cache
    assert main(args) == 0
    again = [e for e in map(parse_event, capsys.readouterr().out.splitlines()) if e]
    assert any(e["event"] == "artifact" and e["kind"] == "features" and e.get("cached") for e in again)
    assert not any(e["event"] == "progress" for e in again)


def test_cli_with_a_model_folder_and_clear_errors(tmp_path, phantom, capsys):
    from dinomed.models import build_model, model_json_template, save_model_folder

    model = build_model({"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 1, "num_classes": 3})
    save_model_folder(model, model_json_template(model, name="tiny-ct"), tmp_path / "model")
    ct_path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(phantom.ct, str(ct_path))
    lps = phantom.ct.TransformIndexToPhysicalPoint((30, 34, 6))
    ras = f"{-lps[0]},{-lps[1]},{lps[2]}"
    assert main(["features", "--image", str(ct_path), "--model", str(tmp_path / "model"), "--cosine", ras,
                 "--point-space", "ras", "--cosine-out", str(tmp_path / "cos.nrrd"), "--device", "cpu"]) == 0
    cos = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cos.nrrd")))
    assert np.isnan(cos[5]).all() and np.isfinite(cos[6]).all()  # 2d by default: only the point's slice
    assert (tmp_path / "dinomed_features").is_dir()  # default cache: beside the image
    capsys.readouterr()
    code = main(["features", "--image", str(ct_path), "--model", str(tmp_path / "model"), "--cosine", "999,0,0",
                 "--cosine-out", str(tmp_path / "x.nrrd"), "--device", "cpu"])
    assert code == 2 and "outside the image" in capsys.readouterr().err
    assert main(["features", "--image", str(ct_path), "--arch", "vit_tiny", "--pca", str(tmp_path / "p.nrrd")]) == 2
    assert "--random-init" in capsys.readouterr().err
    assert main(["features", "--image", str(tmp_path / "missing.nii.gz"), "--arch", "vit_tiny", "--random-init"]) == 2
    assert "missing.nii.gz" in capsys.readouterr().err


def test_arrays_on_reference_outlive_the_resampled_images():
    """A resampled PET's voxels stay valid once the helper returned: a view into the temporary resampled image
    read freed memory (the web app's features job failed on it, the command line happened to survive)."""
    import gc

    from dinomed.features.extract import arrays_on_reference
    from dinomed.petct import resample_to_reference

    ct = sitk.Image([32, 32, 16], sitk.sitkFloat32)
    ct.SetSpacing((2.0, 2.0, 3.0))
    pet_array = np.linspace(0.0, 10.0, 16 * 16 * 8, dtype=np.float32).reshape(8, 16, 16)  # SUV
    pet = sitk.GetImageFromArray(pet_array)
    pet.SetSpacing((4.0, 4.0, 6.0))
    pet.SetOrigin((1.0, -1.0, 2.0))
    expected = sitk.GetArrayFromImage(resample_to_reference(pet, ct, "linear", 0.0))
    volumes = arrays_on_reference({"CT": ct, "PET": pet}, ["CT", "PET"], "CT", {})
    gc.collect()
    reuse = [sitk.Image([32, 32, 16], sitk.sitkFloat32) + 12345.0 for _ in range(32)]  # reuse any freed buffer
    assert len(reuse) == 32 and expected.max() > 5.0
    np.testing.assert_array_equal(volumes["PET"], expected)
    assert volumes["CT"].shape == expected.shape == (16, 32, 32)
