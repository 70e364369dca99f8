"""Finetuning: config, dataset checks, splits, patches, schedules, the loop (Dice rises), exact resume, events."""
from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dinomed.errors import DinomedError
from dinomed.events import EventWriter, parse_event
from dinomed.finetune import (DatasetError, finetune, load_config, open_dataset, parse_overrides, split_cases,
                              validate_dataset)
from dinomed.finetune.trainer import STATE_DIR, STATE_FILE, parameter_groups
from dinomed.training import lr_factor
from dinomed.finetune.transforms import PatchSampler, StepIndices
from dinomed.synthetic.writers import write_nnunet_dataset

SHAPE = (32, 64, 64)
SEEDS = (1, 3, 4, 8)  # 32x64x64 phantoms that all hold lesions, liver and kidneys
# small runs: 32x32 patches, a few steps; the Dice test uses the tiny recipe as it is
QUICK = ["data.patch_size=[32,32]", "train.max_steps=6", "train.val_every=3", "train.log_every=1",
         "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("petct") / "Dataset001_phantoms"
    write_nnunet_dataset(root, seeds=SEEDS, shape=SHAPE)
    return root


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tiny(*overrides):
    return load_config("tiny_meddinov3", list(overrides))


def events_of(buffer: io.StringIO) -> list[dict]:
    parsed = [parse_event(line) for line in buffer.getvalue().splitlines()]
    assert all(p is not None for p in parsed), "every stdout line must be an event"
    return parsed


# --- config ----------------------------------------------------------------------------------------------


def test_config_recipe_overrides_and_unknown_keys(tmp_path):
    cfg = tiny("optim.lr=3e-4", "data.patch_size=[32,32]", "model.backbone_checkpoint=/ckpt/ct.pth", "name=x")
    assert cfg["optim"]["lr"] == pytest.approx(3e-4)
    assert cfg["data"]["patch_size"] == [32, 32]
    assert cfg["model"] == {"name": "meddinov3", "backbone": "vit_tiny", "decoder": "progressive",
                            "decoder_channels": [32, 32, 16, 16], "backbone_checkpoint": "/ckpt/ct.pth"}
    assert cfg["train"]["batch_size"] == 4  # from the recipe
    assert cfg["optim"]["weight_decay"] == 0.05  # from the defaults
    with pytest.raises(DinomedError, match="unknown config key 'optim.learning_rate'"):
        tiny("optim.learning_rate=1")
    with pytest.raises(DinomedError, match="expected key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(DinomedError, match="data.patch_size"):
        tiny("data.patch_size=[32]")
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny_meddinov3\ntrain:\n  max_steps: 7\n")
    cfg = load_config(child)
    assert cfg["train"]["max_steps"] == 7 and cfg["model"]["backbone"] == "vit_tiny"
    with pytest.raises(DinomedError, match="no such config file"):
        load_config("no_such_recipe")


def test_config_preprocessing_and_schedule_keys():
    cfg = tiny("preprocessing.target_spacing=[1.5,1.5,3]", "preprocessing.input_scale=2")
    assert cfg["preprocessing"] == {"channels": None, "target_spacing": [1.5, 1.5, 3], "input_scale": 2}
    spec = [{"modality": "CT", "kind": "window", "low": -1000, "high": 1000}]
    assert load_config("tiny_meddinov3", {"preprocessing": spec})["preprocessing"]["channels"] == spec  # the earlier form
    with pytest.raises(DinomedError, match="preprocessing.target_spacing"):
        tiny("preprocessing.target_spacing=[1,1]")
    # a null z keeps each case's own slice spacing (2D models); x and y must be given
    assert tiny("preprocessing.target_spacing=[3,3,null]")["preprocessing"]["target_spacing"] == [3, 3, None]
    for bad in ("[null,1,1]", "[1,1,0]", "[1,true,1]"):
        with pytest.raises(DinomedError, match="preprocessing.target_spacing"):
            tiny(f"preprocessing.target_spacing={bad}")
    with pytest.raises(DinomedError, match="preprocessing.input_scale"):
        tiny("preprocessing.input_scale=0")
    with pytest.raises(DinomedError, match="optim.schedule"):
        tiny("optim.schedule=step")


def test_lr_schedules():
    linear = lr_factor("linear", 0, 100, 0.01)
    assert [linear(s) for s in (0, 50, 100)] == [1.0, 0.5, 0.0]  # MedDINOv3: poly 1.0 from the first step
    plateau = lr_factor("plateau", 4, 100, 0.01)
    assert [plateau(s) for s in (0, 3, 4, 99)] == [0.25, 1.0, 1.0, 1.0]  # the plateau scheduler owns the rest


def test_every_bundled_recipe_loads():
    from dinomed.finetune.config import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert "tiny_meddinov3" in names
    for name in names:
        cfg = load_config(name)
        assert cfg["model"]["name"]


# --- dataset checks: each a clear error naming the case, before training --------------------------------


def _expect_refused(cfg, data, out, match):
    with pytest.raises(DatasetError, match=match):
        finetune(cfg, data, out)
    assert not (out / "model.json").exists() and not (out / STATE_DIR / STATE_FILE).exists()


def test_empty_dataset_is_refused(dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path / "data")
    for f in (data / "labelsTr").iterdir():
        f.unlink()
    for f in (data / "imagesTr").iterdir():
        f.unlink()
    _expect_refused(tiny(*QUICK), data, tmp_path / "out", "the dataset is empty")


def test_label_geometry_mismatch_names_the_case(dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path / "data")
    path = data / "labelsTr" / "case_0003.nii.gz"
    label = sitk.ReadImage(str(path))
    label.SetOrigin([o + 5.0 for o in label.GetOrigin()])
    sitk.WriteImage(label, str(path))
    _expect_refused(tiny(*QUICK), data, tmp_path / "out", r"case case_0003: the label map .* not on the grid .*origin")


def test_unnamed_label_value_names_the_case(dataset, tmp_path, set_first_label_voxel):
    cfg = tiny(*QUICK, "labels=[lesion, liver]", "background_labels=[spleen, lung, heart, urinary_bladder, bone, brain]")
    # kidney (4) is in the phantoms but neither learned nor folded into background
    with pytest.raises(DatasetError, match=r"case case_\d+ .*label value\(s\) 4 \(kidney, not among"):
        finetune(cfg, dataset, tmp_path / "out")
    data = copy_dataset(dataset, tmp_path / "data")
    set_first_label_voxel(data / "labelsTr" / "case_0004.nii.gz", 42)
    _expect_refused(tiny(*QUICK), data, tmp_path / "out", r"case case_0004 .*42 \(not in dataset.json labels\)")


def test_missing_channel_names_the_case(dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path / "data")
    (data / "imagesTr" / "case_0008_0001.nii.gz").unlink()
    _expect_refused(tiny(*QUICK), data, tmp_path / "out", r"case case_0008: the PET channel is missing")
    with pytest.raises(DatasetError, match="reads a MR channel but dataset.json has none"):
        open_dataset(dataset, ["CT", "MR"])


def test_validate_counts_classes_per_case(dataset):
    spec = open_dataset(dataset, ["CT", "PET"], ["lesion", "liver"], ["spleen", "kidney", "lung", "heart",
                                                                       "urinary_bladder", "bone", "brain"])
    counts = validate_dataset(spec)
    assert sorted(counts) == ["case_0001", "case_0003", "case_0004", "case_0008"]
    assert all(c.shape == (3,) and c.sum() == np.prod(SHAPE) for c in counts.values())
    assert spec.labels.entries[0]["terminology"]["type"][1] == "108369006"  # lesion entry carries SNOMED-CT


# --- splits, patches, schedule, parameter groups ------------------------------------------------------------


def test_split_by_case_is_seeded_and_folds_partition():
    names = [f"c{i:02d}" for i in range(10)]
    a = split_cases(names, {"val_fraction": 0.2, "split_seed": 3})
    assert a == split_cases(list(reversed(names)), {"val_fraction": 0.2, "split_seed": 3})
    assert len(a[1]) == 2 and not set(a[0]) & set(a[1])
    held = [split_cases(names, {"folds": 5, "fold": k, "split_seed": 0})[1] for k in range(5)]
    assert sorted(sum(held, [])) == names
    assert split_cases(names, {"val_cases": ["c03"]})[1] == ["c03"]
    with pytest.raises(DatasetError, match="at least 2"):
        split_cases(["only"], {"val_fraction": 0.2})


def test_patches_are_a_function_of_seed_and_index(dataset):
    from dinomed.finetune import load_case

    cfg = tiny(*QUICK)
    spec = open_dataset(dataset, cfg["inputs"], cfg["labels"], cfg["background_labels"])
    from dinomed.preprocess import default_spec

    specs = [default_spec(m) for m in cfg["inputs"]]
    cache = {}

    def load(n):
        return cache.setdefault(n, load_case(spec, spec.case(n), specs))

    make = lambda: PatchSampler(spec.case_names, load, [32, 32], 4, cfg["data"], cfg["augment"], seed=5)  # noqa: E731
    s1, s2 = make(), make()
    p = s1.sample(7)
    assert p["image"].shape == (2, 32, 32) and p["label"].shape == (1, 32, 32) and p["label"].dtype == torch.long
    for index in (7, 3, 7, 100):  # order and history do not matter
        assert torch.equal(s1.sample(index)["image"], s2.sample(index)["image"])
    # crops are biased to the classes: most patches hold foreground
    assert np.mean([int(s1.sample(i)["label"].max() > 0) for i in range(20)]) > 0.6
    # DDP shares: two ranks together are exactly the global batch
    whole = list(StepIndices(2, 4, 4))
    assert sorted(list(StepIndices(2, 4, 4, 0, 2)) + list(StepIndices(2, 4, 4, 1, 2))) == whole


def test_warmup_cosine_and_lower_backbone_lr():
    f = lr_factor("cosine", 10, 110, 0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5) and f(110) == pytest.approx(0.01)
    from dinomed.models import build_model

    model = build_model({"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3,
                         "decoder_channels": [16, 16, 16, 16]})
    groups = parameter_groups(model, tiny("optim.lr=1e-3", "optim.backbone_lr_scale=0.1")["optim"])
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(1e-4)
    assert by_name["decoder.classifier.weight"]["lr"] == pytest.approx(1e-3)
    assert by_name["decoder.classifier.bias"]["weight_decay"] == 0.0
    assert len(by_name) == sum(1 for p in model.parameters() if p.requires_grad)


# --- the loop ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_learns_and_writes_a_model_folder(dataset, tmp_path):
    from dinomed.inference.predict import predict_volume
    from dinomed.models import load_model_folder

    buffer = io.StringIO()
    out = tmp_path / "model"
    result = finetune(tiny(), dataset, out, events=EventWriter(enabled=True, stream=buffer), command="dinomed finetune t")
    val = [h for h in result.history if h["phase"] == "val"]
    assert [h["step"] for h in val] == [20, 40, 60]
    assert val[-1]["dice"] > val[0]["dice"] + 0.05, val
    assert val[-1]["dice_liver"] > 0.3, val
    events = events_of(buffer)
    kinds = {e["event"] for e in events}
    assert {"progress", "metric", "artifact", "log"} <= kinds
    train_losses = [e["loss"] for e in events if e["event"] == "metric" and e.get("phase") == "train"]
    assert len(train_losses) == 12 and np.mean(train_losses[-3:]) < np.mean(train_losses[:3])
    model, mj = load_model_folder(out)
    assert [lab["name"] for lab in mj["labels"]] == ["lesion", "liver", "kidney"]
    assert [i["modality"] for i in mj["inputs"]] == ["CT", "PET"]
    assert mj["inference"]["mode"] == "slicewise2d" and mj["preprocessing"]["channels"][1]["scale"] == "log1p"
    prov = mj["provenance"]
    assert prov["command"] == "dinomed finetune t" and prov["config"]["name"] == "tiny-meddinov3"
    assert prov["metrics"]["step"] == result.best_step and prov["dinomed_version"] and prov["date"]
    assert prov["data"] == str(dataset.resolve()) and len(prov["val_cases"]) == 1
    # the folder reproduces the validation score: same predict_volume, same case
    spec = open_dataset(dataset, ["CT", "PET"], prov["config"]["labels"], prov["config"]["background_labels"])
    from dinomed.finetune import load_case

    case = load_case(spec, spec.case(prov["val_cases"][0]), mj["preprocessing"]["channels"])
    pred = predict_volume(model, mj, case.image)
    assert pred.shape == SHAPE and pred.dtype == np.uint8
    inter = np.logical_and(pred == 2, case.label == 2).sum()
    dice = 2 * inter / ((pred == 2).sum() + (case.label == 2).sum())
    assert dice == pytest.approx(prov["metrics"]["dice_liver"], abs=1e-4)


def test_interrupted_run_resumes_exactly(dataset, tmp_path):
    full = finetune(tiny(*QUICK), dataset, tmp_path / "full")
    part = finetune(tiny(*QUICK, "train.stop_after=4"), dataset, tmp_path / "part")
    assert part.stopped and part.step == 4
    state = torch.load(tmp_path / "part" / STATE_DIR / STATE_FILE, weights_only=True)
    assert state["step"] == 4 and isinstance(state["rng"]["torch"], torch.Tensor)
    with pytest.raises(DinomedError, match="already holds a training run"):
        finetune(tiny(*QUICK), dataset, tmp_path / "part")
    with pytest.raises(DinomedError, match="config differs .*optim.lr"):
        finetune(tiny(*QUICK, "optim.lr=1e-2"), dataset, tmp_path / "part", resume=True)
    buffer = io.StringIO()
    resumed = finetune(tiny(*QUICK), dataset, tmp_path / "part", resume=True,
                       events=EventWriter(enabled=True, stream=buffer))
    assert resumed.step == 6 and not resumed.stopped
    losses = lambda r: [(h["step"], h["loss"]) for h in r.history if h["phase"] == "train"]  # noqa: E731
    assert losses(resumed) == losses(full)  # the same next loss, bit for bit, and every one after
    first_after = [e for e in events_of(buffer) if e["event"] == "metric" and e.get("phase") == "train"][0]
    assert first_after["step"] == 5 and first_after["loss"] == dict(losses(full))[5]
    a = torch.load(tmp_path / "full" / STATE_DIR / STATE_FILE, weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / STATE_DIR / STATE_FILE, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DinomedError, match="does not exist"):
        finetune(tiny(*QUICK), dataset, tmp_path / "nothing", resume=True)


def test_cli_finetune_events_and_errors(dataset, tmp_path, capsys):
    from dinomed.cli import main

    out = tmp_path / "m"
    rc = main(["finetune", "tiny_meddinov3", *QUICK, "train.max_steps=3", "--data", str(dataset), "--out", str(out),
               "--events"])
    assert rc == 0
    events = [parse_event(line) for line in capsys.readouterr().out.splitlines()]
    assert all(e is not None for e in events)
    assert events[-1]["event"] == "done" and events[-1]["step"] == 3
    assert any(e["event"] == "artifact" and e["kind"] == "model" for e in events)
    assert (out / "model.json").is_file() and (out / STATE_DIR / "config.yaml").is_file()
    rc = main(["finetune", "tiny_meddinov3", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--events"])
    captured = capsys.readouterr()
    assert rc == 2 and "no such dataset folder" in captured.err
    assert parse_event(captured.out.splitlines()[-1])["event"] == "error"


def test_predict_volume_is_independent_of_batch_size(dataset):
    from dinomed.inference.predict import predict_volume
    from dinomed.models import build_model, model_json_template

    model = build_model({"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3,
                         "decoder_channels": [16, 16, 16, 16]}).eval()
    mj = model_json_template(model, inference={"batch_size": 1})
    x = np.random.default_rng(0).uniform(-1, 1, (2, 5, 40, 48)).astype(np.float32)
    a = predict_volume(model, mj, x)
    mj["inference"]["batch_size"] = 8
    assert np.array_equal(a, predict_volume(model, mj, x)) and a.shape == (5, 40, 48)
    with pytest.raises(DinomedError, match="reads 2 channel"):
        predict_volume(model, mj, x[:1])
    assert not math.isnan(float(a.mean()))


def test_time_budget_ends_the_run_like_its_last_step(dataset, tmp_path):
    result = finetune(tiny(*QUICK, "train.max_steps=50", "train.val_every=50", "train.max_seconds=1e-6",
                           "train.clock=process"), dataset, tmp_path / "m")
    assert result.step == 1 and not result.stopped and result.best_step == 1
    assert (tmp_path / "m" / "model.json").is_file()
    assert [h["phase"] for h in result.history] == ["train", "val"]


def test_class_ratios_centre_patches_on_the_named_class(dataset):
    """data.class_ratios (named option): all weight on kidney puts every patch centre on kidney; a wrong length is
    refused naming the key. The augment options (noise, blur, gamma) keep shapes and stay finite."""
    from dinomed.finetune import load_case
    from dinomed.finetune.transforms import crop_ratios
    from dinomed.preprocess import default_spec

    cfg = tiny(*QUICK, "labels=[lesion, liver, kidney]", "data.class_ratios=[0, 0, 0, 1]",
               "augment.noise_prob=1", "augment.smooth_prob=1", "augment.gamma_prob=1", "augment.affine_prob=0",
               "augment.flip_prob=0")
    spec = open_dataset(dataset, cfg["inputs"], cfg["labels"], cfg["background_labels"])
    specs = [default_spec(m) for m in cfg["inputs"]]
    cache = {}
    sampler = PatchSampler(spec.case_names, lambda n: cache.setdefault(n, load_case(spec, spec.case(n), specs)),
                           [32, 32], 4, cfg["data"], cfg["augment"], seed=1)
    for index in range(6):
        patch = sampler.sample(index)
        assert patch["label"][0, 16, 16] == 3  # kidney at the crop centre
        assert torch.isfinite(patch["image"]).all() and patch["image"].shape == (2, 32, 32)
    plain = PatchSampler(spec.case_names, sampler.load, [32, 32], 4, {**cfg["data"], "class_ratios": None},
                         {**cfg["augment"], "noise_prob": 0, "smooth_prob": 0, "gamma_prob": 0}, seed=1)
    assert not torch.equal(plain.sample(0)["image"], sampler.sample(0)["image"])  # the options do act
    assert crop_ratios(4, 2.0, 1.0) == [1.0, 2 / 3, 2 / 3, 2 / 3]
    with pytest.raises(DinomedError, match="data.class_ratios: expected 4"):
        crop_ratios(4, 2.0, 1.0, [1, 1])
