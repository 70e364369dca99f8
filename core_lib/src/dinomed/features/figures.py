"""PNG figures of feature maps as in the papers: the image, the PCA map, the similarity map with the point in red."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_path


def _display_slice(image: sitk.Image, k: int, modality: str) -> tuple[np.ndarray, dict]:
    """One axial slice and its grey-scale settings: CT in a soft-tissue window (W 400, L 40), PET inverted
    (black is hot) up to the 99.5th percentile of the slice."""
    array = sitk.GetArrayViewFromImage(image)[k].astype(np.float32)
    if modality.upper() == "PET":
        top = float(np.percentile(array, 99.5)) or 1.0
        return array, {"cmap": "gray_r", "vmin": 0.0, "vmax": top}
    return array, {"cmap": "gray", "vmin": -160.0, "vmax": 240.0}


def save_feature_figures(
    folder: str | Path,
    image: sitk.Image,
    slice_index: int,
    modality: str = "CT",
    pca: sitk.Image | None = None,
    cosine: sitk.Image | None = None,
    point_voxel: Sequence[int] | None = None,
    prefix: str = "features_",
    title: str = "",
) -> list[Path]:
    """Write ``<prefix>image.png``, ``<prefix>pca.png``, ``<prefix>cosine.png`` (those given) and
    ``<prefix>panel.png`` (all side by side) for axial slice ``slice_index``; the reference point (x, y, z voxel)
    is a red cross. Pixels are shown with the in-plane spacing's aspect ratio. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    sx, sy = image.GetSpacing()[:2]
    aspect = sy / sx
    grey, grey_kw = _display_slice(image, slice_index, modality)
    panels: list[tuple[str, str]] = [("image", f"{modality} slice {slice_index}")]
    if pca is not None:
        panels.append(("pca", "PCA of patch features (RGB = PC 1-3)"))
    if cosine is not None:
        panels.append(("cosine", "cosine similarity to the red point"))

    def draw(ax, kind):
        ax.set_axis_off()
        if kind == "image":
            ax.imshow(grey, aspect=aspect, interpolation="nearest", **grey_kw)
            return None
        if kind == "pca":
            ax.imshow(sitk.GetArrayViewFromImage(pca)[slice_index], aspect=aspect, interpolation="nearest")
            return None
        values = sitk.GetArrayViewFromImage(cosine)[slice_index]
        finite = values[np.isfinite(values)]
        # the colour range starts at the slice's 2nd percentile: similarities often all lie well above -1
        low = float(np.clip(np.percentile(finite, 2), -1.0, 0.99)) if finite.size else -1.0
        ax.imshow(grey, aspect=aspect, interpolation="nearest", **grey_kw)
        shown = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=low, vmax=1.0, alpha=0.85,
                          aspect=aspect, interpolation="nearest")
        if point_voxel is not None:
            ax.plot([point_voxel[0]], [point_voxel[1]], marker="x", color="red", markersize=12, markeredgewidth=3)
            ax.plot([point_voxel[0]], [point_voxel[1]], marker="o", markerfacecolor="none", color="red", markersize=16,
                    markeredgewidth=1.5)
        return shown

    written: list[Path] = []

    def save(fig, name):
        path = folder / f"{prefix}{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        plt.close(fig)
        written.append(path)

    for kind, label in panels:
        fig, ax = plt.subplots(figsize=(4.2, 4.2 * aspect * grey.shape[0] / grey.shape[1] + 0.4))
        shown = draw(ax, kind)
        ax.set_title(label, fontsize=9)
        if shown is not None:
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        save(fig, kind)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2 * aspect * grey.shape[0] / grey.shape[1] + 0.6))
    axes = np.atleast_1d(axes)
    for ax, (kind, label) in zip(axes, panels):
        shown = draw(ax, kind)
        ax.set_title(label, fontsize=9)
        if shown is not None:
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    save(fig, "panel")
    return written
