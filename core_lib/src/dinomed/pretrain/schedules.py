"""Training schedules: linear warm-up then a half cosine, then constant (DINOv3 ``linear_warmup_cosine_decay``).

Every schedule of a stage config is ``{start, peak, end, warmup_epochs[, cosine_epochs]}``: from ``start`` to
``peak`` linearly over the warm-up, from ``peak`` to ``end`` along a half cosine over ``cosine_epochs`` (default:
the rest of the run), then ``end``. A constant is ``start = peak = end``; a cosine without warm-up is
``start = peak``. Used for the learning rate, weight decay, teacher EMA momentum, teacher temperature, the
DINO local-crop loss weight and the Gram loss weight. The curve itself is :func:`dinomed.training.warmup_cosine`.
"""
from __future__ import annotations

import math

import numpy as np

from ..training import warmup_cosine


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
