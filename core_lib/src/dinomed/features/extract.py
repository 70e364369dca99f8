"""Patch features of a whole volume, slice by slice, from a backbone or the encoder(s) of a model folder; cached.

A :class:`FeatureExtractor` is one or more *streams*; a stream is a DINOv3 ViT (timm ``Eva``) and the input
channels it reads (modality + normalisation spec, ``dinomed.preprocess``). One stream of a CT backbone reads
the CT; a CT+PET backbone (2 input channels) reads both in one stream; a dual-stream PET/CT model (Dual-DINOv3)
has a CT stream and a PET stream. With several streams, each stream's feature is scaled to unit length at
every position and the streams are concatenated along the channels, so that a cosine similarity of the
concatenation is the mean of the streams' similarities.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import DinomedError, InputImageError
from ..preprocess import check_pet_is_suv, default_spec, normalize_channels
from .volume import CACHE_FORMAT, FeatureVolume, feature_grid_geometry, geometry_of

log = logging.getLogger(__name__)

# How many times features were computed (not read from a cache) in this process: tests check cache reuse with it.
COMPUTE_COUNT = 0


def _find_vit(module, where: str):
    """The first timm DINOv3 ViT inside ``module`` (itself, or a wrapped one, e.g. under LoRA)."""
    for candidate in module.modules():
        if hasattr(candidate, "forward_intermediates") and hasattr(candidate, "patch_embed") and hasattr(candidate, "blocks"):
            if not hasattr(candidate.patch_embed, "proj"):
                # DINO-Med3D replaces the 2D patch embedding by its inter-slice context embedding (ICE)
                raise DinomedError(
                    f"{where}: the encoder has no 2D patch embedding (it embeds several slices at once, e.g. "
                    "DINO-Med3D's inter-slice context embedding); feature maps of this encoder are not supported"
                )
            return candidate
    raise DinomedError(f"{where} holds no DINOv3 ViT (a module with patch_embed, blocks and forward_intermediates)")


def encoder_from_model(model, stream: str | None = None):
    """The ViT encoder of a ``dinomed.models`` model, for feature maps.

    The interface every model follows: a single-encoder model has an attribute ``backbone`` (or ``encoder``);
    a dual-stream PET/CT model has ``ct_encoder`` and ``pet_encoder``, picked by ``stream`` ("CT" or "PET").
    The attribute may wrap the ViT (LoRA, adapters): the first timm ViT inside it is returned.
    """
    name = type(model).__name__
    slab = int(getattr(model, "ice_k", 1) or 1)
    if slab > 1:
        # DINO-Med3D's inter-slice context embedding: its patch embedding reads a K-slice slab, not one slice
        raise DinomedError(
            f"{name}: the encoder embeds {slab} neighbouring slices at once (DINO-Med3D's inter-slice context "
            "embedding); feature maps of this encoder are not supported"
        )
    dual = hasattr(model, "ct_encoder") and hasattr(model, "pet_encoder")
    if dual:
        if stream is None or stream.upper() not in ("CT", "PET"):
            raise DinomedError(f"{name} is a dual-stream PET/CT model; choose its CT or PET encoder, found stream {stream!r}")
        attr = f"{stream.lower()}_encoder"
        return _find_vit(getattr(model, attr), f"{name}.{attr}")
    for attr in ("backbone", "encoder"):
        if hasattr(model, attr):
            return _find_vit(getattr(model, attr), f"{name}.{attr}")
    raise DinomedError(
        f"{name} exposes no encoder for feature maps: expected an attribute backbone, encoder, or ct_encoder and pet_encoder"
    )


@dataclass
class FeatureStream:
    """One encoder and the channels it reads (each a ``dinomed.preprocess`` spec with its ``modality``)."""

    name: str
    encoder: object
    channels: list[dict]

    @property
    def modalities(self) -> list[str]:
        return [spec["modality"].upper() for spec in self.channels]


@dataclass
class FeatureExtractor:
    """What computes the features: one or more :class:`FeatureStream` and a description of the source."""

    streams: list[FeatureStream]
    source: dict = field(default_factory=dict)
    _weights_hash: str | None = field(default=None, init=False, repr=False)

    @property
    def modalities(self) -> list[str]:
        seen: list[str] = []
        for stream in self.streams:
            seen += [m for m in stream.modalities if m not in seen]
        return seen

    # ---- constructors --------------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone, modalities: Sequence[str] = ("CT",), specs: Sequence[dict] | None = None,
                      source: dict | None = None) -> "FeatureExtractor":
        """A backbone reading ``modalities``: in one stream when its input channels match their number, else
        (a 1-channel backbone and two modalities) one stream per modality with the same backbone."""
        modalities = [m.upper() for m in modalities]
        specs = [dict(s) for s in specs] if specs else [default_spec(m) for m in modalities]
        vit = _find_vit(backbone, type(backbone).__name__)
        in_chans = vit.patch_embed.proj.in_channels
        if in_chans == len(modalities):
            streams = [FeatureStream("+".join(modalities), vit, specs)]
        elif in_chans == 1:
            streams = [FeatureStream(m, vit, [s]) for m, s in zip(modalities, specs)]
        else:
            raise DinomedError(
                f"the backbone reads {in_chans} input channels; cannot feed it {len(modalities)} modality(ies) {modalities}"
            )
        return cls(streams, dict(source or {"kind": "backbone", "arch": getattr(vit, "dinomed_arch", type(vit).__name__)}))

    @classmethod
    def from_checkpoint(cls, path: str | Path, modalities: Sequence[str] = ("CT",), arch: str | None = None) -> "FeatureExtractor":
        """A backbone checkpoint in any format ``dinomed.backbones.load_backbone`` reads. An RGB checkpoint is
        adapted to one channel and run on each modality; a 2-channel one reads CT+PET together."""
        from ..backbones import load_backbone

        backbone = load_backbone(path, arch=arch)
        if backbone.patch_embed.proj.in_channels not in (1, len(modalities)):
            backbone = load_backbone(path, arch=arch, in_chans=1)
        return cls.from_backbone(backbone, modalities, source={"kind": "checkpoint", "path": str(Path(path).resolve()),
                                                               "arch": backbone.load_report.arch})

    @classmethod
    def from_model_folder(cls, folder: str | Path, stream: str | None = None) -> "FeatureExtractor":
        """The encoder(s) of a model folder with the model's own inputs and normalisation (``model.json``).

        ``stream``: for a dual-stream PET/CT model "CT", "PET" or "both" (default both). Each encoder is run on
        its own modality, so the features are those of the encoders without the cross-modal fusion between
        them. A single-encoder model reads all its inputs (``stream`` must then be None, "both", or the model's
        only modality); a one-channel encoder in a two-input model (Dual-DINOv3 ``pet_only``/``ct_only``) reads
        the modality its variant names.
        """
        from ..models import load_model_folder

        model, model_json = load_model_folder(folder)
        where = str(Path(folder) / "model.json")
        inputs = [str(i.get("modality", "")).upper() for i in model_json.get("inputs", [])]
        specs = (model_json.get("preprocessing") or {}).get("channels") or [default_spec(m) for m in inputs]
        if [str(s.get("modality", "")).upper() for s in specs] != inputs:
            raise DinomedError(f"{where}: preprocessing.channels {specs} do not match the inputs {inputs}")
        source = {"kind": "model", "path": str(Path(folder).resolve()), "name": model_json.get("name"),
                  "architecture": model_json["architecture"].get("name")}
        by_modality = dict(zip(inputs, specs))
        choice = (stream or "both").upper()
        if hasattr(model, "ct_encoder") and hasattr(model, "pet_encoder"):
            wanted = ["CT", "PET"] if choice == "BOTH" else [choice]
            streams = []
            for modality in wanted:
                if modality not in by_modality:
                    raise DinomedError(f"{where}: the model has no {modality} input (inputs: {inputs})")
                streams.append(FeatureStream(modality, encoder_from_model(model, modality), [by_modality[modality]]))
            return cls(streams, source)
        vit = encoder_from_model(model)
        in_chans = vit.patch_embed.proj.in_channels
        if in_chans == len(inputs):
            if choice not in ("BOTH", *inputs) or (choice != "BOTH" and len(inputs) > 1):
                raise DinomedError(f"{where}: the model has a single encoder reading {inputs} together; "
                                   f"stream {stream!r} cannot be chosen")
            return cls([FeatureStream("+".join(inputs), vit, [dict(s) for s in specs])], source)
        if in_chans == 1:
            # a one-channel encoder inside a multi-input model (Dual-DINOv3's pet_only / ct_only variants)
            variant = str(getattr(model, "variant", ""))
            modality = {"pet_only": "PET", "ct_only": "CT"}.get(variant, choice if choice != "BOTH" else None)
            if modality is None or modality not in by_modality:
                raise DinomedError(f"{where}: the model's encoder reads one of its inputs {inputs}; "
                                   f"choose which with stream CT or PET (found {stream!r})")
            if choice not in ("BOTH", modality):
                raise DinomedError(f"{where}: the model's encoder reads {modality}, not {choice}")
            return cls([FeatureStream(modality, vit, [by_modality[modality]])], source)
        raise DinomedError(
            f"{where}: the encoder reads {in_chans} input channels but the model has {len(inputs)} inputs {inputs}; "
            "feature maps of this model's encoder are not supported"
        )

    # ---- identity ------------------------------------------------------------------------------------
    def weights_hash(self) -> str:
        """A hash of every encoder's weights (names, shapes, dtypes, values)."""
        if self._weights_hash is None:
            import torch

            digest = hashlib.blake2b(digest_size=16)
            seen: set[int] = set()
            for stream in self.streams:
                if id(stream.encoder) in seen:
                    continue
                seen.add(id(stream.encoder))
                for name, tensor in sorted(stream.encoder.state_dict().items()):
                    t = tensor.detach().cpu().contiguous().reshape(-1)
                    digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
                    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._weights_hash = digest.hexdigest()
        return self._weights_hash

    def resolved_layer(self, layer: int) -> int:
        depths = {len(s.encoder.blocks) for s in self.streams}
        if len(depths) != 1:
            raise DinomedError(f"the streams have different depths {sorted(depths)}; pick one stream")
        depth = depths.pop()
        if not -depth <= int(layer) < depth:
            raise DinomedError(f"layer {layer} out of range for an encoder of {depth} blocks (0..{depth - 1}, or -1 for the last)")
        return int(layer) % depth


