"""DINO-Med3D: ICE initialised from the 2D patch embedding, stage I proxy head, stage II LoRA + adapter + HRSE."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinomed.backbones import create_backbone, extract_features, load_backbone, save_meta_backbone
from dinomed.errors import CheckpointError, DinomedError, InputImageError
from dinomed.models import build_model, load_model_folder, model_json_template, save_model_folder
from dinomed.models.dinomed3d import InterSliceContextEmbedding

CFG = {"name": "dinomed3d", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3, "lora_rank": 4,
       "adapter_channels": [16, 16, 16, 16], "decoder_channels": 16, "detail_channels": [8, 8, 16], "proxy_hidden": 32,
       "slice_batch": 4}


def test_ice_reproduces_the_2d_patch_embedding_at_init():
    backbone = create_backbone("vit_tiny", in_chans=2)
    conv = backbone.patch_embed.proj
    vol = torch.randn(2, 2, 5, 32, 48)
    with torch.no_grad():
        ref = torch.stack([conv(vol[:, :, d]) for d in range(5)], dim=1)  # (B, D, E, h, w)
        ref = ref.permute(0, 1, 3, 4, 2).reshape(10, 2, 3, 64)
        ice1 = InterSliceContextEmbedding(conv, 1)
        torch.testing.assert_close(ice1(vol), ref, rtol=0, atol=1e-6)  # K=1 is the 2D embedding
        ice3 = InterSliceContextEmbedding(conv, 3)
        assert ice3.proj.weight.shape[2:] == (3, 16, 16)
        assert torch.count_nonzero(ice3.proj.weight[:, :, [0, 2]]) == 0
        torch.testing.assert_close(ice3(vol), ref, rtol=0, atol=1e-5)  # K=3 at init: the central slice's embedding
        torch.testing.assert_close(ice3.forward_slab(vol[:, :, 1:4]), ref.reshape(2, 5, 2, 3, 64)[:, 2], rtol=0, atol=1e-5)
        # once trained, the neighbours count; the volume's ends see zero slices
        ice3.proj.weight[:, :, 0] = 0.01
        out = ice3(vol).reshape(2, 5, 2, 3, 64)
        first = F.conv2d(vol[:, :, 0], ice3.proj.weight[:, :, 1], ice3.proj.bias, stride=16) + \
            F.conv2d(vol[:, :, 1], ice3.proj.weight[:, :, 2], stride=16)
        torch.testing.assert_close(out[:, 0], first.permute(0, 2, 3, 1), rtol=0, atol=1e-5)
    with pytest.raises(DinomedError, match="odd number"):
        InterSliceContextEmbedding(conv, 2)


@pytest.mark.parametrize("extra", [{}, {"stage": 1}, {"use_detail_stream": False}, {"use_semantic_stream": False},
                                   {"decoder": "simple"}, {"ice_k": 1}, {"ice_k": 5}])
def test_logits_at_input_resolution(extra):
    out = build_model({**CFG, **extra})(torch.randn(1, 2, 5, 40, 56))
    assert out.shape == (1, 3, 5, 40, 56)


def test_stage1_volume_and_slab_agree():
    model = build_model({**CFG, "stage": 1}).eval()
    vol = torch.randn(1, 2, 5, 32, 48)
    with torch.no_grad():
        full = model(vol)
        central = model.forward_central(vol[:, :, 1:4])
    torch.testing.assert_close(central, full[:, :, 2], rtol=1e-4, atol=1e-5)
    assert model.forward_central(vol[:, :, :3]).shape == (1, 3, 32, 48)


def _trained(model, x):
    model.train()
    model(x).square().mean().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_stage1_trains_the_whole_backbone_and_proxy_head():
    model = build_model({**CFG, "stage": 1})
    trained = _trained(model, torch.randn(1, 2, 3, 32, 32))
    assert "ice.proj.weight" in trained and "backbone.blocks.0.attn.qkv.weight" in trained
    assert "proxy_head.mlp.3.weight" in trained
    assert all(p.requires_grad for p in model.parameters())


def test_stage2_trains_only_lora_adapter_detail_fusion_decoder():
    model = build_model(CFG)
    names = [n for n, _ in model.named_parameters()]
    lora = [n for n in names if "lora_" in n]
    # LoRA on qkv, proj, fc1, fc2 of every block (A and B each)
    assert len(lora) == 4 * 4 * 2
    for target in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert f"backbone.blocks.3.{target}.lora_B.default.weight" in lora
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_prefixes = ("backbone.", "ice.")
    assert trainable == {n for n in names if "lora_" in n or not n.startswith(frozen_prefixes)}
    trained = _trained(model, torch.randn(1, 2, 3, 32, 32))
    assert trained <= trainable
    # lora_B starts at zero, so only B gets a gradient at first; it must for qkv too (not bypassed by timm's fused bias)
    assert "backbone.blocks.0.attn.qkv.lora_B.default.weight" in trained
    assert "backbone.blocks.3.mlp.fc2.lora_B.default.weight" in trained
    for part in ("adapter.", "decoder.", "detail.", "fusions.", "classifier."):
        assert any(n.startswith(part) for n in trained), part
    assert not any(n.startswith(frozen_prefixes) and "lora_" not in n for n in trained)


def test_stage2_at_init_gives_the_pretrained_backbone_features(tmp_path):
    ckpt = save_meta_backbone(create_backbone("vit_tiny", in_chans=2), tmp_path / "bb.pth")
    model = build_model({**CFG, "backbone_checkpoint": str(ckpt)}).eval()
    backbone = load_backbone(ckpt)
    vol = torch.randn(1, 2, 3, 32, 48)
    with torch.no_grad():
        feats = model.slice_features(vol)  # LoRA B = 0 and ICE = 2D embedding at init
        ref = extract_features(backbone, vol[0].permute(1, 0, 2, 3), layers=model.layers).patches
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f[0].permute(1, 0, 2, 3), r, rtol=1e-4, atol=1e-4)


def test_stage1_folder_initialises_stage2(tmp_path):
    stage1 = build_model({**CFG, "stage": 1})
    with torch.no_grad():
        stage1.ice.proj.weight.add_(0.01)
        stage1.backbone.blocks[1].mlp.fc1.weight.mul_(1.5)
    save_model_folder(stage1, model_json_template(stage1), tmp_path / "s1")
    stage2 = build_model({**CFG, "stage1_checkpoint": str(tmp_path / "s1")})
    assert torch.equal(stage2.ice.proj.weight, stage1.ice.proj.weight)
    assert torch.equal(stage2.backbone.blocks[1].mlp.fc1.base_layer.weight, stage1.backbone.blocks[1].mlp.fc1.weight)
    with pytest.raises(CheckpointError, match="no stage-I model"):
        build_model({**CFG, "stage1_checkpoint": str(tmp_path / "nothing")})
    with pytest.raises(CheckpointError, match="tensor ice.proj.weight has shape"):
        build_model({**CFG, "ice_k": 5, "stage1_checkpoint": str(tmp_path / "s1")})


@pytest.mark.parametrize("extra", [{}, {"stage": 1}])
def test_save_load_identical(tmp_path, extra):
    model = build_model({**CFG, **extra})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    model.eval()
    mj = model_json_template(model)
    assert mj["inference"]["mode"] == "sliding3d"
    loaded, _ = load_model_folder(save_model_folder(model, mj, tmp_path / "m"))
    x = torch.randn(1, 2, 5, 40, 56)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_config_and_input_errors():
    with pytest.raises(DinomedError, match="cannot both be false"):
        build_model({**CFG, "use_semantic_stream": False, "use_detail_stream": False})
    with pytest.raises(DinomedError, match="decoder must be 'upernet' or 'simple'"):
        build_model({**CFG, "decoder": "unet"})
    with pytest.raises(InputImageError, match=r"batch of 3D volumes \(B, C, D, H, W\), found shape \(1, 2, 32, 32\)"):
        build_model(CFG)(torch.randn(1, 2, 32, 32))
