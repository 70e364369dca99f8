"""A volume of patch features, its feature grid (an image geometry), and its cache files on disk.

The feature grid of an image of ``W×H×D`` voxels (x, y, z) and patch size ``p`` (16) has ``ceil(W/p)×ceil(H/p)×D``
positions: patch ``(c, r)`` of slice ``k`` covers voxels ``x in [c·p, c·p+p)``, ``y in [r·p, r·p+p)`` of slice ``k``
(the last row/column also covers the zero padding). As a SimpleITK geometry it has the image's direction,
spacing ``(sx·p, sy·p, sz)`` and origin at the centre of the first patch, the image's physical point at
continuous index ``((p-1)/2, (p-1)/2, 0)``; so resampling a map on this grid onto the image grid (SimpleITK
linear, or ``torch.nn.functional.interpolate(bilinear, scale_factor=p, align_corners=False)`` in-plane, then
cropping to ``H×W``) is the upsampling. The format of the cache files is in ``dinomed.features``' docstring.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_path, atomic_write_text
from ..errors import DinomedError, InputImageError, read_json_object

CACHE_FORMAT = "dinomed-features/1"
POINT_SPACES = ("index", "lps", "ras")


def geometry_of(image: sitk.Image) -> dict:
    """``{"size", "origin", "spacing", "direction"}`` of ``image`` (SimpleITK order: x-y-z, LPS, row-major 3×3)."""
    return {
        "size": [int(s) for s in image.GetSize()],
        "origin": [float(v) for v in image.GetOrigin()],
        "spacing": [float(v) for v in image.GetSpacing()],
        "direction": [float(v) for v in image.GetDirection()],
    }


def feature_grid_geometry(image_geometry: dict, patch_size: int = 16) -> dict:
    """The feature grid of an image geometry (see the module docstring)."""
    w, h, d = image_geometry["size"]
    sx, sy, sz = image_geometry["spacing"]
    direction = np.asarray(image_geometry["direction"], dtype=np.float64).reshape(3, 3)
    centre = np.array([(patch_size - 1) / 2 * sx, (patch_size - 1) / 2 * sy, 0.0])
    origin = np.asarray(image_geometry["origin"], dtype=np.float64) + direction @ centre
    return {
        "size": [math.ceil(w / patch_size), math.ceil(h / patch_size), int(d)],
        "origin": [float(v) for v in origin],
        "spacing": [float(sx * patch_size), float(sy * patch_size), float(sz)],
        "direction": [float(v) for v in direction.ravel()],
    }


def image_from_geometry(array: np.ndarray, geometry: dict, is_vector: bool = False) -> sitk.Image:
    """``array`` (z, y, x[, components]) as a SimpleITK image with ``geometry``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=is_vector)
    if list(image.GetSize()) != list(geometry["size"]):
        raise InputImageError(f"array of shape {array.shape} does not fit a grid of size {geometry['size']} (x, y, z)")
    image.SetOrigin(geometry["origin"])
    image.SetSpacing(geometry["spacing"])
    image.SetDirection(geometry["direction"])
    return image


