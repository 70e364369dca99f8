"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A crash or a cancel leaves either the old file or none, never a half-written one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import DinomedError

# Temporary files of the atomic writes now in progress: a signal handler (see :func:`remove_live_temps`)
# removes them when the process is stopped between creating a temporary file and renaming it.
_LIVE_TEMPS: set[Path] = set()


def remove_live_temps() -> list[Path]:
    """Remove every temporary file of an atomic write still in progress; returns the paths removed.

    ``dinomed``'s SIGTERM handler and its exit path call this, so that a stop (a GUI Cancel sends SIGTERM
    first) leaves no hidden ``.NAME.XXXX.tmp…`` file behind."""
    removed = []
    for tmp in list(_LIVE_TEMPS):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
        _LIVE_TEMPS.discard(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to ``target``.

    The temporary name keeps the target's suffixes (``.nii.gz``) so that writers that pick the format
    from the extension (SimpleITK) still work. On an exception the temporary file is removed.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DinomedError(f"cannot create the output folder {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise DinomedError(f"cannot write {target}: the folder {folder} is not writable")
    suffix = suffix if suffix is not None else "".join(target.suffixes)
    _remove_orphans(folder, target.name, suffix)
    # the writer's pid is in the name, so that a later write can tell an orphan (its writer was SIGKILLed) from a
    # temporary file another process is writing now
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    tmp_path = Path(tmp)
    _LIVE_TEMPS.add(tmp_path)
    try:
        yield tmp_path
        if tmp_path.is_file():
            # mkstemp creates 0600; give the file the permissions a plain open() would have
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    finally:
        _LIVE_TEMPS.discard(tmp_path)


def _remove_orphans(folder: Path, name: str, suffix: str) -> None:
    """Remove the temporary files of earlier writes of ``name`` whose writing process no longer exists (a
    SIGKILL, e.g. after a GUI Cancel's grace period, leaves no chance to clean up)."""
    for stale in folder.glob(f".{glob_escape(name)}.*.tmp{glob_escape(suffix)}"):
        parts = stale.name[len(name) + 2:].split(".")
        if not parts or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                stale.unlink()
        except (PermissionError, OSError):
            continue


def glob_escape(text: str) -> str:
    import glob

    return glob.escape(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
