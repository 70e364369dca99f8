"""DINO loss on the CLS token with Sinkhorn-Knopp teacher targets (DINOv3, sec. 3.1; DINOv2, sec. 4).

For the prototype scores ``t`` of the teacher and ``s`` of the student (``K`` prototypes), the loss is the
cross-entropy ``- sum_k q_k log softmax(s / tau_s)_k`` between the teacher's target ``q`` and the student's
distribution, averaged over every (student crop, teacher crop) pair of the same image. The teacher target
``q`` is not a centred softmax but the Sinkhorn-Knopp assignment (SwAV, Caron et al. 2020): the matrix
``Q = exp(t / tau_t)`` (prototypes x samples) is alternately normalised so that each prototype receives the
same total mass ``1/K`` and each sample carries ``1/B``; after the last column step it is scaled by ``B``
so that each sample's target sums to one. Under ``torch.distributed`` the sums run over the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temperature: float, n_iterations: int = 3,
                   n_samples: torch.Tensor | int | None = None) -> torch.Tensor:
    """Balanced soft assignment of ``scores`` ``(B, K)`` to the ``K`` prototypes; each row sums to 1.

    ``n_samples`` is the number of samples in the global batch (default: ``B`` times the world size); the
    iBOT loss passes the global number of masked patches, which differs between processes.
    """
    q = torch.exp(scores.float() / temperature).t()  # (K, B): the paper's notation
    n_prototypes = q.shape[0]
    if n_samples is None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        n_samples = q.shape[1] * world
    elif isinstance(n_samples, torch.Tensor):
        n_samples = _all_reduce(n_samples.clone().to(q.device)).item()
    q /= _all_reduce(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # every prototype gets total mass 1/K
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)  # every sample carries mass 1/B
        q /= n_samples
    q *= n_samples  # columns sum to one: an assignment per sample
    return q.t()


class DINOClsTokenLoss(nn.Module):
    """Cross-entropy between Sinkhorn-Knopp teacher targets and the student's tempered softmax."""

    def __init__(self, student_temp: float = 0.1):
        super().__init__()
        self.student_temp = student_temp

    def sinkhorn_knopp_teacher(self, teacher_scores: torch.Tensor, teacher_temp: float, n_iterations: int = 3):
        return sinkhorn_knopp(teacher_scores, teacher_temp, n_iterations)

    def forward(self, student_scores: torch.Tensor, teacher_probs: torch.Tensor, ignore_diagonal: bool = False):
        """``student_scores`` ``(S, B, K)``, ``teacher_probs`` ``(T, B, K)``: mean over all (s, t) pairs of each image.

        ``ignore_diagonal`` skips the pairs where student and teacher saw the same crop (s == t), as for the
        two global crops.
        """
        n_student, batch, _ = student_scores.shape
        n_teacher = teacher_probs.shape[0]
        log_p = F.log_softmax(student_scores.float() / self.student_temp, dim=-1)
        pair_loss = -torch.einsum("sbk,tbk->st", log_p, teacher_probs.float())  # summed over the batch
        if not ignore_diagonal:
            return pair_loss.sum() / (batch * n_student * n_teacher)
        n_diag = min(n_student, n_teacher)
        off_diagonal = pair_loss.sum() - torch.diagonal(pair_loss).sum()
        return off_diagonal / (batch * (n_student * n_teacher - n_diag))
