"""Pretraining configuration: the default YAML, a stage YAML on top, then ``key=value`` overrides.

As DINOv3 (``dinov3/configs``): ``configs/pretrain/default.yaml`` holds every key with its default; a stage
config (``ct_vits_stage1`` …, or any YAML file) overrides some of them; ``section.key=value`` arguments on the
command line override the result (values parsed as YAML: ``optim.epochs=10``, ``crops.global_crops_scale=[0.4,1]``).
The layering, the refusal of unknown keys (with a suggestion) and the typing of values are ``dinomed.config``'s,
shared with finetuning. The CT and PET stage configs share one file (``vits_stage1.yaml``); the name's prefix
(``ct_``/``pet_``) sets the modality. The run writes the resolved config as ``config.yaml`` next to its checkpoints.
"""
from __future__ import annotations

from pathlib import Path

from ..config import Layer, dump_config, merge_layers, parse_overrides, read_yaml, stage_layers, stage_names
from ..errors import DinomedError

__all__ = ["config_dir", "dump_config", "list_stage_configs", "load_config", "validate_config"]

# a schedule mapping: {start, peak, end, warmup_epochs[, cosine_epochs][, freeze_last_layer_epochs]}
SCHEDULE_KEYS = ("start", "peak", "end", "warmup_epochs", "cosine_epochs", "freeze_last_layer_epochs")


def config_dir() -> Path:
    """The bundled configs (``dinomed/configs/pretrain``, shipped as package data)."""
    return Path(__file__).resolve().parent.parent / "configs" / "pretrain"


def list_stage_configs() -> list[str]:
    """Every bundled stage config name (``ct_vits_stage1``, ``pet_vits_stage1``, …, ``tiny_test``)."""
    return stage_names(config_dir())


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The resolved config: default.yaml <- ``path`` (a stage name or a YAML file) <- ``overrides``."""
    layers: list[Layer] = stage_layers(path) if path is not None else []
    cfg = merge_layers(read_yaml(config_dir() / "default.yaml"), [*layers, *parse_overrides(overrides)],
                       schedule_keys=SCHEDULE_KEYS)
    validate_config(cfg)
    return cfg


def validate_config(cfg: dict) -> None:
    modality = str(cfg["modality"]).upper()
    if modality not in ("CT", "PET"):
        raise DinomedError(f"config modality {cfg['modality']!r}: expected CT or PET")
    cfg["modality"] = modality
    crops = cfg["crops"]
    patch = 16
    for key in ("global_crops_size", "local_crops_size", "gram_teacher_crops_size"):
        value = crops.get(key)
        for size in value if isinstance(value, (list, tuple)) else [value]:
            if size is not None and (int(size) <= 0 or int(size) % patch):
                raise DinomedError(f"config crops.{key}={value}: expected a positive multiple of the patch size {patch}")
    from .crops import MultiCropConfig

    try:
        multi = MultiCropConfig.from_config(crops)
        multi.ratios()
    except ValueError as exc:
        raise DinomedError(f"config {exc}") from None
    if cfg["gram"]["use_loss"] and any(gram is None for _, _, gram in multi.resolutions()):
        raise DinomedError("config gram.use_loss=true needs crops.gram_teacher_crops_size for every resolution "
                           "(e.g. twice global_crops_size)")
    if cfg["gram"]["use_loss"] and not cfg["gram"]["ckpt"]:
        raise DinomedError(
            f"stage {cfg['stage']} uses the Gram loss (gram.use_loss=true) but no Gram teacher checkpoint was given; "
            "pass gram.ckpt=RUN_DIR_OF_THE_PREVIOUS_STAGE (or a teacher_checkpoint.pth / backbone file)"
        )
    lo, hi = cfg["ibot"]["mask_ratio_min_max"]
    if not 0 <= lo < hi <= 1:
        raise DinomedError(f"config ibot.mask_ratio_min_max={[lo, hi]}: expected 0 <= min < max <= 1")
    if int(cfg["train"]["batch_size_per_gpu"]) < 2:
        raise DinomedError("config train.batch_size_per_gpu must be at least 2 (KoLeo needs a neighbour in the batch)")
