"""Model folders: listing, reading model.json, adding a folder to the models directory."""
from __future__ import annotations

import json

import pytest

from DINOSegLib import models
from dinoseg_testdata import MODEL_JSON


def make_model(folder, name="tiny", weights=True, **changes):
    folder.mkdir(parents=True)
    meta = dict(MODEL_JSON, name=name, **changes)
    (folder / "model.json").write_text(json.dumps(meta))
    if weights:
        (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def test_read_model_info(tmp_path):
    info = models.read_model_info(make_model(tmp_path / "m"))
    assert info.name == "tiny" and info.inputs == ["CT", "PET"] and info.needs_pet
    assert [l.name for l in info.labels] == ["lesion", "liver", "spleen"]
    assert [l.name for l in info.lesion_labels] == ["lesion"]
    assert info.label(2).type == ("SCT", "10200004", "Liver")
    assert info.label(2).color == (221, 130, 101)


def test_list_model_folders(tmp_path):
    root = tmp_path / "models"
    make_model(root / "b-model")
    make_model(root / "A-model")
    (root / "not-a-model").mkdir()
    other = make_model(tmp_path / "single")
    found = models.list_model_folders(root, other, tmp_path / "missing", None)
    assert [p.name for p in found] == ["A-model", "b-model", "single"]


def test_add_model_folder_copies_or_links(tmp_path):
    source = make_model(tmp_path / "trained" / "run1")
    target = models.add_model_folder(source, tmp_path / "models")
    assert (target / "model.json").read_text() == (source / "model.json").read_text()
    assert not target.is_symlink()
    with pytest.raises(models.ModelFolderError, match="already exists"):
        models.add_model_folder(source, tmp_path / "models")
    link = models.add_model_folder(source, tmp_path / "linked", link=True)
    assert link.is_symlink() and link.resolve() == source.resolve()


def test_bad_model_folders_name_the_problem(tmp_path):
    with pytest.raises(models.ModelFolderError, match="model.json is missing"):
        models.read_model_info(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text("{not json")
    with pytest.raises(models.ModelFolderError, match="not valid JSON"):
        models.read_model_info(bad)
    (bad / "model.json").write_text(json.dumps({"labels": [{"value": 1}]}))
    with pytest.raises(models.ModelFolderError, match=r"labels\[0\]"):
        models.read_model_info(bad)
    no_weights = make_model(tmp_path / "noweights", weights=False)
    with pytest.raises(models.ModelFolderError, match="model.safetensors is missing"):
        models.add_model_folder(no_weights, tmp_path / "models")
