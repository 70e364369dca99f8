"""``dinomed features``: PCA-to-RGB and cosine-similarity maps of a DINOv3 encoder's patch features."""
from __future__ import annotations

DESCRIPTION = """\
Compute the patch features of a volume once (axial slice by slice, cached as float16 beside the image or in
--cache), then write a PCA map (first three principal components as RGB, fit on the body), a cosine-similarity
map to a point, and PNG figures. Every volume written has the input image's grid (origin, spacing, direction).

The encoder is the backbone of a model folder (--model), a backbone checkpoint in any format dinomed reads
(--backbone: Meta .pth, DINOv3/MedDINOv3 training checkpoint, Hugging Face or timm safetensors), or, for demos
and tests, a randomly initialised ViT (--arch vit_tiny --random-init).

Modalities: without --pet, --image is a CT (or a PET with --modality PET). With --pet, --image is the CT and
the PET (SUV) is resampled onto it; --modality picks the stream: CT, PET, or both (concatenated unit-length
features of the two streams); auto = what the model reads (CT for a one-channel backbone).
"""


def _point(text: str) -> tuple[float, float, float]:
    import argparse

    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers X,Y,Z, found {text!r}")
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "features", help="PCA and cosine-similarity maps of a DINOv3 encoder's patch features (cached)",
        description=DESCRIPTION, formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("--image", required=True, help="the volume (CT in HU, or PET in SUV with --modality PET); outputs use its grid")
    p.add_argument("--pet", default=None, help="a PET volume in SUV to go with the CT --image (any grid; resampled onto the CT)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", default=None, metavar="MODEL_DIR", help="a model folder (model.json + model.safetensors): its encoder(s)")
    source.add_argument("--backbone", default=None, metavar="CKPT", help="a DINOv3 backbone checkpoint (any supported format)")
    source.add_argument("--arch", default=None, help="a randomly initialised backbone of this size (vit_tiny, vit_small, …); needs --random-init")
    p.add_argument("--random-init", action="store_true", help="confirm that --arch means random weights (demos, tests, timing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    p.add_argument("--layer", type=int, default=-1, help="0-based transformer block whose tokens are used (default -1: the last)")
    p.add_argument("--modality", default="auto", choices=["auto", "CT", "PET", "both"], type=lambda s: s if s in ("auto", "both") else s.upper(),
                   help="which stream's features (see above; default auto)")
    p.add_argument("--mask", default=None, help="a label map on the image grid: PCA fit on its non-zero voxels (default: automatic body mask)")
    p.add_argument("--pca", default=None, metavar="OUT", help="write the PCA RGB map (3 × uint8 vector volume), e.g. pca.nrrd")
    p.add_argument("--cosine", type=_point, default=None, metavar="X,Y,Z", help="the reference point for a cosine map")
    p.add_argument("--point-space", default="index", choices=["index", "lps", "ras"],
                   help="--cosine as a 0-based voxel index (x, y, z order; default), or physical millimetres in LPS "
                        "(DICOM/ITK) or RAS (3D Slicer)")
    p.add_argument("--cosine-mode", default="2d", choices=["2d", "3d"],
                   help="2d: the point's slice only (other slices NaN); 3d: the whole volume (default 2d)")
    p.add_argument("--cosine-out", default=None, metavar="OUT", help="write the cosine map (float32 in [-1, 1]), e.g. cosine.nii.gz")
    p.add_argument("--png", default=None, metavar="DIR", help="write PNG figures (features_image/pca/cosine/panel.png) to DIR")
    p.add_argument("--slice", type=int, default=None, help="axial slice (z index) of the figures (default: the point's, else the middle)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="feature cache folder (default: dinomed_features/ beside the image, or $XDG_CACHE_HOME/dinomed/"
                        "features, i.e. ~/.cache/dinomed/features, when the image's folder is read-only); the cache is "
                        "optional: when it cannot be written, a warning is printed and the maps are still written")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--batch-size", type=int, default=8, help="slices per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N] (default auto)")
    p.add_argument("--events", action="store_true", help="JSON-lines events on stdout (progress, artifacts, done)")
    p.set_defaults(func=run)


def _vector_write(image, path):
    from pathlib import Path

    import SimpleITK as sitk

    from ..atomic import atomic_path
    from ..errors import InputImageError
    from ..io import IMAGE_SUFFIXES, image_suffix

    path = Path(path)
    if image_suffix(path) not in IMAGE_SUFFIXES or image_suffix(path) in (".nhdr", ".mhd"):
        raise InputImageError(f"{path}: cannot write this format; use one of .nrrd, .nii.gz, .nii, .mha")
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


def _check_arguments(args) -> None:
    """The option combinations that make no sense, and outputs that cannot be written or would overwrite an input,
    refused before anything is read."""
    from pathlib import Path

    from ..errors import DinomedError
    from ..io import IMAGE_SUFFIXES
    from ..safety import check_writable, refuse_output_over_input

    if args.cosine is not None and not (args.cosine_out or args.png):
        raise DinomedError("--cosine needs --cosine-out OUT (the similarity volume) or --png DIR (the figures)")
    if args.cosine_out and args.cosine is None:
        raise DinomedError("--cosine-out needs a reference point: --cosine X,Y,Z")
    if args.arch and not args.random_init:
        raise DinomedError(f"--arch {args.arch} builds a randomly initialised backbone; add --random-init to confirm "
                           "(or load weights with --backbone CKPT / --model MODEL_DIR)")
    if args.random_init and not args.arch:
        raise DinomedError("--random-init goes with --arch NAME (e.g. --arch vit_tiny)")
    if args.modality == "both" and not args.pet:
        raise DinomedError("--modality both needs a PET: add --pet PET")
    if args.batch_size < 1:
        raise DinomedError(f"--batch-size must be at least 1, found {args.batch_size}")

    writable = tuple(x for x in IMAGE_SUFFIXES if x not in (".nhdr", ".mhd"))
    if args.pca:
        check_writable(args.pca, "PCA map", writable)
    if args.cosine_out:
        check_writable(args.cosine_out, "cosine map", writable)
    if args.png:
        check_writable(Path(args.png) / "features_panel.png", "PNG figures")
    refuse_output_over_input([("--pca", args.pca), ("--cosine-out", args.cosine_out)],
                             [("--image", args.image), ("--pet", args.pet), ("--mask", args.mask),
                              ("--backbone", args.backbone)])


def _extractor(args, has_pet: bool, image_modality: str):
    """The encoder(s) from --model, --backbone or --arch, and the modality of --image (a one-modality model folder
    decides it when no PET is given)."""
    from pathlib import Path

    from ..features import FeatureExtractor

    if not has_pet:
        wanted = [image_modality]
    elif args.modality == "both":
        wanted = ["CT", "PET"]
    elif args.modality in ("CT", "PET"):
        wanted = [args.modality]
    else:
        wanted = None  # auto: decided by the encoder's input channels
    if args.model:
        extractor = FeatureExtractor.from_model_folder(args.model, None if args.modality == "auto" else args.modality)
        if not has_pet and len(extractor.modalities) == 1:
            image_modality = extractor.modalities[0]
        return extractor, image_modality
    if args.backbone:
        from ..backbones import load_backbone

        backbone = load_backbone(args.backbone)
        in_chans = backbone.patch_embed.proj.in_channels
        if wanted is None:
            wanted = ["CT", "PET"] if in_chans == 2 else ["CT"]
        if in_chans not in (1, len(wanted)):
            backbone = load_backbone(args.backbone, in_chans=1)
        source = {"kind": "checkpoint", "path": str(Path(args.backbone).resolve()), "arch": backbone.load_report.arch}
    else:
        import torch

        from ..backbones import create_backbone

        wanted = wanted or ["CT"]
        torch.manual_seed(args.seed)
        backbone = create_backbone(args.arch, in_chans=1).eval()
        source = {"kind": "random", "arch": backbone.dinomed_arch, "seed": args.seed}
    return FeatureExtractor.from_backbone(backbone, wanted, source=source), image_modality


def _write_maps(args, feats, image, image_modality: str, title: str, events) -> None:
    """The PCA map, the cosine map and the PNG figures that were asked for, each announced as an artifact."""
    from ..errors import DinomedError
    from ..features import cosine_map, pca_rgb, save_feature_figures
    from ..io import read_image, write_image
    from ..petct import resample_to_reference

    mask = None
    if args.mask:
        mask = resample_to_reference(read_image(args.mask), image, "nearest", 0, args.mask, args.image)
    rgb = None
    if args.pca or args.png:
        rgb = pca_rgb(feats, mask=mask, image=image if mask is None else None, modality=image_modality)
        if args.pca:
            events.artifact("pca", str(_vector_write(rgb, args.pca)))
    cosine = voxel = None
    if args.cosine is not None:
        voxel = feats.voxel_index(args.cosine, args.point_space)
        cosine = cosine_map(feats, args.cosine, args.point_space, args.cosine_mode)
        if args.cosine_out:
            events.artifact("cosine", str(write_image(cosine, args.cosine_out)))
    if args.png:
        d = feats.shape[0]
        k = args.slice if args.slice is not None else (int(voxel[2]) if voxel is not None else d // 2)
        if not 0 <= k < d:
            raise DinomedError(f"--slice {k} outside the image's {d} slices")
        if cosine is not None and args.cosine_mode == "2d" and k != int(voxel[2]):
            cosine = cosine_map(feats, args.cosine, args.point_space, "3d")
        for path in save_feature_figures(args.png, image, k, image_modality, rgb, cosine,
                                         voxel if voxel is not None and int(voxel[2]) == k else None, title=title):
            events.artifact("figure", str(path))


def run(args) -> int:
    from ..events import EventWriter
    from ..features import compute_features, default_cache_dir
    from ..io import read_image

    events = EventWriter(enabled=args.events)
    _check_arguments(args)
    image = read_image(args.image)
    pet = read_image(args.pet) if args.pet else None
    image_modality = "CT" if pet is not None else ("PET" if args.modality == "PET" else "CT")
    extractor, image_modality = _extractor(args, pet is not None, image_modality)

    inputs = {image_modality: image}
    names = {image_modality: args.image}
    if pet is not None:
        inputs["PET"], names["PET"] = pet, args.pet
    cache_dir = None if args.no_cache else (args.cache or default_cache_dir(args.image))
    encoder_name = extractor.source.get("arch") or extractor.source.get("name") or ""
    events.log(f"features: {extractor.source.get('kind')} {encoder_name}, "
               f"streams {[s.name for s in extractor.streams]}, layer {args.layer}")
    feats = compute_features(inputs, extractor, layer=args.layer, reference=image_modality, cache_dir=cache_dir,
                             batch_size=args.batch_size, device=args.device, events=events, names=names)
    if feats.from_cache:
        events.artifact("features", str(feats.path), cached=True)
    d, h, w = feats.shape
    events.log(f"feature grid {w}×{h}×{d}, {feats.channels} channels, block {feats.meta.get('layer')}"
               + (" (from the cache)" if feats.from_cache else ""))
    _write_maps(args, feats, image, image_modality, f"{encoder_name} block {feats.meta.get('layer')}", events)
    events.done()
    return 0
