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
