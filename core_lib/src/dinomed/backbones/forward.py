"""The one forward path of a DINOv3 ViT (timm ``Eva``), and the hooks the seed models need in it.

Plain features go through timm's public ``forward_intermediates`` (:func:`vit_features`). Three models need a step
between timm's stages, and those steps live here only:

- a mask token in place of masked patch tokens (iBOT, pretraining): :func:`vit_tokens`;
- patch tokens computed by the model itself (DINO-Med3D's inter-slice context embedding): :func:`embed_tokens`
  then :func:`run_blocks`;
- two streams whose blocks alternate with a cross-modal fusion (Dual-DINOv3 PET/CT): :func:`embed_tokens`, then
  the blocks one by one, and :func:`tokens_to_grid`.

:func:`embed_tokens` is the only call of a private timm method (``Eva._pos_embed``: prefix tokens and RoPE), so
timm is pinned to the tested minor version (pyproject ``timm>=1.0.31,<1.1``), and
``tests/test_backbones.py::test_one_forward_path`` checks that the hooked path equals ``forward_intermediates``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 16


def pad_to_patch(x: torch.Tensor, patch: int = PATCH) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad the last two axes (H, W) at the bottom/right to multiples of ``patch``; return the original size."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % patch, (-w) % patch
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x, (h, w)


def vit_features(backbone: nn.Module, images: torch.Tensor, layers: Sequence[int], norm: bool = True,
                 prefix: bool = False) -> list:
    """Patch-token maps ``(B, C, H/16, W/16)`` of blocks ``layers`` (after the final LayerNorm unless ``norm=False``:
    then the raw block outputs) for images whose sides are multiples of 16; with ``prefix``, pairs
    ``(map, prefix tokens (B, 1 + registers, C))``. timm's public ``forward_intermediates``."""
    return backbone.forward_intermediates(images, indices=list(layers), return_prefix_tokens=prefix, norm=norm,
                                          stop_early=True, output_fmt="NCHW", intermediates_only=True)


def embed_tokens(backbone: nn.Module, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prefix tokens + positions for ``patch_tokens`` ``(B, h, w, C)``: what ``Eva.forward_intermediates`` does
    between ``patch_embed`` and the first block. Returns the token sequence and the RoPE tensor."""
    x, rope = backbone._pos_embed(patch_tokens)
    return backbone.norm_pre(x), rope


def tokens_to_grid(backbone: nn.Module, x: torch.Tensor, hw: tuple[int, int], norm: bool = True) -> torch.Tensor:
    """Patch tokens of a block output ``(B, N, C)`` as a ``(B, C, h, w)`` map (after the final LayerNorm when
    ``norm``, as DINOv3's ``get_intermediate_layers(norm=True)``)."""
    if norm:
        x = backbone.norm(x)
    x = x[:, backbone.num_prefix_tokens:]
    b, _, c = x.shape
    return x.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2).contiguous()


def run_blocks(
    backbone: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, hw: tuple[int, int], layers: Sequence[int],
    norm: bool = True,
) -> list[torch.Tensor]:
    """Run the blocks on the token sequence ``x`` (from :func:`embed_tokens`) up to the last of ``layers``; return the
    patch-token maps of ``layers``, as :func:`vit_features` does for images."""
    feats = []
    for i, blk in enumerate(backbone.blocks[: max(layers) + 1]):
        x = blk(x, rope=rope)
        if i in layers:
            feats.append(tokens_to_grid(backbone, x, hw, norm=norm))
    return feats


def add_mask_token(backbone: nn.Module, value: torch.Tensor | None = None) -> nn.Module:
    """Give ``backbone`` a learnable ``mask_token`` ``(1, D)`` (zeros, or ``value``), as DINOv3's
    ``vision_transformer.py`` has (timm's ``Eva`` has none)."""
    dim = backbone.embed_dim
    token = torch.zeros(1, dim) if value is None else value.detach().reshape(1, dim).clone().float()
    backbone.mask_token = nn.Parameter(token)
    return backbone


def vit_tokens(backbone: nn.Module, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Normalised final tokens of ``images`` ``(B, C, H, W)``: ``cls`` ``(B, D)``, ``storage`` ``(B, R, D)``,
    ``patch`` ``(B, N, D)``, and the patch ``grid`` (h, w).

    ``masks`` ``(B, N)`` booleans (row-major patch order) marks the patches replaced by ``backbone.mask_token``
    (:func:`add_mask_token`); without a mask this is timm's ``forward_features``.
    """
    x = backbone.patch_embed(images)  # (B, h, w, D): DINOv3 models use a dynamic image size (NHWC tokens)
    b, h, w, d = x.shape
    if masks is not None:
        token = backbone.mask_token.to(x.dtype).view(1, 1, 1, d)
        x = torch.where(masks.view(b, h, w, 1), token, x)
    x, rope = embed_tokens(backbone, x)
    for block in backbone.blocks:
        x = block(x, rope=rope)
    x = backbone.norm(x)
    n_prefix = backbone.num_prefix_tokens
    return {"cls": x[:, 0], "storage": x[:, 1:n_prefix], "patch": x[:, n_prefix:], "grid": (h, w)}
