"""DINOv3 pretraining throughput: training images per second for ViT-tiny and ViT-S on this machine.

One training step is the whole stage-1 step of ``dinomed pretrain``: teacher forward on 2 global crops,
Sinkhorn-Knopp, student forward/backward on 2 masked global + N local crops (DINO, iBOT, KoLeo losses),
gradient clipping, AdamW and the EMA teacher update. Batches come from the real data pipeline (multi-crop
slices of synthetic CT phantoms) and are built before timing, so the figure is the model's step rate, not the
loader's. Reported: the median over ``--steps`` timed steps after ``--warmup`` steps, as images (slices) per
second = batch size / step time.

    python benchmarks/pretrain.py                     # ViT-tiny (tiny_test crops) and ViT-S (224/96 crops, 8 local)
    python benchmarks/pretrain.py --device cuda --batch 32
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
import torch

from dinomed.pretrain import load_config
from dinomed.pretrain.crops import MultiCropAugmentation, MultiCropConfig
from dinomed.pretrain.data import MultiCropCollator, MultiCropSliceDataset, SliceSource, scan_volume_folder
from dinomed.pretrain.train import build_meta_arch, param_groups
from dinomed.synthetic import make_phantom

SETUPS = {
    # name: (config, overrides)
    "vit_tiny": ("tiny_test", []),
    "vit_small": ("ct_vits_stage1", ["student.drop_path_rate=0.0"]),
}


def bench(name: str, folder: Path, batch: int, steps: int, warmup: int, device: str) -> dict:
    config, overrides = SETUPS[name]
    cfg = load_config(config, overrides + [f"train.batch_size_per_gpu={batch}", f"train.device={device}"])
    crops = MultiCropConfig.from_config(cfg["crops"])
    source = SliceSource(scan_volume_folder(folder), "CT")
    dataset = MultiCropSliceDataset(source, MultiCropAugmentation(crops), seed=0, global_batch=batch)
    collate = MultiCropCollator(cfg["ibot"]["mask_ratio_min_max"], cfg["ibot"]["mask_sample_probability"], 0)
    batches = [collate([dataset[s * batch + i] for i in range(batch)]) for s in range(warmup + steps)]
    meta = build_meta_arch(cfg).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(meta.student, cfg))
    times = []
    for k, b in enumerate(batches):
        tensors = {key: v.to(device) for key, v in b.items() if isinstance(v, torch.Tensor)}
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        meta.forward_backward(tensors, teacher_temp=0.04)
        for part in ("backbone", "dino_head", "ibot_head"):
            torch.nn.utils.clip_grad_norm_(getattr(meta.student, part).parameters(), 3.0)
        optimizer.step()
        meta.update_teacher(0.992)
        if device == "cuda":
            torch.cuda.synchronize()
        if k >= warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"arch": name, "global": crops.global_crops_size, "local": f"{crops.local_crops_number}x{crops.local_crops_size}",
            "prototypes": cfg["dino"]["head_n_prototypes"], "batch": batch, "step_s": step, "images_per_s": batch / step}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 8 tiny, 2 ViT-S)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for seed in range(2):
            sitk.WriteImage(make_phantom(seed, shape=(16, 256, 256)).ct, str(folder / f"ct_{seed}.nii.gz"))
        print(f"device: {args.device} ({torch.get_num_threads()} torch threads); torch {torch.__version__}")
        print(f"{'arch':10} {'global':>6} {'local':>7} {'protos':>7} {'batch':>5} {'step s':>8} {'images/s':>9}")
        for name in args.arch:
            batch = args.batch or (8 if name == "vit_tiny" else 2)
            r = bench(name, folder, batch, args.steps, args.warmup, args.device)
            print(f"{r['arch']:10} {r['global']:>6} {r['local']:>7} {r['prototypes']:>7} {r['batch']:>5} "
                  f"{r['step_s']:>8.3f} {r['images_per_s']:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
