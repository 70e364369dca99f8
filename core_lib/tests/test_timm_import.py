"""dinomed imports timm (and torchvision) without importing TorchDynamo, and leaves torch and torchvision working.

Each check runs in a fresh interpreter: this pytest process has long imported Dynamo through other tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_building_and_running_a_model_imports_no_dynamo():
    out = _run("""
        import json, sys, time
        import torch
        t = time.perf_counter()
        from dinomed.models import available_models, build_model
        available_models()  # imports the model modules, timm with them
        imported = time.perf_counter() - t
        model = build_model({"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3}).eval()
        with torch.no_grad():
            labels = model.predict_labels(torch.randn(2, 2, 32, 32))
        import timm.layers, timm.models.naflexvit
        print(json.dumps({
            "dynamo": sorted(m for m in sys.modules if m.startswith("torch._dynamo")),
            "torchvision": "torchvision" in sys.modules, "shape": list(labels.shape),
            "disable_restored": torch.compiler.disable.__module__ == "torch.compiler",
            "timm_names_restored": [timm.layers.disable_compiler is torch.compiler.disable,
                                    timm.models.naflexvit.disable_compiler is torch.compiler.disable],
            "import_s": imported}))
    """)
    print(f"import of dinomed.models without Dynamo: {out['import_s']:.2f} s")
    assert out["dynamo"] == []
    assert out["torchvision"]
    assert out["shape"] == [2, 32, 32]
    assert out["disable_restored"] and out["timm_names_restored"] == [True, True]


def test_torch_and_torchvision_work_as_before_after_the_import():
    out = _run("""
        import json, sys
        import torch
        from dinomed.models import available_models
        available_models()  # imports the model modules, timm with them
        ra = sys.modules["torchvision.ops.roi_align"]  # the module (torchvision.ops's attribute is the function)
        from torchvision.ops import roi_align
        from timm.models.naflexvit import NaFlexEmbeds
        deferred = NaFlexEmbeds._apply_learned_naflex_pos_embed
        assert "torch._dynamo" not in sys.modules
        x = torch.arange(16.0).reshape(1, 1, 4, 4)
        pooled = roi_align(x, [torch.tensor([[0.0, 0.0, 3.0, 3.0]])], output_size=1, aligned=True)
        stand_in = ra.is_compile_supported("cpu")        # the stand-in imports the real function here
        import torch._dynamo.utils
        real = torch._dynamo.utils.is_compile_supported("cpu")
        compiled = torch.compile(lambda t: t * 2 + 1, backend="eager")(torch.ones(3))

        from dinomed._timm import _deferred_disable
        from torch._dynamo.testing import CompileCounter
        f = _deferred_disable(torch.compiler.disable)(lambda t: t.sin())
        counter = CompileCounter()
        t = torch.randn(5)
        g = torch.compile(lambda t: f(t) * 2 + 1, backend=counter)(t)
        print(json.dumps({
            "pooled": pooled.flatten().tolist(), "same_answer": stand_in == real,
            "module_is_real": not getattr(sys.modules["torch._dynamo.utils"], "_dinomed_stand_in", False),
            "compiled": compiled.tolist(), "deferred_flag": getattr(deferred, "_dinomed_deferred_disable", False),
            "disabled_ok": bool(torch.equal(g, t.sin() * 2 + 1)), "traced_ops": counter.op_count}))
    """)
    # the bilinear samples of the ramp 4y + x average to its value at the box's centre, which aligned=True's half-pixel
    # shift puts at (1, 1): 5
    assert out["pooled"] == [5.0]
    assert out["same_answer"] and out["module_is_real"]
    assert out["compiled"] == [3.0, 3.0, 3.0]
    assert out["deferred_flag"]  # naflexvit's methods, decorated during the import, carry the deferred disable
    # torch.compile honours the deferred disable: the sin runs eagerly, the graph holds only the mul and the add
    assert out["disabled_ok"] and out["traced_ops"] == 2


@pytest.mark.parametrize("env", [{"DINOMED_EAGER_DYNAMO_IMPORT": "1"}, {}])
def test_nothing_is_replaced_when_asked_or_when_dynamo_is_already_there(env):
    pre = "" if env else "import torch._dynamo"
    out = _run(f"""
        import json, sys
        import torch
        {pre}
        from dinomed.models import available_models
        available_models()
        print(json.dumps({{"dynamo": "torch._dynamo" in sys.modules,
                          "stand_in": getattr(sys.modules["torch._dynamo.utils"], "_dinomed_stand_in", False)}}))
    """, **env)
    assert out == {"dynamo": True, "stand_in": False}


@pytest.mark.slow
def test_process_start_benchmark_runs_every_way():
    """benchmarks/process_start.py (one process each way): it runs, and the three rows and the differences come out."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "process_start.py"
    proc = subprocess.run([sys.executable, str(script), "--runs", "1"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| default", "| collector", "| with Dynamo"))]
    assert len(rows) == 3
    assert proc.stdout.count("s less wall time per process") == 2
