"""Parameter counts of every seed model at ViT-S/B/L (default configs), beside the paper's figure and the count of the
official code's modules where there is one. Nothing is tuned to land on them: our models are built with the widths
the papers and the official code use, and the counts follow.

    PYTHONPATH=core_lib/src python benchmarks/param_counts.py [--markdown]

Ours: models built on PyTorch's 'meta' device (no memory, no weights). "total" counts every parameter, "trainable"
those with requires_grad (frozen backbones and LoRA-only training show here). num_classes is 2.

Official: the parameters of the modules the official code builds, counted layer by layer from its published layer
list (no official code is run or copied here):
  * DINO-Med3D (github.com/HaoyuHu1/DINO-Med3D, models/stage2_model.py, models/backbone.py, configs/base.py): the DINOv3
    ViT (torch.hub dinov3_vit{s,b,l}16: qkv bias, a mask token, 4 storage tokens) with LoRA r16 on qkv/proj/fc1/fc2
    (``proj`` also matching the patch-embedding conv), Adapter3D, GatedFusion3D, UPerNet3DDecoder (its cls conv too),
    ResNetHighResEncoder (base 16), HighResRefinementDecoder.
  * MedDINOv3 (github.com/ricklisz/MedDINOv3, dinov3/models/primus.py Primus_Multiscale + PatchDecode, trainer
    meddinov3_base_primus_multiscale_Trainer: vit_base(qkv_bias=False, n_storage_tokens=4)).
Paper: DINO-Med3D Table 1 (47 / 112 / 334 M); the MedDINOv3 text we build from gives no count.
"""
from __future__ import annotations

import argparse
import sys

import torch

from dinomed.models import build_model

SIZES = {"vit_small": (384, 12), "vit_base": (768, 12), "vit_large": (1024, 24)}
NUM_CLASSES = 2


# ---------------------------------------------------------------------------------------------------------
# the official modules, counted


def dinov3_vit(e: int, depth: int, qkv_bias: bool = True) -> int:
    """Meta's DINOv3 ViT (RGB patch 16, cls + mask token + 4 storage tokens, LayerScale, final norm)."""
    patch = 3 * 16 * 16 * e + e
    tokens = e + e + 4 * e  # cls_token, mask_token, storage_tokens
    block = (2 * e  # norm1
             + 3 * e * e + (3 * e if qkv_bias else 0)  # qkv
             + e * e + e  # proj
             + e  # ls1
             + 2 * e  # norm2
             + 4 * e * e + 4 * e + 4 * e * e + e  # fc1, fc2
             + e)  # ls2
    return patch + tokens + depth * block + 2 * e


def lora(e: int, depth: int, r: int = 16) -> int:
    """peft LoRA r on qkv (E→3E), proj (E→E), fc1 (E→4E), fc2 (4E→E) of each block, and on patch_embed.proj
    (Conv2d 3→E, 16×16: A is a 16×16 conv 3→r, B a 1×1 conv r→E)."""
    per_block = r * ((e + 3 * e) + (e + e) + (e + 4 * e) + (4 * e + e))
    return depth * per_block + (3 * 16 * 16 * r + r * e)


def dinomed3d_official(e: int, depth: int, nc: int = NUM_CLASSES, c: int = 256, b: int = 16) -> int:
    k3 = 27
    adapter = 4 * (e * c + 1) + (c * c * 64 + c) + (c * c * 8 + c) + (c * c * k3 + c)  # 1x1+PReLU ×4, up4, up2, down2
    q = c // 4
    upernet = (4 * (c * q + q + 2 * q + 1)  # PPM branches: conv, GN, PReLU
               + ((c + c) * c * k3 + c + 2 * c + 1)  # ppm_last
               + 3 * (c * c + c + 2 * c + 1)  # fpn_in
               + 3 * (c * c * k3 + c + 2 * c + 1)  # fpn_out
               + (4 * c * c * k3 + c + 2 * c + 1)  # fusion
               + (c * nc + nc))  # cls
    gate = 2 * c * c + c
    hrse = (k3 * 1 * b  # stem
            + 2 * k3 * b * b  # layer1
            + (k3 * b * 2 * b + k3 * (2 * b) ** 2 + b * 2 * b)  # layer2_down
            + 2 * k3 * (2 * b) ** 2  # layer2_refine
            + (k3 * 2 * b * 4 * b + k3 * (4 * b) ** 2 + 2 * b * 4 * b)  # layer3_down
            + 2 * k3 * (4 * b) ** 2  # layer3_refine
            + (4 * b * 256 + 256))  # proj_c3
    refine = (k3 * (256 + 2 * b) * 64 + k3 * 64 * 64) + (k3 * (64 + b) * 32 + k3 * 32 * 32) + (32 * nc + nc)
    return dinov3_vit(e, depth) + lora(e, depth) + adapter + upernet + gate + hrse + refine


