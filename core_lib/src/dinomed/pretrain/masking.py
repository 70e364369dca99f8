"""Block-wise masking of the global crops for the iBOT loss (BEiT, Bao et al. 2022; iBOT; DINOv3 data/masking).

Per batch, ``int(n_crops * mask_probability)`` crops are masked; their target masked fractions are spread
evenly over ``mask_ratio_min_max`` (``linspace``), the others are not masked, and the order is shuffled.
A crop's mask is grown from random rectangles (area between 4 patches and half the grid, aspect ratio in
[0.3, 1/0.3]) until the target count is reached, then topped up with random single patches.
"""
from __future__ import annotations

import math

import numpy as np


class BlockMaskGenerator:
    def __init__(self, grid: tuple[int, int], min_num_patches: int = 4, max_num_patches: float | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, rng: np.random.Generator) -> int:
        added = 0
        for _ in range(10):
            # like random.uniform, the bounds may come in either order (a target below the 4-patch minimum)
            area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    added += new
                if added > 0:
                    break
        return added

    def __call__(self, n_masked: int, rng: np.random.Generator) -> np.ndarray:
        """A ``(height, width)`` boolean mask with exactly ``n_masked`` patches set."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < n_masked:
            added = self._add_block(mask, min(n_masked - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        flat = mask.reshape(-1)
        missing = n_masked - int(flat.sum())
        if missing > 0:
            flat[rng.choice(np.flatnonzero(~flat), size=missing, replace=False)] = True
        return flat.reshape(self.height, self.width)


def batch_masks(generator: BlockMaskGenerator, n_crops: int, mask_ratio_min_max: tuple[float, float],
                mask_probability: float, rng: np.random.Generator) -> np.ndarray:
    """``(n_crops, N)`` masks for one batch of global crops, as DINOv3's collate function draws them."""
    n = generator.num_patches
    n_masked_crops = int(n_crops * mask_probability)
    ratios = np.linspace(mask_ratio_min_max[0], mask_ratio_min_max[1], n_masked_crops + 1)
    masks = [generator(int(n * ratios[i + 1]), rng).reshape(-1) for i in range(n_masked_crops)]
    masks += [np.zeros(n, dtype=bool) for _ in range(n_crops - n_masked_crops)]
    order = rng.permutation(n_crops)
    return np.stack([masks[i] for i in order])
