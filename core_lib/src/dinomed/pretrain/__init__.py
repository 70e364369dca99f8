"""DINOv3 self-supervised pretraining on unlabeled CT or PET slices, in three stages.

Stage 1 self-distillation (DINO CLS loss with Sinkhorn-Knopp targets, iBOT masked-patch loss, KoLeo),
stage 2 Gram anchoring, stage 3 high-resolution adaptation (DINOv3, Siméoni et al. 2025, secs. 3-5; MedDINOv3
and Dual-DINOv3 run this recipe on CT and PET slices). ``dinomed pretrain`` and ``dinomed export-backbone``
are the command-line entry points.
"""
from ..backbones.forward import add_mask_token, vit_tokens
from .config import list_stage_configs, load_config
from .dino_clstoken_loss import DINOClsTokenLoss, sinkhorn_knopp
from .gram_loss import GramLoss, resize_patch_features
from .heads import DINOHead
from .ibot_patch_loss import IBOTPatchLoss
from .koleo_loss import KoLeoLoss
from .meta_arch import SSLMetaArch, SSLNetwork, collapse_metrics

__all__ = [
    "DINOClsTokenLoss", "DINOHead", "GramLoss", "IBOTPatchLoss", "KoLeoLoss", "SSLMetaArch", "SSLNetwork",
    "add_mask_token", "collapse_metrics", "export_backbone", "list_stage_configs", "load_config", "pretrain",
    "resize_patch_features", "sinkhorn_knopp", "vit_tokens",
]


def pretrain(*args, **kwargs):
    """See :func:`dinomed.pretrain.train.pretrain`."""
    from .train import pretrain as _pretrain

    return _pretrain(*args, **kwargs)


def export_backbone(*args, **kwargs):
    """See :func:`dinomed.pretrain.export.export_backbone`."""
    from .export import export_backbone as _export

    return _export(*args, **kwargs)
