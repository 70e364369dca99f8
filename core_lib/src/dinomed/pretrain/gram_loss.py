"""Gram anchoring loss (DINOv3, sec. 4.2, eq. 3).

The patch-to-patch similarity structure of the student is tied to that of an earlier model, the Gram
teacher: with ``X_S`` and ``X_G`` the L2-normalised patch features (``P`` patches x ``D``) of the student and
the Gram teacher on the same image, ``L_Gram = || X_S X_S^T - X_G X_G^T ||_F^2``, averaged over the entries
(mean squared error between the two Gram matrices). ``img_level`` computes one Gram matrix per image (the
DINOv3 stage configs); otherwise one over all patches of the batch. The Gram teacher may run at a higher
resolution; its features are then resized to the student's patch grid before the loss
(:func:`resize_patch_features`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize_patch_features(patches: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int],
                          mode: str = "bicubic") -> torch.Tensor:
    """``(B, h*w, D)`` patch tokens on a ``grid`` (h, w) resampled to ``out_grid``: ``(B, H*W, D)``."""
    if tuple(grid) == tuple(out_grid):
        return patches
    b, _, d = patches.shape
    maps = patches.transpose(1, 2).reshape(b, d, *grid)
    maps = F.interpolate(maps.float(), size=tuple(out_grid), mode=mode, align_corners=False)
    return maps.flatten(2).transpose(1, 2)


class GramLoss(nn.Module):
    def __init__(self, apply_norm: bool = True, img_level: bool = True, remove_neg: bool = False):
        super().__init__()
        self.apply_norm = apply_norm
        self.img_level = img_level
        self.remove_neg = remove_neg

    def _gram(self, feats: torch.Tensor) -> torch.Tensor:
        feats = feats.float()
        if self.apply_norm:
            feats = F.normalize(feats, dim=-1)
        if not self.img_level:
            feats = feats.flatten(0, 1)
        gram = feats @ feats.transpose(-1, -2)
        return gram.clamp(min=0.0) if self.remove_neg else gram

    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
        """Both ``(B, P, D)`` on the same patch grid; the teacher's are treated as constants."""
        with torch.no_grad():
            target = self._gram(teacher_patches)
        return F.mse_loss(self._gram(student_patches), target)
