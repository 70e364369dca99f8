"""Whole-volume prediction: a ``(C, Z, Y, X)`` volume → a ``(Z, Y, X)`` label map, as ``model.json`` says.

- ``inference.mode == "slicewise2d"`` (2D models): axial slices in batches of ``inference.batch_size``; only one
  batch of logits is in memory at a time.
- ``inference.mode == "sliding3d"`` (3D models): MONAI ``sliding_window_inference`` with ``roi_size`` ``[z, y, x]``,
  ``overlap`` and Gaussian blending, ``batch_size`` windows per call; the volume is processed in slabs along z
  (each with half a window of context on both sides) so that the class logits of only one slab are held.

The same function validates during finetuning, evaluates (``dinomed evaluate``) and segments (``dinomed segment``),
so that a model is always run the way it will be used.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import DinomedError, InputImageError
from ..runtime import autocast, autocast_dtype
from .profile import stage, timed_stage

SLAB_WINDOWS = 4  # a 3D slab spans this many window depths (plus context), bounding memory on long volumes


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def autocast_for(device: torch.device, amp: str | bool | None = "auto"):
    """Autocast for the ``amp`` setting on ``device`` (:func:`dinomed.runtime.autocast_dtype`: bf16 on a CUDA GPU
    that has it, fp16 when asked; nothing on the CPU, where it does not pay)."""
    return autocast(device, autocast_dtype(device, amp))


def check_channels(model_json: dict, channels) -> list[np.ndarray]:
    """The model input as a list of ``(Z, Y, X)`` float32 C-contiguous arrays, one per channel (a ``(C, Z, Y, X)``
    array gives views of its channels; arrays already float32 and contiguous are used as they are, not stacked
    into a new volume), their number checked against ``model.json``."""
    specs = (model_json.get("preprocessing") or {}).get("channels") or model_json.get("inputs") or []
    if isinstance(channels, np.ndarray):
        if channels.ndim != 4:
            raise InputImageError(f"expected the model input as (C, Z, Y, X), found shape {tuple(channels.shape)}")
        channels = list(channels)
    image = [np.ascontiguousarray(c, dtype=np.float32) for c in channels]
    if any(c.ndim != 3 for c in image) or len({c.shape for c in image}) > 1:
        raise InputImageError("expected the model input as (C, Z, Y, X) or C volumes (Z, Y, X) of one shape, found "
                              f"shapes {[tuple(c.shape) for c in image]}")
    if specs and len(image) != len(specs):
        raise InputImageError(
            f"the model reads {len(specs)} channel(s) ({', '.join(s.get('modality', '?') for s in specs)}), "
            f"found {len(image)}"
        )
    if not image:
        raise InputImageError("the model input has no channel")
    return image


def _slab(image: list[np.ndarray], lo: int, hi: int) -> np.ndarray:
    """Slices ``lo:hi`` of every channel as one ``(hi - lo, C, Y, X)`` array (the batch layout)."""
    return np.stack([c[lo:hi] for c in image], axis=1)


@timed_stage("model")
@torch.inference_mode()
def predict_volume(
    model: nn.Module,
    model_json: dict,
    channels: np.ndarray | Sequence[np.ndarray],
    *,
    amp: str | None = "auto",
    progress: Callable[[int, int], None] | None = None,
    compile: bool = False,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Segment a whole volume. ``channels``: the model input ``(C, Z, Y, X)`` (or a list of ``(Z, Y, X)``) in
    ``model.json`` input order, normalised by :func:`dinomed.preprocess.normalize_channels` with the
    ``preprocessing.channels`` specs. Returns the label map ``(Z, Y, X)`` uint8 in the model's label values
    (0 = background). The model runs on its own device; ``progress(done, total)`` counts slices.

    ``compile``: run a 2D model's slices through :class:`dinomed.inference.compiled.CompiledForward` (opt-in
    ``torch.compile``, checked against the eager model on the first batch, eager again on any failure; ``log`` and
    ``warn`` receive its messages). 3D models always run eager."""
    image = check_channels(model_json, channels)
    infer = model_json.get("inference", {})
    mode = infer.get("mode", "slicewise2d")
    was_training = model.training
    model.eval()
    try:
        if mode == "slicewise2d":
            return _predict_slices(model, image, int(infer.get("batch_size", 8)), amp, progress,
                                   compile=compile, log=log, warn=warn)
        if mode == "sliding3d":
            if compile and warn is not None:
                warn("--compile applies to slice-wise (2D) models; this 3D model runs uncompiled (eager)")
            roi = [int(v) for v in infer.get("roi_size", [32, 128, 128])]
            return _predict_sliding(model, image, roi, float(infer.get("overlap", 0.25)),
                                    int(infer.get("batch_size", 1)), amp, progress)
        raise DinomedError(f"model.json inference.mode {mode!r} is not supported; expected slicewise2d or sliding3d")
    finally:
        model.train(was_training)


