"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"; DINOv2 sec. 4).

The Kozachenko-Leonenko differential-entropy estimator on L2-normalised features: with ``d_i`` the distance
of ``x_i`` to its nearest neighbour in the batch, ``L = - 1/n sum_i log(d_i + eps)``. Minimising it spreads
the student's CLS features uniformly over the sphere. Under ``torch.distributed`` the neighbours are searched
in the global batch (features are all-gathered with gradient), so that the loss does not depend on how the
batch is split between processes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` ``(B, D)``, e.g. the student's pre-head CLS tokens of one global crop."""
        x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
        offset = 0
        neighbours = x
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.nn.functional import all_gather

            neighbours = torch.cat(all_gather(x), dim=0)
            offset = dist.get_rank() * x.shape[0]
        with torch.no_grad():
            similarity = x @ neighbours.t()
            own = torch.arange(x.shape[0], device=x.device)
            similarity[own, own + offset] = -2.0  # a point is not its own neighbour
            nearest = similarity.argmax(dim=1)
        distances = F.pairwise_distance(x, neighbours[nearest], p=2, eps=self.eps)
        return -torch.log(distances + self.eps).mean()
