"""One configuration system for pretraining and finetuning: defaults ← recipe/stage YAML ← ``key=value``.

As Meta's dinov3 (``dinov3/configs/config.py``), the layers are merged by OmegaConf in struct mode: a key that the
defaults do not hold is refused, with the nearest known key as a suggestion (``optim.epoch`` → ``optim.epochs``),
so that a typo never trains silently with a default. Values are typed: YAML files and ``key=value`` overrides are
read by OmegaConf's YAML loader, which reads ``1e-1`` as a number (PyYAML's YAML 1.1 reads it as a string), and a
value whose type differs from the default's (a word for a number, a number for a yes/no) is refused. Every
override syntax YAML allows works: ``optim.epochs=10``, ``crops.global_crops_scale=[0.4,1]``,
``"schedules.teacher_temp={start: 0.02, peak: 0.02, end: 0.02, warmup_epochs: 0}"`` (a mapping merges into the
section). The result is a plain ``dict``; a run writes it as its resolved ``config.yaml``.

The pretraining stage configs name no modality where CT and PET share a recipe: ``vits_stage1.yaml`` is loaded as
``ct_vits_stage1`` or ``pet_vits_stage1``, the prefix setting ``modality`` (a ``${modality}`` in its text, such
as the description, is filled in). This module imports no torch, so that listing recipes is fast.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import DinomedError

CONFIGS = Path(__file__).resolve().parent / "configs"
MODALITY_PREFIXES = {"ct": "CT", "pet": "PET"}
_MODALITY_NAME = re.compile(r"^(ct|pet)_(.+)$")


@dataclass(frozen=True)
class Layer:
    """One source of config values, in merge order; ``source`` names it in error messages."""

    source: str
    values: dict


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping, read with OmegaConf's loader (``3e-4`` is a number); ``{}`` for an empty file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DinomedError(f"{path}: cannot read the config ({exc.strerror})") from None
    try:
        node = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise DinomedError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(node, DictConfig):
        raise DinomedError(f"{path}: expected a mapping of config keys, found a list")
    return OmegaConf.to_container(node, resolve=False)


def parse_overrides(items: Iterable[str]) -> list[Layer]:
    """``["optim.lr=3e-4", "data.patch_size=[32,32]"]`` → one layer per override; values are YAML."""
    layers = []
    for item in items:
        if "=" not in item:
            raise DinomedError(f"override {item!r}: expected key=value (e.g. optim.epochs=10)")
        key = item.split("=", 1)[0].strip()
        if not key or any(not part for part in key.split(".")):
            raise DinomedError(f"override {item!r}: empty key")
        try:
            values = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        except (yaml.YAMLError, OmegaConfBaseException) as exc:
            raise DinomedError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        layers.append(Layer(f"override {item!r}", values))
    return layers


def _suggestion(key: str, known: Iterable[str], where: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {where}{close[0]}?" if close else ""


def _check_keys(base: Any, update: dict, where: str, source: str, free_form, schedule_keys) -> None:
    """Refuse keys the defaults do not know, naming the nearest known key (difflib)."""
    for key, value in update.items():
        path = f"{where}{key}"
        if path in free_form:
            continue
        if key not in base:
            known = sorted(base)
            raise DinomedError(f"{source}: unknown config key {path!r}{_suggestion(str(key), known, where)} "
                               f"(known keys here: {', '.join(known) or 'none'})")
        if isinstance(base[key], dict) and base[key] and "start" not in base[key] and not isinstance(value, dict):
            raise DinomedError(f"{source}: config {path} is a section of keys ({', '.join(sorted(base[key]))}), "
                               f"not a value; set one of its keys, e.g. {path}.{next(iter(base[key]))}=…")
        if isinstance(value, dict) and schedule_keys and isinstance(base[key], dict) and "start" in base[key]:
            extra = sorted(set(value) - set(schedule_keys))
            if extra:
                raise DinomedError(f"{source}: unknown schedule key {path}.{extra[0]!r}"
                                   f"{_suggestion(extra[0], schedule_keys)} (expected {', '.join(sorted(schedule_keys))})")
        elif isinstance(value, dict) and isinstance(base[key], dict):
            _check_keys(base[key], value, f"{path}.", source, free_form, schedule_keys)


def _check_types(defaults: Any, value: Any, path: str, source: str) -> None:
    """A scalar whose default is a number must stay a number, a yes/no a yes/no (lists and null are the
    validators' business: several keys take a number or a list, and null means "not set")."""
    if isinstance(defaults, dict) and isinstance(value, dict):
        for key, sub in value.items():
            if key in defaults:
                _check_types(defaults[key], sub, f"{path}{key}.", source)
        return
    if value is None or defaults is None or isinstance(value, (list, dict)) or isinstance(defaults, (list, dict)):
        return
    name = path.rstrip(".")
    if isinstance(defaults, bool) and not isinstance(value, bool):
        raise DinomedError(f"{source}: config {name}: expected true or false, found {value!r}")
    if isinstance(defaults, (int, float)) and not isinstance(defaults, bool) and (
            isinstance(value, bool) or not isinstance(value, (int, float))):
        raise DinomedError(f"{source}: config {name}: expected a number, found {value!r}")


def merge_layers(defaults: dict, layers: Iterable[Layer], free_form: tuple = (), schedule_keys: tuple = ()) -> dict:
    """``defaults`` ← each layer in turn, in OmegaConf struct mode; the resolved plain ``dict``.

    ``free_form``: dotted sections whose keys belong to someone else (checked there); ``schedule_keys``: the keys
    a schedule mapping (a mapping with ``start``) may hold, some of them optional.
    """
    cfg = OmegaConf.create(defaults)
    for layer in layers:
        current = OmegaConf.to_container(cfg, resolve=False)
        _check_keys(current, layer.values, "", layer.source, free_form, schedule_keys)
        _check_types(defaults, layer.values, "", layer.source)
        _open(cfg, free_form, schedule_keys)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(layer.values))
        except OmegaConfBaseException as exc:  # e.g. a section set to a plain value
            raise DinomedError(f"{layer.source}: {_plain(exc)}") from None
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise DinomedError(f"config: {_plain(exc)}") from None


