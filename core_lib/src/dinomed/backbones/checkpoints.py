"""Load DINOv3 backbones from the checkpoint formats found in the wild, exactly and safely.

Formats (detected from the keys, never from the file name):

``meta``
    Meta's official backbone ``.pth`` (``dinov3_vits16_pretrain_lvd1689m-*.pth``): keys ``cls_token``,
    ``storage_tokens``, ``mask_token``, ``rope_embed.periods``, ``blocks.N.attn.qkv.{weight,bias,bias_mask}``,
    ``blocks.N.ls1.gamma``, … (``dinov3/models/vision_transformer.py``).
``meta-train``
    A DINOv3 training checkpoint, ``{"teacher": {"backbone.…", "dino_head.…", "ibot_head.…"}}``
    (``dinov3/train/train.py: do_test``), which is also how MedDINOv3 ships; ``student``/``model`` dicts and a
    ``module.`` prefix are accepted too. The heads are pretraining-only and ignored.
``hf``
    A Hugging Face transformers ``DINOv3ViTModel`` folder (``config.json`` + ``model.safetensors``) or file:
    ``embeddings.*``, ``[model.]layer.N.attention.{q,k,v,o}_proj``, ``layer_scale{1,2}.lambda1``, ``mlp.{up,down}_proj``.
``timm``
    timm's own layout (``vit_*_patch16_dinov3[_qkvb]``): ``reg_token``, ``blocks.N.gamma_1``, ``attn.q_bias``, ….

Everything is converted to timm's layout (``timm.models.eva.Eva``). Safety: ``.safetensors`` files are read
with safetensors; anything else with ``torch.load(weights_only=True)``, which refuses a pickle that would run
code. Exactness: every tensor of the checkpoint is either placed, or named in the report as ignored
(pretraining-only) or unexpected; a missing tensor is an error unless ``strict=False``; a shape that does not
fit is always an error naming the file, the tensor, the expected and the found shape.

Two facts the conversion relies on: DINOv3 masks the key part of the qkv bias to zero (``bias_mask``), and
timm keeps that part as a fixed zero buffer, so a non-zero effective key bias is refused rather than dropped;
Meta's RoPE ``periods`` buffer is recomputed by timm and checked against the checkpoint's.
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .vit import BackboneArch, arch_from_sizes, create_backbone, patch_embed_for_channels, resolve_arch

FORMATS = ("meta", "meta-train", "hf", "timm")
PRETRAIN_ONLY = re.compile(r"^(mask_token|dino_head\..*|ibot_head\..*|local_cls_norm\..*|head\..*)$")


@dataclass
class LoadReport:
    """What ``load_backbone`` found and did, in words a user can act on."""

    path: str
    format: str
    arch: str
    embed_dim: int
    depth: int
    num_heads: int
    in_chans: int
    checkpoint_in_chans: int
    num_params: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"file:          {self.path}",
            f"format:        {self.format}",
            f"architecture:  {self.arch} (width {self.embed_dim}, depth {self.depth}, heads {self.num_heads})",
            f"input channels: {self.in_chans} (checkpoint: {self.checkpoint_in_chans})",
            f"parameters:    {self.num_params:,}",
            f"missing keys:  {', '.join(self.missing) if self.missing else 'none'}",
            f"unexpected keys: {', '.join(self.unexpected) if self.unexpected else 'none'}",
        ]
        if self.ignored:
            shown = ", ".join(self.ignored[:6]) + (f", … ({len(self.ignored)} in all)" if len(self.ignored) > 6 else "")
            lines.append(f"ignored (pretraining only): {shown}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# reading files safely


def _read_tensor_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None
    # torch.save writes a zip archive (PK..); before torch 1.6 a bare pickle (protocol 2-5: 0x80 0x02..0x05)
    if not (head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)):
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint ({len(head) if len(head) < 4 else 'its first 4'} bytes: {head!r}); "
            "expected a file written by torch.save (a zip archive) or a .safetensors file"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        import re

        wanted = re.search(r"(?:Unsupported global|GLOBAL|global)[^A-Za-z_]*([A-Za-z_][\w.]*\.[\w]+)", str(exc))
        what = f"it would import {wanted.group(1)}" if wanted else "it holds objects other than tensors"
        raise CheckpointError(
            f"{path}: refused to load: the checkpoint is a pickle that would run code ({what}); only safetensors and "
            "plain-tensor checkpoints load. Convert it where you trust it: "
            "torch.save(torch.load(f, weights_only=False)['model'], 'clean.pth')"
        ) from None
    except Exception as exc:  # a damaged archive raises RuntimeError, EOFError, KeyError, ValueError, …
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({text[:160]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    return obj


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, Path]:
    """The raw tensors of a checkpoint file or folder, its ``config.json`` if any, and the file read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    config = None
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        candidates += sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CheckpointError(
                f"{path}: folder holds no checkpoint; expected model.safetensors (Hugging Face or timm) or a .pth file"
            )
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        file = found
    else:
        file = path
        if (path.parent / "config.json").is_file() and path.suffix == ".safetensors":
            config = json.loads((path.parent / "config.json").read_text())
    return _read_tensor_file(file), config, file


