"""Checkpoints of a pretraining run, written atomically, readable with ``torch.load(weights_only=True)``.

``RUN_DIR/checkpoint.pth``: everything ``--resume`` needs to continue exactly (student, teacher, Gram teacher,
optimizer, next iteration, Gram refresh count, the RNG states of Python, numpy and torch).
``RUN_DIR/teacher_checkpoint.pth``: the EMA teacher in DINOv3's training-checkpoint layout
(``{"teacher": {"backbone.<Meta keys>", "dino_head.…", "ibot_head.…"}}``), which ``load_backbone``, DINOv3's own
tools and MedDINOv3-style loaders read; ``dinomed export-backbone`` turns it into a plain backbone file.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..backbones import timm_to_meta
from ..errors import CheckpointError

CHECKPOINT = "checkpoint.pth"
TEACHER_CHECKPOINT = "teacher_checkpoint.pth"
FORMAT = "dinomed-pretrain-checkpoint/1"


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def teacher_state_meta(teacher: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The teacher network in DINOv3's training layout: ``backbone.`` (Meta keys), ``dino_head.``, ``ibot_head.``."""
    backbone = teacher.backbone
    state = {f"backbone.{k}": v for k, v in timm_to_meta(backbone, backbone.mask_token).items()}
    for head in ("dino_head", "ibot_head"):
        state.update({f"{head}.{k}": v.detach().clone().cpu() for k, v in getattr(teacher, head).state_dict().items()})
    return state


def save_run_checkpoint(run_dir: Path, payload: dict) -> Path:
    path = Path(run_dir) / CHECKPOINT
    with atomic_path(path) as tmp:
        torch.save(dict(payload, format=FORMAT), tmp)
    return path


def save_teacher_checkpoint(run_dir: Path, teacher: torch.nn.Module, iteration: int) -> Path:
    path = Path(run_dir) / TEACHER_CHECKPOINT
    with atomic_path(path) as tmp:
        torch.save({"teacher": teacher_state_meta(teacher), "iteration": torch.tensor(iteration)}, tmp)
    return path


def load_run_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"--resume: {path} not found; the run folder holds no checkpoint to continue from")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable pretraining checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dinomed pretraining checkpoint (expected format {FORMAT})")
    return state


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
