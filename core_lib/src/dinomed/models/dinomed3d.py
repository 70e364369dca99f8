"""DINO-Med3D: progressive 2D→3D adaptation of a DINOv3 ViT for volumetric segmentation.

Hu et al., "DINO-Med3D: Bridging Dimension and Domain Gaps in Volumetric Segmentation via Progressive
Adaptation", MICCAI 2026, arXiv:2606.18886, sec. 2, built as the paper and its official code
(github.com/HaoyuHu1/DINO-Med3D, ``models/``) build it by default:

* **Inter-slice context embedding (ICE)**, sec. 2.2.1: every axial slice is embedded together with its
  neighbours: the K slices of its slab (zero slices beyond the volume's ends) are the input channels of the
  ViT's pretrained 2D patch embedding (official ``Dino2DIntegratedEncoder._expand_25d``: K = 3 slices into the
  RGB patch embedding). The embedding is initialised from the pretrained kernel as the official code does: for
  K = 3 from an RGB checkpoint it *is* the pretrained kernel; any other K ≥ 1 (the paper's Table 2 ablation,
  which the official code does not include) follows timm's ``adapt_input_conv`` (channels repeated cyclically
  and scaled by 3/K; K = 1 sums them), which reduces to the official rule at K = 3. With C > 1 image channels
  (PET/CT) each slice's kernel is shared equally among its C channels. Slab offsets are ``-(K//2) .. K-1-K//2``
  (our choice for even K: the paper does not say). (:func:`ice_patch_weight`, :func:`slabs`)
* **Stage I** (``stage: 1``), sec. 2.2.2: backbone and ICE fully finetuned with a light proxy head: a 1×1
  convolution on the **last** block's patch tokens, bilinearly upsampled to the slice (official
  ``Stage1Model``). ``proxy_head: mlp`` is our earlier head, a named option (see :class:`DINOMed3D`).
* **Stage II** (``stage: 2``), sec. 2.3: the stage-I backbone (ICE included) is frozen and adapted with LoRA
  (peft; rank 16, alpha 16, dropout 0.1 on ``qkv``, ``proj``, ``fc1``, ``fc2``: official ``configs/base.py``;
  as in the official code, the ``proj`` target also matches the patch-embedding convolution, the ICE).
  The raw outputs (no final LayerNorm, official forward hooks) of four evenly spaced blocks are stacked along
  depth and lifted by the **3D adapter** (sec. 2.3.1; official ``Adapter3D``: per level a 1×1×1 conv to 256,
  InstanceNorm, PReLU, then a transposed conv ×4 / ×2 in-plane, identity, or a stride-2 conv: in-plane strides
  4, 8, 16, 32). The **HRSE** (sec. 2.3.2; official ``ResNetHighResEncoder``: a stem and 5 residual blocks,
  16/32/64 channels at full, 1/2 and 1/4 in-plane, the 1/4 map projected to 256) gives the detail maps. The
  **adaptive gated fusion** ``f = f_sem + σ(Conv([f_sem; f_det])) ⊙ f_det`` (eq. 2-3) acts **once, on the 1/4
  level, before the UperNet** (official ``fusion_mid``); the **3D UperNet** (width 256; PPM bins 1, 2, 3, 6) then
  decodes the pyramid to 1/4 in-plane, and the **refinement decoder** (official ``HighResRefinementDecoder``)
  climbs to full resolution with the 1/2 and full-resolution detail maps (64, then 32 channels) before a 1×1
  classifier.

As in the official adapter, the ×4 and ×2 transposed convolutions have a depth kernel of 4 and 2 with depth
stride 1 (depth D+3 and D+1); the levels and streams are brought to one grid by trilinear resizing where they
meet, and the refinement decoder resizes back to the input depth (official behaviour, kept for fidelity).

Ablations (config keys; Table 2 and 3): ``ice_k`` (K), ``use_semantic_stream`` (stream 1: ViT → adapter →
UperNet), ``use_detail_stream`` (stream 2: HRSE → gate → refinement; without it the UperNet's own 1×1 classifier
is upsampled, as the official UperNet's ``cls`` layer allows), ``stage``. ``stage1_checkpoint`` (a stage-I model
folder or its ``model.safetensors``) initialises a stage-II model's backbone (ICE included) before LoRA is added;
like ``backbone_checkpoint`` it is only used when building for training.

Choices of ours where neither paper nor code says: input H, W need not be multiples of 16 (zero-padded inside,
logits cropped back); InstanceNorm/GroupNorm as the official code (GroupNorm groups are gcd(channels, 32) so that
tiny test widths work; 32 at the default widths). Input ``(B, C, D, H, W)``; output logits
``(B, num_classes, D, H, W)``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.forward import embed_tokens, pad_to_patch, run_blocks
from ..errors import CheckpointError, DinomedError
from .common import aggregation_layers, check_input
from .registry import register_model

def _gn(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, C) as the official UperNet; fewer groups at narrow test widths (at least 2 channels a group, so
    that a 1×1×1 pooled map still normalises)."""
    groups = math.gcd(channels, 32)
    while groups > 1 and channels // groups < 2:
        groups //= 2
    return nn.GroupNorm(groups, channels)


