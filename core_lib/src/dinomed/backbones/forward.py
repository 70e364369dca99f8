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

Inference on the CPU (no autograd) runs each block through :func:`block_forward`, which computes timm's
``EvaBlock.forward`` with fewer passes over memory (:func:`_eva_block_inference`); everything else, and every block
it does not recognise, runs timm's own code.
"""
from __future__ import annotations

from typing import Sequence

from .. import _timm  # noqa: F401  (first: timm without importing torch._dynamo; see there)

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.eva import EvaAttention, EvaBlock
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
    ``(map, prefix tokens (B, 1 + registers, C))``. timm's public ``forward_intermediates``; on the CPU without
    autograd the same steps with the blocks through :func:`block_forward`."""
    if (_inference_runtime(images) and len(backbone.blocks) and _eva_block_supported(backbone.blocks[0])
            and not getattr(backbone, "rope_mixed", False) and all(0 <= int(i) < len(backbone.blocks) for i in layers)):
        tokens = backbone.patch_embed(images)  # (B, h, w, D)
        x, rope = embed_tokens(backbone, tokens)
        return run_blocks(backbone, x, rope, tuple(tokens.shape[1:3]), sorted({int(i) for i in layers}), norm=norm,
                          prefix=prefix)
    return backbone.forward_intermediates(images, indices=list(layers), return_prefix_tokens=prefix, norm=norm,
                                          stop_early=True, output_fmt="NCHW", intermediates_only=True)


def _is_plain(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _inference_runtime(x: torch.Tensor) -> bool:
    """The run-time side of :func:`inference_block_applies`: float32 on the CPU, no autograd, no autocast, outside
    torch.compile and tracing (compiled and traced graphs see timm's modules)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not torch.jit.is_scripting())


def _eva_block_supported(block: nn.Module) -> bool:
    """A timm ``EvaBlock`` in eval mode of the DINOv3 layout: fused qkv with its biases, half-rotation RoPE, fused
    attention, no q/k norm, no gate, a GELU ``Mlp`` without norm."""
    if type(block) is not EvaBlock or block.training:
        return False
    attn, mlp = block.attn, block.mlp
    return (type(attn) is EvaAttention and attn.qkv is not None and not getattr(attn, "qkv_bias_separate", False)
            and attn.fused_attn and getattr(attn, "rotate_half", False) and getattr(attn, "gate", None) is None
            and all(_is_plain(getattr(attn, n, None)) for n in ("q_norm", "k_norm", "norm"))
            and type(mlp) is Mlp and isinstance(mlp.act, nn.GELU) and _is_plain(mlp.norm))


def inference_block_applies(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> bool:
    """Whether :func:`block_forward` runs ``block`` through :func:`_eva_block_inference`: a block of the DINOv3
    layout (:func:`_eva_block_supported`), float32 tokens on the CPU without autograd (:func:`_inference_runtime`),
    and a RoPE tensor of one row per patch token."""
    if not (_inference_runtime(x) and _eva_block_supported(block)):
        return False
    if rope is not None:
        attn = block.attn
        head_dim = attn.qkv.out_features // 3 // attn.num_heads
        if (rope.dtype != torch.float32 or head_dim % 2
                or tuple(rope.shape) != (x.shape[1] - attn.num_prefix_tokens, 2 * head_dim)):
            return False
    return True


def _eva_block_inference(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """timm's ``EvaBlock.forward`` (DINOv3 layout, eval, no mask) with fewer passes over memory, for the CPU.

    The same arithmetic in the same order, up to float rounding: RoPE is applied in place to the q and k patch
    tokens inside the qkv product's output (timm slices q and k, builds the rotated half by a negation and a
    concatenation, and concatenates the prefix tokens back: six whole-tensor passes and as many allocations per
    block), and the LayerScaled residuals are one ``addcmul`` each instead of a product and a sum. Measured on 2 CPU
    threads, ViT-S encoder on eight 256² slices, alternating with timm's path in one process (25 rounds):
    median 612 vs 651 ms; outputs within 1.2e-7 (``tests/test_backbones.py``)."""
    attn = block.attn
    b, n, _ = x.shape
    heads = attn.num_heads
    width = attn.qkv.out_features // 3
    dim = width // heads
    bias = attn.qkv.bias if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = F.linear(block.norm1(x), attn.qkv.weight, bias).view(b, n, 3, heads, dim)
    if rope is not None:
        # out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]: by halves, in place
        half = dim // 2
        sin, cos = (t[:, None, None, :] for t in rope.chunk(2, -1))  # (n_patch, 1, 1, dim)
        qk = qkv[:, attn.num_prefix_tokens:, :2]  # (B, n_patch, 2, heads, dim): q and k of the patch tokens
        x1, x2 = qk[..., :half], qk[..., half:]
        first = x1.clone()
        x1.mul_(cos[..., :half]).addcmul_(x2, sin[..., :half], value=-1.0)
        x2.mul_(cos[..., half:]).addcmul_(first, sin[..., half:])
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, dim) each
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, width)
    o = attn.proj(o)
    x = x + o if block.gamma_1 is None else torch.addcmul(x, block.gamma_1, o)
    mlp = block.mlp
    h = mlp.fc2(mlp.act(mlp.fc1(block.norm2(x))))
    return x + h if block.gamma_2 is None else torch.addcmul(x, block.gamma_2, h)


def block_forward(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """``block(x, rope=rope)``, through :func:`_eva_block_inference` where :func:`inference_block_applies`."""
    if inference_block_applies(block, x, rope):
        return _eva_block_inference(block, x, rope)
    return block(x, rope=rope)


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
    norm: bool = True, prefix: bool = False,
) -> list:
    """Run the blocks on the token sequence ``x`` (from :func:`embed_tokens`) up to the last of ``layers``; return the
    patch-token maps of ``layers`` (with ``prefix``, pairs with the prefix tokens), as :func:`vit_features` does for
    images."""
    feats = []
    for i, blk in enumerate(backbone.blocks[: max(layers) + 1]):
        x = block_forward(blk, x, rope)
        if i in layers:
            y = backbone.norm(x) if norm else x
            grid = tokens_to_grid(backbone, y, hw, norm=False)
            feats.append((grid, y[:, :backbone.num_prefix_tokens]) if prefix else grid)
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
        x = block_forward(block, x, rope)
    x = backbone.norm(x)
    n_prefix = backbone.num_prefix_tokens
    return {"cls": x[:, 0], "storage": x[:, 1:n_prefix], "patch": x[:, n_prefix:], "grid": (h, w)}
