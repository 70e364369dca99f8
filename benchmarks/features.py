"""Benchmark of ``dinomed.features``: computing the patch features of a 512×512×300 CT with ViT-S, and the
latency of one new cosine-similarity map once the features are cached.

    python benchmarks/features.py                      # CPU: times 8 slices and extrapolates to 300
    python benchmarks/features.py --slices-to-time 300 # the whole volume
    python benchmarks/features.py --device cuda --slices-to-time 300

Weights are random (speed does not depend on them). The volume is a CT-like ellipse of soft tissue in air
with noise. When fewer slices than the volume's are run, the per-slice time (after one warm-up batch) is
multiplied by the number of slices and the table says so. The cosine maps are timed on a full-size feature
volume (300×384×32×32 float16, the slices that were computed repeated), as read back from the cache.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from dinomed.backbones import create_backbone
from dinomed.features import FeatureExtractor, FeatureVolume, compute_features, cosine_map, pca_rgb


def ct_like_volume(shape, seed=0) -> sitk.Image:
    """A (z, y, x) int16 CT: air, an ellipse of soft tissue with noise, at 0.8×0.8×2 mm."""
    d, h, w = shape
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    body = ((x - w / 2) / (0.42 * w)) ** 2 + ((y - h / 2) / (0.32 * h)) ** 2 <= 1
    slab = np.where(body, 40, -1000).astype(np.int16)
    volume = np.empty(shape, dtype=np.int16)
    for k in range(d):
        volume[k] = slab + rng.normal(0, 15, (h, w)).astype(np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.8, 2.0))
    return image


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[300, 512, 512], metavar=("D", "H", "W"))
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--slices-to-time", type=int, default=8, help="slices actually run (default 8; then extrapolated)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20, help="runs per cosine-map timing (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cosine-only", action="store_true",
                        help="skip the backbone: time the cache and the cosine maps on random float16 features")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    depth, height, width = args.size
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else (0.0,)
    n = min(args.slices_to_time, depth)
    rows: list[tuple[str, str, str]] = []

    torch.manual_seed(0)
    backbone = create_backbone(args.arch, in_chans=1).eval()
    extractor = FeatureExtractor.from_backbone(backbone, ["CT"], source={"kind": "random", "arch": args.arch})
    print(f"{args.arch} ({sum(p.numel() for p in backbone.parameters()) / 1e6:.1f} M parameters), device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}",
          file=sys.stderr)

    if args.cosine_only:
        part = ct_like_volume((n, height, width))
        embed = backbone.embed_dim
        noise = np.random.default_rng(0).standard_normal((n, embed, -(-height // 16), -(-width // 16)), dtype=np.float32)
        feats = FeatureVolume.from_array(noise, part)
        rows.append(("features (skipped: --cosine-only, random float16 features)", "-", ""))
    # ---- feature computation ----
    warm = ct_like_volume((args.batch_size, height, width), seed=1)
    if not args.cosine_only:
        compute_features(warm, extractor, batch_size=args.batch_size, device=args.device)  # warm-up (allocations, kernels)
        part = ct_like_volume((n, height, width))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        feats = compute_features(part, extractor, batch_size=args.batch_size, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        per_slice = elapsed / n
        label = f"features of {width}×{height}×{depth}, {args.arch}, batch {args.batch_size}"
        if n < depth:
            rows.append((label, f"{per_slice * depth:.1f} s",
                         f"extrapolated: {n} slices took {elapsed:.2f} s ({per_slice:.3f} s/slice) × {depth}"))
        else:
            rows.append((label, f"{elapsed:.1f} s", f"{per_slice:.3f} s/slice, all {depth} slices run"))

    # ---- a full-size feature volume, through the cache ----
    reps = -(-depth // n)
    full = np.concatenate([feats.array] * reps, axis=0)[:depth]
    geometry = {"size": [width, height, depth], "origin": [0.0, 0.0, 0.0], "spacing": [0.8, 0.8, 2.0],
                "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
    volume = FeatureVolume(full, geometry, feats.patch_size, {"model": extractor.source})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.json"
        seconds, _ = timed(lambda: volume.save(path), 1)
        size_mb = path.with_suffix(".npy").stat().st_size / 2**20
        rows.append(("write the cache (.npy float16 + .json)", f"{seconds * 1000:.0f} ms", f"{size_mb:.0f} MiB, shape {list(full.shape)}"))
        seconds, _ = timed(lambda: FeatureVolume.load(path), 3)
        cached = FeatureVolume.load(path)
    rows.append(("read the cache", f"{seconds * 1000:.0f} ms", "np.load, median of 3"))
    start = time.perf_counter()
    cached.unit_features()
    rows.append(("first map only: normalise the features (float32)", f"{(time.perf_counter() - start) * 1000:.0f} ms",
                 f"once per volume, {4 * full.size / 2**20:.0f} MiB in memory"))

    rng = np.random.default_rng(0)
    points = [(int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(0, depth))) for _ in range(args.repeats)]
    it = iter(points * 3)
    median, _ = timed(lambda: cached.similarity(cached.feature_index(next(it)), "3d"), args.repeats)
    rows.append(("cosine map 3D, feature resolution", f"{median * 1000:.1f} ms", f"{full.shape[0]}×{full.shape[2]}×{full.shape[3]} positions, median of {args.repeats}"))
    it = iter(points * 3)
    median, _ = timed(lambda: cached.similarity(cached.feature_index(next(it)), "2d"), args.repeats)
    rows.append(("cosine map 2D (one slice), feature resolution", f"{median * 1000:.2f} ms", f"median of {args.repeats}"))
    it = iter(points * 3)
    median, _ = timed(lambda: cosine_map(cached, next(it), mode="2d"), args.repeats)
    rows.append(("cosine map 2D upsampled to the image grid (sitk.Image)", f"{median * 1000:.1f} ms", f"median of {args.repeats}"))
    it = iter(points * 3)
    median, _ = timed(lambda: cosine_map(cached, next(it), mode="3d"), 3)
    rows.append(("cosine map 3D upsampled to the image grid (sitk.Image)", f"{median * 1000:.0f} ms", "median of 3"))

    # ---- the live map in Slicer: DINOSegLib.features.CosineMapFollower on a real MRML scene ----
    rows.extend(slicer_live_map_rows(full, (depth, height, width), feats.patch_size, args.repeats))

    # ---- PCA on the features actually computed (the part volume) ----
    median, _ = timed(lambda: pca_rgb(feats, image=part), 3)
    rows.append((f"PCA RGB with body mask ({n} slices), to the image grid", f"{median * 1000:.0f} ms", "median of 3"))

    if hasattr(os, "getloadavg"):
        print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
              "(other processes share this machine)")
    name_w = max(len(r[0]) for r in rows)
    value_w = max(len(r[1]) for r in rows)
    print(f"{'measure'.ljust(name_w)}  {'time'.rjust(value_w)}  notes")
    print(f"{'-' * name_w}  {'-' * value_w}  -----")
    for name, value, note in rows:
        print(f"{name.ljust(name_w)}  {value.rjust(value_w)}  {note}")
    return 0


def slicer_live_map_rows(full: np.ndarray, image_shape, patch_size: int, repeats: int) -> list[tuple[str, str, str]]:
    """Time DINOSeg's live cosine map (a real slicer-core scene, the grid read as the Lib reads the cache):
    one update while a point is dragged (the planes in view), and the whole map (placing, end of a drag)."""
    try:
        import slicer  # noqa: F401  (slicer-core)
    except ImportError:
        return [("live map in Slicer (DINOSegLib)", "-", "skipped: slicer-core is not installed")]
    import tracemalloc

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DINOSeg"))
    import vtk
    from DINOSegLib.features import CosineMapFollower, FeatureGrid

    depth, height, width = image_shape
    scene = slicer.vtkMRMLScene()
    # the three standard views (slice-to-RAS rotations of Slicer's Axial, Sagittal, Coronal presets), all
    # through the middle of the volume; a point dragged in one of them stays in that view's plane
    centre = np.array([0.8 * width / 2, 0.8 * height / 2, 2.0 * depth / 2])
    views = {"Red": [[-1, 0, 0], [0, 1, 0], [0, 0, 1]], "Yellow": [[0, 0, 1], [-1, 0, 0], [0, 1, 0]],
             "Green": [[-1, 0, 0], [0, 0, 1], [0, 1, 0]]}
    for name, rotation in views.items():
        slice_node = slicer.vtkMRMLSliceNode()
        slice_node.SetLayoutName(name)
        matrix = slice_node.GetSliceToRAS()
        for r in range(3):
            for c in range(3):
                matrix.SetElement(r, c, rotation[r][c])
            matrix.SetElement(r, 3, centre[r])
        slice_node.UpdateMatrices()
        scene.AddNode(slice_node)
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode").SetLayoutName(name)
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, depth)  # geometry only: the follower never reads the CT's voxels
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    ct.SetAndObserveImageData(image)
    ct.SetSpacing(0.8, 0.8, 2.0)
    start = time.perf_counter()
    grid = FeatureGrid(np.ascontiguousarray(np.transpose(full, (0, 2, 3, 1))), image_shape,
                       voxels_per_cell=(1, patch_size, patch_size))
    load_ms = (time.perf_counter() - start) * 1000
    follower = CosineMapFollower(scene, ct, grid)
    rng = np.random.default_rng(1)
    points = [np.array([rng.uniform(0, width - 1), rng.uniform(0, height - 1), rng.uniform(0, depth - 1), 1.0])
              for _ in range(repeats)]
    matrix = np.array([[0.8, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1.0]])
    follower.update((matrix @ points[0])[:3], whole=True)  # the first map (placing the point)
    it = iter(points * 2)
    follower.dragging = True
    drag, _ = timed(lambda: follower.update((matrix @ next(it))[:3]), repeats)
    planes = len(follower.last_planes)
    tracemalloc.start()
    follower.update((matrix @ points[1])[:3])
    drag_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    follower.update((matrix @ points[2])[:3], whole=True)
    whole_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    it = iter(points * 2)
    whole, _ = timed(lambda: follower.update((matrix @ next(it))[:3], whole=True), 5)
    # what the widget does: progressive, the planes in view at once, the rest in refine() steps of its timer
    follower.dragging = False
    follower.progressive = True
    it = iter(points * 2)
    placed, _ = timed(lambda: follower.update((matrix @ next(it))[:3]), repeats)
    steps = []
    while follower.pending:
        start = time.perf_counter()
        follower.refine(budget_s=0.04)
        steps.append(time.perf_counter() - start)
    mib = 2**20
    zf, yf, xf = grid.grid_shape
    return [
        ("Slicer: grid from the cache, unit float16 in place", f"{load_ms:.0f} ms",
         f"once per volume; kept: {grid.features.nbytes / mib:.0f} MiB (no float32 copy)"),
        ("Slicer: live map while dragging (planes in view)", f"{drag * 1000:.1f} ms",
         f"{planes} planes of the {zf}×{yf}×{xf} grid, median of {repeats}; peak extra memory {drag_peak / mib:.1f} MiB"),
        ("Slicer: whole map at once (placing, end of drag)", f"{whole * 1000:.0f} ms",
         f"median of 5; peak extra memory {whole_peak / mib:.1f} MiB; map volume {zf * yf * xf * 4 / mib:.1f} MiB"),
        ("Slicer: progressive, placing (the planes in view)", f"{placed * 1000:.1f} ms", f"median of {repeats}"),
        ("Slicer: progressive, one refine step (budget 40 ms)", f"{statistics.median(steps) * 1000:.1f} ms",
         f"median of {len(steps)} steps, max {max(steps) * 1000:.0f} ms, {sum(steps):.2f} s to complete the map"),
    ]


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
