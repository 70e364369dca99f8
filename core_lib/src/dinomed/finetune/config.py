"""Finetuning configuration: a YAML recipe over built-in defaults, then ``key=value`` overrides.

A recipe (``dinomed/configs/finetune/<name>.yaml`` or any YAML file) names the model architecture (the
``architecture`` dict of a ``model.json``), the inputs, the labels, the data sampling, augmentation,
optimiser and training loop settings. ``key=value`` overrides use dotted keys and YAML values
(``optim.lr=3e-4``, ``data.patch_size=[32,32]``, ``model.backbone_checkpoint=/ckpt/pet.pth``). The layering,
the refusal of unknown keys (with a suggestion) and the typing of values are ``dinomed.config``'s, shared with
pretraining. A run writes its resolved config next to its state, and ``--resume`` refuses a config that differs
from it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..config import Layer, deep_merge, dump_config, merge_layers, read_yaml
from ..config import parse_overrides as parse_override_layers
from ..errors import DinomedError

__all__ = ["CONFIG_DIR", "DEFAULTS", "FREE_FORM", "check_config", "dump_config", "find_config", "load_config",
           "parse_overrides", "with_defaults"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "finetune"

DEFAULTS: dict[str, Any] = {
    "name": "finetuned-model",
    "description": "",  # one line shown by `dinomed recipes` and the DINOPretrain module's recipe list
    # the ``architecture`` of model.json; ``in_chans`` and ``num_classes`` are filled in from inputs and labels
    "model": {},
    # a model folder whose weights initialise the model (e.g. DINO-Med3D stage II from the best stage-I model)
    "init_from": None,
    # dataset channels the model reads, by modality name (dataset.json channel_names), in model input order
    "inputs": ["CT", "PET"],
    # the classes the model learns, by dataset label name (value 1..K in this order); null: every dataset label
    "labels": None,
    # dataset labels folded into background (named explicitly, so that an unexpected label value is an error)
    "background_labels": [],
    # model.json preprocessing, applied in training and recorded for `dinomed segment`:
    "preprocessing": {
        # one spec per input; null: dinomed.preprocess defaults (CT window, PET log1p SUV). (A list given directly
        # as `preprocessing:` is read as these channel specs, the earlier form.)
        "channels": None,
        # resample every case to this voxel spacing [x, y, z] mm before training (null: each case's own grid; a null
        # z keeps each case's own slice spacing, the natural choice for 2D models); dinomed segment resamples the
        # input to it and puts the labels back onto the CT grid
        "target_spacing": None,
        # high-resolution input (MedDINOv3's main lever, sec. 4: slices at 896^2 by rescaling the spacing): the
        # in-plane spacing (target or native) is divided by this factor, so a 512^2 slice is seen at 512*scale
        "input_scale": 1.0,
    },
    "data": {
        "patch_size": [128, 128],  # 2D models: [H, W] axial patches; 3D models: [D, H, W]
        "pos": 2.0,  # foreground : background ratio of patch centres (RandCropByPosNegLabeld)
        "neg": 1.0,
        # named option: one crop-centre weight per class, background first (overrides pos/neg), e.g. to centre
        # more patches on a small class such as lesions (RandCropByLabelClassesd ratios)
        "class_ratios": None,
        "val_fraction": 0.2,  # held-out share of the cases (at least one case)
        "val_cases": None,  # explicit held-out case names (overrides val_fraction and folds)
        "folds": None,  # k folds: hold out fold ``fold`` of ``folds`` (cases in a seeded order)
        "fold": 0,
        "split_seed": 0,
        "max_val_cases": None,  # validate on at most this many of the held-out cases (time)
    },
    "augment": {
        "flip_prob": 0.5,  # per axis, in-plane axes (and z for 3D models)
        "affine_prob": 0.3,
        "rotate_deg": 15.0,  # in-plane rotation range (+-)
        "scale": 0.15,  # isotropic zoom range (+-)
        "intensity_prob": 0.3,
        "intensity_scale": 0.1,  # RandScaleIntensityd factors
        "intensity_shift": 0.1,  # RandShiftIntensityd offsets (normalised units, inputs are in [-1, 1])
        # named options beyond the papers' recipes (off by default), for robustness to other scanners and
        # generators: Gaussian noise, Gaussian blur (a softer reconstruction), gamma contrast (MONAI transforms,
        # applied per channel as nnU-Net's default augmentation does)
        "noise_prob": 0.0,
        "noise_std": 0.05,  # RandGaussianNoised std (normalised units)
        "smooth_prob": 0.0,
        "smooth_sigma": [0.5, 1.5],  # RandGaussianSmoothd sigma range, pixels
        "gamma_prob": 0.0,
        "gamma": [0.7, 1.5],  # RandAdjustContrastd gamma range
    },
    # batch_dice: Dice over the whole (per-process) batch as nnU-Net does, steadier for small classes; per-sample
    # Dice (false) makes a DDP run exactly equal to a single-process run with the same global batch
    "loss": {"lambda_dice": 1.0, "lambda_ce": 1.0, "batch_dice": True},
    "optim": {
        # cosine: linear warm-up then cosine to min_lr_ratio; linear: warm-up then linear decay to 0 (poly 1.0, the
        # MedDINOv3 official trainer); plateau: warm-up then the lr halves (plateau_factor) when the held-out Dice
        # has not improved for plateau_patience validations (ReduceLROnPlateau, the DINO-Med3D official trainer)
        "schedule": "cosine",
        "plateau_factor": 0.5,
        "plateau_patience": 5,
        "lr": 1e-4,  # new layers (decoder, fusion, adapters)
        "backbone_lr_scale": 0.1,  # pretrained encoder parameters get lr * this
        "backbone_patterns": ["backbone", "encoder", "patch_embed"],  # parameter-name parts marking the encoder
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "warmup_steps": 50,
        "min_lr_ratio": 0.01,  # cosine floor, as a fraction of the peak learning rate
        "grad_clip": 1.0,  # max gradient norm; null disables
    },
    "train": {
        "max_steps": 1000,
        "batch_size": 8,  # global batch (split across DDP ranks)
        "seed": 0,
        "amp": "auto",  # auto (bf16 on GPU, off on CPU), bf16, fp16, off
        "device": "auto",  # auto, cpu, cuda, cuda:N
        "val_every": 100,
        "log_every": 10,
        "save_every": None,  # state.pt every N steps (default: val_every); always at the end and on a stop
        "stop_after": None,  # stop cleanly (state saved) after this step, e.g. to fit a job time limit
        "max_seconds": None,  # a training-time budget: finish (validate, save) once this much time has passed
        "clock": "wall",  # the budget's clock: wall, or process (CPU seconds of this process: fair on a shared machine)
        "num_workers": 0,
        "find_unused_parameters": False,  # DDP: true for models with parameters a forward pass may skip
    },
    # model.json "inference" entries (batch_size, roi_size, overlap, min_component_ml); defaults per model kind
    "inference": {},
}


def _sections(data: dict) -> dict:
    """Earlier forms read as today's: ``preprocessing: [channel specs]`` is ``preprocessing: {channels: [...]}``."""
    if isinstance(data.get("preprocessing"), list):
        data = dict(data, preprocessing={"channels": data["preprocessing"]})
    elif "preprocessing" in data and data["preprocessing"] is None:
        data = {k: v for k, v in data.items() if k != "preprocessing"}
    return data


