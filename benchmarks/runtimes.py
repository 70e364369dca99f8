"""CPU runtimes for the same model, side by side: eager torch (as ``dinomed segment`` runs it), ``torch.compile``
(``dinomed segment --compile``), ONNX Runtime and OpenVINO (each only when installed; neither is a dependency of
dinomed: this script is how we decided not to offer them).

One process, one model (MedDINOv3 ViT-S with the official PatchDecode decoder, random weights), one batch of
``--batch`` slices of ``--size``², the runtimes timed in turns (``--rounds`` rounds of ``--repeats`` timed calls
after one warm-up call each; medians), each beside the fp32 ``torch.matmul`` rate measured in the same round.
Every runtime's labels (argmax) are compared with eager torch's before it is timed.

    python benchmarks/runtimes.py                   # eager, compiled, and whichever of onnxruntime/openvino import
    pip install onnxruntime openvino                # (into a scratch environment) to measure those two as well
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import flop_counter  # noqa: E402 - the sibling benchmark's FLOP counter


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timed(lambda: a @ b, repeats) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--size", type=int, default=256, help="slice size (pixels a side)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from dinomed.inference.compiled import inductor_cache_dir
    from dinomed.inference.predict import prepare_for_inference
    from dinomed.models import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model({"name": "meddinov3", "backbone": args.arch, "in_chans": 2, "num_classes": 10,
                         "decoder": "patch_decode"}).eval()
    x = torch.randn(args.batch, 2, args.size, args.size)
    counter = flop_counter()  # torch's counter plus the CPU's fused attention (inference.py)
    with torch.inference_mode(), counter:
        reference = model(x).numpy()
    gflop = counter.get_total_flops() / 1e9
    expected = reference.argmax(1)
    xn = x.numpy()

    runtimes: dict[str, object] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
            notes.append("onnxruntime: not installed, not measured")
        try:
            import openvino as ov
        except ImportError:
            ov = None
            notes.append("openvino: not installed, not measured")
        if ort is not None or ov is not None:
            with torch.no_grad():
                torch.onnx.export(model, (x,), str(onnx_path), dynamo=False, opset_version=17, input_names=["x"],
                                  output_names=["logits"])
        if ort is not None:
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            runtimes[f"ONNX Runtime {ort.__version__}"] = lambda: session.run(None, {"x": xn})[0]
        if ov is not None:
            compiled_ov = ov.Core().compile_model(str(onnx_path), "CPU", {
                "INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
            request = compiled_ov.create_infer_request()
            runtimes[f"OpenVINO {ov.__version__}"] = lambda: request.infer({0: xn})[compiled_ov.output(0)]

        prepare_for_inference(model, "cpu")  # what dinomed segment runs (PatchDecode token by token on the CPU)
        inductor_cache_dir()
        compiled = torch.compile(model, dynamic=False, options={"freezing": True})
        started = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        notes.append(f"torch.compile: {time.perf_counter() - started:.1f} s to compile (cache {inductor_cache_dir()})")

        def eager():
            with torch.inference_mode():
                return model(x).numpy()

        def compiled_call():
            with torch.inference_mode():
                return compiled(x).numpy()

        runtimes = {"eager torch (what dinomed segment runs)": eager, "torch.compile (Inductor, freezing)": compiled_call,
                    **runtimes}
        for name, fn in runtimes.items():
            got = np.asarray(fn())
            same = float((got.argmax(1) == expected).mean())
            notes.append(f"{name}: labels equal to eager torch's in {100 * same:.4f}% of pixels, largest logit "
                         f"difference {float(np.abs(got - reference).max()):.2g}")

        seconds = {name: [] for name in runtimes}
        rates = []
        for _ in range(args.rounds):
            rates.append(matmul_gflops())
            for name, fn in runtimes.items():
                seconds[name].append(timed(fn, args.repeats))

    rate = statistics.median(rates)
    eager_s = statistics.median(seconds["eager torch (what dinomed segment runs)"])
    print(f"{args.arch} MedDINOv3 PatchDecode, batch {args.batch} x 2 x {args.size} x {args.size}, {gflop:.1f} GFLOP per "
          f"batch, {args.threads} thread(s), torch {torch.__version__}; fp32 matmul 2048^3: {rate:.0f} GFLOP/s "
          f"(median of {', '.join(f'{r:.0f}' for r in rates)}); {args.rounds} rounds x {args.repeats} calls, medians\n")
    print("| runtime | ms / batch | vs eager | GFLOP/s | of fp32 matmul |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in seconds.items():
        s = statistics.median(values)
        print(f"| {name} | {1000 * s:.0f} | {eager_s / s:.2f}x | {gflop / s:.0f} | {100 * gflop / s / rate:.0f}% |")
    print()
    for note in notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
