"""The bad-input table: every kind of bad or suspicious input a careful user or QA engineer tried,
run through ``dinomed.cli.main`` in-process.

Each row: the command line, the exit status expected, words the message must hold, and for a warning the
file (sidecar or table) that must record it. For every row the inputs' bytes are unchanged afterwards; for a
refusal (exit 2) no file at all is created, in the inputs' folder or the output folder; the message of a
refusal is one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dinomed.cli import EXIT_SIGINT, EXIT_SIGTERM, main
from dinomed.commands.demo import DEMO_MODEL_DIR

MODELS = DEMO_MODEL_DIR.parent
PETCT = str(MODELS / "demo")
CT_ONLY = str(MODELS / "demo_ct_organs")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dinomed-bad-input-pwned",))


def _write(array: np.ndarray, like: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))
    return path


def _truncate(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every input of the table, made once: a tiny phantom (NIfTI and DICOM) and broken copies of it."""
    d = tmp_path_factory.mktemp("bad_inputs")
    assert main(["phantom", "--out", str(d / "p"), "--shape", "24,48,48", "--seed", "1", "--lesions", "2", "--dicom"]) == 0
    ct = sitk.ReadImage(str(d / "p" / "ct.nii.gz"))
    pet = sitk.ReadImage(str(d / "p" / "pet.nii.gz"))
    shutil.copy(d / "p" / "ct.nii.gz", d / "ct.nii.gz")
    shutil.copy(d / "p" / "pet.nii.gz", d / "pet.nii.gz")
    shutil.copy(d / "p" / "labels.nii.gz", d / "labels.nii.gz")
    ct_array = sitk.GetArrayFromImage(ct)
    _write(np.zeros_like(ct_array), ct, d / "ct_zero.nii.gz")
    _write(np.full_like(ct_array, 40), ct, d / "ct_constant.nii.gz")
    _write((ct_array.astype(np.int32) + 1024).astype(np.int16), ct, d / "ct_raw.nii.gz")
    nan_ct = ct_array.astype(np.float32)
    nan_ct[12, 24, 24], nan_ct[13, 24, 24] = np.nan, np.inf
    for suffix in ("nii.gz", "nii", "nrrd", "mha"):
        _write(nan_ct, ct, d / f"ct_nan.{suffix}")
    sitk.WriteImage(ct, str(d / "ct.nrrd"))
    sitk.WriteImage(ct, str(d / "ct.mha"))
    sitk.WriteImage(ct, str(d / "ct.nii"))
    for suffix in ("nii.gz", "nii", "nrrd", "mha"):
        _truncate(d / f"ct.{suffix}", d / f"ct_trunc.{suffix}")
    # a PET with NaN inside the lesions, on the label grid (lesions reads it without resampling)
    labels = sitk.ReadImage(str(d / "labels.nii.gz"))
    pet_on_labels = sitk.Resample(sitk.Cast(pet, sitk.sitkFloat32), labels, sitk.Transform(), sitk.sitkLinear, 0.0)
    pet_nan = sitk.GetArrayFromImage(pet_on_labels)
    pet_nan[sitk.GetArrayViewFromImage(labels) > 0] = np.nan
    _write(pet_nan, labels, d / "pet_nan.nii.gz")
    _write(sitk.GetArrayFromImage(pet_on_labels) * 5000.0, labels, d / "pet_bqml.nii.gz")
    # a PET that covers only the lower half of the CT, and a lesion in the upper half
    half = pet.GetSize()[2] // 2
    sitk.WriteImage(pet[:, :, :half], str(d / "pet_half.nii.gz"))
    blob = np.zeros(ct_array.shape, np.uint8)
    blob[ct_array.shape[0] - 4:ct_array.shape[0] - 1, 20:26, 20:26] = 1
    _write(blob, ct, d / "lesion_top.nii.gz")
    # DICOM: a truncated slice, a missing slice, a folder mixing the CT and PET series
    shutil.copytree(d / "p" / "ct_dicom", d / "dicom_trunc")
    victim = sorted((d / "dicom_trunc").iterdir())[10]
    _truncate(victim, victim)
    shutil.copytree(d / "p" / "ct_dicom", d / "dicom_gap")
    sorted((d / "dicom_gap").iterdir())[12].unlink()
    (d / "dicom_mixed").mkdir()
    for folder in ("ct_dicom", "pet_dicom"):
        for f in (d / "p" / folder).iterdir():
            shutil.copy(f, d / "dicom_mixed" / f"{folder}_{f.name}")
    # checkpoints: six bytes of text, random bytes, a pickle that would run code
    (d / "text.pth").write_bytes(b"hello\n")
    (d / "random.pth").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    torch.save({"cls_token": _Exploit()}, d / "evil.pth")
    (d / "run").mkdir()
    torch.save({"teacher": {}}, d / "run" / "teacher_checkpoint.pth")
    (d / "bad.yaml").write_text("train:\n  lr: [1, 2\n  x: : :\n")
    (d / "a_file").write_text("not a folder\n")
    os.symlink(d / "pet.nii.gz", d / "pet_link.nii.gz")
    # a small labelled dataset for evaluate
    assert main(["phantom", "--out", str(d / "dataset"), "--shape", "16,48,48", "--cases", "2", "--seed", "5"]) == 0
    return d


