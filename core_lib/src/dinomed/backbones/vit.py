"""DINOv3 vision transformers, built through timm (``timm.models.eva``).

DINOv3 (Siméoni et al., 2025, arXiv:2508.10104, sec. 3 and table 14): ViT with patch size 16, rotary position
embeddings (RoPE, base 100, coordinates normalised per axis), one CLS token and 4 register ("storage") tokens,
LayerScale (init 1e-5), LayerNorm (eps 1e-5), a plain GELU MLP for S/B/L, and a query/value bias whose key part
is masked to zero. timm's ``vit_*_patch16_dinov3_qkvb`` models are exactly this layout, with a dynamic image
size, so that every bias of a released checkpoint has a place to go (the variants without ``_qkvb`` drop them).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import _timm  # noqa: F401  (first: timm without importing torch._dynamo; see there)

import timm
import torch
from torch import nn

from ..errors import DinomedError


@dataclass(frozen=True)
class BackboneArch:
    name: str
    timm_name: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_reg_tokens: int = 4
    patch_size: int = 16

    @property
    def overrides(self) -> dict:
        return dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)


BACKBONE_ARCHS: dict[str, BackboneArch] = {
    # width 64, depth 4: the size used in tests and the bundled demo model
    "vit_tiny": BackboneArch("vit_tiny", "vit_small_patch16_dinov3_qkvb", 64, 4, 2),
    "vit_small": BackboneArch("vit_small", "vit_small_patch16_dinov3_qkvb", 384, 12, 6),
    "vit_base": BackboneArch("vit_base", "vit_base_patch16_dinov3_qkvb", 768, 12, 12),
    "vit_large": BackboneArch("vit_large", "vit_large_patch16_dinov3_qkvb", 1024, 24, 16),
}
# Names people use for the same sizes (Meta's hub names, timm's names).
ARCH_ALIASES = {
    "tiny": "vit_tiny", "vitt16": "vit_tiny",
    "small": "vit_small", "s": "vit_small", "vits16": "vit_small", "dinov3_vits16": "vit_small",
    "vit_small_patch16_dinov3": "vit_small", "vit_small_patch16_dinov3_qkvb": "vit_small",
    "base": "vit_base", "b": "vit_base", "vitb16": "vit_base", "dinov3_vitb16": "vit_base",
    "vit_base_patch16_dinov3": "vit_base", "vit_base_patch16_dinov3_qkvb": "vit_base",
    "large": "vit_large", "l": "vit_large", "vitl16": "vit_large", "dinov3_vitl16": "vit_large",
    "vit_large_patch16_dinov3": "vit_large", "vit_large_patch16_dinov3_qkvb": "vit_large",
}


def resolve_arch(arch: str) -> BackboneArch:
    key = ARCH_ALIASES.get(arch.lower(), arch.lower())
    if key not in BACKBONE_ARCHS:
        raise DinomedError(
            f"unknown backbone architecture {arch!r}; expected one of {sorted(BACKBONE_ARCHS)} (or a known alias)"
        )
    return BACKBONE_ARCHS[key]


def arch_from_sizes(embed_dim: int, depth: int, num_heads: int | None = None) -> BackboneArch:
    """The named architecture with these sizes, or a custom one (a checkpoint of another size still loads)."""
    for arch in BACKBONE_ARCHS.values():
        if arch.embed_dim == embed_dim and arch.depth == depth and (num_heads is None or arch.num_heads == num_heads):
            return arch
    if num_heads is None:
        known = {a.embed_dim: a.num_heads for a in BACKBONE_ARCHS.values()}
        if embed_dim not in known:
            raise DinomedError(
                f"cannot infer the number of attention heads for width {embed_dim}; pass arch= explicitly"
            )
        num_heads = known[embed_dim]
    base = "vit_large_patch16_dinov3_qkvb" if embed_dim >= 1024 else "vit_small_patch16_dinov3_qkvb"
    return BackboneArch(f"vit_custom_{embed_dim}x{depth}", base, embed_dim, depth, num_heads)


def default_layers(depth: int, count: int = 4) -> tuple[int, ...]:
    """Four evenly spaced blocks, ending with the last: (2, 5, 8, 11) for 12 blocks, (5, 11, 17, 23) for 24."""
    count = min(count, depth)
    return tuple(round((i + 1) * depth / count) - 1 for i in range(count))


def create_backbone(
    arch: str | BackboneArch = "vit_small",
    in_chans: int = 1,
    img_size: int | tuple[int, int] = 224,
    **overrides,
) -> nn.Module:
    """A randomly initialised DINOv3 ViT (timm ``Eva``) returning features, no classifier.

    ``img_size`` only sets the default grid: the model accepts any input whose sides are multiples of 16
    (``dynamic_img_size``). ``overrides`` go to timm (e.g. ``drop_path_rate=0.1``).
    """
    spec = arch if isinstance(arch, BackboneArch) else resolve_arch(arch)
    kwargs = dict(spec.overrides)
    kwargs.update(num_classes=0, global_pool="token", in_chans=in_chans, img_size=img_size)
    kwargs.update(overrides)
    model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    model.dinomed_arch = spec.name  # the name model.json records
    return model


def patch_embed_for_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a pretrained RGB patch embedding ``(D, 3, p, p)`` to ``in_chans`` input channels.

    Each new channel gets the sum of the RGB kernels divided by ``in_chans``: a grey image fed to all
    channels then gives exactly the response the RGB model gives to that grey image replicated in R, G and B.
    For 1 channel this is timm's ``adapt_input_conv`` (the RGB kernels summed); for CT+PET in 2 channels each
    starts from half the summed kernel, so neither modality is dropped and the sum of both is preserved.
    """
    if weight.shape[1] == in_chans:
        return weight
    if weight.shape[1] != 3:
        raise DinomedError(
            f"cannot adapt a patch embedding with {weight.shape[1]} input channels to {in_chans}; "
            "only RGB (3-channel) checkpoints are adapted"
        )
    summed = weight.sum(dim=1, keepdim=True)
    return summed.repeat(1, in_chans, 1, 1) / in_chans
