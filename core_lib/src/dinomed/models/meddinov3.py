"""MedDINOv3: a plain DINOv3 ViT with multi-scale token aggregation and a light upsampling decoder (2D).

Li et al., "MedDINOv3: How to adapt vision foundation models for medical image segmentation?",
arXiv:2509.02379, sec. 3 (revisiting plain ViTs) and Fig. 2c, built as the official code builds it
(github.com/ricklisz/MedDINOv3, ``nnUNet/.../dinov3/models/primus.py``: ``Primus_Multiscale`` with
``PatchDecode``, trained by ``meddinov3_base_primus_multiscale_Trainer``):

* the patch tokens of four evenly spaced blocks (``interaction_indices`` 2, 5, 8, 11 of ViT-B), each normalised by
  the backbone's final LayerNorm (DINOv3 ``get_intermediate_layers(norm=True)``), concatenated along channels
  (4·width);
* ``PatchDecode``: log2(16) = 4 stages of [ConvTranspose 2×2, stride 2 → LayerNorm over channels → GELU], the
  channels halving from 4·width (3072 → 1536 → 768 → 384 → 192 for ViT-B), then a 1×1 convolution to the classes;
  weights He-initialised (``InitWeights_He(1e-2)``), biases zero. ~25.1 M parameters for ViT-B.
* a grey CT slice is fed to the RGB patch embedding by repetition (``x.repeat(1, 3, 1, 1)``), i.e. the summed
  kernel, which is what :func:`dinomed.backbones.load_backbone` gives a 1-channel model.

High-resolution training (the paper's main lever: slices at 896², spacing rescaled) is a preprocessing setting,
not an architecture one: ``preprocessing.input_scale`` / ``target_spacing`` of the finetuning recipe, recorded in
model.json and applied by ``dinomed segment``. RoPE makes the backbone size-agnostic; any H, W is accepted
(zero-padded to multiples of 16, logits cropped back).

Config (``architecture`` of model.json): ``backbone``, ``in_chans``, ``num_classes``, ``layers`` (null: four
evenly spaced), ``decoder``, ``drop_path_rate`` (official 0.2, set in the recipe), ``backbone_checkpoint``
(initialises the encoder; not needed to load a model folder), ``freeze_backbone``.

Named option ``decoder: progressive`` (with ``decoder_channels``, 4 widths): our earlier light decoder, a 1×1
projection to ``decoder_channels[0]`` then four ×2 stages of [transposed conv + GroupNorm + GELU, 3×3 conv +
GroupNorm + GELU]. It has ~2 M parameters instead of ~25 M at ViT-B and a 3×3 refinement per scale, which suits
small models and CPU training (the bundled demo models use it). A model.json written before ``decoder`` existed
names ``decoder_channels`` only and is read as ``progressive``, the decoder it was trained with. Named option
``detail_channels`` (progressive decoder only; 0 = off): a detail-recovery stream with gated fusion on the input
image at full resolution, after DINO-Med3D sec. 2.3.2 (:class:`dinomed.models.common.DetailStream2d`); the
bundled demo models use it for lesions smaller than a patch.
Input ``(B, C, H, W)``; output logits ``(B, num_classes, H, W)``.
"""
from __future__ import annotations

import math
from typing import Sequence

from .. import _timm  # noqa: F401  (first: timm without importing torch._dynamo; see there)

import torch
from timm.layers import LayerNorm2d
from torch import nn

from ..backbones.forward import pad_to_patch, vit_features
from ..errors import DinomedError
from .common import ProgressiveUpsamplingDecoder, aggregation_layers, check_input, freeze, make_backbone
from .registry import register_model