# ---------------------------------------------------------------------------------------------------------
# ICE


def slab_offsets(k: int) -> list[int]:
    """Slice offsets of a K-slab around its slice: K = 3 → -1, 0, 1; K = 2 → -1, 0; K = 4 → -2, -1, 0, 1."""
    return list(range(-(k // 2), k - k // 2))


def slabs(volume: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, C, D, H, W)`` → ``(B*D, K*C, H, W)``: every slice with its K-slab as channels (slice-major within the
    channels: slab slice 0's C channels, then slice 1's, …), zero slices beyond the volume's ends."""
    b, c, d, h, w = volume.shape
    offsets = slab_offsets(k)
    lo, hi = -offsets[0], offsets[-1]
    padded = F.pad(volume, (0, 0, 0, 0, lo, hi))
    stacked = torch.stack([padded[:, :, lo + o: lo + o + d] for o in offsets], dim=1)  # (B, K, C, D, H, W)
    return stacked.permute(0, 3, 1, 2, 4, 5).reshape(b * d, k * c, h, w)


def ice_patch_weight(weight: torch.Tensor, k: int, in_chans: int) -> torch.Tensor:
    """The ICE patch-embedding kernel ``(E, K*C, p, p)`` from a pretrained 2D kernel ``(E, S, p, p)``.

    Over the K slices: timm's ``adapt_input_conv`` (K == S: unchanged, the official K = 3 from RGB; K = 1: the S
    kernels summed; otherwise repeated cyclically and scaled by S/K). Each slice's kernel is then shared equally by
    its ``in_chans`` channels (divided by C), so a volume with identical channels gives the single-channel response.
    """
    from timm.models import adapt_input_conv

    per_slice = adapt_input_conv(k, weight, base_chans=weight.shape[1])  # (E, K, p, p)
    return (per_slice / in_chans).repeat_interleave(in_chans, dim=1)


def _ice_backbone(backbone: str, in_chans: int, ice_k: int, drop_path_rate: float, checkpoint: str | None) -> nn.Module:
    """The DINOv3 ViT whose patch embedding reads K*C channels (the ICE), initialised from ``backbone_checkpoint``."""
    from ..backbones import create_backbone, load_backbone, resolve_arch

    k, c = int(ice_k), int(in_chans)
    if k < 1:
        raise DinomedError(f"dinomed3d: ice_k must be a number of slices >= 1, found {ice_k!r}")
    spec = resolve_arch(backbone)
    model = create_backbone(spec, in_chans=k * c, drop_path_rate=float(drop_path_rate))
    if checkpoint:
        source = load_backbone(checkpoint, arch=spec.name)  # its own channel count (RGB or grey)
        state = source.state_dict()
        state["patch_embed.proj.weight"] = ice_patch_weight(state["patch_embed.proj.weight"], k, c)
        model.load_state_dict(state)
    else:
        # a fresh model starts from an RGB-style kernel adapted the same way, so both paths build the same function
        with torch.no_grad():
            rgb = create_backbone(spec, in_chans=3).patch_embed.proj.weight
            model.patch_embed.proj.weight.copy_(ice_patch_weight(rgb, k, c))
    return model.train()


# ---------------------------------------------------------------------------------------------------------
# stage I heads


class LinearProxyHead(nn.Module):
    """Official stage-I head: a 1×1 convolution on the last block's token map, bilinearly upsampled."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.head = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, tokens: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(self.head(tokens), size=size, mode="bilinear", align_corners=False)


class MLPProxyHead(nn.Module):
    """Named option ``proxy_head: mlp``: per patch token, an MLP predicts its 16×16 pixels for every class."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int, patch: int = 16):
        super().__init__()
        self.patch = patch
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, num_classes * patch * patch))

    def forward(self, tokens: torch.Tensor, size) -> torch.Tensor:
        x = self.mlp(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.pixel_shuffle(x, self.patch)


# ---------------------------------------------------------------------------------------------------------
# stage II: adapter, UperNet, HRSE, gated fusion, refinement


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return x if tuple(x.shape[2:]) == tuple(size) else F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class VolumetricAdapter(nn.Module):
    """Stacked pseudo-3D token volumes (1/16 in-plane) → a pyramid at in-plane strides 4, 8, 16, 32 (sec. 2.3.1)."""

    def __init__(self, embed_dim: int, channels: int):
        super().__init__()

        def reduce():
            return [nn.Conv3d(embed_dim, channels, 1, bias=False), nn.InstanceNorm3d(channels), nn.PReLU()]

        self.levels = nn.ModuleList([
            nn.Sequential(*reduce(), nn.ConvTranspose3d(channels, channels, 4, stride=(1, 4, 4))),
            nn.Sequential(*reduce(), nn.ConvTranspose3d(channels, channels, 2, stride=(1, 2, 2))),
            nn.Sequential(*reduce()),
            nn.Sequential(*reduce(), nn.Conv3d(channels, channels, 3, stride=(1, 2, 2), padding=1)),
        ])

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [level(f) for level, f in zip(self.levels, feats)]


class UperNet3D(nn.Module):
    """UperNet (Xiao et al., 2018) in 3D as the official ``UPerNet3DDecoder``: PPM on the coarsest level, top-down
    FPN, the four levels fused at the finest; ``cls`` classifies its output (used without the detail stream)."""

    def __init__(self, in_channels: int, channels: int, bins: list[int], num_classes: int | None):
        super().__init__()
        quarter = channels // 4
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool3d(b), nn.Conv3d(in_channels, quarter, 1), _gn(quarter),
                                               nn.PReLU()) for b in bins)
        self.ppm_out = nn.Sequential(nn.Conv3d(in_channels + quarter * len(bins), channels, 3, padding=1), _gn(channels),
                                     nn.PReLU())
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv3d(in_channels, channels, 1), _gn(channels), nn.PReLU())
                                     for _ in range(3))
        self.fpn_out = nn.ModuleList(nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), _gn(channels), nn.PReLU())
                                     for _ in range(3))
        self.fuse = nn.Sequential(nn.Conv3d(channels * 4, channels, 3, padding=1), _gn(channels), nn.PReLU(),
                                  nn.Dropout(0.1))
        # built only when used (no detail stream), so that no parameter goes without a gradient (DDP)
        self.cls = nn.Conv3d(channels, num_classes, 1) if num_classes else None

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        top = pyramid[-1]
        pooled = [_resize(branch(top), top.shape[2:]) for branch in self.ppm]
        prev = self.ppm_out(torch.cat([top] + pooled, dim=1))
        levels = [prev]
        for i in range(len(pyramid) - 2, -1, -1):
            lat = self.lateral[i](pyramid[i])
            prev = self.fpn_out[i](lat + _resize(prev, lat.shape[2:]))
            levels.append(prev)
        levels.reverse()
        size = levels[0].shape[2:]
        return self.fuse(torch.cat([levels[0]] + [_resize(f, size) for f in levels[1:]], dim=1))


