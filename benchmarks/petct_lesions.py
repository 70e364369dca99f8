"""Lesion segmentation on synthetic PET/CT phantoms with the same CPU-time budget per model: Dual-DINOv3 (PET+CT),
PET-only, CT-only, early fusion (the Dual-DINOv3 paper's comparison) and a MONAI U-Net trained from scratch.

    python benchmarks/petct_lesions.py                     # 100 CPU seconds of training per model, 1 thread
    python benchmarks/petct_lesions.py --budget 60 --train-cases 8 --test-cases 4

Every model is trained by the same loop (``dinomed.finetune``: class-balanced 2D patches, Dice + CE, AdamW,
warm-up + cosine) on the same training phantoms and scored on the same held-out phantoms
(``dinomed.evaluate``: lesion Dice, HD95, precision, recall, whole-volume inference). A short
calibration run (not counted) measures each model's step time so that its cosine schedule ends within the
budget; ``train.max_seconds`` is the hard cap, counted in CPU seconds of the process (``train.clock=process``)
so that a machine shared with other jobs gives every model the same compute. The ViTs are DINOv3 ``vit_tiny`` (width 64, depth 4) with
random initialisation: no pretrained PET or CT checkpoint is used, so this measures the architectures, not the
pretraining that the paper credits for much of its gain. The table goes to stdout and, with the per-model
details, to ``OUT/results.json`` and ``OUT/results.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from dinomed.errors import DinomedError
from dinomed.finetune import finetune, load_config
from dinomed.evaluate import evaluate_model
from dinomed.models.registry import MODEL_REGISTRY, register_model
from dinomed.synthetic import dataset_labels
from dinomed.synthetic.writers import write_nnunet_dataset

VIT = ["model.backbone=vit_tiny", "model.decoder_channels=[32,32,16,16]", "model.drop_path_rate=0.0"]
MODELS = {
    "Dual-DINOv3 (PET+CT)": ("dual_petct", VIT + ["model.variant=dual"]),
    "PET-only": ("dual_petct", VIT + ["model.variant=pet_only"]),
    "CT-only": ("dual_petct", VIT + ["model.variant=ct_only"]),
    "Early fusion": ("dual_petct", VIT + ["model.variant=early_fusion"]),
    "MONAI U-Net (scratch)": (None, ["model.name=monai_basic_unet_2d"]),
}


def register_unet() -> None:
    """MONAI's BasicUNet (2D, CT+PET channels) as a registry entry, so that the same loop and evaluation run it."""
    if "monai_basic_unet_2d" in MODEL_REGISTRY:
        return

    from monai.networks.nets import BasicUNet

    @register_model("monai_basic_unet_2d", spatial_dims=2, summary="MONAI BasicUNet (2D), trained from scratch")
    class MonaiBasicUNet2D(BasicUNet):
        def __init__(self, *, num_classes: int, in_chans: int = 2, features: tuple = (16, 16, 32, 64, 128, 16)):
            super().__init__(spatial_dims=2, in_channels=in_chans, out_channels=num_classes, features=tuple(features))


