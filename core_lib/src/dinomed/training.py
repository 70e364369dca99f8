"""The plumbing both training loops share (finetuning and DINOv3 pretraining): schedules, RNG state, DDP set-up,
the run-folder and finite-loss checks, and checkpoint I/O.

The loops themselves stay hand-written, as Meta's dinov3 ``train.py`` is: what differs between them (the losses,
the teacher, what a checkpoint holds) is theirs; what must behave the same (resume exactly, write atomically,
refuse a half-written or foreign file, agree across ranks) is here, once.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path
from .errors import CheckpointError, DinomedError
from .runtime import DistInfo

# --- schedules ---------------------------------------------------------------------------------------------


def warmup_cosine(start: float, peak: float, end: float, warmup_iterations: int, total_iterations: int,
                  cosine_iterations: int | None = None) -> np.ndarray:
    """One value per iteration: linear warm-up ``start`` → ``peak`` (not reaching it), a half cosine ``peak`` →
    ``end`` over ``cosine_iterations`` (default: the rest), then ``end`` (DINOv3 ``linear_warmup_cosine_decay``)."""
    warmup_iterations = min(int(warmup_iterations), int(total_iterations))
    linear = np.linspace(start, peak, warmup_iterations, endpoint=False)
    if cosine_iterations is None:
        cosine_iterations = total_iterations - warmup_iterations
    cosine_iterations = min(int(cosine_iterations), total_iterations - warmup_iterations)
    phase = np.linspace(0.0, math.pi, cosine_iterations)
    cosine = end + (peak - end) * (np.cos(phase) + 1.0) / 2.0
    constant = np.full(total_iterations - warmup_iterations - cosine_iterations, float(end))
    return np.concatenate([linear, cosine, constant]).astype(np.float64)


def lr_factor(schedule: str, warmup_steps: int, max_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The finetuning learning-rate factor of step ``step`` (a ``LambdaLR`` lambda), after a linear warm-up that
    reaches 1 on its last step (``(step + 1) / warmup_steps``, as the finetuning trainers of the seed papers):

    - ``cosine``: a half cosine from 1 to ``min_ratio`` at ``max_steps`` (:func:`warmup_cosine`'s curve);
    - ``linear``: ``1 - progress``, the poly-1.0 decay of the MedDINOv3 trainer;
    - ``plateau``: 1 (ReduceLROnPlateau takes over after the warm-up, the DINO-Med3D trainer).
    """
    decay_steps = max(1, max_steps - warmup_steps)
    cosine = warmup_cosine(1.0, 1.0, float(min_ratio), 0, decay_steps + 1)  # index decay_steps: the floor

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "plateau":
            return 1.0
        done = min(step - warmup_steps, decay_steps)
        if schedule == "cosine":
            return float(cosine[done])
        return max(0.0, 1.0 - done / decay_steps)

    return factor


# --- RNG state: every stream a run draws from, in a form torch.load(weights_only=True) reads ----------------


def rng_state() -> dict:
    """This process's Python, numpy, torch (and CUDA) RNG states, as tensors."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    _, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
        "numpy_meta": torch.tensor([float(pos), float(has_gauss), float(cached)], dtype=torch.float64),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.device_count():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s result (or the list form that pretraining checkpoints held before it)."""
    torch.set_rng_state(state["torch"])
    if "numpy_keys" in state:
        pos, has_gauss, cached = state["numpy_meta"].tolist()
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
        gauss = float(state["python_gauss"][0])
        random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None if math.isnan(gauss) else gauss))
    else:  # a pretraining checkpoint written before this module: {"python": [...], "numpy": [...]}
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda is not None and len(cuda) and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(cuda))


def gather_rng_states(dist_info: DistInfo) -> dict | list[dict]:
    """This process's RNG state, or under DDP every rank's, rank-indexed (a collective: every rank calls it)."""
    state = rng_state()
    if dist_info.world_size <= 1:
        return state
    import torch.distributed as dist

    gathered: list = [None] * dist_info.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def restore_rng_states(saved: dict | list[dict], dist_info: DistInfo) -> None:
    """Restore this rank's stream from :func:`gather_rng_states`'s result."""
    set_rng_state(saved[dist_info.rank] if isinstance(saved, list) else saved)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- distributed data parallel ------------------------------------------------------------------------------


def wrap_ddp(module: nn.Module, device: torch.device, dist_info: DistInfo, **kwargs) -> nn.Module:
    """``module`` itself in one process; under ``torchrun`` a DistributedDataParallel of it on this rank's device."""
    if dist_info.world_size <= 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                               **kwargs)


def barrier(dist_info: DistInfo) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# --- the checks every run makes -------------------------------------------------------------------------------


def check_run_folder(state_file: Path, resume: bool, kind: str = "run", folder: Path | None = None) -> None:
    """``--resume`` needs the interrupted run's state file; a fresh run refuses a folder that already holds one."""
    folder = folder or state_file.parent
    if resume and not state_file.is_file():
        raise DinomedError(f"--resume: {state_file} does not exist (no interrupted {kind} in {folder}); "
                           "start it without --resume")
    if not resume and state_file.exists():
        raise DinomedError(f"{folder} already holds a {kind} ({state_file}); pass --resume to continue it "
                           "or choose another --out")


def check_finite_loss(loss: float, where: str, remedy: str) -> None:
    """Stop at the first non-finite loss (every rank sees the same reduced value, so every rank stops)."""
    if not math.isfinite(loss):
        raise DinomedError(f"the training loss became {loss} at {where}; {remedy}")


# --- checkpoint I/O ---------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict) -> Path:
    """Written atomically: a stop or a crash mid-write leaves the previous checkpoint whole."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: Path, what: str, fmt: str | None = None) -> dict:
    """A checkpoint read with ``weights_only=True`` (never unpickles objects); ``fmt``: the ``format`` it must name."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, or one holding objects weights_only refuses
        raise CheckpointError(f"{path}: cannot load the {what} safely ({type(exc).__name__}: {exc})") from None
    if fmt is not None and (not isinstance(state, dict) or state.get("format") != fmt):
        raise CheckpointError(f"{path}: not a dinomed {what} (expected format {fmt})")
    return state