class ResidualBlock3d(nn.Module):
    """Basic residual block (two 3×3×3 conv + InstanceNorm, ReLU), a 1×1×1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride=1):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm1, self.norm2 = nn.InstanceNorm3d(cout), nn.InstanceNorm3d(cout)
        self.skip = (None if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.InstanceNorm3d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.skip is None else self.skip(x)
        out = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
        return F.relu(out + identity)


class DetailRecoveryStream(nn.Module):
    """HRSE (sec. 2.3.2): stem + 5 residual blocks; detail maps at full (c0), 1/2 (c1) and 1/4 (projected) in-plane."""

    def __init__(self, in_chans: int, channels: list[int], out_channels: int):
        super().__init__()
        c0, c1, c2 = channels
        half = (1, 2, 2)
        self.stem = nn.Sequential(nn.Conv3d(in_chans, c0, 3, padding=1, bias=False), nn.InstanceNorm3d(c0), nn.ReLU())
        self.at_full = ResidualBlock3d(c0, c0)
        self.at_half = nn.Sequential(ResidualBlock3d(c0, c1, half), ResidualBlock3d(c1, c1))
        self.at_quarter = nn.Sequential(ResidualBlock3d(c1, c2, half), ResidualBlock3d(c2, c2))
        self.proj = nn.Conv3d(c2, out_channels, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        d0 = self.at_full(self.stem(x))
        d1 = self.at_half(d0)
        return [d0, d1, self.proj(self.at_quarter(d1))]


class GatedFusion(nn.Module):
    """Adaptive gated fusion (eq. 2-3): ``f = f_sem + σ(Conv1×1([f_sem; f_det])) ⊙ f_det``."""

    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Conv3d(2 * channels, channels, 1)

    def forward(self, f_sem: torch.Tensor, f_det: torch.Tensor) -> torch.Tensor:
        f_det = _resize(f_det, f_sem.shape[2:])
        return f_sem + torch.sigmoid(self.gate(torch.cat([f_sem, f_det], dim=1))) * f_det


class RefinementBlock(nn.Module):
    """Resize the coarse map to the detail map's grid, concatenate, two 3×3×3 conv + InstanceNorm + ReLU."""

    def __init__(self, cin_coarse: int, cin_detail: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv3d(cin_coarse + cin_detail, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout), nn.ReLU(),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout), nn.ReLU())

    def forward(self, coarse: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([_resize(coarse, detail.shape[2:]), detail], dim=1))


