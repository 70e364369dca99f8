"""The faster inference paths give the same results as the straightforward ones (speed itself is measured in
``benchmarks/inference.py``, never here): small-component removal inside bounding boxes against SimpleITK's
whole-volume connected components, lesion statistics inside bounding boxes against a whole-volume labelling,
and the stage profile of a real ``dinomed segment`` run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from dinomed.cli import main
from dinomed.inference.profile import profiling, stage
from dinomed.inference.segment import remove_small_components
from dinomed.petct import lesion_statistics
from dinomed.synthetic import label_entries


def _blobs(seed: int, shape=(24, 40, 36), labels=(1, 2, 3)) -> np.ndarray:
    """A label map of random blobs of several sizes (many small components, some touching by a corner only)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.uint8)
    for value in labels:
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.2)
        out[(noise > 0.25) & (out == 0)] = value
    out[3, 3, 3] = out[4, 4, 4] = 1  # two voxels touching by a corner: one component under 26-connectivity
    return out


def _reference_removal(image: sitk.Image, minimum: dict[int, int]) -> np.ndarray:
    """The straightforward path: SimpleITK connected components of each label over the whole volume."""
    array = sitk.GetArrayFromImage(image)
    for value, size in minimum.items():
        kept = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.Equal(image, value), True), minimumObjectSize=size)
        array[(array == value) & (sitk.GetArrayViewFromImage(kept) == 0)] = 0
    return array


@pytest.mark.parametrize("seed", [0, 1])
def test_remove_small_components_matches_whole_volume_components(seed):
    array = _blobs(seed)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 3.0))
    minimum = {1: 20, 3: 5, 7: 4}  # label 7 is absent
    got = sitk.GetArrayFromImage(remove_small_components(image, minimum))
    expected = _reference_removal(image, {1: 20, 3: 5})
    assert (got != array).any(), "the phantom should have small components to remove"
    np.testing.assert_array_equal(got, expected)


def _reference_lesions(pet: np.ndarray, lab: np.ndarray, value: int) -> list[tuple[int, float, float]]:
    """(voxels, SUVmax, SUVmean) per 26-connected component over the whole volume, largest first."""
    components, count = ndimage.label(lab == value, structure=np.ones((3, 3, 3), bool))
    rows = []
    for number in range(1, count + 1):
        values = pet[components == number].astype(np.float64)
        rows.append((values.size, float(values.max()), float(values.mean())))
    return sorted(rows, key=lambda r: -r[0])


def test_lesion_statistics_in_bounding_boxes_match_whole_volume_labelling():
    lab = _blobs(3)
    pet = np.random.default_rng(4).gamma(2.0, 1.5, lab.shape).astype(np.float32)
    labels, pet_image = sitk.GetImageFromArray(lab), sitk.GetImageFromArray(pet)
    for image in (labels, pet_image):
        image.SetSpacing((2.0, 2.0, 3.0))
        image.SetOrigin((-10.0, 5.0, 30.0))
    rows = lesion_statistics(pet_image, labels, label_values=[1, 2, 9])
    for value in (1, 2):
        got = [(r.voxels, r.suv_max, r.suv_mean) for r in rows if r.label == value and r.lesion != "total"]
        expected = _reference_lesions(pet, lab, value)
        assert [g[0] for g in got] == [e[0] for e in expected]
        np.testing.assert_allclose([g[1:] for g in got], [e[1:] for e in expected], rtol=1e-12)
        total = next(r for r in rows if r.label == value and r.lesion == "total")
        assert total.voxels == int((lab == value).sum())
        np.testing.assert_allclose(total.suv_mean, pet[lab == value].astype(np.float64).mean(), rtol=1e-12)
    assert not [r for r in rows if r.label == 9]


def test_profile_stages_are_exclusive_and_add_up():
    with profiling() as profile:
        with stage("outer"):
            with stage("inner"):
                sum(range(20000))
        with stage("inner"):
            pass
    with stage("nobody listens"):  # no active profile: a no-op
        pass
    d = profile.as_dict()
    assert set(d["stages"]) == {"outer", "inner", "other"} and profile.calls["inner"] == 2
    assert abs(sum(d["stages"].values()) - d["wall_s"]) < 2e-3