def image_hash(image: sitk.Image) -> str:
    """A hash of an image's voxels (values and pixel type) and geometry."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps({"pixel": image.GetPixelIDTypeAsString(), **geometry_of(image)}, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return digest.hexdigest()


def default_cache_dir(image_path: str | Path) -> Path:
    """Where the features of ``image_path`` are cached by default: ``dinomed_features/`` beside it, or the user's
    cache folder (``~/.cache/dinomed/features``) when that folder cannot be written."""
    folder = Path(image_path).resolve().parent
    if os.access(folder, os.W_OK):
        return folder / "dinomed_features"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinomed" / "features"


def compute_features(
    inputs: sitk.Image | Mapping[str, sitk.Image],
    extractor: FeatureExtractor,
    *,
    layer: int = -1,
    reference: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    device: str | None = "auto",
    events=None,
    names: Mapping[str, str] | None = None,
) -> FeatureVolume:
    """The patch features of a volume at block ``layer`` (0-based, -1 = last), axial slice by slice.

    ``inputs`` maps modality ("CT", "PET") to its volume (HU, SUV); a single image stands for the extractor's
    only modality. The features land on the feature grid of the ``reference`` modality's volume (default CT
    when given); other volumes are resampled onto its grid first (linear). Slices are run ``batch_size`` at a
    time and written into one preallocated float16 array ``(D, C, h, w)``, so memory stays bounded.

    With ``cache_dir`` the result is looked up there (and stored after computing) under a key that hashes the
    voxels and geometry of every volume read, the encoder weights, the layer and the normalisation; a changed
    image or model therefore misses the cache. ``events`` (a :class:`~dinomed.events.EventWriter`) gets
    progress per batch. ``names`` (modality -> file name) only improves error messages.
    """
    global COMPUTE_COUNT
    import torch

    from ..backbones import extract_features
    from ..io import check_volume

    names = dict(names or {})
    needed = extractor.modalities
    if isinstance(inputs, sitk.Image):
        if len(needed) != 1:
            raise DinomedError(f"the model reads {needed}; pass one volume per modality")
        inputs = {needed[0]: inputs}
    inputs = {str(k).upper(): v for k, v in inputs.items()}
    missing = [m for m in needed if m not in inputs]
    if missing:
        raise InputImageError(f"the model reads {needed} but no {', '.join(missing)} volume was given (found {sorted(inputs)})")
    reference = (reference or ("CT" if "CT" in inputs else needed[0])).upper()
    if reference not in inputs:
        raise InputImageError(f"the reference volume {reference} was not given (found {sorted(inputs)})")
    for modality in set(needed) | {reference}:
        check_volume(inputs[modality], names.get(modality, modality))
    ref_image = inputs[reference]
    layer = extractor.resolved_layer(layer)
    patch = {int(s.encoder.patch_embed.patch_size[0]) for s in extractor.streams}
    if len(patch) != 1:
        raise DinomedError(f"the streams have different patch sizes {sorted(patch)}")
    patch_size = patch.pop()

    key, key_fields = encoder_cache_key(CACHE_FORMAT, extractor, inputs, reference, layer, reference=reference,
                                        norm=True, patch_size=patch_size)
    cache_file = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        try:
            cached = FeatureVolume.load(cache_file)
            log.debug("features read from the cache %s", cache_file)
            if events is not None:
                events.log(f"features read from the cache {cache_file}")
            return cached
        except DinomedError as exc:  # a damaged entry is recomputed and overwritten
            log.warning("ignoring a damaged feature cache entry: %s", exc)

    # ---- compute -------------------------------------------------------------------------------------
    volumes = arrays_on_reference(inputs, needed, reference, names)
    image_geometry = geometry_of(ref_image)
    width, height, depth = image_geometry["size"]
    grid = feature_grid_geometry(image_geometry, patch_size)
    gw, gh = grid["size"][:2]
    dims = [int(s.encoder.embed_dim) for s in extractor.streams]
    out = np.empty((depth, sum(dims), gh, gw), dtype=np.float16)
    from ..runtime import resolve_device  # (torch is imported lazily here)

    dev = resolve_device(device)
    total = depth * len(extractor.streams)
    done = 0
    offset = 0
    with torch.inference_mode():
        for stream, dim in zip(extractor.streams, dims):
            encoder = stream.encoder
            was_training = encoder.training
            original_device = next(encoder.parameters()).device
            encoder.eval().to(dev)
            try:
                for start in range(0, depth, batch_size):
                    stop = min(start + batch_size, depth)
                    channels = [volumes[m][start:stop] for m in stream.modalities]
                    x = normalize_channels(channels, stream.channels)  # (C, b, H, W) float32
                    x = torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2, 3))).to(dev)
                    tokens = extract_features(encoder, x, layers=[layer], norm=True).patches[0].float()
                    if len(extractor.streams) > 1:
                        tokens = tokens / tokens.norm(dim=1, keepdim=True).clamp_min(1e-6)
                    out[start:stop, offset:offset + dim] = tokens.cpu().numpy().astype(np.float16)
                    done += stop - start
                    if events is not None:
                        events.progress(done, total, "feature slices")
            finally:
                encoder.to(original_device).train(was_training)
            offset += dim
    COMPUTE_COUNT += 1

    meta = {
        "key": key,
        "model": extractor.source,
        "weights_hash": extractor.weights_hash(),
        "layer": layer,
        "reference": reference,
        "streams": [{"name": s.name, "channels": s.channels, "channels_out": d} for s, d in zip(extractor.streams, dims)],
        "images": key_fields["images"],
        "normalized_streams": len(extractor.streams) > 1,
    }
    volume = FeatureVolume(out, image_geometry, patch_size, meta)
    if cache_file is not None:
        try:
            volume.save(cache_file)
        except (DinomedError, OSError) as exc:  # the cache is an optimisation: go on without it
            message = (f"the feature cache {cache_dir} cannot be written ({getattr(exc, 'strerror', None) or exc}); "
                       "going on without it (pass --cache DIR to choose a writable folder, or --no-cache)")
            log.warning(message) if events is None else events.warning(message)
        else:
            if events is not None:
                events.artifact("features", str(cache_file))
    return volume


def arrays_on_reference(inputs: Mapping[str, sitk.Image], needed, reference: str,
                        names: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Each needed modality's voxels on the reference image's grid (linear resampling; a PET checked for SUV),
    as (z, y, x) arrays: views of the given images, copies of the resampled ones; ``names`` name the inputs in
    error messages."""
    ref_image = inputs[reference]
    volumes: dict[str, np.ndarray] = {}
    for modality in needed:
        image = inputs[modality]
        if modality == reference:
            array = sitk.GetArrayViewFromImage(image)  # valid while the caller holds ``inputs``
        else:
            from ..petct import resample_to_reference  # (imported lazily, as the caller does)

            resampled = resample_to_reference(image, ref_image, "linear", 0.0, names.get(modality, modality),
                                              names.get(reference, reference))
            # a copy: a view would point into the resampled image's buffer, freed when this function returns
            array = sitk.GetArrayFromImage(resampled)
        if modality == "PET":
            check_pet_is_suv(array, names.get(modality, "PET"))
        volumes[modality] = array
    return volumes


def encoder_cache_key(cache_format: str, extractor: FeatureExtractor, inputs: Mapping[str, sitk.Image],
                      grid_modality: str, layer: int, **fields) -> tuple[str, dict]:
    """The cache key of what ``extractor`` computes from ``inputs`` at block ``layer`` on the grid of the
    ``grid_modality`` image: a hash of the format, that grid, the voxels of every image read, the weights, the
    streams and the caller's ``fields``, so that a changed image or model misses the cache (the feature cache
    here, the slice embeddings of classify). Returns the key and the fields it hashes."""
    key_fields = {
        "format": cache_format,
        "reference_grid": geometry_of(inputs[grid_modality]),
        "images": {m: image_hash(inputs[m]) for m in sorted(set(extractor.modalities))},
        "weights": extractor.weights_hash(),
        "layer": layer,
        "streams": [{"name": s.name, "channels": s.channels} for s in extractor.streams],
        **fields,
    }
    return hashlib.blake2b(json.dumps(key_fields, sort_keys=True).encode(), digest_size=16).hexdigest(), key_fields
