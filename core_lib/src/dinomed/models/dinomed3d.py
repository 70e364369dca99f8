"""DINO-Med3D: progressive 2D→3D adaptation of a DINOv3 ViT for volumetric segmentation.

Hu et al., "DINO-Med3D: Bridging Dimension and Domain Gaps in Volumetric Segmentation via Progressive
Adaptation", MICCAI 2026, arXiv:2606.18886, Method section:

* **Inter-slice context embedding (ICE)**: each axial slice is embedded together with its K-1 neighbours
  (K = 3 by default; zero slices beyond the volume's ends) by a depth-aware 3D convolution, kernel
  ``(K, 16, 16)``, stride ``(1, 16, 16)``, whose output replaces the ViT's 2D patch tokens. It is initialised
  from the 2D patch embedding: the 2D kernel sits in the central depth slot and the others are zero, so at
  initialisation the tokens equal the 2D embedding of the central slice, and K = 1 is the 2D embedding.
  (:class:`InterSliceContextEmbedding`)
* **Stage I** (``stage: 1``): the whole backbone (with ICE) is fine-tuned with a lightweight MLP proxy head that
  segments the central slice: per patch token, an MLP predicts the 16×16 pixels of that patch for every class
  (:class:`ProxySegmentationHead`). A volume in gives every slice's 2D prediction, stacked; ``forward_central``
  takes one K-slice slab.
* **Stage II** (``stage: 2``): the backbone is frozen and adapted with LoRA (``peft``) on ``qkv``, ``proj``,
  ``fc1``, ``fc2`` of every block (timm ``Eva`` names: ``blocks.N.attn.qkv``, ``attn.proj``, ``mlp.fc1``,
  ``mlp.fc2``); the volume is processed as D slabs (one ICE slab per slice) and the patch tokens of four evenly
  spaced blocks are stacked along depth into pseudo-3D feature volumes. A **3D adapter** of 3D (transposed)
  convolutions turns them into a multi-scale volumetric pyramid (in-plane strides 4, 8, 16, 32; the coarsest
  also halves depth) (:class:`VolumetricAdapter`), decoded by a **3D UperNet** (pyramid pooling module on the
  coarsest level + FPN, all 3D) (:class:`UperNet3D`) into the semantic stream ``f_sem`` at 1/4 in-plane.
  The **detail-recovery stream** (HRSE, :class:`DetailRecoveryStream`) is a light 3D residual CNN on the raw
  volume at full, 1/2 and 1/4 in-plane resolution; at each of these scales the streams meet in the adaptive
  gated fusion ``f = f_sem + σ(Conv([f_sem; f_det])) ⊙ f_det`` (:class:`GatedFusion`) on the way up to full
  resolution.

Ablation switches (config keys): ``ice_k`` (K; 1 = no inter-slice context), ``use_semantic_stream`` (stream 1:
the ViT path), ``use_detail_stream`` (stream 2: HRSE), ``decoder`` (``upernet`` or ``simple``: levels projected,
resized to the finest level and summed), ``stage``. ``stage1_checkpoint`` (a stage-I model folder or its
``model.safetensors``) initialises a stage-II model's backbone and ICE before LoRA is added; like
``backbone_checkpoint`` it is only used when building for training.

Choices the paper leaves open and made here: GroupNorm in every 3D block (batch-size independent);
HRSE downsamples in-plane only (CT slices are usually thicker than the in-plane spacing); the ICE stays frozen in
stage II with the rest of the backbone. Input ``(B, C, D, H, W)`` of any size (H, W zero-padded to multiples of
16 inside, logits cropped back); output logits ``(B, num_classes, D, H, W)``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, DinomedError
from .common import (ConvNormAct3d, aggregation_layers, check_input, embed_tokens, freeze, group_norm, make_backbone,
                     pad_to_patch, run_blocks)
from .registry import register_model

DEFAULTS = {
    "backbone": "vit_base",
    "in_chans": 1,
    "num_classes": None,
    "stage": 2,
    "ice_k": 3,
    "layers": None,
    "use_semantic_stream": True,
    "use_detail_stream": True,
    "decoder": "upernet",
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_targets": ["qkv", "proj", "fc1", "fc2"],
    "adapter_channels": [256, 256, 256, 256],
    "decoder_channels": 224,  # UperNet width; with the other defaults the totals land near the paper's 47M / 112M / 334M
    "ppm_bins": [1, 2, 3, 6],
    "detail_channels": [32, 64, 128],
    "proxy_hidden": 256,
    "slice_batch": 32,
    "drop_path_rate": 0.0,
}


# ---------------------------------------------------------------------------------------------------------
# ICE


class InterSliceContextEmbedding(nn.Module):
    """K adjacent slices → the ViT's patch tokens, by a ``(K, 16, 16)`` 3D convolution with stride ``(1, 16, 16)``."""

    def __init__(self, patch_conv: nn.Conv2d, k: int):
        super().__init__()
        if k < 1 or k % 2 == 0:
            raise DinomedError(f"dinomed3d: ice_k must be an odd number of slices (1, 3, 5, …), found {k}")
        self.k = k
        out_c, in_c, ph, pw = patch_conv.weight.shape
        self.patch = (ph, pw)
        self.proj = nn.Conv3d(in_c, out_c, (k, ph, pw), stride=(1, ph, pw))
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :, k // 2] = patch_conv.weight  # the central slice gets the 2D kernel
            if patch_conv.bias is not None:
                self.proj.bias.copy_(patch_conv.bias)
            else:
                self.proj.bias.zero_()

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` (H, W multiples of 16) → tokens ``(B*D, H/16, W/16, E)``, slice-major per volume."""
        half = self.k // 2
        x = F.pad(volume, (0, 0, 0, 0, half, half))  # zero slices beyond the volume's ends
        y = self.proj(x)  # (B, E, D, h, w)
        b, e, d, h, w = y.shape
        return y.permute(0, 2, 3, 4, 1).reshape(b * d, h, w, e)

    def forward_slab(self, slab: torch.Tensor) -> torch.Tensor:
        """One K-slice slab ``(B, C, K, H, W)`` → the central slice's tokens ``(B, H/16, W/16, E)`` (no padding)."""
        y = self.proj(slab)
        return y[:, :, 0].permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------------------
# stage I


class ProxySegmentationHead(nn.Module):
    """Stage-I proxy head: an MLP per patch token predicting that patch's 16×16 pixels for every class."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int, patch: int = 16):
        super().__init__()
        self.patch = patch
        self.num_classes = num_classes
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, num_classes * patch * patch))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, E, h, w)`` → logits ``(N, num_classes, 16h, 16w)``."""
        x = self.mlp(tokens.permute(0, 2, 3, 1))  # (N, h, w, nc*p*p)
        x = x.permute(0, 3, 1, 2)
        return F.pixel_shuffle(x, self.patch)


# ---------------------------------------------------------------------------------------------------------
# stage II: adapter, UperNet, HRSE, gated fusion


class VolumetricAdapter(nn.Module):
    """Stacked pseudo-3D token volumes (1/16 in-plane, full depth) → a pyramid at in-plane strides 4, 8, 16, 32."""

    def __init__(self, embed_dim: int, channels: list[int]):
        super().__init__()
        up = dict(kernel_size=(1, 2, 2), stride=(1, 2, 2))
        c0, c1, c2, c3 = channels
        self.levels = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose3d(embed_dim, c0, **up), group_norm(c0), nn.GELU(),
                          nn.ConvTranspose3d(c0, c0, **up), ConvNormAct3d(c0, c0, 3)),
            nn.Sequential(nn.ConvTranspose3d(embed_dim, c1, **up), ConvNormAct3d(c1, c1, 3)),
            nn.Sequential(ConvNormAct3d(embed_dim, c2, 1), ConvNormAct3d(c2, c2, 3)),
            nn.Sequential(ConvNormAct3d(embed_dim, c3, 1), ConvNormAct3d(c3, c3, 3, stride=2)),
        ])

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [level(f) for level, f in zip(self.levels, feats)]


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return x if tuple(x.shape[2:]) == tuple(size) else F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class PyramidPooling3D(nn.Module):
    """PSPNet's pyramid pooling module in 3D (adaptive average pooling to each bin size, 1×1×1 conv, resize back)."""

    def __init__(self, cin: int, channels: int, bins: list[int]):
        super().__init__()
        self.bins = list(bins)
        self.branches = nn.ModuleList(ConvNormAct3d(cin, channels, 1) for _ in self.bins)
        self.bottleneck = ConvNormAct3d(cin + channels * len(self.bins), channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for b, branch in zip(self.bins, self.branches):
            outs.append(_resize(branch(F.adaptive_avg_pool3d(x, b)), x.shape[2:]))
        return self.bottleneck(torch.cat(outs, dim=1))


class UperNet3D(nn.Module):
    """UperNet (Xiao et al., 2018) in 3D: PPM on the coarsest level, FPN top-down, all levels fused at the finest."""

    def __init__(self, in_channels: list[int], channels: int, bins: list[int]):
        super().__init__()
        self.ppm = PyramidPooling3D(in_channels[-1], channels, bins)
        self.laterals = nn.ModuleList(ConvNormAct3d(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct3d(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvNormAct3d(channels * len(in_channels), channels, 3)

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        lat = [lateral(p) for lateral, p in zip(self.laterals, pyramid[:-1])] + [self.ppm(pyramid[-1])]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[2:]
        return self.fuse(torch.cat([_resize(o, size) for o in outs], dim=1))


class SimpleDecoder3D(nn.Module):
    """Ablation decoder: each level projected (1×1×1), resized to the finest level, summed, one 3×3×3 conv."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv3d(c, channels, 1) for c in in_channels)
        self.out = ConvNormAct3d(channels, channels, 3)

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        size = pyramid[0].shape[2:]
        return self.out(sum(_resize(p(x), size) for p, x in zip(self.proj, pyramid)))


class ResidualBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, stride=(1, 1, 1)):
        super().__init__()
        self.conv1 = ConvNormAct3d(cin, cout, 3, stride=stride)
        self.conv2 = nn.Sequential(nn.Conv3d(cout, cout, 3, padding=1, bias=False), group_norm(cout, 3))
        self.skip = (nn.Identity() if cin == cout and tuple(stride) == (1, 1, 1)
                     else nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), group_norm(cout, 3)))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class DetailRecoveryStream(nn.Module):
    """HRSE: a light 3D residual CNN on the raw volume giving detail features at full, 1/2 and 1/4 in-plane."""

    def __init__(self, in_chans: int, channels: list[int]):
        super().__init__()
        c0, c1, c2 = channels
        self.at_full = ResidualBlock3d(in_chans, c0)
        self.at_half = ResidualBlock3d(c0, c1, stride=(1, 2, 2))
        self.at_quarter = ResidualBlock3d(c1, c2, stride=(1, 2, 2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        d0 = self.at_full(x)
        d1 = self.at_half(d0)
        d2 = self.at_quarter(d1)
        return [d0, d1, d2]


class GatedFusion(nn.Module):
    """Adaptive gated fusion ``f = f_sem + σ(Conv([f_sem; f_det])) ⊙ f_det``."""

    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Conv3d(2 * channels, channels, 1)

    def forward(self, f_sem: torch.Tensor, f_det: torch.Tensor) -> torch.Tensor:
        return f_sem + torch.sigmoid(self.gate(torch.cat([f_sem, f_det], dim=1))) * f_det


class UpStage3d(nn.Module):
    """In-plane ×2 transposed convolution + norm + GELU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose3d(cin, cout, (1, 2, 2), stride=(1, 2, 2)), group_norm(cout, 3), nn.GELU())

    def forward(self, x):
        return self.up(x)


# ---------------------------------------------------------------------------------------------------------
# the model


def _add_lora(backbone: nn.Module, cfg: dict) -> None:
    """LoRA via peft on the named linear layers of every block; everything else in the backbone is frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    for blk in backbone.blocks:
        # timm's Eva attention folds its q/v bias into F.linear(x, qkv.weight, bias), which would bypass a LoRA
        # wrapper on qkv; the 'separate bias' path calls qkv(x) and adds the bias, the same function
        blk.attn.qkv_bias_separate = True
    config = LoraConfig(r=int(cfg["lora_rank"]), lora_alpha=int(cfg["lora_alpha"]), lora_dropout=float(cfg["lora_dropout"]),
                        target_modules=list(cfg["lora_targets"]), bias="none")
    inject_adapter_in_model(config, backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)


class DINOMed3D(nn.Module):
    spatial_dims = 3

    def __init__(self, cfg: dict):
        super().__init__()
        self.in_chans = cfg["in_chans"]
        self.num_classes = cfg["num_classes"]
        self.stage = int(cfg["stage"])
        if self.stage not in (1, 2):
            raise DinomedError(f"dinomed3d: stage must be 1 or 2, found {cfg['stage']!r}")
        if cfg["decoder"] not in ("upernet", "simple"):
            raise DinomedError(f"dinomed3d: decoder must be 'upernet' or 'simple', found {cfg['decoder']!r}")
        self.use_sem = self.stage == 1 or bool(cfg["use_semantic_stream"])
        self.use_det = self.stage == 2 and bool(cfg["use_detail_stream"])
        if not (self.use_sem or self.use_det):
            raise DinomedError("dinomed3d: use_semantic_stream and use_detail_stream cannot both be false")
        self.slice_batch = int(cfg["slice_batch"])

        if self.use_sem:
            backbone = make_backbone(cfg["backbone"], cfg["in_chans"], cfg.get("backbone_checkpoint"), cfg["drop_path_rate"])
            self.ice = InterSliceContextEmbedding(backbone.patch_embed.proj, int(cfg["ice_k"]))
            backbone.patch_embed = nn.Identity()  # the ICE replaces the 2D patch embedding
            self.backbone = backbone
            self.layers = aggregation_layers(backbone, cfg["layers"])
            embed = backbone.embed_dim
            if self.stage == 2 and cfg.get("stage1_checkpoint"):
                self._load_stage1(cfg["stage1_checkpoint"])

        if self.stage == 1:
            self.proxy_head = ProxySegmentationHead(embed * len(self.layers), int(cfg["proxy_hidden"]), self.num_classes)
            return

        dch = list(cfg["detail_channels"])
        if len(dch) != 3:
            raise DinomedError(f"dinomed3d: detail_channels needs 3 widths (full, 1/2, 1/4), found {dch}")
        if self.use_sem:
            _add_lora(self.backbone, cfg)
            freeze(self.ice)
            adapter = list(cfg["adapter_channels"])
            if len(adapter) != 4 or len(self.layers) != 4:
                raise DinomedError(f"dinomed3d: stage II needs 4 aggregation layers and 4 adapter_channels, found "
                                   f"{len(self.layers)} and {adapter}")
            self.adapter = VolumetricAdapter(embed, adapter)
            dec = int(cfg["decoder_channels"])
            self.decoder = (UperNet3D(adapter, dec, list(cfg["ppm_bins"])) if cfg["decoder"] == "upernet"
                            else SimpleDecoder3D(adapter, dec))
            self.sem_proj = ConvNormAct3d(dec, dch[2], 1)
        if self.use_det:
            self.detail = DetailRecoveryStream(cfg["in_chans"], dch)
            self.fusions = nn.ModuleList(GatedFusion(c) for c in (dch[2], dch[1], dch[0]))
        self.ups = nn.ModuleList([UpStage3d(dch[2], dch[1]), UpStage3d(dch[1], dch[0])])
        self.refine = nn.ModuleList(ConvNormAct3d(c, c, 3) for c in (dch[1], dch[0]))
        self.classifier = nn.Conv3d(dch[0], self.num_classes, 1)

    # -- stage I → II -------------------------------------------------------------------------------------
    def _load_stage1(self, path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        file = path / "model.safetensors" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"{path}: no stage-I model (expected a model folder with model.safetensors)")
        state = load_file(str(file))
        own = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        own.update({f"ice.{k}": v for k, v in self.ice.state_dict().items()})
        missing = sorted(k for k in own if k not in state)
        if missing:
            raise CheckpointError(f"{file}: not a stage-I DINO-Med3D model of this size: {len(missing)} tensor(s) missing, "
                                  f"e.g. {', '.join(missing[:4])}")
        for key, value in own.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise CheckpointError(f"{file}: tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
        self.backbone.load_state_dict({k[len("backbone."):]: state[k] for k in own if k.startswith("backbone.")})
        self.ice.load_state_dict({k[len("ice."):]: state[k] for k in own if k.startswith("ice.")})

    def train(self, mode: bool = True):
        super().train(mode)
        if self.stage == 2 and self.use_sem:
            self.ice.eval()  # frozen parts behave the same in training and inference
        return self

    # -- the semantic stream ------------------------------------------------------------------------------
    def slice_features(self, volume: torch.Tensor) -> list[torch.Tensor]:
        """ICE + ViT on every slice (each with its K-slab): per layer, a pseudo-3D volume ``(B, E, D, h, w)``."""
        b, _, d = volume.shape[:3]
        tokens = self.ice(volume)  # (B*D, h, w, E)
        hw = tokens.shape[1:3]
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.layers]
        for start in range(0, tokens.shape[0], self.slice_batch):
            x, rope = embed_tokens(self.backbone, tokens[start:start + self.slice_batch])
            for i, f in enumerate(run_blocks(self.backbone, x, rope, hw, self.layers)):
                per_layer[i].append(f)
        out = []
        for chunks in per_layer:
            f = torch.cat(chunks, dim=0)  # (B*D, E, h, w)
            out.append(f.reshape(b, d, *f.shape[1:]).permute(0, 2, 1, 3, 4))
        return out

    def forward_central(self, slab: torch.Tensor) -> torch.Tensor:
        """Stage I on one K-slice slab ``(B, C, K, H, W)`` → logits of its central slice ``(B, nc, H, W)``."""
        if self.stage != 1:
            raise DinomedError("dinomed3d: forward_central is the stage-I proxy task; this model is stage II")
        check_input(slab, 5, self.in_chans, "dinomed3d")
        if slab.shape[2] != self.ice.k:
            raise DinomedError(f"dinomed3d: a stage-I slab has ice_k={self.ice.k} slices, found {slab.shape[2]}")
        h, w = slab.shape[-2:]
        slab, _ = pad_to_patch(slab)
        tokens = self.ice.forward_slab(slab)
        x, rope = embed_tokens(self.backbone, tokens)
        feats = run_blocks(self.backbone, x, rope, tokens.shape[1:3], self.layers)
        return self.proxy_head(torch.cat(feats, dim=1))[..., :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, 5, self.in_chans, "dinomed3d")
        b, _, d, h, w = x.shape
        xp, _ = pad_to_patch(x)
        if self.stage == 1:
            feats = self.slice_features(xp)
            flat = torch.cat([f.permute(0, 2, 1, 3, 4).reshape(b * d, *f.shape[1:2], *f.shape[3:]) for f in feats], 1)
            logits = self.proxy_head(flat)  # (B*D, nc, H, W)
            logits = logits.reshape(b, d, *logits.shape[1:]).permute(0, 2, 1, 3, 4)
            return logits[..., :h, :w]

        det = self.detail(xp) if self.use_det else None  # full, 1/2, 1/4
        if self.use_sem:
            pyramid = self.adapter(self.slice_features(xp))
            f = self.sem_proj(self.decoder(pyramid))  # 1/4 in-plane
        else:
            f = torch.zeros_like(det[2])
        if self.use_det:
            f = self.fusions[0](f, det[2])
        for i in range(2):
            f = self.refine[i](self.ups[i](f))
            if self.use_det:
                f = self.fusions[i + 1](f, det[1 - i])
        return self.classifier(f)[..., :h, :w]


@register_model("dinomed3d", defaults=DEFAULTS, spatial_dims=3,
                summary="DINO-Med3D: ICE, stage I proxy head / stage II LoRA + 3D adapter + HRSE + gated fusion + 3D UperNet")
def build_dinomed3d(cfg: dict, load_checkpoints: bool = True) -> nn.Module:
    return DINOMed3D(cfg)
