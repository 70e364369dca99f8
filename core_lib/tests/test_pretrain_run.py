"""Tiny real pretraining runs on synthetic phantom slices: learning, collapse floors, export, exact resume,
the Gram stage, bad input through the CLI, and a 2-process DDP (gloo) run that matches a 1-process run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dinomed.backbones import create_backbone, extract_features, load_backbone
from dinomed.cli import main
from dinomed.preprocess import default_spec, normalize_channel
from dinomed.pretrain import load_config, pretrain
from dinomed.synthetic import make_phantom

SHAPE = (12, 64, 64)


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    for seed in range(4):
        sitk.WriteImage(make_phantom(seed, shape=SHAPE).ct, str(folder / f"ct_{seed}.nii.gz"))
    return folder


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


TINY = ["train.epoch_length=3", "optim.epochs=2", "checkpointing.period=3", "train.batch_size_per_gpu=4"]


def test_resume_continues_exactly_and_export_loads(ct_folder, tmp_path):
    whole = pretrain(load_config("tiny_test", TINY + ["student.drop_path_rate=0.1"]), ct_folder, tmp_path / "whole")
    assert whole["iterations"] == 6
    cut = tmp_path / "cut"
    pretrain(load_config("tiny_test", TINY + ["student.drop_path_rate=0.1"]), ct_folder, cut, stop_after=3)
    assert [m["step"] for m in metrics(cut)] == [1, 2, 3]
    state = torch.load(cut / "checkpoint.pth", weights_only=True)  # plain tensors and Python values only
    assert state["iteration"] == 3
    pretrain(load_config("tiny_test", TINY + ["student.drop_path_rate=0.1"]), ct_folder, cut, resume=True)
    reference, resumed = metrics(tmp_path / "whole"), metrics(cut)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(reference, resumed):
        for key in ("loss", "dino_local_loss", "dino_global_loss", "koleo_loss", "ibot_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
    assert (cut / "config.yaml").is_file()
    with pytest.raises(Exception, match="--resume"):
        pretrain(load_config("tiny_test", TINY), ct_folder, cut)  # a second run into the same folder

    out = tmp_path / "backbone.pth"
    assert main(["export-backbone", str(cut), "--out", str(out)]) == 0
    model = load_backbone(out)
    report = model.load_report
    assert report.format == "meta" and report.missing == [] and report.unexpected == []
    assert report.arch == "vit_tiny" and report.in_chans == 1
    teacher = torch.load(cut / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert torch.equal(model.blocks[0].mlp.fc1.weight, teacher["backbone.blocks.0.mlp.fc1.weight"])
    assert torch.equal(torch.load(out, weights_only=True)["mask_token"], teacher["backbone.mask_token"])


def test_gram_stage_from_stage_one(ct_folder, tmp_path):
    stage1 = tmp_path / "stage1"
    pretrain(load_config("tiny_test", TINY), ct_folder, stage1)
    cfg = load_config("tiny_test", TINY + [
        "stage=2", "gram.use_loss=true", f"gram.ckpt={stage1}", f"student.init_from={stage1}",
        "crops.gram_teacher_crops_size=128", "gram.first_update_epochs=1", "gram.update_frequency_epochs=1",
        "gram.max_updates=1", "gram.loss_weight_schedule={start: 0.0, peak: 0.0, end: 2.0, warmup_epochs: 0, cosine_epochs: 1}",
        "dino.reweight_dino_local_loss=true",
    ])
    stage2 = tmp_path / "stage2"
    summary = pretrain(cfg, ct_folder, stage2)
    rows = metrics(stage2)
    assert all(np.isfinite(r["gram_loss"]) for r in rows)
    assert [r["gram_loss_weight"] for r in rows][:3] == pytest.approx([0.0, 1.0, 2.0])
    state = torch.load(stage2 / "checkpoint.pth", weights_only=True)
    assert state["gram_updates"] == 1
    # the student started from the stage-1 teacher, heads included
    t1 = torch.load(stage1 / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    from dinomed.pretrain.train import build_meta_arch

    meta = build_meta_arch(cfg)
    assert torch.equal(meta.student.dino_head.last_layer.weight, t1["dino_head.last_layer.weight"])
    assert summary["iterations"] == 6


def test_stage3_multiresolution_from_stage_one(ct_folder, tmp_path):
    """Stage 3 with the official mixing of crop resolutions: batches at 64 and 96 pixels (Gram teacher 1.5x) in
    one run; the losses stay finite and the patch grid follows each batch."""
    stage1 = tmp_path / "stage1"
    pretrain(load_config("tiny_test", TINY), ct_folder, stage1)
    cfg = load_config("tiny_test", TINY + [
        "stage=3", "gram.use_loss=true", f"gram.ckpt={stage1}", f"student.init_from={stage1}", "gram.rep_update=false",
        "crops.global_crops_size=[64, 96]", "crops.local_crops_size=[32, 48]", "crops.gram_teacher_crops_size=[96, 144]",
        "crops.global_local_crop_pairs_ratios=[0.5, 0.5]"])
    pretrain(cfg, ct_folder, tmp_path / "stage3")
    rows = metrics(tmp_path / "stage3")
    assert len(rows) == 6 and all(np.isfinite(r["loss"]) and np.isfinite(r["gram_loss"]) for r in rows)
    from dinomed.pretrain.crops import MultiCropConfig, resolution_for_step

    crops = MultiCropConfig.from_config(cfg["crops"])
    assert {resolution_for_step(crops, int(cfg["train"]["seed"]), step) for step in range(6)} == {0, 1}


def test_bad_input_through_the_cli(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pretrain", "tiny_test", "--data", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "found no CT volumes" in capsys.readouterr().err
    assert main(["pretrain", "tiny_test", "gram.use_loss=true", "crops.gram_teacher_crops_size=128",
                 "--data", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "no Gram teacher checkpoint" in capsys.readouterr().err
    assert main(["pretrain", "tiny_test", "gram.use_loss=true", "crops.gram_teacher_crops_size=128",
                 f"gram.ckpt={tmp_path / 'nothing'}", "--data", str(empty), "--out", str(tmp_path / "r")]) == 2
    # key=value overrides are also read after --data/--out
    assert main(["pretrain", "tiny_test", "--data", str(empty), "--out", str(tmp_path / "r"),
                 "gram.use_loss=true", "crops.gram_teacher_crops_size=128"]) == 2
    assert "no Gram teacher checkpoint" in capsys.readouterr().err
    assert main(["export-backbone", str(empty), "--out", str(tmp_path / "b.pth")]) == 2
    assert "teacher_checkpoint.pth" in capsys.readouterr().err


PROBE_TRAIN, PROBE_TEST = range(100, 120), range(200, 210)  # different phantoms (anatomy, size, contrast)
PROBE_SHAPE = (16, 128, 128)  # 8x8 patches of 16 pixels per slice


@pytest.fixture(scope="module")
def probe_phantoms() -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Normalised CT slices ``(z, 1, 128, 128)``, one label per 16x16 patch ``(z, 8, 8)`` (-1: not probed) and one
    label per slice ``(z,)``.

    A patch is labelled with the organ (``organs`` map; 0 = other body tissue) covering most of it and is
    probed only if that label covers at least half of it and at most half of it is air outside the organs
    (outside the body, bowel gas): air is separable by any feature and would only inflate both scores.
    """
    out = {}
    for seed in [*PROBE_TRAIN, *PROBE_TEST]:
        p = make_phantom(seed, shape=PROBE_SHAPE)
        hu = sitk.GetArrayFromImage(p.ct).astype(np.float32)
        organs = torch.from_numpy(sitk.GetArrayFromImage(p.organs).astype(np.int64))
        air = torch.from_numpy(hu < -500) & (organs == 0)

        def blocks(a):
            z, h, w = a.shape
            return a.unfold(1, 16, 16).unfold(2, 16, 16).reshape(z, h // 16, w // 16, -1)

        label = blocks(organs).mode(-1).values
        major = (blocks(organs) == label[..., None]).float().mean(-1) >= 0.5
        label[~major | (blocks(air).float().mean(-1) > 0.5)] = -1
        ct = normalize_channel(hu, default_spec("CT"))
        area = torch.stack([(organs == c).sum((1, 2)) for c in range(int(organs.max()) + 1)], 1)
        area[:, 0] = 0
        slice_label = area.argmax(1)
        slice_label[area.max(1).values == 0] = -1  # the organ with the largest area in the slice, -1: none
        out[seed] = (torch.from_numpy(ct)[:, None], label, slice_label)
    return out


def _knn_organ_accuracy(model, phantoms, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """Balanced accuracy of a k-NN probe of organ labels on the backbone's patch features.

    Train patches from phantoms ``PROBE_TRAIN``, test patches from the other phantoms ``PROBE_TEST``; classes
    with at least 10 train and 5 test patches. The classifier is DINO's weighted k-NN (Caron et al. 2021,
    sec. 4.1: 20 neighbours by cosine similarity, votes ``exp(sim / 0.07)``) with each class's votes divided
    by its number of train patches, so that the score is not the prior of the dominant "other tissue" class.
    Two feature sets, both L2-normalised: ``last`` the last block's normed patch tokens, ``concat`` the
    concatenation of the 4 blocks' normed patch tokens (each normalised), as the segmentation models use.
    """
    depth = len(model.blocks)
    feats: dict[str, list] = {"last": [], "concat": []}
    labels = []
    for seed in [*PROBE_TRAIN, *PROBE_TEST]:
        ct, label, _ = phantoms[seed]
        with torch.no_grad():
            blocks = extract_features(model.eval(), ct, layers=list(range(depth))).patches
        keep = label >= 0
        tokens = [torch.nn.functional.normalize(b, dim=1).permute(0, 2, 3, 1)[keep] for b in blocks]
        feats["last"].append(tokens[-1])
        feats["concat"].append(torch.nn.functional.normalize(torch.cat(tokens, dim=1), dim=1))
        labels.append((seed in PROBE_TEST, label[keep]))
    is_test = torch.cat([torch.full((len(y),), t) for t, y in labels])
    y = torch.cat([y for _, y in labels])
    classes = torch.tensor([int(c) for c in y.unique()
                            if (y[~is_test] == c).sum() >= 10 and (y[is_test] == c).sum() >= 5])
    result = {}
    for name, parts in feats.items():
        x = torch.cat(parts)
        x_train, y_train = x[~is_test & torch.isin(y, classes)], y[~is_test & torch.isin(y, classes)]
        x_test, y_test = x[is_test & torch.isin(y, classes)], y[is_test & torch.isin(y, classes)]
        votes = (y_train[:, None] == classes[None]).float()
        votes /= votes.sum(0, keepdim=True)
        sim, nearest = (x_test @ x_train.T).topk(k, dim=1)
        pred = classes[(torch.exp(sim / temperature)[..., None] * votes[nearest]).sum(1).argmax(1)]
        result[name] = float(np.mean([(pred[y_test == c] == c).float().mean() for c in classes]))
    return result


# floors for the teacher: CLS spread (1 = features spread over the sphere, 0 = one point) and the entropy of
# the batch-mean teacher distribution (log 64 = 4.16 nats when all 64 prototypes are used evenly)
SPREAD_FLOOR = 0.3
ENTROPY_FLOOR = 0.5 * np.log(64)
LOG_K = float(np.log(64))


@pytest.fixture(scope="module")
def tiny_run(ct_folder, tmp_path_factory) -> Path:
    """1,000 iterations of the tiny config (~75 s on two cores), exported with the CLI."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    pretrain(load_config("tiny_test", ["optim.epochs=100", "checkpointing.period=500"]), ct_folder, run)
    assert main(["export-backbone", str(run), "--out", str(run / "backbone.pth")]) == 0
    return run


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


@pytest.mark.slow
def test_tiny_run_learns_without_collapse(tiny_run):
    """The DINO and iBOT losses (not only KoLeo) fall below their uniform value log K, the teacher's per-image
    targets sharpen, and the teacher does not collapse (CLS spread and batch-mean entropy above their floors)."""
    rows = metrics(tiny_run)
    first, last = rows[:20], rows[-100:]
    assert _mean(last, "loss") < _mean(first, "loss") - 0.5
    # uniform targets give exactly log K; an ibot_loss is per global crop and half of them are masked
    assert _mean(first, "dino_global_loss") == pytest.approx(LOG_K, abs=0.03)
    assert _mean(last, "dino_global_loss") < LOG_K - 0.3
    assert _mean(last, "dino_local_loss") < LOG_K - 0.2
    assert _mean(last, "ibot_loss") < _mean(first, "ibot_loss") - 0.05
    assert _mean(last, "dino_target_entropy") < 0.9 * LOG_K
    assert _mean(last, "ibot_target_entropy") < 0.9 * LOG_K
    assert min(r["teacher_cls_spread"] for r in last) > SPREAD_FLOOR
    assert min(r["teacher_entropy"] for r in rows) > ENTROPY_FLOOR
    assert load_backbone(tiny_run / "backbone.pth").load_report.missing == []


def test_dead_start_is_reported(ct_folder, tmp_path):
    """The official schedule at this size (teacher temperature 0.04 -> 0.07, lr warm-up to 2e-3) leaves the DINO
    targets uniform; the run says so in its events at ``train.dead_start_check``."""
    from dinomed.events import EventWriter, parse_event
    import io

    stream = io.StringIO()
    cfg = load_config("tiny_test", [
        "optim.epochs=3", "train.dead_start_check=30",
        "schedules.lr={start: 0.0, peak: 2.0e-3, end: 1.0e-4, warmup_epochs: 1, freeze_last_layer_epochs: 1}",
        "schedules.teacher_temp={start: 0.04, peak: 0.07, end: 0.07, warmup_epochs: 2}"])
    pretrain(cfg, ct_folder, tmp_path / "run", events=EventWriter(enabled=True, stream=stream, quiet=True))
    rows = metrics(tmp_path / "run")
    assert _mean(rows[-10:], "dino_target_entropy") > 0.99 * LOG_K
    logs = [e["message"] for e in map(parse_event, stream.getvalue().splitlines()) if e and e["event"] == "log"]
    assert any("targets are still uniform" in m and "schedules.teacher_temp" in m for m in logs), logs


def _random_inits(probe, phantoms) -> dict[str, float]:
    results = []
    for seed in range(3):
        torch.manual_seed(seed)
        results.append(probe(create_backbone("vit_tiny", in_chans=1, img_size=64), phantoms))
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}


def _knn_slice_accuracy(model, phantoms, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """Balanced accuracy of DINO's weighted k-NN (Caron et al. 2021, sec. 4.1) on the CLS token, one label per
    slice: the organ with the largest area in it (slices with no organ are left out). Train slices from phantoms
    ``PROBE_TRAIN``, test slices from ``PROBE_TEST``; classes with at least 5 train and 3 test slices."""
    xs, ys, test = [], [], []
    for seed in [*PROBE_TRAIN, *PROBE_TEST]:
        ct, _, slice_label = phantoms[seed]
        with torch.no_grad():
            cls = extract_features(model.eval(), ct, layers=[len(model.blocks) - 1]).cls[-1]
        xs.append(torch.nn.functional.normalize(cls, dim=-1))
        ys.append(slice_label)
        test.append(torch.full((len(slice_label),), seed in PROBE_TEST))
    x, y, is_test = torch.cat(xs), torch.cat(ys), torch.cat(test)
    classes = torch.tensor([int(c) for c in y[y >= 0].unique()
                            if (y[~is_test] == c).sum() >= 5 and (y[is_test] == c).sum() >= 3])
    train_rows, test_rows = ~is_test & torch.isin(y, classes), is_test & torch.isin(y, classes)
    votes = (y[train_rows][:, None] == classes[None]).float()
    votes /= votes.sum(0, keepdim=True)
    sim, nearest = (x[test_rows] @ x[train_rows].T).topk(k, dim=1)
    pred = classes[(torch.exp(sim / temperature)[..., None] * votes[nearest]).sum(1).argmax(1)]
    y_test = y[test_rows]
    return {"cls": float(np.mean([(pred[y_test == c] == c).float().mean() for c in classes])),
            "n_classes": float(len(classes))}


@pytest.mark.slow
def test_knn_slice_probe_beats_random_init(tiny_run, probe_phantoms):
    """DINO's own probe (k-NN on the CLS token, image-level labels): the exported teacher against randomly
    initialised backbones (mean of 3 seeds) on held-out phantoms. Measured: 0.56 pretrained vs 0.24 random
    (chance 0.25 with the 4 classes that qualify: liver, kidney, lung, bone). The run's last 100 steps: DINO
    loss 3.58 (global) and 3.70 (local) against log 64 = 4.159, per-image target entropy 3.42."""
    random_init = _random_inits(_knn_slice_accuracy, probe_phantoms)
    pretrained = _knn_slice_accuracy(load_backbone(tiny_run / "backbone.pth"), probe_phantoms)
    print(f"k-NN slice probe (balanced accuracy, CLS): random init {random_init}, pretrained {pretrained}")
    assert pretrained["n_classes"] >= 3
    assert pretrained["cls"] > random_init["cls"] + 0.15


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "not reliably reached at the tiny budget: dense patch probe 0.52-0.61 over the runs made vs 0.60 for random "
    "init (0.598 vs 0.596 for this fixture); a random ViT's patch tokens are a strong pixel-level baseline here"))
def test_knn_organ_probe_beats_random_init(tiny_run, probe_phantoms):
    """Dense probe: k-NN of per-patch organ labels on the last block's patch tokens; the exported teacher must
    beat randomly initialised backbones (mean of 3 seeds).

    Measured on runs of the tiny config: 0.598 for this fixture, 0.609 and 0.612 for other runs of 1,000 and 2,000
    steps, against 0.596 for random init, but 0.589 with a cosine learning-rate decay and 0.524 when trained on
    128-pixel slices, so the margin is within run-to-run variation. A random ViT's patch tokens are close to a random projection of the 16x16 pixels,
    which already separates the phantom organs by intensity and texture; the slice probe above, where a random
    CLS token is at chance, shows that the run learns.
    """
    random_init = _random_inits(_knn_organ_accuracy, probe_phantoms)
    pretrained = _knn_organ_accuracy(load_backbone(tiny_run / "backbone.pth"), probe_phantoms)
    print(f"k-NN organ probe (balanced accuracy): random init {random_init}, pretrained {pretrained}")
    assert pretrained["last"] > random_init["last"]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(ct_folder, tmp_path):
    base = ["train.epoch_length=3", "optim.epochs=1", "checkpointing.period=3"]
    pretrain(load_config("tiny_test", base + ["train.batch_size_per_gpu=4"]), ct_folder, tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",  # a free port
           "-m", "dinomed", "pretrain", "tiny_test", *base, "train.batch_size_per_gpu=2",
           "--data", str(ct_folder), "--out", str(tmp_path / "two")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("loss", "dino_local_loss", "dino_global_loss", "koleo_loss", "ibot_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    t1 = torch.load(tmp_path / "one" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    t2 = torch.load(tmp_path / "two" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert max((t1[k] - t2[k]).abs().max().item() for k in t1) < 1e-4
