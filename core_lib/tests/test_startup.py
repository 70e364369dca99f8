"""``dinomed`` as a program imports torch, torchvision and timm with the cyclic garbage collector paused and frozen
after (dinomed._startup); imported into another process it leaves the collector alone.

Each check runs in a fresh interpreter: this pytest process has long imported torch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Counts the full (generation 2) collections of the whole process and reports them, with the freeze count, at exit.
GC_PROBE = textwrap.dedent("""
    import atexit, gc, json, sys
    _full = [0]
    def _count(phase, info):
        if phase == "stop" and info["generation"] == 2:
            _full[0] += 1
    gc.callbacks.append(_count)
    atexit.register(lambda: print("GCPROBE " + json.dumps({"full": _full[0], "frozen": gc.get_freeze_count(),
                                                            "enabled": gc.isenabled()}), file=sys.stderr))
""")


def _probe(tmp_path, args, **env) -> tuple[subprocess.CompletedProcess, dict]:
    site = tmp_path / "probe"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GC_PROBE)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(site), **env})
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("GCPROBE ")]
    assert line, proc.stderr[-3000:]
    return proc, json.loads(line[-1][len("GCPROBE "):])


def test_the_program_imports_torch_and_timm_without_full_collections(tmp_path):
    # `dinomed info` imports torch and timm (the backbones) before it finds the checkpoint missing
    missing = tmp_path / "missing.pth"
    proc, gc_state = _probe(tmp_path, ["-m", "dinomed", "info", str(missing)])
    assert proc.returncode == 2 and "missing.pth" in proc.stderr
    assert gc_state["full"] == 0  # none while importing, none afterwards, none at exit
    assert gc_state["frozen"] > 50_000 and gc_state["enabled"]
    # the same process with the collector left alone: full collections while importing, nothing frozen
    proc, kept = _probe(tmp_path, ["-m", "dinomed", "info", str(missing)], DINOMED_KEEP_GC="1")
    assert proc.returncode == 2
    assert kept["full"] >= 1 and kept["frozen"] == 0 and kept["enabled"]


def test_imported_dinomed_leaves_the_collector_alone(tmp_path):
    # Slicer's Python, a notebook, a test: main() with arguments, and the library itself, freeze nothing
    code = f"from dinomed.cli import main; import dinomed.models; dinomed.models.available_models(); main(['info', {str(tmp_path / 'missing.pth')!r}])"
    proc, gc_state = _probe(tmp_path, ["-c", code])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert gc_state["frozen"] == 0 and gc_state["full"] >= 1


def test_paused_imports_still_collect_new_garbage_and_run_models():
    code = textwrap.dedent("""
        import gc, json, sys
        from dinomed._startup import _PausedGCImport, pause_gc_in_heavy_imports
        pause_gc_in_heavy_imports()
        pause_gc_in_heavy_imports()  # at most one finder
        finders = sum(isinstance(f, _PausedGCImport) for f in sys.meta_path)
        import torch
        after_torch = gc.get_freeze_count()
        from dinomed.models import available_models, build_model
        available_models()  # timm and torchvision
        after_timm = gc.get_freeze_count()
        model = build_model({"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 1, "num_classes": 3}).eval()
        with torch.no_grad():
            labels = model.predict_labels(torch.randn(1, 1, 32, 32))
        class Node:
            pass
        a, b = Node(), Node()
        a.other, b.other = b, a  # a reference cycle made after the freezes
        del a, b
        print(json.dumps({"finders": finders, "finders_left": sum(isinstance(f, _PausedGCImport) for f in sys.meta_path),
                          "after_torch": after_torch, "after_timm": after_timm, "collected": gc.collect(),
                          "enabled": gc.isenabled(), "shape": list(labels.shape)}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["finders"] == 1 and out["finders_left"] == 0  # removed once torch, torchvision and timm are in
    assert 50_000 < out["after_torch"] < out["after_timm"]  # frozen after torch, again after torchvision and timm
    assert out["collected"] >= 2 and out["enabled"]  # the new cycle is collected: only import-time objects are frozen
    assert out["shape"] == [1, 32, 32]


@pytest.mark.skipif(os.environ.get("DINOMED_KEEP_GC") == "1", reason="DINOMED_KEEP_GC=1 in this environment")
def test_keep_gc_turns_it_off():
    code = ("import os, sys; os.environ['DINOMED_KEEP_GC'] = '1'\n"
            "from dinomed._startup import pause_gc_in_heavy_imports; pause_gc_in_heavy_imports()\n"
            "import gc, torch; print(len(sys.meta_path), gc.get_freeze_count())")
    base = subprocess.run([sys.executable, "-c", "import sys, torch; print(len(sys.meta_path))"], capture_output=True, text=True)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_finders, frozen = proc.stdout.split()
    assert int(n_finders) == int(base.stdout) and int(frozen) == 0
