"""Picture of a synthetic PET/CT phantom: CT, PET (SUV) and labels side by side, a coronal and axial slices.

    python scripts/phantom_figure.py --seed 7 --shape 160,192,192 --out Resources/Screenshots/phantom.png

The PET is shown after resampling onto the CT grid (dinomed.petct.resample_to_reference), as a viewer would.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core_lib" / "src"))
from dinomed.atomic import atomic_path  # noqa: E402
from dinomed.petct import resample_to_reference  # noqa: E402
from dinomed.synthetic import ORGAN_LABELS, make_phantom  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--shape", default="160,192,192", help="CT size z,y,x")
    parser.add_argument("--out", default="Resources/Screenshots/phantom.png")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    t0 = time.perf_counter()
    phantom = make_phantom(args.seed, shape=shape)
    elapsed = time.perf_counter() - t0
    ct = sitk.GetArrayFromImage(phantom.ct).astype(np.float32)
    pet = sitk.GetArrayFromImage(resample_to_reference(phantom.pet, phantom.ct))
    labels = sitk.GetArrayFromImage(phantom.labels)
    sx, _, sz = phantom.ct.GetSpacing()

    colors = np.zeros((max(e["value"] for e in ORGAN_LABELS) + 1, 4))
    for entry in ORGAN_LABELS:
        colors[entry["value"]] = [*(np.array(entry["color"]) / 255.0), 1.0]
    label_cmap = ListedColormap(colors)

    # axial slices through lesions when there are any, else through the middle
    lesion_z = [les.center_index[2] for les in phantom.lesion_list if 0 <= les.center_index[2] < shape[0]]
    picks = sorted(set(lesion_z))[:3] or [shape[0] // 2]
    while len(picks) < 3:
        picks.append(int(np.linspace(0.2, 0.8, 3)[len(picks)] * shape[0]))
    yc = int(np.argmax((labels > 0).sum(axis=(0, 2)))) if labels.any() else shape[1] // 2

    views = [("coronal", lambda a: a[::-1, yc, :], sz / sx)] + [
        (f"axial z={k}", (lambda kk: (lambda a: a[kk]))(k), 1.0) for k in picks
    ]
    fig, axes = plt.subplots(len(views), 3, figsize=(11, 3.6 * len(views)))
    for row, (title, cut, aspect) in enumerate(views):
        ax_ct, ax_pet, ax_lab = axes[row]
        ax_ct.imshow(cut(ct), cmap="gray", vmin=-400, vmax=600, aspect=aspect)
        ax_pet.imshow(cut(pet), cmap="gray_r", vmin=0, vmax=6, aspect=aspect)
        ax_lab.imshow(cut(ct), cmap="gray", vmin=-400, vmax=600, aspect=aspect)
        lab = np.ma.masked_equal(cut(labels), 0)
        ax_lab.imshow(lab, cmap=label_cmap, vmin=0, vmax=len(colors) - 1, alpha=0.6, aspect=aspect, interpolation="nearest")
        ax_ct.set_ylabel(title)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("CT (HU, W 1000 L 100)")
    axes[0][1].set_title("PET (SUV 0-6), resampled onto CT")
    axes[0][2].set_title("labels (lesion red)")
    kinds = ", ".join(f"{les.kind} {les.diameter_mm:.0f} mm" for les in phantom.lesion_list)
    fig.suptitle(f"dinomed synthetic PET/CT phantom, seed {args.seed}, CT {shape[::-1]} voxels (x,y,z), "
                 f"PET {phantom.pet.GetSize()}\nlesions: {kinds}", fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    print(f"wrote {out} (phantom built in {elapsed:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
