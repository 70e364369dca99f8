"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits with status 2."""
from __future__ import annotations

import json
from pathlib import Path


class DinomedError(Exception):
    """Bad input or a failed precondition, with a message that names the file or object, what was
    expected and what was found."""


class CheckpointError(DinomedError):
    """A checkpoint that cannot be loaded safely or does not fit the architecture."""


class InputImageError(DinomedError):
    """An image that is not what the operation needs (dimensionality, NaNs, geometry, channels)."""


# Exit statuses of ``dinomed`` commands (documented in ``dinomed --help`` and the README):
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # a DinomedError: one line ``dinomed <cmd>: error: …`` on stderr (and an ``error`` event)
# ``dinomed finetune|pretrain`` stopped before their end with a checkpoint saved: asked to stop (SIGTERM or SIGINT:
# saved at the next step, on every rank at the same step) or train.stop_after reached; ``--resume`` continues
EXIT_STOPPED = 3
def yaml_problem(exc: Exception) -> str:
    """A YAML parser error in one line: ``line L, column C: problem`` (PyYAML's own message spans 5-7 lines)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def read_json_object(path: str | Path, error: type[DinomedError] = DinomedError, missing: str = "no such file") -> dict:
    """The JSON object in ``path`` (model.json, dataset.json, a feature cache entry), or ``error`` naming the file:
    ``missing`` when it does not exist, otherwise what was wrong with it (not JSON, not an object).
    DINOSegLib.features.read_feature_cache repeats this for the feature cache on purpose (it does not import
    dinomed)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
