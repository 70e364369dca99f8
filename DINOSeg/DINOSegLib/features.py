"""Feature overlays in the scene: the PCA map as an RGB (vector) volume and the cosine-similarity map as a
scalar volume with a colour table, both on the grid of the image they were computed from; and the cosine
map that follows a markups point as the user drags it.

The features themselves are computed once by the child process (``dinomed features … --cache DIR``);
here they are only read (:func:`read_feature_cache`) and compared (numpy, no torch). The live map uses the
nearest feature cell (a patch's voxels share its value); ``dinomed features --cosine`` writes the smooth
(bilinearly upsampled) map when a figure is wanted. :class:`FeatureGrid` is the in-memory form:
patch features ``(Zf, Yf, Xf, C)`` (float16) for an image of ``(Z, Y, X)`` voxels, a feature cell covering
an equal share of the voxels along each axis (slice-wise models: ``Zf == Z``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk

from .volumes import (VolumeIOError, add_volume_from_array, copy_geometry, ijk_to_ras, lps_geometry, ras_to_ijk,
                      update_volume_from_array)


class FeatureCacheError(RuntimeError):
    """A feature cache that cannot be used; the message names the folder and what is missing."""


@dataclass
class FeatureGrid:
    """Patch features of one image, compactly kept (float16), and the image size they describe."""

    features: np.ndarray  # (Zf, Yf, Xf, C)
    image_shape: tuple[int, int, int]  # (Z, Y, X) voxels
    # voxels per feature cell along (z, y, x) for patch grids of unresized slices (ViT patch 16: (1, 16, 16),
    # the last cell covering the zero padding); None: the cells share each axis equally (resized slices)
    voxels_per_cell: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.features.ndim != 4:
            raise FeatureCacheError(f"features must be (Zf, Yf, Xf, C), found shape {self.features.shape}")
        self.image_shape = tuple(int(s) for s in self.image_shape)
        flat = self.features.reshape(-1, self.features.shape[-1]).astype(np.float32)
        norms = np.linalg.norm(flat, axis=1, keepdims=True)
        # unit vectors once, so that each new map is one matrix-vector product
        self._unit = (flat / np.maximum(norms, 1e-12)).astype(np.float32)
        zf, yf, xf = self.features.shape[:3]
        if self.voxels_per_cell is None:
            self._index = [np.minimum((np.arange(n) * f) // n, f - 1) for n, f in zip(self.image_shape, (zf, yf, xf))]
        else:
            self._index = [np.minimum(np.arange(n) // int(c), f - 1)
                           for n, f, c in zip(self.image_shape, (zf, yf, xf), self.voxels_per_cell)]

    def feature_index(self, ijk) -> tuple[int, int, int]:
        """Feature cell (zf, yf, xf) of a voxel index (i, j, k) = (x, y, z), clamped to the image."""
        i, j, k = (int(round(v)) for v in ijk)
        z, y, x = (min(max(v, 0), n - 1) for v, n in zip((k, j, i), self.image_shape))
        return int(self._index[0][z]), int(self._index[1][y]), int(self._index[2][x])

    def cosine_map_features(self, ijk) -> np.ndarray:
        """Cosine similarity of every feature cell to the cell at voxel ``ijk``, at feature resolution."""
        zf, yf, xf = self.feature_index(ijk)
        shape = self.features.shape[:3]
        reference = self._unit[np.ravel_multi_index((zf, yf, xf), shape)]
        return np.clip(self._unit @ reference, -1.0, 1.0).reshape(shape)

    def upsample(self, feature_map: np.ndarray) -> np.ndarray:
        """A feature-resolution map (Zf, Yf, Xf[, C]) on the image grid (Z, Y, X[, C]), nearest cell."""
        return feature_map[np.ix_(*self._index)]

    def cosine_map(self, ijk) -> np.ndarray:
        """Cosine similarity to the feature at voxel ``ijk``, on the image grid, float32 in [-1, 1]."""
        return self.upsample(self.cosine_map_features(ijk)).astype(np.float32)


CACHE_FORMAT = "dinomed-features/1"


def read_feature_cache(path: str | os.PathLike, image_node=None) -> FeatureGrid:
    """Read a feature-cache entry written by ``dinomed features … --cache DIR`` (format ``dinomed-features/1``,
    documented in ``dinomed/features/__init__.py``): ``<key>.json`` + ``<key>.npy`` (float16 ``(D, C, h, w)``,
    16-voxel patches, zero padding at the bottom/right). numpy and json only, no torch.

    ``path`` is the entry's JSON (the ``features`` artifact of the child) or a cache folder holding exactly
    one entry. With ``image_node`` the entry must describe that volume's grid (same size, origin, spacing,
    direction), so a stale cache is never shown over another image."""
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
        array = np.load(path.parent / info["array"], allow_pickle=False)
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
    features = np.ascontiguousarray(np.transpose(array, (0, 2, 3, 1)))  # (D, h, w, C)
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


class CosineMapFollower:
    """Keeps a cosine-map volume in step with a markups point: each time the point moves, the map is
    recomputed from the cached features (no child process, so it follows a drag).

    ``FeatureGrid.cosine_map`` does the work; this class only converts the point (world RAS, through the
    image's parent transform) to a voxel and updates the volume node. VTK observers, no Qt."""

    def __init__(self, scene, image_node, grid: FeatureGrid, volume_node=None, name: str = "Cosine similarity"):
        shape = tuple(reversed(image_node.GetImageData().GetDimensions()))
        if shape != grid.image_shape:
            raise FeatureCacheError(f"the features describe an image of {grid.image_shape} voxels but "
                                    f"{image_node.GetName()!r} has {shape}")
        self.scene = scene
        self.image = image_node
        self.grid = grid
        self.volume = volume_node
        self.name = name
        self.point_index: np.ndarray | None = None
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

    def update(self, ras_world):
        """Recompute the map for a point in world RAS millimetres; returns the volume node."""
        self.point_index = self.world_to_ijk(ras_world)
        cosine = self.grid.cosine_map(self.point_index)
        self.volume = add_cosine_overlay(self.scene, cosine, self.image, self.name, node=self.volume)
        return self.volume

    def follow(self, markups_node, point: int = 0) -> None:
        """Observe ``markups_node``: whenever its ``point`` moves (or is placed), update the map."""
        self.stop()
        self._markups = markups_node

        def on_modified(caller, event):
            if caller.GetNumberOfControlPoints() > point and caller.GetNthControlPointPositionStatus(point) != 0:
                position = [0.0, 0.0, 0.0]
                caller.GetNthControlPointPositionWorld(point, position)
                self.update(position)

        for event in (slicer.vtkMRMLMarkupsNode.PointModifiedEvent, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent):
            self._observers.append(markups_node.AddObserver(event, on_modified))
        on_modified(markups_node, None)

    def stop(self) -> None:
        if self._markups is not None:
            for tag in self._observers:
                self._markups.RemoveObserver(tag)
        self._observers.clear()
        self._markups = None
