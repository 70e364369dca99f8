"""An opt-in compiled forward pass for whole-volume inference (``dinomed segment --compile``).

``torch.compile`` (TorchInductor) with constant folding of the frozen weights (``freezing``): on the CPU it fuses
the ViT's element-wise work (LayerScale, residual adds, RoPE, LayerNorm + GELU of the decoder) into generated C++
loops and prepacks the weights of the matrix products for oneDNN. One graph is compiled per batch shape
(``dynamic=False``); the last, smaller batch of a volume is padded to the full batch so that a volume needs one
graph. The compiled code is cached on disk (TorchInductor's cache, put under ``$XDG_CACHE_HOME/dinomed/inductor``
unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise), so a later run on the same machine and input shape skips most
of the compilation.

Never required: when compilation fails (no C++ compiler, an operator Inductor cannot lower, …) or the compiled
labels of the first batch disagree with the eager model's, a warning says why and the run goes on with the eager
model. The check: the first batch goes through both; the compiled result is used only when its labels equal the
eager ones in all but :data:`MAX_LABEL_MISMATCH` of the pixels (float rounding can flip an exact tie) and its
logits are within :data:`LOGIT_TOLERANCE` of them.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .profile import stage

MAX_LABEL_MISMATCH = 1e-4  # share of pixels whose label may differ between compiled and eager (ties)
LOGIT_TOLERANCE = 1e-3  # largest allowed |compiled - eager| logit, relative to the largest |eager| logit (at least 1)


def inductor_cache_dir() -> Path:
    """Where TorchInductor keeps compiled code: ``TORCHINDUCTOR_CACHE_DIR`` when the user set it, otherwise
    ``$XDG_CACHE_HOME/dinomed/inductor`` (default ``~/.cache/dinomed/inductor``, which survives a reboot, unlike
    torch's default under the temporary folder); set for this process. Torch writes its default into the
    environment the first time it looks, so that value is not taken as the user's."""
    from torch._inductor.runtime.runtime_utils import default_cache_dir

    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env and os.path.abspath(env) != os.path.abspath(default_cache_dir()):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "dinomed" / "inductor"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


class CompiledForward:
    """``model``'s forward pass compiled for batches of ``batch_size`` slices (smaller ones are padded), checked
    against the eager model on the first batch; falls back to the eager model with a warning.

    ``log(message)`` and ``warn(message)`` report what happens (default: nothing). ``status`` is ``"pending"``
    before the first batch, then ``"compiled"`` or ``"eager"``; ``compile_seconds`` the time the first batch took
    (compilation, the compiled run and the eager check)."""

    def __init__(self, model: nn.Module, batch_size: int, *, log: Callable[[str], None] | None = None,
                 warn: Callable[[str], None] | None = None):
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.log = log or (lambda message: None)
        self.warn = warn or (lambda message: None)
        self.status = "pending"
        self.compile_seconds = 0.0
        self.label_mismatch = 0.0
        self._compiled = None

    def _pad(self, batch: torch.Tensor) -> torch.Tensor:
        missing = self.batch_size - batch.shape[0]
        if missing <= 0:
            return batch
        return torch.cat([batch, batch.new_zeros((missing, *batch.shape[1:]))])

    def _fallback(self, reason: str) -> None:
        self.status, self._compiled = "eager", None
        self.warn(f"--compile: {reason}; running the model uncompiled (eager)")

    def _first(self, batch: torch.Tensor) -> torch.Tensor:
        cache = inductor_cache_dir()
        self.log(f"compiling the model for batches of {tuple(self._pad(batch).shape)} (TorchInductor; cached in {cache})")
        started = time.perf_counter()
        with stage("compile"):
            eager = self.model(batch)
            try:
                compiled = torch.compile(self.model, dynamic=False, options={"freezing": True})
                out = compiled(self._pad(batch))[: batch.shape[0]]
            except Exception as exc:  # noqa: BLE001 - any failure of the optional path means: run eager
                self.compile_seconds = time.perf_counter() - started
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                self._fallback(f"compilation failed ({type(exc).__name__}: {first_line})")
                return eager
            self.compile_seconds = time.perf_counter() - started
            if out.shape != eager.shape:
                self._fallback(f"the compiled model returned shape {tuple(out.shape)}, the eager one {tuple(eager.shape)}")
                return eager
            scale = max(1.0, float(eager.abs().max()))
            diff = float((out.float() - eager.float()).abs().max())
            mismatch = float((out.argmax(1) != eager.argmax(1)).float().mean())
            self.label_mismatch = mismatch
            if diff > LOGIT_TOLERANCE * scale or mismatch > MAX_LABEL_MISMATCH:
                self._fallback(f"the compiled model's first batch differs from the eager model's (largest logit "
                               f"difference {diff:.3g}, labels differing in {100 * mismatch:.4f}% of the pixels)")
                return eager
        self._compiled = compiled
        self.status = "compiled"
        self.log(f"compiled in {self.compile_seconds:.1f} s; first batch checked against the eager model "
                 f"(largest logit difference {diff:.2g}, {100 * mismatch:.4f}% of labels differ)")
        return out

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.status == "pending":
            return self._first(batch)
        if self._compiled is None:
            return self.model(batch)
        return self._compiled(self._pad(batch))[: batch.shape[0]]
