"""Pretraining configuration: the default YAML, a stage YAML on top, then ``key=value`` overrides.

As DINOv3 (``dinov3/configs``): ``configs/pretrain/default.yaml`` holds every key with its default; a stage
config (``ct_vits_stage1.yaml`` …, or any YAML file) overrides some of them; ``section.key=value`` arguments on
the command line override the result (values parsed as YAML: ``optim.epochs=10``, ``crops.global_crops_scale=[0.4,1]``).
An unknown key is an error, so that a typo does not silently train with a default. The run writes the resolved
config as ``config.yaml`` next to its checkpoints.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from ..errors import DinomedError

SCHEDULE_KEYS = {"start", "peak", "end", "warmup_epochs", "cosine_epochs", "freeze_last_layer_epochs"}


def config_dir() -> Path:
    """The bundled configs (``dinomed/configs/pretrain``, shipped as package data)."""
    return Path(__file__).resolve().parent.parent / "configs" / "pretrain"


def list_stage_configs() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml") if p.stem != "default")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DinomedError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DinomedError(f"{path}: expected a mapping of config sections, found {type(data).__name__}")
    return data


def _merge(base: dict, update: dict, where: str, source: str) -> dict:
    for key, value in update.items():
        if key not in base:
            raise DinomedError(f"{source}: unknown config key {where}{key}; known keys here: {', '.join(sorted(base))}")
        if isinstance(base[key], dict) and isinstance(value, dict) and "start" in base[key]:
            extra = set(value) - SCHEDULE_KEYS  # a schedule may gain optional keys (cosine_epochs)
            if extra:
                raise DinomedError(f"{source}: unknown schedule key(s) {where}{key}.{sorted(extra)[0]}; "
                                   f"expected {', '.join(sorted(SCHEDULE_KEYS))}")
            base[key] = dict(base[key], **value)
        elif isinstance(base[key], dict) and isinstance(value, dict):
            _merge(base[key], value, f"{where}{key}.", source)
        else:
            base[key] = value
    return base


def resolve_config_path(name: str | Path) -> Path:
    """A YAML file, or the name of a bundled stage config (``ct_vits_stage1``)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = config_dir() / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if bundled.is_file():
        return bundled
    raise DinomedError(
        f"config {name}: no such file, and not a bundled config; bundled: {', '.join(list_stage_configs())}"
    )


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise DinomedError(f"override {text!r}: expected section.key=value, e.g. optim.epochs=10")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    from ..finetune.config import _numbers  # YAML 1.1 reads 1e-1 as a string

    return key.strip().split("."), _numbers(value)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The resolved config: default.yaml <- ``path`` <- ``overrides``."""
    cfg = _read_yaml(config_dir() / "default.yaml")
    if path is not None:
        stage_path = resolve_config_path(path)
        _merge(cfg, _read_yaml(stage_path), "", str(stage_path))
    for text in overrides:
        keys, value = parse_override(text)
        update: dict = {}
        node = update
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        _merge(cfg, update, "", f"override {text!r}")
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
    if cfg["gram"]["use_loss"]:
        if not cfg["gram"]["ckpt"]:
            raise DinomedError(
                f"stage {cfg['stage']} uses the Gram loss (gram.use_loss=true) but no Gram teacher checkpoint was given; "
                "pass gram.ckpt=RUN_DIR_OF_THE_PREVIOUS_STAGE (or a teacher_checkpoint.pth / backbone file)"
            )
        if not crops.get("gram_teacher_crops_size"):
            raise DinomedError("config gram.use_loss=true needs crops.gram_teacher_crops_size (e.g. twice global_crops_size)")
    lo, hi = cfg["ibot"]["mask_ratio_min_max"]
    if not 0 <= lo < hi <= 1:
        raise DinomedError(f"config ibot.mask_ratio_min_max={[lo, hi]}: expected 0 <= min < max <= 1")
    if int(cfg["train"]["batch_size_per_gpu"]) < 2:
        raise DinomedError("config train.batch_size_per_gpu must be at least 2 (KoLeo needs a neighbour in the batch)")


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(copy.deepcopy(cfg), sort_keys=False)
