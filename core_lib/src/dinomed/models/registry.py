"""The model registry and the model folder.

``build_model(arch_config)`` builds any seed model from the ``architecture`` dict of a ``model.json``
(docs/CONTRACTS.md); ``save_model_folder`` / ``load_model_folder`` write and read the self-describing model
folder (``model.safetensors`` with the whole ``state_dict`` + ``model.json``); ``model_json_template`` makes a
valid ``model.json`` for a model (inputs, preprocessing, inference mode, labels, provenance).
"""
from __future__ import annotations

import copy
import datetime as _dt
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..atomic import atomic_path, atomic_write_text
from ..errors import CheckpointError, DinomedError, read_json_object

MODEL_FORMAT = "dinomed-model/1"
WEIGHTS_FILE = "model.safetensors"
JSON_FILE = "model.json"
# Keys that point at files used only to initialise a model for training; a model folder never needs them.
CHECKPOINT_KEYS = ("backbone_checkpoint", "pet_backbone_checkpoint", "ct_backbone_checkpoint", "stage1_checkpoint")
COMMON_KEYS = ("name", "backbone", "in_chans", "num_classes")  # every model's constructor takes these


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture: its class, built from keyword arguments whose defaults (in the signature, as in
    timm) are the architecture's defaults, and how inference feeds it."""

    name: str
    cls: type
    defaults: dict  # every architecture key and its default (None for a required one); checkpoint keys excepted
    spatial_dims: int  # 2: (B, C, H, W) slices; 3: (B, C, D, H, W) volumes
    summary: str = ""
    required: tuple[str, ...] = ()
    checkpoint_keys: tuple[str, ...] = ()  # keyword arguments naming files that initialise a model for training
    # maps an architecture written by an earlier dinomed (e.g. before a default changed) to the same model in
    # today's keys, so that old model folders keep loading as what they were trained as
    upgrade: Callable[[dict], dict] | None = None

    @property
    def inference_mode(self) -> str:
        """model.json ``inference.mode``: 2D models run slice by slice, 3D models by sliding window."""
        return "slicewise2d" if self.spatial_dims == 2 else "sliding3d"


MODEL_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, spatial_dims: int, summary: str = "", upgrade: Callable[[dict], dict] | None = None):
    """Class decorator: the model class becomes buildable as ``name`` from a model.json ``architecture``.

    The class takes keyword-only arguments; those without a default (``num_classes``) are required; those named in
    :data:`CHECKPOINT_KEYS` are files used only when building for training.
    """

    def wrap(cls):
        defaults, required, checkpoints = {}, [], []
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if param.name in CHECKPOINT_KEYS:
                checkpoints.append(param.name)
                continue
            if param.default is inspect.Parameter.empty:
                required.append(param.name)
                defaults[param.name] = None
            else:
                defaults[param.name] = _jsonable(param.default)
        missing = sorted({"in_chans", "num_classes"} - set(defaults))
        if missing:
            raise TypeError(f"model {name}: the constructor lacks the common keyword(s) {', '.join(missing)}")
        MODEL_REGISTRY[name] = ModelEntry(
            name=name, cls=cls, defaults=defaults, spatial_dims=spatial_dims, summary=summary,
            required=tuple(required), checkpoint_keys=tuple(checkpoints), upgrade=upgrade,
        )
        return cls

    return wrap


MODEL_MODULES = ("meddinov3", "slicewise3d", "dinomed3d", "dual_petct")


def _ensure_registered() -> None:
    import importlib

    for module in MODEL_MODULES:  # each model file registers itself on import
        importlib.import_module(f"{__package__}.{module}")


def available_models() -> dict[str, ModelEntry]:
    _ensure_registered()
    return dict(MODEL_REGISTRY)


