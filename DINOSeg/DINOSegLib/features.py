"""Feature overlays in the scene: the PCA map as an RGB (vector) volume and the cosine-similarity map as a
scalar volume with a colour table, both in the physical space of the image they were computed from; and the
cosine map that follows a markups point as the user drags it.

The features themselves are computed once by the child process (``dinomed features … --cache DIR``);
here they are only read (:func:`read_feature_cache`) and compared (numpy, no torch).

The live cosine map is a volume at *feature* resolution (one voxel per patch, e.g. 300×32×32 for a
300×512×512 CT with 16-pixel patches) whose geometry places each voxel at the centre of its patch. Slicer's
slice views resample it (linear interpolation) for the slices they show, which is the bilinear upsampling
``dinomed features --cosine`` does for a figure, done only where it is seen. So an update touches
kilobytes, not the 315 MB of a full-resolution float32 map, and the grid is kept once, as unit float16 vectors
(the size of the cache entry). While a point is dragged, only the feature planes shown (through the point,
and those of the axis-aligned slice views) are recomputed; the whole map follows when the drag ends.
:class:`FeatureGrid` is the in-memory form: patch features ``(Zf, Yf, Xf, C)`` for an image of ``(Z, Y, X)``
voxels (slice-wise models: ``Zf == Z``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk

from .volumes import (VolumeIOError, add_volume_from_array, copy_geometry, ijk_to_ras, lps_geometry, ras_to_ijk,
                      set_ijk_to_ras, update_volume_from_array)

_CHUNK_BYTES = 8 * 2**20  # float32 working memory of one chunk of feature vectors (bounded, whatever the grid)


def _chunk_rows(channels: int) -> int:
    return max(256, _CHUNK_BYTES // (4 * max(int(channels), 1)))


class FeatureCacheError(RuntimeError):
    """A feature cache that cannot be used; the message names the folder and what is missing."""


@dataclass
class FeatureGrid:
    """Patch features of one image, kept once as unit vectors in float16, and the image size they describe.

    ``features`` is normalised in place (cosine similarity only needs directions), so no float32 copy of the
    grid is ever held; a map is computed in chunks of at most :data:`_CHUNK_BYTES` of float32."""

    features: np.ndarray  # (Zf, Yf, Xf, C), unit vectors after __post_init__
    image_shape: tuple[int, int, int]  # (Z, Y, X) voxels
    # voxels per feature cell along (z, y, x) for patch grids of unresized slices (ViT patch 16: (1, 16, 16),
    # the last cell covering the zero padding); None: the cells share each axis equally (resized slices)
    voxels_per_cell: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.features.ndim != 4:
            raise FeatureCacheError(f"features must be (Zf, Yf, Xf, C), found shape {self.features.shape}")
        self.image_shape = tuple(int(s) for s in self.image_shape)
        if self.features.dtype != np.float16 or not self.features.flags.c_contiguous:
            self.features = np.ascontiguousarray(self.features, dtype=np.float16)
        flat = self.features.reshape(-1, self.features.shape[-1])
        rows = _chunk_rows(flat.shape[1])
        for start in range(0, flat.shape[0], rows):
            block = flat[start:start + rows].astype(np.float32)
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
            flat[start:start + rows] = block
        zf, yf, xf = self.features.shape[:3]
        if self.voxels_per_cell is None:
            self._index = [np.minimum((np.arange(n) * f) // n, f - 1) for n, f in zip(self.image_shape, (zf, yf, xf))]
            self.cell_size = tuple(n / f for n, f in zip(self.image_shape, (zf, yf, xf)))
        else:
            self._index = [np.minimum(np.arange(n) // int(c), f - 1)
                           for n, f, c in zip(self.image_shape, (zf, yf, xf), self.voxels_per_cell)]
            self.cell_size = tuple(float(c) for c in self.voxels_per_cell)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.features.shape[:3])

    def feature_index(self, ijk) -> tuple[int, int, int]:
        """Feature cell (zf, yf, xf) of a voxel index (i, j, k) = (x, y, z), clamped to the image."""
        i, j, k = (int(round(v)) for v in ijk)
        z, y, x = (min(max(v, 0), n - 1) for v, n in zip((k, j, i), self.image_shape))
        return int(self._index[0][z]), int(self._index[1][y]), int(self._index[2][x])

    def _reference(self, ijk) -> np.ndarray:
        return self.features[self.feature_index(ijk)].astype(np.float32)

    def cosine_map_features(self, ijk, planes=None, out: np.ndarray | None = None) -> np.ndarray:
        """Cosine similarity of feature cells to the cell at voxel ``ijk``, at feature resolution (Zf, Yf, Xf),
        float32 in [-1, 1]. ``planes``: only these ``(axis, index)`` planes of the feature grid (axis 0 = z,
        1 = y, 2 = x) are computed, into ``out`` (the other cells keep their values)."""
        reference = self._reference(ijk)
        shape = self.grid_shape
        if out is None:
            out = np.zeros(shape, dtype=np.float32)
        if planes is None:
            flat_in = self.features.reshape(-1, self.features.shape[-1])
            flat_out = out.reshape(-1)
            rows = _chunk_rows(flat_in.shape[1])
            for start in range(0, flat_in.shape[0], rows):
                flat_out[start:start + rows] = flat_in[start:start + rows].astype(np.float32) @ reference
        else:
            for axis, index in planes:
                where = [slice(None)] * 3
                where[axis] = int(index)
                block = self.features[tuple(where)]
                out[tuple(where)] = (block.reshape(-1, block.shape[-1]).astype(np.float32) @ reference).reshape(block.shape[:-1])
        np.clip(out, -1.0, 1.0, out=out)
        return out

    def upsample(self, feature_map: np.ndarray) -> np.ndarray:
        """A feature-resolution map (Zf, Yf, Xf[, C]) on the image grid (Z, Y, X[, C]), nearest cell (figures,
        tests; the live map is never upsampled in memory)."""
        return feature_map[np.ix_(*self._index)]

    def cosine_map(self, ijk) -> np.ndarray:
        """Cosine similarity to the feature at voxel ``ijk``, on the image grid, float32 in [-1, 1]."""
        return self.upsample(self.cosine_map_features(ijk)).astype(np.float32)

    def feature_ijk_to_image_ijk(self) -> np.ndarray:
        """4x4 matrix from a feature cell index (x, y, z order) to the image's continuous voxel index of the
        cell's centre: a cell of c voxels starting at voxel q·c has its centre at q·c + (c - 1) / 2."""
        cz, cy, cx = self.cell_size
        matrix = np.diag([cx, cy, cz, 1.0])
        matrix[:3, 3] = [(cx - 1) / 2, (cy - 1) / 2, (cz - 1) / 2]
        return matrix


