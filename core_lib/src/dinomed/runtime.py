"""Where a command runs: the torch device, its reduced precision, and the process group under ``torchrun``.

One place for what segmentation, features, classification, finetuning, evaluation and pretraining all need, so
that ``--device auto`` and ``train.device: auto`` mean the same everywhere, and bf16 is used only where the
device has it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
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


def autocast_dtype(device: torch.device, amp: str | bool | None = "auto") -> torch.dtype | None:
    """The reduced precision to run in on ``device`` for the ``amp`` setting (auto, bf16, fp16, off): on a CUDA GPU
    bf16 (auto, bf16) when the GPU supports it, else fp16; fp16 when asked. None (fp32) for ``off``, on the CPU
    (autocast there is slower than fp32 on most machines) and on Apple MPS."""
    if amp in ("off", False, None) or device.type != "cuda":
        return None
    if amp == "fp16" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


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


class StopRequest:
    """SIGTERM and SIGINT ask a training loop to stop at its next step, with a checkpoint saved.

    What a GUI's Stop, torchrun's agent (which forwards the signal it gets to every rank) and cluster schedulers
    (SLURM sends SIGTERM before the time limit) send. The loop reads :attr:`requested` after each step; under
    DDP the ranks agree on it with :func:`agree` so that they all stop at the same step. A second signal more
    than ``repeat_window_s`` after the first interrupts at once (KeyboardInterrupt): a terminal's Ctrl-C reaches
    a rank both directly and through torchrun's agent, and those two count as one request.
    """

    def __init__(self, repeat_window_s: float = 2.0):
        self.requested = False
        self.signal_name: str | None = None
        self.repeat_window_s = repeat_window_s
        self._first_at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested:
            if now - self._first_at > self.repeat_window_s:
                raise KeyboardInterrupt
            return
        self.requested = True
        self._first_at = now
        self.signal_name = signal.Signals(signum).name
        print(f"dinomed: {self.signal_name} received: stopping at the next step (checkpoint saved); "
              "send it again to interrupt at once", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agree(self, dist_info: "DistInfo", device: torch.device | None = None) -> bool:
        """True on every rank when any rank was asked to stop (one all-reduce under DDP)."""
        if dist_info.world_size <= 1:
            return self.requested
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device if device is not None else "cpu")
        dist.all_reduce(flag)
        return bool(flag.item() > 0)


def torchrun_argv(nproc_per_node: int, dinomed_args: list[str], python: str | None = None) -> list[str]:
    """The command line that runs ``dinomed <args>`` on ``nproc_per_node`` processes of this machine through
    torchrun (``python -m torch.distributed.run --standalone``), as :func:`init_distributed` expects."""
    if int(nproc_per_node) < 1:
        raise DinomedError(f"--nproc-per-node {nproc_per_node}: expected a positive number of processes")
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={int(nproc_per_node)}", "-m", "dinomed", *dinomed_args]


def relaunch_under_torchrun(nproc_per_node: int | None, argv: list[str]) -> None:
    """``dinomed finetune|pretrain --nproc-per-node N``: replace this process by torchrun running the same command
    (without the option) on N processes. Does nothing when N is 1 or None, or when already under torchrun.

    ``exec`` keeps the process id, so whoever started ``dinomed`` signals torchrun's agent, which forwards SIGTERM
    to every rank (each saves at the same step and exits). torchrun's own exit status is 1 when its ranks exit
    with :data:`~dinomed.errors.EXIT_STOPPED`; rank 0's final ``done`` event (``stopped: true``) says what happened.
    """
    if not nproc_per_node or int(nproc_per_node) <= 1 or "WORLD_SIZE" in os.environ:
        return
    args = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc-per-node":
            skip = True
            continue
        if arg.startswith("--nproc-per-node="):
            continue
        args.append(arg)
    command = torchrun_argv(int(nproc_per_node), args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
