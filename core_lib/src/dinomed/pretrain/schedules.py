"""Training schedules: linear warm-up then a half cosine, then constant (DINOv3 ``linear_warmup_cosine_decay``).

Every schedule of a stage config is ``{start, peak, end, warmup_epochs[, cosine_epochs]}``: from ``start`` to
``peak`` linearly over the warm-up, from ``peak`` to ``end`` along a half cosine over ``cosine_epochs`` (default:
the rest of the run), then ``end``. A constant is ``start = peak = end``; a cosine without warm-up is
``start = peak``. Used for the learning rate, weight decay, teacher EMA momentum, teacher temperature, the
DINO local-crop loss weight and the Gram loss weight.
"""
from __future__ import annotations

import math

import numpy as np


def warmup_cosine(start: float, peak: float, end: float, warmup_iterations: int, total_iterations: int,
                  cosine_iterations: int | None = None) -> np.ndarray:
    warmup_iterations = min(int(warmup_iterations), int(total_iterations))
    linear = np.linspace(start, peak, warmup_iterations, endpoint=False)
    if cosine_iterations is None:
        cosine_iterations = total_iterations - warmup_iterations
    cosine_iterations = min(int(cosine_iterations), total_iterations - warmup_iterations)
    phase = np.linspace(0.0, math.pi, cosine_iterations)
    cosine = end + (peak - end) * (np.cos(phase) + 1.0) / 2.0
    constant = np.full(total_iterations - warmup_iterations - cosine_iterations, float(end))
    return np.concatenate([linear, cosine, constant]).astype(np.float64)


def schedule_from_config(spec: dict, epoch_length: int, total_iterations: int, scale: float = 1.0) -> np.ndarray:
    """One schedule from its config entry; ``scale`` multiplies peak and end (the learning-rate scaling rule)."""
    cosine = spec.get("cosine_epochs")
    return warmup_cosine(
        float(spec["start"]), float(spec["peak"]) * scale, float(spec["end"]) * scale,
        int(round(float(spec.get("warmup_epochs", 0)) * epoch_length)), total_iterations,
        None if cosine is None else int(round(float(cosine) * epoch_length)),
    )


def lr_scale(rule: str | None, global_batch_size: int) -> float:
    """DINOv3's learning-rate scaling rules for a global batch size."""
    if rule == "sqrt_wrt_1024":
        return 4.0 * math.sqrt(global_batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return global_batch_size / 256.0
    return 1.0
