"""Whole-body PET/CT inference benchmark: ``dinomed segment`` with a MedDINOv3 ViT beside an nnU-Net-sized MONAI
3D U-Net, on one synthetic whole-body-size case (CT 512 x 512 x 300, PET on its own grid).

For each model it reports wall seconds per volume, slices per second, peak resident memory of the process that
ran it (each measurement in a fresh child process, so peaks do not mix), and the achieved GFLOP/s (the model's
FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode``) as a fraction of the fp32 ``torch.matmul``
GFLOP/s measured on the same machine in the same run. Medians over ``--repeats`` runs.

- ViT: the real ``dinomed segment`` pipeline (``dinomed.inference.segment.segment_files``: read CT and PET,
  resample the PET, normalise, slice batches through the model, post-process, write label map + lesion table),
  with a random-weight MedDINOv3 model folder (speed does not depend on the weights).
- U-Net: ``monai.networks.nets.DynUNet`` configured as nnU-Net's 3d_fullres plan for a large CT (6 stages,
  filters 32-64-128-256-320-320, 3x3x3 kernels, strides 1-2-2-2-2-2, instance norm, leaky ReLU, no deep
  supervision at inference), ``sliding_window_inference`` with 128^3 patches, overlap 0.5 and Gaussian
  blending (nnU-Net's defaults), on the same normalised volume, on the CT grid (nnU-Net would first resample
  to its plan's spacing; not done here).

On a small CPU machine the full volume takes too long: ``--slices N`` runs the ViT on the central N slices and
extrapolates linearly to the whole volume, and ``--unet-crop Z Y X`` runs the U-Net on a central crop and
extrapolates by the number of sliding windows; the printout says when a figure is extrapolated. Peak memory is
then that of the subset run, not of the whole volume.

    python benchmarks/inference.py --arch vit_small --slices 8 --unet-crop 128 192 192 --repeats 3
    python benchmarks/inference.py --arch vit_small --device cuda        # the whole volume on a GPU
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

NUM_CLASSES = 10  # background + the 9 labels of the synthetic phantoms
NNUNET_FILTERS = [32, 64, 128, 256, 320, 320]
NNUNET_STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
NNUNET_PATCH = (128, 128, 128)


# ---------------------------------------------------------------------------------------------------------
# the case and the model folder (cached)


def prepare_case(cache: Path, shape: tuple[int, int, int], seed: int) -> dict:
    """The synthetic whole-body-size PET/CT case, generated once and kept under ``cache``."""
    import SimpleITK as sitk

    folder = cache / f"case_{seed}_{'x'.join(map(str, shape))}"
    ct, pet = folder / "ct.nii", folder / "pet.nii"
    if not (ct.is_file() and pet.is_file()):
        from dinomed.synthetic import make_phantom

        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        phantom = make_phantom(seed, shape=shape, n_lesions=8)
        sitk.WriteImage(phantom.pet, str(pet))
        sitk.WriteImage(phantom.ct, str(ct))
        print(f"generated the case in {time.perf_counter() - t:.1f} s -> {folder}", file=sys.stderr)
    return {"ct": ct, "pet": pet, "folder": folder}


def central_slices(ct_path: Path, n: int) -> Path:
    """A copy of the CT holding only its central ``n`` slices (geometry kept: the origin moves with the crop)."""
    import SimpleITK as sitk

    out = ct_path.with_name(f"ct_central{n}.nii")
    if not out.is_file():
        ct = sitk.ReadImage(str(ct_path))
        depth = ct.GetSize()[2]
        start = max(0, (depth - n) // 2)
        sitk.WriteImage(ct[:, :, start:start + n], str(out))
    return out


def prepare_model(cache: Path, arch: str, batch_size: int) -> Path:
    folder = cache / f"model_meddinov3_{arch}_b{batch_size}"
    if not (folder / "model.json").is_file():
        import torch

        from dinomed.models import build_model, model_json_template, save_model_folder
        from dinomed.synthetic import label_entries

        torch.manual_seed(0)
        model = build_model({"name": "meddinov3", "backbone": arch, "in_chans": 2, "num_classes": NUM_CLASSES})
        model_json = model_json_template(model, name=f"bench-{arch}", labels=label_entries(),
                                         inference={"batch_size": batch_size, "min_component_ml": {"lesion": 0.1}})
        save_model_folder(model, model_json, folder)
    return folder


def build_dynunet():
    from monai.networks.nets import DynUNet

    return DynUNet(
        spatial_dims=3, in_channels=2, out_channels=NUM_CLASSES, kernel_size=[[3, 3, 3]] * 6, strides=NNUNET_STRIDES,
        upsample_kernel_size=NNUNET_STRIDES[1:], filters=NNUNET_FILTERS, norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}), deep_supervision=False, res_block=False,
    )


# ---------------------------------------------------------------------------------------------------------
# measurements, each in a fresh child process


def _peak_rss_mb() -> float:
    """Peak resident memory of this process image. Linux: VmHWM of /proc/self/status (``ru_maxrss`` would carry
    over the parent's peak through fork + exec); elsewhere ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # macOS: bytes; Linux: kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _child_vit(queue, model_dir, ct, pet, device, threads):
    import torch

    torch.set_num_threads(threads)
    from dinomed.events import EventWriter
    from dinomed.inference.segment import segment_files

    marks = []

    class Timing(EventWriter):  # records when each slice batch finished; prints nothing
        def progress(self, done, total, message=""):
            marks.append((time.perf_counter(), done))

    out = Path(tempfile.mkdtemp(prefix="dinomed-bench-"))
    t = time.perf_counter()
    result = segment_files(model_dir, ct, out / "seg.nii.gz", pet_path=pet, stats_path=out / "lesions.csv",
                           device=device, events=Timing(enabled=False, quiet=True))
    wall = time.perf_counter() - t
    # steady state: from the end of the first batch to the end of the last (excludes the first batch's warm-up)
    (t0, d0), (t1, d1) = marks[0], marks[-1]
    steady = (d1 - d0) / (t1 - t0) if d1 > d0 else d1 / wall
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if result.device.startswith("cuda") else None
    queue.put({"wall_s": wall, "slices": d1, "steady_slices_per_s": steady, "peak_rss_mb": _peak_rss_mb(),
               "cuda_peak_mb": cuda_peak, "precision": result.precision, "device": result.device})


def _child_unet(queue, ct, pet, device, threads, crop, overlap, sw_batch):
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(threads)
    from dinomed.inference.segment import autocast_dtype, model_channels, pet_on_ct_grid, read_ct, read_pet_suv, resolve_device

    dev = resolve_device(device)
    t = time.perf_counter()
    ct_img = read_ct(ct)
    if crop:
        size = ct_img.GetSize()  # x, y, z
        cz, cy, cx = crop
        start = [max(0, (s - c) // 2) for s, c in zip(size, (cx, cy, cz))]
        ct_img = ct_img[start[0]:start[0] + cx, start[1]:start[1] + cy, start[2]:start[2] + cz]
    pet_img = pet_on_ct_grid(read_pet_suv(pet), ct_img)
    channels = model_channels({"inputs": [{"modality": "CT"}, {"modality": "PET"}]}, ct_img, pet_img)
    torch.manual_seed(0)
    net = build_dynunet().to(dev).eval()
    dtype = autocast_dtype(dev)
    x = torch.from_numpy(channels[None]).to(dev)
    t_model = time.perf_counter()
    with torch.inference_mode(), (torch.autocast(dev.type, dtype=dtype) if dtype else _null()):
        logits = sliding_window_inference(x, NNUNET_PATCH, sw_batch, net, overlap=overlap, mode="gaussian")
        labels = logits.argmax(dim=1)[0].to("cpu", torch.uint8).numpy()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    model_s = time.perf_counter() - t_model
    out = sitk.GetImageFromArray(labels.astype(np.uint8))
    out.CopyInformation(ct_img)
    wall = time.perf_counter() - t
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    queue.put({"wall_s": wall, "model_s": model_s, "slices": int(channels.shape[1]), "shape": list(channels.shape[1:]),
               "windows": count_windows(channels.shape[1:], NNUNET_PATCH, overlap), "peak_rss_mb": _peak_rss_mb(),
               "cuda_peak_mb": cuda_peak, "precision": "fp32" if dtype is None else str(dtype).replace("torch.", "")})


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_child(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"benchmark child {target.__name__} failed with exit code {proc.exitcode}")
    return result


# ---------------------------------------------------------------------------------------------------------
# FLOPs and the machine's matmul throughput


def count_windows(shape, roi, overlap) -> int:
    """Sliding windows MONAI runs over ``shape`` (z, y, x) with ``roi`` and ``overlap`` (its scan interval rule)."""
    n = 1
    for size, r in zip(shape, roi):
        size = max(size, r)
        interval = max(int(r * (1 - overlap)), 1)
        n *= 1 if size <= r else math.ceil((size - r) / interval) + 1
    return n


def flops_of(model, example) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(example)
    return float(counter.get_total_flops())


def matmul_gflops(device, n: int, repeats: int = 5) -> float:
    """Median fp32 GFLOP/s of an n x n x n ``torch.matmul`` on ``device`` (2 n^3 FLOPs each)."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_small", choices=["vit_small", "vit_tiny", "vit_base"])
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--slices", type=int, default=None, help="run the ViT on the central N slices and extrapolate")
    parser.add_argument("--unet-crop", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="run the U-Net on a central crop and extrapolate by the window count")
    parser.add_argument("--no-unet", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unet-repeats", type=int, default=None, help="default: --repeats")
    parser.add_argument("--batch-size", type=int, default=8, help="ViT slices per batch")
    parser.add_argument("--sw-batch", type=int, default=1, help="U-Net windows per batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--matmul-n", type=int, default=None, help="matmul size (default 2048 on CPU, 8192 on GPU)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "dinomed-bench"))
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    from dinomed.inference.segment import resolve_device
    from dinomed.models import load_model_folder

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cache = Path(args.cache)
    depth, height, width = args.shape
    case = prepare_case(cache, tuple(args.shape), args.seed)
    model_dir = prepare_model(cache, args.arch, args.batch_size)
    vit_ct = case["ct"]
    n_slices = depth
    if args.slices and args.slices < depth:
        vit_ct, n_slices = central_slices(case["ct"], args.slices), args.slices

    matmul_n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    peak = matmul_gflops(device, matmul_n)
    print(f"fp32 matmul {matmul_n}^3 on {device}: {peak:.1f} GFLOP/s", file=sys.stderr)

    model, _ = load_model_folder(model_dir)
    vit_flops = flops_of(model, torch.zeros(1, 2, height, width))  # per slice
    del model
    rows = []

    runs = []
    for i in range(args.repeats):
        runs.append(run_child(_child_vit, str(model_dir), str(vit_ct), str(case["pet"]), args.device, args.threads))
        print(f"vit run {i + 1}: {runs[-1]}", file=sys.stderr)
    scale = depth / n_slices
    wall = statistics.median(r["wall_s"] for r in runs) * scale
    sps = statistics.median(r["steady_slices_per_s"] for r in runs)
    rows.append({
        "model": f"MedDINOv3 {args.arch} (2D, batch {args.batch_size})", "device": f"{runs[0]['device']} {runs[0]['precision']}",
        "ran": f"{n_slices} of {depth} slices" + (", extrapolated" if scale > 1 else ""),
        "wall_s": wall, "model_s": depth / sps, "slices_per_s": sps, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "cuda_peak_mb": runs[0]["cuda_peak_mb"], "gflop_per_slice": vit_flops / 1e9,
        "gflops": vit_flops * sps / 1e9, "fraction": vit_flops * sps / 1e9 / peak,
    })

    if not args.no_unet:
        net = build_dynunet().eval()
        unet_flops = flops_of(net, torch.zeros(1, 2, *NNUNET_PATCH))  # per window
        del net
        full_windows = count_windows((depth, height, width), NNUNET_PATCH, 0.5)
        uruns = []
        for i in range(args.unet_repeats or args.repeats):
            uruns.append(run_child(_child_unet, str(case["ct"]), str(case["pet"]), args.device, args.threads,
                                   args.unet_crop, 0.5, args.sw_batch))
            print(f"unet run {i + 1}: {uruns[-1]}", file=sys.stderr)
        windows = uruns[0]["windows"]
        model_s = statistics.median(r["model_s"] for r in uruns)
        wall_run = statistics.median(r["wall_s"] for r in uruns)
        wscale = full_windows / windows
        window_rate = windows / model_s
        rows.append({
            "model": "DynUNet nnU-Net 3d_fullres-like (3D, 128^3, overlap 0.5)",
            "device": f"{device} {uruns[0]['precision']}",
            "ran": (f"crop {'x'.join(map(str, uruns[0]['shape']))}: {windows} of {full_windows} windows, extrapolated"
                    if wscale > 1 else f"{windows} windows"),
            "wall_s": (wall_run - model_s) * (depth * height * width) / math.prod(uruns[0]["shape"]) + model_s * wscale,
            "model_s": model_s * wscale,
            "slices_per_s": depth / (model_s * wscale), "peak_rss_mb": max(r["peak_rss_mb"] for r in uruns),
            "cuda_peak_mb": uruns[0]["cuda_peak_mb"], "gflop_per_slice": unet_flops * full_windows / depth / 1e9,
            "gflops": unet_flops * window_rate / 1e9, "fraction": unet_flops * window_rate / 1e9 / peak,
        })

    cpu = platform.processor() or platform.machine()
    print(f"\nCase: synthetic PET/CT, CT {width}x{height}x{depth} (x, y, z), PET on its own grid; "
          f"device {device}, {args.threads} CPU thread(s) ({cpu}), torch {torch.__version__}; "
          f"fp32 matmul {matmul_n}^3: {peak:.1f} GFLOP/s; median of {args.repeats} run(s).\n")
    print("| model | device | ran | wall s / volume | model s / volume | slices / s | peak RSS (MB) | GPU peak (MB) | GFLOP / slice | achieved GFLOP/s | of fp32 matmul |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        gpu = f"{r['cuda_peak_mb']:.0f}" if r["cuda_peak_mb"] is not None else "-"
        print(f"| {r['model']} | {r['device']} | {r['ran']} | {r['wall_s']:.1f} | {r['model_s']:.1f} | {r['slices_per_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {gpu} | {r['gflop_per_slice']:.1f} | {r['gflops']:.1f} | {100 * r['fraction']:.0f}% |")
    print("\nwall: the whole job (read, resample, normalise, model, post-process, lesion statistics and writing for the "
          "ViT; read, resample, normalise, sliding windows, argmax for the U-Net); model: the network alone (ViT: "
          "slices / steady-state rate after the first batch). Peak RSS: VmHWM of the child process that ran it.")
    if any("extrapolated" in r["ran"] for r in rows):
        print("\nExtrapolated rows: wall time scaled linearly from the subset to the whole volume (ViT: by slices; "
              "U-Net: model time by windows, the rest by voxels); peak RSS is that of the subset run.")
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_gflops": peak, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
