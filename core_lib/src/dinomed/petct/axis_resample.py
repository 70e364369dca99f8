"""Resampling between grids that share their axes: separable, slab by slab, without SimpleITK's per-voxel work.

A PET resampled onto its CT, a CT onto the model's coarser grid and the labels back onto the CT all map grids with
the same direction matrix onto each other, so the continuous index of an output voxel along one axis depends on
its index along that axis only: linear interpolation is a product of three 1D linear interpolations (computed
axis by axis, in float32 from the input's values) and nearest neighbour a gather along each axis. Measured on
2 threads, a 198x228x166 PET onto a 512x512x300 CT: SimpleITK's ``Resample`` 1.3 s, this 0.3-0.4 s (README,
measured figures).

Same conventions as ITK's ``ResampleImageFilter`` with ``LinearInterpolateImageFunction`` /
``NearestNeighborInterpolateImageFunction`` and an identity transform:

* an output voxel whose continuous index ``c`` lies outside ``[-0.5, size - 0.5)`` along any axis (outside the
  input's voxel extents) gets the default value;
* linear: inside that range, ``c`` is clamped to ``[0, size - 1]`` (the border half-voxel takes the edge value),
  weights in float64, products and sums in float32 (SimpleITK sums in float64: the results differ in the last
  bits, about 1e-7 relative);
* nearest: the index ``floor(c + 0.5)`` (ITK rounds half up).

The continuous indices are computed per axis in float64 from the two grids' origins and spacings; ITK computes
them from the full index-to-physical matrices. The two agree to about 1e-12 voxel, so they can differ only for an
output voxel centre that lies exactly on a tie (a nearest-neighbour half-way point or the field-of-view edge);
the tests compare with ``sitk.Resample`` voxel by voxel.

:func:`resample_axis_aligned` returns None when the fast path does not apply (different directions, not 3D,
vector pixels, another interpolator); callers then use ``sitk.Resample``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import SimpleITK as sitk

from ..io.volumes import writable_array

DIRECTION_TOL = 1e-6  # direction cosines this close count as the same axes
SLAB_VOXELS = 1 << 20  # output voxels per slab (4 MB of float32): slabs fill both cores and stay in cache


def axis_indices(image: sitk.Image, reference: sitk.Image) -> list[np.ndarray] | None:
    """For each axis (x, y, z) of ``reference``, the continuous index in ``image`` of every reference voxel along
    it (float64), or None when the two grids do not share their axes (direction matrices differ)."""
    if image.GetDimension() != 3 or reference.GetDimension() != 3:
        return None
    d_in = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    d_out = np.asarray(reference.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(d_in, d_out, atol=DIRECTION_TOL, rtol=0.0):
        return None
    # c = S_in^-1 D^T (o_out + D S_out i - o_in) = D^T (o_out - o_in) / s_in + i s_out / s_in, axis by axis
    shift = d_in.T @ (np.asarray(reference.GetOrigin(), dtype=float) - np.asarray(image.GetOrigin(), dtype=float))
    s_in = np.asarray(image.GetSpacing(), dtype=float)
    s_out = np.asarray(reference.GetSpacing(), dtype=float)
    return [(shift[a] + np.arange(reference.GetSize()[a], dtype=float) * s_out[a]) / s_in[a] for a in range(3)]


def _inside(c: np.ndarray, size: int) -> slice:
    """The output indices along one axis whose continuous index lies in ``[-0.5, size - 0.5)`` (a contiguous range:
    ``c`` increases with the index)."""
    inside = np.flatnonzero((c >= -0.5) & (c < size - 0.5))
    return slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0)


def _linear_weights(c: np.ndarray, size: int):
    c = np.clip(c, 0.0, size - 1)
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, size - 1)
    return i0, i1, (c - i0).astype(np.float32)


def _lerp_last(a: np.ndarray, i0, i1, w) -> np.ndarray:
    """Linear interpolation along the last axis of ``a`` (float32 result)."""
    lo = a[..., i0].astype(np.float32, copy=False)
    hi = a[..., i1].astype(np.float32, copy=False)
    hi -= lo
    hi *= w
    hi += lo
    return hi


def _lerp_rows(block: np.ndarray, i0, i1, w) -> np.ndarray:
    """Linear interpolation along the rows (axis 1) of ``(z, y, x)``: whole rows gathered (float32 result)."""
    a = np.take(block, i0, axis=1).astype(np.float32, copy=False)
    b = np.take(block, i1, axis=1).astype(np.float32, copy=False)
    b -= a
    b *= w[:, None]
    b += a
    return b


def resample_axis_aligned(image: sitk.Image, reference: sitk.Image, interpolator: str, default_value: float = 0.0,
                          pixel_type: int | None = None, threads: int | None = None) -> sitk.Image | None:
    """``image`` on ``reference``'s grid (``interpolator``: ``linear`` or ``nearest``), as ``sitk.Resample(image,
    reference, sitk.Transform(), …, default_value, pixel_type)`` would give it; None when the grids do not share
    their axes or the image is not a scalar 3D volume (use ``sitk.Resample`` then). ``pixel_type``: the output
    type (default: the input's). ``threads``: slabs computed in parallel (default: SimpleITK's global default)."""
    if interpolator not in ("linear", "nearest") or image.GetNumberOfComponentsPerPixel() != 1:
        return None
    cs = axis_indices(image, reference)
    if cs is None:
        return None
    pixel_type = image.GetPixelID() if pixel_type is None else pixel_type
    out_dtype = sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], pixel_type)).dtype
    if interpolator == "linear" and np.issubdtype(out_dtype, np.integer):
        return None  # ITK's cast of interpolated values to integers is not reproduced here
    source = sitk.GetArrayViewFromImage(image)  # (z, y, x)
    nz, ny, nx = source.shape
    result = sitk.Image(reference.GetSize(), pixel_type)  # zero-filled; written in place (one volume, not two)
    result.CopyInformation(reference)
    out = writable_array(result)
    if default_value != 0:
        out[...] = default_value
    inside = [_inside(cs[0], nx), _inside(cs[1], ny), _inside(cs[2], nz)]
    if any(s.stop <= s.start for s in inside):
        return result
    cx, cy, cz = (c[s] for c, s in zip(cs, inside))
    target = out[inside[2], inside[1], inside[0]]  # a view: slabs are written into it
    if interpolator == "nearest":
        ix, iy, iz = (np.floor(c + 0.5).astype(np.intp) for c in (cx, cy, cz))

        def slab(z0: int, z1: int) -> None:
            target[z0:z1] = source[iz[z0:z1]][:, iy][:, :, ix]
    else:
        wx, wy, wz = _linear_weights(cx, nx), _linear_weights(cy, ny), _linear_weights(cz, nz)
        rows_first = cy.size < ny

        def slab(z0: int, z1: int) -> None:
            lo, hi = int(wz[0][z0]), int(wz[1][z1 - 1]) + 1  # the input slices this slab reads
            block = source[lo:hi]
            if rows_first:  # fewer rows out than in: gather the rows first, the columns of fewer rows after
                block = _lerp_rows(block, *wy)
                b = _lerp_last(block, *wx)
            else:
                b = _lerp_rows(_lerp_last(block, *wx), *wy)  # b: the slab's input slices, in-plane done
            for k in range(z0, z1):  # along z, straight into the output
                out_k, first, second = target[k], b[wz[0][k] - lo], b[wz[1][k] - lo]
                np.subtract(second, first, out=out_k)
                out_k *= wz[2][k]
                out_k += first

    depth = target.shape[0]
    step = max(1, SLAB_VOXELS // max(1, target.shape[1] * target.shape[2]))
    starts = range(0, depth, step)
    workers = threads or sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:  # numpy releases the GIL in take and arithmetic
            list(pool.map(lambda z0: slab(z0, min(depth, z0 + step)), starts))
    else:
        for z0 in starts:
            slab(z0, min(depth, z0 + step))
    return result


def field_of_view_box(image: sitk.Image, reference: sitk.Image) -> sitk.Image | None:
    """The uint8 mask on ``reference``'s grid of the voxel centres inside ``image``'s voxel extents, for grids that
    share their axes (a box: three index ranges); None otherwise."""
    cs = axis_indices(image, reference)
    if cs is None:
        return None
    result = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    result.CopyInformation(reference)
    sx, sy, sz = (_inside(c, n) for c, n in zip(cs, image.GetSize()))
    writable_array(result)[sz, sy, sx] = 1
    return result
