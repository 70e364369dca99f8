"""A DINOv3 ViT forward that can replace masked patch tokens with a learnable mask token (iBOT).

timm's ``Eva`` (which holds the DINOv3 ViTs, see ``dinomed.backbones``) has no mask token, so pretraining adds
one to the backbone as ``backbone.mask_token`` (shape ``(1, D)``, zeros at init, as DINOv3's
``vision_transformer.py``), and runs the same steps as ``Eva.forward_features``: patch embedding -> masked
tokens replaced -> CLS and register tokens plus RoPE -> blocks -> final norm. Without a mask the result is
exactly ``forward_features``.
"""
from __future__ import annotations

import torch
from torch import nn


def add_mask_token(backbone: nn.Module, value: torch.Tensor | None = None) -> nn.Module:
    """Give ``backbone`` a learnable ``mask_token`` ``(1, D)`` (zeros, or ``value``)."""
    dim = backbone.embed_dim
    token = torch.zeros(1, dim) if value is None else value.detach().reshape(1, dim).clone().float()
    backbone.mask_token = nn.Parameter(token)
    return backbone


def vit_tokens(backbone: nn.Module, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Normalised tokens of ``images`` ``(B, C, H, W)``: ``cls`` ``(B, D)``, ``storage`` ``(B, R, D)``, ``patch`` ``(B, N, D)``.

    ``masks`` ``(B, N)`` booleans (row-major patch order) marks the patches replaced by ``backbone.mask_token``.
    """
    x = backbone.patch_embed(images)  # (B, h, w, D): DINOv3 models use a dynamic image size (NHWC tokens)
    b, h, w, d = x.shape
    if masks is not None:
        token = backbone.mask_token.to(x.dtype).view(1, 1, 1, d)
        x = torch.where(masks.view(b, h, w, 1), token, x)
    x, rope = backbone._pos_embed(x)
    x = backbone.norm_pre(x)
    for block in backbone.blocks:
        x = block(x, rope=rope)
    x = backbone.norm(x)
    n_prefix = backbone.num_prefix_tokens
    return {"cls": x[:, 0], "storage": x[:, 1:n_prefix], "patch": x[:, n_prefix:], "grid": (h, w)}
