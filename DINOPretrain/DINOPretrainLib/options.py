"""What a user chooses for a run, turned into ``dinomed`` arguments: the recipe, the common options as widgets
(length, batch size, learning rate, image size, backbone checkpoint), other ``key=value`` overrides typed in one
field (split with :mod:`shlex`, so a quoted YAML value with spaces stays one override), device and GPU count."""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

MODES = ("finetune", "pretrain")
DEVICES = ("auto", "cpu", "cuda", "mps")
CONFIG_FILE = "a config file…"  # the recipe list's last entry: a YAML file of one's own


class OptionsError(ValueError):
    """A choice that cannot make a run; the message says which field and what is expected."""


def path_or_none(value) -> Path | None:
    """A folder or file field's value, or None when unset. "" and "." are unset: a parameter node stores an empty
    path as ".", and a run must never land in Slicer's working directory because a field was left empty."""
    if value is None:
        return None
    text = str(value).strip()
    return None if text in ("", ".") else Path(text)


@dataclass
class Recipe:
    """One entry of ``dinomed recipes --events`` (see dinomed/recipes.py)."""

    name: str
    kind: str
    description: str = ""
    path: str = ""
    model: str = ""
    inputs: list = field(default_factory=list)
    patch_dims: int = 2
    modality: str = ""
    stage: int = 0
    arch: str = ""
    family: str = ""
    checkpoint_keys: list = field(default_factory=list)
    option_keys: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def label(self) -> str:
        """What the recipe list shows."""
        return f"{self.name} — {self.description}" if self.description else self.name


def family_stages(recipes: Sequence[Recipe], family: str) -> list[Recipe]:
    """The pretraining stages of one family (ct_vits → ct_vits_stage1, _stage2, _stage3), in order."""
    return sorted((r for r in recipes if r.kind == "pretrain" and r.family == family), key=lambda r: r.stage)


def parse_overrides(text: str) -> list[str]:
    """The free overrides field → ``key=value`` items, split like a shell command line, so that
    ``"schedules.teacher_temp={start: 0.02, peak: 0.02, end: 0.02, warmup_epochs: 0}"`` stays one item."""
    try:
        items = shlex.split(text or "")
    except ValueError as exc:
        raise OptionsError(f"overrides: {exc} (close the quote)") from None
    bad = [item for item in items if "=" not in item or item.startswith("=")]
    if bad:
        raise OptionsError(f"overrides: expected key=value items (e.g. optim.lr=3e-4), found {bad[0]!r}")
    return items


@dataclass
class TrainingOptions:
    """The common options; 0 / "" mean "the recipe's own value"."""

    length: int = 0  # pretraining: epochs; finetuning: steps
    batch_size: int = 0  # finetuning: global batch; pretraining: per GPU
    learning_rate: float = 0.0  # finetuning: optim.lr; pretraining stage 1: the peak of schedules.lr
    image_size: int = 0  # finetuning: patch side; pretraining stage 1: global crop side (multiple of 16)
    backbone_checkpoint: str = ""  # finetuning: model.*backbone_checkpoint; pretraining stage 1: student.pretrained
    extra: str = ""  # other overrides, shlex-split
    device: str = "auto"
    gpus: int = 1

    def overrides(self, recipe: Recipe | None, kind: str) -> list[str]:
        """The ``key=value`` overrides these options mean for ``recipe`` (None: a config file of one's own, whose
        keys are those of the kind's bundled recipes)."""
        keys = dict(recipe.option_keys) if recipe is not None and recipe.option_keys else _default_keys(kind)
        out: list[str] = []
        if self.length:
            out.append(f"{keys['length']}={int(self.length)}")
        if self.batch_size:
            out.append(f"{keys['batch_size']}={int(self.batch_size)}")
        later_stage = kind == "pretrain" and recipe is not None and recipe.stage > 1
        if self.learning_rate and not later_stage:  # stages 2-3 keep their own schedules (warm-up, cosine)
            out.append(f"{keys['lr']}={float(self.learning_rate):g}")
        if self.image_size:
            size = int(self.image_size)
            if kind == "finetune":
                dims = recipe.patch_dims if recipe is not None else 2
                out.append(f"{keys['image_size']}=[{', '.join([str(size)] * dims)}]")
            elif recipe is None or recipe.stage <= 1:
                if size % 16:
                    raise OptionsError(f"image size {size}: pretraining crops must be a multiple of the patch size 16")
                out += [f"crops.global_crops_size={size}", f"crops.local_crops_size={max(16, size // 32 * 16)}"]
        if self.backbone_checkpoint.strip():
            checkpoint = self.backbone_checkpoint.strip()
            if not Path(checkpoint).is_file():
                raise OptionsError(f"backbone checkpoint {checkpoint}: no such file")
            if kind == "pretrain":
                if recipe is None or recipe.stage <= 1:
                    out.append(f"student.pretrained={checkpoint}")
            else:
                candidates = list(recipe.checkpoint_keys) if recipe is not None else ["model.backbone_checkpoint"]
                if len(candidates) > 1:
                    raise OptionsError(
                        f"recipe {recipe.name} takes {len(candidates)} backbones ({', '.join(candidates)}): set each "
                        "in the overrides field instead (e.g. model.ct_backbone_checkpoint=/path/ct.pth)")
                out.append(f"{candidates[0]}={checkpoint}")
        if self.device and self.device != "auto":
            if self.device not in DEVICES:
                raise OptionsError(f"device {self.device!r}: expected one of {', '.join(DEVICES)}")
            out.append(f"train.device={self.device}")
        return out + parse_overrides(self.extra)

    def launch_args(self) -> list[str]:
        """``--nproc-per-node N`` for more than one GPU: dinomed restarts itself under torchrun --standalone."""
        if int(self.gpus) < 1:
            raise OptionsError(f"GPU count {self.gpus}: expected 1 or more")
        if int(self.gpus) > 1:
            if self.device == "cpu":
                raise OptionsError("more than one GPU was asked for with device cpu; choose auto or cuda")
            return ["--nproc-per-node", str(int(self.gpus))]
        return []


def _default_keys(kind: str) -> dict:
    if kind == "finetune":
        return {"length": "train.max_steps", "batch_size": "train.batch_size", "lr": "optim.lr",
                "image_size": "data.patch_size"}
    return {"length": "optim.epochs", "batch_size": "train.batch_size_per_gpu", "lr": "schedules.lr.peak",
            "image_size": "crops.global_crops_size"}


def require_folder(value, what: str, must_exist: bool = True) -> Path:
    """A folder field that must be set (and exist): a clear error naming the field otherwise."""
    path = path_or_none(value)
    if path is None:
        raise OptionsError(f"choose the {what} first")
    if must_exist and not path.is_dir():
        raise OptionsError(f"{what} {path}: no such folder")
    return Path(os.path.abspath(path))
