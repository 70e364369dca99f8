"""Unlabeled CT or PET volumes as a stream of multi-crop axial slices for self-supervised pretraining.

A folder (searched recursively) holds NIfTI/NRRD/MetaImage files and/or DICOM series. Volumes are read
lazily with :func:`dinomed.io.read_image` (a few kept in memory), normalised with the shared
:func:`dinomed.preprocess.normalize_channel` (CT: HU clipped to [-1000, 1000] -> [-1, 1]; PET: SUV clipped to
[0, 20], ``log1p`` -> [-1, 1]) and cut into axial slices. Slices are sampled with a bias to the body: a
slice's weight is the fraction of its pixels above a body threshold (CT -500 HU, PET 0.1 SUV), relative to
the volume's fullest slice, plus a small floor, and the slice is cropped to the bounding box of its body mask before the multi-crop augmentation.

Sample ``g`` of the run is a pure function of ``(seed, g)``: the sampler position is the iteration, so a
resumed or a distributed run sees exactly the samples of an uninterrupted single-process run. A file that
cannot be read is skipped with a warning and counted, never a crash mid-run; a PET that is not in SUV and an
empty folder are clear errors.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import DinomedError, InputImageError
from ..preprocess import check_pet_is_suv, default_spec, normalize_channel
from .crops import MultiCropAugmentation, resolution_for_step
from .masking import BlockMaskGenerator, batch_masks

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
DEFAULT_BODY_THRESHOLD = {"CT": -500.0, "PET": 0.1}


@dataclass(frozen=True)
class VolumeEntry:
    """One volume of the folder: a file, or a DICOM series (folder + SeriesInstanceUID)."""

    path: str
    series_uid: str | None = None

    @property
    def name(self) -> str:
        return self.path if self.series_uid is None else f"{self.path} (series {self.series_uid})"


@dataclass
class VolumeScan:
    folder: str
    volumes: list[VolumeEntry]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)


def _suffix(name: str, suffixes: tuple[str, ...]) -> bool:
    name = name.lower()
    return any(name.endswith(s) for s in suffixes)


def _looks_like_dicom(path: Path) -> bool:
    if _suffix(path.name, DICOM_SUFFIXES):
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
        return head[128:132] == b"DICM"
    except OSError:
        return False


def _check_dicom_units(files: list[str], name: str, modality: str) -> None:
    """A PET DICOM series stored in Bq/ml (Units BQML) is activity, not SUV: refuse it with the fix."""
    if modality != "PET":
        return
    import pydicom

    head = pydicom.dcmread(files[0], stop_before_pixels=True)
    units = str(head.get("Units", "")).upper()
    if units and units not in ("GML", "SUV", "SUVBW", "G/ML"):
        raise InputImageError(
            f"{name}: the PET series is stored in {units} (activity concentration), expected SUV. Convert it first: "
            f"dinomed suv {Path(files[0]).parent} --out pet_suv.nii.gz, and pretrain on the converted files"
        )


def scan_volume_folder(folder: str | os.PathLike, modality: str = "CT") -> VolumeScan:
    """Find the volumes under ``folder`` and check that their headers can be read (no pixel data is read).

    Raises :class:`DinomedError` for a missing or empty folder (or one whose every file is unreadable).
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise DinomedError(f"--data {folder}: no such folder; expected a folder of {modality} volumes")
    volumes: list[VolumeEntry] = []
    skipped: list[tuple[str, str]] = []
    dicom_dirs: set[Path] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if _suffix(path.name, VOLUME_SUFFIXES):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            try:
                reader.ReadImageInformation()
            except RuntimeError:
                skipped.append((str(path), "not a readable image header"))
                continue
            if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
                skipped.append((str(path), f"expected a scalar 3D volume, found {reader.GetDimension()}D with "
                                           f"{reader.GetNumberOfComponents()} component(s)"))
                continue
            volumes.append(VolumeEntry(str(path)))
        elif _looks_like_dicom(path):
            dicom_dirs.add(path.parent)
    for directory in sorted(dicom_dirs):
        from ..io import list_dicom_series

        try:
            series = list_dicom_series(directory)
        except Exception as exc:  # pydicom/GDCM errors of a broken file
            skipped.append((str(directory), f"DICOM series could not be listed ({exc})"))
            continue
        if not series:
            skipped.append((str(directory), "no readable DICOM series"))
        for s in series:
            entry = VolumeEntry(str(directory), s["uid"])
            _check_dicom_units(s["files"], entry.name, modality)
            volumes.append(entry)
    for path, why in skipped:
        log.warning("skipping %s: %s", path, why)
    if not volumes:
        extra = f"; {len(skipped)} unreadable file(s) skipped, e.g. {skipped[0][0]} ({skipped[0][1]})" if skipped else ""
        raise DinomedError(
            f"--data {folder}: found no {modality} volumes; expected NIfTI (.nii, .nii.gz), NRRD (.nrrd), "
            f"MetaImage (.mha) files or DICOM series in the folder or its subfolders{extra}"
        )
    return VolumeScan(str(folder), volumes, skipped)


