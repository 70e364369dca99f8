"""MedDINOv3 (2D): multi-scale token aggregation, the official PatchDecode, logits at the input's resolution, which
parameters train; the earlier progressive decoder as a named option, and old model folders still load."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinomed.backbones import extract_features
from dinomed.models import build_model, load_model_folder, resolve_config
from dinomed.models.meddinov3 import PatchDecode
from dinomed.models.registry import model_json_template, save_model_folder, upgrade_model_json

CFG = {"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3}
REPO = Path(__file__).resolve().parents[2]


def test_patch_decode_is_the_official_decoder():
    model = build_model(CFG)
    dec = model.decoder
    assert isinstance(dec, PatchDecode)
    assert dec.channels == [256, 128, 64, 32, 16]  # 4 x 64 concatenated, halving four times
    for stage in dec.stages:
        up, norm, act = stage
        assert isinstance(up, torch.nn.ConvTranspose2d) and up.kernel_size == (2, 2) and up.stride == (2, 2)
        assert norm.normalized_shape == (up.out_channels,) and isinstance(act, torch.nn.GELU)
    assert dec.classifier.kernel_size == (1, 1) and dec.classifier.in_channels == 16
    with torch.device("meta"):
        vitb = build_model({**CFG, "backbone": "vit_base", "in_chans": 1, "num_classes": 2}, load_checkpoints=False)
    assert vitb.decoder.channels == [3072, 1536, 768, 384, 192]
    n = sum(p.numel() for p in vitb.decoder.parameters())
    assert abs(n / 1e6 - 25.1) < 0.05  # the figure for the official PatchDecode at ViT-B


@pytest.mark.parametrize("hw, chunk", [((3, 5), 4), ((4, 4), 128), ((2, 7), 1)])
def test_token_major_decoder_equals_the_modules(hw, chunk, monkeypatch):
    """Inference runs PatchDecode token by token in chunks of token rows (forward_token_major): the same logits as
    the transposed convolutions, LayerNorm2d and GELU run as modules, for token grids that the chunks do not divide;
    the model takes that path under no_grad / inference_mode on the CPU and the module path when training."""
    torch.manual_seed(0)
    dec = PatchDecode(48, 5).eval()
    for p in dec.parameters():  # non-trivial norms and biases
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 48, *hw)
    assert not dec.token_major_applies(x)  # grad enabled: the modules (training)
    with torch.no_grad():
        assert dec.token_major_applies(x)
    ref = dec(x)
    assert ref.requires_grad
    with torch.no_grad():
        fast = dec.forward_token_major(x, chunk_tokens=chunk)
    assert fast.shape == ref.shape == (2, 5, hw[0] * 16, hw[1] * 16)
    torch.testing.assert_close(fast, ref.detach(), rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.argmax(1), ref.argmax(1))
    model = build_model(CFG).eval()
    img = torch.randn(1, 2, 40, 56)
    train_path = model(img)
    calls = []
    orig = PatchDecode.forward_token_major
    monkeypatch.setattr(PatchDecode, "forward_token_major", lambda self, t: calls.append(t.shape) or orig(self, t))
    with torch.inference_mode():
        infer = model(img)
    assert calls == [(1, 256, 3, 4)]  # 4 x 64 channels on the 3 x 4 token grid of the padded 48 x 64 input
    with torch.no_grad(), warnings.catch_warnings():  # a traced graph (torch.jit.trace, the ONNX exporter) keeps the modules
        warnings.simplefilter("ignore")  # TracerWarnings, and torch.jit.trace is deprecated
        traced = torch.jit.trace(model.decoder, torch.randn(1, 256, 3, 4), check_trace=False)
    assert calls == [(1, 256, 3, 4)]
    assert any(n.kind() == "aten::_convolution" for n in traced.inlined_graph.nodes())
    torch.testing.assert_close(infer, train_path.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw, chunk", [((3, 5), 4), ((2, 7), 1), ((4, 4), 128)])
def test_token_major_labels_are_the_argmax_of_the_logits(hw, chunk):
    """forward_token_major(labels=True) takes the argmax per chunk before placing the patches: the same labels as
    the placed logits' max(1).indices, for token grids the chunks do not divide, and the first class on a tie."""
    torch.manual_seed(1)
    dec = PatchDecode(192, 7).eval()  # the default init: labels that vary from pixel to pixel
    x = torch.randn(2, 192, *hw)
    with torch.no_grad():
        logits = dec.forward_token_major(x, chunk_tokens=chunk)
        labels = dec.forward_token_major(x, chunk_tokens=chunk, labels=True)
    assert labels.dtype == torch.uint8 and labels.shape == (2, hw[0] * 16, hw[1] * 16)
    assert len(labels.unique()) > 1
    assert torch.equal(labels.long(), logits.max(dim=1).indices)
    with torch.no_grad():  # ties: classes 2 and 5 equal everywhere and above the rest -> 2, as max(1) says
        dec.classifier.weight.zero_()
        dec.classifier.bias.copy_(torch.tensor([0.0, 1.0, 3.0, -1.0, 2.0, 3.0, 0.5]))
        tie = dec.forward_token_major(x, chunk_tokens=chunk, labels=True)
        assert torch.equal(dec.forward_token_major(x, chunk_tokens=chunk).max(dim=1).indices, torch.full_like(tie.long(), 2))
    assert torch.equal(tie, torch.full_like(tie, 2))


