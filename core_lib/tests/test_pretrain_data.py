"""Pretraining data and config: volume folders, body-biased multi-crop slices, and every bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dinomed.errors import DinomedError, InputImageError
from dinomed.pretrain import load_config
from dinomed.pretrain.crops import MultiCropAugmentation, MultiCropConfig
from dinomed.pretrain.data import MultiCropCollator, MultiCropSliceDataset, SliceSource, scan_volume_folder
from dinomed.synthetic import make_phantom


def write_ct(folder, seeds, shape=(12, 64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        sitk.WriteImage(make_phantom(seed, shape=shape).ct, str(folder / f"ct_{seed}.nii.gz"))
    return folder


def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(DinomedError, match="found no CT volumes"):
        scan_volume_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DinomedError, match="found no PET volumes"):
        scan_volume_folder(tmp_path, "PET")
    with pytest.raises(DinomedError, match="no such folder"):
        scan_volume_folder(tmp_path / "absent")


def test_unreadable_files_are_skipped_and_counted(tmp_path, caplog):
    data = write_ct(tmp_path / "data", [1, 2])
    (data / "garbage.nii.gz").write_bytes(b"this is not a NIfTI file at all")
    # a MetaImage whose header reads but whose voxel file is cut off: only found while training
    sitk.WriteImage(make_phantom(1, shape=(12, 64, 64)).ct, str(data / "truncated.mhd"), False)
    raw = (data / "truncated.raw").read_bytes()
    (data / "truncated.raw").write_bytes(raw[: len(raw) // 2])
    scan = scan_volume_folder(data)
    assert [p for p, _ in scan.skipped] == [str(data / "garbage.nii.gz")]
    assert len(scan.volumes) == 3
    source = SliceSource(scan, "CT")
    rng = np.random.default_rng(0)
    for _ in range(30):
        image, _ = source.sample_slice(rng)
        assert image.ndim == 2
    assert list(source.bad) == [[v.path for v in scan.volumes].index(str(data / "truncated.mhd"))]
    assert "truncated.mhd" in next(iter(source.bad.values()))


def test_every_file_unreadable_is_an_error(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"nope")
    with pytest.raises(DinomedError, match="1 unreadable file"):
        scan_volume_folder(tmp_path)


def test_pet_not_in_suv_says_how_to_convert(tmp_path):
    pet = make_phantom(3, shape=(12, 64, 64)).pet
    bqml = sitk.Cast(pet, sitk.sitkFloat32) * 5000.0  # activity concentration, not SUV
    sitk.WriteImage(bqml, str(tmp_path / "pet.nii.gz"))
    source = SliceSource(scan_volume_folder(tmp_path, "PET"), "PET")
    with pytest.raises(InputImageError, match="dinomed suv"):
        source.check_first_volume()
    with pytest.raises(InputImageError, match="expected SUV"):
        source.sample_slice(np.random.default_rng(0))


def test_pet_in_suv_is_normalised_with_log1p(tmp_path):
    sitk.WriteImage(make_phantom(3, shape=(12, 64, 64)).pet, str(tmp_path / "pet.nii.gz"))
    source = SliceSource(scan_volume_folder(tmp_path, "PET"), "PET")
    volume = source.load(0)
    assert volume.slices.min() >= -1.0 and volume.slices.max() <= 1.0
    assert volume.weights.sum() == pytest.approx(1.0)


def test_slices_biased_to_the_body_and_cropped(tmp_path):
    array = np.full((10, 64, 64), -1000.0, np.float32)
    array[6:, 16:48, 20:44] = 40.0  # a body in 4 of 10 slices
    image = sitk.GetImageFromArray(array)
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    source = SliceSource(scan_volume_folder(tmp_path), "CT", empty_slice_weight=0.05)
    weights = source.load(0).weights
    assert weights[6:].sum() > 0.9
    image, _ = source.sample_slice(np.random.default_rng(1))
    assert image.shape[0] < 64 and image.shape[1] < 64  # cropped to the body (with a margin)


def test_multicrop_sample_and_masks(tmp_path):
    cfg = load_config("tiny_test", ["crops.gram_teacher_crops_size=128"])
    source = SliceSource(scan_volume_folder(write_ct(tmp_path, [4])), "CT")
    dataset = MultiCropSliceDataset(source, MultiCropAugmentation(MultiCropConfig.from_config(cfg["crops"])), seed=0)
    sample = dataset[5]
    assert sample["global_crops"].shape == (2, 1, 64, 64)
    assert sample["local_crops"].shape == (2, 1, 32, 32)
    assert sample["gram_crops"].shape == (2, 1, 128, 128)
    assert torch.equal(dataset[5]["global_crops"], sample["global_crops"])  # a pure function of (seed, index)
    assert not torch.equal(dataset[6]["global_crops"], sample["global_crops"])
    collate = MultiCropCollator((0.1, 0.5), 0.5, seed=0)
    batch = collate([dataset[i] for i in range(4)])
    assert batch["global_crops"].shape == (8, 1, 64, 64) and batch["local_crops"].shape == (8, 1, 32, 32)
    assert batch["masks"].shape == (8, 16) and int((batch["masks"].sum(1) > 0).sum()) == 4
    # two processes with half the batch each get exactly the masks of the one-process batch
    halves = [MultiCropCollator((0.1, 0.5), 0.5, 0, world_size=2, rank=r)([dataset[i] for i in range(2 * r, 2 * r + 2)])
              for r in range(2)]
    joined = torch.cat([torch.cat([h["masks"][k * 2:(k + 1) * 2] for h in halves]) for k in range(2)])
    assert torch.equal(joined, batch["masks"])


def test_config_layers_overrides_and_errors():
    cfg = load_config("ct_vits_stage1", ["optim.epochs=7", "crops.global_crops_scale=[0.4, 1.0]"])
    assert cfg["optim"]["epochs"] == 7 and cfg["crops"]["global_crops_scale"] == [0.4, 1.0]
    assert cfg["student"]["arch"] == "vit_small" and cfg["modality"] == "CT"
    assert load_config("pet_vitl_stage1")["modality"] == "PET"
    with pytest.raises(DinomedError, match="unknown config key 'optim.epoch'; did you mean optim.epochs"):
        load_config("tiny_test", ["optim.epoch=3"])
    with pytest.raises(DinomedError, match="optim.epochs: expected a number, found 'ten'"):
        load_config("tiny_test", ["optim.epochs=ten"])
    with pytest.raises(DinomedError, match="schedule key schedules.lr.'peek'; did you mean peak"):
        load_config("tiny_test", ["schedules.lr={peek: 1.0}"])
    with pytest.raises(DinomedError, match="config optim is a section"):
        load_config("tiny_test", ["optim=3"])
    with pytest.raises(DinomedError, match="no Gram teacher checkpoint"):
        load_config("ct_vits_stage2")
    with pytest.raises(DinomedError, match="multiple of the patch size"):
        load_config("tiny_test", ["crops.global_crops_size=70"])
    with pytest.raises(DinomedError, match="bundled"):
        load_config("no_such_config")
    stage3 = load_config("ct_vitb_stage3", ["gram.ckpt=/runs/stage2", "student.init_from=/runs/stage2"])
    assert max(stage3["crops"]["global_crops_size"]) > load_config("ct_vitb_stage1")["crops"]["global_crops_size"]
    assert stage3["gram"]["loss_weight_schedule"]["start"] == stage3["gram"]["loss_weight_schedule"]["end"]


def test_ct_and_pet_share_a_stage_file(tmp_path):
    """One vits_stage1.yaml serves ct_vits_stage1 and pet_vits_stage1; the name sets the modality, and the
    description follows it; a schedule mapping on the command line merges (README: the dead-start remedy)."""
    from dinomed.pretrain import list_stage_configs

    names = list_stage_configs()
    assert {"ct_vits_stage1", "pet_vits_stage1", "ct_vitl_stage3", "pet_vitb_stage2", "tiny_test"} <= set(names)
    assert "vits_stage1" not in names and "default" not in names
    ct, pet = load_config("ct_vits_stage1"), load_config("pet_vits_stage1")
    assert (ct["modality"], pet["modality"]) == ("CT", "PET")
    assert ct["description"].endswith("on CT slices") and pet["description"].endswith("on PET slices")
    assert {k: v for k, v in ct.items() if k not in ("modality", "description")} == \
        {k: v for k, v in pet.items() if k not in ("modality", "description")}
    assert load_config("pet_vits_stage1", ["modality=CT"])["modality"] == "CT"  # the command line still wins
    cfg = load_config("tiny_test", ["schedules.teacher_temp={start: 0.03, peak: 0.03, end: 0.03, warmup_epochs: 0}",
                                    "schedules.lr.cosine_epochs=2"])
    assert cfg["schedules"]["teacher_temp"]["start"] == 0.03 and cfg["schedules"]["lr"]["cosine_epochs"] == 2
    own = tmp_path / "mine.yaml"
    own.write_text("modality: PET\noptim: {epochs: 3}\n")
    assert load_config(own)["modality"] == "PET" and load_config(own)["optim"]["epochs"] == 3


def test_run_config_written_before_loads_unchanged():
    """A run folder's config.yaml from before the shared config system (the file `--resume` and the README's
    status.json recipe pass back) resolves to exactly what it says, for both kinds of run."""
    import yaml

    from dinomed.finetune import load_config as finetune_config

    from dinomed.finetune.config import with_defaults
    from dinomed.finetune.trainer import config_differences

    data = Path(__file__).parent / "data"
    written = yaml.safe_load((data / "pretrain_run_config.yaml").read_text())
    assert load_config(data / "pretrain_run_config.yaml") == written
    # finetuning: every written setting comes back; keys added to the defaults since (named options such as
    # data.class_ratios, augment.noise_prob) come at their defaults, which --resume does not count as a change
    written = yaml.safe_load((data / "finetune_run_config.yaml").read_text())
    loaded = finetune_config(data / "finetune_run_config.yaml")
    assert config_differences(with_defaults(written), loaded) == []
    assert config_differences(with_defaults(written), {**loaded, "data": {**loaded["data"], "class_ratios": [1, 2]}}) == [
        "data.class_ratios: None → [1, 2]"]


def test_exponent_numbers_are_numbers():
    """YAML 1.1 reads 1e-1 (no dot) as a string; a learning rate or loss weight typed so must still be a number."""
    cfg = load_config("tiny_test", ["dino.koleo_loss_weight=1e-1", "schedules.lr.peak=3e-4"])
    assert cfg["dino"]["koleo_loss_weight"] == pytest.approx(0.1) and isinstance(cfg["dino"]["koleo_loss_weight"], float)
    assert cfg["schedules"]["lr"]["peak"] == pytest.approx(3e-4)


def test_multiresolution_batches(tmp_path):
    """List-valued crop sizes: every batch is at one resolution, drawn per step in the configured shares, the
    same for every process; the masks follow each batch's patch grid; bad lists are refused."""
    from dinomed.pretrain.crops import resolution_for_step

    cfg = load_config("tiny_test", ["crops.global_crops_size=[64, 96]", "crops.local_crops_size=[32, 48]",
                                    "crops.gram_teacher_crops_size=[96, 144]",
                                    "crops.global_local_crop_pairs_ratios=[0.5, 0.5]"])
    crops = MultiCropConfig.from_config(cfg["crops"])
    assert crops.resolutions() == [(64, 32, 96), (96, 48, 144)]
    choices = [resolution_for_step(crops, 0, step) for step in range(200)]
    assert 0.35 < np.mean(choices) < 0.65 and choices == [resolution_for_step(crops, 0, s) for s in range(200)]
    source = SliceSource(scan_volume_folder(write_ct(tmp_path, [4])), "CT")
    dataset = MultiCropSliceDataset(source, MultiCropAugmentation(crops), seed=0, global_batch=4)
    collate = MultiCropCollator((0.1, 0.5), 0.5, seed=0)
    seen = set()
    for step in range(6):
        batch = collate([dataset[step * 4 + i] for i in range(4)])
        g, l, gram = crops.resolutions()[resolution_for_step(crops, 0, step)]
        assert batch["global_crops"].shape == (8, 1, g, g) and batch["local_crops"].shape == (8, 1, l, l)
        assert batch["gram_crops"].shape == (8, 1, gram, gram)
        assert batch["masks"].shape == (8, (g // 16) ** 2)
        seen.add(g)
    assert seen == {64, 96}
    with pytest.raises(DinomedError, match="same length"):
        load_config("tiny_test", ["crops.global_crops_size=[64, 96]", "crops.local_crops_size=[32, 48, 64]"])
    with pytest.raises(DinomedError, match="non-negative weights"):
        load_config("tiny_test", ["crops.global_crops_size=[64, 96]", "crops.global_local_crop_pairs_ratios=[1, -1]"])
    with pytest.raises(DinomedError, match="multiple of the patch size"):
        load_config("tiny_test", ["crops.global_crops_size=[64, 90]"])