def test_segment_profile_reports_every_stage(tmp_path, capsys):
    from test_segment import _model_folder  # the tiny model folder of the segment tests

    from dinomed.synthetic import make_phantom

    phantom = make_phantom(5, shape=(8, 32, 32), n_lesions=2)
    sitk.WriteImage(phantom.ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(phantom.pet, str(tmp_path / "pet.nii.gz"))
    model = _model_folder(tmp_path / "model", favour=1)
    rc = main(["segment", "--model", str(model), "--ct", str(tmp_path / "ct.nii.gz"), "--pet", str(tmp_path / "pet.nii.gz"),
               "--out", str(tmp_path / "seg.nii.gz"), "--stats", str(tmp_path / "les.csv"), "--events", "--profile"])
    captured = capsys.readouterr()
    assert rc == 0
    done = [json.loads(line) for line in captured.out.splitlines() if '"done"' in line][-1]
    stages = done["stages"]
    for name in ("read", "resample PET", "normalise", "model", "argmax", "post-process", "lesion statistics", "write",
                 "load model", "import models", "other"):
        assert name in stages and stages[name] >= 0.0, name
    assert "lesion statistics" in captured.err and "wall" in captured.err
    assert label_entries()  # the model's labels are the phantom's


@pytest.mark.parametrize("decoder", ["patch_decode", "progressive"])
def test_prepared_model_gives_the_labels_of_the_plain_path(decoder):
    """predict_volume with the CPU-prepared model (channels-last) and max-indices labels equals the plain model's
    logits argmax slice by slice, on a small PET/CT phantom."""
    import copy

    import torch

    from dinomed.inference.predict import class_labels, predict_volume, prepare_for_inference
    from dinomed.inference.segment import model_channels
    from dinomed.models import build_model, model_json_template
    from dinomed.synthetic import make_phantom

    phantom = make_phantom(11, shape=(8, 48, 40), n_lesions=2)
    model = build_model({"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 10,
                         "decoder": decoder, "decoder_channels": [16, 16, 8, 8]}).eval()
    model_json = model_json_template(model, name="t", labels=label_entries(), inference={"batch_size": 4})
    pet = sitk.Resample(phantom.pet, phantom.ct, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    channels = np.stack(model_channels(model_json, phantom.ct, pet))  # (C, Z, Y, X)
    with torch.inference_mode():
        plain = model(torch.from_numpy(np.ascontiguousarray(channels.transpose(1, 0, 2, 3))))
    expected = plain.argmax(dim=1).numpy().astype(np.uint8)
    np.testing.assert_array_equal(class_labels(plain), expected)
    prepared = prepare_for_inference(copy.deepcopy(model), "cpu")
    assert prepared.decoder.classifier.weight.is_contiguous(memory_format=torch.channels_last)
    got = predict_volume(prepared, model_json, channels)
    top2 = torch.topk(plain, 2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]).numpy() > 1e-4  # float rounding may only flip near-ties
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], expected[clear])


