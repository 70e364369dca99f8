"""Frozen-feature classification on labelled phantoms: a random-init ViT-tiny vs one pretrained by `dinomed pretrain`
(vs a real DINOv3 checkpoint when a local file is given), by k-NN and linear probe (`dinomed classify`).

The task (``dinomed phantom --cases N --lesion-free 0.5 --classification-csv``): CT slabs of 16×64×64 voxels, five
binary labels of what each phantom holds (lesion, liver_lesion, contrast, lung_in_view, liver_in_view). The
pretraining data are other phantoms (different seeds, 32×64×64, no labels). Each backbone's slice embeddings
(last block) are extracted once; each probe runs 5-fold cross-validation by patient for every seed; the table
gives the test AUC per label and the mean AUC / ACC over labels, means over seeds × folds.

Two probe settings per backbone and method:
- ``paper``: the benchmark's protocol as written (section 3.1): CLS token, raw features; linear probe BCE, lr
  0.005, batch 1024, 50 epochs; k-NN k=20, T=0.07.
- ``patch+z``: our options: the patch-token mean (``--token patch``) and features z-scored with the training
  part's statistics (``--standardize``).

    python benchmarks/classify.py                                   # makes data, pretrains 300 steps, probes
    python benchmarks/classify.py --checkpoint RUN/teacher_checkpoint.pth --dinov3 /weights/dinov3_vits16.pth
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dinomed.backbones import create_backbone, load_backbone
from dinomed.classify import extract_feature_set, find_case_images, make_folds, read_labels_table, run_classifier
from dinomed.features import FeatureExtractor
from dinomed.io import write_image
from dinomed.synthetic import make_phantom
from dinomed.synthetic.writers import write_nnunet_dataset

SETTINGS = {"paper": ("cls", False), "patch+z": ("patch", True)}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_data(root: Path, cases: int, pretrain_cases: int) -> tuple[Path, Path]:
    labelled = root / "labelled"
    if not (labelled / "classification.csv").is_file():
        write_nnunet_dataset(labelled, range(1000, 1000 + cases), shape=(16, 64, 64), lesion_free_fraction=0.5,
                             classification_csv=True)
    unlabeled = root / "unlabeled"
    unlabeled.mkdir(parents=True, exist_ok=True)
    for seed in range(5000, 5000 + pretrain_cases):
        path = unlabeled / f"ct_{seed}.nii.gz"
        if not path.is_file():
            write_image(make_phantom(seed, shape=(32, 64, 64)).ct, path)
    return labelled, unlabeled


def pretrain(unlabeled: Path, run: Path, steps: int) -> tuple[Path, float]:
    ckpt = run / "teacher_checkpoint.pth"
    if ckpt.is_file():
        return ckpt, float("nan")
    epoch_length = 50
    epochs = max(1, steps // epoch_length)
    cmd = [sys.executable, "-m", "dinomed", "pretrain", "tiny_test", f"optim.epochs={epochs}",
           f"train.epoch_length={epoch_length}", "checkpointing.period=100000", "--data", str(unlabeled), "--out", str(run)]
    _log("$ " + " ".join(cmd[2:]))
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return ckpt, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--cases", type=int, default=100, help="labelled phantoms (default 100)")
    p.add_argument("--pretrain-cases", type=int, default=24, help="unlabeled phantoms for pretraining (default 24)")
    p.add_argument("--pretrain-steps", type=int, default=300, help="pretraining iterations (default 300)")
    p.add_argument("--checkpoint", default=None, help="a pretrained backbone to use instead of pretraining here")
    p.add_argument("--dinov3", default=None, help="a real DINOv3 backbone checkpoint (local file), e.g. dinov3_vits16_….pth")
    p.add_argument("--seeds", default="0,1,2", help="split/initialisation seeds (default 0,1,2)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dinomed_classify_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    labelled, unlabeled = make_data(root, args.cases, args.pretrain_cases)
    table = read_labels_table(labelled / "classification.csv")
    _log(f"data: {args.cases} labelled, {args.pretrain_cases} unlabeled phantoms in {time.perf_counter() - t0:.0f} s; "
         f"positives per label {dict(zip(table.names, table.y.sum(0).astype(int).tolist()))}")

    backbones = {}
    torch.manual_seed(0)
    backbones["random init (timm default, LayerScale 1e-5)"] = create_backbone("vit_tiny").eval()
    torch.manual_seed(0)
    backbones["random init (pretraining's start, LayerScale 0.1)"] = create_backbone("vit_tiny", init_values=0.1).eval()
    pretrain_seconds = None
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        ckpt, pretrain_seconds = pretrain(unlabeled, root / "pretrain_run", args.pretrain_steps)
        _log(f"pretraining: {pretrain_seconds:.0f} s")
    backbones[f"pretrained by dinomed pretrain ({ckpt.name})"] = load_backbone(ckpt)
    if args.dinov3:
        backbones[f"DINOv3 ({Path(args.dinov3).name})"] = load_backbone(args.dinov3, in_chans=1)

    images = find_case_images(labelled / "imagesTr", "*_0000.nii.gz")
    cases = {c: {"CT": images[c]} for c in table.case_ids}
    folds = {s: make_folds(table, "kfold", seed=s, folds=args.folds) for s in seeds}
    results = []
    for name, backbone in backbones.items():
        start = time.perf_counter()
        extractor = FeatureExtractor.from_backbone(backbone, ["CT"], source={"kind": "benchmark", "name": name})
        fs = extract_feature_set(cases, extractor, device=args.device)
        extract_s = time.perf_counter() - start
        for method in ("knn", "linear-probe"):
            for setting, (token, z) in SETTINGS.items():
                params = {"k": 20, "temperature": 0.07, "standardize": z} if method == "knn" else {"standardize": z}
                res = run_classifier(method, fs, table, folds, token, params, device=args.device)
                aucs = {r["label"]: r["auc"] for r in res.summary}
                row = {"backbone": name, "method": method, "setting": setting, **{f"auc_{k}": v for k, v in aucs.items()},
                       "acc_mean": res.test_mean("acc"), "auc_mean_std": res.summary[-1]["auc_std"],
                       "extract_s": round(extract_s, 1)}
                results.append(row)
                _log(f"{name} | {method} {setting}: mean AUC {aucs['mean']:.3f}")

    labels = table.names
    print(f"\n{args.cases} phantoms (16×64×64 CT), {args.folds}-fold CV by patient × seeds {seeds}; test AUC, mean over "
          f"{args.folds * len(seeds)} runs; total {time.perf_counter() - t0:.0f} s"
          + (f", pretraining {pretrain_seconds:.0f} s" if pretrain_seconds else ""))
    print("| backbone | probe | setting | " + " | ".join(labels) + " | mean AUC (± std) | mean ACC |")
    print("| --- | --- | --- | " + " | ".join("--:" for _ in labels) + " | --: | --: |")
    for r in results:
        print(f"| {r['backbone']} | {r['method']} | {r['setting']} | "
              + " | ".join(f"{r['auc_' + lab]:.3f}" for lab in labels)
              + f" | {r['auc_mean']:.3f} ± {r['auc_mean_std']:.3f} | {r['acc_mean']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": seeds, "folds": args.folds, "cases": args.cases, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
