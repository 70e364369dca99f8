"""The DINOv3 self-supervised meta-architecture: student, EMA teacher, Gram teacher, heads and losses.

DINOv3 (Siméoni et al. 2025, arXiv:2508.10104), sec. 3.1 and 4: the student sees 2 global and N local
crops, with part of the global crops' patches masked; the teacher (an exponential moving average of the
student) sees the 2 global crops. The objective is

    L = w_dino * (s_glob * L_DINO(global) + s_loc * w_loc(t) * L_DINO(local))
        + w_koleo * n_global * L_KoLeo + w_ibot * L_iBOT [+ w_gram(t) * L_Gram]

with ``s_glob``/``s_loc`` the shares of global-global (without the same-crop pairs) and local-global crop
pairs, as in the official ``SSLMetaArch.compute_losses``. In the Gram stages a frozen Gram teacher (an
earlier teacher) sees the global crops at a higher resolution; its patch features, resized to the
student's grid, anchor the student's patch Gram matrix (sec. 4.2).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.forward import vit_tokens
from .dino_clstoken_loss import DINOClsTokenLoss
from .gram_loss import GramLoss, resize_patch_features
from .heads import DINOHead
from .ibot_patch_loss import IBOTPatchLoss
from .koleo_loss import KoLeoLoss


class SSLNetwork(nn.Module):
    """A backbone (with a mask token) and its DINO (CLS) and iBOT (patch) heads: the student or the teacher."""

    def __init__(self, backbone: nn.Module, dino_head: DINOHead, ibot_head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def forward(self, global_crops, local_crops, masks, mask_indices):
        """Student pass. ``global_crops`` ``(2B, C, H, W)``, ``local_crops`` ``(nB, C, h, w)``, ``masks`` ``(2B, N)``,
        ``mask_indices`` the flat indices of the masked patches."""
        g = vit_tokens(self.backbone, global_crops, masks)
        loc = vit_tokens(self.backbone, local_crops)
        masked_patches = g["patch"].flatten(0, 1).index_select(0, mask_indices)
        n_global = g["cls"].shape[0]
        cls_scores = self.dino_head(torch.cat([g["cls"], loc["cls"]]))
        return {
            "global_cls": g["cls"], "global_patch": g["patch"], "grid": g["grid"],
            "global_cls_scores": cls_scores[:n_global], "local_cls_scores": cls_scores[n_global:],
            "masked_patch_scores": self.ibot_head(masked_patches),
        }

    @torch.no_grad()
    def teacher_forward(self, global_crops, mask_indices):
        g = vit_tokens(self.backbone, global_crops)
        masked_patches = g["patch"].flatten(0, 1).index_select(0, mask_indices)
        return {"cls": g["cls"], "patch": g["patch"], "cls_scores": self.dino_head(g["cls"]),
                "masked_patch_scores": self.ibot_head(masked_patches)}


def build_heads(cfg: dict, embed_dim: int) -> tuple[DINOHead, DINOHead]:
    d, i = cfg["dino"], cfg["ibot"]
    dino = DINOHead(embed_dim, d["head_n_prototypes"], d["head_hidden_dim"], d["head_bottleneck_dim"], d["head_nlayers"])
    ibot = DINOHead(embed_dim, i["head_n_prototypes"], i["head_hidden_dim"], i["head_bottleneck_dim"], i["head_nlayers"])
    return dino, ibot


class SSLMetaArch(nn.Module):
    """Holds student, teacher, optional Gram teacher and the four losses; one ``forward_backward`` per step.

    ``student_backbone`` must carry a ``mask_token`` (:func:`~dinomed.backbones.forward.add_mask_token`);
    ``gram_backbone`` is the frozen Gram teacher (stages 2 and 3) or None.
    """

    def __init__(self, cfg: dict, student_backbone: nn.Module, gram_backbone: nn.Module | None = None,
                 heads: tuple[DINOHead, DINOHead] | None = None):
        super().__init__()
        self.cfg = cfg
        dino_head, ibot_head = heads if heads is not None else build_heads(cfg, student_backbone.embed_dim)
        self.student = SSLNetwork(student_backbone, dino_head, ibot_head)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.gram_teacher = gram_backbone
        if gram_backbone is not None:
            gram_backbone.requires_grad_(False)
        self.dino_loss = DINOClsTokenLoss(cfg["dino"].get("student_temp", 0.1))
        self.ibot_loss = IBOTPatchLoss(cfg["ibot"].get("student_temp", 0.1))
        self.koleo_loss = KoLeoLoss()
        gram = cfg["gram"]
        self.gram_loss = GramLoss(apply_norm=gram["normalized"], img_level=gram["img_level"], remove_neg=gram["remove_neg"])
        self.student_forward = self.student  # replaced by the DDP wrapper when distributed

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    def forward_backward(self, batch: dict, teacher_temp: float, local_weight: float = 1.0,
                         gram_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]  # (2B, …), (nB, …)
        masks = batch["masks"]
        n_global = 2
        batch_size = global_crops.shape[0] // n_global
        n_local = local_crops.shape[0] // batch_size
        mask_indices = masks.flatten().nonzero().flatten()
        n_masked = torch.tensor([mask_indices.numel()], dtype=torch.long, device=masks.device)

        with torch.no_grad():
            t = self.teacher.teacher_forward(global_crops, mask_indices)
            cls_targets = self.dino_loss.sinkhorn_knopp_teacher(t["cls_scores"], teacher_temp)
            cls_targets = cls_targets.unflatten(0, (n_global, batch_size))
            patch_targets = self.ibot_loss.sinkhorn_knopp_teacher(t["masked_patch_scores"], teacher_temp, n_masked)

        s = self.student_forward(global_crops, local_crops, masks, mask_indices)

        # shares of the global-global and local-global crop pairs (official SSLMetaArch.compute_losses)
        global_terms = n_global * (n_global - 1) if cfg["dino"]["global_ignore_diagonal"] else n_global**2
        local_terms = n_global * n_local
        global_scale = global_terms / (global_terms + local_terms)
        local_scale = local_terms / (global_terms + local_terms)

        dino_local = self.dino_loss(s["local_cls_scores"].unflatten(0, (n_local, batch_size)), cls_targets)
        dino_global = self.dino_loss(s["global_cls_scores"].unflatten(0, (n_global, batch_size)), cls_targets,
                                     ignore_diagonal=cfg["dino"]["global_ignore_diagonal"])
        global_cls = s["global_cls"].unflatten(0, (n_global, batch_size))
        koleo = sum(self.koleo_loss(global_cls[i]) for i in range(n_global)) / n_global
        ibot = self.ibot_loss(s["masked_patch_scores"], patch_targets, masks)

        w_dino = cfg["dino"]["loss_weight"]
        loss = (w_dino * local_scale * local_weight * dino_local + w_dino * global_scale * dino_global
                + cfg["dino"]["koleo_loss_weight"] * n_global * koleo + cfg["ibot"]["loss_weight"] * ibot)
        metrics = {"dino_local_loss": dino_local.detach(), "dino_global_loss": dino_global.detach(),
                   "koleo_loss": koleo.detach(), "ibot_loss": ibot.detach()}

        if self.gram_teacher is not None:
            gram_crops = batch["gram_crops"]
            with torch.no_grad():
                g = vit_tokens(self.gram_teacher, gram_crops)
                target = resize_patch_features(g["patch"], g["grid"], s["grid"], cfg["gram"]["resize_method"])
            gram = self.gram_loss(s["global_patch"], target)
            loss = loss + gram_weight * gram
            metrics["gram_loss"] = gram.detach()
            metrics["gram_loss_weight"] = torch.tensor(float(gram_weight))

        loss.backward()
        with torch.no_grad():
            metrics.update(collapse_metrics(t["cls"], t["cls_scores"], teacher_temp))
            metrics["dino_target_entropy"] = target_entropy(cls_targets)
            metrics["ibot_target_entropy"] = target_entropy(patch_targets)
        metrics["loss"] = loss.detach()
        return loss.detach(), metrics

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student, for backbone, mask token and heads."""
        teacher = list(self.teacher.parameters())
        student = list(self.student.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """Copy the current EMA teacher's backbone into the Gram teacher (DINOv3 ``update_gram``)."""
        if self.gram_teacher is None:
            return
        state = {k: v for k, v in self.teacher.backbone.state_dict().items() if k != "mask_token"}
        self.gram_teacher.load_state_dict(state, strict=False)


def target_entropy(targets: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the per-sample Sinkhorn-Knopp targets ``(..., K)``.

    ``log K`` means uniform targets: the teacher does not tell images (or patches) apart and the student has
    nothing to learn (the "dead start" of a run whose teacher temperature is too high for its logits); it falls
    as the teacher's assignments sharpen. Not a collapse sign on its own: Sinkhorn-Knopp keeps every prototype
    used, so the batch-mean distribution stays near uniform either way.
    """
    t = targets.float().flatten(0, -2)
    if t.numel() == 0:
        return torch.tensor(float("nan"))
    return -(t * t.clamp(min=1e-12).log()).sum(-1).mean()


def collapse_metrics(teacher_cls: torch.Tensor, teacher_scores: torch.Tensor, teacher_temp: float) -> dict:
    """Two signs of a collapsed teacher: all CLS features alike (``teacher_cls_spread`` -> 0: mean per-dimension
    standard deviation over the batch of the L2-normalised CLS features), or every image sent to the same few
    prototypes (``teacher_entropy`` -> 0: entropy in nats of the batch-averaged teacher softmax)."""
    feats = F.normalize(teacher_cls.float(), dim=-1)
    spread = feats.std(dim=0).mean() * feats.shape[-1] ** 0.5  # ~1 for features spread over the sphere
    probs = F.softmax(teacher_scores.float() / teacher_temp, dim=-1).mean(dim=0)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    return {"teacher_cls_spread": spread, "teacher_entropy": entropy}
