"""The four DINOv3 losses, the masked ViT forward, block masks and schedules on small hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinomed.backbones import create_backbone
from dinomed.pretrain import (DINOClsTokenLoss, GramLoss, IBOTPatchLoss, KoLeoLoss, add_mask_token,
                              resize_patch_features, sinkhorn_knopp, vit_tokens)
from dinomed.pretrain.masking import BlockMaskGenerator, batch_masks
from dinomed.pretrain.schedules import lr_scale, warmup_cosine


def test_sinkhorn_knopp_rows_and_columns():
    scores = torch.randn(6, 4)
    q = sinkhorn_knopp(scores, temperature=0.5, n_iterations=3)
    # each sample's target is a distribution (the last step normalises samples exactly)
    assert torch.allclose(q.sum(dim=1), torch.ones(6), atol=1e-6)
    # each prototype gets about B/K of the mass after 3 iterations, exactly in the limit
    assert torch.allclose(q.sum(dim=0), torch.full((4,), 6 / 4), atol=0.15)
    q = sinkhorn_knopp(scores, temperature=0.5, n_iterations=200)
    assert torch.allclose(q.sum(dim=0), torch.full((4,), 1.5), atol=1e-5)
    assert torch.allclose(q.sum(dim=1), torch.ones(6), atol=1e-6)
    # equal scores: the balanced assignment is uniform
    assert torch.allclose(sinkhorn_knopp(torch.zeros(3, 5), 0.1), torch.full((3, 5), 0.2))


def test_dino_loss_hand_computed():
    loss = DINOClsTokenLoss(student_temp=0.1)
    teacher = torch.softmax(torch.randn(2, 3, 8), dim=-1)
    # a uniform student: the cross-entropy with any distribution is log K
    assert loss(torch.zeros(4, 3, 8), teacher).item() == pytest.approx(math.log(8), abs=1e-5)
    student = torch.randn(2, 3, 8)
    log_p = F.log_softmax(student / 0.1, dim=-1)
    pairs = [(s, t) for s in range(2) for t in range(2) if s != t]
    expected = sum(-(teacher[t, b] * log_p[s, b]).sum() for s, t in pairs for b in range(3)) / (3 * len(pairs))
    assert loss(student, teacher, ignore_diagonal=True).item() == pytest.approx(expected.item(), rel=1e-5)
    every = sum(-(teacher[t, b] * log_p[s, b]).sum() for s in range(2) for t in range(2) for b in range(3)) / 12
    assert loss(student, teacher).item() == pytest.approx(every.item(), rel=1e-5)


def test_ibot_loss_weights_each_masked_crop_equally():
    masks = torch.tensor([[True, True, False], [False, False, False], [False, True, False]])
    student = torch.randn(3, 5)  # three masked patches: two in crop 0, one in crop 2
    teacher = torch.softmax(torch.randn(3, 5), dim=-1)
    ce = -(teacher * F.log_softmax(student / 0.1, dim=-1)).sum(-1)
    expected = (ce[0] / 2 + ce[1] / 2 + ce[2] / 1) / 3  # divided by the 3 crops of the batch
    assert IBOTPatchLoss(0.1)(student, teacher, masks).item() == pytest.approx(expected.item(), rel=1e-5)


def test_koleo_of_known_point_sets():
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 3.0  # scale is normalised away
    assert KoLeoLoss()(square).item() == pytest.approx(-math.log(math.sqrt(2.0)), abs=1e-5)
    pair = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # antipodal: distance 2
    assert KoLeoLoss()(pair).item() == pytest.approx(-math.log(2.0), abs=1e-5)
    # bunched points are penalised more than spread ones
    bunched = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, -0.01]])
    assert KoLeoLoss()(bunched).item() > KoLeoLoss()(square).item()


def test_gram_loss_zero_for_identical_and_hand_case():
    feats = torch.randn(2, 9, 16)
    assert GramLoss()(feats, feats.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert GramLoss()(feats, 5.0 * feats).item() == pytest.approx(0.0, abs=1e-6)  # normalised features
    # student: two orthogonal patches (Gram = identity); teacher: two equal patches (Gram = ones)
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert GramLoss()(student, teacher).item() == pytest.approx(0.5)  # two off-diagonal entries of 4 differ by 1


def test_gram_loss_invariant_to_teacher_resolution_for_constant_maps():
    student = torch.randn(3, 4 * 4, 8)
    vectors = torch.randn(3, 1, 8)
    loss = GramLoss()
    low = resize_patch_features(vectors.expand(3, 4 * 4, 8), (4, 4), (4, 4))
    high = resize_patch_features(vectors.expand(3, 8 * 8, 8).contiguous(), (8, 8), (4, 4))
    higher = resize_patch_features(vectors.expand(3, 12 * 12, 8).contiguous(), (12, 12), (4, 4))
    assert high.shape == (3, 16, 8)
    ref = loss(student, low).item()
    assert loss(student, high).item() == pytest.approx(ref, rel=1e-5)
    assert loss(student, higher).item() == pytest.approx(ref, rel=1e-5)


def test_masked_forward_equals_timm_forward_features_without_mask():
    model = add_mask_token(create_backbone("vit_tiny", in_chans=1, img_size=64)).eval()
    images = torch.randn(2, 1, 64, 48)
    reference = model.forward_features(images)
    out = vit_tokens(model, images)
    n_prefix = model.num_prefix_tokens
    assert torch.allclose(out["cls"], reference[:, 0], atol=1e-6)
    assert torch.allclose(out["patch"], reference[:, n_prefix:], atol=1e-6)
    assert out["grid"] == (4, 3)
    none_masked = vit_tokens(model, images, torch.zeros(2, 12, dtype=torch.bool))
    assert torch.allclose(none_masked["patch"], out["patch"], atol=1e-6)
    masks = torch.zeros(2, 12, dtype=torch.bool)
    masks[0, :6] = True
    masked = vit_tokens(model, images, masks)
    assert not torch.allclose(masked["patch"][0], out["patch"][0])
    assert torch.allclose(masked["patch"][1], out["patch"][1], atol=1e-6)  # the other image is untouched
    # a masked image's content no longer matters where it is masked
    other = images.clone()
    other[0, :, :32] = torch.randn(1, 32, 48)  # rows of the first 6 patches (2 patch rows of 3)
    assert torch.allclose(vit_tokens(model, other, masks)["patch"][0], masked["patch"][0], atol=1e-5)


def test_block_masks_counts():
    rng = np.random.default_rng(0)
    generator = BlockMaskGenerator((8, 8))
    mask = generator(20, rng)
    assert mask.shape == (8, 8) and mask.sum() == 20
    masks = batch_masks(generator, 10, (0.1, 0.5), 0.5, rng)
    assert masks.shape == (10, 64)
    counts = sorted(int(c) for c in masks.sum(1))
    assert counts[:5] == [0] * 5  # int(10 * 0.5) crops masked
    ratios = np.linspace(0.1, 0.5, 6)[1:]
    assert counts[5:] == sorted(int(64 * r) for r in ratios)


def test_schedules():
    s = warmup_cosine(0.0, 1.0, 0.1, warmup_iterations=4, total_iterations=14)
    assert len(s) == 14
    assert s[0] == 0.0 and s[2] == pytest.approx(0.5) and s[4] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s[4:]) <= 1e-12)
    ramp = warmup_cosine(0.0, 0.0, 2.0, 0, 10, cosine_iterations=4)  # the Gram weight of stage 2
    assert ramp[0] == 0.0 and ramp[3] == pytest.approx(2.0) and np.all(ramp[3:] == 2.0)
    assert lr_scale("sqrt_wrt_1024", 1024) == pytest.approx(4.0)
