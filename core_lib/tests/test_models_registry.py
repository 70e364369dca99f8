"""The model registry and the model folder: build from a config, save → load gives identical outputs, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from dinomed.backbones import create_backbone, save_meta_backbone
from dinomed.errors import CheckpointError, DinomedError, InputImageError
from dinomed.models import available_models, build_model, load_model_folder, model_json_template, save_model_folder

TINY_2D = {"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3,
           "decoder_channels": [32, 32, 16, 16]}


def test_registry_lists_every_seed_model():
    names = set(available_models())
    assert names == {"meddinov3", "slicewise3d", "linear_probe", "dinomed3d", "dual_petct"}
    for entry in available_models().values():
        assert entry.inference_mode == ("slicewise2d" if entry.spatial_dims == 2 else "sliding3d")


# one tiny architecture per registered model, and the input it takes; CASES adds the variants that build other parts
TINY = {
    "meddinov3": ({"backbone": "vit_tiny", "in_chans": 2}, (1, 2, 40, 56)),
    "linear_probe": ({"backbone": "vit_tiny", "in_chans": 2}, (1, 2, 40, 56)),
    "dual_petct": ({"backbone": "vit_tiny", "decoder_channels": [32, 32, 16, 16]}, (1, 2, 40, 56)),
    "slicewise3d": ({"backbone": "vit_tiny", "in_chans": 2, "decoder_channels": [16, 16, 8, 8]}, (1, 2, 5, 40, 56)),
    "dinomed3d": ({"backbone": "vit_tiny", "adapter_channels": 16, "decoder_channels": 16, "detail_channels": [8, 8, 16],
                   "refine_channels": [8, 8], "slice_batch": 4}, (1, 1, 5, 40, 56)),
}
CASES = [(name, {}) for name in TINY] + [
    ("meddinov3", {"decoder": "progressive", "decoder_channels": [32, 32, 16, 16], "freeze_backbone": True}),
    ("dual_petct", {"variant": "pet_only"}), ("dual_petct", {"variant": "early_fusion"}),
    ("slicewise3d", {"head": "linear"}), ("slicewise3d", {"input_skips": True, "skip_channels": [8, 8, 8, 8]}),
    ("dinomed3d", {"stage": 1}), ("dinomed3d", {"stage": 1, "proxy_head": "mlp", "proxy_hidden": 16}),
]


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_every_registered_model_is_covered():
    assert set(TINY) == set(available_models())


@pytest.mark.parametrize("name,extra", CASES, ids=[n + "".join(f"-{k}={v}" for k, v in list(e.items())[:1]) for n, e in CASES])
def test_registered_model_builds_runs_and_round_trips(name, extra, tmp_path):
    """Every model of the registry: built from its architecture and from its typed keyword constructor alike, logits
    at the input's resolution, save → load gives the same function, the same trainable parameters."""
    cfg, shape = TINY[name]
    torch.manual_seed(0)
    model = build_model({"name": name, "num_classes": 3, **cfg, **extra})
    entry = model.model_entry
    assert isinstance(model, entry.cls) and set(model.arch_config) - {"name"} <= set(entry.defaults)
    torch.manual_seed(0)
    direct = entry.cls(**{k: v for k, v in model.arch_config.items() if k != "name"})
    assert {k: v.shape for k, v in direct.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():  # zero-initialised parts (LoRA B, fusion gates) made non-zero: the round trip sees them
        for n, p in model.named_parameters():
            if "lora_B" in n or "gate" in n:
                p.normal_(std=0.1)
    model.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (shape[0], 3, *shape[2:]) and torch.isfinite(y).all()
    mj = model_json_template(model)
    assert mj["inference"]["mode"] == entry.inference_mode
    loaded, mj2 = load_model_folder(save_model_folder(model, mj, tmp_path / "m"))
    assert mj2["architecture"] == model.arch_config
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert trainable(loaded) == trainable(model) == trainable(direct) > 0
    encoder = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n
                  and ("backbone." in n or "encoder." in n))
    frozen = model.arch_config.get("freeze_backbone") or model.arch_config.get("stage") == 2
    assert (encoder == 0) == bool(frozen)  # a frozen encoder (LoRA aside) stays frozen; a finetuned one trains


def test_unknown_architecture_and_key_are_named():
    with pytest.raises(DinomedError, match="unknown model architecture 'unet9'.*meddinov3"):
        build_model({"name": "unet9", "num_classes": 2})
    with pytest.raises(DinomedError, match="unknown architecture key.*decoder_chanels"):
        build_model({**TINY_2D, "decoder_chanels": [8, 8, 8, 8]})
    with pytest.raises(DinomedError, match="needs num_classes"):
        build_model({"name": "meddinov3", "backbone": "vit_tiny"})


