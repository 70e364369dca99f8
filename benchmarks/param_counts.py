"""Parameter counts of every seed model at ViT-S/B/L (default configs), beside the paper's figure where it gives one.

Models are built on PyTorch's 'meta' device (no memory, no weights needed):

    python benchmarks/param_counts.py [--markdown]

"total" counts every parameter, "trainable" those with requires_grad (frozen backbones and LoRA-only training
show here). num_classes is 2 (background + lesion); the head's share is negligible.
"""
from __future__ import annotations

import argparse
import sys

import torch

from dinomed.models import build_model

SIZES = ("vit_small", "vit_base", "vit_large")
# (label, architecture config without backbone, paper figures in millions per size or None)
MODELS = [
    ("meddinov3", {"name": "meddinov3", "in_chans": 1}, None),
    ("slicewise3d (frozen, 3D decoder)", {"name": "slicewise3d", "in_chans": 1}, None),
    ("slicewise3d head=linear", {"name": "slicewise3d", "in_chans": 1, "head": "linear"}, None),
    ("linear_probe (2D)", {"name": "linear_probe", "in_chans": 1}, None),
    ("dinomed3d stage I", {"name": "dinomed3d", "in_chans": 1, "stage": 1}, None),
    ("dinomed3d stage II", {"name": "dinomed3d", "in_chans": 1, "stage": 2}, (47, 112, 334)),
    ("dual_petct dual", {"name": "dual_petct", "variant": "dual"}, None),
    ("dual_petct pet_only", {"name": "dual_petct", "variant": "pet_only"}, None),
    ("dual_petct early_fusion", {"name": "dual_petct", "variant": "early_fusion"}, None),
]


def count(cfg: dict) -> tuple[int, int]:
    with torch.device("meta"):
        model = build_model(cfg, load_checkpoints=False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    header = ["model"] + [f"{s.split('_')[1][0].upper()} total / trainable (M)" for s in SIZES] + ["paper (M)"]
    rows = []
    for label, base, paper in MODELS:
        cells = [label]
        for size in SIZES:
            total, trainable = count({**base, "backbone": size, "num_classes": 2})
            cells.append(f"{total / 1e6:.1f} / {trainable / 1e6:.1f}" if trainable >= 5e4 else
                         f"{total / 1e6:.1f} / {trainable / 1e6:.4f}")
        cells.append(" / ".join(str(p) for p in paper) if paper else "-")
        rows.append(cells)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        for r in [header] + rows:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
