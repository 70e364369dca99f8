"""Backbones: every checkpoint format loads exactly into timm's layout, safely, with clear errors."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from dinomed.backbones import (
    create_backbone,
    default_layers,
    extract_features,
    load_backbone,
    patch_embed_for_channels,
    save_meta_backbone,
    timm_to_meta,
)
from dinomed.cli import main
from dinomed.errors import CheckpointError, DinomedError


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (biases, LayerScale, norms, tokens) a random value: default init (zeros/ones)
    would hide a tensor that the conversion dropped."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)
    return model


def tiny(in_chans=1, seed=0):
    return randomize_(create_backbone("vit_tiny", in_chans=in_chans, img_size=64), seed).eval()


# ---- the Hugging Face reference ---------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def make_hf_reference(tmp_path: Path, num_channels=1):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256, num_channels=num_channels,
        image_size=64, patch_size=16, num_register_tokens=4, layerscale_value=1.0,
    )
    torch.manual_seed(1)
    ref = DINOv3ViTModel(config)
    randomize_(ref, seed=1)
    ref.eval()
    folder = tmp_path / "hf_model"
    ref.save_pretrained(folder)
    return ref, folder


def test_hf_folder_matches_reference_last_hidden_state(tmp_path):
    ref, folder = make_hf_reference(tmp_path)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    model = load_backbone(folder)
    report = model.load_report
    assert report.format == "hf"
    assert (report.embed_dim, report.depth, report.num_heads) == (64, 4, 2)
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(2, 1, 48, 80)  # non-square: 3 x 5 patches
    with torch.no_grad():
        expected = ref(pixel_values=x).last_hidden_state
        got = model.forward_features(x)
    assert got.shape == expected.shape == (2, 1 + 4 + 15, 64)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_hf_safetensors_file_without_config_also_loads(tmp_path):
    ref, folder = make_hf_reference(tmp_path)
    model = load_backbone(folder / "model.safetensors")  # config.json beside it is used
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ref(pixel_values=x).last_hidden_state, atol=1e-4)


# ---- Meta's formats -----------------------------------------------------------------------------------------

# The key layout of Meta's DINOv3 ViT (dinov3/models/vision_transformer.py, dinov3/layers/*): one block shown.
META_TOP_KEYS = {"cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                 "rope_embed.periods", "norm.weight", "norm.bias"}
META_BLOCK_KEYS = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.qkv.bias_mask",
                   "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias",
                   "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"}


def test_export_has_exactly_metas_key_layout():
    state = timm_to_meta(tiny())
    blocks = {k.split(".", 2)[2] for k in state if k.startswith("blocks.")}
    assert {k for k in state if not k.startswith("blocks.")} == META_TOP_KEYS
    assert blocks == META_BLOCK_KEYS
    assert state["storage_tokens"].shape == (1, 4, 64) and state["mask_token"].shape == (1, 64)
    mask = state["blocks.0.attn.qkv.bias_mask"]
    assert mask.tolist() == [1.0] * 64 + [0.0] * 64 + [1.0] * 64


def test_meta_backbone_pth_roundtrip_is_exact(tmp_path):
    source = tiny(seed=3)
    path = save_meta_backbone(source, tmp_path / "dinov3_vitt16_pretrain.pth")
    # a Meta file stores a raw (unmasked) key bias: put garbage there, the bias_mask must zero it
    state = torch.load(path, weights_only=True)
    state["blocks.0.attn.qkv.bias"][64:128] = 7.0
    torch.save(state, path)
    model = load_backbone(path)
    assert model.load_report.format == "meta"
    assert model.load_report.missing == [] and model.load_report.unexpected == []
    assert model.load_report.ignored == ["mask_token"]
    x = torch.randn(2, 1, 48, 64)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), source.forward_features(x), atol=1e-5)


def test_meta_training_checkpoint_with_teacher_dict(tmp_path):
    source = tiny(seed=4)
    backbone = {f"backbone.{k}": v for k, v in timm_to_meta(source).items()}
    heads = {"dino_head.mlp.0.weight": torch.randn(32, 64), "dino_head.last_layer.weight": torch.randn(100, 32),
             "ibot_head.mlp.0.weight": torch.randn(32, 64)}
    ckpt = {"teacher": {**backbone, **heads}}
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(ckpt, path)
    model = load_backbone(path)
    report = model.load_report
    assert report.format == "meta-train"
    assert report.unexpected == [] and report.missing == []
    assert set(heads) <= set(report.ignored)
    x = torch.randn(1, 1, 64, 48)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), source.forward_features(x), atol=1e-5)


def test_timm_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = tiny(seed=5)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = load_backbone(path)
    assert model.load_report.format == "timm" and model.load_report.missing == []
    x = torch.randn(1, 1, 32, 48)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), source.forward_features(x), atol=1e-6)


def test_rgb_checkpoint_adapted_to_one_and_two_channels(tmp_path):
    rgb = tiny(in_chans=3, seed=6)
    path = save_meta_backbone(rgb, tmp_path / "rgb.pth")
    gray = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        want = rgb.forward_features(gray.repeat(1, 3, 1, 1))
        one = load_backbone(path, in_chans=1)
        assert torch.allclose(one.forward_features(gray), want, atol=1e-5)
        two = load_backbone(path, in_chans=2)
        assert torch.allclose(two.forward_features(gray.repeat(1, 2, 1, 1)), want, atol=1e-5)
    assert any("adapted from 3 to 2" in n for n in two.load_report.notes)
    w = torch.randn(8, 3, 16, 16)
    assert torch.allclose(patch_embed_for_channels(w, 1), w.sum(1, keepdim=True))


# ---- safety and errors ------------------------------------------------------------------------------------


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"cls_token": _Exploit()}, fh)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_backbone(path)
    assert not marker.exists()


def test_shape_mismatch_names_file_tensor_and_shapes(tmp_path):
    state = timm_to_meta(tiny())
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(128, 64)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone(path, arch="vit_tiny")
    msg = str(err.value)
    assert "bad.pth" in msg and "blocks.1.mlp.fc1.weight" in msg and "(128, 64)" in msg and "(256, 64)" in msg


def test_missing_tensors_are_named_and_refused_unless_not_strict(tmp_path):
    state = timm_to_meta(tiny())
    del state["blocks.2.ls1.gamma"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"blocks\.2\.gamma_1"):
        load_backbone(path)
    model = load_backbone(path, strict=False)
    assert model.load_report.missing == ["blocks.2.gamma_1"]


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a DINOv3 ViT checkpoint"):
        load_backbone(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_backbone(tmp_path / "nope.pth")
    with pytest.raises(DinomedError, match="unknown backbone architecture"):
        create_backbone("vit_gigantic")


# ---- features ---------------------------------------------------------------------------------------------


def test_default_layers():
    assert default_layers(12) == (2, 5, 8, 11)
    assert default_layers(24) == (5, 11, 17, 23)
    assert default_layers(4) == (0, 1, 2, 3)


def test_extract_features_any_size_and_matches_forward():
    model = tiny()
    x = torch.randn(2, 1, 48, 80)
    with torch.no_grad():
        feats = extract_features(model, x)
        tokens = model.forward_features(x)  # normed CLS + 4 registers + 3*5 patches
    assert feats.layers == (0, 1, 2, 3)
    assert [tuple(p.shape) for p in feats.patches] == [(2, 64, 3, 5)] * 4
    last = tokens[:, 5:].reshape(2, 3, 5, 64).permute(0, 3, 1, 2)
    assert torch.allclose(feats.patches[-1], last, atol=1e-5)
    assert torch.allclose(feats.cls[-1], tokens[:, 0], atol=1e-5)
    with torch.no_grad():
        odd = extract_features(model, torch.randn(1, 1, 50, 70), layers=[-1])
    assert odd.layers == (3,) and odd.patches[0].shape == (1, 64, 4, 5)


# ---- dinomed info -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["meta", "meta-train", "hf", "timm"])
def test_info_command_on_each_format(tmp_path, fmt, capsys):
    from safetensors.torch import save_file

    source = tiny(seed=7)
    if fmt == "meta":
        path = save_meta_backbone(source, tmp_path / "b.pth")
    elif fmt == "meta-train":
        path = tmp_path / "teacher_checkpoint.pth"
        torch.save({"teacher": {f"backbone.{k}": v for k, v in timm_to_meta(source).items()}}, path)
    elif fmt == "hf":
        _, path = make_hf_reference(tmp_path)
    else:
        path = tmp_path / "timm.safetensors"
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert main(["info", str(path), "--json"]) == 0  # in process: the CLI's own code path, without a child's start-up
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == fmt
    assert report["arch"] == "vit_tiny" and report["missing"] == [] and report["unexpected"] == []
    assert report["num_params"] == sum(p.numel() for p in source.parameters())


def test_info_command_bad_file_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinomed info: error:") and "junk.pth" in err and "Traceback" not in err


def test_inference_blocks_compute_what_timm_blocks_compute(monkeypatch):
    """On the CPU without autograd every DINOv3 block runs through _eva_block_inference (RoPE in place in the qkv
    output, LayerScale residuals by addcmul): the same tokens as timm's EvaBlock.forward within float rounding, block
    by block and through vit_features / vit_tokens; with autograd, or a block of another layout, timm's own code."""
    from dinomed.backbones import forward as fwd

    model = randomize_(create_backbone("vit_tiny", in_chans=2), seed=3).eval()
    with torch.no_grad():
        for blk in model.blocks:  # LayerScale far from its 1e-5 init, so that both residual branches count
            blk.gamma_1.uniform_(0.5, 1.5)
            blk.gamma_2.uniform_(0.5, 1.5)
    images = torch.randn(3, 2, 48, 80)
    calls = []
    real = fwd._eva_block_inference
    monkeypatch.setattr(fwd, "_eva_block_inference", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        tokens = model.patch_embed(images)
        x, rope = fwd.embed_tokens(model, tokens)
        assert rope is not None and rope.shape == (15, 64)  # 3 x 5 patches, 2 x head dim 32
        for blk in model.blocks:
            assert fwd.inference_block_applies(blk, x, rope)
            ours, theirs = fwd.block_forward(blk, x, rope), blk(x, rope=rope)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()
            x = theirs
        assert len(calls) == len(model.blocks)
        timm_maps = model.forward_intermediates(images, indices=[0, 2, 3], norm=True, stop_early=True,
                                                output_fmt="NCHW", intermediates_only=True)
        ours = fwd.vit_features(model, images, [0, 2, 3])
        assert len(calls) == len(model.blocks) + 4
        for a, b in zip(ours, timm_maps):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        with_prefix = fwd.vit_features(model, images, [1, 3], norm=False, prefix=True)  # (map, prefix tokens) pairs
        timm_pairs = model.forward_intermediates(images, indices=[1, 3], return_prefix_tokens=True, norm=False,
                                                 stop_early=True, output_fmt="NCHW", intermediates_only=True)
        assert len(calls) == 2 * len(model.blocks) + 4
        for (a, pa), (b, pb) in zip(with_prefix, timm_pairs):
            assert pa.shape == pb.shape == (3, model.num_prefix_tokens, 64)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fwd.vit_tokens(model, images)["patch"],
                                   model.forward_features(images)[:, model.num_prefix_tokens:], rtol=1e-5, atol=1e-5)
    calls.clear()
    with torch.no_grad():
        assert fwd.inference_block_applies(model.blocks[0], x, rope)
    assert not fwd.inference_block_applies(model.blocks[0], x, rope)  # autograd on: timm's blocks
    grads = fwd.vit_features(model, images, [0, 2, 3])
    assert calls == [] and grads[0].requires_grad
    model.blocks[1].attn.fused_attn = False  # a layout it does not compute: that block runs timm's code
    with torch.inference_mode():
        assert not fwd.inference_block_applies(model.blocks[1], x, rope)
        mixed = fwd.vit_features(model, images, [0, 2, 3])
    assert len(calls) == len(model.blocks) - 1
    for a, b in zip(mixed, timm_maps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    model.blocks[2].attn.qkv_bias_separate = True  # what DINO-Med3D sets so that a LoRA wrapper on qkv is called
    with torch.inference_mode():
        assert not fwd.inference_block_applies(model.blocks[2], x, rope)
    model.train()
    with torch.inference_mode():
        assert not fwd.inference_block_applies(model.blocks[0], x, rope)


def test_one_forward_path():
    """The hooked path (embed_tokens + run_blocks, used for ICE and the PET/CT fusion; vit_tokens for the mask token)
    gives what timm's public forward_intermediates / forward_features give: the guard for a timm upgrade."""
    from dinomed.backbones.forward import (add_mask_token, embed_tokens, pad_to_patch, run_blocks, vit_features,
                                           vit_tokens)

    model = randomize_(create_backbone("vit_tiny", in_chans=2)).eval()
    images, size = pad_to_patch(torch.randn(2, 2, 40, 50))
    assert images.shape[-2:] == (48, 64) and size == (40, 50)
    with torch.no_grad():
        public = model.forward_intermediates(images, indices=[1, 3], norm=True, stop_early=True, output_fmt="NCHW",
                                             intermediates_only=True)  # timm's own blocks
        for a, b in zip(public, vit_features(model, images, [1, 3])):  # ours: on the CPU, _eva_block_inference
            torch.testing.assert_close(a, b)
        tokens = model.patch_embed(images)
        x, rope = embed_tokens(model, tokens)
        hooked = run_blocks(model, x, rope, tokens.shape[1:3], [1, 3])
        assert [p.shape for p in public] == [(2, 64, 3, 4)] * 2
        for a, b in zip(public, hooked):
            torch.testing.assert_close(a, b)
        raw = vit_features(model, images, [2], norm=False)[0]
        torch.testing.assert_close(raw, run_blocks(model, x, rope, tokens.shape[1:3], [2], norm=False)[0])
        final = vit_tokens(add_mask_token(model), images)
        features = model.forward_features(images)
        torch.testing.assert_close(final["patch"], features[:, model.num_prefix_tokens:])
        torch.testing.assert_close(final["cls"], features[:, 0])
