"""Dual-DINOv3 PET/CT: two encoders from their own checkpoints, zero-gated cross-attention fusion, variants."""
from __future__ import annotations

import pytest
import torch

from dinomed.backbones import create_backbone, extract_features, load_backbone, save_meta_backbone
from dinomed.errors import DinomedError, InputImageError
from dinomed.models import build_model

CFG = {"name": "dual_petct", "backbone": "vit_tiny", "num_classes": 3, "decoder_channels": [32, 32, 16, 16]}


@pytest.mark.parametrize("variant", ["dual", "pet_only", "ct_only", "early_fusion"])
def test_logits_at_input_resolution(variant):
    out = build_model({**CFG, "variant": variant})(torch.randn(2, 2, 40, 56))
    assert out.shape == (2, 3, 40, 56)


@pytest.fixture
def encoder_checkpoints(tmp_path):
    torch.manual_seed(1)
    pet = save_meta_backbone(create_backbone("vit_tiny", in_chans=1), tmp_path / "pet.pth")
    ct = save_meta_backbone(create_backbone("vit_tiny", in_chans=1), tmp_path / "ct.pth")
    return pet, ct


def test_each_encoder_from_its_own_checkpoint_and_zero_gates_leave_streams_unchanged(encoder_checkpoints):
    pet_ckpt, ct_ckpt = encoder_checkpoints
    model = build_model({**CFG, "pet_backbone_checkpoint": str(pet_ckpt), "ct_backbone_checkpoint": str(ct_ckpt)}).eval()
    pet_bb, ct_bb = load_backbone(pet_ckpt), load_backbone(ct_ckpt)
    for key, value in pet_bb.state_dict().items():
        assert torch.equal(model.pet_encoder.state_dict()[key], value)
        assert torch.equal(model.ct_encoder.state_dict()[key], ct_bb.state_dict()[key])
    assert not torch.equal(pet_bb.blocks[0].attn.qkv.weight, ct_bb.blocks[0].attn.qkv.weight)

    x = torch.randn(2, 2, 40, 56)  # channel 0 CT, channel 1 PET
    with torch.no_grad():
        feats = model.forward_features(x)
        ref_pet = extract_features(pet_bb, x[:, 1:2], layers=model.layers).patches
        ref_ct = extract_features(ct_bb, x[:, 0:1], layers=model.layers).patches
    assert len(feats) == 8
    for i in range(4):
        torch.testing.assert_close(feats[2 * i], ref_pet[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feats[2 * i + 1], ref_ct[i], rtol=1e-5, atol=1e-5)

    # once the gates open, each stream sees the other modality
    with torch.no_grad():
        for fusion in model.fusions:
            fusion.gate_pet.fill_(0.5)
            fusion.gate_ct.fill_(0.5)
        fused = model.forward_features(x)
    assert not torch.allclose(fused[2], ref_pet[1], atol=1e-4)


def test_gradients_reach_gates_encoders_and_decoder():
    model = build_model(CFG)
    model(torch.randn(1, 2, 32, 32)).square().mean().backward()
    grads = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()}
    assert grads["fusions.0.gate_pet"] and grads["fusions.3.gate_ct"]
    assert grads["pet_encoder.blocks.0.attn.qkv.weight"] and grads["ct_encoder.blocks.0.attn.qkv.weight"]
    assert grads["decoder.classifier.weight"]


def test_frozen_encoders_train_fusion_and_decoder_only():
    model = build_model({**CFG, "freeze_backbone": True})
    model(torch.randn(1, 2, 32, 32)).square().mean().backward()
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"fusions", "decoder"}


def test_single_stream_variants_read_their_channel():
    x = torch.randn(1, 2, 32, 32)
    for variant, ignored in [("pet_only", 0), ("ct_only", 1)]:
        model = build_model({**CFG, "variant": variant}).eval()
        x_other = x.clone()
        x_other[:, ignored] = torch.randn(32, 32)
        with torch.no_grad():
            assert torch.equal(model(x), model(x_other))
        assert model.encoder.patch_embed.proj.in_channels == 1
    assert build_model({**CFG, "variant": "early_fusion"}).encoder.patch_embed.proj.in_channels == 2


def test_config_and_input_errors():
    with pytest.raises(DinomedError, match="in_chans must be 2"):
        build_model({**CFG, "in_chans": 1})
    with pytest.raises(DinomedError, match="variant must be one of"):
        build_model({**CFG, "variant": "late"})
    with pytest.raises(InputImageError, match=r"channel 0 CT, channel 1 PET.*expected 2 input channel"):
        build_model(CFG)(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("variant", ["dual", "early_fusion"])
def test_detail_stream_reads_ct_and_pet(variant):
    """The named detail stream (DINO-Med3D sec. 2.3.2) on both input channels: logits keep the input size, and the
    stream's gradient reaches each channel of the input pixels directly."""
    model = build_model({**CFG, "variant": variant, "detail_channels": 4}).eval()
    assert model.decoder.detail.stem[0].in_channels == 2
    x = torch.randn(1, 2, 37, 45, requires_grad=True)
    out = model(x)
    assert out.shape == (1, 3, 37, 45)
    out[0, :, 10, 12].sum().backward()
    assert x.grad[0, 0, 10, 12] != 0 and x.grad[0, 1, 10, 12] != 0
