"""The seed recipes train (shrunk to tiny sizes), DINO-Med3D stage II starts from stage I, Dual-DINOv3 takes two
backbone checkpoints, and a 2-process gloo DDP run trains the same model as one process with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinomed.finetune import finetune, load_config
from dinomed.finetune.trainer import STATE_DIR, STATE_FILE
from dinomed.synthetic.writers import write_nnunet_dataset

SEEDS = (1, 3, 4, 8)  # 32x64x64 phantoms that all hold lesions, liver and kidneys
LABELS = ["labels=[lesion, liver, kidney]",
          "background_labels=[spleen, lung, heart, urinary_bladder, bone, brain]"]
RUN = ["train.max_steps=2", "train.val_every=2", "train.batch_size=2", "optim.warmup_steps=1", *LABELS]
TINY_2D = ["model.backbone=vit_tiny", "data.patch_size=[32,32]"]
TINY_3D = ["model.backbone=vit_tiny", "data.patch_size=[8,32,32]", "inference.roi_size=[8,32,32]"]
SHRINK = {
    "meddinov3": TINY_2D + ["model.layers=null"],
    "linear_probe": TINY_2D,
    "dual_petct": TINY_2D + ["model.decoder_channels=[16,16,16,16]"],
    "demo": ["data.patch_size=[32,32]", "preprocessing.target_spacing=[8.0,8.0,null]"],
    "tiny_meddinov3": ["data.patch_size=[32,32]"],
    "slicewise3d": TINY_3D + ["model.decoder_channels=[16,16,16,16]", "model.skip_channels=[8,8,8,8]"],
    "dinomed3d_stage1": TINY_3D + ["model.proxy_hidden=32"],
    "dinomed3d_stage2": TINY_3D + ["model.adapter_channels=32", "model.decoder_channels=32",
                                   "model.detail_channels=[8,16,32]", "model.refine_channels=[16,8]", "model.lora_rank=4"],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipes") / "Dataset002_phantoms"
    write_nnunet_dataset(root, seeds=SEEDS, shape=(32, 64, 64))
    return root


def recipe(name, *extra):
    cfg = load_config(name, [*SHRINK[name], *RUN, *extra])
    if name == "demo":  # the demo names its own labels: keep them, fold the rest
        cfg = load_config(name, [*SHRINK[name], *RUN[:4]])
    return cfg


def test_the_seed_recipes_are_bundled():
    from dinomed.finetune.config import CONFIG_DIR

    assert set(SHRINK) <= {p.stem for p in CONFIG_DIR.glob("*.yaml")}


def test_recipes_carry_the_published_settings():
    s1, s2 = load_config("dinomed3d_stage1"), load_config("dinomed3d_stage2")
    for cfg in (s1, s2):  # DINO-Med3D official: 0.2 CE + 0.8 Dice, ReduceLROnPlateau, no warm-up, clip 1
        assert (cfg["loss"]["lambda_ce"], cfg["loss"]["lambda_dice"]) == (0.2, 0.8)
        assert cfg["optim"]["schedule"] == "plateau" and cfg["optim"]["warmup_steps"] == 0
    assert s1["optim"]["lr"] == 1e-5 and s2["optim"]["lr"] == 1e-4
    assert (s1["optim"]["plateau_patience"], s2["optim"]["plateau_patience"]) == (5, 8)
    assert s2["data"]["patch_size"][0] == 16 and s2["train"]["batch_size"] == 1
    assert (s2["model"]["lora_rank"], s2["model"]["lora_alpha"], s2["model"]["lora_dropout"]) == (16, 16, 0.1)
    med = load_config("meddinov3")
    assert med["model"]["drop_path_rate"] == 0.2 and med["model"]["decoder"] == "patch_decode"
    assert med["optim"]["schedule"] == "linear" and med["optim"]["warmup_steps"] == 0
    assert med["optim"]["lr"] * med["optim"]["backbone_lr_scale"] == pytest.approx(3e-5)
    assert med["preprocessing"]["input_scale"] == 1.75 and med["data"]["patch_size"] == [896, 896]
    sw = load_config("slicewise3d")
    assert sw["optim"]["lr"] == 1e-4 and sw["model"]["input_skips"] is False


@pytest.mark.slow
@pytest.mark.parametrize("name", ["meddinov3", "linear_probe", "slicewise3d", "demo"])
def test_recipe_trains(name, dataset, tmp_path):
    from dinomed.models import load_model_folder

    result = finetune(recipe(name), dataset, tmp_path / name)
    assert result.step == 2 and result.best_step == 2
    model, mj = load_model_folder(tmp_path / name)
    assert mj["architecture"]["name"] == load_config(name)["model"]["name"]
    assert mj["inference"]["mode"] == ("sliding3d" if name == "slicewise3d" else "slicewise2d")
    if name == "demo":  # the recipe's own model grid: fixed in-plane spacing, each case's slices, input scale 2
        assert mj["preprocessing"]["target_spacing"] == [8.0, 8.0, None] and mj["preprocessing"]["input_scale"] == 2.0
    if name == "meddinov3":  # trained at the high-resolution input scale, recorded for dinomed segment
        assert mj["preprocessing"]["input_scale"] == 1.75 and mj["preprocessing"]["target_spacing"] is None
    if name in ("linear_probe", "slicewise3d"):  # frozen baselines: the backbone did not move
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and not any("backbone" in n for n in trainable)


@pytest.mark.slow
def test_dinomed3d_stage2_starts_from_stage1(dataset, tmp_path):
    from safetensors.torch import load_file

    stage1 = tmp_path / "stage1"
    finetune(recipe("dinomed3d_stage1"), dataset, stage1)
    s1 = load_file(str(stage1 / "model.safetensors"))
    # lr 0: the stage-II model written after one step holds exactly what it was initialised with
    cfg = recipe("dinomed3d_stage2", f"model.stage1_checkpoint={stage1}", "optim.lr=0.0", "train.max_steps=1",
                 "train.val_every=1")
    finetune(cfg, dataset, tmp_path / "stage2")
    s2 = load_file(str(tmp_path / "stage2" / "model.safetensors"))
    # the ICE (the K-channel patch embedding) is carried over, LoRA-wrapped
    assert torch.equal(s2["backbone.patch_embed.proj.base_layer.weight"], s1["backbone.patch_embed.proj.weight"])
    # a LoRA-wrapped block keeps the stage-I weight as its frozen base layer
    base = [k for k in s2 if k.startswith("backbone.blocks.0.attn.qkv") and "base_layer.weight" in k]
    assert base and torch.equal(s2[base[0]], s1["backbone.blocks.0.attn.qkv.weight"])
    assert any("lora_" in k for k in s2)


@pytest.mark.slow
def test_dual_petct_takes_two_backbone_checkpoints(dataset, tmp_path):
    from safetensors.torch import load_file

    from dinomed.backbones import create_backbone, save_meta_backbone

    torch.manual_seed(1)
    pet = save_meta_backbone(create_backbone("vit_tiny", in_chans=1), tmp_path / "pet_dinov3.pth")
    torch.manual_seed(2)
    ct = save_meta_backbone(create_backbone("vit_tiny", in_chans=1), tmp_path / "ct_dinov3.pth")
    cfg = recipe("dual_petct", f"model.pet_backbone_checkpoint={pet}", f"model.ct_backbone_checkpoint={ct}",
                 "optim.lr=0.0", "train.max_steps=1", "train.val_every=1")
    finetune(cfg, dataset, tmp_path / "dual")
    weights = load_file(str(tmp_path / "dual" / "model.safetensors"))
    from dinomed.backbones import load_backbone

    pet_ref, ct_ref = load_backbone(pet, arch="vit_tiny", in_chans=1), load_backbone(ct, arch="vit_tiny", in_chans=1)
    key = "blocks.1.mlp.fc1.weight"
    assert torch.equal(weights[f"pet_encoder.{key}"], pet_ref.state_dict()[key])
    assert torch.equal(weights[f"ct_encoder.{key}"], ct_ref.state_dict()[key])
    assert not torch.equal(weights[f"pet_encoder.{key}"], weights[f"ct_encoder.{key}"])


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_model_as_one(dataset, tmp_path):
    """torchrun, 2 CPU processes (gloo), global batch 4 = 2 per rank, vs one process with batch 4."""
    args = ["tiny_meddinov3", "data.patch_size=[32,32]", "train.max_steps=3", "train.val_every=3",
            "loss.batch_dice=false", "optim.warmup_steps=1", *LABELS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dinomed", "finetune", *args, "--data", str(dataset), "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = finetune(load_config(args[0], args[1:]), dataset, tmp_path / "single")
    a = torch.load(tmp_path / "single" / STATE_DIR / STATE_FILE, weights_only=True)
    b = torch.load(tmp_path / "ddp" / STATE_DIR / STATE_FILE, weights_only=True)
    assert b["step"] == 3 and isinstance(b["rng"], list) and len(b["rng"]) == 2
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    import json

    losses_ddp = [h["loss"] for h in json.loads(b["history"]) if h["phase"] == "train"]
    losses_one = [h["loss"] for h in single.history if h["phase"] == "train"]
    assert losses_ddp == pytest.approx(losses_one, rel=1e-5)
