"""Where a command runs: the torch device, and the process group under ``torchrun``.

One place for what segmentation, finetuning, evaluation and pretraining all need, so that ``--device auto``
and ``train.device: auto`` mean the same everywhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import DinomedError


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → this rank's CUDA GPU when present, else Apple MPS, else CPU; otherwise the named device,
    refused with a clear error when this machine does not have it."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DinomedError(
            f"device {name!r} was asked for but this machine has no CUDA GPU (torch {torch.__version__}); use auto or cpu"
        )
    if name == "mps" and not _mps_available():
        raise DinomedError("device 'mps' was asked for but Apple MPS is not available here; use auto or cpu")
    if not (name == "cpu" or name == "mps" or name.startswith("cuda")):
        raise DinomedError(f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


@dataclass
class DistInfo:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_request: str | None = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1): nccl when this
    rank has a GPU, gloo otherwise. Returns this rank's place and its device."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_request, 0)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_request, local_rank)
    here = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        here = True
    return DistInfo(rank, world, local_rank, here), device