CACHE_FORMAT = "dinomed-features/1"


def read_feature_cache(path: str | os.PathLike, image_node=None) -> FeatureGrid:
    """Read a feature-cache entry written by ``dinomed features … --cache DIR`` (format ``dinomed-features/1``,
    documented in ``dinomed/features/__init__.py``): ``<key>.json`` + ``<key>.npy`` (float16 ``(D, C, h, w)``,
    16-voxel patches, zero padding at the bottom/right). numpy and json only, no torch.

    ``path`` is the entry's JSON (the ``features`` artifact of the child) or a cache folder holding exactly
    one entry. With ``image_node`` the entry must describe that volume's grid (same size, origin, spacing,
    direction), so a stale cache is never shown over another image.

    Deliberately a copy of the checks of ``dinomed.features.volume.FeatureVolume.load`` (its JSON part is
    ``dinomed.errors.read_json_object``): this Lib runs in
    Slicer's Python, which need not have ``dinomed`` (see events.py); Testing/test_dinoseg_features.py reads
    entries that real ``dinomed features`` children wrote."""
    import json

    path = Path(path)
    if path.is_dir():
        entries = sorted(path.glob("*.json"))
        if len(entries) != 1:
            raise FeatureCacheError(f"the feature cache {path} holds {len(entries)} entries; give the entry's .json")
        path = entries[0]
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatureCacheError(f"the feature cache entry {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FeatureCacheError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != CACHE_FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise FeatureCacheError(f"{path}: expected a {CACHE_FORMAT!r} feature file, found format {found!r}")
    try:
        # memory-mapped: the only copy in memory is the (D, h, w, C) one below
        array = np.load(path.parent / info["array"], allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, KeyError) as exc:
        raise FeatureCacheError(f"{path}: cannot read the feature array ({exc})") from None
    if array.ndim != 4 or list(array.shape) != list(info.get("shape", [])):
        raise FeatureCacheError(f"{path}: the array has shape {array.shape}, the JSON says {info.get('shape')}")
    image = info["image"]
    width, height, depth = (int(v) for v in image["size"])
    if image_node is not None:
        node_shape = tuple(reversed(image_node.GetImageData().GetDimensions()))
        origin, spacing, direction = lps_geometry(image_node)
        same = (node_shape == (depth, height, width) and np.allclose(origin, image["origin"], atol=1e-3)
                and np.allclose(spacing, image["spacing"], atol=1e-5) and np.allclose(direction, image["direction"], atol=1e-5))
        if not same:
            raise FeatureCacheError(f"the features in {path} were computed on another image grid than "
                                    f"{image_node.GetName()!r}; compute them again for this volume")
    patch = int(info.get("patch_size", 16))
    features = np.ascontiguousarray(np.transpose(array, (0, 2, 3, 1)), dtype=np.float16)  # (D, h, w, C)
    del array
    return FeatureGrid(features, (depth, height, width), voxels_per_cell=(1, patch, patch))


# -- overlays -------------------------------------------------------------------------------------------
def add_rgb_overlay(scene, rgb: np.ndarray, reference, name: str = "PCA map", node=None):
    """The PCA map as a vector (RGB) volume on the reference's grid; ``rgb`` is (z, y, x, 3), uint8 or [0, 1]."""
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise VolumeIOError(f"{name}: expected an RGB array (z, y, x, 3), found shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.round(np.asarray(rgb, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    if node is None:
        node = add_volume_from_array(scene, rgb, reference, name, "vtkMRMLVectorVolumeNode")
    else:
        update_volume_from_array(node, rgb)
        copy_geometry(reference, node)
    return node


def load_rgb_overlay(scene, path: str | os.PathLike, reference, name: str = "PCA map"):
    """Read the PCA map file that ``dinomed features --pca OUT`` wrote (a 3-component image on the image's
    grid) into a vector volume; an error when it does not lie on the reference's grid."""
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node) or node.GetImageData() is None:
        scene.RemoveNode(node)
        raise VolumeIOError(f"could not read a PCA map from {path}")
    same_size = node.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()
    if not same_size or not np.allclose(ijk_to_ras(node), ijk_to_ras(reference), atol=1e-3):
        scene.RemoveNode(node)
        raise VolumeIOError(f"the PCA map {path} is not on the grid of {reference.GetName()!r}")
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    return node


def set_cosine_display(node, color_node_id: str = "vtkMRMLColorTableNodeRainbow") -> None:
    """Show a cosine map in [-1, 1] with a colour table (the full range mapped, low values transparent-ish
    by thresholding below 0 so that the anatomy stays visible under it)."""
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    scene = node.GetScene()
    if scene is not None and scene.GetNodeByID(color_node_id) is not None:
        display.SetAndObserveColorNodeID(color_node_id)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(-1.0, 1.0)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(0.0)
    display.SetUpperThreshold(1.0)


def add_cosine_overlay(scene, cosine: np.ndarray, reference, name: str = "Cosine similarity", node=None):
    """The cosine map (z, y, x) as a scalar volume on the reference's grid with a colour table."""
    cosine = np.asarray(cosine, dtype=np.float32)
    if node is None:
        node = add_volume_from_array(scene, cosine, reference, name)
        set_cosine_display(node)
    else:
        update_volume_from_array(node, cosine)
        copy_geometry(reference, node)
    return node


def feature_planes_in_view(scene, image_node, grid: FeatureGrid, ijk=None) -> list[tuple[int, int]]:
    """The feature-grid planes ``(axis, index)`` that the slice views show: the plane of every slice view whose
    slice is parallel to one of the image's axes (the view a point is dragged in shows the point's plane).
    Without such a view (oblique views, no views), the three planes through the voxel ``ijk``. Oblique views
    get the whole map at the end of the drag."""
    planes: set[tuple[int, int]] = set()
    to_ijk = np.linalg.inv(ijk_to_ras(image_node))
    transform = image_node.GetParentTransformNode()
    world_to_local = None
    if transform is not None:
        world_to_local = vtk.vtkGeneralTransform()
        transform.GetTransformFromWorld(world_to_local)
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        slice_node = scene.GetNthNodeByClass(n, "vtkMRMLSliceNode")
        matrix = slice_node.GetSliceToRAS()
        centre = np.array([matrix.GetElement(r, 3) for r in range(3)])
        normal = np.array([matrix.GetElement(r, 2) for r in range(3)])
        if world_to_local is not None:
            tip = np.array(world_to_local.TransformPoint(*(centre + normal)))
            centre = np.array(world_to_local.TransformPoint(*centre))
            normal = tip - centre
        centre_ijk = (to_ijk @ np.array([*centre, 1.0]))[:3]
        normal_ijk = to_ijk[:3, :3] @ normal
        normal_ijk /= max(np.linalg.norm(normal_ijk), 1e-12)
        axis_xyz = int(np.argmax(np.abs(normal_ijk)))
        if abs(normal_ijk[axis_xyz]) < 0.999:
            continue  # oblique to the image grid
        zyx_axis = 2 - axis_xyz
        if 0 <= round(centre_ijk[axis_xyz]) < grid.image_shape[zyx_axis]:
            planes.add((zyx_axis, grid.feature_index(centre_ijk)[zyx_axis]))
    if not planes and ijk is not None:
        cell = grid.feature_index(ijk)
        planes.update((axis, cell[axis]) for axis in range(3))
    return sorted(planes)


def add_feature_map_volume(scene, feature_map: np.ndarray, image_node, grid: FeatureGrid, name: str, node=None):
    """A scalar volume holding a feature-resolution map (Zf, Yf, Xf), each voxel at the centre of its patch in
    the image's physical space (same parent transform), shown with linear interpolation by the slice views."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    update_volume_from_array(node, feature_map)
    set_ijk_to_ras(node, ijk_to_ras(image_node) @ grid.feature_ijk_to_image_ijk())
    node.SetAndObserveTransformNodeID(image_node.GetTransformNodeID())
    return node


class CosineMapFollower:
    """Keeps a cosine-map volume in step with a markups point: each time the point moves, the map is
    recomputed from the cached features (no child process, so it follows a drag).

    The volume is at feature resolution (see the module docstring). While the point is dragged
    (between the markups' Start/EndInteraction events) only :func:`feature_planes_in_view` are recomputed;
    otherwise (placing, a programmatic move, the end of a drag) the whole map. With ``progressive`` the whole
    map is not computed at once: the planes in view are, and the rest waits in :attr:`pending` for
    :meth:`refine`, which the front-end's timer calls (a few axial planes per call), so the GUI never stalls
    for the ~0.7 s a whole 300×32×32 map takes; cells not computed yet are -1 (below the display threshold,
    so not drawn). With ``show`` the map is put in the slice views' foreground when it is first made, so the
    first placed point's map is seen. VTK observers, no Qt."""

    def __init__(self, scene, image_node, grid: FeatureGrid, volume_node=None, name: str = "Cosine similarity",
                 show: bool = True, opacity: float = 0.5, progressive: bool = False):
        shape = tuple(reversed(image_node.GetImageData().GetDimensions()))
        if shape != grid.image_shape:
            raise FeatureCacheError(f"the features describe an image of {grid.image_shape} voxels but "
                                    f"{image_node.GetName()!r} has {shape}")
        self.scene = scene
        self.image = image_node
        self.grid = grid
        self.volume = volume_node
        self.name = name
        self.show = show
        self.opacity = opacity
        self.point_index: np.ndarray | None = None
        self.dragging = False
        self.last_planes: list[tuple[int, int]] | None = None  # None: the last update was the whole map
        self.progressive = progressive
        self.pending: list[int] = []  # axial planes of the feature grid still to compute for the current point
        self._map = np.full(grid.grid_shape, -1.0, dtype=np.float32)
        self._markups = None
        self._observers: list[int] = []

    def world_to_ijk(self, ras_world) -> np.ndarray:
        ras = np.array([*ras_world, 1.0])
        transform = self.image.GetParentTransformNode()
        if transform is not None:
            to_local = vtk.vtkGeneralTransform()
            transform.GetTransformFromWorld(to_local)
            ras[:3] = to_local.TransformPoint(ras[:3])
        return ras_to_ijk(self.image, ras[:3])

    def update(self, ras_world, whole: bool | None = None):
        """Recompute the map for a point in world RAS millimetres (the planes in view while dragging, else
        the whole map; ``whole`` forces either); returns the volume node."""
        self.point_index = self.world_to_ijk(ras_world)
        whole = (not self.dragging or self.volume is None) if whole is None else whole
        if whole and not self.progressive:
            self.last_planes = None
            self.pending = []
        else:
            self.last_planes = feature_planes_in_view(self.scene, self.image, self.grid, self.point_index)
            # the rest of the whole map follows in refine(); while dragging it waits for the end of the drag
            done = {index for axis, index in self.last_planes if axis == 0}
            centre = self.grid.feature_index(self.point_index)[0]
            self.pending = sorted((z for z in range(self.grid.grid_shape[0]) if z not in done),
                                  key=lambda z: abs(z - centre)) if whole else []
        self.grid.cosine_map_features(self.point_index, planes=self.last_planes, out=self._map)
        first = self.volume is None
        self.volume = add_feature_map_volume(self.scene, self._map, self.image, self.grid, self.name, node=self.volume)
        if first:
            set_cosine_display(self.volume)
            if self.show:
                from .display import show_overlay

                show_overlay(self.scene, self.volume, self.opacity)
        return self.volume

    def refine(self, budget_s: float = 0.05) -> bool:
        """Compute more of the pending whole map (axial planes, nearest to the point first) for about
        ``budget_s`` seconds and show it; True when the map is complete."""
        if not self.pending or self.point_index is None:
            return True
        import time

        start = time.perf_counter()
        done = []
        while self.pending and (not done or time.perf_counter() - start < budget_s):
            done.append(self.pending.pop(0))
            self.grid.cosine_map_features(self.point_index, planes=[(0, done[-1])], out=self._map)
        self.volume = add_feature_map_volume(self.scene, self._map, self.image, self.grid, self.name, node=self.volume)
        return not self.pending

    def follow(self, markups_node, point: int = 0) -> None:
        """Observe ``markups_node``: whenever its ``point`` moves (or is placed), update the map."""
        self.stop()
        self._markups = markups_node

        def position(caller):
            if caller.GetNumberOfControlPoints() > point and caller.GetNthControlPointPositionStatus(point) != 0:
                ras = [0.0, 0.0, 0.0]
                caller.GetNthControlPointPositionWorld(point, ras)
                return ras
            return None

        def on_modified(caller, event):
            ras = position(caller)
            if ras is not None:
                self.update(ras)

        def on_start(caller, event):
            self.dragging = True

        def on_end(caller, event):
            self.dragging = False
            ras = position(caller)
            if ras is not None:
                self.update(ras, whole=True)

        markups = slicer.vtkMRMLMarkupsNode
        for event, callback in ((markups.PointModifiedEvent, on_modified), (markups.PointPositionDefinedEvent, on_modified),
                                (markups.PointStartInteractionEvent, on_start), (markups.PointEndInteractionEvent, on_end)):
            self._observers.append(markups_node.AddObserver(event, callback))
        on_modified(markups_node, None)

    def stop(self) -> None:
        if self._markups is not None:
            for tag in self._observers:
                self._markups.RemoveObserver(tag)
        self._observers.clear()
        self._markups = None
        self.dragging = False
        self.pending = []


class FeatureGridCache:
    """The feature grid the GUI keeps between maps, valid for one image (its voxels and geometry), one
    feature source (model folder or backbone file) and one block. Anything else asks for new features."""

    def __init__(self):
        self._key = None
        self.grid: FeatureGrid | None = None

    @staticmethod
    def key(image_node, source: dict, layer: int):
        image = image_node.GetImageData() if image_node is not None else None
        if image is None:
            return None
        return (id(image_node.GetScene()), image_node.GetID(), image.GetMTime(), tuple(ijk_to_ras(image_node).ravel()),
                tuple(sorted((str(k), str(v)) for k, v in source.items())), int(layer))

    def get(self, image_node, source: dict, layer: int) -> FeatureGrid | None:
        key = self.key(image_node, source, layer)
        return self.grid if key is not None and key == self._key else None

    def put(self, image_node, source: dict, layer: int, grid: FeatureGrid) -> None:
        self._key = self.key(image_node, source, layer)
        self.grid = grid

    def clear(self) -> None:
        self._key = None
        self.grid = None
