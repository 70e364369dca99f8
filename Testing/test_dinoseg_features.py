"""Feature overlays: the PCA map and the cosine map on the image's grid; the map follows a markups point."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

from DINOSegLib import features, volumes


@pytest.fixture
def ct(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    rng = np.random.default_rng(0)
    array = rng.normal(0, 50, (6, 48, 40)).astype(np.float32)
    array[:, 8:30, 5:25] += 800  # an "organ"
    volumes.update_volume_from_array(node, array)
    direction = np.array([[0.96, -0.28, 0], [0.28, 0.96, 0], [0, 0, 1]])
    volumes.set_ijk_to_ras(node, volumes.ijk_to_ras_from_lps((4, -8, 20), (0.8, 0.9, 2.5), direction.reshape(-1)))
    return node


@pytest.fixture
def grid(ct):
    """Patch features of every axial slice from a real (tiny, randomly initialised) DINOv3 ViT."""
    import torch

    from dinomed.backbones import create_backbone, extract_features

    model = create_backbone("vit_tiny", in_chans=1, img_size=48).eval()
    array = volumes.array_from_volume(ct)
    slices = torch.from_numpy(np.clip(array, -1000, 1000) / 1000.0)[:, None].float()
    with torch.no_grad():
        patches = extract_features(model, slices, layers=[-1]).patches[0]  # (Z, C, 3, 3)
    feats = patches.permute(0, 2, 3, 1).numpy().astype(np.float16)
    return features.FeatureGrid(feats, array.shape, voxels_per_cell=(1, 16, 16))


def test_cosine_map_is_one_at_the_point_and_within_range(grid):
    ijk = (10, 20, 3)  # x, y, z
    cosine = grid.cosine_map(ijk)
    assert cosine.shape == grid.image_shape and cosine.dtype == np.float32
    assert cosine.min() >= -1 and cosine.max() <= 1
    np.testing.assert_allclose(cosine[3, 20, 10], 1.0, atol=1e-3)
    # every voxel of the reference's feature cell (y 16..31, x 0..15 of slice 3) has similarity 1
    np.testing.assert_allclose(cosine[3, 16:32, 0:16], 1.0, atol=1e-3)
    # the last cell covers voxels 32..47 (y) and 32..39 (x, the patch padded with zeros)
    assert grid.feature_index((39, 47, 5)) == (5, 2, 2)


def test_overlays_have_the_volume_geometry(scene, ct, grid):
    cosine_node = features.add_cosine_overlay(scene, grid.cosine_map((5, 5, 0)), ct)
    rgb = (np.random.default_rng(1).random(grid.image_shape + (3,))).astype(np.float32)
    pca_node = features.add_rgb_overlay(scene, rgb, ct)
    for node in (cosine_node, pca_node):
        np.testing.assert_allclose(volumes.ijk_to_ras(node), volumes.ijk_to_ras(ct))
        assert node.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions()
    assert pca_node.IsA("vtkMRMLVectorVolumeNode")
    assert pca_node.GetImageData().GetNumberOfScalarComponents() == 3
    np.testing.assert_array_equal(volumes.array_from_volume(pca_node), np.round(rgb * 255).astype(np.uint8))
    display = cosine_node.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (2.0, 0.0)
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeRainbow"
    with pytest.raises(volumes.VolumeIOError, match="size"):
        features.add_cosine_overlay(scene, np.zeros((2, 2, 2)), ct)


def test_pca_file_on_the_image_grid_loads_as_rgb(scene, ct, tmp_path):
    origin, spacing, direction = volumes.lps_geometry(ct)
    rgb = np.random.default_rng(2).integers(0, 255, (6, 48, 40, 3)).astype(np.uint8)
    image = sitk.GetImageFromArray(rgb, isVector=True)
    image.SetOrigin(origin), image.SetSpacing(spacing), image.SetDirection(direction)
    sitk.WriteImage(image, str(tmp_path / "pca.nrrd"))
    node = features.load_rgb_overlay(scene, tmp_path / "pca.nrrd", ct)
    np.testing.assert_array_equal(volumes.array_from_volume(node), rgb)
    image.SetOrigin((0, 0, 0))
    sitk.WriteImage(image, str(tmp_path / "shifted.nrrd"))
    with pytest.raises(volumes.VolumeIOError, match="not on the grid"):
        features.load_rgb_overlay(scene, tmp_path / "shifted.nrrd", ct)


def test_cosine_map_follows_the_markups_point(scene, ct, grid):
    follower = features.CosineMapFollower(scene, ct, grid)
    point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Similarity point")
    follower.follow(point)
    assert follower.volume is None  # no point placed yet
    matrix = volumes.ijk_to_ras(ct)
    for ijk in ((3, 4, 1), (30, 40, 4)):
        ras = (matrix @ np.array([*ijk, 1.0]))[:3]
        if point.GetNumberOfControlPoints() == 0:
            point.AddControlPoint(*ras)
        else:
            point.SetNthControlPointPosition(0, *ras)  # a drag
        np.testing.assert_allclose(follower.point_index, ijk, atol=1e-6)
        cosine = volumes.array_from_volume(follower.volume)
        np.testing.assert_allclose(cosine[ijk[2], ijk[1], ijk[0]], 1.0, atol=1e-3)
        np.testing.assert_array_equal(cosine, grid.cosine_map(ijk))
    follower.stop()
    point.SetNthControlPointPosition(0, *(matrix @ np.array([3, 4, 1, 1.0]))[:3])
    np.testing.assert_allclose(follower.point_index, (30, 40, 4))  # no longer following


@pytest.mark.slow  # two torch child processes
def test_features_from_a_real_dinomed_child(scene, ct, tmp_path, dinomed_python):
    """`dinomed features` (random tiny ViT) writes the cache and the PCA map; both land on the CT's grid and
    the live cosine map from the cache agrees with the one dinomed writes."""
    from DINOSegLib import DINOSegLogic, Job

    logic = DINOSegLogic(scene, python=dinomed_python)
    random_tiny = ["--arch", "vit_tiny", "--random-init", "--device", "cpu"]
    job = logic.start_features(ct, cache_dir=tmp_path / "cache", extra_args=random_tiny, work_dir=tmp_path / "work")
    pca_node, grid = logic.finish_features(job, keep_files=True)
    assert job.job.progress[1] > 0
    np.testing.assert_allclose(volumes.ijk_to_ras(pca_node), volumes.ijk_to_ras(ct), atol=1e-4)
    assert pca_node.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions()
    assert pca_node.GetImageData().GetNumberOfScalarComponents() == 3
    assert grid.image_shape == (6, 48, 40) and grid.features.shape[:3] == (6, 3, 3)

    # dinomed's own cosine map (3D, bilinear) for a voxel at a patch centre
    ijk = (23, 8, 2)
    out = tmp_path / "cosine.nrrd"
    process = Job(["features", "--image", str(tmp_path / "work" / "image.nrrd"), "--cache", str(tmp_path / "cache"),
                   "--cosine", ",".join(map(str, ijk)), "--point-space", "index", "--cosine-mode", "3d",
                   "--cosine-out", str(out), *random_tiny], python=dinomed_python).start()
    process.wait(timeout=300)
    process.check()
    assert process.artifacts["features"]  # the second run read the cache
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    ours = grid.cosine_map(ijk)
    centres = np.ix_(range(6), [7, 8, 23, 24, 39, 40], [7, 8, 23, 24, 39])
    np.testing.assert_allclose(ours[centres], theirs[centres], atol=0.07)
    assert ours[2, 8, 23] == pytest.approx(1.0, abs=1e-3)


def test_feature_cache_errors_name_the_problem(scene, ct, tmp_path):
    with pytest.raises(features.FeatureCacheError, match="0 entries"):
        features.read_feature_cache(tmp_path)
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(features.FeatureCacheError, match="dinomed-features/1"):
        features.read_feature_cache(bad)
