"""Dense features of a DINOv3 backbone: CLS tokens and patch-token grids of chosen blocks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputImageError
from .forward import pad_to_patch, vit_features
from .vit import default_layers


@dataclass
class BackboneFeatures:
    """``cls[i]`` is ``(B, C)`` and ``patches[i]`` is ``(B, C, ceil(H/16), ceil(W/16))`` for block ``layers[i]``."""

    layers: tuple[int, ...]
    cls: list[torch.Tensor]
    patches: list[torch.Tensor]


def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    layers: tuple[int, ...] | list[int] | None = None,
    norm: bool = True,
) -> BackboneFeatures:
    """Run ``model`` (a timm DINOv3 ViT) on ``images`` ``(B, C, H, W)`` and return the requested blocks.

    ``layers`` are 0-based block indices (default: four evenly spaced blocks, e.g. 2, 5, 8, 11 for 12 blocks;
    negative indices count from the end). ``norm`` applies the backbone's final LayerNorm to every block's
    tokens, as DINOv3's ``get_intermediate_layers(norm=True)`` does. Sides that are not multiples of the patch
    size are zero-padded at the bottom/right; the last patch row/column then covers the padding.
    """
    if images.ndim != 4:
        raise InputImageError(f"expected images of shape (B, C, H, W), found {tuple(images.shape)}")
    in_chans = model.patch_embed.proj.in_channels
    if images.shape[1] != in_chans:
        raise InputImageError(f"the backbone expects {in_chans} input channel(s), found {images.shape[1]}")
    depth = len(model.blocks)
    layers = tuple(default_layers(depth) if layers is None else (i % depth for i in layers))
    images, _ = pad_to_patch(images, model.patch_embed.patch_size[0])
    inter = vit_features(model, images, layers, norm=norm, prefix=True)
    patches = [spatial for spatial, _ in inter]
    cls = [prefix[:, 0] for _, prefix in inter]
    return BackboneFeatures(layers=layers, cls=cls, patches=patches)
