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


def map_at_voxels(follower, ct, voxels):
    """The follower's feature-resolution map read at image voxels through the physical space (nearest cell)."""
    to_map = np.linalg.inv(volumes.ijk_to_ras(follower.volume)) @ volumes.ijk_to_ras(ct)
    cosine = volumes.array_from_volume(follower.volume)
    values = []
    for ijk in voxels:
        i, j, k = np.round((to_map @ np.array([*ijk, 1.0]))[:3]).astype(int)
        values.append(cosine[k, j, i])
    return np.array(values)


def test_cosine_map_follows_the_markups_point(scene, ct, grid):
    follower = features.CosineMapFollower(scene, ct, grid)
    point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Similarity point")
    follower.follow(point)
    assert follower.volume is None  # no point placed yet
    matrix = volumes.ijk_to_ras(ct)
    rng = np.random.default_rng(1)
    voxels = [tuple(rng.integers(0, n) for n in (40, 48, 6)) for _ in range(50)] + [(39, 47, 5), (0, 0, 0)]
    for ijk in ((3, 4, 1), (30, 40, 4)):
        ras = (matrix @ np.array([*ijk, 1.0]))[:3]
        if point.GetNumberOfControlPoints() == 0:
            point.AddControlPoint(*ras)
        else:
            point.SetNthControlPointPosition(0, *ras)  # moved by a script: the whole map
        np.testing.assert_allclose(follower.point_index, ijk, atol=1e-6)
        assert follower.last_planes is None
        np.testing.assert_allclose(volumes.array_from_volume(follower.volume), grid.cosine_map_features(ijk), atol=1e-6)
        # in physical space, every voxel of the CT reads the value of its own patch: the image-grid map
        full = grid.cosine_map(ijk)
        np.testing.assert_allclose(map_at_voxels(follower, ct, voxels), [full[k, j, i] for i, j, k in voxels], atol=1e-6)
        np.testing.assert_allclose(map_at_voxels(follower, ct, [ijk])[0], 1.0, atol=1e-3)
    follower.stop()
    point.SetNthControlPointPosition(0, *(matrix @ np.array([3, 4, 1, 1.0]))[:3])
    np.testing.assert_allclose(follower.point_index, (30, 40, 4))  # no longer following


def test_the_first_placed_point_shows_its_map(scene, ct, grid):
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    composite.SetBackgroundVolumeID(ct.GetID())
    follower = features.CosineMapFollower(scene, ct, grid)
    point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Similarity point")
    follower.follow(point)
    assert composite.GetForegroundVolumeID() is None
    point.AddControlPoint(*(volumes.ijk_to_ras(ct) @ np.array([20, 20, 2, 1.0]))[:3])
    assert follower.volume is not None
    assert composite.GetForegroundVolumeID() == follower.volume.GetID()
    assert composite.GetBackgroundVolumeID() == ct.GetID()
    assert follower.volume.GetDisplayNode().GetInterpolate()  # the views upsample it linearly


def test_a_drag_updates_the_planes_in_view_then_the_whole_map(scene, ct, grid):
    follower = features.CosineMapFollower(scene, ct, grid)
    point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Similarity point")
    follower.follow(point)
    matrix = volumes.ijk_to_ras(ct)
    point.AddControlPoint(*(matrix @ np.array([3, 4, 1, 1.0]))[:3])
    before = volumes.array_from_volume(follower.volume).copy()
    point.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent)
    ijk = (30, 40, 4)
    point.SetNthControlPointPosition(0, *(matrix @ np.array([*ijk, 1.0]))[:3])
    # the scene's one (axial) view is outside the CT: the three planes through the point
    cell = grid.feature_index(ijk)
    assert follower.last_planes == [(0, cell[0]), (1, cell[1]), (2, cell[2])]
    # dragged in the axial view, which then shows the point's slice: that plane only
    slice_node = scene.GetFirstNodeByClass("vtkMRMLSliceNode")
    slice_node.GetSliceToRAS().SetElement(2, 3, (matrix @ np.array([*ijk, 1.0]))[2])
    slice_node.UpdateMatrices()
    before = volumes.array_from_volume(follower.volume).copy()
    ijk = (22, 40, 4)  # same axial slice
    point.SetNthControlPointPosition(0, *(matrix @ np.array([*ijk, 1.0]))[:3])
    assert follower.last_planes == [(0, cell[0])]
    planes = follower.last_planes
    during = volumes.array_from_volume(follower.volume)
    full = grid.cosine_map_features(ijk)
    shown = np.zeros(full.shape, dtype=bool)
    for axis, index in planes:
        where = [slice(None)] * 3
        where[axis] = index
        shown[tuple(where)] = True
    np.testing.assert_allclose(during[shown], full[shown], atol=1e-6)  # what is seen is exact
    np.testing.assert_array_equal(during[~shown], before[~shown])  # the rest waits for the end of the drag
    assert (~shown).any()
    point.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert follower.last_planes is None
    np.testing.assert_allclose(volumes.array_from_volume(follower.volume), full, atol=1e-6)


