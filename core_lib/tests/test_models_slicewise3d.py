"""The frozen DINOv3 baseline (slice-wise features → pseudo-3D volume → light 3D decoder) and the linear probe."""
from __future__ import annotations

import torch

from dinomed.backbones import extract_features
from dinomed.models import build_model

CFG = {"name": "slicewise3d", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3,
       "decoder_channels": [32, 16, 16, 8], "skip_channels": [8, 8, 16, 16], "slice_batch": 3}


def test_volume_logits_at_input_resolution():
    out = build_model(CFG)(torch.randn(1, 2, 5, 40, 56))
    assert out.shape == (1, 3, 5, 40, 56)
    out = build_model({**CFG, "head": "linear"})(torch.randn(2, 2, 5, 40, 56))
    assert out.shape == (2, 3, 5, 40, 56)
    out = build_model({"name": "linear_probe", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3})(torch.randn(2, 2, 40, 56))
    assert out.shape == (2, 3, 40, 56)


def test_pseudo_volume_is_the_stack_of_slice_features():
    model = build_model(CFG).eval()
    vol = torch.randn(1, 2, 5, 48, 64)
    slices = vol[0].permute(1, 0, 2, 3)  # (D, C, H, W)
    feats = model.encoder(slices)  # chunked by slice_batch=3
    ref = torch.cat(extract_features(model.encoder.backbone, slices, layers=model.encoder.layers).patches, dim=1)
    torch.testing.assert_close(feats, ref)
    assert feats.shape == (5, 4 * 64, 3, 4)


def _trained(model, x):
    model.train()
    model(x).square().mean().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_backbone_is_frozen_and_stays_in_eval_mode():
    model = build_model(CFG)
    trained = _trained(model, torch.randn(1, 2, 3, 32, 32))
    assert not model.encoder.backbone.training
    assert trained == {n for n, _ in model.named_parameters() if n.startswith("decoder.")}
    assert all(not p.requires_grad for p in model.encoder.backbone.parameters())


def test_linear_probe_trains_only_the_linear_head():
    for cfg, x in [({**CFG, "head": "linear"}, torch.randn(1, 2, 3, 32, 32)),
                   ({"name": "linear_probe", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3}, torch.randn(2, 2, 32, 32))]:
        model = build_model(cfg)
        trained = _trained(model, x)
        assert {n.rsplit(".", 2)[-2] for n in trained} == {"head"} and len(trained) == 2  # weight and bias of one 1×1 conv
        probe = model.probe if hasattr(model, "probe") else model
        assert model.backbone is probe.encoder.backbone
        assert probe.encoder.layers == (3,)  # the last block of the depth-4 ViT


def test_default_decoder_sees_the_frozen_features_alone():
    """The benchmark's baseline measures frozen DINOv3 features: no trainable path from the raw image by default
    (the frozen encoder runs without autograd, so the image gets no gradient); input_skips is the named option."""
    model = build_model(CFG)
    assert not hasattr(model.decoder, "skips") and len(model.decoder.feature_skips) == 3
    x = torch.randn(1, 2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is None
    with_cnn = build_model({**CFG, "input_skips": True})
    y = torch.randn(1, 2, 3, 32, 32, requires_grad=True)
    with_cnn(y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_feature_skips_come_from_the_earlier_blocks_deepest_first():
    model = build_model(CFG).eval()
    seen = []
    for i, proj in enumerate(model.decoder.feature_skips):
        proj.register_forward_hook(lambda m, inp, out, i=i: seen.append((i, inp[0])))
    vol = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        model(vol)
        per_block = extract_features(model.encoder.backbone, vol[0].permute(1, 0, 2, 3), layers=model.encoder.layers).patches
    assert [i for i, _ in seen] == [0, 1, 2]
    for i, got in seen:  # stage 0 (1/8) ← block layers[2], stage 1 ← layers[1], stage 2 ← layers[0]
        torch.testing.assert_close(got[0].permute(1, 0, 2, 3), per_block[2 - i])


def test_old_model_json_is_read_with_input_skips():
    from dinomed.models import resolve_config
    from dinomed.models.registry import upgrade_model_json

    old = {k: v for k, v in resolve_config(CFG).items() if k != "input_skips"}  # as an earlier dinomed wrote it
    assert upgrade_model_json({"architecture": old})["architecture"]["input_skips"] is True
    assert resolve_config(CFG)["input_skips"] is False


def test_one_training_step_moves_the_decoder_only():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build_model(CFG)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)  # the paper's lr
    x, y = torch.randn(1, 2, 3, 32, 32), torch.randint(0, 3, (1, 3, 32, 32))
    model.train()
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("decoder.") for n in moved)