def _series_uid(folder: Path, modality: str) -> str:
    from dinomed.io.dicom import list_dicom_series

    return next(s["uid"] for s in list_dicom_series(folder) if s["modality"] == modality)


@dataclass
class Case:
    """One row of the table. ``argv(d, o)`` builds the command line from the inputs folder ``d`` and an empty
    output folder ``o``; ``record`` names the output (relative to ``o``) that must hold ``record_words``."""

    argv: Callable[[Path, Path], list[str]]
    exit: int
    words: tuple[str, ...]
    absent: tuple[str, ...] = ()
    record: str | None = None
    record_words: tuple[str, ...] = ()
    marks: tuple = field(default_factory=tuple)


SEG = lambda *extra: (lambda d, o: ["segment", "--device", "cpu", *[a.format(d=d, o=o) for a in extra]])  # noqa: E731
CMD = lambda *argv: (lambda d, o: [a.format(d=d, o=o) for a in argv])  # noqa: E731

CASES: dict[str, Case] = {
    # ---- data loss: an output that names an input ----
    "segment_out_is_ct": Case(SEG("--model", PETCT, "--ct", "{d}/ct.nii.gz", "--pet", "{d}/pet.nii.gz", "--out", "{d}/ct.nii.gz"),
                              2, ("same file", "--ct", "ct.nii.gz")),
    "segment_out_is_pet_via_symlink": Case(SEG("--model", PETCT, "--ct", "{d}/ct.nii.gz", "--pet", "{d}/pet.nii.gz",
                                               "--out", "{d}/pet_link.nii.gz"), 2, ("same file", "--pet")),
    "segment_stats_is_labels_sidecar": Case(SEG("--model", PETCT, "--ct", "{d}/ct.nii.gz", "--pet", "{d}/pet.nii.gz",
                                                "--out", "{o}/seg.nii.gz", "--stats", "{o}/seg.labels.json"), 2, ("same file",)),
    "features_pca_is_image": Case(CMD("features", "--image", "{d}/ct.nii.gz", "--arch", "vit_tiny", "--random-init",
                                      "--pca", "{d}/ct.nii.gz"), 2, ("same file", "--image")),
    "features_cosine_out_is_image": Case(CMD("features", "--image", "{d}/ct.nii.gz", "--arch", "vit_tiny", "--random-init",
                                             "--cosine", "10,10,5", "--cosine-out", "{d}/ct.nii.gz"), 2, ("same file", "--image")),
    "export_backbone_out_is_teacher": Case(CMD("export-backbone", "{d}/run", "--out", "{d}/run/teacher_checkpoint.pth"),
                                           2, ("same file", "teacher_checkpoint.pth")),
    # ---- outputs that cannot be written: refused before any work ----
    "segment_out_parent_is_file": Case(SEG("--model", PETCT, "--ct", "{d}/ct.nii.gz", "--pet", "{d}/pet.nii.gz",
                                           "--out", "{d}/a_file/seg.nii.gz"), 2, ("is a file",)),
    "segment_out_unwritable": Case(SEG("--model", PETCT, "--ct", "{d}/ct.nii.gz", "--pet", "{d}/pet.nii.gz",
                                       "--out", "/proc/dinomed/seg.nii.gz"), 2, ("not writable",)),
    "segment_out_bad_suffix": Case(SEG("--model", PETCT, "--ct", "{d}/ct.nii.gz", "--out", "{o}/seg.png"), 2, (".nii.gz",)),
    "lesions_json_bad_suffix_before_csv": Case(CMD("lesions", "--pet", "{d}/pet.nii.gz", "--seg", "{d}/labels.nii.gz",
                                                   "--out", "{o}/t.csv", "--json", "{o}/t.txt"), 2, (".json",)),
    "evaluate_out_bad_suffix": Case(CMD("evaluate", "--model", CT_ONLY, "--data", "{d}/dataset", "--out", "{o}/m.txt",
                                        "--device", "cpu"), 2, (".csv", ".json")),
    # ---- NaN / Inf: one policy for every format ----
    **{f"segment_nan_{s.replace('.', '_')}": Case(SEG("--model", CT_ONLY, "--ct", f"{{d}}/ct_nan.{s}", "--out", "{o}/seg.nii.gz"),
                                                   2, ("NaN or infinite", f"ct_nan.{s}", "2 of"))
       for s in ("nii.gz", "nii", "nrrd", "mha")},
    "features_nan_nrrd": Case(CMD("features", "--image", "{d}/ct_nan.nrrd", "--arch", "vit_tiny", "--random-init",
                                  "--pca", "{o}/pca.nrrd"), 2, ("NaN or infinite",)),
    "lesions_nan_inside_lesion": Case(CMD("lesions", "--pet", "{d}/pet_nan.nii.gz", "--seg", "{d}/labels.nii.gz",
                                          "--out", "{o}/t.csv"), 2, ("NaN or infinite", "pet_nan.nii.gz")),
    # ---- truncated files of every format ----
    **{f"segment_truncated_{s.replace('.', '_')}": Case(SEG("--model", CT_ONLY, "--ct", f"{{d}}/ct_trunc.{s}", "--out", "{o}/seg.nii.gz"),
                                                         2, ("truncated", f"ct_trunc.{s}"))
       for s in ("nii.gz", "nii", "nrrd", "mha")},
    "segment_truncated_dicom_slice": Case(SEG("--model", CT_ONLY, "--ct", "{d}/dicom_trunc", "--out", "{o}/seg.nii.gz"),
                                          2, ("truncated",)),
    "segment_dicom_missing_slice": Case(SEG("--model", CT_ONLY, "--ct", "{d}/dicom_gap", "--out", "{o}/seg.nii.gz"),
                                        2, ("missing", "gap")),
    "segment_mixed_dicom_folder": Case(SEG("--model", CT_ONLY, "--ct", "{d}/dicom_mixed", "--out", "{o}/seg.nii.gz"),
                                       2, ("2 DICOM series", "--ct-series")),
    # ---- modality and units ----
    "segment_ct_and_pet_swapped": Case(SEG("--model", PETCT, "--ct", "{d}/pet.nii.gz", "--pet", "{d}/ct.nii.gz",
                                           "--out", "{o}/seg.nii.gz"), 2, ("Hounsfield", "--pet"), absent=("activity",)),
    "segment_ct_dicom_as_pet": Case(SEG("--model", PETCT, "--ct", "{d}/ct.nii.gz", "--pet", "{d}/p/ct_dicom",
                                        "--out", "{o}/seg.nii.gz"), 2, ("Modality is CT",)),
    "segment_pet_in_bqml": Case(SEG("--model", PETCT, "--ct", "{d}/ct.nii.gz", "--pet", "{d}/pet_bqml.nii.gz",
                                    "--out", "{o}/seg.nii.gz"), 2, ("Bq/ml", "dinomed suv")),
    "lesions_ct_as_pet": Case(CMD("lesions", "--pet", "{d}/ct.nii.gz", "--seg", "{d}/labels.nii.gz", "--out", "{o}/t.csv"),
                              2, ("Hounsfield",)),
    "lesions_negative_label": Case(CMD("lesions", "--pet", "{d}/pet.nii.gz", "--seg", "{d}/labels.nii.gz", "--out", "{o}/t.csv",
                                       "--labels", "-1"), 2, ("positive", "-1")),
    "lesions_absent_label": Case(CMD("lesions", "--pet", "{d}/pet.nii.gz", "--seg", "{d}/labels.nii.gz", "--out", "{o}/t.csv",
                                     "--labels", "42"), 2, ("42", "do not occur")),
    # ---- warnings: legal but suspicious, recorded in the output ----
    "segment_all_zero_ct_warns": Case(SEG("--model", CT_ONLY, "--ct", "{d}/ct_zero.nii.gz", "--out", "{o}/seg.nii.gz"),
                                      0, ("WARNING", "constant"), record="seg.labels.json", record_words=("constant",)),
    "segment_constant_ct_warns": Case(SEG("--model", CT_ONLY, "--ct", "{d}/ct_constant.nii.gz", "--out", "{o}/seg.nii.gz"),
                                      0, ("WARNING", "constant"), record="seg.labels.json", record_words=("every voxel",)),
    "segment_ct_not_hu_warns": Case(SEG("--model", CT_ONLY, "--ct", "{d}/ct_raw.nii.gz", "--out", "{o}/seg.nii.gz"),
                                    0, ("WARNING", "RescaleIntercept"), record="seg.labels.json", record_words=("Hounsfield",)),
    "segment_pet_file_as_ct_warns": Case(SEG("--model", CT_ONLY, "--ct", "{d}/pet.nii.gz", "--out", "{o}/seg.nii.gz"),
                                         0, ("WARNING", "PET"), record="seg.labels.json", record_words=("looks like a PET",)),
    "segment_pet_dicom_as_ct_warns": Case(SEG("--model", CT_ONLY, "--ct", "{d}/p/pet_dicom", "--out", "{o}/seg.nii.gz"),
                                          0, ("WARNING", "Modality is PT"), record="seg.labels.json", record_words=("Modality is PT",)),
    "segment_ct_only_model_given_pet_warns": Case(
        SEG("--model", CT_ONLY, "--ct", "{d}/ct.nii.gz", "--pet", "{d}/pet.nii.gz", "--out", "{o}/seg.nii.gz",
            "--stats", "{o}/stats.csv"),
        0, ("WARNING", "not used"), record="seg.labels.json", record_words=("reads only CT",)),
    "lesions_outside_pet_fov_warns": Case(CMD("lesions", "--pet", "{d}/pet_half.nii.gz", "--seg", "{d}/lesion_top.nii.gz",
                                              "--out", "{o}/t.csv", "--labels", "1"),
                                          0, ("WARNING", "field of view"), record="t.csv", record_words=("outside_pet_fov_voxels",)),
    "segment_mixed_dicom_with_ct_series": Case(
        lambda d, o: ["segment", "--device", "cpu", "--model", CT_ONLY, "--ct", f"{d}/dicom_mixed", "--ct-series",
                      _series_uid(d / "dicom_mixed", "CT"), "--out", f"{o}/seg.nii.gz"],
        0, ("segmented",), record="seg.labels.json", record_words=("demo-ct-organs",)),
    "features_cache_unwritable_warns": Case(CMD("features", "--image", "{d}/ct.nii.gz", "--arch", "vit_tiny", "--random-init",
                                                "--pca", "{o}/pca.nrrd", "--cache", "/proc/dinomed-cache"),
                                            0, ("WARNING", "cache"), record="pca.nrrd"),
    "evaluate_out_json_writes_json": Case(CMD("evaluate", "--model", CT_ONLY, "--data", "{d}/dataset", "--out", "{o}/m.json",
                                              "--device", "cpu"), 0, (), record="m.json", record_words=('"mean"',),
                                          marks=(pytest.mark.slow,)),
    # ---- one line instead of a traceback ----
    "info_six_byte_text_pth": Case(CMD("info", "{d}/text.pth"), 2, ("not a PyTorch checkpoint",)),
    "features_backbone_text_pth": Case(CMD("features", "--image", "{d}/ct.nii.gz", "--backbone", "{d}/text.pth",
                                           "--pca", "{o}/pca.nrrd"), 2, ("not a PyTorch checkpoint",)),
    "info_random_bytes_pth": Case(CMD("info", "{d}/random.pth"), 2, ("not a PyTorch checkpoint",), absent=("pickle",)),
    "info_malicious_pickle": Case(CMD("info", "{d}/evil.pth"), 2, ("refused", "would run code", "system")),
    "phantom_huge_shape": Case(CMD("phantom", "--out", "{o}/ph", "--shape", "4000,4000,4000"), 2, ("GiB", "4000,4000,4000")),
    "phantom_out_is_a_file": Case(CMD("phantom", "--out", "{d}/a_file"), 2, ("a_file", "folder")),
    "phantom_negative_seed": Case(CMD("phantom", "--out", "{o}/ph", "--seed", "-1"), 2, ("--seed", "-1")),
    "suv_out_is_a_dicom_slice": Case(lambda d, o: ["suv", str(d / "p" / "pet_dicom"), "--out",
                                                   str(sorted((d / "p" / "pet_dicom").iterdir())[0])], 2, ("same file",)),
    "suv_out_parent_is_file": Case(CMD("suv", "{d}/p/pet_dicom", "--out", "{d}/a_file/suv.nii.gz"), 2, ("is a file",)),
    "finetune_bad_yaml": Case(CMD("finetune", "{d}/bad.yaml", "--data", "{d}/dataset", "--out", "{o}/run"), 2, ("line 3", "YAML")),
    "pretrain_bad_yaml": Case(CMD("pretrain", "{d}/bad.yaml", "--data", "{d}/p", "--out", "{o}/run"), 2, ("line 3", "YAML")),
    # ---- cases that already worked (kept from regressing) ----
    "segment_missing_ct": Case(SEG("--model", CT_ONLY, "--ct", "{d}/nope.nii.gz", "--out", "{o}/seg.nii.gz"), 2, ("no such file",)),
    "segment_model_needs_pet": Case(SEG("--model", PETCT, "--ct", "{d}/ct.nii.gz", "--out", "{o}/seg.nii.gz"), 2, ("needs a PET",)),
    "segment_stats_without_pet": Case(SEG("--model", CT_ONLY, "--ct", "{d}/ct.nii.gz", "--out", "{o}/seg.nii.gz",
                                          "--stats", "{o}/s.csv"), 2, ("need a PET",)),
    "segment_not_a_model_folder": Case(SEG("--model", "{d}/p", "--ct", "{d}/ct.nii.gz", "--out", "{o}/seg.nii.gz"), 2, ("model.json",)),
    "info_missing_file": Case(CMD("info", "{d}/nope.pth"), 2, ("no such file",)),
    "features_random_init_needs_arch": Case(CMD("features", "--image", "{d}/ct.nii.gz", "--backbone", "{d}/text.pth",
                                                "--random-init", "--pca", "{o}/pca.nrrd"), 2, ("--arch",)),
}


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