# ---------------------------------------------------------------------------------------------------------
# the model


def _add_lora(backbone: nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str]) -> None:
    """LoRA via peft on the named layers of the backbone (``proj`` also matches the patch embedding, as in the
    official ``get_peft_model``); everything else in the backbone is frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    for blk in backbone.blocks:
        # timm's Eva attention folds its q/v bias into F.linear(x, qkv.weight, bias), which would bypass a LoRA
        # wrapper on qkv; the 'separate bias' path calls qkv(x) and adds the bias, the same function
        blk.attn.qkv_bias_separate = True
    config = LoraConfig(r=int(rank), lora_alpha=int(alpha), lora_dropout=float(dropout), target_modules=list(targets),
                        bias="none")
    inject_adapter_in_model(config, backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)


@register_model("dinomed3d", spatial_dims=3,
                summary="DINO-Med3D: ICE, stage I proxy head / stage II LoRA + 3D adapter + HRSE + gate at 1/4 + 3D UperNet + refinement")
class DINOMed3D(nn.Module):
    """DINO-Med3D, stage I or II (see the module docstring for every part and the paper's section).

    Defaults are the paper's and the official code's: ``ice_k`` 3 (sec. 3.2); ``layers`` None: four evenly spaced
    blocks (official out_indices 2, 5, 8, 11 of 12); LoRA rank 16, alpha 16, dropout 0.1 on qkv, proj, fc1, fc2
    (official configs/base.py); adapter and UperNet width 256, PPM bins 1, 2, 3, 6; detail widths 16/32/64 and
    refinement 64, 32 (official ResNetHighResEncoder, HighResRefinementDecoder). Named options of ours:
    ``feature_norm`` (true: the final LayerNorm on every aggregated block, as MedDINOv3, which puts the four levels
    on one scale when the backbone is frozen, sec. 2.3.1; false: the raw block outputs of the official hooks) and
    ``proxy_head: mlp`` (a LayerNorm-MLP on the four blocks predicting each patch's 16x16 pixels, width
    ``proxy_hidden``: sharper slice boundaries than the official ``linear`` 1x1 conv on the last block, ~1 M more
    parameters; the paper's text calls its head a "lightweight MLP"). ``slice_batch``: slices per backbone call.
    """

    spatial_dims = 3

    def __init__(self, *, num_classes: int, backbone: str = "vit_base", in_chans: int = 1, stage: int = 2,
                 ice_k: int = 3, layers: Sequence[int] | None = None, feature_norm: bool = False,
                 proxy_head: str = "linear", proxy_hidden: int = 256, use_semantic_stream: bool = True,
                 use_detail_stream: bool = True, decoder: str = "upernet", lora_rank: int = 16, lora_alpha: float = 16,
                 lora_dropout: float = 0.1, lora_targets: Sequence[str] = ("qkv", "proj", "fc1", "fc2"),
                 adapter_channels: int = 256, decoder_channels: int = 256, ppm_bins: Sequence[int] = (1, 2, 3, 6),
                 detail_channels: Sequence[int] = (16, 32, 64), refine_channels: Sequence[int] = (64, 32),
                 slice_batch: int = 32, drop_path_rate: float = 0.0, backbone_checkpoint: str | None = None,
                 stage1_checkpoint: str | None = None):
        super().__init__()
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.stage = int(stage)
        if self.stage not in (1, 2):
            raise DinomedError(f"dinomed3d: stage must be 1 or 2, found {stage!r}")
        if decoder != "upernet":
            raise DinomedError(f"dinomed3d: decoder must be 'upernet' (the paper's), found {decoder!r}")
        if proxy_head not in ("linear", "mlp"):
            raise DinomedError(f"dinomed3d: proxy_head must be 'linear' or 'mlp', found {proxy_head!r}")
        self.use_sem = self.stage == 1 or bool(use_semantic_stream)
        self.use_det = self.stage == 2 and bool(use_detail_stream)
        if not (self.use_sem or self.use_det):
            raise DinomedError("dinomed3d: use_semantic_stream and use_detail_stream cannot both be false")
        self.slice_batch = int(slice_batch)
        self.ice_k = int(ice_k)
        self.feature_norm = bool(feature_norm)

        if self.use_sem:
            self.backbone = _ice_backbone(backbone, in_chans, ice_k, drop_path_rate, backbone_checkpoint)
            self.layers = aggregation_layers(self.backbone, layers)
            embed = self.backbone.embed_dim
            if self.stage == 2 and stage1_checkpoint:
                self._load_stage1(stage1_checkpoint)

        if self.stage == 1:
            self.proxy_kind = proxy_head
            self.proxy_layers = (self.layers[-1],) if self.proxy_kind == "linear" else self.layers
            self.proxy_head = (LinearProxyHead(embed, self.num_classes) if self.proxy_kind == "linear" else
                               MLPProxyHead(embed * len(self.layers), int(proxy_hidden), self.num_classes))
            return

        width = int(adapter_channels)
        dch = list(detail_channels)
        rch = list(refine_channels)
        if len(dch) != 3 or len(rch) != 2:
            raise DinomedError(f"dinomed3d: detail_channels needs 3 widths (full, 1/2, 1/4) and refine_channels 2 "
                               f"(1/2, full), found {dch} and {rch}")
        if self.use_sem:
            if len(self.layers) != 4:
                raise DinomedError(f"dinomed3d: stage II needs 4 aggregation layers, found {len(self.layers)}")
            _add_lora(self.backbone, lora_rank, lora_alpha, lora_dropout, lora_targets)
            self.adapter = VolumetricAdapter(embed, width)
            self.decoder = UperNet3D(width, int(decoder_channels), list(ppm_bins),
                                     None if self.use_det else self.num_classes)
            if self.use_det:
                self.fusion = GatedFusion(width)
        if self.use_det:
            self.detail = DetailRecoveryStream(in_chans, dch, width)
            coarse = int(decoder_channels) if self.use_sem else width
            self.refine = nn.ModuleList([RefinementBlock(coarse, dch[1], rch[0]), RefinementBlock(rch[0], dch[0], rch[1])])
            self.classifier = nn.Conv3d(rch[1], self.num_classes, 1)

    # -- stage I → II -------------------------------------------------------------------------------------
    def _load_stage1(self, path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        file = path / "model.safetensors" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"{path}: no stage-I model (expected a model folder with model.safetensors)")
        state = load_file(str(file))
        own = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        missing = sorted(k for k in own if k not in state)
        if missing:
            raise CheckpointError(f"{file}: not a stage-I DINO-Med3D model of this size: {len(missing)} tensor(s) missing, "
                                  f"e.g. {', '.join(missing[:4])}")
        for key, value in own.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise CheckpointError(f"{file}: tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
        self.backbone.load_state_dict({k[len("backbone."):]: state[k] for k in own})

    # -- the semantic stream ------------------------------------------------------------------------------
    def _slice_tokens(self, slices: torch.Tensor, layers) -> list[torch.Tensor]:
        """``(N, K*C, H, W)`` slabs → per layer ``(N, E, H/16, W/16)``, in chunks of ``slice_batch`` slices."""
        per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
        for start in range(0, slices.shape[0], self.slice_batch):
            tokens = self.backbone.patch_embed(slices[start:start + self.slice_batch])  # the ICE: (n, h, w, E)
            x, rope = embed_tokens(self.backbone, tokens)
            for i, f in enumerate(run_blocks(self.backbone, x, rope, tokens.shape[1:3], layers, norm=self.feature_norm)):
                per_layer[i].append(f)
        return [torch.cat(chunks, dim=0) for chunks in per_layer]

    def slice_features(self, volume: torch.Tensor) -> list[torch.Tensor]:
        """ICE + ViT on every slice's K-slab: per aggregated layer, a pseudo-3D volume ``(B, E, D, h, w)``."""
        b, _, d = volume.shape[:3]
        out = []
        for f in self._slice_tokens(slabs(volume, self.ice_k), self.layers):
            out.append(f.reshape(b, d, *f.shape[1:]).permute(0, 2, 1, 3, 4))
        return out

    def _proxy(self, slab_channels: torch.Tensor) -> torch.Tensor:
        feats = self._slice_tokens(slab_channels, self.proxy_layers)
        return self.proxy_head(torch.cat(feats, dim=1), slab_channels.shape[-2:])

    def forward_central(self, slab: torch.Tensor) -> torch.Tensor:
        """Stage I on one K-slice slab ``(B, C, K, H, W)`` → logits of its centre slice ``(B, nc, H, W)`` (the
        slice at offset 0 of :func:`slab_offsets`)."""
        if self.stage != 1:
            raise DinomedError("dinomed3d: forward_central is the stage-I proxy task; this model is stage II")
        check_input(slab, 5, self.in_chans, "dinomed3d")
        if slab.shape[2] != self.ice_k:
            raise DinomedError(f"dinomed3d: a stage-I slab has ice_k={self.ice_k} slices, found {slab.shape[2]}")
        h, w = slab.shape[-2:]
        slab, _ = pad_to_patch(slab)
        b, c, k = slab.shape[:3]
        channels = slab.permute(0, 2, 1, 3, 4).reshape(b, k * c, *slab.shape[-2:])
        return self._proxy(channels)[..., :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, 5, self.in_chans, "dinomed3d")
        b, _, d, h, w = x.shape
        xp, _ = pad_to_patch(x)
        if self.stage == 1:
            logits = self._proxy(slabs(xp, self.ice_k))  # (B*D, nc, H, W)
            logits = logits.reshape(b, d, *logits.shape[1:]).permute(0, 2, 1, 3, 4)
            return logits[..., :h, :w]

        det = self.detail(xp) if self.use_det else None  # full, 1/2, 1/4 (projected)
        if self.use_sem:
            pyramid = self.adapter(self.slice_features(xp))
            if self.use_det:
                pyramid[0] = self.fusion(pyramid[0], det[2])  # the gate: once, at 1/4, before the UperNet
            f = self.decoder(pyramid)
            if not self.use_det:
                return _resize(self.decoder.cls(f), xp.shape[2:])[..., :h, :w]
        else:
            f = det[2]
        f = self.refine[0](f, det[1])
        f = self.refine[1](f, det[0])
        return self.classifier(f)[..., :h, :w]
