"""Export the EMA teacher of a pretraining run as a backbone in Meta's DINOv3 format (``dinomed export-backbone``)."""
from __future__ import annotations

from pathlib import Path

from ..backbones import load_backbone, save_meta_backbone
from .checkpoint import read_teacher_dict, teacher_checkpoint_path


def export_backbone(run_dir: str | Path, out: str | Path) -> tuple[Path, object]:
    """Write ``out`` (Meta's backbone ``.pth``: plain tensors, with the teacher's mask token); return the path and
    the load report of the teacher it came from."""
    source = teacher_checkpoint_path(run_dir, "export-backbone")
    model = load_backbone(source)
    mask_token = read_teacher_dict(source).get("backbone.mask_token")
    path = save_meta_backbone(model, out, mask_token)
    return path, model.load_report
