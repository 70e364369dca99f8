"""Multi-crop augmentation of one grayscale CT/PET slice (DINO multi-crop; DINOv3 ``DataAugmentationDINO``).

Two global crops (``global_crops_scale`` of the slice area, resized to ``global_crops_size``) and N local
crops (``local_crops_scale``, ``local_crops_size``), each with a random aspect ratio in [3/4, 4/3] and an
optional left-right flip. DINOv3's colour jitter, grayscale and solarisation are meant for RGB photographs;
for a normalised CT or PET slice they are replaced by an intensity (brightness) shift and a contrast change
(probability ``intensity_p``), and the Gaussian blur keeps DINOv3's probabilities (global crop 1: 1.0,
global crop 2: 0.1, local crops: 0.5) and sigma range. In the Gram stages each global crop is also cut at
``gram_teacher_crops_size`` from the same region with the same flip and no photometric change (DINOv3's
``gram_teacher_no_distortions``). Every random draw comes from the ``numpy`` generator passed in, so a
sample is a pure function of its seed.

Multi-resolution mixing (DINOv3 high-resolution adaptation, ``build_multi_resolution_data_loader_from_cfg``):
``global_crops_size``, ``local_crops_size`` and ``gram_teacher_crops_size`` may be lists of the same length, one
entry per resolution, and ``global_local_crop_pairs_ratios`` the share of batches at each; every batch is at one
resolution, chosen for each step by :func:`resolution_for_step` (the same on every process and on resume).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class MultiCropConfig:
    global_crops_size: int | tuple[int, ...] = 224
    local_crops_size: int | tuple[int, ...] = 96
    local_crops_number: int = 8
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    gram_teacher_crops_size: int | tuple[int | None, ...] | None = None
    global_local_crop_pairs_ratios: float | tuple[float, ...] = 1.0
    horizontal_flips: bool = True
    intensity_p: float = 0.8
    brightness: float = 0.2  # additive shift in the normalised [-1, 1] range
    contrast: float = 0.4  # multiplicative factor in [1 - c, 1 + c] around the crop mean
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, local crops

    @classmethod
    def from_config(cls, crops: dict) -> "MultiCropConfig":
        known = {k: v for k, v in crops.items() if k in cls.__dataclass_fields__}
        for key in ("global_crops_scale", "local_crops_scale", "blur_sigma", "blur_p"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        for key in ("global_crops_size", "local_crops_size", "gram_teacher_crops_size", "global_local_crop_pairs_ratios"):
            if isinstance(known.get(key), list):
                known[key] = tuple(known[key])
        config = cls(**known)
        config.resolutions()  # checks the lists now
        return config

    def resolutions(self) -> list[tuple[int, int, int | None]]:
        """``(global, local, gram teacher)`` crop sizes of each resolution (one entry unless sizes are lists)."""
        def as_list(value):
            return list(value) if isinstance(value, (list, tuple)) else None
        lists = {key: as_list(getattr(self, key)) for key in
                 ("global_crops_size", "local_crops_size", "gram_teacher_crops_size", "global_local_crop_pairs_ratios")}
        lengths = {len(v) for v in lists.values() if v is not None}
        if len(lengths) > 1:
            raise ValueError("crops: global_crops_size, local_crops_size, gram_teacher_crops_size and "
                             "global_local_crop_pairs_ratios given as lists must have the same length; got "
                             + ", ".join(f"{k}: {len(v)}" for k, v in lists.items() if v is not None))
        n = lengths.pop() if lengths else 1

        def entry(key, i):
            values = lists[key]
            return values[i] if values is not None else getattr(self, key)
        return [(int(entry("global_crops_size", i)), int(entry("local_crops_size", i)),
                 None if entry("gram_teacher_crops_size", i) is None else int(entry("gram_teacher_crops_size", i)))
                for i in range(n)]

    def ratios(self) -> np.ndarray:
        """The probability of each resolution (``global_local_crop_pairs_ratios`` normalised to sum to one)."""
        n = len(self.resolutions())
        r = self.global_local_crop_pairs_ratios
        weights = np.asarray(list(r) if isinstance(r, (list, tuple)) else [float(r)] * n, dtype=np.float64)
        if weights.shape != (n,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"crops.global_local_crop_pairs_ratios={r}: expected {n} non-negative weights, not all zero")
        return weights / weights.sum()


def resolution_for_step(config: MultiCropConfig, seed: int, step: int) -> int:
    """The resolution (index into ``config.resolutions()``) of every sample of training step ``step``."""
    ratios = config.ratios()
    if len(ratios) == 1:
        return 0
    return int(np.random.default_rng([int(seed), 0x7E5, int(step)]).choice(len(ratios), p=ratios))


def random_resized_box(height: int, width: int, scale: tuple[float, float], rng: np.random.Generator,
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a box covering ``scale`` of the area with aspect ratio in ``ratio`` (torchvision's rule)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: the central crop of the allowed aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(region: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(region[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(C, H, W)`` image, reflecting at the borders."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    pad = min(radius, image.shape[-1] - 1, image.shape[-2] - 1)
    kernel = kernel[radius - pad: radius + pad + 1]
    out = F.pad(image[None], (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


class MultiCropAugmentation:
    def __init__(self, config: MultiCropConfig):
        self.cfg = config

    def _photometric(self, crop: torch.Tensor, blur_p: float, rng: np.random.Generator) -> torch.Tensor:
        cfg = self.cfg
        if rng.random() < cfg.intensity_p:
            mean = crop.mean()
            contrast = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
            shift = rng.uniform(-cfg.brightness, cfg.brightness)
            crop = (crop - mean) * contrast + mean + shift
        if rng.random() < blur_p:
            crop = gaussian_blur(crop, float(rng.uniform(*cfg.blur_sigma)))
        return crop

    def __call__(self, image: torch.Tensor, rng: np.random.Generator, resolution: int = 0) -> dict[str, torch.Tensor]:
        """``image`` ``(C, H, W)`` normalised slice -> ``global_crops`` ``(2, C, G, G)``, ``local_crops`` ``(N, C, L, L)``
        and, in the Gram stages, ``gram_crops`` ``(2, C, S, S)``, at the sizes of ``resolution``."""
        cfg = self.cfg
        global_size, local_size, gram_size = cfg.resolutions()[resolution]
        _, height, width = image.shape
        global_crops, gram_crops = [], []
        for k in range(2):
            top, left, h, w = random_resized_box(height, width, cfg.global_crops_scale, rng)
            region = image[:, top:top + h, left:left + w]
            if cfg.horizontal_flips and rng.random() < 0.5:
                region = region.flip(-1)
            global_crops.append(self._photometric(_resize(region, global_size), cfg.blur_p[k], rng))
            if gram_size:
                gram_crops.append(_resize(region, gram_size))
        local_crops = []
        for _ in range(cfg.local_crops_number):
            top, left, h, w = random_resized_box(height, width, cfg.local_crops_scale, rng)
            region = image[:, top:top + h, left:left + w]
            if cfg.horizontal_flips and rng.random() < 0.5:
                region = region.flip(-1)
            local_crops.append(self._photometric(_resize(region, local_size), cfg.blur_p[2], rng))
        out = {"global_crops": torch.stack(global_crops), "local_crops": torch.stack(local_crops)}
        if gram_crops:
            out["gram_crops"] = torch.stack(gram_crops)
        return out
