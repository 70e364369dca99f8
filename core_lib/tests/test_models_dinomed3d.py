"""DINO-Med3D as the paper (arXiv:2606.18886, sec. 2) and the official code build it: ICE as the channels of the
pretrained patch embedding (any K), stage-I 1×1 head on the last block, stage-II LoRA r16/α16/dropout 0.1 on
qkv/proj/fc1/fc2, raw block outputs, gate once at 1/4 before the UperNet, refinement with the 1/2 and full maps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinomed.backbones import create_backbone, load_backbone, save_meta_backbone
from dinomed.backbones.forward import vit_features
from dinomed.errors import CheckpointError, DinomedError, InputImageError
from dinomed.models import available_models, build_model, model_json_template, save_model_folder
from dinomed.models.dinomed3d import GatedFusion, UperNet3D, ice_patch_weight, slab_offsets, slabs

CFG = {"name": "dinomed3d", "backbone": "vit_tiny", "in_chans": 1, "num_classes": 3, "adapter_channels": 16,
       "decoder_channels": 16, "detail_channels": [8, 8, 16], "refine_channels": [8, 8], "slice_batch": 4}

DEFAULTS = available_models()["dinomed3d"].defaults  # the constructor's signature defaults


def test_defaults_are_the_official_settings():
    assert DEFAULTS["ice_k"] == 3
    assert (DEFAULTS["lora_rank"], DEFAULTS["lora_alpha"], DEFAULTS["lora_dropout"]) == (16, 16, 0.1)
    assert DEFAULTS["lora_targets"] == ["qkv", "proj", "fc1", "fc2"]
    assert DEFAULTS["adapter_channels"] == DEFAULTS["decoder_channels"] == 256
    assert DEFAULTS["detail_channels"] == [16, 32, 64] and DEFAULTS["refine_channels"] == [64, 32]
    assert DEFAULTS["feature_norm"] is False and DEFAULTS["proxy_head"] == "linear"


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_ice_slabs_are_the_patch_embedding_channels(k):
    vol = torch.arange(2 * 1 * 6 * 2 * 2, dtype=torch.float32).reshape(2, 1, 6, 2, 2) + 1
    out = slabs(vol, k)
    assert out.shape == (12, k, 2, 2)
    offsets = slab_offsets(k)
    assert len(offsets) == k and 0 in offsets
    for b in range(2):
        for d in range(6):
            for j, o in enumerate(offsets):
                expected = vol[b, 0, d + o] if 0 <= d + o < 6 else torch.zeros(2, 2)
                assert torch.equal(out[b * 6 + d, j], expected)  # zero slices beyond the volume's ends
    model = build_model({**CFG, "ice_k": k})
    # no extra 3D conv: the 2D patch embedding (LoRA-wrapped in stage II) reads the K slices as channels
    assert model.backbone.patch_embed.proj.base_layer.in_channels == k
    assert model(torch.randn(1, 1, 4, 32, 48)).shape == (1, 3, 4, 32, 48)


def test_ice_initialisation_follows_the_official_code():
    rgb = torch.randn(64, 3, 16, 16)
    assert torch.equal(ice_patch_weight(rgb, 3, 1), rgb)  # K = 3: the pretrained RGB kernel, as official
    torch.testing.assert_close(ice_patch_weight(rgb, 1, 1), rgb.sum(1, keepdim=True))
    five = ice_patch_weight(rgb, 5, 1)
    torch.testing.assert_close(five, torch.cat([rgb, rgb[:, :2]], 1) * 3 / 5)  # timm adapt_input_conv
    two_modalities = ice_patch_weight(rgb, 3, 2)  # CT+PET: each slice's kernel shared by its 2 channels
    assert two_modalities.shape == (64, 6, 16, 16)
    torch.testing.assert_close(two_modalities[:, 0] + two_modalities[:, 1], rgb[:, 0])


def test_ice_from_an_rgb_checkpoint_is_the_pretrained_embedding(tmp_path):
    rgb = create_backbone("vit_tiny", in_chans=3)
    ckpt = save_meta_backbone(rgb, tmp_path / "bb.pth")
    model = build_model({**CFG, "backbone_checkpoint": str(ckpt)})
    assert torch.equal(model.backbone.patch_embed.proj.base_layer.weight, rgb.patch_embed.proj.weight)
    # a constant volume: every slab channel sees the same slice, so K = 1 equals the grey response of K = 3
    k1 = build_model({**CFG, "stage": 1, "ice_k": 1, "backbone_checkpoint": str(ckpt)}).backbone.patch_embed
    k3 = build_model({**CFG, "stage": 1, "ice_k": 3, "backbone_checkpoint": str(ckpt)}).backbone.patch_embed
    grey = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(k1(grey), k3(grey.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-5)


def test_stage1_head_is_a_1x1_conv_on_the_last_block_with_bilinear_upsampling():
    model = build_model({**CFG, "stage": 1}).eval()
    assert model.proxy_layers == (3,)  # the last of 4 blocks
    head = model.proxy_head.head
    assert isinstance(head, torch.nn.Conv2d) and head.kernel_size == (1, 1) and head.in_channels == 64
    vol = torch.randn(1, 1, 3, 32, 48)
    with torch.no_grad():
        tokens = vit_features(model.backbone, slabs(vol, 3), [3], norm=False)[0]  # raw, unnormalised block output
        expected = F.interpolate(head(tokens), size=(32, 48), mode="bilinear", align_corners=False)
        out = model(vol)
    torch.testing.assert_close(out[0].permute(1, 0, 2, 3), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.forward_central(vol), out[:, :, 1], rtol=1e-4, atol=1e-5)
    mlp = build_model({**CFG, "stage": 1, "proxy_head": "mlp"})  # the named option reads the four blocks
    assert mlp.proxy_layers == (0, 1, 2, 3)


def test_stage1_trains_the_whole_backbone_and_head():
    model = build_model({**CFG, "stage": 1})
    assert all(p.requires_grad for p in model.parameters())
    model(torch.randn(1, 1, 3, 32, 32)).square().mean().backward()
    assert model.backbone.patch_embed.proj.weight.grad is not None
    assert model.proxy_head.head.weight.grad is not None


def test_stage2_lora_targets_rank_alpha_dropout():
    model = build_model({**CFG})
    lora_a = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    # qkv, proj, fc1, fc2 of each of the 4 blocks, and (as the official 'proj' target does) the patch embedding
    assert len(lora_a) == 4 * 4 + 1
    assert "backbone.patch_embed.proj.lora_A.default.weight" in lora_a
    for target in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        p = lora_a[f"backbone.blocks.2.{target}.lora_A.default.weight"]
        assert p.shape[0] == 16  # rank 16
    qkv = model.backbone.blocks[0].attn.qkv
    assert qkv.scaling["default"] == 1.0  # alpha / rank = 16 / 16
    assert qkv.lora_dropout["default"].p == 0.1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("backbone.")} == {n for n in trainable if "lora_" in n and n.startswith("backbone.")}


def test_stage2_gate_sits_once_at_the_quarter_level_before_the_upernet():
    model = build_model(CFG).eval()
    assert sum(isinstance(m, GatedFusion) for m in model.modules()) == 1
    calls = []
    model.fusion.register_forward_hook(lambda m, i, o: calls.append(("gate", tuple(i[0].shape), o)))
    model.decoder.register_forward_hook(lambda m, i, o: calls.append(("upernet", i[0][0], o)))
    model.refine[0].register_forward_hook(lambda m, i, o: calls.append(("refine_half", tuple(i[1].shape), o)))
    model.refine[1].register_forward_hook(lambda m, i, o: calls.append(("refine_full", tuple(i[1].shape), o)))
    with torch.no_grad():
        out = model(torch.randn(1, 1, 4, 64, 64))
    assert [c[0] for c in calls] == ["gate", "upernet", "refine_half", "refine_full"]
    gate_shape = calls[0][1]
    assert gate_shape[-2:] == (16, 16)  # 1/4 in-plane of 64
    assert calls[1][1] is calls[0][2]  # the UperNet's finest level is the gated map itself
    assert calls[2][1][-2:] == (32, 32) and calls[3][1][-2:] == (64, 64)  # then the 1/2 and full detail maps
    assert out.shape == (1, 3, 4, 64, 64)


def test_stage2_reads_raw_block_outputs_of_four_blocks():
    model = build_model({**CFG, "layers": None}).eval()
    assert model.layers == (0, 1, 2, 3)
    vol = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        feats = model.slice_features(vol)
        raw = vit_features(model.backbone, slabs(vol, 3), model.layers, norm=False)
    for f, r in zip(feats, raw):
        torch.testing.assert_close(f[0].permute(1, 0, 2, 3), r)


@pytest.mark.parametrize("extra", [{"use_detail_stream": False}, {"use_semantic_stream": False}, {"feature_norm": True}])
def test_ablations_give_logits_at_input_resolution(extra):
    assert build_model({**CFG, **extra})(torch.randn(1, 1, 5, 40, 56)).shape == (1, 3, 5, 40, 56)


def test_one_training_step_moves_lora_and_new_layers_only():
    torch.manual_seed(0)
    model = build_model({**CFG, "in_chans": 2})
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(1, 2, 3, 32, 32), torch.randint(0, 3, (1, 3, 32, 32))
    model.train()
    F.cross_entropy(model(x), y).backward()
    # every trainable parameter takes part (DDP needs no find_unused_parameters)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    moved = {n for n, v in trainable.items() if not torch.equal(after[n], v)}
    assert "backbone.blocks.0.attn.qkv.lora_B.default.weight" in moved  # not bypassed by timm's fused bias
    for part in ("adapter.", "decoder.", "detail.", "fusion.", "refine.", "classifier."):
        assert any(n.startswith(part) for n in moved), part


def test_stage1_folder_initialises_stage2(tmp_path):
    stage1 = build_model({**CFG, "stage": 1})
    with torch.no_grad():
        stage1.backbone.patch_embed.proj.weight.add_(0.01)
        stage1.backbone.blocks[1].mlp.fc1.weight.mul_(1.5)
    save_model_folder(stage1, model_json_template(stage1), tmp_path / "s1")
    stage2 = build_model({**CFG, "stage1_checkpoint": str(tmp_path / "s1")})
    assert torch.equal(stage2.backbone.patch_embed.proj.base_layer.weight, stage1.backbone.patch_embed.proj.weight)
    assert torch.equal(stage2.backbone.blocks[1].mlp.fc1.base_layer.weight, stage1.backbone.blocks[1].mlp.fc1.weight)
    with pytest.raises(CheckpointError, match="no stage-I model"):
        build_model({**CFG, "stage1_checkpoint": str(tmp_path / "nothing")})
    with pytest.raises(CheckpointError, match="patch_embed.proj.weight has shape"):
        build_model({**CFG, "ice_k": 5, "stage1_checkpoint": str(tmp_path / "s1")})


def test_upernet_width_and_official_topology():
    up = UperNet3D(256, 256, [1, 2, 3, 6], 2)
    assert up.ppm[0][1].out_channels == 64 and up.fuse[0].in_channels == 1024
    assert isinstance(up.fuse[-1], torch.nn.Dropout) and up.fuse[-1].p == 0.1


def test_config_and_input_errors():
    with pytest.raises(DinomedError, match="cannot both be false"):
        build_model({**CFG, "use_semantic_stream": False, "use_detail_stream": False})
    with pytest.raises(DinomedError, match="decoder must be 'upernet'"):
        build_model({**CFG, "decoder": "unet"})
    with pytest.raises(DinomedError, match="ice_k must be"):
        build_model({**CFG, "ice_k": 0})
    with pytest.raises(InputImageError, match=r"batch of 3D volumes \(B, C, D, H, W\), found shape \(1, 1, 32, 32\)"):
        build_model(CFG)(torch.randn(1, 1, 32, 32))


def test_pretrained_rgb_checkpoint_loads_in_stage1(tmp_path):
    ckpt = save_meta_backbone(create_backbone("vit_tiny", in_chans=3), tmp_path / "bb.pth")
    ref = load_backbone(ckpt)
    model = build_model({**CFG, "stage": 1, "backbone_checkpoint": str(ckpt)})
    assert torch.equal(model.backbone.blocks[2].mlp.fc2.weight, ref.blocks[2].mlp.fc2.weight)
