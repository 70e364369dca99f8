"""Checkpoints of a pretraining run, written atomically, readable with ``torch.load(weights_only=True)``.

``RUN_DIR/checkpoint.pth``: everything ``--resume`` needs to continue exactly (student, teacher, Gram teacher,
optimizer, next iteration, Gram refresh count, the RNG states of Python, numpy and torch: ``dinomed.training``).
``RUN_DIR/teacher_checkpoint.pth``: the EMA teacher in DINOv3's training-checkpoint layout
(``{"teacher": {"backbone.<Meta keys>", "dino_head.…", "ibot_head.…"}}``), which ``load_backbone``, DINOv3's own
tools and MedDINOv3-style loaders read; ``dinomed export-backbone`` turns it into a plain backbone file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..backbones import timm_to_meta
from ..errors import CheckpointError
from ..training import load_checkpoint, save_checkpoint

CHECKPOINT = "checkpoint.pth"
TEACHER_CHECKPOINT = "teacher_checkpoint.pth"
FORMAT = "dinomed-pretrain-checkpoint/1"


def teacher_state_meta(teacher: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The teacher network in DINOv3's training layout: ``backbone.`` (Meta keys), ``dino_head.``, ``ibot_head.``."""
    backbone = teacher.backbone
    state = {f"backbone.{k}": v for k, v in timm_to_meta(backbone, backbone.mask_token).items()}
    for head in ("dino_head", "ibot_head"):
        state.update({f"{head}.{k}": v.detach().clone().cpu() for k, v in getattr(teacher, head).state_dict().items()})
    return state


def save_run_checkpoint(run_dir: Path, payload: dict) -> Path:
    return save_checkpoint(Path(run_dir) / CHECKPOINT, dict(payload, format=FORMAT))


def save_teacher_checkpoint(run_dir: Path, teacher: torch.nn.Module, iteration: int) -> Path:
    return save_checkpoint(Path(run_dir) / TEACHER_CHECKPOINT,
                           {"teacher": teacher_state_meta(teacher), "iteration": torch.tensor(iteration)})


def load_run_checkpoint(run_dir: Path) -> dict:
    return load_checkpoint(Path(run_dir) / CHECKPOINT, "pretraining checkpoint", FORMAT)


def teacher_checkpoint_path(path: str | Path, what: str) -> Path:
    """A run folder -> its teacher_checkpoint.pth; a file is returned as it is."""
    path = Path(path)
    if path.is_dir():
        candidate = path / TEACHER_CHECKPOINT
        if not candidate.is_file():
            raise CheckpointError(f"{what} {path}: the folder holds no {TEACHER_CHECKPOINT} (is it a pretraining run folder?)")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file or run folder")
    return path


def read_teacher_dict(path: Path) -> dict[str, torch.Tensor]:
    """The flat ``teacher`` dict of a teacher checkpoint, or {} for a file in another format (a plain backbone)."""
    if path.suffix == ".safetensors":
        return {}
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        return {}
    teacher = raw.get("teacher") if isinstance(raw, dict) else None
    return teacher if isinstance(teacher, dict) else {}
