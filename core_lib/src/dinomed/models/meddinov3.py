"""MedDINOv3: a plain DINOv3 ViT with multi-scale token aggregation and a light upsampling decoder (2D).

Li et al., "MedDINOv3: How to adapt vision foundation models for medical image segmentation?",
arXiv:2509.02379, sec. 3 (revisiting plain ViTs for segmentation): instead of the last block only, the patch
tokens of four evenly spaced blocks (2, 5, 8, 11 of ViT-B) are taken, each normalised (the backbone's LayerNorm,
as DINOv3's ``get_intermediate_layers(norm=True)``) and concatenated along channels; a lightweight
progressive-upsampling decoder (×2 transposed convolutions with normalisation and GELU) brings the 1/16 token
map back to full resolution. Its high-resolution setting (e.g. 896² slices) needs nothing special here: RoPE
makes the backbone size-agnostic, and any H, W is accepted (zero-padded to multiples of 16, logits cropped
back).

Config (``architecture`` of model.json): ``backbone``, ``in_chans``, ``num_classes``, ``layers`` (null: four
evenly spaced), ``decoder_channels`` (4 widths, one per ×2 stage), ``drop_path_rate``, ``backbone_checkpoint``
(initialises the encoder; not needed to load a model folder), ``freeze_backbone``.
Input ``(B, C, H, W)``; output logits ``(B, num_classes, H, W)``.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import (ProgressiveUpsamplingDecoder, aggregation_layers, check_input, freeze, make_backbone,
                     pad_to_patch, vit_features)
from .registry import register_model

DEFAULTS = {
    "backbone": "vit_base",
    "in_chans": 1,
    "num_classes": None,
    "layers": None,
    "decoder_channels": [256, 128, 64, 32],
    "drop_path_rate": 0.0,
    "freeze_backbone": False,
    "high_res": False,  # informational: trained at high resolution (e.g. 896²); the model accepts any size
}


class MedDINOv3(nn.Module):
    """DINOv3 ViT encoder → four normalised intermediate token maps, concatenated → progressive upsampling."""

    spatial_dims = 2

    def __init__(self, cfg: dict):
        super().__init__()
        self.in_chans = cfg["in_chans"]
        self.num_classes = cfg["num_classes"]
        self.backbone = make_backbone(cfg["backbone"], cfg["in_chans"], cfg.get("backbone_checkpoint"),
                                      cfg["drop_path_rate"])
        self.layers = aggregation_layers(self.backbone, cfg["layers"])
        width = self.backbone.embed_dim
        self.decoder = ProgressiveUpsamplingDecoder(width * len(self.layers), cfg["num_classes"], cfg["decoder_channels"])
        if cfg["freeze_backbone"]:
            freeze(self.backbone)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The aggregated token maps ``(B, C, ceil(H/16), ceil(W/16))``, one per layer in ``self.layers``."""
        x, _ = pad_to_patch(x)
        return vit_features(self.backbone, x, self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, 4, self.in_chans, "meddinov3")
        h, w = x.shape[-2:]
        feats = self.forward_features(x)
        logits = self.decoder(torch.cat(feats, dim=1))
        return logits[..., :h, :w]


@register_model("meddinov3", defaults=DEFAULTS, spatial_dims=2,
                summary="MedDINOv3 (2D): multi-scale token aggregation + progressive upsampling decoder")
def build_meddinov3(cfg: dict, load_checkpoints: bool = True) -> nn.Module:
    return MedDINOv3(cfg)
