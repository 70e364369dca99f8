"""Training patches: crops biased to foreground classes, then flips, rotation and scaling, intensity jitter (MONAI).

2D models learn from axial patches: a ``(1, H, W)`` crop of the ``(C, Z, Y, X)`` volume is squeezed to ``(C, H, W)``
(a slice-wise sampler that still picks slices by their labels); 3D models learn from ``(D, H, W)`` crops. The
crop centre is drawn per class (``RandCropByLabelClassesd``): background with weight ``neg`` and the foreground
weight ``pos`` shared by the model's classes, so that a small class such as lesions is sampled as often as a
large organ; a class that a case does not hold is skipped for that case.

Every patch is a pure function of the case and an integer seed (``PatchSampler.sample``), so that a run that is
stopped and resumed, or split across DDP ranks, draws exactly the patches of an uninterrupted single-process run.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch

from ..errors import DinomedError
from .dataset import CaseArrays

PAD_IMAGE = -1.0  # the bottom of the normalised range: air in CT, zero uptake in PET
MAX_CENTRES_PER_CLASS = 200_000  # bounds the memory of the crop-centre index lists on large volumes


def pad_case(case: CaseArrays, patch_size: list[int]) -> CaseArrays:
    """Pad a case symmetrically so that every side is at least the patch (2D patches: in-plane sides only)."""
    target = list(patch_size) if len(patch_size) == 3 else [1, *patch_size]
    shape = case.label.shape
    pads = []
    for have, want in zip(shape, target):
        extra = max(0, want - have)
        pads.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in pads):
        return case
    image = np.pad(case.image, [(0, 0), *pads], constant_values=PAD_IMAGE)
    label = np.pad(case.label, pads, constant_values=0)
    return CaseArrays(name=case.name, image=image, label=label, spacing=case.spacing)


def crop_ratios(num_classes: int, pos: float, neg: float, class_ratios=None) -> list[float]:
    """Crop-centre weights per class, background first: ``class_ratios`` when given (one per class), else ``neg``
    for background and ``pos`` shared by the foreground classes."""
    if class_ratios is not None:
        if (not isinstance(class_ratios, (list, tuple)) or len(class_ratios) != num_classes
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in class_ratios)
                or not any(class_ratios)):
            raise DinomedError(f"config data.class_ratios: expected {num_classes} non-negative weights (background "
                               f"first, then each label in order), found {class_ratios!r}")
        return [float(v) for v in class_ratios]
    return [float(neg)] + [float(pos) / max(1, num_classes - 1)] * (num_classes - 1)


def build_patch_transform(patch_size: list[int], num_classes: int, data_cfg: dict, aug_cfg: dict):
    """The MONAI pipeline from a padded case dict (``image`` (C,Z,Y,X), ``label`` (1,Z,Y,X), ``indices``) to one
    augmented patch (``image`` (C,[D,]H,W) float32, ``label`` (1,[D,]H,W))."""
    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandCropByLabelClassesd, RandFlipd,
                                  RandGaussianNoised, RandGaussianSmoothd, RandScaleIntensityd, RandShiftIntensityd,
                                  SqueezeDimd)

    dims = len(patch_size)
    crop_size = list(patch_size) if dims == 3 else [1, *patch_size]
    keys = ["image", "label"]
    steps = [
        RandCropByLabelClassesd(keys, "label", crop_size, ratios=crop_ratios(num_classes, data_cfg["pos"], data_cfg["neg"],
                                                                     data_cfg.get("class_ratios")),
                                num_classes=num_classes, num_samples=1, indices_key="indices", warn=False),
    ]
    if dims == 2:
        steps.append(SqueezeDimd(keys, dim=1))
    flip_axes = [0, 1] if dims == 2 else [0, 1, 2]
    if aug_cfg["flip_prob"] > 0:
        steps += [RandFlipd(keys, prob=aug_cfg["flip_prob"], spatial_axis=a) for a in flip_axes]
    if aug_cfg["affine_prob"] > 0:
        rot = math.radians(float(aug_cfg["rotate_deg"]))
        scale = float(aug_cfg["scale"])
        # in-plane rotation only for 3D (axial slices are the anatomical plane of most acquisitions)
        rotate_range = rot if dims == 2 else (rot, 0.0, 0.0)
        steps.append(RandAffined(keys, prob=aug_cfg["affine_prob"], rotate_range=rotate_range,
                                 scale_range=[scale] * dims, mode=["bilinear", "nearest"], padding_mode="border"))
    if aug_cfg["intensity_prob"] > 0:
        steps += [
            RandScaleIntensityd("image", factors=float(aug_cfg["intensity_scale"]), prob=aug_cfg["intensity_prob"],
                                channel_wise=True),
            RandShiftIntensityd("image", offsets=float(aug_cfg["intensity_shift"]), prob=aug_cfg["intensity_prob"],
                                channel_wise=True),
        ]
    # named options (finetune/config.py "augment"): noise, blur and gamma contrast; off unless their prob > 0
    if aug_cfg.get("gamma_prob", 0) > 0:
        # RandAdjustContrastd rescales to the input's own range around the gamma curve, so [-1, 1] stays [-1, 1]
        steps.append(RandAdjustContrastd("image", prob=aug_cfg["gamma_prob"], gamma=tuple(aug_cfg["gamma"])))
    if aug_cfg.get("smooth_prob", 0) > 0:
        lo, hi = (float(v) for v in aug_cfg["smooth_sigma"])
        steps.append(RandGaussianSmoothd("image", sigma_x=(lo, hi), sigma_y=(lo, hi), sigma_z=(lo, hi),
                                         prob=aug_cfg["smooth_prob"]))
    if aug_cfg.get("noise_prob", 0) > 0:
        steps.append(RandGaussianNoised("image", prob=aug_cfg["noise_prob"], std=float(aug_cfg["noise_std"])))
    return Compose(steps)


def sample_seed(seed: int, index: int) -> int:
    """The seed of global sample ``index`` of a run seeded ``seed`` (independent streams per sample)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