def test_progressive_whole_map_shows_the_views_first_then_refines(scene, ct, grid):
    follower = features.CosineMapFollower(scene, ct, grid, progressive=True)
    point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Similarity point")
    follower.follow(point)
    ijk = (30, 40, 4)
    point.AddControlPoint(*(volumes.ijk_to_ras(ct) @ np.array([*ijk, 1.0]))[:3])  # placed: not dragging
    full = grid.cosine_map_features(ijk)
    cell = grid.feature_index(ijk)
    assert follower.last_planes == [(0, cell[0]), (1, cell[1]), (2, cell[2])]  # no view inside the CT
    assert follower.pending and cell[0] not in follower.pending
    first = volumes.array_from_volume(follower.volume)
    np.testing.assert_allclose(first[cell[0]], full[cell[0]], atol=1e-6)
    not_yet = list(follower.pending)
    computed = np.zeros(full.shape, dtype=bool)
    computed[cell[0]] = computed[:, cell[1]] = computed[:, :, cell[2]] = True
    np.testing.assert_allclose(first[computed], full[computed], atol=1e-6)
    assert (first[~computed] == -1).all()  # not drawn yet (below the display threshold)
    steps = 0
    while not follower.refine(budget_s=0.0):  # one plane per call
        steps += 1
    assert steps == len(not_yet) - 1
    np.testing.assert_allclose(volumes.array_from_volume(follower.volume), full, atol=1e-6)
    point.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent)
    point.SetNthControlPointPosition(0, *(volumes.ijk_to_ras(ct) @ np.array([3, 4, 1, 1.0]))[:3])
    assert follower.pending == []  # a drag computes only what is in view
    point.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert follower.pending  # the end of the drag: the rest of the map follows
    while not follower.refine():
        pass
    np.testing.assert_allclose(volumes.array_from_volume(follower.volume), grid.cosine_map_features((3, 4, 1)), atol=1e-6)


def test_the_axial_view_plane_is_among_the_planes_in_view(scene, ct, grid):
    slice_node = scene.GetFirstNodeByClass("vtkMRMLSliceNode")  # axial; the CT is tilted in-plane only
    centre = volumes.ijk_to_ras(ct) @ np.array([0, 0, 3, 1.0])
    slice_node.GetSliceToRAS().SetElement(2, 3, centre[2])
    slice_node.UpdateMatrices()
    assert (0, 3) in features.feature_planes_in_view(scene, ct, grid)


def test_the_grid_holds_no_float32_copy_and_an_update_stays_bounded(scene, ct):
    import tracemalloc

    rng = np.random.default_rng(0)
    raw = rng.standard_normal((20, 32, 32, 384)).astype(np.float16)  # 15 MiB, like 20 slices of ViT-S
    grid = features.FeatureGrid(raw, (20, 512, 512), voxels_per_cell=(1, 16, 16))
    assert grid.features.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(grid.features[3, 4].astype(np.float32), axis=-1), 1.0, atol=2e-3)
    arrays = [v for v in vars(grid).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in arrays) == grid.features.nbytes
    tracemalloc.start()
    grid.cosine_map_features((100, 200, 7))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < grid.features.nbytes  # a float32 copy of the grid would be twice its size


def test_the_feature_grid_is_dropped_when_ct_model_block_or_scene_change(scene, ct, grid):
    cache = features.FeatureGridCache()
    model = {"model_dir": "/models/a"}
    cache.put(ct, model, -1, grid)
    assert cache.get(ct, model, -1) is grid
    assert cache.get(ct, {"model_dir": "/models/b"}, -1) is None  # another model
    assert cache.get(ct, {"backbone": "/models/a"}, -1) is None
    assert cache.get(ct, model, 5) is None  # another block
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT 2")
    volumes.update_volume_from_array(other, volumes.array_from_volume(ct))
    volumes.set_ijk_to_ras(other, volumes.ijk_to_ras(ct))
    assert cache.get(other, model, -1) is None  # another CT
    assert cache.get(ct, model, -1) is grid
    volumes.update_volume_from_array(ct, volumes.array_from_volume(ct) + 1)  # its voxels changed
    assert cache.get(ct, model, -1) is None
    cache.put(ct, model, -1, grid)
    matrix = volumes.ijk_to_ras(ct)
    matrix[0, 3] += 5
    volumes.set_ijk_to_ras(ct, matrix)  # moved
    assert cache.get(ct, model, -1) is None
    cache.put(ct, model, -1, grid)
    scene.Clear(0)  # the scene is closed: the new CT of the same name gets no stale map
    again = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    volumes.update_volume_from_array(again, np.zeros((6, 48, 40), np.float32))
    volumes.set_ijk_to_ras(again, matrix)
    assert cache.get(again, model, -1) is None
    cache.clear()
    assert cache.grid is None


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
