"""The frozen DINOv3 baselines of the medical benchmark: slice-wise features → pseudo-3D volume → light 3D decoder,
and the linear probe.

Liu et al., "Does DINOv3 Set a New Medical Vision Standard? A Comprehensive Benchmark on 2D/3D Classification
and Segmentation", arXiv:2509.06467, 3D segmentation protocol: the DINOv3 encoder stays frozen and is applied
slice by slice (axial 2D slices of the volume); the 2D feature maps are stacked along depth into a pseudo-3D
feature volume that a light 3D convolutional decoder with skip connections turns into a full-resolution
segmentation; the linear-probing protocol puts a linear layer on the frozen patch tokens instead.

What is here:

``slicewise3d`` (3D, ``sliding3d`` inference)
    ``head: "decoder"`` (default): the normalised patch tokens of four evenly spaced blocks are concatenated per
    slice and stacked into ``(B, 4C, D, H/16, W/16)``; the decoder (sec. 3.3: "3D convolutional layers with skip
    connections to progressively upsample features to the original volume resolution") upsamples in-plane ×2 four
    times with ``(1,2,2)`` transposed 3D convolutions followed by a 3×3×3 convolution (depth context mixed at every
    scale). Its skip connections come from the **frozen features alone**: the three earlier aggregated blocks, each
    projected by a 1×1×1 convolution and trilinearly resized to the 1/8, 1/4 and 1/2 stages (deepest-first, as
    UNETR pairs its encoder depths with decoder scales), so the baseline measures what the frozen DINOv3 features
    carry. The paper names neither the skip source nor the widths; these are our choices, stated here.
    Named option ``input_skips: true``: our earlier decoder, whose skips at full, 1/2, 1/4, 1/8 in-plane come from
    a small trainable 3D CNN on the raw image (``skip_channels``): sharper boundaries, but the "frozen DINOv3"
    number then also measures that CNN. Model folders from before this option existed were trained with it, and
    are read as ``input_skips: true``.
    ``head: "linear"``: the linear probe applied slice by slice (below).
``linear_probe`` (2D, ``slicewise2d`` inference)
    A 1×1 convolution (a linear classifier per patch token) on the frozen, normalised patch tokens of
    ``layers`` (default: the last block), bilinearly upsampled to the input's resolution.

The backbone is frozen (no gradient, kept in eval mode, run without autograd) unless ``freeze_backbone`` is false.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.forward import pad_to_patch, vit_features
from .common import ConvNormAct3d, aggregation_layers, check_input, freeze, group_norm, make_backbone
from .registry import register_model

class FrozenSliceEncoder(nn.Module):
    """A (by default frozen) DINOv3 ViT giving the normalised patch-token maps of ``layers`` for 2D slices."""

    def __init__(self, backbone: str, in_chans: int, layers: Sequence[int] | None, freeze_backbone: bool,
                 slice_batch: int, checkpoint: str | None):
        super().__init__()
        self.backbone = make_backbone(backbone, in_chans, checkpoint)
        self.layers = aggregation_layers(self.backbone, layers)
        self.frozen = bool(freeze_backbone)
        self.slice_batch = int(slice_batch)
        if self.frozen:
            freeze(self.backbone)
            self.backbone.eval()

    @property
    def out_channels(self) -> int:
        return self.backbone.embed_dim * len(self.layers)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a frozen encoder behaves the same in training and inference
        return self

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` slices with sides multiple of 16 → ``(N, C_feat, H/16, W/16)`` concatenated tokens."""
        chunks = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            for start in range(0, slices.shape[0], self.slice_batch):
                feats = vit_features(self.backbone, slices[start:start + self.slice_batch], self.layers)
                chunks.append(torch.cat(feats, dim=1))
        return torch.cat(chunks, dim=0)


def volume_to_slices(x: torch.Tensor) -> torch.Tensor:
    b, c, d, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)


