"""Feature maps for people: PCA of the patch features as RGB, and cosine similarity to a chosen point.

Both are the pictures of the MedDINOv3 paper (PCA of dense features masked to the body; similarity of a
marked patch to all others) and of the DINOv3 medical benchmark. Maps are computed on the feature grid
and upsampled (bilinear in-plane, slices unchanged) onto the image grid, so every output carries the
image's origin, spacing and direction exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import DinomedError, InputImageError
from .volume import FeatureVolume, geometry_of, image_from_geometry

CT_BODY_HU = -500.0
PET_BODY_SUV = 0.3


def _same_grid(a: dict, b: dict, tol: float = 1e-4) -> bool:
    return a["size"] == b["size"] and all(
        np.allclose(a[k], b[k], atol=tol) for k in ("origin", "spacing", "direction")
    )


def body_mask(image: sitk.Image, modality: str | None = None) -> np.ndarray:
    """The patient's body as a boolean ``(z, y, x)`` array: CT > -500 HU (or PET > 0.3 SUV), the largest
    3D connected component, holes filled slice by slice (lungs and bowel gas are inside the body).

    ``modality`` (CT or PET) picks the threshold; by default an image with values below -200 is a CT.
    """
    array = sitk.GetArrayViewFromImage(image)
    if modality is None:
        modality = "CT" if float(np.nanmin(array)) < -200 else "PET"
    modality = modality.upper()
    if modality not in ("CT", "PET"):
        raise DinomedError(f"unknown modality {modality!r} for a body mask; expected CT or PET")
    inside = array > (CT_BODY_HU if modality == "CT" else PET_BODY_SUV)
    labels, count = ndimage.label(inside)
    if count == 0:
        return inside
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body


def mask_to_feature_grid(mask: np.ndarray, patch_size: int, grid_shape: tuple[int, int, int]) -> np.ndarray:
    """A voxel mask ``(D, H, W)`` on the feature grid ``(D, h, w)``: a patch is in when at least half of its
    voxels are (padding counts as out)."""
    d, h, w = grid_shape
    padded = np.zeros((d, h * patch_size, w * patch_size), dtype=np.float32)
    padded[:, :mask.shape[1], :mask.shape[2]] = mask
    fraction = padded.reshape(d, h, patch_size, w, patch_size).mean(axis=(2, 4))
    return fraction >= 0.5


def upsample_to_image(maps: np.ndarray, features: FeatureVolume, out_dtype=np.float32) -> np.ndarray:
    """Maps on the feature grid, ``(D, h, w)`` or ``(D, K, h, w)``, on the image grid ``(D, H, W[, K])``
(``D`` may be a subset of the slices).

    Bilinear in-plane with pixel centres aligned as the feature grid geometry says (``align_corners=False``,
    scale = patch size, edges clamped), the slices unchanged; done a few slices at a time. NaN stays NaN.
    """
    import torch
    import torch.nn.functional as F

    width, height, _ = features.image_geometry["size"]
    depth = maps.shape[0]
    p = features.patch_size
    stacked = maps.ndim == 4
    source = maps if stacked else maps[:, None]
    k = source.shape[1]
    out = np.empty((depth, height, width, k) if stacked else (depth, height, width), dtype=out_dtype)
    step = max(1, int(2**24 // max(1, height * width * k)))
    for start in range(0, depth, step):
        chunk = torch.from_numpy(np.ascontiguousarray(source[start:start + step], dtype=np.float32))
        up = F.interpolate(chunk, scale_factor=p, mode="bilinear", align_corners=False)[..., :height, :width]
        up = up.permute(0, 2, 3, 1).numpy() if stacked else up[:, 0].numpy()
        out[start:start + step] = up
    return out


def _foreground(features: FeatureVolume, mask, image: sitk.Image | None, modality: str | None):
    """(mask on the feature grid, mask on the image grid or None) from a user mask, the image, or nothing."""
    d, h, w = features.shape
    size = features.image_geometry["size"]
    voxels = None
    if mask is not None:
        if isinstance(mask, sitk.Image):
            if not _same_grid(geometry_of(mask), features.image_geometry):
                raise InputImageError(
                    f"the mask's grid {geometry_of(mask)} differs from the image's {features.image_geometry}; "
                    "resample the mask onto the image first"
                )
            mask = sitk.GetArrayViewFromImage(mask)
        mask = np.asarray(mask) > 0
        if mask.shape == (d, h, w):
            return mask, None
        if mask.shape != (size[2], size[1], size[0]):
            raise InputImageError(
                f"a mask of shape {mask.shape} fits neither the image (z, y, x) {(size[2], size[1], size[0])} "
                f"nor the feature grid {(d, h, w)}"
            )
        voxels = mask
    elif image is not None:
        if not _same_grid(geometry_of(image), features.image_geometry):
            raise InputImageError("the image given for the body mask is not on the grid the features were computed on")
        voxels = body_mask(image, modality)
    if voxels is None:
        return np.ones((d, h, w), dtype=bool), None
    return mask_to_feature_grid(voxels, features.patch_size, (d, h, w)), voxels


def pca_components(features: FeatureVolume, foreground: np.ndarray, n_components: int = 3,
                   max_samples: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(C,)`` and the first principal axes ``(n, C)`` of the features at the ``foreground`` positions
    (eigenvectors of their covariance, largest first; each axis's sign makes its largest loading positive)."""
    d, h, w = features.shape
    positions = np.flatnonzero(foreground.ravel())
    if positions.size < 2:
        raise DinomedError(f"PCA needs at least 2 foreground patches, found {positions.size}; check the mask")
    if positions.size > max_samples:
        positions = np.sort(np.random.default_rng(seed).choice(positions, max_samples, replace=False))
    k, rest = np.divmod(positions, h * w)
    sample = features.array.reshape(d, features.channels, h * w)[k, :, rest].astype(np.float64)  # (N, C)
    mean = sample.mean(axis=0)
    centred = sample - mean
    cov = centred.T @ centred / max(1, len(centred) - 1)
    values, vectors = np.linalg.eigh(cov)
    axes = vectors[:, ::-1][:, :n_components].T.copy()
    for axis in axes:
        if axis[np.argmax(np.abs(axis))] < 0:
            axis *= -1
    if axes.shape[0] < n_components:  # fewer channels than components: pad with zero axes
        axes = np.vstack([axes, np.zeros((n_components - axes.shape[0], axes.shape[1]))])
    return mean.astype(np.float32), axes.astype(np.float32)


