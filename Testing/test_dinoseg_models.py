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


def test_the_user_models_folder_is_per_user_and_remembered(tmp_path):
    settings = tmp_path / "slicer.org"
    user = models.user_models_dir(settings)
    assert user == settings / "DINOSeg" / "Models"
    assert models.resolve_models_dir(None, settings) == user
    assert models.resolve_models_dir("", settings) == user
    assert models.resolve_models_dir(".", settings) == user
    # the old default, inside the extension (an extension update wipes it): moved to the user's folder
    assert models.resolve_models_dir(str(models.BUNDLED_MODELS_DIR), settings) == user
    assert models.resolve_models_dir(str(tmp_path / "mine"), settings) == tmp_path / "mine"
    assert models.BUNDLED_MODELS_DIR.resolve() not in user.resolve().parents
    with pytest.raises(models.ModelFolderError, match="settings folder"):
        models.user_models_dir()  # no Slicer application in the tests


def test_register_model_lands_in_the_user_folder_and_refreshes_every_list(tmp_path):
    settings = tmp_path / "slicer.org"
    source = make_model(tmp_path / "runs" / "finetuned", name="finetuned")
    lists = {"dinoseg": [], "web": []}
    removers = [models.add_models_listener(lambda path, name=name: lists[name].append(path)) for name in lists]
    try:
        models.add_models_listener(lambda path: 1 / 0)()  # added and removed at once
        target = models.register_model(source, settings_dir=settings)
        assert target == models.user_models_dir(settings) / "finetuned"
        assert lists == {"dinoseg": [target], "web": [target]}
        assert [p.name for p in models.list_model_folders(models.user_models_dir(settings))] == ["finetuned"]
        removers[1]()
        models.notify_models_changed()
        assert lists["dinoseg"] == [target, None] and lists["web"] == [target]
    finally:
        for remove in removers:
            remove()