def dinomed3d_stage1_official(e: int, depth: int, nc: int = NUM_CLASSES) -> int:
    """Stage1Model: the DINOv3 ViT (K = 3 slices in its RGB patch embedding) + a 1x1 conv head."""
    return dinov3_vit(e, depth) + e * nc + nc


def meddinov3_official(e: int, depth: int, nc: int = NUM_CLASSES) -> int:
    ch = [4 * e]
    for _ in range(4):
        ch.append(ch[-1] // 2)
    decode = sum(ch[i] * ch[i + 1] * 4 + ch[i + 1] + 2 * ch[i + 1] for i in range(4)) + ch[-1] * nc + nc
    return dinov3_vit(e, depth, qkv_bias=False) + decode


# ---------------------------------------------------------------------------------------------------------
# (label, our architecture config without backbone, official count function or None, paper figures or None)
MODELS = [
    ("meddinov3", {"name": "meddinov3", "in_chans": 1}, meddinov3_official, None),
    ("meddinov3 decoder=progressive (option)", {"name": "meddinov3", "in_chans": 1, "decoder": "progressive"}, None, None),
    ("slicewise3d (frozen, 3D decoder)", {"name": "slicewise3d", "in_chans": 1}, None, None),
    ("slicewise3d head=linear", {"name": "slicewise3d", "in_chans": 1, "head": "linear"}, None, None),
    ("linear_probe (2D)", {"name": "linear_probe", "in_chans": 1}, None, None),
    ("dinomed3d stage I", {"name": "dinomed3d", "in_chans": 1, "stage": 1}, dinomed3d_stage1_official, None),
    ("dinomed3d stage II", {"name": "dinomed3d", "in_chans": 1, "stage": 2}, dinomed3d_official, (47, 112, 334)),
    ("dual_petct dual", {"name": "dual_petct", "variant": "dual"}, None, None),
    ("dual_petct pet_only", {"name": "dual_petct", "variant": "pet_only"}, None, None),
    ("dual_petct early_fusion", {"name": "dual_petct", "variant": "early_fusion"}, None, None),
]


def count(cfg: dict) -> tuple[int, int]:
    with torch.device("meta"):
        model = build_model(cfg, load_checkpoints=False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def rows() -> list[list[str]]:
    out = []
    for label, base, official, paper in MODELS:
        for i, (size, (e, depth)) in enumerate(SIZES.items()):
            total, trainable = count({**base, "backbone": size, "num_classes": NUM_CLASSES})
            off = official(e, depth) if official else None
            ref = [v for v in (paper[i] * 1e6 if paper else None, off) if v]
            worst = max((abs(total - r) / r for r in ref), default=None)
            out.append([label, size.split("_")[1], f"{total / 1e6:.1f}",
                        f"{trainable / 1e6:.1f}" if trainable >= 5e4 else f"{trainable / 1e6:.4f}",
                        f"{off / 1e6:.1f}" if off else "-", str(paper[i]) if paper else "-",
                        f"{100 * worst:.1f}%" if worst is not None else "-"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    header = ["model", "ViT", "ours total (M)", "ours trainable (M)", "official code (M)", "paper (M)",
              "largest difference"]
    table = rows()
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in table:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(str(r[i])) for r in [header] + table) for i in range(len(header))]
        for r in [header] + table:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