# On the CPU a forward pass holds the activations of every slice of its batch in host memory (about 0.1 GB per
# 512x512 slice for the ViT-tiny demo model) and gains nothing from large batches: a batch is run in chunks of at
# most this many pixels (four 512x512 slices). Each slice's logits are independent of the others in eval mode.
CPU_PIXELS_PER_FORWARD = 4 * 512 * 512


def slices_per_forward(device: torch.device, batch_size: int, height: int, width: int) -> int:
    """Slices of ``height`` x ``width`` per forward pass: the batch, cut to :data:`CPU_PIXELS_PER_FORWARD` on the CPU."""
    if device.type != "cpu":
        return batch_size
    return max(1, min(batch_size, CPU_PIXELS_PER_FORWARD // max(1, height * width)))


def _predict_slices(model, image: list[np.ndarray], batch_size: int, amp, progress, *, compile: bool = False,
                    log=None, warn=None) -> np.ndarray:
    device = model_device(model)
    depth, height, width = image[0].shape
    out = np.zeros(image[0].shape, dtype=np.uint8)
    chunk = slices_per_forward(device, batch_size, height, width)
    if progress is not None:
        progress(0, depth)  # the bar starts with the work (its rate then counts the first batch's time)
    forward = model
    if compile:
        from .compiled import CompiledForward

        forward = CompiledForward(model, min(chunk, depth), log=log, warn=warn)
    for start in range(0, depth, max(1, batch_size)):
        stop = min(depth, start + batch_size)
        for lo in range(start, stop, chunk):
            hi = min(stop, lo + chunk)
            batch = torch.from_numpy(_slab(image, lo, hi)).to(device)
            out[lo:hi] = slice_labels(forward, batch, amp)
            del batch
        if progress is not None:
            progress(stop, depth)
    return out


def class_labels(logits: torch.Tensor) -> np.ndarray:
    """The label (index of the largest logit, the first one on a tie) of every voxel: ``(B, K, …)`` → ``(B, …)``
    uint8 on the CPU. ``max(dim=1).indices`` is ``argmax(dim=1)``, but torch's CPU argmax over a non-last dimension
    is 4x slower (measured: 115 ms vs 26 ms per 512x512 slice of 8 classes)."""
    return logits.max(dim=1).indices.to("cpu", torch.uint8).numpy()


def prepare_for_inference(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """``model`` in eval mode, ready for :func:`predict_volume`: on the CPU, a 2D model with convolutions is put
    in channels-last memory format (oneDNN's native layout: its convolutions then need no layout conversions, and
    the decoder's full-resolution stages allocate about half the memory pages; the same numbers up to float
    rounding). The model is changed in place and returned."""
    device = torch.device(device) if device is not None else model_device(model)
    model.eval()
    if device.type == "cpu" and getattr(model, "spatial_dims", None) == 2 and any(
            isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.kernel_size != (16, 16) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


# Not set by default: THP_MEM_ALLOC_ENABLE=1 (read by torch at its first allocation) puts torch's large CPU blocks on
# transparent huge pages (~120k page faults per 512x512 slice of the demo model became 2.4-3.8k), but the ViT-S ran
# slower with it on the development machine (benchmarks/thp.py; README, measured figures).


def slice_labels(model: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, amp=None) -> np.ndarray:
    """The label map ``(B, H, W)`` uint8 of a batch of slices ``(B, C, H, W)`` on the model's device (``model``: the
    module or a :class:`dinomed.inference.compiled.CompiledForward` of it). A module with a ``predict_labels(x)``
    method (the labels of its logits, the first largest on a tie, computed its own way: MedDINOv3 takes the argmax
    before placing its decoder's patches) gives them directly."""
    direct = getattr(model, "predict_labels", None) if isinstance(model, nn.Module) else None
    with autocast_for(batch.device, amp):
        out = direct(batch) if direct is not None else model(batch)
    with stage("argmax"):
        if direct is not None:
            return out.to("cpu", torch.uint8).numpy()
        return class_labels(out)


def _predict_sliding(model, image: list[np.ndarray], roi: list[int], overlap: float, batch_size: int, amp,
                     progress) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    device = model_device(model)
    depth = image[0].shape[0]
    out = np.zeros(image[0].shape, dtype=np.uint8)
    slab = max(roi[0] * SLAB_WINDOWS, roi[0])
    if progress is not None:
        progress(0, depth)
    context = roi[0] // 2
    for start in range(0, depth, slab):
        stop = min(depth, start + slab)
        lo, hi = max(0, start - context), min(depth, stop + context)
        x = torch.from_numpy(np.stack([c[lo:hi] for c in image])[None]).to(device)
        with autocast_for(device, amp):
            logits = sliding_window_inference(x, roi, max(1, batch_size), model, overlap=overlap, mode="gaussian")
        with stage("argmax"):
            labels = class_labels(logits)[0]
        out[start:stop] = labels[start - lo: stop - lo]
        if progress is not None:
            progress(stop, depth)
    return out
