"""DINOPretrain's training console, headless: a real MRML scene and real ``dinomed`` children on the tiny configs.

Launch → metrics arrive → graceful stop leaves a loadable checkpoint → a new scene (a new session) finds the run,
shows its curves and resumes it to completion → evaluate → register → DINOSeg lists it; a pretraining run chains
stage 1 → 2 → 3 → export; bad data gives the CLI's own error in the panel.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from DINOPretrainLib import (ConsoleError, OptionsError, Recipe, RunFolderError, TrainingConsole, TrainingOptions,
                             family_stages, list_recipes, open_run_folder, parse_overrides, path_or_none)

DEAD_START = "schedules.teacher_temp={start: 0.07, peak: 0.07, end: 0.07, warmup_epochs: 0}"


@pytest.fixture(scope="module")
def recipes() -> list[Recipe]:
    return list_recipes()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from dinomed.synthetic.writers import write_nnunet_dataset  # test data only; the Lib never imports dinomed

    root = tmp_path_factory.mktemp("petct") / "Dataset001_phantoms"
    write_nnunet_dataset(root, seeds=(1, 3, 4, 8), shape=(32, 64, 64))
    return root


def recipe(recipes, name) -> Recipe:
    return next(r for r in recipes if r.name == name)


def ct_volumes(dataset: Path, folder: Path, count: int) -> Path:
    """A folder of unlabeled CT volumes for pretraining: the first ``count`` CT images of the dataset."""
    folder.mkdir(exist_ok=True)
    for image in sorted((dataset / "imagesTr").glob("*_0000.nii.gz"))[:count]:
        shutil.copyfile(image, folder / image.name)
    return folder


# --- options ---------------------------------------------------------------------------------------------


def test_overrides_field_is_split_like_a_shell():
    assert parse_overrides(f'optim.lr=3e-4 "{DEAD_START}"') == ["optim.lr=3e-4", DEAD_START]
    with pytest.raises(OptionsError, match="close the quote"):
        parse_overrides('"schedules.teacher_temp={start: 0.02')
    with pytest.raises(OptionsError, match="key=value"):
        parse_overrides("optim.lr")
    assert path_or_none(".") is None and path_or_none("") is None and path_or_none(None) is None
    assert path_or_none("/data") == Path("/data")


def test_recipe_list_and_common_options(recipes, tmp_path):
    names = {r.name for r in recipes}
    assert {"tiny_meddinov3", "meddinov3", "dual_petct", "ct_vits_stage1", "pet_vitb_stage3", "tiny_test"} <= names
    assert all(r.description for r in recipes)
    assert [r.name for r in family_stages(recipes, "ct_vits")] == ["ct_vits_stage1", "ct_vits_stage2", "ct_vits_stage3"]

    ckpt = tmp_path / "backbone.pth"
    ckpt.write_bytes(b"x")
    options = TrainingOptions(length=200, batch_size=4, learning_rate=3e-4, image_size=96,
                              backbone_checkpoint=str(ckpt), extra="train.val_every=50", device="cuda")
    assert options.overrides(recipe(recipes, "meddinov3"), "finetune") == [
        "train.max_steps=200", "train.batch_size=4", "optim.lr=0.0003", "data.patch_size=[96, 96]",
        f"model.backbone_checkpoint={ckpt}", "train.device=cuda", "train.val_every=50"]
    assert "data.patch_size=[96, 96, 96]" in options.overrides(recipe(recipes, "slicewise3d"), "finetune")
    with pytest.raises(OptionsError, match="takes 2 backbones"):
        options.overrides(recipe(recipes, "dual_petct"), "finetune")
    stage1 = options.overrides(recipe(recipes, "ct_vits_stage1"), "pretrain")
    assert stage1[:6] == ["optim.epochs=200", "train.batch_size_per_gpu=4", "schedules.lr.peak=0.0003",
                          "crops.global_crops_size=96", "crops.local_crops_size=48", f"student.pretrained={ckpt}"]
    stage2 = options.overrides(recipe(recipes, "ct_vits_stage2"), "pretrain")
    assert stage2 == ["optim.epochs=200", "train.batch_size_per_gpu=4", "train.device=cuda", "train.val_every=50"]
    assert TrainingOptions(gpus=4).launch_args() == ["--nproc-per-node", "4"] and TrainingOptions().launch_args() == []
    with pytest.raises(OptionsError, match="multiple of the patch size"):
        TrainingOptions(image_size=100).overrides(recipe(recipes, "tiny_test"), "pretrain")
    with pytest.raises(OptionsError, match="no such file"):
        TrainingOptions(backbone_checkpoint=str(tmp_path / "none.pth")).overrides(recipe(recipes, "meddinov3"), "finetune")


def test_plans_chain_the_stages_and_launch_on_several_gpus(scene, recipes, tmp_path):
    console = TrainingConsole(scene)
    two_gpus = TrainingOptions(length=5, gpus=2, device="cuda")
    check, train = console.plan_finetune("meddinov3", tmp_path / "data", tmp_path / "out", two_gpus,
                                         recipe(recipes, "meddinov3"))
    assert check.args[:3] == ["check-data", "finetune", "meddinov3"] and "--nproc-per-node" not in check.args
    assert train.args[-2:] == ["--nproc-per-node", "2"] and "train.max_steps=5" in train.args
    out = tmp_path / "pre"
    plan = console.plan_pretrain(family_stages(recipes, "pet_vitb"), tmp_path / "data", out, two_gpus, last_stage=2)
    assert [s.kind for s in plan] == ["check", "pretrain", "pretrain", "export"]
    assert plan[1].args[1] == "pet_vitb_stage1" and plan[2].args[1] == "pet_vitb_stage2"
    assert f"student.init_from={out / 'stage1'}" in plan[2].args and f"gram.ckpt={out / 'stage1'}" in plan[2].args
    assert plan[2].args[plan[2].args.index("--out") + 1] == str(out / "stage2")
    assert plan[3].args == ["export-backbone", str(out / "stage2"), "--out", str(out / "backbone.pth")]
    with pytest.raises(OptionsError, match="device cpu"):
        TrainingOptions(gpus=2, device="cpu").launch_args()


def test_unset_folders_are_refused_not_dot(scene, recipes, tmp_path):
    console = TrainingConsole(scene)
    with pytest.raises(OptionsError, match="choose the data folder"):
        console.start("finetune", recipe(recipes, "tiny_meddinov3"), ".", tmp_path / "out")
    with pytest.raises(OptionsError, match="choose the output folder"):
        console.start("finetune", recipe(recipes, "tiny_meddinov3"), tmp_path, "")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ConsoleError, match="not empty"):
        console.start("finetune", recipe(recipes, "tiny_meddinov3"), tmp_path, tmp_path / "busy")
    with pytest.raises(RunFolderError, match="holds no run"):
        console.open_run(tmp_path / "busy")
    with pytest.raises(OptionsError, match="choose a bundled recipe, or a config file"):
        console.start("pretrain", "", tmp_path, tmp_path / "new")
    with pytest.raises(OptionsError, match="no such file"):
        console.check_data("finetune", str(tmp_path / "mine.yaml"), tmp_path)
    with pytest.raises(ConsoleError, match="nothing to resume"):
        console.resume()
    assert console.jobs == []  # nothing was launched


def test_bad_data_shows_the_cli_error(scene, recipes, dataset, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    (bad / "labelsTr" / "case_0001.nii.gz").unlink()
    console = TrainingConsole(scene)
    console.start("finetune", recipe(recipes, "tiny_meddinov3"), bad, tmp_path / "out", TrainingOptions(length=4))
    assert console.wait(timeout=120) == "failed"
    assert console.error == ("case case_0001: imagesTr/ has its images but labelsTr/case_0001.nii.gz is missing")
    assert [j.args[0] for j in console.jobs] == ["check-data"]  # training never started
    assert any(m == f"error: {console.error}" for m in console.messages)
    assert not (tmp_path / "out").exists()

    empty = tmp_path / "no_volumes"
    empty.mkdir()
    console.start("pretrain", recipe(recipes, "tiny_test"), empty, tmp_path / "pre", recipes=recipes)
    assert console.wait(timeout=120) == "failed"
    assert console.error.startswith(f"--data {empty}: found no CT volumes")
    assert not (tmp_path / "pre").exists()  # no pipeline.json: the same folder can be used once the data is fixed

    # "a config file…": a YAML of one's own, checked against a folder of CT volumes
    own = tmp_path / "my_stage1.yaml"
    own.write_text(Path(recipe(recipes, "tiny_test").path).read_text())
    ct_volumes(dataset, empty, 2)
    console.check_data("pretrain", str(own), empty)
    assert console.wait(timeout=120) == "finished", console.error
    assert console.data_report.summary["volumes"] == 2 and console.data_report.summary["modality"] == "CT"
    assert console.data_report.lines[0].startswith("2 CT volume(s); spacing")


@pytest.mark.slow  # four real tiny dinomed children (check, finetune, resume, evaluate): ~1 min on 2 cores
def test_finetune_stop_new_session_resume_evaluate_register(scene, recipes, dataset, tmp_path):
    import slicer
    import torch

    from DINOSegLib import DINOSegLogic, models

    out = tmp_path / "runs" / "tiny"
    options = TrainingOptions(length=8, batch_size=2, image_size=32, device="cpu",
                              extra="train.val_every=4 train.log_every=1 optim.warmup_steps=2")
    console = TrainingConsole(scene)
    console.start("finetune", recipe(recipes, "tiny_meddinov3"), dataset, out, options)
    # launch: the data check first, its summary shown
    console.wait(timeout=120, until=lambda: console.step.kind == "finetune")
    report = console.data_report
    assert report.summary["cases"] == 4 and report.summary["modality"] == ["CT", "PET"]
    assert "4 labeled case(s), CT+PET" in report.text and "spacing" in report.text
    # metrics arrive, then a graceful stop
    console.wait(timeout=180, until=lambda: console.curves and len(console.curves.column("train", "loss")) >= 2)
    console.stop()
    assert console.state == "stopping"
    assert console.wait(timeout=120) == "stopped"
    assert console.job.returncode == 3
    state = torch.load(out / "training" / "state.pt", weights_only=True)  # loadable, whole
    status = json.loads((out / "training" / "status.json").read_text())
    assert status["step"] == state["step"] < 8 and not status["finished"]
    assert console.can_resume and not console.can_evaluate

    # a new session: a fresh scene and console find the run, show its curves and resume it
    new_scene = slicer.vtkMRMLScene()
    later = TrainingConsole(new_scene)
    run = later.open_run(out)
    assert run.kind == "finetune" and run.resumable and later.can_resume
    assert later.curves.column("train", "step") == [float(s) for s in range(1, state["step"] + 1)]
    assert new_scene.GetNodesByClass("vtkMRMLPlotChartNode").GetNumberOfItems() == 3
    later.resume(TrainingOptions(device="cpu"))
    later.wait(timeout=180, until=lambda: later.curves is not None and later.curves.column("train", "step")[-1] > state["step"])
    new_scene.Clear(0)  # Close Scene while it trains: the run goes on, its curves come back in the new scene
    later.scene_closed()
    assert later.wait(timeout=300) == "finished", later.error
    assert later.run.finished and later.can_evaluate
    assert later.curves.column("train", "step")[-1] == 8.0
    assert later.curves.column("val", "dice") and new_scene.GetNodesByClass("vtkMRMLTableNode").GetNumberOfItems() >= 2
    assert any(m.startswith("resumed from step") for m in later.messages)

    later.evaluate()
    assert later.wait(timeout=240) == "finished", later.error
    table = later.evaluation_table
    labels = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
    assert labels == ["lesion", "liver", "kidney", "mean"]
    assert 0.0 <= float(table.GetCellText(3, 1)) <= 1.0

    settings = tmp_path / "slicer.org"  # Slicer's settings folder: the per-user models folder is below it
    refreshed = []
    stop_listening = models.add_models_listener(refreshed.append)  # what DINOSeg's open model list does
    try:
        target = later.register(settings_dir=settings)
    finally:
        stop_listening()
    assert target == models.user_models_dir(settings) / "tiny" and refreshed == [target]
    dinoseg = DINOSegLogic(new_scene, models_dirs=[models.user_models_dir(settings), models.BUNDLED_MODELS_DIR])
    assert target.resolve() in dinoseg.available_models()  # DINOSeg's model list
    assert (target / "model.safetensors").is_file() and models.read_model_info(target).labels


@pytest.mark.slow  # three tiny pretraining stages and the export, as real children
def test_pretraining_chains_three_stages_and_exports(scene, recipes, dataset, tmp_path):
    import torch

    volumes = ct_volumes(dataset, tmp_path / "volumes", 3)
    out = tmp_path / "pretrain"
    options = TrainingOptions(length=1, batch_size=4, device="cpu",
                              extra=f'train.epoch_length=2 checkpointing.period=2 train.dead_start_check=1 "{DEAD_START}"')
    console = TrainingConsole(scene)
    console.start("pretrain", recipe(recipes, "tiny_test"), volumes, out, options, recipes=recipes)
    assert console.wait(timeout=600) == "finished", (console.error, console.messages[-5:])
    assert [j.args[0] for j in console.jobs] == ["check-data", "pretrain", "pretrain", "pretrain", "export-backbone"]
    assert console.data_report.summary["volumes"] == 3
    stage2 = console.jobs[2].args
    assert f"gram.ckpt={out / 'stage1'}" in stage2 and f"student.init_from={out / 'stage1'}" in stage2
    assert f"gram.ckpt={out / 'stage2'}" in console.jobs[3].args
    assert DEAD_START in console.jobs[1].args  # the quoted override travelled as one argument
    run = open_run_folder(out)
    assert run.kind == "pipeline" and run.finished and [s.step for s in run.stages] == [2, 2, 2]
    assert torch.load(out / "backbone.pth", weights_only=True)["cls_token"].shape[-1] == 64
    # the curves that fit pretraining, and the dead-start warning in the panel
    assert console.curves.column("train", "dino_target_entropy") and console.curves.column("train", "lr")
    assert console.warning and console.warning.startswith("warning: after 1 iterations")
    assert not console.can_resume


@pytest.mark.slow
def test_pretraining_stops_after_stage_one_and_continues_later(scene, recipes, dataset, tmp_path):
    import slicer

    volumes = ct_volumes(dataset, tmp_path / "volumes", 2)
    out = tmp_path / "pretrain"
    options = TrainingOptions(length=1, batch_size=2, device="cpu", extra="train.epoch_length=2 checkpointing.period=2")
    console = TrainingConsole(scene)
    console.start("pretrain", recipe(recipes, "tiny_test"), volumes, out, options, recipes=recipes, last_stage=1,
                  export=False)
    assert console.wait(timeout=300) == "finished", console.error
    assert [j.args[0] for j in console.jobs] == ["check-data", "pretrain"]
    run = open_run_folder(out)
    assert run.finished and len(run.stages) == 1 and not (out / "backbone.pth").exists()

    # a later session asks for the stages after it: the pipeline file grows and Resume runs stage 2 only
    pipeline = json.loads((out / "pipeline.json").read_text())
    pipeline.update(last_stage=2, stages=["tiny_test", "tiny_test_stage2"], export=True,
                    overrides=dict(pipeline["overrides"], tiny_test_stage2=pipeline["overrides"]["tiny_test"]))
    (out / "pipeline.json").write_text(json.dumps(pipeline))
    later = TrainingConsole(slicer.vtkMRMLScene())
    assert later.open_run(out).resumable
    later.resume(TrainingOptions(device="cpu"))
    assert later.wait(timeout=300) == "finished", later.error
    assert [j.args[0] for j in later.jobs] == ["pretrain", "export-backbone"]
    assert (out / "stage2" / "status.json").is_file() and (out / "backbone.pth").is_file()
    assert math.isfinite(later.curves.column("train", "gram_loss")[-1])