def test_save_load_identical_outputs(tmp_path):
    model = build_model(TINY_2D).eval()
    mj = model_json_template(model, name="tiny", labels=[{"value": 1, "name": "lesion", "color": [230, 30, 30], "lesion": True}])
    assert mj["inference"]["mode"] == "slicewise2d"
    assert [i["modality"] for i in mj["inputs"]] == ["CT", "PET"]
    assert mj["preprocessing"]["channels"][1]["scale"] == "log1p"
    folder = save_model_folder(model, mj, tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
    loaded, mj2 = load_model_folder(folder)
    assert mj2["architecture"] == model.arch_config
    assert not loaded.training
    x = torch.randn(1, 2, 40, 56)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_folder_loads_without_the_backbone_checkpoint(tmp_path):
    ckpt = save_meta_backbone(create_backbone("vit_tiny", in_chans=3), tmp_path / "bb.pth")
    model = build_model({**TINY_2D, "backbone_checkpoint": str(ckpt)}).eval()
    loaded_bb = create_backbone("vit_tiny", in_chans=3)
    assert model.arch_config["backbone_checkpoint"] == str(ckpt)
    save_model_folder(model, model_json_template(model), tmp_path / "m")
    ckpt.unlink()  # the folder must be self-contained
    loaded, _ = load_model_folder(tmp_path / "m")
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    del loaded_bb


def test_backbone_checkpoint_initialises_the_encoder(tmp_path):
    bb = create_backbone("vit_tiny", in_chans=2)
    ckpt = save_meta_backbone(bb, tmp_path / "bb.pth")
    model = build_model({**TINY_2D, "backbone_checkpoint": str(ckpt)})
    for key, value in bb.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DinomedError, match="no such model folder"):
        load_model_folder(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DinomedError, match="model.json is missing"):
        load_model_folder(tmp_path / "empty")
    model = build_model(TINY_2D)
    folder = save_model_folder(model, model_json_template(model), tmp_path / "m")
    mj = json.loads((folder / "model.json").read_text())

    mj_bad = dict(mj, architecture={**mj["architecture"], "num_classes": 5})
    (folder / "model.json").write_text(json.dumps(mj_bad))
    with pytest.raises(CheckpointError, match=r"tensor decoder\.classifier\.weight has shape \(3, 16, 1, 1\).*expects \(5, 16, 1, 1\)"):
        load_model_folder(folder)

    (folder / "model.json").write_text(json.dumps(dict(mj, architecture={**mj["architecture"], "name": "nope"})))
    with pytest.raises(DinomedError, match=r"m[/\\]model.json: unknown model architecture 'nope'"):
        load_model_folder(folder)

    (folder / "model.json").write_text(json.dumps(dict(mj, architecture={**mj["architecture"], "backbone": "vit_small"})))
    with pytest.raises(CheckpointError, match=r"do not match architecture .meddinov3.: 120 tensor\(s\) missing: backbone.blocks.10"):
        load_model_folder(folder)

    (folder / "model.json").write_text("{not json")
    with pytest.raises(DinomedError, match="not valid JSON"):
        load_model_folder(folder)

    (folder / "model.json").write_text(json.dumps(mj))
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model_folder(folder)


def test_save_refuses_a_mismatched_architecture(tmp_path):
    model = build_model(TINY_2D)
    mj = model_json_template(model)
    mj["architecture"]["name"] = "dual_petct"
    with pytest.raises(DinomedError, match="names architecture 'dual_petct' but the model is 'meddinov3'"):
        save_model_folder(model, mj, tmp_path / "m")
    assert not (tmp_path / "m" / "model.json").exists()


def test_template_checks_labels():
    with pytest.raises(DinomedError, match="label 'liver' has value 3"):
        model_json_template(TINY_2D, labels=[{"value": 3, "name": "liver"}])
    mj = model_json_template(TINY_2D, inference={"batch_size": 2})
    assert mj["inference"]["batch_size"] == 2 and len(mj["labels"]) == 2


def test_input_errors_say_what_was_expected():
    model = build_model(TINY_2D)
    with pytest.raises(InputImageError, match=r"expected 2 input channel\(s\).*found 1"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(InputImageError, match=r"expected a batch of 2D slices \(B, C, H, W\), found shape \(1, 2, 4, 32, 32\)"):
        model(torch.zeros(1, 2, 4, 32, 32))
    with pytest.raises(InputImageError, match="floating-point"):
        model(torch.zeros(1, 2, 32, 32, dtype=torch.long))