# sections whose keys belong to someone else (the model registry checks model keys; model.json inference)
FREE_FORM = ("model", "inference")


def find_config(name_or_path: str | Path) -> Path:
    """A config file path, or the bundled recipe of that name (``meddinov3`` → configs/finetune/meddinov3.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if not path.parent.parts and bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise DinomedError(f"{name_or_path}: no such config file, and no bundled finetuning recipe of that name ({names})")


def parse_overrides(items: Iterable[str]) -> dict:
    """``["optim.lr=3e-4", "data.patch_size=[32,32]"]`` → one nested dict (later overrides win)."""
    merged: dict = {}
    for layer in parse_override_layers(items):
        deep_merge(merged, layer.values)
    return merged


def load_config(name_or_path: str | Path | None = None, overrides: Iterable[str] | dict = ()) -> dict:
    """The resolved finetuning config: defaults ← recipe YAML ← overrides. Unknown keys are errors.

    A recipe may start from another with ``base: other_recipe`` (resolved first, then updated).
    """
    layers = _recipe_layers(find_config(name_or_path), seen=()) if name_or_path is not None else []
    if isinstance(overrides, dict):
        layers.append(Layer("overrides", _sections(overrides)))
    else:
        layers += parse_override_layers(overrides)
    cfg = merge_layers(DEFAULTS, layers, free_form=FREE_FORM)
    check_config(cfg)
    return cfg


def _recipe_layers(path: Path, seen: tuple) -> list[Layer]:
    data = read_yaml(path)
    base = data.pop("base", None)
    layer = Layer(str(path), _sections(data))
    if base is None:
        return [layer]
    if str(path) in seen:
        raise DinomedError(f"{path}: the 'base' chain loops ({' -> '.join(seen)})")
    sibling = path.parent / (str(base) if str(base).endswith((".yaml", ".yml")) else f"{base}.yaml")
    base_path = sibling if sibling.is_file() else find_config(base)
    return [*_recipe_layers(base_path, seen + (str(path),)), layer]


def with_defaults(saved: dict) -> dict:
    """A resolved config saved by an earlier version, laid over today's defaults: a key added to the defaults since
    then (e.g. ``data.class_ratios``) gets its default, so that ``--resume`` of an older run folder sees no change."""
    import copy

    cfg = copy.deepcopy(DEFAULTS)
    deep_merge(cfg, copy.deepcopy(saved))
    return cfg


def check_config(cfg: dict) -> None:
    """Types and ranges that would otherwise fail deep inside training."""
    def positive_int(path, value, allow_none=False):
        if value is None and allow_none:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DinomedError(f"config {path}: expected a positive integer, found {value!r}")

    if not isinstance(cfg["model"], dict) or "name" not in cfg["model"]:
        raise DinomedError("config model: expected a mapping with the architecture 'name' (e.g. meddinov3)")
    inputs = cfg["inputs"]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise DinomedError(f"config inputs: expected a list of modality names such as [CT, PET], found {inputs!r}")
    labels = cfg["labels"]
    if labels is not None and (not isinstance(labels, list) or not labels):
        raise DinomedError(f"config labels: expected a list of dataset label names (or null for all), found {labels!r}")
    train, data = cfg["train"], cfg["data"]
    for key in ("max_steps", "batch_size", "val_every", "log_every"):
        positive_int(f"train.{key}", train[key])
    positive_int("train.save_every", train["save_every"], allow_none=True)
    positive_int("train.stop_after", train["stop_after"], allow_none=True)
    if train["max_seconds"] is not None and (not isinstance(train["max_seconds"], (int, float)) or train["max_seconds"] <= 0):
        raise DinomedError(f"config train.max_seconds: expected a positive number of seconds, found {train['max_seconds']!r}")
    if train["clock"] not in ("wall", "process"):
        raise DinomedError(f"config train.clock: expected wall or process, found {train['clock']!r}")
    if train["amp"] not in ("auto", "bf16", "fp16", "off", False, None):
        raise DinomedError(f"config train.amp: expected auto, bf16, fp16 or off, found {train['amp']!r}")
    patch = data["patch_size"]
    if not isinstance(patch, list) or len(patch) not in (2, 3) or not all(isinstance(p, int) and p > 0 for p in patch):
        raise DinomedError(f"config data.patch_size: expected [H, W] (2D models) or [D, H, W] (3D models), found {patch!r}")
    if data["folds"] is not None:
        positive_int("data.folds", data["folds"])
        if not isinstance(data["fold"], int) or not 0 <= data["fold"] < data["folds"]:
            raise DinomedError(f"config data.fold: expected 0..{data['folds'] - 1}, found {data['fold']!r}")
    if not 0.0 < float(data["val_fraction"]) < 1.0:
        raise DinomedError(f"config data.val_fraction: expected a fraction between 0 and 1, found {data['val_fraction']!r}")
    optim = cfg["optim"]
    for key in ("lr", "backbone_lr_scale", "weight_decay", "min_lr_ratio"):
        if not isinstance(optim[key], (int, float)) or optim[key] < 0:
            raise DinomedError(f"config optim.{key}: expected a non-negative number, found {optim[key]!r}")
    if optim["schedule"] not in ("cosine", "linear", "plateau"):
        raise DinomedError(f"config optim.schedule: expected cosine, linear or plateau, found {optim['schedule']!r}")
    pre = cfg["preprocessing"]
    if pre["target_spacing"] is not None:
        ts = pre["target_spacing"]
        if (not isinstance(ts, list) or len(ts) != 3 or ts[0] is None or ts[1] is None
                or not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0) for v in ts)):
            raise DinomedError(f"config preprocessing.target_spacing: expected [x, y, z] positive millimetres (z may be "
                               f"null: each case keeps its own slice spacing), found {ts!r}")
    if not isinstance(pre["input_scale"], (int, float)) or isinstance(pre["input_scale"], bool) or pre["input_scale"] <= 0:
        raise DinomedError(f"config preprocessing.input_scale: expected a positive factor, found {pre['input_scale']!r}")
    if not isinstance(optim["warmup_steps"], int) or optim["warmup_steps"] < 0:
        raise DinomedError(f"config optim.warmup_steps: expected a non-negative integer, found {optim['warmup_steps']!r}")