# ---------------------------------------------------------------------------------------------------------
# format detection and conversion to timm's layout


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def detect_format(state: dict) -> tuple[str, dict]:
    """Return the format name and the backbone's flat tensor dict (training wrappers removed)."""
    for wrapper in ("teacher", "model_ema", "student", "model", "state_dict"):
        inner = state.get(wrapper)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            flat = inner
            for prefix in ("module.", "_orig_mod."):
                if all(k.startswith(prefix) for k in flat):
                    flat = _strip(flat, prefix)
            if any(k.startswith("backbone.") for k in flat):
                heads = [k for k in flat if not k.startswith("backbone.")]
                backbone = _strip(flat, "backbone.")
                return "meta-train", {**backbone, **{k: flat[k] for k in heads}}
            state = flat
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError("no tensors found (expected a backbone state dict or a 'teacher' dict)")
    keys = set(tensors)
    for prefix in ("module.", "backbone.", "dinov3."):
        if all(k.startswith(prefix) for k in keys):
            tensors = _strip(tensors, prefix)
            keys = set(tensors)
    if "storage_tokens" in keys or any(k.endswith(".ls1.gamma") for k in keys):
        return "meta", tensors
    if any(k.startswith("embeddings.") for k in keys) or any(re.match(r"^(model\.)?layer\.\d+\.attention\.", k) for k in keys):
        return "hf", tensors
    if "reg_token" in keys or any(k.endswith(".gamma_1") for k in keys):
        return "timm", tensors
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(
        f"not a DINOv3 ViT checkpoint: the keys (e.g. {sample}) match none of the formats {', '.join(FORMATS)}"
    )


def _split_qkv_bias(name: str, bias: torch.Tensor, mask: torch.Tensor | None, ctx: str) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is not None:
        bias = bias * mask.to(bias.dtype)
    q, k, v = bias.chunk(3)
    if torch.count_nonzero(k):
        raise CheckpointError(
            f"{ctx}: tensor {name} has a non-zero key bias; DINOv3 masks it to zero and this loader cannot place it"
        )
    return q, v


def meta_to_timm(state: dict, ctx: str = "checkpoint") -> tuple[dict, list[str]]:
    out, ignored = {}, []
    for key, value in state.items():
        if key.endswith(".bias_mask") or key == "rope_embed.periods":
            continue
        if PRETRAIN_ONLY.match(key):
            ignored.append(key)
            continue
        m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.bias$", key)
        if m:
            mask = state.get(key + "_mask")
            q, v = _split_qkv_bias(key, value, mask, ctx)
            out[f"blocks.{m.group(1)}.attn.q_bias"] = q
            out[f"blocks.{m.group(1)}.attn.v_bias"] = v
            continue
        new = key.replace("storage_tokens", "reg_token").replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        out[new] = value
    return out, ignored


_HF_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj",
    "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2",
    "layer_scale1.lambda1": "gamma_1", "layer_scale2.lambda1": "gamma_2",
}


