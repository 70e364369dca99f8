"""Model folders as DINOSeg lists them: a directory with ``model.json`` + ``model.safetensors``
(docs/CONTRACTS.md, "A model folder"). Read here without torch: only the JSON matters to the GUI."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

MODEL_FORMAT = "dinomed-model/1"
MODULE_ROOT = Path(__file__).resolve().parents[1]  # the DINOSeg module folder
REPO_ROOT = MODULE_ROOT.parent  # the extension's source tree


def extension_resource(name: str) -> Path:
    """A folder of the extension's top-level ``Resources/`` (``Models``, ``SampleData``): in the source tree
    ``<repo>/Resources/<name>``; in an installed extension the top-level CMakeLists.txt copies it into the
    module's ``Resources/``."""
    for candidate in (REPO_ROOT / "Resources" / name, MODULE_ROOT / "Resources" / name):
        if candidate.is_dir():
            return candidate
    return REPO_ROOT / "Resources" / name


BUNDLED_MODELS_DIR = extension_resource("Models")
SAMPLE_DATA_DIR = extension_resource("SampleData")


class ModelFolderError(ValueError):
    """A folder that is not a usable model folder; the message names the file and what is wrong."""


@dataclass
class LabelInfo:
    """One label of a model: voxel value, name, 0-255 colour, SNOMED-CT terminology, lesion flag."""

    value: int
    name: str
    color: tuple[int, int, int] = (128, 174, 128)
    category: tuple[str, str, str] | None = None
    type: tuple[str, str, str] | None = None
    lesion: bool = False


@dataclass
class ModelInfo:
    """What DINOSeg needs to know about a model folder: its name, inputs and labels."""

    path: Path
    name: str
    inputs: list[str]
    labels: list[LabelInfo] = field(default_factory=list)
    architecture: str = ""

    @property
    def needs_pet(self) -> bool:
        return "PET" in self.inputs

    @property
    def lesion_labels(self) -> list[LabelInfo]:
        return [label for label in self.labels if label.lesion]

    def label(self, value: int) -> LabelInfo:
        for label in self.labels:
            if label.value == value:
                return label
        raise KeyError(value)


def _triplet(value, where: str) -> tuple[str, str, str] | None:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 3):
        raise ModelFolderError(f"{where}: expected a [scheme, code, meaning] triplet, found {value!r}")
    return tuple(str(v) for v in value)