def physical_to_index(geometry: dict, point_lps: Sequence[float]) -> np.ndarray:
    """Continuous voxel index (x, y, z) of a physical LPS point on a grid (any direction), without an image."""
    direction = np.asarray(geometry["direction"], dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(geometry["spacing"], dtype=np.float64)
    offset = np.asarray(point_lps, dtype=np.float64) - np.asarray(geometry["origin"], dtype=np.float64)
    return np.linalg.solve(direction * spacing[None, :], offset)


def index_to_physical(geometry: dict, index: Sequence[float]) -> np.ndarray:
    """Physical LPS point of a continuous voxel index (x, y, z) on a grid."""
    direction = np.asarray(geometry["direction"], dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(geometry["spacing"], dtype=np.float64)
    return np.asarray(geometry["origin"], dtype=np.float64) + direction @ (spacing * np.asarray(index, dtype=np.float64))


@dataclass
class FeatureVolume:
    """Patch features of a volume: ``array`` float16 ``(D, C, h, w)`` (z, channel, y, x) on ``grid``.

    ``image_geometry`` is the grid of the image the features were computed from (the grid every upsampled
    output lands on); ``grid`` is its feature grid (:func:`feature_grid_geometry`). ``meta`` says how the
    features were made (model, layer, streams, preprocessing, cache key). ``from_cache`` is True when the
    features were read from a cache file rather than computed. Cosine maps use an in-memory copy of the
    features normalised to unit length in float32 (made on first use: 4 bytes × D·C·h·w).
    """

    array: np.ndarray
    image_geometry: dict
    patch_size: int = 16
    meta: dict = field(default_factory=dict)
    from_cache: bool = False
    path: Path | None = None
    _unit: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.array.ndim != 4:
            raise DinomedError(f"features must be (D, C, h, w), found shape {self.array.shape}")
        expected = feature_grid_geometry(self.image_geometry, self.patch_size)["size"]
        found = [self.array.shape[3], self.array.shape[2], self.array.shape[0]]
        if found != expected:
            raise DinomedError(
                f"features of shape {self.array.shape} (D, C, h, w) do not fit the feature grid {expected} (x, y, z) "
                f"of an image of size {self.image_geometry['size']} with patch size {self.patch_size}"
            )

    @classmethod
    def from_array(cls, array: np.ndarray, image: sitk.Image | dict, patch_size: int = 16, meta: dict | None = None):
        """Features given as an array ``(D, C, h, w)`` for ``image`` (an image or its geometry dict)."""
        geometry = geometry_of(image) if isinstance(image, sitk.Image) else dict(image)
        return cls(np.asarray(array, dtype=np.float16), geometry, patch_size, dict(meta or {}))

    # ---- geometry ------------------------------------------------------------------------------------
    @property
    def grid(self) -> dict:
        return feature_grid_geometry(self.image_geometry, self.patch_size)

    @property
    def channels(self) -> int:
        return int(self.array.shape[1])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(D, h, w): the feature grid in array order."""
        d, _, h, w = self.array.shape
        return d, h, w

    def voxel_index(self, point: Sequence[float], point_space: str = "index") -> np.ndarray:
        """The image voxel index (x, y, z integers) of ``point`` given as a voxel index (x, y, z; fractional
        values are rounded) or as physical millimetres in LPS (SimpleITK, DICOM) or RAS (Slicer's display)."""
        if point_space not in POINT_SPACES:
            raise DinomedError(f"unknown point space {point_space!r}; expected one of {POINT_SPACES}")
        values = np.asarray(point, dtype=np.float64).ravel()
        if values.shape != (3,) or not np.all(np.isfinite(values)):
            raise DinomedError(f"a point is three finite numbers (x, y, z), found {list(np.asarray(point).ravel())}")
        if point_space == "ras":
            values = values * np.array([-1.0, -1.0, 1.0])
        index = values if point_space == "index" else physical_to_index(self.image_geometry, values)
        voxel = np.floor(index + 0.5).astype(np.int64)
        size = np.asarray(self.image_geometry["size"])
        if np.any(voxel < 0) or np.any(voxel >= size):
            shown = ", ".join(f"{v:.6g}" for v in np.asarray(point, dtype=float).ravel())
            raise DinomedError(
                f"the point ({shown}) given as {point_space} is voxel index {tuple(int(v) for v in voxel)} (x, y, z), "
                f"outside the image of size {tuple(int(s) for s in size)}"
            )
        return voxel

    def feature_index(self, point: Sequence[float], point_space: str = "index") -> tuple[int, int, int]:
        """The feature grid position ``(k, r, c)`` (z, y, x array order) of the patch holding ``point``."""
        x, y, z = self.voxel_index(point, point_space)
        return int(z), int(y // self.patch_size), int(x // self.patch_size)

    # ---- similarity ----------------------------------------------------------------------------------
    def unit_features(self):
        """The features as unit vectors, float32 torch ``(D, C, h·w)`` (computed once, kept in memory)."""
        if self._unit is None:
            import torch

            d, c, h, w = self.array.shape
            unit = torch.empty((d, c, h * w), dtype=torch.float32)
            source = torch.from_numpy(np.ascontiguousarray(self.array).reshape(d, c, h * w))
            for start in range(0, d, 16):
                chunk = unit[start:start + 16]
                chunk.copy_(source[start:start + 16])
                chunk.div_(torch.linalg.vector_norm(chunk, dim=1, keepdim=True).clamp_min_(1e-12))
            self._unit = unit
        return self._unit

    def similarity(self, index: tuple[int, int, int], mode: str = "2d", outside: float = float("nan")) -> np.ndarray:
        """Cosine similarity ``(D, h, w)`` float32 between the feature at ``index`` (k, r, c) and every position.

        ``mode="3d"``: every slice; ``mode="2d"``: the reference slice only, the other slices are ``outside``
        (NaN by default: not computed). A position whose feature is all zero has similarity 0. The value at
        the reference position is 1 (up to float32 rounding); values are clipped to [-1, 1].
        """
        import torch

        if mode not in ("2d", "3d"):
            raise DinomedError(f"unknown similarity mode {mode!r}; expected 2d or 3d")
        d, h, w = self.shape
        k, r, c = index
        if not (0 <= k < d and 0 <= r < h and 0 <= c < w):
            raise DinomedError(f"feature index {index} (z, y, x) outside the feature grid {(d, h, w)}")
        unit = self.unit_features()
        query = unit[k, :, r * w + c].contiguous()  # a strided query vector makes the product ten times slower
        if mode == "3d":
            # one batched (1×C)·(C×hw) product per slice, over the whole volume at once
            out = torch.bmm(query.view(1, 1, -1).expand(d, 1, -1), unit)
            result = out.clamp_(-1.0, 1.0).reshape(d, h, w).numpy()
        else:
            result = np.full((d, h, w), outside, dtype=np.float32)
            result[k] = torch.matmul(query, unit[k]).clamp_(-1.0, 1.0).reshape(h, w).numpy()
        return result

    # ---- cache files ---------------------------------------------------------------------------------
    def describe(self, array_name: str) -> dict:
        """The JSON sidecar of the cache (see ``dinomed.features``)."""
        d, c, h, w = self.array.shape
        return {
            "format": CACHE_FORMAT,
            "array": array_name,
            "shape": [d, c, h, w],
            "dtype": "float16",
            "axes": ["z", "channel", "y", "x"],
            "patch_size": self.patch_size,
            "grid": self.grid,
            "image": self.image_geometry,
            **{k: v for k, v in self.meta.items() if k not in ("format", "array", "shape", "dtype", "axes", "grid", "image")},
        }

    def save(self, json_path: str | Path) -> Path:
        """Write ``<stem>.npy`` (float16) then ``<stem>.json`` beside it, each atomically; the JSON is written
        last, so a cache entry whose JSON exists is complete."""
        json_path = Path(json_path)
        npy_path = json_path.with_suffix(".npy")
        with atomic_path(npy_path, suffix=".npy") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(self.array, dtype=np.float16))
        atomic_write_text(json_path, json.dumps(self.describe(npy_path.name), indent=2) + "\n")
        self.path = json_path
        return json_path

    @classmethod
    def load(cls, json_path: str | Path, mmap: bool = False) -> "FeatureVolume":
        """Read a cache entry (the JSON sidecar and its ``.npy``), checking that they fit each other."""
        json_path = Path(json_path)
        info = read_json_object(json_path, missing="no such feature file")
        if info.get("format") != CACHE_FORMAT:
            raise DinomedError(f"{json_path}: expected a {CACHE_FORMAT!r} feature file, found format {info.get('format')!r}")
        npy_path = json_path.parent / info["array"]
        try:
            array = np.load(npy_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DinomedError(f"{npy_path}: cannot read the feature array ({exc})") from None
        if list(array.shape) != list(info["shape"]) or array.dtype != np.float16:
            raise DinomedError(
                f"{npy_path}: expected a float16 array of shape {info['shape']}, found {array.dtype} {list(array.shape)}"
            )
        meta = {k: v for k, v in info.items() if k not in ("format", "array", "shape", "dtype", "axes", "grid", "image", "patch_size")}
        volume = cls(array, info["image"], int(info["patch_size"]), meta)
        volume.from_cache, volume.path = True, json_path
        return volume
