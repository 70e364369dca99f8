"""A whole ``dinomed segment`` process, as the Slicer module and the web page start one per segmentation: its wall
time from start to exit and its "import models" stage, three ways, the runs alternating; medians.

- default: timm imported without TorchDynamo (``dinomed._timm``), torch, torchvision and timm imported with the
  garbage collector paused and frozen after (``dinomed._startup``);
- the collector left alone (``DINOMED_KEEP_GC=1``);
- as before both changes (``DINOMED_KEEP_GC=1 DINOMED_EAGER_DYNAMO_IMPORT=1``).

    python benchmarks/process_start.py                       # the bundled demo PET/CT model on the sample data
    python benchmarks/process_start.py --runs 9 --model M --ct CT --pet PET
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dinomed.events import parse_event
from dinomed.inference.segment import IMPORT_STAGE

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = "default (no Dynamo; collector paused in the imports)"
MODES = {
    DEFAULT: {"DINOMED_KEEP_GC": "0", "DINOMED_EAGER_DYNAMO_IMPORT": "0"},
    "collector left alone (DINOMED_KEEP_GC=1)": {"DINOMED_KEEP_GC": "1", "DINOMED_EAGER_DYNAMO_IMPORT": "0"},
    "with Dynamo and the collector (both =1, as before)": {"DINOMED_KEEP_GC": "1", "DINOMED_EAGER_DYNAMO_IMPORT": "1"},
}


def one_run(args, out: Path, env: dict) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "dinomed", "segment", "--model", args.model, "--ct", args.ct, "--out", str(out),
           "--events", "--profile", "--device", "cpu"]
    if args.pet:
        cmd += ["--pet", args.pet]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dinomed segment failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    events = [parse_event(line) for line in proc.stdout.splitlines()]
    done = [e for e in events if e and e.get("event") == "done"]
    return wall, float(done[-1]["stages"][IMPORT_STAGE])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="processes per mode (alternating)")
    p.add_argument("--model", default=str(ROOT / "Resources" / "Models" / "demo"))
    p.add_argument("--ct", default=str(ROOT / "Resources" / "SampleData" / "ct.nii.gz"))
    p.add_argument("--pet", default=str(ROOT / "Resources" / "SampleData" / "pet.nii.gz"))
    args = p.parse_args(argv)
    results = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="dinomed-start-") as tmp:
        for i in range(args.runs):
            for mode, env in MODES.items():
                results[mode].append(one_run(args, Path(tmp) / "seg.nii.gz", env))
                print(f"run {i + 1} {mode}: wall {results[mode][-1][0]:.2f} s, import models {results[mode][-1][1]:.2f} s",
                      flush=True)
    print(f"\n`dinomed segment` of {Path(args.ct).name} with {Path(args.model).name}, {args.runs} processes per mode, "
          f"alternating; medians (min-max):\n")
    print("| import | process wall s | import models s |\n| --- | ---: | ---: |")
    med = {}
    for mode, rows in results.items():
        walls, imports = [r[0] for r in rows], [r[1] for r in rows]
        med[mode] = statistics.median(walls), statistics.median(imports)
        print(f"| {mode} | {med[mode][0]:.2f} ({min(walls):.2f}-{max(walls):.2f}) | "
              f"{med[mode][1]:.2f} ({min(imports):.2f}-{max(imports):.2f}) |")
    base = med[DEFAULT]
    for mode, (wall, imported) in med.items():
        if mode != DEFAULT:
            print(f"\ndefault against {mode}: {wall - base[0]:.2f} s less wall time per process, "
                  f"{imported - base[1]:.2f} s less in 'import models'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