@dataclass
class LoadedVolume:
    slices: np.ndarray  # (z, y, x) float32, normalised to [-1, 1]
    body: np.ndarray  # (z, y, x) bool body mask
    weights: np.ndarray  # (z,) slice sampling probabilities


class SliceSource:
    """Lazily loaded, normalised volumes with body-biased slice weights (a small LRU cache per process)."""

    def __init__(self, scan: VolumeScan, modality: str, normalization: dict | None = None,
                 body_threshold: float | None = None, empty_slice_weight: float = 0.05, cache_volumes: int = 4):
        self.scan = scan
        self.modality = modality.upper()
        if self.modality not in ("CT", "PET"):
            raise DinomedError(f"modality {modality!r}: expected CT or PET")
        self.spec = dict(normalization) if normalization else default_spec(self.modality)
        self.body_threshold = DEFAULT_BODY_THRESHOLD[self.modality] if body_threshold is None else float(body_threshold)
        self.empty_slice_weight = float(empty_slice_weight)
        self.cache_volumes = max(1, int(cache_volumes))
        self._cache: OrderedDict[int, LoadedVolume] = OrderedDict()
        self.bad: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.scan.volumes)

    def load(self, index: int) -> LoadedVolume:
        """The volume ``index``; :class:`InputImageError` if it cannot be read (the caller skips it), or if a
        PET is not in SUV (the caller stops: the user must convert the data)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        import SimpleITK as sitk

        from ..io import read_image

        entry = self.scan.volumes[index]
        try:
            image = read_image(entry.path, series_uid=entry.series_uid)
            raw = sitk.GetArrayFromImage(image).astype(np.float32)
        except InputImageError:
            raise
        except Exception as exc:  # a truncated or corrupt file found while reading pixel data
            raise InputImageError(f"{entry.name}: could not be read ({exc})") from None
        if self.modality == "PET":
            check_pet_is_suv(raw, entry.name)
        raw = np.nan_to_num(raw, nan=float(self.spec["clip"][0]))
        body = raw > self.body_threshold
        fraction = body.reshape(body.shape[0], -1).mean(axis=1)
        # relative to the slice with the most body, so that empty_slice_weight means the same in every volume
        weights = fraction / max(float(fraction.max()), 1e-6) + self.empty_slice_weight
        loaded = LoadedVolume(normalize_channel(raw, self.spec), body, weights / weights.sum())
        self._cache[index] = loaded
        while len(self._cache) > self.cache_volumes:
            self._cache.popitem(last=False)
        return loaded

    def check_first_volume(self) -> None:
        """Read the first readable volume now, so that data the run cannot use (a PET in Bq/ml) fails at once."""
        for index in range(len(self)):
            try:
                self.load(index)
                return
            except InputImageError as exc:
                if "expected SUV" in str(exc):
                    raise
                self.bad[index] = str(exc)
                log.warning("skipping %s", exc)

    def sample_slice(self, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        """A body-biased axial slice ``(y, x)`` cropped to its body, and the files newly found unreadable."""
        newly_bad: list[str] = []
        for _ in range(100 * len(self) + 100):
            index = int(rng.integers(len(self)))
            if index in self.bad:
                continue
            try:
                volume = self.load(index)
            except InputImageError as exc:
                if "expected SUV" in str(exc):
                    raise
                self.bad[index] = str(exc)
                newly_bad.append(str(exc))
                log.warning("skipping %s", exc)
                continue
            z = int(rng.choice(len(volume.weights), p=volume.weights))
            image, body = volume.slices[z], volume.body[z]
            rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
            if rows.size and cols.size:
                margin = 4
                r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, image.shape[0])
                c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, image.shape[1])
                if (r1 - r0) >= 8 and (c1 - c0) >= 8:
                    image = image[r0:r1, c0:c1]
            return image, newly_bad
        raise DinomedError(
            f"--data {self.scan.folder}: none of the {len(self)} volumes could be read; "
            f"e.g. {next(iter(self.bad.values()), 'unknown')}"
        )


class MultiCropSliceDataset(Dataset):
    """``dataset[g]`` is the multi-crop sample number ``g`` of the run, drawn with the generator of ``(seed, g)``.

    With several crop resolutions, sample ``g`` belongs to step ``g // global_batch`` and takes that step's
    resolution (:func:`~dinomed.pretrain.crops.resolution_for_step`), so that a batch has one size.
    """

    def __init__(self, source: SliceSource, augmentation: MultiCropAugmentation, seed: int = 0, global_batch: int = 1):
        self.source = source
        self.augmentation = augmentation
        self.seed = int(seed)
        self.global_batch = max(int(global_batch), 1)

    def __len__(self) -> int:  # an endless stream; the sampler decides which samples a process draws
        return 2**62

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, 0x5EED, int(index)])
        image, newly_bad = self.source.sample_slice(rng)
        resolution = resolution_for_step(self.augmentation.cfg, self.seed, int(index) // self.global_batch)
        sample = self.augmentation(torch.from_numpy(np.ascontiguousarray(image))[None], rng, resolution)
        sample["index"] = int(index)
        sample["unreadable"] = newly_bad
        return sample


class StepBatchSampler(Sampler):
    """Batches of sample numbers: step ``s`` of rank ``r`` draws ``s*G + r*L … s*G + r*L + L - 1`` (G global,
    L local batch size), from ``start_step`` on, without end."""

    def __init__(self, local_batch_size: int, world_size: int = 1, rank: int = 0, start_step: int = 0):
        self.local = int(local_batch_size)
        self.world = int(world_size)
        self.rank = int(rank)
        self.start_step = int(start_step)

    def __iter__(self):
        step = self.start_step
        global_batch = self.local * self.world
        while True:
            first = step * global_batch + self.rank * self.local
            yield list(range(first, first + self.local))
            step += 1

    def __len__(self) -> int:
        return 2**62


class MultiCropCollator:
    """Stacks samples as ``(n_crops * B, C, H, W)`` (crop-major, as DINOv3) and draws the iBOT masks.

    The masks of a step are drawn for the global batch from the generator of ``(seed, step)`` and each
    process keeps its slice, so that the masks do not depend on the number of processes.
    """

    def __init__(self, mask_ratio_min_max, mask_probability: float, seed: int, world_size: int = 1, rank: int = 0,
                 patch_size: int = 16):
        self.generators: dict[tuple[int, int], BlockMaskGenerator] = {}  # one per crop resolution
        self.patch_size = int(patch_size)
        self.mask_ratio_min_max = tuple(mask_ratio_min_max)
        self.mask_probability = float(mask_probability)
        self.seed = int(seed)
        self.world = int(world_size)
        self.rank = int(rank)

    def __call__(self, samples: list[dict]) -> dict:
        local = len(samples)
        step = samples[0]["index"] // (local * self.world)
        out = {
            "global_crops": torch.cat([torch.stack([s["global_crops"][k] for s in samples]) for k in range(2)]),
            "local_crops": torch.cat([torch.stack([s["local_crops"][k] for s in samples])
                                      for k in range(samples[0]["local_crops"].shape[0])]),
            "unreadable": [msg for s in samples for msg in s["unreadable"]],
            "step": step,
        }
        if "gram_crops" in samples[0]:
            out["gram_crops"] = torch.cat([torch.stack([s["gram_crops"][k] for s in samples]) for k in range(2)])
        rng = np.random.default_rng([self.seed, 0x3A5C, int(step)])
        height, width = out["global_crops"].shape[-2:]
        grid = (height // self.patch_size, width // self.patch_size)
        generator = self.generators.setdefault(grid, BlockMaskGenerator(grid))
        masks = batch_masks(generator, 2 * local * self.world, self.mask_ratio_min_max, self.mask_probability, rng)
        masks = masks.reshape(2, self.world, local, -1)[:, self.rank].reshape(2 * local, -1)
        out["masks"] = torch.from_numpy(masks)
        return out