class PatchDecode(nn.Module):
    """Official MedDINOv3 decoder: log2(patch) × [ConvTranspose 2×2 → LayerNorm (channels) → GELU], channels halving
    from ``in_channels``, then a 1×1 convolution to ``num_classes``."""

    def __init__(self, in_channels: int, num_classes: int, patch: int = 16):
        super().__init__()
        n = int(math.log2(patch))
        if 2 ** n != patch:
            raise DinomedError(f"meddinov3: the patch size must be a power of 2, found {patch}")
        ch = [in_channels]
        for _ in range(n):
            ch.append(ch[-1] // 2)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(ch[i], ch[i + 1], 2, stride=2), LayerNorm2d(ch[i + 1], eps=1e-6), nn.GELU())
            for i in range(n))
        self.classifier = nn.Conv2d(ch[-1], num_classes, 1)
        self.channels = ch
        for m in self.modules():  # nnU-Net's InitWeights_He(1e-2)
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, a=1e-2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_major_applies(x):
            return self.forward_token_major(x)
        for stage in self.stages:
            x = stage(x)
        return self.classifier(x)

    def token_major_applies(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` runs :meth:`forward_token_major` for ``x``: on the CPU, without autograd, outside
        torch.compile and tracing (traced and exported graphs keep the modules)."""
        return (x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing())

    @torch.no_grad()
    def forward_token_major(self, x: torch.Tensor, chunk_tokens: int = 128, labels: bool = False) -> torch.Tensor:
        """The same decoder computed token by token, what inference (no autograd) runs.

        A 2×2 stride-2 transposed convolution has no overlap, the LayerNorm is over the channels of one pixel and GELU
        and the 1×1 classifier act per pixel, so each token's 16×16 output patch depends on that token alone: every
        stage is one matrix product ``(pixels, C_in) @ (C_in, 4·C_out)`` on token-major rows followed by a LayerNorm
        over the contiguous last dimension, and the patches are placed into the image once, at the end. Run over a
        few token rows at a time (``chunk_tokens``), the intermediates stay small and in cache instead of four
        full-resolution NCHW maps (94 M values for eight 256² ViT-S slices) allocated, permuted for LayerNorm2d and
        freed each batch. Measured on 2 CPU threads, eight 256² ViT-S slices: 871 → 634 ms, same logits within 1e-5
        (``benchmarks/inference.py``; tests check it against :meth:`forward` through the modules). CPU only: on a GPU
        the modules run as they are (the per-chunk loop would cost kernel launches; not measured there).

        ``labels``: return the label map ``(B, 16H, 16W)`` uint8 (the index of the largest logit, the first on a tie:
        ``forward(x).max(1).indices``) instead of the logits: the argmax runs over each chunk's contiguous classes and
        only one byte per pixel is placed into the image, instead of K floats placed and then reduced over a strided
        class axis (eight 256² ViT-S slices, 10 classes: about 60 ms less per batch, measured in
        ``benchmarks/inference.py``'s argmax and model stages).
        """
        b, c, h, w = x.shape
        n = len(self.stages)
        s = 2 ** n
        k = self.classifier.out_channels
        stages = [(conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, 4 * conv.out_channels),
                   conv.bias.repeat(4), norm, act.approximate) for conv, norm, act in self.stages]
        w_cls = self.classifier.weight.reshape(k, -1).t()
        if labels and k > 256:
            raise DinomedError(f"PatchDecode: a uint8 label map holds at most 256 classes, the classifier has {k}")
        out = x.new_empty(b, h * s, w * s, dtype=torch.uint8) if labels else x.new_empty(b, k, h * s, w * s)
        # the first stage over the whole batch (its product is the largest and runs best with many rows: 2048 x 1536
        # x 3072 at 99% of a 2048^3 matmul, 80% in chunks of 128 tokens); its output (4 pixels per token) is small
        weight, bias, norm, approximate = stages[0]
        t = torch.addmm(bias, x.permute(0, 2, 3, 1).reshape(-1, c), weight).view(-1, weight.shape[1] // 4)
        t = nn.functional.gelu(nn.functional.layer_norm(t, t.shape[1:], norm.weight, norm.bias, norm.eps),
                               approximate=approximate)
        first = t.view(b, h, w * 4, -1)  # token-major: a row of tokens is a contiguous block
        rows = max(1, chunk_tokens // w)
        # patch layout of the last product: (row, col, i1, j1, ..., in, jn, class) -> (class, row, i1..in, col, j1..jn)
        order = [2 * n + 2, 0, *range(2, 2 * n + 2, 2), 1, *range(3, 2 * n + 3, 2)]
        if labels:  # the same without the class axis
            order = order[1:]
        for i in range(b):
            for y0 in range(0, h, rows):
                y1 = min(h, y0 + rows)
                t = first[i, y0:y1].reshape(-1, first.shape[-1])
                for weight, bias, norm, approximate in stages[1:]:
                    t = torch.addmm(bias, t, weight).view(-1, weight.shape[1] // 4)
                    t = nn.functional.gelu(nn.functional.layer_norm(t, t.shape[1:], norm.weight, norm.bias, norm.eps),
                                           approximate=approximate)
                t = torch.addmm(self.classifier.bias, t, w_cls)
                if labels:
                    t = t.argmax(dim=1).to(torch.uint8).view(y1 - y0, w, *([2] * (2 * n)))
                    out[i, y0 * s:y1 * s].view(y1 - y0, *([2] * n), w, *([2] * n)).copy_(t.permute(*order))
                else:
                    t = t.view(y1 - y0, w, *([2] * (2 * n)), k)
                    out[i, :, y0 * s:y1 * s].view(k, y1 - y0, *([2] * n), w, *([2] * n)).copy_(t.permute(*order))
        return out


def upgrade_meddinov3(arch: dict) -> dict:
    """A model.json from before ``decoder`` existed (it names ``decoder_channels``, and the old informational
    ``high_res`` flag) was trained with the progressive decoder: say so explicitly."""
    if "decoder" not in arch and "decoder_channels" in arch:
        arch["decoder"] = "progressive"
    arch.pop("high_res", None)
    return arch


@register_model("meddinov3", spatial_dims=2, upgrade=upgrade_meddinov3,
                summary="MedDINOv3 (2D): multi-scale token aggregation + PatchDecode (official)")
class MedDINOv3(nn.Module):
    """DINOv3 ViT encoder → four normalised intermediate token maps, concatenated → PatchDecode.

    ``layers``: the aggregated blocks (default four evenly spaced: 2, 5, 8, 11 of 12); ``decoder``: ``patch_decode``
    (the paper's) or ``progressive`` (our earlier decoder, widths ``decoder_channels``); ``backbone_checkpoint``: a
    backbone in any format ``load_backbone`` reads, used only when building for training.
    """

    spatial_dims = 2

    def __init__(self, *, num_classes: int, backbone: str = "vit_base", in_chans: int = 1,
                 layers: Sequence[int] | None = None, decoder: str = "patch_decode",
                 decoder_channels: Sequence[int] = (256, 128, 64, 32), detail_channels: int = 0,
                 drop_path_rate: float = 0.0,
                 freeze_backbone: bool = False, backbone_checkpoint: str | None = None):
        super().__init__()
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.backbone = make_backbone(backbone, in_chans, backbone_checkpoint, drop_path_rate)
        self.layers = aggregation_layers(self.backbone, layers)
        width = self.backbone.embed_dim * len(self.layers)
        if detail_channels and decoder != "progressive":
            raise DinomedError("meddinov3: detail_channels (the detail stream) is an option of the progressive decoder; "
                               "set decoder: progressive or detail_channels: 0")
        self.detail = bool(detail_channels)
        if decoder == "patch_decode":
            self.decoder = PatchDecode(width, num_classes)
        elif decoder == "progressive":
            self.decoder = ProgressiveUpsamplingDecoder(width, num_classes, decoder_channels, detail_channels, in_chans)
        else:
            raise DinomedError(f"meddinov3: decoder must be 'patch_decode' (the paper's) or 'progressive', "
                               f"found {decoder!r}")
        if freeze_backbone:
            freeze(self.backbone)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The aggregated token maps ``(B, C, ceil(H/16), ceil(W/16))``, one per layer in ``self.layers``."""
        x, _ = pad_to_patch(x)
        return vit_features(self.backbone, x, self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._decode(x, labels=False)

    def predict_labels(self, x: torch.Tensor) -> torch.Tensor:
        """The label map ``(B, H, W)`` (uint8 on the CPU with PatchDecode, else int64): ``forward(x).max(1).indices``
        (the first largest logit on a tie), what :func:`dinomed.inference.predict.predict_volume` asks for. With
        PatchDecode on the CPU without autograd the argmax is taken before the patches are placed
        (:meth:`PatchDecode.forward_token_major` with ``labels=True``); otherwise from the logits."""
        if not isinstance(self.decoder, PatchDecode) or not self.decoder.token_major_applies(x):
            return self(x).max(dim=1).indices
        return self._decode(x, labels=True)

    def _decode(self, x: torch.Tensor, labels: bool) -> torch.Tensor:
        check_input(x, 4, self.in_chans, "meddinov3")
        h, w = x.shape[-2:]
        x, _ = pad_to_patch(x)  # once: forward_features finds it aligned
        feats = torch.cat(self.forward_features(x), dim=1)
        if labels:
            out = self.decoder.forward_token_major(feats, labels=True)
        else:
            out = self.decoder(feats, image=x) if self.detail else self.decoder(feats)
        return out[..., :h, :w]