def common_overrides(args, held_out: list[str]) -> list[str]:
    others = [n for n in dataset_labels() if n not in ("background", "lesion")]
    return [
        "labels=[lesion]", f"background_labels=[{', '.join(others)}]",
        f"data.patch_size=[{args.patch},{args.patch}]", f"data.val_cases=[{', '.join(held_out)}]",
        "data.pos=3.0", "data.neg=1.0", "optim.lr=1e-3", "optim.backbone_lr_scale=1.0", "optim.warmup_steps=20",
        f"train.batch_size={args.batch}", f"train.seed={args.seed}", "train.log_every=10", "train.clock=process",
        "inference={batch_size: 16, min_component_ml: {}}",
    ]


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    register_unet()
    work = Path(args.out)
    data = work / "data"
    train_seeds = list(range(args.first_seed, args.first_seed + args.train_cases))
    test_seeds = list(range(args.first_seed + 1000, args.first_seed + 1000 + args.test_cases))
    if not (data / "dataset.json").is_file():
        started = time.perf_counter()
        write_nnunet_dataset(data, train_seeds + test_seeds, shape=tuple(args.shape), n_lesions=args.lesions)
        print(f"wrote {len(train_seeds) + len(test_seeds)} phantoms {tuple(args.shape)} in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    held_out = [f"case_{s:04d}" for s in test_seeds]
    base = common_overrides(args, held_out)
    rows = []
    for label, (recipe, extra) in MODELS.items():
        if args.only and not any(o.lower() in label.lower() for o in args.only):
            continue
        slug = label.split(" ")[0].lower().replace("-", "_")
        calib_cfg = load_config(recipe, [*base, *extra, "train.max_steps=12", "train.val_every=100000",
                                         "train.log_every=1", "data.val_cases=[" + held_out[0] + "]"])
        with tempfile.TemporaryDirectory() as tmp:
            calib = finetune(calib_cfg, data, Path(tmp) / "calib")
        elapsed = {h["step"]: h["elapsed"] for h in calib.history if h["phase"] == "train"}
        step_s = (elapsed[12] - elapsed[2]) / 10
        steps = max(20, int(args.budget / step_s * 0.95))
        cfg = load_config(recipe, [*base, *extra, f"train.max_steps={steps}", f"train.val_every={steps}",
                                   f"train.max_seconds={args.budget}"])
        out = work / slug
        if out.exists():
            import shutil

            shutil.rmtree(out)
        started = time.perf_counter()
        result = finetune(cfg, data, out)
        train_s = max(h["elapsed"] for h in result.history if h["phase"] == "train")
        report = evaluate_model(out, data, work / f"{slug}_metrics.csv", cases="heldout")
        lesion = report["per_class"]["lesion"]
        from dinomed.models import load_model_folder

        model, _ = load_model_folder(out)
        row = {"model": label, "dice": lesion["dice"], "hd95": lesion["hd95"], "precision": lesion["precision"],
               "recall": lesion["recall"], "params": sum(p.numel() for p in model.parameters()),
               "steps": result.step, "planned_steps": steps, "train_s": train_s,
               "wall_s": round(time.perf_counter() - started, 1), "step_s": step_s,
               "per_case_dice": {c: v["lesion"]["dice"] for c, v in report["cases"].items()}}
        rows.append(row)
        print(f"{label}: Dice {fmt(row['dice'])}, HD95 {fmt(row['hd95'])} mm, {row['steps']} steps in {train_s:.0f} s",
              file=sys.stderr, flush=True)
    return rows


def fmt(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | lesion Dice | HD95 (mm) | precision | recall | params | steps | train CPU time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {fmt(r['dice'])} | {fmt(r['hd95'], 1)} | {fmt(r['precision'])} | "
                     f"{fmt(r['recall'])} | {r['params']:,} | {r['steps']} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "dinomed_petct_lesions"))
    p.add_argument("--budget", type=float, default=100.0, help="training CPU seconds per model (default 100)")
    p.add_argument("--train-cases", type=int, default=12)
    p.add_argument("--test-cases", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=[32, 96, 96], metavar=("Z", "Y", "X"))
    p.add_argument("--lesions", type=int, default=8, help="lesions per phantom")
    p.add_argument("--patch", type=int, default=96, help="2D patch side (multiple of 16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--first-seed", type=int, default=100, help="phantom seed of the first training case")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--only", nargs="*", help="run only the models whose name contains one of these")
    args = p.parse_args(argv)
    try:
        rows = run(args)
    except DinomedError as exc:
        print(f"petct_lesions: error: {exc}", file=sys.stderr)
        return 2
    md = table(rows)
    header = (f"{args.train_cases} training / {args.test_cases} held-out phantoms {tuple(args.shape)}, {args.lesions} "
              f"lesions each; {args.budget:.0f} CPU seconds of training per model on {args.threads} CPU thread(s) "
              f"({platform.processor() or platform.machine()}); lesion metrics on the held-out phantoms")
    print(header)
    print(md)
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (out / "results.md").write_text(header + "\n\n" + md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
