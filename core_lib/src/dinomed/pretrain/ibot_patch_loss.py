"""iBOT masked-patch loss (iBOT, Zhou et al. 2022; DINOv3, sec. 3.1).

Some patches of the student's global crops are replaced by a learnable mask token; for each masked patch
the student's patch-head scores must predict the teacher's Sinkhorn-Knopp target computed from the
unmasked crop: ``- sum_k q_k log softmax(s / tau_s)_k``. Each crop's masked patches share a weight
``1 / (number of masked patches in that crop)``, so every masked crop counts equally, and the sum is
divided by the number of global crops in the (local) batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dino_clstoken_loss import sinkhorn_knopp


class IBOTPatchLoss(nn.Module):
    def __init__(self, student_temp: float = 0.1):
        super().__init__()
        self.student_temp = student_temp

    def sinkhorn_knopp_teacher(self, teacher_scores: torch.Tensor, teacher_temp: float,
                               n_masked_patches: torch.Tensor, n_iterations: int = 3) -> torch.Tensor:
        """Targets for the masked patches ``(M, K)``; ``n_masked_patches`` is this process's ``M`` (summed over processes)."""
        return sinkhorn_knopp(teacher_scores, teacher_temp, n_iterations, n_samples=n_masked_patches)

    def forward(self, student_scores: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                masks_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``student_scores``/``teacher_probs`` ``(M, K)`` for the masked patches (row order of ``masks[masks]``),
        ``masks`` ``(n_crops, N)`` booleans."""
        if masks_weight is None:
            per_crop = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
            masks_weight = per_crop.unsqueeze(-1).expand_as(masks)[masks]
        cross_entropy = -torch.sum(teacher_probs.float() * F.log_softmax(student_scores.float() / self.student_temp, dim=-1), dim=-1)
        return torch.sum(cross_entropy * masks_weight) / masks.shape[0]
