"""Parts shared by the seed models: backbone construction from a config, input checks and small decoder blocks.
(The ViT forward path and its hooks, and the padding to the patch grid, are :mod:`dinomed.backbones.forward`.)"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..backbones import create_backbone, default_layers, load_backbone, resolve_arch
from ..errors import DinomedError, InputImageError


# ---------------------------------------------------------------------------------------------------------
# backbones


def make_backbone(arch: str, in_chans: int, checkpoint: str | None = None, drop_path_rate: float = 0.0) -> nn.Module:
    """A DINOv3 ViT of ``arch``; initialised from ``checkpoint`` (any format ``load_backbone`` reads) when given."""
    spec = resolve_arch(arch)
    if checkpoint:
        model = load_backbone(checkpoint, arch=spec.name, in_chans=in_chans)
        if drop_path_rate:
            # timm builds drop-path at construction; a loaded model gets it by rebuilding and copying the weights
            fresh = create_backbone(spec, in_chans=in_chans, drop_path_rate=drop_path_rate)
            fresh.load_state_dict(model.state_dict())
            model = fresh
        return model.train()
    return create_backbone(spec, in_chans=in_chans, drop_path_rate=drop_path_rate)


def aggregation_layers(backbone: nn.Module, layers: Sequence[int] | None) -> tuple[int, ...]:
    """The blocks whose tokens are aggregated (default: four evenly spaced, 2, 5, 8, 11 for 12 blocks)."""
    depth = len(backbone.blocks)
    if layers is None:
        return default_layers(depth)
    if not layers or any(not -depth <= int(i) < depth for i in layers):
        raise DinomedError(f"aggregation layers {list(layers)} out of range for a backbone of depth {depth}")
    return tuple(sorted({int(i) % depth for i in layers}))


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ---------------------------------------------------------------------------------------------------------
# inputs


def check_input(x: torch.Tensor, ndim: int, in_chans: int, model: str, min_side: int = 1) -> None:
    """A clear error for an input of the wrong dimensionality, channel count or size."""
    layout = "(B, C, H, W)" if ndim == 4 else "(B, C, D, H, W)"
    if not isinstance(x, torch.Tensor):
        raise InputImageError(f"{model}: expected a torch tensor {layout}, found {type(x).__name__}")
    if x.ndim != ndim:
        what = "a batch of 2D slices" if ndim == 4 else "a batch of 3D volumes"
        raise InputImageError(f"{model}: expected {what} {layout}, found shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise InputImageError(
            f"{model}: expected {in_chans} input channel(s) (model.json inputs), found {x.shape[1]} in shape {tuple(x.shape)}"
        )
    if any(s < min_side for s in x.shape[2:]) or x.shape[0] < 1:
        raise InputImageError(
            f"{model}: every spatial side must be at least {min_side} voxels, found shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise InputImageError(f"{model}: expected a floating-point image (normalised intensities), found {x.dtype}")


# ---------------------------------------------------------------------------------------------------------
# decoder blocks


def group_norm(channels: int) -> nn.Module:
    """GroupNorm with up to 8 groups: independent of the batch size (inference runs batch 1 volumes)."""
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)


class UpsampleBlock2d(nn.Module):
    """×2 transposed convolution + norm + GELU, then a 3×3 convolution + norm + GELU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2), group_norm(cout), nn.GELU())
        self.refine = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1), group_norm(cout), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.refine(self.up(x))


class DetailStream2d(nn.Module):
    """A 2D detail-recovery stream with adaptive gated fusion, after DINO-Med3D (arXiv:2606.18886, sec. 2.3.2: HRSE
    and AGF): two 3×3 convolutions on the input image at full resolution give detail features ``D``; a gate
    ``A = σ(conv3×3([S, P(D)]))`` over the decoder's full-resolution features ``S`` injects them as a residual
    correction, ``S + A ⊙ P(D)`` (``P``: 1×1 projection to the width of ``S``). It gives a ViT decoder what a
    16-pixel patch embedding loses: sub-patch detail such as the edge of a lesion smaller than a patch."""

    def __init__(self, image_channels: int, channels: int, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(image_channels, channels, 3, padding=1, bias=False), group_norm(channels),
                                  nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False), group_norm(channels),
                                  nn.GELU())
        self.project = nn.Conv2d(channels, width, 1)
        self.gate = nn.Conv2d(2 * width, 1, 3, padding=1)

    def forward(self, semantic: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        detail = self.project(self.stem(image))
        attention = torch.sigmoid(self.gate(torch.cat([semantic, detail], dim=1)))
        return semantic + attention * detail


class ProgressiveUpsamplingDecoder(nn.Module):
    """Light decoder from 1/16-resolution token maps to full resolution: a 1×1 projection of the concatenated
    multi-scale tokens, then four ×2 upsampling stages (MedDINOv3 sec. 3.1), then a 1×1 classifier.

    Named option ``detail_channels`` (0: off, the default): a :class:`DetailStream2d` of that width on the input image
    (``image_channels`` channels, passed to ``forward``) corrects the full-resolution features before the classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (256, 128, 64, 32),
                 detail_channels: int = 0, image_channels: int = 1):
        super().__init__()
        channels = list(channels)
        if len(channels) != 4:
            raise DinomedError(f"decoder_channels needs 4 widths (one per ×2 stage to reach 1/16 → 1), found {channels}")
        if not isinstance(detail_channels, int) or isinstance(detail_channels, bool) or detail_channels < 0:
            raise DinomedError(f"detail_channels must be 0 (off) or a positive width, found {detail_channels!r}")
        self.proj = nn.Sequential(nn.Conv2d(in_channels, channels[0], 1), group_norm(channels[0]), nn.GELU())
        widths = [channels[0]] + channels
        self.stages = nn.ModuleList(UpsampleBlock2d(widths[i], widths[i + 1]) for i in range(4))
        self.detail = DetailStream2d(image_channels, detail_channels, channels[-1]) if detail_channels else None
        self.classifier = nn.Conv2d(channels[-1], num_classes, 1)

    def forward(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj(x)
        for stage in self.stages:
            x = stage(x)
        if self.detail is not None:
            if image is None or image.shape[-2:] != x.shape[-2:]:
                raise DinomedError("the decoder's detail stream needs the (patch-padded) input image at the output size")
            x = self.detail(x, image)
        return self.classifier(x)


class ConvNormAct3d(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel=3, stride=1):
        k = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        pad = tuple(kk // 2 for kk in k)
        super().__init__(nn.Conv3d(cin, cout, k, stride=stride, padding=pad, bias=False), group_norm(cout), nn.GELU())


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