@pytest.mark.parametrize("name", [pytest.param(name, marks=case.marks) for name, case in CASES.items()])
def test_bad_input_table(name, inputs, tmp_path, capsys):
    case = CASES[name]
    out = tmp_path / "out"
    out.mkdir()
    before = _snapshot(inputs)
    argv = case.argv(inputs, out)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == case.exit, f"{argv}\n{err}"
    for word in case.words:
        assert word.lower() in err.lower(), f"{word!r} not in the message:\n{err}"
    for word in case.absent:
        assert word.lower() not in err.lower(), f"{word!r} in the message:\n{err}"
    assert _snapshot(inputs) == before, "an input was modified, or a file appeared beside the inputs"
    assert not Path("/tmp/dinomed-bad-input-pwned").exists()
    if case.exit == 2:
        error_lines = [line for line in err.splitlines() if line.startswith(f"dinomed {argv[0]}: error:")]
        assert len(error_lines) == 1 and len(err.strip().splitlines()) == 1, f"expected one line:\n{err}"
        assert len(error_lines[0]) < 600, error_lines[0]
        assert not list(out.rglob("*")), f"files left behind: {list(out.rglob('*'))}"
    if case.record:
        recorded = out / case.record
        assert recorded.is_file(), f"{recorded} was not written:\n{err}"
        if case.record.endswith(".nrrd"):
            sitk.ReadImage(str(recorded))
        else:
            text = recorded.read_text()
            for word in case.record_words:
                assert word in text, f"{word!r} not recorded in {case.record}:\n{text[:2000]}"
            if case.record.endswith(".json"):
                json.loads(text)
    if name == "lesions_outside_pet_fov_warns":
        rows = (out / "t.csv").read_text().splitlines()
        column = rows[0].split(",").index("outside_pet_fov_voxels")
        assert int(rows[1].split(",")[column]) > 0
    if name == "evaluate_out_json_writes_json":
        assert (out / "m.csv").read_text().startswith("case,")


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, EXIT_SIGTERM), (signal.SIGINT, EXIT_SIGINT)])
def test_signal_during_the_write_leaves_no_temp_file(signum, status, inputs, tmp_path, monkeypatch, capsys):
    """A stop (a GUI Cancel sends SIGTERM first) while the label map is being written: the real handler of
    ``dinomed.cli.main`` unwinds the atomic write, no hidden ``.seg.nii.gz.XXXX.tmp`` file stays, exit 143/130."""
    import dinomed.io.volumes as volumes

    real_write = volumes.sitk.WriteImage

    def write_then_signal(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)  # the temporary file exists now
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(volumes.sitk, "WriteImage", write_then_signal)
    handler_before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    code = main(["segment", "--device", "cpu", "--model", CT_ONLY, "--ct", str(inputs / "ct.nii.gz"),
                 "--out", str(out / "seg.nii.gz")])
    err = capsys.readouterr().err
    assert code == status, err
    assert "no output was left half-written" in err
    assert list(out.iterdir()) == [], list(out.iterdir())
    assert signal.getsignal(signal.SIGTERM) == handler_before  # main() called in-process restores it