class PatchSampler:
    """Global sample ``g`` → one training patch; the case of ``g`` comes from a seeded per-epoch permutation of the
    training cases, the patch from the MONAI pipeline seeded by ``(seed, g)``.

    ``load(name)`` gives a case's :class:`CaseArrays`; up to ``cache_cases`` cases are kept in memory (None: all).
    """

    def __init__(self, case_names: list[str], load: Callable[[str], CaseArrays], patch_size: list[int],
                 num_classes: int, data_cfg: dict, aug_cfg: dict, seed: int, cache_cases: int | None = None):
        self.case_names = list(case_names)
        self.load = load
        self.patch_size = list(patch_size)
        self.num_classes = num_classes
        self.seed = int(seed)
        self.transform = build_patch_transform(patch_size, num_classes, data_cfg, aug_cfg)
        self.cache_cases = cache_cases
        self._cache: OrderedDict[str, dict] = OrderedDict()

    def case_of(self, index: int) -> str:
        n = len(self.case_names)
        epoch, within = divmod(int(index), n)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        return self.case_names[order[within]]

    def epoch_of(self, index: int) -> int:
        return int(index) // len(self.case_names)

    def prepared(self, name: str) -> dict:
        """A case padded to the patch, with its per-class crop-centre indices (computed once per cached case)."""
        from monai.transforms.utils import map_classes_to_indices

        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        case = pad_case(self.load(name), self.patch_size)
        label = case.label[None]
        indices = map_classes_to_indices(label, self.num_classes, max_samples_per_class=MAX_CENTRES_PER_CLASS)
        item = {"image": case.image, "label": label, "indices": indices}
        self._cache[name] = item
        if self.cache_cases is not None and len(self._cache) > self.cache_cases:
            self._cache.popitem(last=False)
        return item

    def sample(self, index: int) -> dict:
        item = self.prepared(self.case_of(index))
        self.transform.set_random_state(seed=sample_seed(self.seed, index))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.transform(dict(item))
        out = out[0] if isinstance(out, list) else out
        return {"image": _plain(out["image"]).float(), "label": _plain(out["label"]).long()}


def _plain(x) -> torch.Tensor:
    """A MONAI MetaTensor or array as a plain tensor (no metadata to collate or broadcast)."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x).contiguous()


class PatchDataset(torch.utils.data.Dataset):
    """A map-style view of a :class:`PatchSampler` for ``torch.utils.data.DataLoader`` (index = global sample)."""

    def __init__(self, sampler: PatchSampler):
        self.sampler = sampler

    def __len__(self) -> int:  # indices are unbounded; DataLoader only needs the sampler's indices
        return 2**62

    def __getitem__(self, index: int) -> dict:
        return self.sampler.sample(index)


class StepIndices(torch.utils.data.Sampler):
    """The global sample indices of this rank from ``start_step`` to ``max_steps``: step ``s`` of a global batch ``B``
    holds samples ``s*B … s*B+B-1``, rank ``r`` of ``W`` takes the contiguous share ``r*B/W … (r+1)*B/W-1``
    (a DistributedSampler over steps: every rank sees different patches, together exactly the global batch)."""

    def __init__(self, start_step: int, max_steps: int, global_batch: int, rank: int = 0, world_size: int = 1):
        self.start_step, self.max_steps = int(start_step), int(max_steps)
        self.global_batch, self.rank, self.world_size = int(global_batch), int(rank), int(world_size)
        self.local_batch = self.global_batch // self.world_size

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            first = step * self.global_batch + self.rank * self.local_batch
            yield from range(first, first + self.local_batch)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.local_batch
