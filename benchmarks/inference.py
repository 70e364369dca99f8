"""Whole-body PET/CT inference benchmark: ``dinomed segment`` with a MedDINOv3 ViT beside an nnU-Net-sized MONAI
3D U-Net, on one synthetic whole-body-size case (CT 512 x 512 x 300, PET on its own grid), in one run.

It prints, for each model: wall seconds per volume, the model part and the pipeline around it (with its share),
peak resident memory of the process that ran it (each measurement in a fresh child process, so peaks do not mix),
and the achieved GFLOP/s (FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode``) as a fraction of the
fp32 ``torch.matmul`` GFLOP/s measured in the same child just before and just after its run (the CPU is shared:
each run is compared with the rate the machine gave around it; medians over the runs). FLOPs include the CPU's fused
attention, which torch's counter leaves out (:func:`flop_counter`). Then the ratio of the two wall
times, and a table of seconds per stage.

- ViT: the real ``dinomed segment`` pipeline (``dinomed.inference.segment.segment_files``) under
  :func:`dinomed.inference.profile.profiling`, which reads the stage markers of the real code path (read, PET→CT
  resample, normalise, model, argmax, post-process, lesion statistics, write; ``dinomed segment --profile`` prints
  the same), with a random-weight MedDINOv3 model folder (speed does not depend on the weights).
  ``--target-spacing X Y Z`` gives that model a ``preprocessing.target_spacing``.
- U-Net: ``monai.networks.nets.DynUNet`` configured as nnU-Net's 3d_fullres plan for a large CT (6 stages,
  filters 32-64-128-256-320-320, 3x3x3 kernels, strides 1-2-2-2-2-2, instance norm, leaky ReLU, no deep
  supervision at inference), ``sliding_window_inference`` with 128^3 patches, overlap 0.5 and Gaussian
  blending (nnU-Net's defaults), on the same inputs read, resampled and normalised by dinomed's own functions
  (same stage markers), on the CT grid (nnU-Net would first resample to its plan's spacing; not done here).
- The runs are interleaved (ViT, U-Net, ViT, …) so that both see the same load.

On a small CPU machine the full volume takes too long: ``--slices N`` runs the ViT on the central N slices and
scales its network stages to the whole volume, while the other stages come from whole-volume runs of the same
``segment_files`` with a trained model (default: the bundled demo PET/CT model, given the same target spacing), so
that post-processing and lesion statistics see realistic label maps; ``--unet-crop Z Y X`` runs the U-Net on a
central crop and scales by the number of sliding windows. The printout says which figures are scaled.

    python benchmarks/inference.py --arch vit_small --target-spacing 1.5 1.5 1.0 --slices 8 --unet-crop 128 192 192
    python benchmarks/inference.py ... --compile                          # + the ViT compiled (segment --compile)
    python benchmarks/inference.py --arch vit_small --device cuda        # the whole volume on a GPU
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import queue as queue_module
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __name__ in ("__main__", "__mp_main__"):  # this script and its spawned children are processes as `dinomed segment`'s are
    from dinomed._startup import pause_gc_in_heavy_imports

    pause_gc_in_heavy_imports()

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


def prepare_model(cache: Path, arch: str, batch_size: int, target_spacing=None, decoder: str = "patch_decode") -> Path:
    tag = "native" if not target_spacing else "sp" + "x".join(f"{v:g}" for v in target_spacing)
    folder = cache / f"model_meddinov3_{arch}_{decoder}_b{batch_size}_{tag}"
    if not (folder / "model.json").is_file():
        import torch

        from dinomed.models import build_model, model_json_template, save_model_folder
        from dinomed.preprocess import default_spec
        from dinomed.synthetic import label_entries

        torch.manual_seed(0)
        model = build_model({"name": "meddinov3", "backbone": arch, "in_chans": 2, "num_classes": NUM_CLASSES,
                             "decoder": decoder})
        pre = {"target_spacing": list(target_spacing) if target_spacing else None, "input_scale": 1.0,
               "channels": [default_spec("CT"), default_spec("PET")]}
        model_json = model_json_template(model, name=f"bench-{arch}", labels=label_entries(), preprocessing=pre,
                                         inference={"batch_size": batch_size, "min_component_ml": {"lesion": 0.1}})
        save_model_folder(model, model_json, folder)
    return folder


def prepare_pipeline_model(cache: Path, source: Path, target_spacing=None) -> Path:
    """A copy of a trained model folder (default: the bundled demo PET/CT model) with the benchmark's target spacing
    and input scale 1 (the benchmark ViT's model grid; the demo model itself reads a 2x finer grid),
    so that the whole-volume pipeline run resamples, post-processes and measures lesions as the ViT's run would,
    on realistic (trained) label maps rather than the noise of random weights."""
    import shutil

    tag = "native" if not target_spacing else "sp" + "x".join(f"{v:g}" for v in target_spacing)
    folder = cache / f"pipeline_{source.name}_{tag}_scale1"
    if not (folder / "model.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / "model.safetensors", folder / "model.safetensors")
        doc = json.loads((source / "model.json").read_text())
        doc.setdefault("preprocessing", {})["target_spacing"] = list(target_spacing) if target_spacing else None
        doc["preprocessing"]["input_scale"] = 1.0  # the benchmark's ViT's: the same model grid
        (folder / "model.json").write_text(json.dumps(doc, indent=2))
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


def _child_vit(queue, model_dir, ct, pet, device, threads, matmul_n, compile=False):
    """``segment_files`` (what ``dinomed segment`` runs) under the stage profiler, beside a matmul measurement.

    ``compile``: ``segment_files(compile=True)`` (``dinomed segment --compile``); its ``compile`` stage holds the
    compilation and the first batch (compiled, and eager for the check), its ``model`` stage the later batches,
    whose rate is what every later batch costs. Whether TorchInductor's disk cache held anything is reported."""
    import torch

    torch.set_num_threads(threads)
    from dinomed.events import EventWriter
    from dinomed.inference.compiled import inductor_cache_dir
    from dinomed.inference.profile import profiling
    from dinomed.inference.segment import resolve_device, segment_files

    load = os.getloadavg()[0]
    before = matmul_samples(resolve_device(device), matmul_n)
    out = Path(tempfile.mkdtemp(prefix="dinomed-bench-"))
    events = EventWriter(enabled=False, quiet=True)
    messages: list[str] = []
    events.warning = messages.append  # a fallback to eager must show in the benchmark's output
    extra = {}
    if compile:
        cache = inductor_cache_dir()
        extra["inductor_cache_warm"] = cache.is_dir() and any(cache.iterdir())
    with profiling() as profile:
        result = segment_files(model_dir, ct, out / "seg.nii.gz", pet_path=pet, stats_path=out / "lesions.csv",
                               device=device, events=events, compile=compile)
    matmul = bracketing_matmul(before, matmul_samples(resolve_device(device), matmul_n))
    fallback = [m for m in messages if m.startswith("--compile")]
    if fallback:
        raise RuntimeError(f"--compile fell back to eager: {fallback}")
    if compile:
        extra["compile_s"] = profile.as_dict()["stages"].get("compile", 0.0)
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if result.device.startswith("cuda") else None
    queue.put({**profile.as_dict(), "peak_rss_mb": _peak_rss_mb(), "cuda_peak_mb": cuda_peak, **matmul,
               "load": load, "precision": result.precision, "device": result.device,
               "lesions": result.lesion_count, **extra})


def _child_unet(queue, ct, pet, device, threads, crop, overlap, sw_batch, matmul_n):
    """The peer on the same inputs, through dinomed's own readers, resampling and normalisation (the same stage
    markers), then MONAI sliding windows and an argmax."""
    import numpy
    import torch
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(threads)
    from dinomed.inference.profile import profiling, stage
    from dinomed.inference.segment import autocast_dtype, model_channels, pet_on_ct_grid, read_ct, read_pet_suv, resolve_device

    dev = resolve_device(device)
    load = os.getloadavg()[0]
    before = matmul_samples(dev, matmul_n)
    with profiling() as profile:
        ct_img = read_ct(ct)
        if crop:
            size = ct_img.GetSize()  # x, y, z
            cz, cy, cx = crop
            start = [max(0, (s - c) // 2) for s, c in zip(size, (cx, cy, cz))]
            ct_img = ct_img[start[0]:start[0] + cx, start[1]:start[1] + cy, start[2]:start[2] + cz]
        pet_img = pet_on_ct_grid(read_pet_suv(pet), ct_img)
        channels = numpy.stack(model_channels({"inputs": [{"modality": "CT"}, {"modality": "PET"}]}, ct_img, pet_img))
        with stage("load model"):
            torch.manual_seed(0)
            net = build_dynunet().to(dev).eval()
        dtype = autocast_dtype(dev)
        x = torch.from_numpy(channels[None]).to(dev)
        with torch.inference_mode(), (torch.autocast(dev.type, dtype=dtype) if dtype else _null()):
            with stage("model"):
                logits = sliding_window_inference(x, NNUNET_PATCH, sw_batch, net, overlap=overlap, mode="gaussian")
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            with stage("argmax"):
                labels = logits.argmax(dim=1)[0].to("cpu", torch.uint8).numpy()
    matmul = bracketing_matmul(before, matmul_samples(dev, matmul_n))
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    queue.put({**profile.as_dict(), "slices": int(channels.shape[1]), "shape": list(channels.shape[1:]),
               "windows": count_windows(channels.shape[1:], NNUNET_PATCH, overlap), "peak_rss_mb": _peak_rss_mb(),
               "cuda_peak_mb": cuda_peak, **matmul, "load": load,
               "precision": "fp32" if dtype is None else str(dtype).replace("torch.", ""), "labels_voxels": int(labels.size)})


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
    while True:  # a child that dies before reporting (an exception, the OOM killer) must not leave us waiting
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"benchmark child {target.__name__} exited with code {proc.exitcode} "
                                   "without a result (its traceback is above)") from None
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


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter():
    """``FlopCounterMode`` that also counts the CPU's fused attention: torch's table has formulas for the CUDA
    kernels of ``scaled_dot_product_attention`` (flash, efficient, cuDNN) but none for
    ``_scaled_dot_product_flash_attention_for_cpu``, so on a CPU a ViT's attention products (4·B·heads·N²·d per
    block; 6% of ViT-S's FLOPs at 261 tokens) counted as zero and the achieved fraction of matmul came out low."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    custom = {}
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None:
        custom[cpu_attention] = _attention_flops
    return FlopCounterMode(display=False, custom_mapping=custom)


def flops_of(model, example) -> float:
    import torch

    counter = flop_counter()
    with torch.inference_mode(), counter:
        model(example)
    return float(counter.get_total_flops())


def matmul_samples(device, n: int, repeats: int = 5) -> list[float]:
    """fp32 GFLOP/s of ``repeats`` n x n x n ``torch.matmul`` on ``device`` (2 n^3 FLOPs each), after a warm-up."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    rates = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is a warm-up
            rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    return rates


def bracketing_matmul(before: list[float], after: list[float]) -> dict:
    """The matmul rate a run is compared with: the median of the samples taken just before and just after it (the
    rate of this shared CPU drifts during a run of tens of seconds; one side alone followed it less well)."""
    return {"matmul_gflops": statistics.median(before + after), "matmul_before": statistics.median(before),
            "matmul_after": statistics.median(after)}


# ---------------------------------------------------------------------------------------------------------


MODEL_STAGES = ("model", "argmax")  # what scales with the network; every other stage is the pipeline around it


def _median_stages(runs: list[dict]) -> dict:
    names = []
    for r in runs:
        names += [k for k in r["stages"] if k not in names]
    return {k: statistics.median(r["stages"].get(k, 0.0) for r in runs) for k in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_small", choices=["vit_small", "vit_tiny", "vit_base"])
    parser.add_argument("--decoder", default="patch_decode", choices=["patch_decode", "progressive"],
                        help="MedDINOv3 decoder: the paper's PatchDecode (default) or our light progressive one")
    parser.add_argument("--target-spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="the ViT model's preprocessing.target_spacing in mm (default: the CT's own grid)")
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--slices", type=int, default=None, help="run the ViT on the central N slices and extrapolate")
    parser.add_argument("--unet-crop", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="run the U-Net on a central crop and extrapolate by the window count")
    parser.add_argument("--no-unet", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also time the ViT compiled (dinomed segment --compile), interleaved with the others")
    parser.add_argument("--pipeline-model", default=None, metavar="MODEL_DIR",
                        help="with --slices: the trained model folder whose whole-volume run gives the non-model stage "
                        "times (default: the bundled demo PET/CT model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline-repeats", type=int, default=1,
                        help="whole-volume pipeline runs with --slices (each runs the pipeline model on every slice)")
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

    from dinomed.inference.segment import IMPORT_STAGE, model_grid, read_ct, resolve_device
    from dinomed.models import load_model_folder

    # in the pipeline, but paid once per process: shown apart. Each `dinomed segment` is a process (the Slicer module
    # and the web page start one per segmentation), so for a user the column with it is the real one.
    once_stages = (IMPORT_STAGE,)

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cache = Path(args.cache)
    depth, height, width = args.shape
    case = prepare_case(cache, tuple(args.shape), args.seed)
    model_dir = prepare_model(cache, args.arch, args.batch_size, args.target_spacing, args.decoder)
    vit_ct = case["ct"]
    n_slices = depth
    if args.slices and args.slices < depth:
        vit_ct, n_slices = central_slices(case["ct"], args.slices), args.slices
    pipeline_dir = None
    if n_slices < depth:
        source = Path(args.pipeline_model) if args.pipeline_model else (
            Path(__file__).resolve().parents[1] / "Resources" / "Models" / "demo")
        pipeline_dir = prepare_pipeline_model(cache, source, args.target_spacing)
    matmul_n = args.matmul_n or (8192 if device.type == "cuda" else 2048)

    # the model's grid for this CT (target spacing), and the ViT's FLOPs per slice there
    model, model_json = load_model_folder(model_dir)
    grid = model_grid(read_ct(case["ct"]), model_json.get("preprocessing"))
    gx, gy, gz = grid.GetSize() if grid is not None else (width, height, depth)
    vit_flops = flops_of(model, torch.zeros(1, 2, gy, gx))  # per slice of the model grid
    model_slices_full = gz
    model_slices_run = max(1, round(gz * n_slices / depth))
    # the compiled runs: the first batch (compilation + the eager check) is the 'compile' stage, so they run one
    # batch more and their 'model' stage covers the slices after it
    from dinomed.inference.predict import slices_per_forward

    first_batch = slices_per_forward(device, args.batch_size, gy, gx)
    comp_ct, comp_model_slices = vit_ct, model_slices_run
    if args.compile:
        if n_slices < depth:
            comp_ct = central_slices(case["ct"], min(depth, n_slices + first_batch))
            comp_model_slices = max(1, round(gz * min(depth, n_slices + first_batch) / depth)) - first_batch
        else:
            comp_model_slices = model_slices_run - first_batch
        if comp_model_slices < 1:
            parser.error("--compile needs more model slices than one batch: raise --slices or lower --batch-size")
        # a fresh TorchInductor cache for this benchmark: the first compiled run compiles from scratch (cold),
        # the later ones find its code on disk (warm), as a user's first and later runs would
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-", dir=cache)
    del model
    unet_flops = full_windows = None
    if not args.no_unet:
        net = build_dynunet().eval()
        unet_flops = flops_of(net, torch.zeros(1, 2, *NNUNET_PATCH))  # per window
        del net
        full_windows = count_windows((depth, height, width), NNUNET_PATCH, 0.5)

    # side by side: each repeat runs the ViT, then the peer, so that both see the same load
    vit_runs, unet_runs, pipe_runs, comp_runs = [], [], [], []
    n_unet = 0 if args.no_unet else (args.unet_repeats if args.unet_repeats is not None else args.repeats)
    for i in range(max(args.repeats, n_unet)):
        if i < args.repeats:
            vit_runs.append(run_child(_child_vit, str(model_dir), str(vit_ct), str(case["pet"]), args.device,
                                      args.threads, matmul_n))
            print(f"vit run {i + 1}: {vit_runs[-1]}", file=sys.stderr)
            if args.compile:
                comp_runs.append(run_child(_child_vit, str(model_dir), str(comp_ct), str(case["pet"]), args.device,
                                           args.threads, matmul_n, True))
                print(f"compiled vit run {i + 1}: {comp_runs[-1]}", file=sys.stderr)
        if i < n_unet:
            unet_runs.append(run_child(_child_unet, str(case["ct"]), str(case["pet"]), args.device, args.threads,
                                       args.unet_crop, 0.5, args.sw_batch, matmul_n))
            print(f"unet run {i + 1}: {unet_runs[-1]}", file=sys.stderr)
        if pipeline_dir is not None and i < args.pipeline_repeats:
            pipe_runs.append(run_child(_child_vit, str(pipeline_dir), str(case["ct"]), str(case["pet"]), args.device,
                                       args.threads, matmul_n))
            print(f"pipeline run {i + 1}: {pipe_runs[-1]}", file=sys.stderr)

    # --- the ViT: model stages from its own runs (scaled to the whole volume), the rest from the whole-volume runs
    rest_runs = pipe_runs or vit_runs
    rest = {k: v for k, v in _median_stages(rest_runs).items() if k not in MODEL_STAGES}

    def vit_row(runs: list[dict], label: str, slices_run: int) -> dict:
        stages = _median_stages(runs)
        model_part = sum(stages.get(k, 0.0) for k in MODEL_STAGES) * model_slices_full / slices_run
        fraction = statistics.median(
            vit_flops * slices_run / max(1e-9, sum(r["stages"].get(k, 0.0) for k in MODEL_STAGES)) / 1e9
            / r["matmul_gflops"] for r in runs)
        return {
            "model": f"MedDINOv3 {args.arch} {args.decoder} (2D, batch {args.batch_size}{label})",
            "short": f"ViT{label.replace(',', '')}",
            "device": f"{runs[0]['device']} {runs[0]['precision']}",
            "grid": f"{gx}x{gy}x{gz}",
            "ran": ((f"model: {slices_run} of {model_slices_full} model slices, extrapolated; the rest: whole volume"
                     + (f" ({Path(pipeline_dir).name})" if pipeline_dir else ""))
                    if slices_run < model_slices_full else "whole volume"),
            "wall_s": model_part + sum(rest.values()), "model_s": model_part, "rest_s": sum(rest.values()),
            "once_s": sum(rest.get(k, 0.0) for k in once_stages),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs + pipe_runs),
            "cuda_peak_mb": runs[0]["cuda_peak_mb"], "gflop_per_slice": vit_flops / 1e9,
            "gflops": vit_flops * model_slices_full / model_part / 1e9, "fraction": fraction,
            "stages": {**{k: stages.get(k, 0.0) * model_slices_full / slices_run for k in MODEL_STAGES}, **rest},
        }

    peak = statistics.median(r["matmul_gflops"] for r in vit_runs + unet_runs + comp_runs)
    rows = [vit_row(vit_runs, "", model_slices_run)]
    if comp_runs:
        rows.append(vit_row(comp_runs, ", compiled", comp_model_slices))

    if unet_runs:
        ustages = _median_stages(unet_runs)
        windows = unet_runs[0]["windows"]
        wscale = full_windows / windows
        vscale = (depth * height * width) / math.prod(unet_runs[0]["shape"])
        umodel = ustages.get("model", 0.0) * wscale
        urest = {k: v * (vscale if k != "load model" else 1.0) for k, v in ustages.items() if k != "model"}
        rows.append({
            "model": "DynUNet nnU-Net 3d_fullres-like (3D, 128^3, overlap 0.5)", "short": "DynUNet",
            "device": f"{device} {unet_runs[0]['precision']}", "grid": f"{width}x{height}x{depth}",
            "ran": (f"crop {'x'.join(map(str, unet_runs[0]['shape']))}: {windows} of {full_windows} windows, extrapolated"
                    if wscale > 1 else f"{windows} windows"),
            "wall_s": umodel + sum(urest.values()), "model_s": umodel + urest.get("argmax", 0.0),
            "rest_s": sum(v for k, v in urest.items() if k != "argmax"), "once_s": 0.0,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in unet_runs), "cuda_peak_mb": unet_runs[0]["cuda_peak_mb"],
            "gflop_per_slice": unet_flops * full_windows / depth / 1e9,
            "gflops": unet_flops * full_windows / umodel / 1e9,
            "fraction": statistics.median(unet_flops * windows / max(1e-9, r["stages"]["model"]) / 1e9 / r["matmul_gflops"]
                                          for r in unet_runs),
            "stages": {"model": umodel, **urest},
        })

    loads = [r["load"] for r in vit_runs + unet_runs + pipe_runs + comp_runs]
    cpu = platform.processor() or platform.machine()
    print(f"\nCase: synthetic PET/CT, CT {width}x{height}x{depth} (x, y, z), PET on its own grid; "
          f"device {device}, {args.threads} thread(s) ({cpu}), torch {torch.__version__}; fp32 matmul {matmul_n}^3: "
          f"{peak:.1f} GFLOP/s (median, measured in each child before and after its run); {len(vit_runs)} ViT / {len(unet_runs)} "
          f"U-Net run(s), interleaved, medians; 1-min load average {min(loads):.1f}-{max(loads):.1f} "
          f"on {os.cpu_count()} CPU(s).\n")
    print("| model | device | model grid | ran | wall s / volume | model s | pipeline s (share) | pipeline without the "
          "once-per-process import (share) | peak RSS (MB) | GPU peak (MB) | GFLOP / slice | achieved GFLOP/s | of fp32 matmul |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        gpu = f"{r['cuda_peak_mb']:.0f}" if r["cuda_peak_mb"] is not None else "-"
        print(f"| {r['model']} | {r['device']} | {r['grid']} | {r['ran']} | {r['wall_s']:.1f} | {r['model_s']:.1f} | "
              f"{r['rest_s']:.1f} ({100 * r['rest_s'] / r['wall_s']:.0f}%) | "
              f"{r['rest_s'] - r['once_s']:.1f} ({100 * (r['rest_s'] - r['once_s']) / (r['wall_s'] - r['once_s']):.0f}%) | "
              f"{r['peak_rss_mb']:.0f} | {gpu} | "
              f"{r['gflop_per_slice']:.1f} | {r['gflops']:.1f} | {100 * r['fraction']:.0f}% |")
    unet_row = rows[-1] if unet_runs else None
    for r in rows:
        if unet_row is not None and r is not unet_row:
            print(f"\nDynUNet / {r['model']}, wall time: {unet_row['wall_s'] / r['wall_s']:.1f}x (model part alone: {unet_row['model_s'] / r['model_s']:.1f}x)")
    if comp_runs:
        compile_s = [r["compile_s"] for r in comp_runs]
        print(f"\nCompiled ViT: one-time compilation {statistics.median(compile_s):.1f} s per process (median; "
              f"{', '.join(f'{v:.1f}' for v in compile_s)} s; TorchInductor disk cache "
              f"{'/'.join('warm' if r['inductor_cache_warm'] else 'cold' for r in comp_runs)}), not in the wall "
              "time above: a run of `dinomed segment --compile` adds it once per volume shape and process. It "
              f"includes the first batch ({first_batch} slices) run compiled and eager (the check); the compiled "
              "row's model rate comes from the batches after it.")
    names = []
    for r in rows:
        names += [k for k in r["stages"] if k not in names]
    print("\nStages, seconds per whole volume (the `dinomed segment --profile` markers; medians):\n")
    print("| stage | " + " | ".join(r["short"] for r in rows) + " |")
    print("| --- |" + " ---: |" * len(rows))
    for k in names:
        print(f"| {k} | " + " | ".join(f"{r['stages'][k]:.2f}" if k in r["stages"] else "-" for r in rows) + " |")
    print("\nwall: the whole job; model: the network and its argmax; pipeline: everything else (read, PET resample, "
          "normalise, post-process, lesion statistics, write, model loading, checks, and importing the model code: "
          f"{', '.join(once_stages)}, which a process pays once, so the next column leaves it out of both the "
          "pipeline and the wall time). Peak RSS: VmHWM of the child "
          "process (for the ViT the larger of its subset run and the whole-volume pipeline run). Achieved GFLOP/s "
          "and the matmul fraction: per run against that run's own matmul measurement (5 samples before and 5 after its "
          "run), median; FLOPs counted by torch's FlopCounterMode plus the CPU's fused attention.")
    if pipeline_dir:
        print(f"\nViT: the network's stages were timed on {n_slices} central slices and scaled to the volume's "
              f"{model_slices_full} model-grid slices; every other stage comes from whole-volume runs of "
              f"`segment_files` with {pipeline_dir.name} (a trained model, so post-processing and lesion statistics "
              "see realistic label maps; random ViT weights would give noise).")
    if unet_row is not None and "extrapolated" in unet_row["ran"]:
        print("U-Net: model time scaled by the window count, the other stages by the voxel count.")
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_gflops": peak, "rows": rows, "vit_runs": vit_runs,
                                               "unet_runs": unet_runs, "pipeline_runs": pipe_runs,
                                               "compiled_runs": comp_runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
