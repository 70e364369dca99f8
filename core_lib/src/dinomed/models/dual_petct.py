"""Dual-DINOv3 PET/CT: two separately pretrained DINOv3 encoders fused by multiscale cross-attention (2D).

Dual-DINOv3 (PET/CT, MIDL 2026), the dual-stream segmentation model: a PET encoder and a CT encoder with
separate weights, each initialised from its own backbone checkpoint (pretrained separately, so no paired PET/CT
data is needed for pretraining), are fused during finetuning by cross-attention at the four token-aggregation
depths (four evenly spaced blocks, e.g. 2, 5, 8, 11 of 12): PET tokens attend to CT tokens and CT tokens to
PET tokens, each added back as a gated residual whose gate starts at zero, so that at initialisation both
streams are exactly their pretrained encoders (:class:`CrossModalFusion`). After each fusion point the
normalised patch tokens of both streams are kept; the eight maps are concatenated and decoded to full
resolution by the light progressive-upsampling decoder also used by MedDINOv3.

The single-stream models of the paper's comparison are the ``variant`` key (same input, same decoder):
``dual`` (default), ``pet_only`` (one encoder on channel 1), ``ct_only`` (one encoder on channel 0) and
``early_fusion`` (one encoder whose patch embedding takes both channels).

Named option ``detail_channels`` (0 = off): a detail-recovery stream with gated fusion on CT and PET at full
resolution before the classifier, after DINO-Med3D sec. 2.3.2 (:class:`dinomed.models.common.DetailStream2d`).

Input ``(B, 2, H, W)``: CT in channel 0, PET in channel 1 (docs/CONTRACTS.md, model.json ``inputs``), any H, W;
output logits ``(B, num_classes, H, W)``. Checkpoint keys: ``pet_backbone_checkpoint`` and
``ct_backbone_checkpoint`` (dual and single-stream variants; ``backbone_checkpoint`` is the fallback for a
single stream and the checkpoint of ``early_fusion``); none is needed to load a model folder.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..backbones.forward import block_forward, embed_tokens, pad_to_patch, tokens_to_grid, vit_features
from ..errors import DinomedError
from .common import ProgressiveUpsamplingDecoder, aggregation_layers, check_input, freeze, make_backbone
from .registry import register_model

VARIANTS = ("dual", "pet_only", "ct_only", "early_fusion")
CT_CHANNEL, PET_CHANNEL = 0, 1


class CrossModalFusion(nn.Module):
    """Bidirectional cross-attention between PET and CT token sequences with zero-initialised gated residuals.

    ``pet' = pet + g_pet ⊙ Attn(LN(pet), LN(ct))`` and ``ct' = ct + g_ct ⊙ Attn(LN(ct), LN(pet))``; ``g`` are
    per-channel gates initialised to zero, so the fusion starts as the identity.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_pet = nn.LayerNorm(dim)
        self.norm_ct = nn.LayerNorm(dim)
        self.pet_from_ct = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ct_from_pet = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gate_pet = nn.Parameter(torch.zeros(dim))
        self.gate_ct = nn.Parameter(torch.zeros(dim))

    def forward(self, pet: torch.Tensor, ct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, c = self.norm_pet(pet), self.norm_ct(ct)
        pet_msg = self.pet_from_ct(p, c, c, need_weights=False)[0]
        ct_msg = self.ct_from_pet(c, p, p, need_weights=False)[0]
        return pet + self.gate_pet * pet_msg, ct + self.gate_ct * ct_msg


@register_model("dual_petct", spatial_dims=2,
                summary="Dual-DINOv3 PET/CT: PET and CT encoders fused by multiscale cross-attention; "
                        "variants pet_only, ct_only, early_fusion")
class DualDINOv3PETCT(nn.Module):
    """CT (channel 0) and PET (channel 1) through two DINOv3 encoders fused at the aggregation depths (``variant``
    ``dual``), or one of the baselines ``pet_only``, ``ct_only``, ``early_fusion``; ``fusion_heads`` None: the
    backbone's number of heads."""

    spatial_dims = 2

    def __init__(self, *, num_classes: int, backbone: str = "vit_base", in_chans: int = 2, variant: str = "dual",
                 layers: Sequence[int] | None = None, fusion_heads: int | None = None,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32), detail_channels: int = 0,
                 drop_path_rate: float = 0.0,
                 freeze_backbone: bool = False, backbone_checkpoint: str | None = None,
                 pet_backbone_checkpoint: str | None = None, ct_backbone_checkpoint: str | None = None):
        super().__init__()
        if in_chans != 2:
            raise DinomedError(f"dual_petct: the input is CT (channel 0) and PET (channel 1), so in_chans must be 2, "
                               f"found {in_chans}")
        self.variant = variant
        if self.variant not in VARIANTS:
            raise DinomedError(f"dual_petct: variant must be one of {', '.join(VARIANTS)}, found {self.variant!r}")
        self.in_chans = 2
        arch, dpr, fallback = backbone, drop_path_rate, backbone_checkpoint
        if self.variant == "dual":
            self.pet_encoder = make_backbone(arch, 1, pet_backbone_checkpoint, dpr)
            self.ct_encoder = make_backbone(arch, 1, ct_backbone_checkpoint, dpr)
            self.layers = aggregation_layers(self.pet_encoder, layers)
            dim = self.pet_encoder.embed_dim
            heads = int(fusion_heads or self.pet_encoder.blocks[0].attn.num_heads)
            self.fusions = nn.ModuleList(CrossModalFusion(dim, heads) for _ in self.layers)
            feat_channels = 2 * dim * len(self.layers)
            encoders = [self.pet_encoder, self.ct_encoder]
        else:
            if self.variant == "early_fusion":
                chans, ckpt = 2, fallback
            elif self.variant == "pet_only":
                chans, ckpt = 1, pet_backbone_checkpoint or fallback
            else:
                chans, ckpt = 1, ct_backbone_checkpoint or fallback
            self.encoder = make_backbone(arch, chans, ckpt, dpr)
            self.layers = aggregation_layers(self.encoder, layers)
            feat_channels = self.encoder.embed_dim * len(self.layers)
            encoders = [self.encoder]
        self.decoder = ProgressiveUpsamplingDecoder(feat_channels, num_classes, decoder_channels, detail_channels, 2)
        if freeze_backbone:
            for enc in encoders:
                freeze(enc)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Token maps ``(B, E, H/16, W/16)`` at the aggregation depths (dual: PET then CT at each depth)."""
        x, _ = pad_to_patch(x)
        if self.variant == "early_fusion":
            return vit_features(self.encoder, x, self.layers)
        if self.variant == "pet_only":
            return vit_features(self.encoder, x[:, PET_CHANNEL:PET_CHANNEL + 1], self.layers)
        if self.variant == "ct_only":
            return vit_features(self.encoder, x[:, CT_CHANNEL:CT_CHANNEL + 1], self.layers)
        pet_bb, ct_bb = self.pet_encoder, self.ct_encoder
        tp = pet_bb.patch_embed(x[:, PET_CHANNEL:PET_CHANNEL + 1])
        tc = ct_bb.patch_embed(x[:, CT_CHANNEL:CT_CHANNEL + 1])
        hw = tp.shape[1:3]
        xp, rope_p = embed_tokens(pet_bb, tp)
        xc, rope_c = embed_tokens(ct_bb, tc)
        feats = []
        fusion = iter(self.fusions)
        for i in range(max(self.layers) + 1):
            xp = block_forward(pet_bb.blocks[i], xp, rope_p)
            xc = block_forward(ct_bb.blocks[i], xc, rope_c)
            if i in self.layers:
                xp, xc = next(fusion)(xp, xc)  # the fused tokens go on through the following blocks
                feats += [tokens_to_grid(pet_bb, xp, hw), tokens_to_grid(ct_bb, xc, hw)]
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, 4, self.in_chans, f"dual_petct ({self.variant}; channel 0 CT, channel 1 PET)")
        h, w = x.shape[-2:]
        x, _ = pad_to_patch(x)  # once: forward_features finds it aligned
        feats = torch.cat(self.forward_features(x), dim=1)
        # named option: the detail stream reads CT and PET at full resolution
        logits = self.decoder(feats, image=x) if self.decoder.detail is not None else self.decoder(feats)
        return logits[..., :h, :w]
