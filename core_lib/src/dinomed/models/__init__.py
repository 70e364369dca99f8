"""The seed segmentation models, built from a model.json ``architecture`` dict by one registry.

| name | dims | paper |
| --- | --- | --- |
| ``meddinov3`` | 2D | MedDINOv3 (arXiv:2509.02379): multi-scale token aggregation + the official PatchDecode |
| ``slicewise3d`` | 3D | DINOv3 medical benchmark (arXiv:2509.06467): frozen slice-wise features, pseudo-3D volume, light 3D decoder; ``head: linear`` is the linear probe |
| ``linear_probe`` | 2D | the same benchmark's linear probe: a 1×1 head on frozen patch tokens, upsampled |
| ``dinomed3d`` | 3D | DINO-Med3D (arXiv:2606.18886): ICE, stage I 1×1 proxy head / stage II LoRA + 3D adapter + HRSE, gate at 1/4 + 3D UperNet + refinement |
| ``dual_petct`` | 2D | Dual-DINOv3 PET/CT (MIDL 2026): two encoders fused by multiscale cross-attention; variants pet_only, ct_only, early_fusion |
"""
from .registry import (MODEL_FORMAT, MODEL_REGISTRY, ModelEntry, available_models, build_model, load_model_folder,
                       model_json_template, read_model_json, resolve_config, save_model_folder)

__all__ = [
    "MODEL_FORMAT", "MODEL_REGISTRY", "ModelEntry", "available_models", "build_model", "load_model_folder",
    "model_json_template", "read_model_json", "resolve_config", "save_model_folder",
]