def hf_to_timm(state: dict, ctx: str = "checkpoint") -> tuple[dict, list[str]]:
    out, ignored, qkv = {}, [], {}
    for key, value in state.items():
        key_n = key[len("model."):] if key.startswith("model.layer.") else key
        if key_n == "embeddings.mask_token":
            ignored.append(key)
            continue
        simple = {
            "embeddings.cls_token": "cls_token",
            "embeddings.register_tokens": "reg_token",
            "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
            "norm.weight": "norm.weight",
            "norm.bias": "norm.bias",
        }
        if key_n in simple:
            out[simple[key_n]] = value
            continue
        m = re.match(r"^layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", key_n)
        if not m:
            out[key] = value  # reported as unexpected by the loader
            continue
        idx, inner, kind = m.groups()
        if inner.startswith("mlp.gate_proj"):
            raise CheckpointError(f"{ctx}: {key}: gated (SwiGLU) MLPs (ViT-S+/H+/7B) are not supported; use ViT-S/B/L")
        pm = re.match(r"^attention\.([qkv])_proj$", inner)
        if pm:
            qkv.setdefault(idx, {})[(pm.group(1), kind)] = value
            continue
        if kind == "lambda1":
            target = _HF_BLOCK.get(f"{inner}.lambda1")
            out[f"blocks.{idx}.{target}"] = value
            continue
        target = _HF_BLOCK.get(inner)
        out[f"blocks.{idx}.{target}.{kind}" if target else key] = value
    for idx, parts in qkv.items():
        try:
            out[f"blocks.{idx}.attn.qkv.weight"] = torch.cat([parts[("q", "weight")], parts[("k", "weight")], parts[("v", "weight")]])
        except KeyError as exc:
            raise CheckpointError(f"{ctx}: layer {idx} lacks attention.{exc.args[0][0]}_proj.weight") from None
        if ("k", "bias") in parts and torch.count_nonzero(parts[("k", "bias")]):
            raise CheckpointError(f"{ctx}: layer.{idx}.attention.k_proj.bias is non-zero; DINOv3 keeps the key bias at zero")
        if ("q", "bias") in parts:
            out[f"blocks.{idx}.attn.q_bias"] = parts[("q", "bias")]
        if ("v", "bias") in parts:
            out[f"blocks.{idx}.attn.v_bias"] = parts[("v", "bias")]
    return out, ignored


def timm_to_meta(model: nn.Module, mask_token: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The inverse conversion: a timm DINOv3 backbone as Meta's backbone state dict (``export-backbone``)."""
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone().cpu()
        m = re.match(r"^blocks\.(\d+)\.attn\.(q_bias|v_bias)$", key)
        if m:
            if m.group(2) == "v_bias":
                continue
            i = m.group(1)
            q = value
            v = model.state_dict()[f"blocks.{i}.attn.v_bias"].detach().clone().cpu()
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
            out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones_like(q), torch.zeros_like(q), torch.ones_like(v)])
            continue
        new = key.replace("reg_token", "storage_tokens").replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[new] = value
    dim = model.embed_dim
    out["mask_token"] = (mask_token.detach().reshape(1, dim).clone().cpu() if mask_token is not None else torch.zeros(1, dim))
    out["rope_embed.periods"] = model.rope.periods.detach().clone().cpu().float()
    return out


# ---------------------------------------------------------------------------------------------------------
# architecture inference


def infer_arch(state: dict, config: dict | None) -> tuple[BackboneArch, int]:
    """Architecture and input channels of a timm-layout state dict (plus a Hugging Face ``config.json``'s hints)."""
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise CheckpointError("cannot infer the architecture: the checkpoint lacks cls_token or the patch embedding")
    embed_dim = state["cls_token"].shape[-1]
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))), default=-1)
    in_chans = state["patch_embed.proj.weight"].shape[1]
    num_heads = None
    if config is not None and config.get("num_attention_heads"):
        num_heads = int(config["num_attention_heads"])
    elif "rope_embed.periods" in state:
        head_dim = 4 * state["rope_embed.periods"].numel()
        num_heads = embed_dim // head_dim
    spec = arch_from_sizes(embed_dim, depth, num_heads)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.shape[0] != int(spec.mlp_ratio * embed_dim):
        spec = BackboneArch(spec.name + "_custom_mlp", spec.timm_name, embed_dim, depth, spec.num_heads,
                            mlp_ratio=fc1.shape[0] / embed_dim)
    return spec, in_chans