def slices_to_volume(x: torch.Tensor, b: int, d: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(b, d, c, h, w).permute(0, 2, 1, 3, 4)


@register_model("linear_probe", spatial_dims=2,
                summary="linear probe: 1×1 head on frozen DINOv3 patch tokens, upsampled (2D)")
class LinearProbe(nn.Module):
    """Linear probe: a 1×1 convolution on frozen patch tokens (of ``layers``, default the last block), upsampled
    bilinearly to the slice size (2D). ``slice_batch``: slices per backbone call, bounding memory."""

    spatial_dims = 2

    def __init__(self, *, num_classes: int, backbone: str = "vit_base", in_chans: int = 1,
                 layers: Sequence[int] | None = (-1,), freeze_backbone: bool = True, slice_batch: int = 32,
                 backbone_checkpoint: str | None = None):
        super().__init__()
        self.in_chans = in_chans
        self.encoder = FrozenSliceEncoder(backbone, in_chans, [-1] if layers is None else layers, freeze_backbone,
                                          slice_batch, backbone_checkpoint)
        self.head = nn.Conv2d(self.encoder.out_channels, num_classes, 1)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward_slices(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        xp, _ = pad_to_patch(x)
        logits = self.head(self.encoder(xp))
        logits = F.interpolate(logits, size=xp.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, 4, self.in_chans, "linear_probe")
        return self.forward_slices(x)


class InputSkipEncoder(nn.Module):
    """Skip connections of the light decoder: a small 3D CNN on the input at full, 1/2, 1/4, 1/8 in-plane
    (one 3×3×3 convolution per scale, in-plane stride 2 between scales)."""

    def __init__(self, in_chans: int, channels: list[int]):
        super().__init__()
        self.stages = nn.ModuleList()
        cin = in_chans
        for i, c in enumerate(channels):
            stride = (1, 1, 1) if i == 0 else (1, 2, 2)
            self.stages.append(ConvNormAct3d(cin, c, 3, stride=stride))
            cin = c

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs  # full, 1/2, 1/4, 1/8 in-plane


class PseudoVolumeDecoder(nn.Module):
    """Light 3D decoder: 1/16 pseudo-3D features → four (1,2,2) upsampling stages with skips → logits.

    Skips from the frozen features (default: ``embed_dim``-wide token maps of the earlier blocks, projected to each
    stage's width and resized) or, with ``input_skips``, from a small 3D CNN on the image."""

    def __init__(self, in_channels: int, in_chans: int, num_classes: int, channels: list[int], skip_channels: list[int],
                 input_skips: bool = False, embed_dim: int | None = None, num_layers: int = 4):
        super().__init__()
        if len(channels) != 4 or len(skip_channels) != 4:
            raise ValueError("decoder_channels and skip_channels need 4 widths each")
        self.input_skips = input_skips
        if input_skips:
            self.skips = InputSkipEncoder(in_chans, skip_channels)
            skip_widths = [skip_channels[3 - i] for i in range(4)]
        else:
            # stage i (1/8, 1/4, 1/2) takes block layers[-2 - i]; the full-resolution stage has no feature skip
            n_skips = min(3, num_layers - 1)
            self.feature_skips = nn.ModuleList(ConvNormAct3d(embed_dim, channels[i], 1) for i in range(n_skips))
            skip_widths = [channels[i] if i < n_skips else 0 for i in range(4)]
        self.proj = ConvNormAct3d(in_channels, channels[0], 1)
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        cin = channels[0]
        for i, c in enumerate(channels):
            self.ups.append(nn.Sequential(nn.ConvTranspose3d(cin, c, (1, 2, 2), stride=(1, 2, 2)), group_norm(c), nn.GELU()))
            self.fuse.append(ConvNormAct3d(c + skip_widths[i], c, 3))
            cin = c
        self.classifier = nn.Conv3d(channels[-1], num_classes, 1)

    def forward(self, feats: torch.Tensor, image: torch.Tensor, layer_feats: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = self.proj(feats)
        if self.input_skips:
            skips = self.skips(image)[::-1]  # 1/8, 1/4, 1/2, full
        else:
            skips = [None] * 4
            for i, proj in enumerate(self.feature_skips):
                skips[i] = proj(layer_feats[-2 - i])  # at 1/16; resized to the stage below
        for up, fuse, skip in zip(self.ups, self.fuse, skips):
            x = up(x)
            if skip is not None:
                if skip.shape[2:] != x.shape[2:]:
                    skip = F.interpolate(skip, size=x.shape[2:], mode="trilinear", align_corners=False)
                x = torch.cat([x, skip], dim=1)
            x = fuse(x)
        return self.classifier(x)


def upgrade_slicewise3d(arch: dict) -> dict:
    """A model.json from before ``input_skips`` existed was trained with the raw-image CNN skips."""
    if "input_skips" not in arch and "skip_channels" in arch:
        arch["input_skips"] = True
    return arch


@register_model("slicewise3d", spatial_dims=3, upgrade=upgrade_slicewise3d,
                summary="frozen DINOv3 slice-wise features, pseudo-3D volume, light 3D decoder (head: linear = linear probe)")
class SlicewiseFrozen3D(nn.Module):
    """Frozen DINOv3 slice-wise features stacked into a pseudo-3D volume + a light 3D decoder (``head: decoder``,
    widths ``decoder_channels``; ``input_skips`` with ``skip_channels``: the named option of the module docstring)
    or a linear probe applied slice by slice (``head: linear``)."""

    spatial_dims = 3

    def __init__(self, *, num_classes: int, backbone: str = "vit_base", in_chans: int = 1,
                 layers: Sequence[int] | None = None, freeze_backbone: bool = True, slice_batch: int = 32,
                 head: str = "decoder", decoder_channels: Sequence[int] = (128, 64, 32, 16), input_skips: bool = False,
                 skip_channels: Sequence[int] = (16, 32, 64, 128), backbone_checkpoint: str | None = None):
        super().__init__()
        self.in_chans = in_chans
        self.head_kind = head
        if self.head_kind == "linear":
            self.probe = LinearProbe(num_classes=num_classes, backbone=backbone, in_chans=in_chans, layers=layers,
                                     freeze_backbone=freeze_backbone, slice_batch=slice_batch,
                                     backbone_checkpoint=backbone_checkpoint)
        elif self.head_kind == "decoder":
            self.encoder = FrozenSliceEncoder(backbone, in_chans, layers, freeze_backbone, slice_batch,
                                              backbone_checkpoint)
            self.decoder = PseudoVolumeDecoder(self.encoder.out_channels, in_chans, num_classes,
                                               list(decoder_channels), list(skip_channels),
                                               input_skips=bool(input_skips),
                                               embed_dim=self.encoder.backbone.embed_dim,
                                               num_layers=len(self.encoder.layers))
        else:
            from ..errors import DinomedError

            raise DinomedError(f"slicewise3d: head must be 'decoder' or 'linear', found {self.head_kind!r}")

    @property
    def backbone(self) -> nn.Module:
        """The frozen DINOv3 ViT (for feature maps), whichever head the model has."""
        return (self.probe.encoder if self.head_kind == "linear" else self.encoder).backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, 5, self.in_chans, "slicewise3d")
        b, _, d, h, w = x.shape
        if self.head_kind == "linear":
            return slices_to_volume(self.probe.forward_slices(volume_to_slices(x)), b, d)
        xp, _ = pad_to_patch(x)
        feats = slices_to_volume(self.encoder(volume_to_slices(xp)), b, d)  # (B, C_feat, D, H/16, W/16)
        layer_feats = list(torch.chunk(feats, len(self.encoder.layers), dim=1))  # per block, in layer order
        return self.decoder(feats, xp, layer_feats)[..., :h, :w]