@pytest.mark.slow
def test_pretrain_with_a_bad_gram_checkpoint_leaves_no_run_folder(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["pretrain", "tiny_test", "--data", str(inputs / "p"), "--out", str(run),
                 "gram.use_loss=true", f"gram.ckpt={inputs / 'text.pth'}", "crops.gram_teacher_crops_size=128",
                 "train.device=cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "text.pth" in err
    assert not run.exists(), list(run.rglob("*"))


@pytest.mark.slow
def test_finetune_whose_loss_diverges_before_a_checkpoint_leaves_no_run_folder(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["finetune", "tiny_meddinov3", "--data", str(inputs / "dataset"), "--out", str(run),
                 "optim.lr=1e20", "optim.warmup_steps=0", "train.max_steps=6", "train.device=cpu",
                 "data.patch_size=[48,48]"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "training loss became nan" in err and "no checkpoint had been saved yet" in err
    assert not run.exists(), list(run.rglob("*"))


def test_a_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    """SIGKILL (a GUI Cancel's last resort) leaves no chance to clean up: the next write of the same file removes
    the temporary files whose writing process is gone, and leaves those of live processes alone."""
    import subprocess
    import sys

    from dinomed.atomic import atomic_write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".seg.nii.gz.{int(dead.stdout)}.x1y2.tmp.nii.gz"
    live = tmp_path / f".seg.nii.gz.{os.getpid()}.x1y2.tmp.nii.gz"
    orphan.write_bytes(b"")
    live.write_bytes(b"")
    atomic_write_text(tmp_path / "seg.nii.gz", "label map")
    assert not orphan.exists() and live.exists()
    assert (tmp_path / "seg.nii.gz").read_text() == "label map"