def pca_rgb(
    features: FeatureVolume,
    mask: sitk.Image | np.ndarray | None = None,
    image: sitk.Image | None = None,
    modality: str | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
    resolution: str = "image",
) -> sitk.Image:
    """The first three principal components of the features as an RGB vector volume (3 × uint8).

    The PCA is fit on foreground patches only: ``mask`` (a label image on the image grid, or a boolean array
    on the image or the feature grid), else the body of ``image`` (:func:`body_mask`; ``modality`` picks the
    threshold), else every patch. Each component is scaled to [0, 255] between its ``percentiles`` over the
    foreground (robust to outliers); background is black. ``resolution="image"`` returns the map upsampled
    onto the image grid (bilinear, the voxel mask applied at full resolution when there is one);
    ``"feature"`` returns it on the feature grid.
    """
    if resolution not in ("image", "feature"):
        raise DinomedError(f"unknown resolution {resolution!r}; expected image or feature")
    fg, voxels = _foreground(features, mask, image, modality)
    if not fg.any():
        raise DinomedError("the foreground mask holds no patch of the feature grid; check the mask or the image intensities")
    mean, axes = pca_components(features, fg)
    d, h, w = features.shape
    comps = np.empty((d, 3, h, w), dtype=np.float32)
    flat = features.array.reshape(d, features.channels, h * w)
    for start in range(0, d, 16):
        chunk = flat[start:start + 16].astype(np.float32) - mean[None, :, None]
        comps[start:start + 16] = np.einsum("nc,dcp->dnp", axes, chunk).reshape(-1, 3, h, w)
    scaled = np.empty_like(comps)
    for i in range(3):
        values = comps[:, i][fg]
        lo, hi = np.percentile(values, percentiles)
        scaled[:, i] = np.clip((comps[:, i] - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if resolution == "feature":
        rgb = np.round(scaled.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
        rgb[~fg] = 0
        return image_from_geometry(rgb, features.grid, is_vector=True)
    width, height, depth = features.image_geometry["size"]
    rgb = np.empty((depth, height, width, 3), dtype=np.uint8)
    step = 8  # upsample a few slices at a time: the float32 RGB of a whole volume would be 12 bytes a voxel
    for start in range(0, depth, step):
        stop = min(start + step, depth)
        chunk = np.round(upsample_to_image(scaled[start:stop], features) * 255.0).astype(np.uint8)
        if voxels is not None:
            inside = voxels[start:stop]
        else:
            p = features.patch_size
            inside = np.repeat(np.repeat(fg[start:stop], p, 1), p, 2)[:, :height, :width]
        chunk[~inside] = 0
        rgb[start:stop] = chunk
    return image_from_geometry(rgb, features.image_geometry, is_vector=True)


def cosine_map(
    features: FeatureVolume,
    point: Sequence[float],
    point_space: str = "index",
    mode: str = "2d",
    resolution: str = "image",
    outside: float = float("nan"),
) -> sitk.Image:
    """Cosine similarity (float32, in [-1, 1]) between the feature at ``point`` and the feature everywhere.

    ``point`` is (x, y, z): a voxel index of the image (``point_space="index"``, SimpleITK/ITK order, 0-based),
    or physical millimetres in LPS (``"lps"``: DICOM, SimpleITK, ITK) or in RAS (``"ras"``: what 3D Slicer
    shows). The reference feature is that of the patch holding the point's voxel; the similarity there is 1
    on the feature grid. ``mode="3d"`` compares with every slice; ``mode="2d"`` only with the point's slice,
    and the other slices hold ``outside`` (NaN by default: not computed). ``resolution="feature"`` returns the
    map on the feature grid; ``"image"`` upsamples it onto the image grid (bilinear in-plane, so the value at
    the point's voxel is interpolated and can be a little below 1).
    """
    if resolution not in ("image", "feature"):
        raise DinomedError(f"unknown resolution {resolution!r}; expected image or feature")
    index = features.feature_index(point, point_space)
    similarity = features.similarity(index, mode, outside)
    if resolution == "feature":
        return image_from_geometry(similarity, features.grid)
    if mode == "3d":
        return image_from_geometry(upsample_to_image(similarity, features), features.image_geometry)
    width, height, depth = features.image_geometry["size"]
    full = np.full((depth, height, width), outside, dtype=np.float32)
    full[index[0]] = upsample_to_image(similarity[index[0]:index[0] + 1], features)[0]
    return image_from_geometry(full, features.image_geometry)
