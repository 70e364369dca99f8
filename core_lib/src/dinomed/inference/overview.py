"""An overview figure of a PET/CT segmentation: for a few axial slices, the CT, the PET fused over the CT, and
the segmentation's contours over the CT (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_path

CT_WINDOW = (-160.0, 240.0)  # soft-tissue window (level 40, width 400 HU)


def pick_slices(labels: np.ndarray, lesion_values: list[int], count: int = 4) -> list[int]:
    """Axial slices worth showing: the slices with the most lesion voxels (spread apart), filled up with evenly
    spaced slices through the labelled range."""
    nz = labels.shape[0]
    count = min(count, nz)
    lesion = np.isin(labels, lesion_values).sum(axis=(1, 2)) if lesion_values else np.zeros(nz)
    chosen: list[int] = []
    min_gap = max(1, nz // (2 * count))
    for z in np.argsort(-lesion, kind="stable"):
        if lesion[z] == 0 or len(chosen) >= (count + 1) // 2:
            break
        if all(abs(int(z) - c) >= min_gap for c in chosen):
            chosen.append(int(z))
    labelled = np.flatnonzero(labels.any(axis=(1, 2)))
    lo, hi = (int(labelled[0]), int(labelled[-1])) if labelled.size else (0, nz - 1)
    for z in np.linspace(lo, hi, count + 2)[1:-1].round().astype(int):
        if len(chosen) >= count:
            break
        if all(abs(int(z) - c) >= min_gap for c in chosen):
            chosen.append(int(z))
    return sorted(chosen)


def write_overview_png(
    path: str | os.PathLike,
    ct: sitk.Image,
    labels: sitk.Image,
    label_entries: list[dict],
    pet_on_ct: sitk.Image | None = None,
    slices: list[int] | None = None,
    title: str = "",
    suv_max: float = 8.0,
) -> Path:
    """Write the overview PNG: one row per axial slice; columns CT, PET/CT fusion (when a PET is given) and the
    segmentation contours over the CT, coloured as ``label_entries`` (model.json labels) say."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ct_a = sitk.GetArrayViewFromImage(ct)
    lab_a = sitk.GetArrayViewFromImage(labels)
    pet_a = sitk.GetArrayViewFromImage(pet_on_ct) if pet_on_ct is not None else None
    lesion_values = [int(e["value"]) for e in label_entries if e.get("lesion")]
    slices = slices if slices is not None else pick_slices(np.asarray(lab_a), lesion_values)
    sx, sy = ct.GetSpacing()[:2]
    aspect = sy / sx
    columns = ["CT"] + (["PET/CT (SUV)"] if pet_a is not None else []) + ["segmentation"]
    fig, axes = plt.subplots(len(slices), len(columns), figsize=(3.2 * len(columns), 3.2 * len(slices)), squeeze=False)
    present = set(np.unique(lab_a).tolist())
    for row, z in enumerate(slices):
        for col, name in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(ct_a[z], cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], aspect=aspect, interpolation="nearest")
            if name.startswith("PET"):
                pet = np.ma.masked_less(pet_a[z], 0.3)
                ax.imshow(pet, cmap="hot", vmin=0.0, vmax=suv_max, alpha=0.6, aspect=aspect, interpolation="bilinear")
            elif name == "segmentation":
                for entry in label_entries:
                    value = int(entry["value"])
                    mask = lab_a[z] == value
                    if mask.any():
                        colour = np.asarray(entry.get("color", [255, 255, 0])) / 255.0
                        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"slice {z}", fontsize=9)
    handles = [Line2D([0], [0], color=np.asarray(e.get("color", [255, 255, 0])) / 255.0, lw=2, label=e["name"])
               for e in label_entries if int(e["value"]) in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04 if handles else 0, 1, 0.97 if title else 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
