"""One configuration system for pretraining and finetuning: defaults ← recipe/stage YAML ← ``key=value``.

The layering of Meta's dinov3 (``dinov3/configs/config.py``: OmegaConf in struct mode): a key that the defaults do
not hold is refused, with the nearest known key as a suggestion (``optim.epoch`` → ``optim.epochs``), so that a
typo never trains silently with a default. Values are typed: YAML files and ``key=value`` overrides read
``1e-1`` as a number (as YAML 1.2 and OmegaConf do; PyYAML's YAML 1.1 reads it as a string), and a value whose type
differs from the default's (a word for a number, a number for a yes/no) is refused. Every override syntax YAML
allows works: ``optim.epochs=10``, ``crops.global_crops_scale=[0.4,1]``,
``"schedules.teacher_temp={start: 0.02, peak: 0.02, end: 0.02, warmup_epochs: 0}"`` (a mapping merges into the
section). OmegaConf resolves ``${…}`` interpolations in the result; the struct checks and the merge itself are
done here on plain dicts, because OmegaConf's merge costs ~40-80 ms a layer (measured), which ``dinomed recipes``
and every test that loads a config would pay. The result is a plain ``dict``; a run writes it as its resolved
``config.yaml``.

The pretraining stage configs name no modality where CT and PET share a recipe: ``vits_stage1.yaml`` is loaded as
``ct_vits_stage1`` or ``pet_vits_stage1``, the prefix setting ``modality`` (a ``${modality}`` in its text, such
as the description, is filled in). This module imports no torch, so that listing recipes is fast.
"""
from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import DinomedError, yaml_problem

CONFIGS = Path(__file__).resolve().parent / "configs"
MODALITY_PREFIXES = {"ct": "CT", "pet": "PET"}
_MODALITY_NAME = re.compile(r"^(ct|pet)_(.+)$")


@dataclass(frozen=True)
class Layer:
    """One source of config values, in merge order; ``source`` names it in error messages."""

    source: str
    values: dict


class _YAMLLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader (the C one where built) that also reads exponent numbers without a dot as numbers."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def yaml_value(text: str):
    """A YAML scalar or collection as the config files read it (``3e-4`` a number)."""
    return yaml.load(text, Loader=_YAMLLoader)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping of config keys; ``{}`` for an empty file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DinomedError(f"{path}: cannot read the config ({exc.strerror})") from None
    try:
        data = yaml_value(text)
    except yaml.YAMLError as exc:
        raise DinomedError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DinomedError(f"{path}: expected a mapping of config keys, found {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> list[Layer]:
    """``["optim.lr=3e-4", "data.patch_size=[32,32]"]`` → one layer per override; values are YAML."""
    layers = []
    for item in items:
        if "=" not in item:
            raise DinomedError(f"override {item!r}: expected key=value (e.g. optim.epochs=10)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not key.strip() or any(not part for part in parts):
            raise DinomedError(f"override {item!r}: empty key")
        try:
            value = yaml_value(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise DinomedError(f"override {item!r}: the value is not valid YAML ({yaml_problem(exc)})") from None
        values: dict = {}
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
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
    """``defaults`` ← each layer in turn, every key checked against what the layers below hold (struct mode); then
    ``${…}`` interpolations resolved (OmegaConf). The resolved plain ``dict``.

    ``free_form``: dotted sections whose keys belong to someone else (checked there); ``schedule_keys``: the keys
    a schedule mapping (a mapping with ``start``) may hold, some of them optional.
    """
    cfg = copy.deepcopy(defaults)
    for layer in layers:
        _check_keys(cfg, layer.values, "", layer.source, free_form, schedule_keys)
        _check_types(defaults, layer.values, "", layer.source)
        deep_merge(cfg, copy.deepcopy(layer.values))
    _resolve_interpolations(cfg, cfg)
    return cfg


def deep_merge(base: dict, update: dict) -> None:
    """Mappings merge key by key; anything else (a value, a list, a mapping over a value) replaces."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value


_REFERENCE = re.compile(r"\$\{([^}]*)\}")


def _resolve_interpolations(node, root: dict) -> None:
    """Fill in every ``${…}`` string (OmegaConf's grammar: ``${modality}``, ``${crops.global_crops_size}``,
    resolvers), each against the top-level sections it names (creating OmegaConf nodes for the whole config would
    cost ~40 ms a load)."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in list(items):
        if isinstance(value, (dict, list)):
            _resolve_interpolations(value, root)
        elif isinstance(value, str) and "${" in value:
            names = {ref.strip().split(".")[0].split("[")[0] for ref in _REFERENCE.findall(value)}
            scope = {name: root[name] for name in names if name in root}
            try:
                node[key] = OmegaConf.to_container(OmegaConf.create({**scope, "_value": value}), resolve=True)["_value"]
            except OmegaConfBaseException as exc:
                raise DinomedError(f"config: {value!r}: {str(exc).splitlines()[0]}") from None


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
        if "modality" in read_yaml(path):
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
