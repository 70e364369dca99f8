"""MedDINOv3 (2D): multi-scale token aggregation, logits at the input's resolution, which parameters train."""
from __future__ import annotations

import pytest
import torch

from dinomed.backbones import extract_features
from dinomed.models import build_model

CFG = {"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3, "decoder_channels": [32, 32, 16, 16]}


@pytest.mark.parametrize("size", [(40, 56), (64, 64), (17, 33)])
def test_logits_at_input_resolution(size):
    model = build_model(CFG)
    out = model(torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)


def test_aggregates_four_normalised_blocks_like_extract_features():
    model = build_model(CFG).eval()
    assert model.layers == (0, 1, 2, 3)  # 4 evenly spaced blocks of a depth-4 ViT
    x = torch.randn(1, 2, 40, 56)
    with torch.no_grad():
        ours = model.forward_features(x)
        ref = extract_features(model.backbone, x, layers=model.layers, norm=True).patches
    assert len(ours) == 4
    for a, b in zip(ours, ref):
        assert a.shape == (1, 64, 3, 4)
        torch.testing.assert_close(a, b)


def _grads(model):
    out = model(torch.randn(1, 2, 32, 48))
    out.square().mean().backward()
    return {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()}


def test_full_finetuning_reaches_backbone_and_decoder():
    got = _grads(build_model(CFG))
    assert got["backbone.blocks.0.attn.qkv.weight"] and got["decoder.classifier.weight"]
    assert got["backbone.patch_embed.proj.weight"]


def test_frozen_backbone_trains_only_the_decoder():
    model = build_model({**CFG, "freeze_backbone": True})
    got = _grads(model)
    trained = {n for n, g in got.items() if g}
    assert trained and all(n.startswith("decoder.") for n in trained)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
