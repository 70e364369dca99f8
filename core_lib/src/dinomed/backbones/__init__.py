"""DINOv3 ViT backbones through timm: creation, loading from every checkpoint format, dense features."""
from .checkpoints import FORMATS, LoadReport, detect_format, load_backbone, read_checkpoint, save_meta_backbone, timm_to_meta
from .features import BackboneFeatures, extract_features
from .vit import BACKBONE_ARCHS, BackboneArch, create_backbone, default_layers, patch_embed_for_channels, resolve_arch

__all__ = [
    "BACKBONE_ARCHS", "BackboneArch", "BackboneFeatures", "FORMATS", "LoadReport", "create_backbone", "default_layers",
    "detect_format", "extract_features", "load_backbone", "patch_embed_for_channels", "read_checkpoint",
    "resolve_arch", "save_meta_backbone", "timm_to_meta",
]
