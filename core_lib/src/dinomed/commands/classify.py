"""``dinomed classify extract|knn|linear-probe|abmil``: classification with frozen DINOv3 features."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Classification with a frozen encoder, as the DINOv3 medical benchmark evaluates it (sections 2.1, 2.2, 3.1):

  1. dinomed classify extract   images/volumes -> slice embeddings of the frozen encoder (once; cached)
  2. dinomed classify knn | linear-probe | abmil   on the features and a labels table -> results table

A 2D image is one slice; a 3D volume goes through the encoder slice by slice and its slice embeddings are
mean-pooled into one vector (k-NN, linear probe) or kept as a bag of instances (ABMIL). The labels table is a
CSV: case id, one column per binary label (multi-label) or a single multi-class column; optional columns
'patient' (splits keep a patient's cases together) and 'split' (train/val/test: an official split).
"""

SPLIT_HELP = ("how to split by patient: auto (the table's 'split' column if it has one, else holdout), holdout "
              "(one train/val/test split, --val-fraction/--test-fraction), kfold (--folds folds, each with a "
              "validation part), column (the 'split' column) (default auto)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 0,1,2, found {text!r}")
    return values


def _window(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), found {text!r}") from None
    if not hi > lo:
        raise argparse.ArgumentTypeError(f"expected LO < HI, found {text!r}")
    return lo, hi


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _add_common_probe(p, token_default: str) -> None:
    p.add_argument("--features", required=True, help="the feature set written by dinomed classify extract (.npz)")
    p.add_argument("--labels", required=True, help="the labels table (CSV: case id, then one column per label)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: results.csv, results.json, predictions.csv")
    p.add_argument("--token", default=token_default, choices=["cls", "patch", "cls+patch"],
                   help="per-slice embedding: the CLS token, the mean of the patch tokens, or both concatenated "
                        f"(DINOv3's linear-evaluation input; our option) (default {token_default})")
    p.add_argument("--case-column", default=None, help="the case id column (default: the first column)")
    p.add_argument("--patient-column", default=None, help="the patient column (default: 'patient' or 'patient_id' when "
                                                          "present, else every case is its own patient)")
    p.add_argument("--label-columns", type=_names, default=None, metavar="A,B,…",
                   help="the label columns (default: every column but case, patient and split)")
    p.add_argument("--task", default="auto", choices=["auto", "multilabel", "multiclass"],
                   help="auto: binary columns are a multi-label task, a single non-binary column a multi-class one")
    p.add_argument("--allow-unlabelled", action="store_true",
                   help="leave out feature-set cases that have no row in the table (default: an error)")
    p.add_argument("--split", default="auto", choices=["auto", "holdout", "kfold", "column"], help=SPLIT_HELP)
    p.add_argument("--folds", type=int, default=5, help="folds of --split kfold (default 5, the benchmark's BCNB protocol)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of patients in the validation part (default 0.1; 0: none)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of patients in the test part of --split holdout (default 0.2)")
    p.add_argument("--seeds", type=_int_list, default=[0], metavar="S,S,…",
                   help="seeds: each gives its own split (unless --split column) and initialisation; results are "
                        "averaged over seeds and folds (default 0)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold of ACC/precision/recall (default 0.5)")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default cpu: these heads are small)")
    p.add_argument("--events", action="store_true", help="JSON-lines events on stdout (progress, metrics, artifacts, done)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("classify", help="classification with frozen features: extract, knn, linear-probe, abmil",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="classify_command", metavar="STEP")
    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])

    p = sub.add_parser("extract", help="slice embeddings of every image through a frozen encoder (once; cached)",
                       description="Run every image (2D) or every slice of every volume (3D) through a frozen encoder and "
                       "write its CLS token and patch-token mean of one block per slice into a feature set (.npz). The "
                       "per-case results are cached beside the images (dinomed_features/), so a rerun with the same "
                       "encoder and images is instant.")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images/volumes, one per case (nnU-Net imagesTr works)")
    p.add_argument("--glob", default="*", help="which files of --images (default '*'; e.g. '*_0000.nii.gz' for nnU-Net CT)")
    p.add_argument("--pet-glob", default=None,
                   help="for an encoder that reads CT and PET: the PET files in --images (e.g. '*_0001.nii.gz')")
    p.add_argument("--case-regex", default=r"(.+?)(_\d{4})?",
                   help="regular expression on the file name without suffix; its first group is the case id "
                        "(default: the name without an nnU-Net channel suffix _0000)")
    p.add_argument("--labels", default=None, help="a labels table: extract only its cases, and fail early when one has no image")
    p.add_argument("--case-column", default=None, help="the case id column of --labels (default: the first)")
    p.add_argument("--out", required=True, help="the feature set to write, e.g. features.npz")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", default=None, metavar="MODEL_DIR", help="a model folder: its encoder, inputs and normalisation")
    source.add_argument("--backbone", default=None, metavar="CKPT", help="a DINOv3 backbone checkpoint (Meta .pth, training "
                        "checkpoint, Hugging Face or timm safetensors)")
    source.add_argument("--arch", default=None, help="a randomly initialised backbone (vit_tiny, vit_small, …); needs --random-init")
    p.add_argument("--random-init", action="store_true", help="confirm that --arch means random weights (baselines, tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    p.add_argument("--layer", type=int, default=-1, help="0-based transformer block whose tokens are used (default -1: the last)")
    p.add_argument("--modality", default="CT", type=str.upper, choices=["CT", "PET"],
                   help="what the images are, for a --backbone/--arch encoder (its normalisation) (default CT)")
    p.add_argument("--window", type=_window, default=None, metavar="LO,HI",
                   help="intensity window mapped to [-1, 1] instead of the modality's default (e.g. 0,255 for 8-bit X-ray PNGs)")
    p.add_argument("--resize", type=int, default=None, metavar="N",
                   help="resample every slice to N×N pixels first (e.g. 224, the benchmark's base resolution; default: native size)")
    p.add_argument("--cache", default=None, metavar="DIR", help="slice-embedding cache folder (default: dinomed_features/ beside the images)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (default 16)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N] (default auto)")
    p.add_argument("--events", action="store_true", help="JSON-lines events on stdout (progress, artifacts, done)")
    p.set_defaults(func=run_extract)

    p = sub.add_parser("knn", help="k-nearest-neighbour classification of the volume vectors (per label)",
                       description="Weighted k-NN on the mean-pooled volume vectors (DINO's k-NN: cosine similarity, k "
                       "nearest training cases, votes weighted by exp(sim/T)); per label, the weighted share of "
                       "positive neighbours is the probability.")
    _add_common_probe(p, "cls")
    p.add_argument("--k", type=int, default=20, help="neighbours (default 20, DINO's k-NN evaluation)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature T (default 0.07)")
    p.add_argument("--standardize", action="store_true",
                   help="z-score the features with the training part's mean and std before the cosine similarity (our "
                        "option: removes the direction all cases share)")
    p.set_defaults(func=run_probe, method="knn")

    p = sub.add_parser("linear-probe", help="one linear layer on the frozen volume vectors (the benchmark's main protocol)",
                       description="One linear layer on the mean-pooled volume vectors, binary cross-entropy (cross-entropy "
                       "for a multi-class column), Adam, learning rate 0.005, batch 1024, 50 epochs (section 3.1).")
    _add_common_probe(p, "cls")
    p.add_argument("--lr", type=float, default=0.005, help="learning rate (default 0.005, section 3.1)")
    p.add_argument("--batch-size", type=int, default=1024, help="batch size (default 1024, section 3.1)")
    p.add_argument("--epochs", type=int, default=50, help="epochs (default 50, section 3.1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay (default 0)")
    p.add_argument("--standardize", action="store_true",
                   help="z-score the features with the training part's mean and std first (our option; section 3.1 "
                        "trains on the raw features)")
    p.set_defaults(func=run_probe, method="linear-probe")

    p = sub.add_parser("abmil", help="attention-based multiple-instance learning on bags of slice features",
                       description="ABMIL (Ilse et al. 2018; section 3.1, equations 1-2): each volume is a bag of its "
                       "slice embeddings; a learnable linear projection, gated attention pooling and a linear head are "
                       "trained with bag-level (binary) cross-entropy; the encoder stays frozen.")
    _add_common_probe(p, "patch")
    p.add_argument("--attention", default="gated", choices=["gated", "plain"],
                   help="gated: w^T(tanh(V h) * sigmoid(U h)) as the paper's equation 2; plain: w^T tanh(V h) (default gated)")
    p.add_argument("--proj-dim", type=int, default=128, help="width of the projection (default 128)")
    p.add_argument("--attn-dim", type=int, default=128, help="width of the attention network (default 128)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default 2e-4, CLAM's)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="Adam weight decay (default 1e-5, CLAM's)")
    p.add_argument("--epochs", type=int, default=20, help="epochs, one bag per step (default 20)")
    p.set_defaults(func=run_probe, method="abmil")


def _extractor(args):
    from pathlib import Path

    import torch

    from ..errors import DinomedError
    from ..features import FeatureExtractor

    if args.arch and not args.random_init:
        raise DinomedError(f"--arch {args.arch} builds a randomly initialised backbone; add --random-init to confirm "
                           "(or load weights with --backbone CKPT / --model MODEL_DIR)")
    if args.random_init and not args.arch:
        raise DinomedError("--random-init goes with --arch NAME (e.g. --arch vit_tiny)")
    modalities = ["CT", "PET"] if args.pet_glob else [args.modality]
    if args.model:
        extractor = FeatureExtractor.from_model_folder(args.model, None if args.pet_glob else args.modality)
    elif args.backbone:
        extractor = FeatureExtractor.from_checkpoint(args.backbone, modalities)
    else:
        from ..backbones import create_backbone

        torch.manual_seed(args.seed)
        backbone = create_backbone(args.arch, in_chans=1).eval()
        extractor = FeatureExtractor.from_backbone(backbone, modalities, source={"kind": "random", "arch": backbone.dinomed_arch,
                                                                                 "seed": args.seed})
    if args.window is not None:
        if len(extractor.modalities) != 1:
            raise DinomedError("--window sets one intensity window; the encoder reads several modalities "
                               f"{extractor.modalities}")
        for stream in extractor.streams:
            stream.channels = [{**spec, "clip": list(args.window), "scale": "minmax_to_unit"} for spec in stream.channels]
    if args.model:
        extractor.source.setdefault("path", str(Path(args.model).resolve()))
    return extractor


def run_extract(args) -> int:
    import time

    from ..errors import DinomedError
    from ..events import EventWriter
    from ..features import default_cache_dir
    from ..classify import extract_feature_set, find_case_images, read_labels_table

    events = EventWriter(enabled=args.events)
    if args.batch_size < 1:
        raise DinomedError(f"--batch-size must be at least 1, found {args.batch_size}")
    if args.resize is not None and args.resize < 16:
        raise DinomedError(f"--resize must be at least 16 pixels (one patch), found {args.resize}")
    extractor = _extractor(args)
    needed = extractor.modalities
    main_modality = "CT" if "CT" in needed else needed[0]
    found = {main_modality: find_case_images(args.images, args.glob, args.case_regex)}
    if len(needed) > 1:
        if not args.pet_glob:
            raise DinomedError(f"the encoder reads {needed}; name the PET files with --pet-glob (e.g. '*_0001.nii.gz') "
                               "and the CT files with --glob")
        found["PET"] = find_case_images(args.images, args.pet_glob, args.case_regex)
    cases = sorted(found[main_modality])
    if args.labels:
        table = read_labels_table(args.labels, case_column=args.case_column)
        lacking = [c for c in table.case_ids if c not in found[main_modality]]
        if lacking:
            raise DinomedError(f"{args.labels}: {len(lacking)} case(s) have no image in {args.images} matching "
                               f"{args.glob!r}: {', '.join(repr(c) for c in lacking[:5])}"
                               f"{' …' if len(lacking) > 5 else ''} (images found for e.g. {', '.join(repr(c) for c in cases[:3])})")
        cases = list(table.case_ids)
    for modality in needed[1:]:
        lacking = [c for c in cases if c not in found[modality]]
        if lacking:
            raise DinomedError(f"{args.images}: no {modality} image for case(s) {', '.join(repr(c) for c in lacking[:5])} "
                               f"(matching {args.pet_glob!r})")
    case_files = {c: {m: found[m][c] for m in needed} for c in cases}
    cache_dir = None if args.no_cache else (args.cache or default_cache_dir(next(iter(case_files[cases[0]].values()))))
    events.log(f"classify extract: {len(cases)} case(s), encoder {extractor.source.get('kind')} "
               f"{extractor.source.get('arch') or extractor.source.get('name') or ''}, block {extractor.resolved_layer(args.layer)}, "
               f"modalities {needed}")
    start = time.perf_counter()
    fs = extract_feature_set(case_files, extractor, layer=args.layer, resize=args.resize, batch_size=args.batch_size,
                             device=args.device, cache_dir=cache_dir, events=events,
                             source_meta={"images": str(__import__("pathlib").Path(args.images).resolve()), "glob": args.glob})
    path = fs.save(args.out)
    slices = int(fs.offsets[-1])
    events.log(f"{len(fs)} case(s), {slices} slice(s), {fs.cls.shape[1]} channels, {time.perf_counter() - start:.1f} s")
    events.artifact("features", str(path))
    events.done(cases=len(fs), slices=slices)
    return 0


def run_probe(args) -> int:
    import sys

    from ..errors import DinomedError
    from ..events import EventWriter
    from ..classify import FeatureSet, align_cases, make_folds, read_labels_table, run_classifier, summary_text, write_results

    events = EventWriter(enabled=args.events)
    fs = FeatureSet.load(args.features)
    table = read_labels_table(args.labels, case_column=args.case_column, patient_column=args.patient_column,
                              label_columns=args.label_columns, task=args.task)
    table = align_cases(table, fs.case_ids, args.features, allow_unlabelled=args.allow_unlabelled)
    folds_by_seed = {}
    for seed in args.seeds:
        folds_by_seed[seed] = make_folds(table, args.split, seed=seed, folds=args.folds, val_fraction=args.val_fraction,
                                         test_fraction=args.test_fraction)
    if args.method == "knn":
        params = {"k": args.k, "temperature": args.temperature, "standardize": args.standardize}
    elif args.method == "linear-probe":
        params = {"lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs, "weight_decay": args.weight_decay,
                  "standardize": args.standardize}
    else:
        if args.proj_dim < 1 or args.attn_dim < 1:
            raise DinomedError(f"--proj-dim and --attn-dim must be positive, found {args.proj_dim}, {args.attn_dim}")
        params = {"attention": args.attention, "proj_dim": args.proj_dim, "attn_dim": args.attn_dim, "lr": args.lr,
                  "weight_decay": args.weight_decay, "epochs": args.epochs}
    n_runs = sum(len(f) for f in folds_by_seed.values())
    events.log(f"classify {args.method}: {len(table.case_ids)} case(s), {table.task} {table.outputs}, "
               f"{n_runs} run(s), token {args.token}, block {fs.meta.get('layer')}")
    res = run_classifier(args.method, fs, table, folds_by_seed, args.token, params, threshold=args.threshold,
                         device=args.device, events=events)
    paths = write_results(res, args.out, fs, table, args.features)
    for kind, path in paths.items():
        events.artifact(kind.replace("_", "-"), str(path))
    text = summary_text(res, f"dinomed classify {args.method}")
    if args.events:
        events.log(text)
    else:
        print(text, file=sys.stdout)
    mean = next(r for r in res.summary if r["label"] == "mean")
    events.done(auc=mean["auc"], acc=mean["acc"], precision=mean["precision"], recall=mean["recall"])
    return 0