def test_predict_labels_equal_the_logits_labels_and_predict_volume_uses_them(monkeypatch):
    """MedDINOv3.predict_labels: the labels of forward(x) cropped to the input (odd sizes pad to the patch), by the
    token-major argmax under inference_mode and from the logits otherwise; slice_labels (predict_volume's) asks for
    them, so the logits of a batch are never placed."""
    from dinomed.inference.predict import class_labels, slice_labels

    torch.manual_seed(0)
    model = build_model(CFG).eval()
    img = torch.randn(3, 2, 37, 50)
    with torch.inference_mode():
        logits = model(img)
        direct = model.predict_labels(img)
    assert direct.dtype == torch.uint8 and direct.shape == (3, 37, 50)
    assert torch.equal(direct.long(), logits.max(dim=1).indices)
    grad_path = model.predict_labels(img)  # autograd on: the modules, then the argmax of their logits
    assert torch.equal(grad_path, logits.max(dim=1).indices)
    calls = []
    orig = PatchDecode.forward_token_major
    monkeypatch.setattr(PatchDecode, "forward_token_major",
                        lambda self, t, **kw: calls.append(kw) or orig(self, t, **kw))
    with torch.inference_mode():
        labels = slice_labels(model, img)
    assert calls == [{"labels": True}]
    assert labels.dtype == np.uint8 and (labels == class_labels(logits)).all()


def test_one_training_step():
    """(Save → load of every registered model: test_models_registry.py.)"""
    torch.manual_seed(0)
    model = build_model(CFG)
    assert model.arch_config["decoder"] == "patch_decode"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 2, 32, 32), torch.randint(0, 3, (2, 32, 32))
    before = model.decoder.classifier.weight.detach().clone()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(before, model.decoder.classifier.weight)


def test_progressive_decoder_is_a_named_option_and_old_model_json_loads_as_it(tmp_path):
    model = build_model({**CFG, "decoder": "progressive", "decoder_channels": [32, 32, 16, 16]})
    assert model(torch.randn(1, 2, 40, 56)).shape == (1, 3, 40, 56)
    old = {"backbone": "vit_tiny", "in_chans": 1, "num_classes": 8, "layers": None, "decoder_channels": [64, 48, 32, 32],
           "drop_path_rate": 0.0, "freeze_backbone": False, "high_res": False, "name": "meddinov3"}
    upgraded = upgrade_model_json({"architecture": old})["architecture"]
    assert upgraded["decoder"] == "progressive" and "high_res" not in upgraded
    assert resolve_config(upgraded)["decoder"] == "progressive"
    assert resolve_config({**CFG, "decoder_channels": [8, 8, 8, 8]})["decoder"] == "patch_decode"  # a new config: today's default
    # a model folder written before ``decoder`` existed (weights of the progressive decoder, no ``decoder`` key)
    arch = {**CFG, "decoder": "progressive", "decoder_channels": [32, 32, 16, 16]}
    folder = save_model_folder(build_model(arch), model_json_template(arch), tmp_path / "old")
    doc = json.loads((folder / "model.json").read_text())
    del doc["architecture"]["decoder"]
    (folder / "model.json").write_text(json.dumps(doc))
    loaded, _ = load_model_folder(folder)
    assert loaded.arch_config["decoder"] == "progressive"


def test_detail_stream_is_a_named_option_of_the_progressive_decoder(tmp_path):
    """detail_channels (DINO-Med3D sec. 2.3.2, gated detail stream on the input image): logits keep the input size
    for any H, W, it round-trips through a model folder, it acts on the logits, and the paper's PatchDecode refuses it."""
    from dinomed.errors import DinomedError
    from dinomed.models.common import DetailStream2d

    arch = {**CFG, "decoder": "progressive", "decoder_channels": [32, 32, 16, 16], "detail_channels": 8}
    model = build_model(arch).eval()
    assert isinstance(model.decoder.detail, DetailStream2d)
    for size in ((40, 56), (17, 33)):
        assert model(torch.randn(1, 2, *size)).shape == (1, 3, *size)
    x = torch.randn(1, 2, 48, 48)
    folder = save_model_folder(model, model_json_template(arch), tmp_path / "m")
    loaded, mj = load_model_folder(folder)
    assert mj["architecture"]["detail_channels"] == 8
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    with torch.no_grad():  # the stream acts: silencing its projection changes the logits
        before = model(x)
        model.decoder.detail.project.weight.zero_()
        model.decoder.detail.project.bias.zero_()
        assert not torch.allclose(model(x), before)
    with pytest.raises(DinomedError, match="detail_channels"):
        build_model({**CFG, "detail_channels": 8})


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
    assert got["decoder.stages.0.0.weight"]
    assert got["backbone.patch_embed.proj.weight"]


def test_frozen_backbone_trains_only_the_decoder():
    model = build_model({**CFG, "freeze_backbone": True})
    got = _grads(model)
    trained = {n for n, g in got.items() if g}
    assert trained and all(n.startswith("decoder.") for n in trained)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