def _open(cfg: DictConfig, free_form: tuple, schedule_keys: tuple) -> None:
    """Struct mode everywhere except free-form sections and schedules (their optional keys were checked above)."""
    OmegaConf.set_struct(cfg, True)
    for path in free_form:
        node = OmegaConf.select(cfg, path)
        if isinstance(node, DictConfig):
            OmegaConf.set_struct(node, False)
    if schedule_keys:
        def walk(node):
            for key in node:
                child = node._get_node(key)
                if isinstance(child, DictConfig):
                    if "start" in child:
                        OmegaConf.set_struct(child, False)
                    else:
                        walk(child)
        walk(cfg)


def _plain(exc: OmegaConfBaseException) -> str:
    return str(exc).splitlines()[0]


def dump_config(cfg: dict) -> str:
    """The resolved config as written beside a run's checkpoints."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


# --- bundled configs: names, including the CT/PET names of the shared pretraining stage files -------------


def stage_names(folder: Path | None = None) -> list[str]:
    """The bundled pretraining config names: a stage file without ``modality`` is listed once per modality."""
    folder = folder or CONFIGS / "pretrain"
    names = []
    for path in sorted(folder.glob("*.yaml")):
        if path.stem == "default":
            continue
        if "modality" in (yaml.safe_load(path.read_text()) or {}):
            names.append(path.stem)
        else:
            names += [f"{prefix}_{path.stem}" for prefix in MODALITY_PREFIXES]
    return sorted(names)


def stage_file(name: str | Path) -> tuple[Path, str | None]:
    """A YAML file, or a bundled stage config by name, with the modality its ``ct_``/``pet_`` prefix selects."""
    path = Path(name)
    if path.is_file():
        return path, None
    folder = CONFIGS / "pretrain"
    stem = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if not path.parent.parts:
        if stem != "default" and (folder / f"{stem}.yaml").is_file():
            return folder / f"{stem}.yaml", None
        match = _MODALITY_NAME.match(stem)
        if match and (folder / f"{match.group(2)}.yaml").is_file():
            shared = folder / f"{match.group(2)}.yaml"
            if "modality" not in read_yaml(shared):
                return shared, MODALITY_PREFIXES[match.group(1)]
    raise DinomedError(f"config {name}: no such file, and not a bundled config; bundled: {', '.join(stage_names())}")


def stage_layers(name: str | Path) -> list[Layer]:
    """The layers a stage name stands for: its YAML file, then the modality its name selects."""
    path, modality = stage_file(name)
    layers = [Layer(str(path), read_yaml(path))]
    if modality:
        layers.append(Layer(f"config name {name}", {"modality": modality}))
    return layers
