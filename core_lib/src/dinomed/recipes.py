"""The bundled training recipes, for ``dinomed recipes`` and the front-ends' recipe lists.

Every bundled finetuning recipe (``configs/finetune/*.yaml``) and pretraining stage config
(``configs/pretrain/*.yaml``, listed once per modality where CT and PET share the file: ``ct_vits_stage1``,
``pet_vits_stage1``) carries a one-line ``description:``. This module reads the YAML files only (no torch),
so that listing them is fast.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import merge_layers, read_yaml, stage_file, stage_layers, stage_names
from .errors import DinomedError

CONFIGS = Path(__file__).resolve().parent / "configs"
_STAGE_SUFFIX = re.compile(r"_stage(\d)$")


@dataclass
class Recipe:
    """One bundled config: what a recipe list shows and what a front-end needs to build its command line."""

    name: str
    kind: str  # "finetune" or "pretrain"
    description: str
    path: str
    # finetune: the model family and inputs; pretrain: modality, stage, ViT size and the stage family
    model: str = ""
    inputs: list = field(default_factory=list)
    patch_dims: int = 0  # finetune: 2 ([H, W] slices) or 3 ([D, H, W] patches)
    modality: str = ""
    stage: int = 0
    arch: str = ""
    family: str = ""  # pretrain: the stages of one recipe share it (ct_vits_stage1/2/3 → ct_vits)
    # the dotted config keys that take a backbone checkpoint (finetune model.*checkpoint, pretrain student.pretrained)
    checkpoint_keys: list = field(default_factory=list)
    # the keys behind the common options: length (epochs or steps), batch size, learning rate, image size
    option_keys: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _read(path: Path) -> dict:
    try:
        return read_yaml(path)
    except DinomedError:  # listed with what can be read; loading it names the problem
        return {}


def _finetune(path: Path) -> Recipe:
    data = _read(path)
    model = data.get("model") or {}
    keys = [f"model.{k}" for k in model if str(k).endswith("checkpoint")]
    patch = (data.get("data") or {}).get("patch_size") or [128, 128]
    return Recipe(
        name=path.stem, kind="finetune", description=str(data.get("description") or ""), path=str(path),
        model=str(model.get("name", "")), inputs=list(data.get("inputs") or ["CT", "PET"]), patch_dims=len(patch),
        checkpoint_keys=keys or ["model.backbone_checkpoint"],
        option_keys={"length": "train.max_steps", "length_unit": "steps", "batch_size": "train.batch_size",
                     "lr": "optim.lr", "image_size": "data.patch_size"},
    )


def _pretrain(name: str, default: dict) -> Recipe:
    # the stage file merged over the defaults (no validation: a stage-2 config without its gram.ckpt is listed)
    data = merge_layers(default, stage_layers(name), schedule_keys=("start", "peak", "end", "warmup_epochs",
                                                                       "cosine_epochs", "freeze_last_layer_epochs"))
    stage = int(data["stage"])
    match = _STAGE_SUFFIX.search(name)
    return Recipe(
        name=name, kind="pretrain", description=str(data["description"] or ""), path=str(stage_file(name)[0]),
        modality=str(data["modality"]).upper(), stage=stage,
        arch=str(data["student"]["arch"]), family=name[: match.start()] if match else name,
        checkpoint_keys=["student.pretrained"] if stage == 1 else [],
        option_keys={"length": "optim.epochs", "length_unit": "epochs", "batch_size": "train.batch_size_per_gpu",
                     "lr": "schedules.lr.peak", "image_size": "crops.global_crops_size"},
    )


def list_recipes(kind: str | None = None) -> list[Recipe]:
    """Every bundled recipe (finetuning first, then pretraining by family and stage), or those of one ``kind``."""
    out: list[Recipe] = []
    if kind in (None, "finetune"):
        out += [_finetune(p) for p in sorted((CONFIGS / "finetune").glob("*.yaml"))]
    if kind in (None, "pretrain"):
        default = read_yaml(CONFIGS / "pretrain" / "default.yaml")
        stages = [_pretrain(name, default) for name in stage_names()]
        out += sorted(stages, key=lambda r: (r.family, r.stage))
    return out
