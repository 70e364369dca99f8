"""Slice embeddings of 2D images and 3D volumes through a frozen encoder, cached, and the feature set of a dataset.

The protocols of the DINOv3 medical benchmark ("Does DINOv3 set a new medical vision standard?", sections 2.1
and 2.2): a 2D image goes through the frozen encoder
as it is (grey replicated to the channels the backbone expects: dinomed loads an RGB checkpoint as a one-channel
backbone whose patch embedding sums the RGB kernels, which is the same thing); a 3D volume goes through it slice
by slice (every axial slice) and the slice embeddings are aggregated into one volume vector by mean pooling
(:meth:`FeatureSet.volume_vectors`). For each slice two embeddings of the chosen block are kept: the CLS token
and the mean of the patch tokens (the "global average pooling" of section 3.1), both after the backbone's final
LayerNorm, so the aggregation can be chosen later without running the encoder again.

Cache (``dinomed-slice-embeddings/1``), in the same folder as the dense feature cache of ``dinomed features``
(``dinomed_features/`` beside the image by default) and keyed the same way (voxels and geometry of every input,
encoder weights, block, normalisation, plus the resize): ``<key>.npz`` holding ``cls`` and ``patch`` arrays
``(D, C)`` float32 and ``<key>.json`` with the description; both written atomically, the JSON last. The dense
cache keeps every patch token (about 200 times more data than the two vectors per slice classification needs),
so the two formats stay separate files.

A *feature set* (``dinomed classify extract --out features.npz``) is one ``.npz`` file (numpy only, no pickle):
``case_ids`` (N strings), ``offsets`` (N+1 ints: the slices of case i are rows ``offsets[i]:offsets[i+1]``),
``cls`` and ``patch`` ``(S, C)`` float32 (every slice of every case), ``meta`` (a JSON string: format, encoder,
block, modalities, normalisation, resize, per-case source files).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_path, atomic_write_text
from ..errors import DinomedError, InputImageError

log = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "dinomed-slice-embeddings/1"
FEATURE_SET_FORMAT = "dinomed-classify-features/1"
TOKENS = ("cls", "patch", "cls+patch")
PLANAR_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# How many times slice embeddings were computed (not read from the cache) in this process; tests check reuse.
COMPUTE_COUNT = 0


def read_case_image(path: str | Path) -> sitk.Image:
    """A 3D volume, or a 2D image (PNG/JPEG/TIFF, or a 2D NIfTI/NRRD) as a volume of one slice.

    An RGB(A) 2D image is converted to grey (ITU-R 601 luma) with a log line; the benchmark feeds native RGB
    images to an RGB encoder, which dinomed's one-channel backbones do not take.
    """
    from ..io import read_image

    path = Path(path)
    if not path.exists():
        raise InputImageError(f"{path}: no such file or folder")
    if path.is_dir() or not path.name.lower().endswith(PLANAR_SUFFIXES):
        try:
            return read_image(path)
        except InputImageError:
            if path.is_dir():
                raise
            try:
                probe = sitk.ReadImage(str(path))
            except RuntimeError:
                raise
            if probe.GetDimension() != 2:
                raise
            image = probe
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise InputImageError(f"{path}: cannot read the image ({str(exc).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 2:
        from ..io import check_volume

        return check_volume(image, str(path))
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        weights = np.array([0.299, 0.587, 0.114, 0.0][: array.shape[-1]], dtype=np.float32)
        grey = sitk.GetImageFromArray((array * weights).sum(-1) if array.shape[-1] >= 3 else array[..., 0])
        grey.CopyInformation(image)
        log.info("%s: RGB image converted to grey", path)
        image = grey
    return sitk.JoinSeries(sitk.Cast(image, sitk.sitkFloat32))


def slice_embeddings(
    inputs: Mapping[str, sitk.Image],
    extractor,
    *,
    layer: int = -1,
    resize: int | None = None,
    batch_size: int = 16,
    device: str | None = "auto",
    cache_dir: str | Path | None = None,
    names: Mapping[str, str] | None = None,
    on_batch=None,
) -> dict[str, np.ndarray]:
    """The CLS token and the patch-token mean of block ``layer`` for every axial slice: ``{"cls": (D, C),
    "patch": (D, C)}`` float32.

    ``inputs`` maps modality (CT, PET) to its volume; volumes other than the reference (CT when given) are
    resampled onto the reference grid. ``extractor`` is a :class:`dinomed.features.FeatureExtractor` (its
    streams' normalisation is applied; several streams are concatenated along the channels). ``resize`` (our
    option) resamples every slice to ``resize × resize`` pixels (bilinear) before the encoder, as the benchmark
    does for its input resolutions; default: the native slice size, zero-padded to a multiple of the patch size.
    ``on_batch(n)`` is called after each batch of ``n`` slices.
    """
    global COMPUTE_COUNT
    import torch
    import torch.nn.functional as F

    from ..backbones import extract_features
    from ..features.extract import arrays_on_reference, encoder_cache_key
    from ..preprocess import normalize_channels

    names = dict(names or {})
    inputs = {str(k).upper(): v for k, v in inputs.items()}
    needed = extractor.modalities
    missing = [m for m in needed if m not in inputs]
    if missing:
        raise InputImageError(f"the encoder reads {needed} but no {', '.join(missing)} image was given (found {sorted(inputs)})")
    reference = "CT" if "CT" in needed else needed[0]
    layer = extractor.resolved_layer(layer)
    key, key_fields = encoder_cache_key(EMBEDDINGS_FORMAT, extractor, inputs, reference, layer, resize=resize)
    entry = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    if entry is not None and entry.is_file():
        try:
            with np.load(entry.with_suffix(".npz"), allow_pickle=False) as data:
                cached = {"cls": data["cls"].astype(np.float32), "patch": data["patch"].astype(np.float32)}
            if on_batch is not None:
                on_batch(cached["cls"].shape[0])
            return cached
        except (OSError, KeyError, ValueError) as exc:  # a damaged entry is recomputed and overwritten
            log.warning("ignoring a damaged slice-embedding cache entry %s: %s", entry, exc)

    ref_image = inputs[reference]
    volumes = arrays_on_reference(inputs, needed, reference, names)
    depth = ref_image.GetSize()[2]
    from ..runtime import resolve_device  # (torch is imported lazily here)

    dev = resolve_device(device)
    cls_parts, patch_parts = [], []
    with torch.inference_mode():
        for stream in extractor.streams:
            encoder = stream.encoder
            was_training = encoder.training
            original_device = next(encoder.parameters()).device
            encoder.eval().to(dev)
            cls_rows, patch_rows = [], []
            try:
                for start in range(0, depth, batch_size):
                    stop = min(start + batch_size, depth)
                    x = normalize_channels([volumes[m][start:stop] for m in stream.modalities], stream.channels)
                    x = torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2, 3))).to(dev)
                    if resize:
                        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
                    out = extract_features(encoder, x, layers=[layer], norm=True)
                    cls_rows.append(out.cls[0].float().cpu().numpy())
                    patch_rows.append(out.patches[0].float().mean(dim=(2, 3)).cpu().numpy())
                    if on_batch is not None:
                        on_batch(stop - start)
            finally:
                encoder.to(original_device).train(was_training)
            cls_parts.append(np.concatenate(cls_rows))
            patch_parts.append(np.concatenate(patch_rows))
    COMPUTE_COUNT += 1
    result = {"cls": np.concatenate(cls_parts, axis=1).astype(np.float32),
              "patch": np.concatenate(patch_parts, axis=1).astype(np.float32)}
    if entry is not None:
        with atomic_path(entry.with_suffix(".npz")) as tmp:
            np.savez(tmp, **result)
        meta = {"format": EMBEDDINGS_FORMAT, "key": key, "array": entry.with_suffix(".npz").name,
                "shape": list(result["cls"].shape), "model": extractor.source, **key_fields}
        atomic_write_text(entry, json.dumps(meta, indent=1))
    return result


@dataclass
class FeatureSet:
    """The slice embeddings of every case of a dataset (see the module docstring for the file format)."""

    case_ids: list[str]
    offsets: np.ndarray
    cls: np.ndarray
    patch: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self._index = {c: i for i, c in enumerate(self.case_ids)}

    def __len__(self) -> int:
        return len(self.case_ids)

    def index(self, case_id: str) -> int:
        return self._index[case_id]

    def slices(self, token: str = "cls") -> np.ndarray:
        """Every slice's embedding ``(S, C)`` for ``token``: cls, patch (the patch-token mean) or cls+patch
        (both concatenated, as DINOv3's own linear evaluation does; our option)."""
        if token == "cls":
            return self.cls
        if token == "patch":
            return self.patch
        if token == "cls+patch":
            return np.concatenate([self.cls, self.patch], axis=1)
        raise DinomedError(f"unknown token {token!r}; expected one of {', '.join(TOKENS)}")

    def bags(self, token: str = "patch", cases: Sequence[str] | None = None) -> list[np.ndarray]:
        """The slice embeddings of each case, one ``(D_i, C)`` array per case (ABMIL's bags)."""
        rows = self.slices(token)
        order = range(len(self)) if cases is None else [self._index[c] for c in cases]
        return [rows[self.offsets[i]:self.offsets[i + 1]] for i in order]

    def volume_vectors(self, token: str = "cls", cases: Sequence[str] | None = None) -> np.ndarray:
        """One vector per case: the mean of its slice embeddings (section 2.2: mean pooling); ``(N, C)``."""
        return np.stack([bag.mean(axis=0) for bag in self.bags(token, cases)]).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if not path.name.endswith(".npz"):
            raise DinomedError(f"{path}: a feature set is written as .npz; name the file e.g. features.npz")
        meta = {"format": FEATURE_SET_FORMAT, **self.meta}
        with atomic_path(path) as tmp:
            np.savez(tmp, case_ids=np.array(self.case_ids, dtype=str), offsets=self.offsets.astype(np.int64),
                     cls=self.cls.astype(np.float32), patch=self.patch.astype(np.float32), meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSet":
        path = Path(path)
        if not path.is_file():
            raise DinomedError(f"{path}: no such feature set (write one with: dinomed classify extract … --out {path.name})")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                fs = cls([str(c) for c in data["case_ids"]], data["offsets"].astype(np.int64),
                         data["cls"].astype(np.float32), data["patch"].astype(np.float32), meta)
        except (OSError, KeyError, ValueError) as exc:
            raise DinomedError(f"{path}: not a dinomed classify feature set ({FEATURE_SET_FORMAT}): {exc}") from None
        if meta.get("format") != FEATURE_SET_FORMAT:
            raise DinomedError(f"{path}: expected format {FEATURE_SET_FORMAT}, found {meta.get('format')!r}")
        return fs


def find_case_images(folder: str | Path, glob: str = "*", case_regex: str = r"(.+?)(_\d{4})?$") -> dict[str, Path]:
    """The images in ``folder`` matching ``glob``, by case id: the first group of ``case_regex`` matched on the
    file name without its image suffix (default: the name, without an nnU-Net channel suffix ``_0000``)."""
    from ..io import image_suffix

    folder = Path(folder)
    if not folder.is_dir():
        raise DinomedError(f"{folder}: expected a folder of images, found {'a file' if folder.exists() else 'nothing'}")
    pattern = re.compile(case_regex)
    found: dict[str, Path] = {}
    for path in sorted(folder.glob(glob)):
        if path.name.startswith(".") or path.name.endswith(".json"):
            continue
        suffix = image_suffix(path) or next((s for s in PLANAR_SUFFIXES if path.name.lower().endswith(s)), "")
        if not suffix or (path.is_dir() and suffix):
            continue
        stem = path.name[: -len(suffix)]
        match = pattern.fullmatch(stem)
        if not match:
            continue
        case = match.group(1) if pattern.groups else match.group(0)
        if case in found:
            raise DinomedError(f"{folder}: two images give the case id {case!r} ({found[case].name}, {path.name}); "
                               "narrow --glob (e.g. '*_0000.nii.gz') or change --case-regex")
        found[case] = path
    if not found:
        raise DinomedError(f"{folder}: no image matches {glob!r} (expected .nii.gz, .nii, .nrrd, .mha or .png/.jpg files)")
    return found


def extract_feature_set(
    cases: Mapping[str, Mapping[str, str | Path]],
    extractor,
    *,
    events=None,
    source_meta: dict | None = None,
    **embedding_options,
) -> FeatureSet:
    """Slice embeddings of every case (``case id -> {modality: image path}``), in the order given;
    ``embedding_options`` are :func:`slice_embeddings`' keywords (layer, resize, batch_size, device, cache_dir)."""
    ids = list(cases)
    depths = {}
    images = {}
    for case in ids:  # read every header first, for an honest progress total
        images[case] = {m: read_case_image(p) for m, p in cases[case].items()}
        ref = "CT" if "CT" in images[case] else next(iter(images[case]))
        depths[case] = images[case][ref].GetSize()[2]
    total = sum(depths.values())
    done = 0

    def tick(n):
        nonlocal done
        done += n
        if events is not None:
            events.progress(done, total, "slices")

    cls_rows, patch_rows, offsets = [], [], [0]
    resolved = extractor.resolved_layer(embedding_options.pop("layer", -1))
    resize = embedding_options.get("resize")
    for case in ids:
        emb = slice_embeddings(images.pop(case), extractor, layer=resolved, on_batch=tick,
                               names={m: str(p) for m, p in cases[case].items()}, **embedding_options)
        cls_rows.append(emb["cls"])
        patch_rows.append(emb["patch"])
        offsets.append(offsets[-1] + emb["cls"].shape[0])
    meta = {
        "model": extractor.source,
        "weights_hash": extractor.weights_hash(),
        "layer": resolved,
        "modalities": extractor.modalities,
        "streams": [{"name": s.name, "channels": s.channels} for s in extractor.streams],
        "resize": resize,
        "embed_dim": int(cls_rows[0].shape[1]) if cls_rows else 0,
        "files": {c: {m: str(Path(p).resolve()) for m, p in cases[c].items()} for c in ids},
        **(source_meta or {}),
    }
    return FeatureSet(ids, np.asarray(offsets, dtype=np.int64), np.concatenate(cls_rows), np.concatenate(patch_rows), meta)