def _compile_case(depth: int = 10, size=(40, 36)):
    """A tiny MedDINOv3 with the official decoder, its model.json, and the normalised PET/CT input of a phantom."""
    import torch

    from dinomed.inference.predict import prepare_for_inference
    from dinomed.inference.segment import model_channels
    from dinomed.models import build_model, model_json_template
    from dinomed.synthetic import make_phantom

    torch.manual_seed(3)
    phantom = make_phantom(12, shape=(depth, *size), n_lesions=2)
    model = build_model({"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 10,
                         "decoder": "patch_decode"})
    model = prepare_for_inference(model, "cpu")
    model_json = model_json_template(model, name="t", labels=label_entries(), inference={"batch_size": 4})
    pet = sitk.Resample(phantom.pet, phantom.ct, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return model, model_json, model_channels(model_json, phantom.ct, pet)


@pytest.mark.slow
def test_compiled_forward_gives_the_eager_labels(tmp_path, monkeypatch):
    """``predict_volume(compile=True)``: torch.compile (real TorchInductor, a real C++ build) on batches of 4 with
    the last batch of 2 padded; the labels equal the eager model's, the first batch was checked, the compiled code
    went to the cache folder, and the 'compile' stage is kept out of 'model'."""
    from dinomed.inference import compiled as compiled_mod
    from dinomed.inference.predict import predict_volume

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model, model_json, channels = _compile_case()
    eager = predict_volume(model, model_json, channels)
    made = []
    real = compiled_mod.CompiledForward
    monkeypatch.setattr(compiled_mod, "CompiledForward", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    logs, warns = [], []
    with profiling() as profile:
        got = predict_volume(model, model_json, channels, compile=True, log=logs.append, warn=warns.append)
    assert warns == []
    forward = made[0]
    assert forward.status == "compiled" and forward.batch_size == 4 and forward.label_mismatch <= 1e-4
    np.testing.assert_array_equal(got, eager)
    assert any("cached in" in m for m in logs) and any("compiled in" in m for m in logs)
    assert any((tmp_path / "inductor").rglob("*")), "TorchInductor wrote nothing to the cache folder"
    stages = profile.as_dict()["stages"]
    assert stages["compile"] >= forward.compile_seconds * 0.9 and stages["model"] < stages["compile"]


@pytest.mark.slow
def test_compiled_forward_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch):
    """A compiler that is not there (TorchInductor's real C++ build pointed at a missing g++) and a compiled result
    that fails the check both end in the eager model's labels and one warning that says why."""
    import torch._inductor.config as inductor_config

    from dinomed.inference import compiled as compiled_mod
    from dinomed.inference.predict import predict_volume

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model, model_json, channels = _compile_case(depth=9, size=(36, 44))  # shapes no other test compiled
    eager = predict_volume(model, model_json, channels)

    warns = []
    with inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-g++"),), "fx_graph_cache": False}):
        got = predict_volume(model, model_json, channels, compile=True, warn=warns.append)
    np.testing.assert_array_equal(got, eager)
    assert len(warns) == 1 and "compilation failed" in warns[0] and "uncompiled (eager)" in warns[0]

    warns = []
    monkeypatch.setattr(compiled_mod, "LOGIT_TOLERANCE", -1.0)  # no compiled result can pass a negative tolerance
    got = predict_volume(model, model_json, channels, compile=True, warn=warns.append)
    np.testing.assert_array_equal(got, eager)
    assert len(warns) == 1 and "differs from the eager model" in warns[0]


def test_compile_option_is_off_by_default_and_3d_models_say_they_run_eager(monkeypatch):
    import torch

    from dinomed.cli import build_parser
    from dinomed.inference.predict import predict_volume
    from dinomed.models import build_model, model_json_template

    monkeypatch.delenv("DINOMED_COMPILE", raising=False)
    parser = build_parser()
    base = ["segment", "--model", "m", "--ct", "ct.nii.gz", "--out", "o.nii.gz"]
    assert parser.parse_args(base).compile is False
    assert parser.parse_args(base + ["--compile"]).compile is True
    monkeypatch.setenv("DINOMED_COMPILE", "1")
    assert build_parser().parse_args(base).compile is True

    torch.manual_seed(0)
    model = build_model({"name": "slicewise3d", "backbone": "vit_tiny", "in_chans": 1, "num_classes": 3,
                         "decoder_channels": [16, 16, 8, 8]}).eval()
    model_json = model_json_template(model, name="t3d", labels=label_entries()[:2],
                                     inference={"roi_size": [4, 32, 32], "batch_size": 1})
    image = np.random.default_rng(0).standard_normal((1, 6, 40, 36)).astype(np.float32)
    eager = predict_volume(model, model_json, image)
    warns = []
    np.testing.assert_array_equal(predict_volume(model, model_json, image, compile=True, warn=warns.append), eager)
    assert warns == ["--compile applies to slice-wise (2D) models; this 3D model runs uncompiled (eager)"]


@pytest.mark.slow
def test_inference_benchmark_runs_end_to_end(tmp_path):
    """``benchmarks/inference.py`` on a tiny case (its real children: the ViT's segment_files under the profiler,
    the DynUNet peer, the whole-volume pipeline run): it reports both rows, the ratio and every stage, the
    once-per-process import apart. Speed is not asserted (README rule); that the script runs is."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo / "core_lib" / "src"),
                                                                    os.environ.get("PYTHONPATH")])))
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / "inference.py"), "--arch", "vit_tiny",
                           "--shape", "16", "64", "64", "--slices", "8", "--unet-crop", "16", "64", "64",
                           "--repeats", "1", "--threads", "1", "--cache", str(tmp_path / "cache"), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DynUNet / MedDINOv3 vit_tiny" in done.stdout and "| import models |" in done.stdout
    result = json.loads(out.read_text())
    vit, unet = result["rows"]
    assert vit["short"] == "ViT" and unet["short"] == "DynUNet"
    for row in (vit, unet):
        assert row["wall_s"] > row["model_s"] > 0 and 0 < row["fraction"] and row["peak_rss_mb"] > 0
    assert 0 < vit["once_s"] < vit["rest_s"] and unet["once_s"] == 0.0
    for name in ("model", "read", "resample PET", "normalise", "post-process", "lesion statistics", "write"):
        assert name in vit["stages"], name
    assert result["pipeline_runs"] and result["pipeline_runs"][0]["lesions"] >= 0


def test_benchmark_flop_counter_counts_cpu_attention():
    """torch's FlopCounterMode has no formula for the CPU's fused attention kernel and counts it as zero; the
    benchmark's counter gives it the same 4·B·heads·N²·d as the explicit products, so a ViT's achieved fraction of
    matmul is not understated."""
    import importlib.util
    from pathlib import Path

    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "inference.py"
    spec = importlib.util.spec_from_file_location("dinomed_bench_inference", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    b, heads, n, d = 2, 3, 37, 16
    q, k, v = (torch.randn(b, heads, n, d) for _ in range(3))
    expected = 4 * b * heads * n * n * d
    explicit = FlopCounterMode(display=False)
    with torch.inference_mode(), explicit:
        (q @ k.transpose(-1, -2)).softmax(-1) @ v
    assert explicit.get_total_flops() == expected
    counter = bench.flop_counter()
    with torch.inference_mode(), counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == expected
    # and through a whole block: attention on top of the linear layers torch already counted
    block = torch.nn.MultiheadAttention(heads * d, heads, batch_first=True).eval()
    x = torch.randn(b, n, heads * d)
    plain = FlopCounterMode(display=False)
    with torch.inference_mode(), plain:
        block(x, x, x, need_weights=False)
    assert bench.flops_of(lambda t: block(t, t, t, need_weights=False), x) == plain.get_total_flops() + expected


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32", "float64", "uint16", "nan"])
def test_value_range_equals_itk(dtype):
    """``safety.value_range`` (torch.aminmax on the image's buffer where torch can) gives ITK's
    MinimumMaximumImageFilter's values: for the types torch reduces, for one it does not (uint16), and for a float
    volume holding NaN (ITK's answer)."""
    from dinomed.safety import value_range

    rng = np.random.default_rng(3)
    array = rng.normal(0, 300, (9, 17, 13))
    if dtype == "nan":
        array = array.astype(np.float32)
        array[4, 5, 6] = np.nan
    elif dtype in ("uint8", "uint16"):
        array = np.abs(array).astype(dtype)
    else:
        array = array.astype(dtype)
    image = sitk.GetImageFromArray(array)
    itk = sitk.MinimumMaximumImageFilter()
    itk.Execute(image)
    expected = (itk.GetMinimum(), itk.GetMaximum())
    assert value_range(image) == expected
    vector = sitk.Compose(image, image)  # a vector image has no scalar range in torch's sense: ITK's filter
    with pytest.raises(RuntimeError):
        itk.Execute(vector)
    with pytest.raises(RuntimeError):
        value_range(vector)