def read_model_info(folder: str | os.PathLike) -> ModelInfo:
    """Parse ``folder/model.json``; a clear :class:`ModelFolderError` when it is missing or malformed."""
    folder = Path(folder)
    path = folder / "model.json"
    if not path.is_file():
        raise ModelFolderError(f"{folder} is not a model folder: {path.name} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
        raise ModelFolderError(f"{path}: expected a JSON object with a 'labels' list")
    labels = []
    for i, entry in enumerate(meta["labels"]):
        where = f"{path} labels[{i}]"
        if not isinstance(entry, dict) or "value" not in entry or "name" not in entry:
            raise ModelFolderError(f"{where}: expected an object with 'value' and 'name', found {entry!r}")
        term = entry.get("terminology") or {}
        color = entry.get("color", (128, 174, 128))
        if len(color) != 3:
            raise ModelFolderError(f"{where}: colour must be three 0-255 values, found {color!r}")
        labels.append(LabelInfo(value=int(entry["value"]), name=str(entry["name"]),
                                color=tuple(int(c) for c in color),
                                category=_triplet(term.get("category"), where + " terminology.category"),
                                type=_triplet(term.get("type"), where + " terminology.type"),
                                lesion=bool(entry.get("lesion", False))))
    inputs = [str(i.get("modality", "")).upper() for i in meta.get("inputs", []) if isinstance(i, dict)]
    return ModelInfo(path=folder, name=str(meta.get("name") or folder.name), inputs=inputs or ["CT"],
                     labels=labels, architecture=str((meta.get("architecture") or {}).get("name", "")))


def list_model_folders(*models_dirs: str | os.PathLike) -> list[Path]:
    """Model folders (directories holding ``model.json``) directly in, or one level below, each models
    directory; a models directory that is itself a model folder counts too. Sorted by name, no duplicates."""
    found: dict[Path, None] = {}
    for models_dir in models_dirs:
        if not models_dir:
            continue
        root = Path(models_dir)
        if not root.is_dir():
            continue
        if (root / "model.json").is_file():
            found[root.resolve()] = None
            continue
        for child in sorted(root.iterdir()):
            if child.is_dir() and (child / "model.json").is_file():
                found[child.resolve()] = None
    return sorted(found, key=lambda p: p.name.lower())


def add_model_folder(source: str | os.PathLike, models_dir: str | os.PathLike, link: bool = False) -> Path:
    """Make a model folder available in ``models_dir`` (copy, or symlink with ``link``); returns its new path.

    Used by "Add model folder…" and by DINOPretrain's "register this model in DINOSeg". The source is
    validated first and never modified; an existing model of the same name is not overwritten."""
    source = Path(source).resolve()
    info = read_model_info(source)
    if not (source / "model.safetensors").is_file():
        raise ModelFolderError(f"{source} is not a model folder: model.safetensors is missing")
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / source.name
    if target.resolve() == source:
        return target
    if target.exists():
        raise ModelFolderError(f"a model named {target.name!r} already exists in {models_dir} ({info.name})")
    if link:
        target.symlink_to(source, target_is_directory=True)
    else:
        tmp = models_dir / f".{source.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        os.replace(tmp, target)
    return target


# -- the user's models folder ---------------------------------------------------------------------------
# Bundled models live in the extension (read-only, replaced on update); the user's own models in a per-user
# folder beside Slicer's settings file, which survives extension updates and Slicer upgrades.
USER_MODELS_SUBDIR = ("DINOSeg", "Models")


def slicer_settings_dir() -> Path:
    """The folder of Slicer's user settings file (``slicer.app.slicerUserSettingsFilePath``: e.g.
    ``~/.config/slicer.org`` on Linux, ``%APPDATA%\\slicer.org`` on Windows); only inside Slicer."""
    try:
        import slicer

        return Path(slicer.app.slicerUserSettingsFilePath).parent
    except (ImportError, AttributeError):
        raise ModelFolderError("no Slicer application here: give the settings folder (settings_dir=…)") from None


def user_models_dir(settings_dir: str | os.PathLike | None = None) -> Path:
    """The user's DINOSeg models folder: ``<settings_dir>/DINOSeg/Models`` (``settings_dir`` defaults to
    Slicer's settings folder, :func:`slicer_settings_dir`). Not created here."""
    root = Path(settings_dir) if settings_dir is not None else slicer_settings_dir()
    return root.joinpath(*USER_MODELS_SUBDIR)


def resolve_models_dir(saved: str | os.PathLike | None, settings_dir: str | os.PathLike | None = None) -> Path:
    """The models folder to show: the one the user chose last (``saved``, from the settings), else the
    per-user folder. An empty value, ``"."`` or the extension's own bundled folder (the old default, which an
    extension update wipes) fall back to the per-user folder."""
    text = str(saved).strip() if saved is not None else ""
    if text and text != "." and Path(text).resolve() != BUNDLED_MODELS_DIR.resolve():
        return Path(text)
    return user_models_dir(settings_dir)


_models_listeners: list = []


def add_models_listener(callback) -> "callable":
    """Call ``callback(path)`` whenever a model is registered (:func:`register_model`) or a models folder
    changed (:func:`notify_models_changed`); returns a function that removes the listener. Every open model
    list (DINOSeg's widget, the web app) listens, so a model registered by DINOPretrain appears at once."""
    _models_listeners.append(callback)

    def remove():
        if callback in _models_listeners:
            _models_listeners.remove(callback)

    return remove


def notify_models_changed(path: str | os.PathLike | None = None) -> None:
    """Tell every model list to refresh (a listener's error is logged, never raised to the caller)."""
    import logging

    for callback in list(_models_listeners):
        try:
            callback(Path(path) if path is not None else None)
        except Exception as exc:  # one broken list must not stop a registration
            logging.warning("a model list could not refresh: %s", exc)


def register_model(model_dir: str | os.PathLike, models_dir: str | os.PathLike | None = None, link: bool = False,
                   settings_dir: str | os.PathLike | None = None) -> Path:
    """"Register this model in DINOSeg" (DINOPretrain calls this after a finetuning run): copy (or link) the
    model folder into ``models_dir`` (default: the user's models folder, :func:`user_models_dir`) and
    refresh every model list. Returns the registered folder."""
    target_dir = Path(models_dir) if models_dir is not None else user_models_dir(settings_dir)
    target = add_model_folder(model_dir, target_dir, link=link)
    notify_models_changed(target)
    return target