def _entry(name) -> ModelEntry:
    _ensure_registered()
    if name not in MODEL_REGISTRY:
        raise DinomedError(
            f"unknown model architecture {name!r}; expected one of {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return MODEL_REGISTRY[name]


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def resolve_config(arch_config: dict) -> dict:
    """The full architecture config: the registered defaults updated by ``arch_config``; unknown keys are errors."""
    if not isinstance(arch_config, dict):
        raise DinomedError(f"the model architecture must be a dict with a 'name', found {type(arch_config).__name__}")
    if "name" not in arch_config:
        raise DinomedError(f"the model architecture has no 'name' (keys: {', '.join(sorted(arch_config)) or 'none'})")
    entry = _entry(arch_config["name"])
    unknown = sorted(set(arch_config) - set(entry.defaults) - set(entry.checkpoint_keys) - {"name"})
    if unknown:
        raise DinomedError(
            f"model {entry.name!r}: unknown architecture key(s) {', '.join(unknown)}; "
            f"known keys: {', '.join(sorted(set(entry.defaults) | set(entry.checkpoint_keys)))}"
        )
    missing = [k for k in entry.required if arch_config.get(k) is None and entry.defaults.get(k) is None]
    if missing:
        raise DinomedError(f"model {entry.name!r}: the architecture needs {', '.join(missing)}")
    cfg = copy.deepcopy(entry.defaults)
    cfg.update(copy.deepcopy(arch_config))
    cfg["name"] = entry.name
    if not isinstance(cfg.get("num_classes"), int) or cfg["num_classes"] < 1:
        raise DinomedError(f"model {entry.name!r}: num_classes must be a positive integer, found {cfg.get('num_classes')!r}")
    if not isinstance(cfg.get("in_chans"), int) or cfg["in_chans"] < 1:
        raise DinomedError(f"model {entry.name!r}: in_chans must be a positive integer, found {cfg.get('in_chans')!r}")
    return _jsonable(cfg)


def build_model(arch_config: dict, load_checkpoints: bool = True) -> nn.Module:
    """Build the seed model named ``arch_config["name"]`` from the ``architecture`` dict of a model.json.

    ``load_checkpoints`` initialises encoders from the ``*_checkpoint`` paths in the config (training);
    ``load_model_folder`` builds with it off, since the folder's weights replace them. The model gets the
    resolved config as ``model.arch_config`` and its registry entry as ``model.model_entry``.
    """
    cfg = resolve_config(arch_config)
    entry = _entry(cfg["name"])
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    if not load_checkpoints:
        kwargs.update({k: None for k in entry.checkpoint_keys if k in kwargs})
    model = entry.cls(**kwargs)
    model.arch_config = cfg
    model.model_entry = entry
    return model


# ---------------------------------------------------------------------------------------------------------
# model.json


def _default_labels(num_classes: int) -> list[dict]:
    return [{"value": v, "name": f"class_{v}", "color": [(70 * v) % 256, (150 * v) % 256, (230 * v) % 256]}
            for v in range(1, num_classes)]


def model_json_template(
    model_or_config: nn.Module | dict,
    *,
    name: str = "model",
    labels: list[dict] | None = None,
    inputs: list[str] | list[dict] | None = None,
    preprocessing: dict | None = None,
    inference: dict | None = None,
    provenance: dict | None = None,
) -> dict:
    """A valid ``model.json`` dict (docs/CONTRACTS.md) for a model or an architecture config.

    Inputs default to ``CT`` (1 channel) or ``CT, PET`` (2 channels), preprocessing to the standard CT window
    and PET log1p-SUV normalisation of ``dinomed.preprocess``, ``inference.mode`` to ``slicewise2d`` for 2D
    models and ``sliding3d`` for 3D ones; ``inference`` entries given here override the defaults.
    """
    from .. import __version__
    from ..preprocess import default_spec

    if isinstance(model_or_config, nn.Module):
        arch = getattr(model_or_config, "arch_config", None)
        if arch is None:
            raise DinomedError("model_json_template: the model was not built by dinomed.models.build_model (no arch_config)")
    else:
        arch = resolve_config(model_or_config)
    arch = copy.deepcopy(arch)
    entry = _entry(arch["name"])
    in_chans = arch["in_chans"]
    if inputs is None:
        inputs = ["CT", "PET"][:in_chans] if in_chans <= 2 else [f"channel_{i}" for i in range(in_chans)]
    inputs = [{"modality": i} if isinstance(i, str) else dict(i) for i in inputs]
    if len(inputs) != in_chans:
        raise DinomedError(f"model_json_template: {len(inputs)} input(s) given for a model with {in_chans} channel(s)")
    if preprocessing is None:
        preprocessing = {"target_spacing": None, "input_scale": 1.0,
                         "channels": [default_spec(i["modality"]) for i in inputs]}
    if inference is None:
        inference = {}
    if entry.inference_mode == "slicewise2d":
        infer = {"mode": "slicewise2d", "batch_size": 8}
    else:
        infer = {"mode": "sliding3d", "roi_size": [32, 128, 128], "overlap": 0.25, "batch_size": 1}
    infer["min_component_ml"] = {}
    infer.update(inference)
    if labels is None:
        labels = _default_labels(arch["num_classes"])
    for lab in labels:
        if not 1 <= int(lab.get("value", -1)) < arch["num_classes"]:
            raise DinomedError(
                f"model_json_template: label {lab.get('name')!r} has value {lab.get('value')!r}; expected 1..{arch['num_classes'] - 1} "
                f"(num_classes {arch['num_classes']} includes background 0)"
            )
    prov = {"dinomed_version": __version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    prov.update(provenance or {})
    return {
        "format": MODEL_FORMAT,
        "name": name,
        "architecture": arch,
        "inputs": inputs,
        "preprocessing": preprocessing,
        "inference": infer,
        "labels": copy.deepcopy(labels),
        "provenance": prov,
    }


# ---------------------------------------------------------------------------------------------------------
# the model folder


def save_model_folder(model: nn.Module, model_json: dict, folder: str | Path) -> Path:
    """Write ``folder/model.safetensors`` (the whole ``state_dict``) and ``folder/model.json``.

    Each file is written atomically (temporary file, then rename), the weights first and ``model.json`` last,
    so a folder with a ``model.json`` always has its weights. The architecture in ``model_json`` must be the
    model's own (its name is checked; when absent it is filled in from ``model.arch_config``).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    model_json = copy.deepcopy(model_json)
    own = getattr(model, "arch_config", None)
    arch = model_json.get("architecture")
    if arch is None:
        if own is None:
            raise DinomedError(f"{folder}: model.json has no 'architecture' and the model has no arch_config")
        model_json["architecture"] = arch = copy.deepcopy(own)
    if own is not None and arch.get("name") != own["name"]:
        raise DinomedError(
            f"{folder}: model.json names architecture {arch.get('name')!r} but the model is {own['name']!r}"
        )
    resolve_config(arch)  # a model.json that could not be built again is refused before anything is written
    model_json.setdefault("format", MODEL_FORMAT)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DinomedError(f"cannot create the model folder {folder}: {exc.strerror}") from None
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": MODEL_FORMAT, "architecture": arch["name"]})
    atomic_write_text(folder / JSON_FILE, json.dumps(model_json, indent=2) + "\n")
    return folder


def read_model_json(folder: str | Path) -> dict:
    """The parsed, checked ``model.json`` of a model folder."""
    folder = Path(folder)
    path = folder / JSON_FILE
    if not folder.is_dir():
        raise DinomedError(f"{folder}: no such model folder (expected a folder with {JSON_FILE} and {WEIGHTS_FILE})")
    if not path.is_file():
        raise DinomedError(f"{folder}: not a model folder: {JSON_FILE} is missing")
    model_json = read_json_object(path)
    fmt = model_json.get("format", MODEL_FORMAT)
    if fmt != MODEL_FORMAT:
        raise DinomedError(f"{path}: format {fmt!r} is not supported; expected {MODEL_FORMAT!r}")
    if not isinstance(model_json.get("architecture"), dict):
        raise DinomedError(f"{path}: no 'architecture' object (expected e.g. {{\"name\": \"meddinov3\", …}})")
    return upgrade_model_json(model_json)


def upgrade_model_json(model_json: dict) -> dict:
    """A model.json written before a model's default changed names the variant it was trained as explicitly
    (each model's ``upgrade``: e.g. a MedDINOv3 from before ``decoder`` existed is ``decoder: progressive``)."""
    arch = model_json.get("architecture")
    if isinstance(arch, dict) and arch.get("name") in available_models():
        entry = MODEL_REGISTRY[arch["name"]]
        if entry.upgrade is not None:
            model_json = dict(model_json, architecture=entry.upgrade(copy.deepcopy(arch)))
    return model_json


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Build the model a folder describes and load its weights; returns ``(model in eval mode, model_json)``.

    Encoder checkpoint paths in the architecture are not needed (the weights are in ``model.safetensors``).
    Errors name the folder and, for weights that do not fit, the tensor with the expected and found shapes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    model_json = read_model_json(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: {WEIGHTS_FILE} is missing (the model folder holds only {JSON_FILE})")
    try:
        model = build_model(model_json["architecture"], load_checkpoints=False)
    except DinomedError as exc:
        raise DinomedError(f"{folder / JSON_FILE}: {exc}") from None
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing: {', '.join(missing[:8])}" + (" …" if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:8])}" + (" …" if len(unexpected) > 8 else ""))
        raise CheckpointError(
            f"{weights}: the weights do not match architecture {model_json['architecture']['name']!r}: " + "; ".join(parts)
        )
    for key, tensor in expected.items():
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise CheckpointError(
                f"{weights}: tensor {key} has shape {tuple(state[key].shape)}, the architecture in {JSON_FILE} "
                f"expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), model_json
