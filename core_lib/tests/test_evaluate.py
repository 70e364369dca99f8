"""dinomed evaluate: per case and class Dice, HD95 (mm), precision, recall, their means; CSV + JSON."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from dinomed.errors import DinomedError
from dinomed.finetune.metrics import class_metrics, summarize
from dinomed.synthetic.writers import write_nnunet_dataset

LABELS = [{"value": 1, "name": "lesion"}, {"value": 2, "name": "liver"}, {"value": 3, "name": "kidney"}]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate") / "Dataset003"
    write_nnunet_dataset(root, seeds=(1, 3), shape=(32, 48, 48))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch

    from dinomed.models import build_model, model_json_template, save_model_folder

    torch.manual_seed(0)
    model = build_model({"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 4,
                         "decoder_channels": [16, 16, 16, 16]})
    with torch.no_grad():  # bias the classifier so that every class is predicted somewhere
        model.decoder.classifier.bias.copy_(torch.tensor([0.0, 0.05, 0.05, 0.05]))
    folder = tmp_path_factory.mktemp("evaluate") / "model"
    mj = model_json_template(model, name="untrained", labels=LABELS, inputs=["CT", "PET"],
                             provenance={"val_cases": ["case_0003"]})
    save_model_folder(model, mj, folder)
    return folder


def test_class_metrics_known_values():
    truth = np.zeros((10, 20, 20), np.uint8)
    truth[2:6, 4:10, 4:10] = 1  # 144 voxels
    pred = np.zeros_like(truth)
    pred[2:6, 4:10, 4:12] = 1  # 192 voxels, 144 overlap; the extra two columns lie 1-2 voxels outside
    pred[0, 0, 0] = 3  # a class only predicted
    m = class_metrics(pred, truth, [1, 2, 3], spacing_xyz=(2.0, 1.0, 3.0))
    assert m[1]["dice"] == pytest.approx(2 * 144 / (144 + 192), abs=1e-6)
    assert m[1]["precision"] == pytest.approx(144 / 192, abs=1e-6) and m[1]["recall"] == pytest.approx(1.0)
    assert m[1]["hd95"] == pytest.approx(4.0)  # 2 voxels along x at 2 mm
    assert math.isnan(m[2]["dice"]) and math.isnan(m[2]["hd95"])  # absent from both: undefined, not perfect
    assert m[3]["dice"] == 0.0 and math.isnan(m[3]["hd95"]) and m[3]["precision"] == 0.0 and math.isnan(m[3]["recall"])
    summary = summarize({"a": m}, {1: "lesion", 2: "liver", 3: "kidney"})
    assert summary["mean"]["dice"] == pytest.approx((m[1]["dice"] + 0.0) / 2)


def test_evaluate_cli_writes_csv_and_json(dataset, model_dir, tmp_path, capsys):
    from dinomed.cli import main
    from dinomed.events import parse_event
    from dinomed.finetune import load_case, open_dataset
    from dinomed.inference.predict import predict_volume
    from dinomed.models import load_model_folder

    out = tmp_path / "metrics.csv"
    assert main(["evaluate", "--model", str(model_dir), "--data", str(dataset), "--out", str(out), "--events"]) == 0
    events = [parse_event(line) for line in capsys.readouterr().out.splitlines()]
    assert all(events) and events[-1]["event"] == "done" and events[-1]["cases"] == 2
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["case", "label", "value", "dice", "hd95", "precision", "recall", "nsd", "truth_voxels",
                             "pred_voxels"]
    per_case = [r for r in rows if r["case"] != "mean"]
    assert {(r["case"], r["label"]) for r in per_case} == {(c, n["name"]) for c in ("case_0001", "case_0003") for n in LABELS}
    assert [r["label"] for r in rows if r["case"] == "mean"] == ["lesion", "liver", "kidney", "all"]
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["cases"]) == {"case_0001", "case_0003"}
    # the table is the model's prediction scored against the reference (dataset labels mapped by name)
    model, mj = load_model_folder(model_dir)
    spec = open_dataset(dataset, ["CT", "PET"], ["lesion", "liver", "kidney"],
                        ["spleen", "lung", "heart", "urinary_bladder", "bone", "brain"])
    case = load_case(spec, spec.case("case_0001"), mj["preprocessing"]["channels"])
    pred = predict_volume(model, mj, case.image)
    liver = next(r for r in per_case if r["case"] == "case_0001" and r["label"] == "liver")
    inter = np.logical_and(pred == 2, case.label == 2).sum()
    assert float(liver["dice"]) == pytest.approx(2 * inter / ((pred == 2).sum() + (case.label == 2).sum()), rel=1e-4)
    assert int(liver["truth_voxels"]) == int((case.label == 2).sum()) > 0
    means = [float(r["dice"]) for r in per_case if r["label"] == "liver" and r["dice"]]
    assert float(next(r for r in rows if r["case"] == "mean" and r["label"] == "liver")["dice"]) == pytest.approx(
        np.mean(means), rel=1e-4)


def test_nsd_known_values():
    truth = np.zeros((12, 24, 24), np.uint8)
    truth[2:10, 4:16, 4:16] = 1
    same = class_metrics(truth, truth, [1], spacing_xyz=(1.0, 1.0, 1.0))
    assert same[1]["nsd"] == pytest.approx(1.0)
    shifted = np.zeros_like(truth)
    shifted[2:10, 4:16, 7:19] = 1  # moved 3 voxels along x
    loose = class_metrics(shifted, truth, [1], spacing_xyz=(1.0, 1.0, 1.0), nsd_tolerance_mm=3.5)
    tight = class_metrics(shifted, truth, [1], spacing_xyz=(1.0, 1.0, 1.0), nsd_tolerance_mm=1.0)
    assert loose[1]["nsd"] == pytest.approx(1.0) and 0.0 < tight[1]["nsd"] < 1.0
    # the tolerance is in mm: 3 voxels of 0.5 mm lie within 1.6 mm
    assert class_metrics(shifted, truth, [1], spacing_xyz=(0.5, 1.0, 1.0), nsd_tolerance_mm=1.6)[1]["nsd"] == pytest.approx(1.0)
    from monai.metrics import compute_surface_dice
    import torch

    ref = compute_surface_dice(torch.from_numpy(shifted == 1)[None, None], torch.from_numpy(truth == 1)[None, None],
                               class_thresholds=[1.0], include_background=True, spacing=[1.0, 1.0, 1.0])
    assert tight[1]["nsd"] == pytest.approx(float(ref[0, 0]))


def test_lesions_by_size_stratum():
    from dinomed.finetune.metrics import lesion_metrics, size_stratum, summarize_strata

    spacing = (2.0, 2.0, 2.0)  # 8 mm^3 = 0.008 ml a voxel
    truth = np.zeros((40, 60, 60), np.uint8)
    truth[2:4, 2:4, 2:4] = 1  # 8 voxels = 0.064 ml: small
    truth[10:16, 10:16, 10:16] = 1  # 216 voxels = 1.728 ml: medium
    truth[20:36, 30:56, 30:56] = 1  # 16*26*26 voxels = 86.5 ml: large
    pred = np.zeros_like(truth)
    pred[10:16, 10:16, 10:13] = 1  # half of the medium lesion
    pred[20:36, 30:56, 30:56] = 1  # all of the large one
    pred[30:32, 2:4, 2:4] = 1  # a small false positive
    result = lesion_metrics(pred, truth, 1, spacing)
    rows = sorted(result["lesions"], key=lambda r: r["volume_ml"])
    assert [r["stratum"] for r in rows] == ["small", "medium", "large"]
    assert [r["detected"] for r in rows] == [False, True, True]
    assert rows[0]["dice"] == 0.0 and rows[1]["dice"] == pytest.approx(2 * 108 / (216 + 108)) and rows[2]["dice"] == 1.0
    assert rows[1]["volume_ml"] == pytest.approx(1.728)
    assert result["false_positives"] == {"small": 1, "medium": 0, "large": 0}
    strata = summarize_strata({"a": result}, "lesion")
    assert strata["small"]["sensitivity"] == 0.0 and strata["large"]["sensitivity"] == 1.0
    assert size_stratum(5.0, (2.0, 4.0)) == "large" and size_stratum(0.5) == "small"


def test_evaluate_nsd_and_strata_options(dataset, model_dir, tmp_path):
    from dinomed.cli import main

    out = tmp_path / "m.csv"
    assert main(["evaluate", "--model", str(model_dir), "--data", str(dataset), "--out", str(out),
                 "--nsd-tolerance-mm", "2", "--size-thresholds-ml", "0.5,5", "--lesion-labels", "lesion"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"]["nsd_tolerance_mm"] == 2.0 and report["settings"]["size_thresholds_ml"] == [0.5, 5.0]
    lesion_rows = list(csv.DictReader((tmp_path / "m.lesions.csv").open()))
    assert lesion_rows and {r["stratum"] for r in lesion_rows} <= {"small", "medium", "large"}
    for r in lesion_rows:  # each row's stratum follows the thresholds asked for
        v = float(r["volume_ml"])
        assert r["stratum"] == ("small" if v < 0.5 else "large" if v >= 5 else "medium")
    strata = list(csv.DictReader((tmp_path / "m.strata.csv").open()))
    assert [r["stratum"] for r in strata] == ["small", "medium", "large"]
    assert sum(int(r["lesions"]) for r in strata) == len(lesion_rows)
    assert report["strata"]["lesion"]["small"]["lesions"] == int(strata[0]["lesions"])
    with pytest.raises(DinomedError, match="two increasing volumes"):
        from dinomed.evaluate import evaluate_model

        evaluate_model(model_dir, dataset, tmp_path / "x.csv", size_thresholds_ml=[5, 1])


def test_evaluate_heldout_cases_and_errors(dataset, model_dir, tmp_path):
    from dinomed.evaluate import evaluate_model

    report = evaluate_model(model_dir, dataset, tmp_path / "m.csv", cases="heldout")
    assert list(report["cases"]) == ["case_0003"]
    with pytest.raises(DinomedError, match="no case named nope"):
        evaluate_model(model_dir, dataset, tmp_path / "m.csv", cases="nope")
    data = tmp_path / "data"
    import shutil

    shutil.copytree(dataset, data)
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "lesion": 1}
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DinomedError, match="no reference for the model's label\\(s\\) liver, kidney"):
        evaluate_model(model_dir, data, tmp_path / "m.csv")
    meta["labels"] = {"background": 0, "lesion": 1, "liver": 2, "kidney": 4}
    (data / "dataset.json").write_text(json.dumps(meta))
    # the phantoms hold spleen (3) etc., which this dataset.json does not name: a clear error naming the case
    with pytest.raises(DinomedError, match=r"case case_000\d .*\(not in dataset.json labels\)"):
        evaluate_model(model_dir, data, tmp_path / "m.csv")
    assert not (tmp_path / "m.json").exists() or json.loads((tmp_path / "m.json").read_text())["cases"]
    (data / "imagesTr" / "case_0003_0001.nii.gz").unlink()
    meta["labels"] = json.loads((dataset / "dataset.json").read_text())["labels"]
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DinomedError, match="case case_0003: the PET channel is missing"):
        evaluate_model(model_dir, data, tmp_path / "m2.csv")
    assert not (tmp_path / "m2.csv").exists()
