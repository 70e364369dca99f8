"""The demo run: segment the bundled synthetic sample case with a model folder, write the label map, lesion
table (CSV + JSON) and overview PNG, and score the result against the case's ground truth labels."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHOWN_LESIONS = 10  # lesions listed in the printed summary (largest first); the table has them all


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Sørensen-Dice overlap of two boolean masks; NaN when both are empty."""
    total = int(prediction.sum()) + int(truth.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


@dataclass
class DemoReport:
    """What the demo found: lesions, per-label Dice against the ground truth, detected true lesions, paths."""

    model_name: str
    device: str
    precision: str
    seconds: float
    lesion_rows: list
    lesion_count: int
    dice: dict = field(default_factory=dict)  # label name -> Dice (labels in both the model and the truth)
    lesions_detected: tuple[int, int] | None = None  # (true lesions touched by a predicted lesion, true lesions)
    paths: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"dinomed demo: {self.model_name} on the synthetic sample case, {self.device} ({self.precision}), "
                 f"{self.seconds:.1f} s"]
        lines.append(f"  lesions found: {self.lesion_count}")
        if self.lesions_detected is not None:
            hit, total = self.lesions_detected
            lines.append(f"  true lesions detected: {hit} of {total}")
        if self.dice:
            shown = ", ".join(f"{name} {value:.3f}" if value == value else f"{name} n/a" for name, value in self.dice.items())
            lines.append(f"  Dice vs ground truth: {shown}")
        rows = [row for row in self.lesion_rows if str(row.lesion) != "total"]
        for row in rows[:SHOWN_LESIONS]:
            lines.append(f"    {row.name} {row.lesion}: SUVmax {row.suv_max:.2f}, SUVpeak {row.suv_peak:.2f}, "
                         f"SUVmean {row.suv_mean:.2f}, MTV {row.mtv_ml:.2f} ml, TLG {row.tlg:.2f} g")
        if len(rows) > SHOWN_LESIONS:
            lines.append(f"    … and {len(rows) - SHOWN_LESIONS} smaller lesion(s); all are in the lesion table")
        for kind, path in self.paths.items():
            lines.append(f"  {kind}: {path}")
        lines.append("  (the demo model knows only synthetic phantoms; it is not for patient images)")
        return "\n".join(lines)

    def as_event(self) -> dict:
        return {"lesions": self.lesion_count, "dice": self.dice, "seconds": round(self.seconds, 3)}


def score_against_truth(labels: sitk.Image, truth: sitk.Image, model_json: dict,
                        lesion_ids: sitk.Image | None = None) -> tuple[dict, tuple[int, int] | None]:
    """Dice per label name present in both the model and the synthetic label table, and, with ``lesion_ids``,
    how many true lesions overlap a predicted lesion voxel."""
    from ..synthetic import LABEL_VALUES

    pred = sitk.GetArrayViewFromImage(labels)
    true = sitk.GetArrayViewFromImage(truth)
    scores = {}
    for entry in model_json.get("labels") or []:
        name = entry.get("name")
        if name in LABEL_VALUES:
            scores[name] = dice(pred == int(entry["value"]), true == LABEL_VALUES[name])
    detected = None
    lesion_values = [int(e["value"]) for e in model_json.get("labels") or [] if e.get("lesion")]
    if lesion_ids is not None and lesion_values:
        ids = sitk.GetArrayViewFromImage(lesion_ids)
        found = np.isin(pred, lesion_values)
        true_ids = [int(i) for i in np.unique(ids) if i != 0]
        hit = sum(1 for i in true_ids if found[ids == i].any())
        detected = (hit, len(true_ids))
    return scores, detected


def run_demo(model_dir: Path, sample_dir: Path, out_dir: Path, device: str = "auto", events=None) -> DemoReport:
    """Segment ``sample_dir`` (ct.nii.gz, pet.nii.gz, labels.nii.gz, lesion_ids.nii.gz) with ``model_dir`` into
    ``out_dir``: segmentation.nii.gz (+ segmentation.labels.json), lesions.csv, lesions.json, overview.png."""
    from ..io import read_image
    from ..petct import write_lesion_table
    from .overview import write_overview_png
    from .segment import pet_on_ct_grid, read_pet_suv, segment_files

    out_dir = Path(out_dir)
    ct_path, pet_path = sample_dir / "ct.nii.gz", sample_dir / "pet.nii.gz"
    result = segment_files(model_dir, ct_path, out_dir / "segmentation.nii.gz", pet_path=pet_path,
                           stats_path=out_dir / "lesions.csv", device=device, events=events)
    paths = dict(result.paths)
    paths["lesion_table_json"] = write_lesion_table(result.lesions, out_dir / "lesions.json")
    ct = read_image(ct_path)
    pet = pet_on_ct_grid(read_pet_suv(pet_path), ct)
    scores, detected = {}, None
    if (sample_dir / "labels.nii.gz").is_file():
        ids = read_image(sample_dir / "lesion_ids.nii.gz") if (sample_dir / "lesion_ids.nii.gz").is_file() else None
        scores, detected = score_against_truth(result.labels, read_image(sample_dir / "labels.nii.gz"),
                                               result.model_json, ids)
    title = f"{result.model_json.get('name', model_dir.name)} on the synthetic sample (not patient data)"
    paths["overview"] = write_overview_png(out_dir / "overview.png", ct, result.labels,
                                           result.model_json.get("labels") or [], pet, title=title)
    if events is not None:
        events.artifact("lesion_table_json", str(paths["lesion_table_json"]))
        events.artifact("overview", str(paths["overview"]))
    return DemoReport(model_name=str(result.model_json.get("name", model_dir.name)), device=result.device,
                      precision=result.precision, seconds=result.seconds, lesion_rows=list(result.lesions),
                      lesion_count=result.lesion_count, dice=scores, lesions_detected=detected,
                      paths={k: str(v) for k, v in paths.items()})
