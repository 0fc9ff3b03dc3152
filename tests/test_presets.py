"""Presets and Hugging Face repository ids: the catalogue ``dinokit models`` prints, and
``--weights owner/name`` through huggingface_hub's client (faked here: no network in tests), a local
folder of that name winning, and the one sentence when the hub is missing or offline."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import dinokit
import dinokit.presets as presets
from dinokit.checkpoints import load_backbone, to_hf_state_dict
from dinokit.errors import CheckpointError
from dinokit.presets import (
    PRESETS,
    hf_catalogue,
    is_hf_repo_id,
    preset_cache_path,
    preset_catalogue,
)
from tests.helpers import tiny_vit


def _hf_folder(folder, seed=0):
    """A Hugging Face style folder of a tiny ViT: pytorch_model.bin with ViTModel names."""
    model = tiny_vit(depth=2, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(to_hf_state_dict(model.state_dict()), folder / "pytorch_model.bin")
    return model


class _Missing(Exception):
    pass


def _fake_hub(monkeypatch, files: dict, calls: list):
    """A stand-in huggingface_hub module: hf_hub_download returns the files given, as the real
    client returns paths in its cache, and raises its errors for the others."""
    hub = types.ModuleType("huggingface_hub")
    utils = types.ModuleType("huggingface_hub.utils")

    class EntryNotFoundError(Exception):
        pass

    class LocalEntryNotFoundError(EntryNotFoundError):
        pass

    def hf_hub_download(repo_id, filename, local_files_only=False):
        calls.append((repo_id, filename, local_files_only))
        if (repo_id, filename) in files:
            return str(files[(repo_id, filename)])
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        raise EntryNotFoundError(f"{filename} not found")

    utils.EntryNotFoundError = EntryNotFoundError
    utils.LocalEntryNotFoundError = LocalEntryNotFoundError
    hub.hf_hub_download = hf_hub_download
    hub.utils = utils
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setitem(sys.modules, "huggingface_hub.utils", utils)


def test_repo_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hf_repo_id("facebook/dino-vits16")
    assert not is_hf_repo_id("dino_vits16") and not is_hf_repo_id("a/b/c") and not is_hf_repo_id("/abs/x")
    assert not is_hf_repo_id("runs/backbone.pth") and not is_hf_repo_id("./x")
    (tmp_path / "runs").mkdir()
    assert not is_hf_repo_id("runs/mine")  # a folder of the owner's name here: a local path


def test_repo_id_is_fetched_through_the_hub_client(tmp_path, monkeypatch):
    model = _hf_folder(tmp_path / "hub-cache" / "snap")
    calls = []
    _fake_hub(
        monkeypatch,
        {("facebook/dino-tiny", "pytorch_model.bin"): tmp_path / "hub-cache" / "snap" / "pytorch_model.bin"},
        calls,
    )
    monkeypatch.delenv("DINOKIT_OFFLINE", raising=False)
    monkeypatch.setattr(presets, "_hf_unreachable", lambda: "")  # the hub answers
    loaded = load_backbone("facebook/dino-tiny")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert calls[-1] == ("facebook/dino-tiny", "pytorch_model.bin", False)
    # online, but the hub cannot be reached: the cache, at once
    monkeypatch.setattr(presets, "_hf_unreachable", lambda: "huggingface.co cannot be reached (no network)")
    load_backbone("facebook/dino-tiny")
    assert calls[-1] == ("facebook/dino-tiny", "pytorch_model.bin", True)
    # offline: only the cache is asked
    monkeypatch.setenv("DINOKIT_OFFLINE", "1")
    load_backbone("facebook/dino-tiny")
    assert calls[-1] == ("facebook/dino-tiny", "pytorch_model.bin", True)


def test_a_local_folder_of_that_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _hf_folder(tmp_path / "facebook" / "dino-vits16", seed=3)
    calls = []
    _fake_hub(monkeypatch, {}, calls)
    loaded = load_backbone("facebook/dino-vits16")
    assert calls == []
    assert torch.equal(loaded.state_dict()["pos_embed"], model.state_dict()["pos_embed"])


def test_offline_or_without_the_hub_one_sentence_says_where_to_put_the_files(tmp_path, monkeypatch):
    _fake_hub(monkeypatch, {}, [])
    with pytest.raises(CheckpointError) as e:
        load_backbone("facebook/dino-vits16")
    msg = str(e.value)
    assert "not in the Hugging Face cache" in msg and "pytorch_model.bin" in msg
    assert "https://huggingface.co/facebook/dino-vits16" in msg and "--weights" in msg
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(CheckpointError) as e:
        load_backbone("facebook/dino-vits16")
    msg = str(e.value)
    assert "dinokit[hf]" in msg and "model.safetensors" in msg and "pytorch_model.bin" in msg


def test_catalogue_follows_the_tables_and_the_cache(tmp_path):
    cat = preset_catalogue()
    assert [p.name for p in cat] == list(PRESETS)
    assert not any(p.cached for p in cat)  # the tests' own empty torch.hub cache
    first = next(iter(PRESETS))
    path = preset_cache_path(PRESETS[first][0])
    path.parent.mkdir(parents=True, exist_ok=True)
    dinokit.save_backbone(tiny_vit(), path)
    cat = {p.name: p for p in preset_catalogue()}
    assert cat[first].cached and cat[first].cache_path == str(path) and cat[first].file == path.name
    assert all(r.repo_id.startswith("facebook/") for r in hf_catalogue())


def test_cli_repo_id_offline_is_one_sentence(tmp_path, monkeypatch):
    from tests.helpers import make_image, run_cli

    _fake_hub(monkeypatch, {}, [])
    make_image(tmp_path / "a.png", size=(32, 32))
    r = run_cli(
        [
            "features",
            "--weights",
            "facebook/dino-vits16",
            "--data",
            tmp_path,
            "--output",
            tmp_path / "f.pt",
            "--quiet",
        ]
    )
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "https://huggingface.co/facebook/dino-vits16" in r.text and "pytorch_model.bin" in r.text


def test_preset_url_of_each_kind_of_table_entry():
    from dinokit.presets import BASE_URL, preset_url

    assert preset_url("https://example.org/w/x.pth") == "https://example.org/w/x.pth"
    assert preset_url("dino_x/dino_x.pth") == BASE_URL + "dino_x/dino_x.pth"
    assert preset_url("gated_file.pth") is None  # a file requested elsewhere has no address