def load_backbone(
    path: str | Path,
    arch: str | None = None,
    in_chans: int | None = None,
    strict: bool = True,
    img_size: int = 224,
) -> nn.Module:
    """Load a DINOv3 ViT backbone from any of the four formats into timm's layout.

    ``arch`` (e.g. ``"vit_small"``) is inferred when not given. ``in_chans`` adapts an RGB checkpoint to 1 or
    2 input channels (see :func:`~dinomed.backbones.vit.patch_embed_for_channels`). The returned model has a
    ``load_report`` attribute (:class:`LoadReport`); ``strict=False`` tolerates missing tensors (listed there).
    """
    raw, config, file = read_checkpoint(path)
    ctx = str(file)
    try:
        fmt, flat = detect_format(raw)
    except CheckpointError as exc:
        raise CheckpointError(f"{file}: {exc}") from None
    if fmt in ("meta", "meta-train"):
        periods = flat.get("rope_embed.periods")
        state, ignored = meta_to_timm(flat, ctx)
        hint_state = dict(state, **({"rope_embed.periods": periods} if periods is not None else {}))
    elif fmt == "hf":
        if config is not None and config.get("use_gated_mlp"):
            raise CheckpointError(f"{ctx}: gated (SwiGLU) MLP models are not supported; use ViT-S/B/L")
        state, ignored = hf_to_timm(flat, ctx)
        periods, hint_state = None, state
    else:
        state = {k: v for k, v in flat.items() if not k.startswith("rope.")}
        ignored = [k for k in state if PRETRAIN_ONLY.match(k)]
        state = {k: v for k, v in state.items() if k not in ignored}
        periods, hint_state = None, state

    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    try:
        inferred, ckpt_chans = infer_arch(hint_state, config)
    except CheckpointError as exc:
        raise CheckpointError(f"{ctx}: {exc}") from None
    spec = resolve_arch(arch) if arch else inferred
    target_chans = in_chans or ckpt_chans
    notes: list[str] = []
    if fmt == "hf" and config is not None:
        if float(config.get("rope_theta", 100.0)) != 100.0:
            raise CheckpointError(f"{ctx}: rope_theta {config.get('rope_theta')} differs from DINOv3's 100")
        if int(config.get("num_register_tokens", 4)) != spec.num_reg_tokens and "reg_token" in state:
            spec = BackboneArch(spec.name, spec.timm_name, spec.embed_dim, spec.depth, spec.num_heads,
                                spec.mlp_ratio, int(config["num_register_tokens"]))
    reg = state.get("reg_token")
    num_reg = reg.shape[1] if reg is not None else spec.num_reg_tokens
    overrides = {}
    if num_reg != 4:
        overrides["num_reg_tokens"] = num_reg
        if num_reg == 0:
            state.pop("reg_token", None)
    model = create_backbone(spec, in_chans=target_chans, img_size=img_size, **overrides)

    weight_key = "patch_embed.proj.weight"
    if weight_key in state and state[weight_key].shape[1] != target_chans:
        state[weight_key] = patch_embed_for_channels(state[weight_key], target_chans)
        notes.append(
            f"patch embedding adapted from {ckpt_chans} to {target_chans} input channels "
            "(RGB kernels summed, divided by the channel count)"
        )

    expected = model.state_dict()
    if fmt == "timm":
        for i in range(spec.depth):
            for name in ("q_bias", "v_bias"):
                key = f"blocks.{i}.attn.{name}"
                if key in expected and key not in state and f"blocks.{i}.attn.qkv.weight" in state:
                    state[key] = torch.zeros_like(expected[key])
                    if i == 0 and name == "q_bias":
                        notes.append("checkpoint has no qkv bias (timm's bias-free variant): q/v biases set to zero, as in that model")
    if periods is not None:
        own = model.rope.periods.float()
        if periods.shape != own.shape or not torch.allclose(periods.float(), own, rtol=1e-4, atol=1e-6):
            raise CheckpointError(
                f"{ctx}: rope_embed.periods {tuple(periods.shape)} does not match DINOv3's RoPE for this architecture "
                f"(expected {tuple(own.shape)} with base 100)"
            )

    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    for key in sorted(set(expected) & set(state)):
        if tuple(expected[key].shape) != tuple(state[key].shape):
            raise CheckpointError(
                f"{ctx}: tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)} "
                f"for {spec.name} (width {spec.embed_dim}, depth {spec.depth}, {target_chans} input channels)"
            )
    if missing and strict:
        raise CheckpointError(
            f"{ctx}: {len(missing)} tensor(s) of {spec.name} missing from the {fmt} checkpoint: {', '.join(missing[:10])}"
            + (" …" if len(missing) > 10 else "")
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    model.eval()
    model.load_report = LoadReport(
        path=str(file), format=fmt, arch=spec.name, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, in_chans=target_chans, checkpoint_in_chans=ckpt_chans,
        num_params=sum(p.numel() for p in model.parameters()), missing=missing, unexpected=unexpected,
        ignored=sorted(ignored), notes=notes,
    )
    return model


def save_meta_backbone(model: nn.Module, path: str | Path, mask_token: torch.Tensor | None = None) -> Path:
    """Write a backbone as Meta's DINOv3 ``.pth`` (plain tensors; loadable with weights_only=True), atomically."""
    from ..atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(timm_to_meta(model, mask_token), tmp)
    return path
