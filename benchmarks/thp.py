"""Transparent huge pages for torch's CPU allocator (``THP_MEM_ALLOC_ENABLE=1``), on and off, side by side.

torch reads the variable at its first allocation, so each measurement is a fresh child process; the children
alternate (off, on, off, on, ...) so that both see the same load. Each child runs the MedDINOv3 ViT-S
(PatchDecode, random weights, prepared for the CPU as ``dinomed segment`` prepares it) on one batch of 8 slices
of 2 x 255 x 255 (a 1.5 mm model grid), times a warm-up call and ``--calls`` more, and measures the fp32 matmul
rate just before.

    python benchmarks/thp.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from dinomed.models import build_model
from dinomed.inference.predict import prepare_for_inference
def t1(f):
    s = time.perf_counter(); f(); return time.perf_counter() - s
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
mm = 2 * 2048**3 / statistics.median([t1(lambda: a @ b) for _ in range(6)][1:]) / 1e9
torch.manual_seed(0)
m = prepare_for_inference(build_model({"name": "meddinov3", "backbone": "vit_small", "in_chans": 2,
                                       "num_classes": 10, "decoder": "patch_decode"}), "cpu")
x = torch.randn(8, 2, 255, 255)
with torch.inference_mode():
    ts = [t1(lambda: m(x)) for _ in range(1 + int(sys.argv[2]))]
print(json.dumps({"first": ts[0], "median": statistics.median(ts[1:]), "matmul": mm}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    results = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            env = dict(os.environ)
            env.pop("THP_MEM_ALLOC_ENABLE", None)
            if mode == "on":
                env["THP_MEM_ALLOC_ENABLE"] = "1"
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.threads), str(args.calls)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f"MedDINOv3 ViT-S PatchDecode, batch 8 x 2 x 255 x 255, {args.threads} thread(s), {args.rounds} child "
          f"processes each, alternating; {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.1f}\n")
    print("| THP_MEM_ALLOC_ENABLE | first call (ms) | later calls, median (ms), per process | matmul GFLOP/s |")
    print("| --- | ---: | --- | --- |")
    for mode, runs in results.items():
        first = 1000 * statistics.median(r["first"] for r in runs)
        later = ", ".join(f"{1000 * r['median']:.0f}" for r in runs)
        rates = ", ".join(f"{r['matmul']:.0f}" for r in runs)
        print(f"| {'1' if mode == 'on' else 'unset'} | {first:.0f} | {later} | {rates} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
