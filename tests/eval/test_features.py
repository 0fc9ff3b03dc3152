"""Feature extraction: the feature layouts against the model's own tokens, feature files and their
fingerprints."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import dinokit
from dinokit.data.images import open_rgb
from dinokit.data.transforms import eval_transform
from dinokit.errors import DataError
from dinokit.eval.features import (
    Embedder,
    FeatureSpec,
    cls_feature_fn,
    compute_features,
    load_features,
    save_features,
)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return dinokit.build_backbone("vit_tiny", 16, depth=3).eval()


def manual_tokens(model, x):
    """Every block's output through the final norm, by walking the blocks by hand."""
    t = model.prepare_tokens(x)
    outs = []
    for blk in model.blocks:
        t = blk(t)
        outs.append(model.norm(t))
    return outs


@torch.no_grad()
def test_feature_layouts(tiny_model):
    x = torch.randn(2, 3, 32, 48)
    outs = manual_tokens(tiny_model, x)
    d = tiny_model.embed_dim
    f1 = cls_feature_fn()(tiny_model, x)
    torch.testing.assert_close(f1, outs[-1][:, 0])
    f3 = cls_feature_fn(n_last_blocks=3)(tiny_model, x)
    torch.testing.assert_close(f3, torch.cat([o[:, 0] for o in outs[-3:]], dim=1))
    # ViT-B's probe feature: CLS and patch average interleaved element by element
    fa = cls_feature_fn(n_last_blocks=1, avgpool_patch_tokens=True)(tiny_model, x)
    assert fa.shape == (2, 2 * d)
    torch.testing.assert_close(fa[:, 0::2], outs[-1][:, 0])
    torch.testing.assert_close(fa[:, 1::2], outs[-1][:, 1:].mean(dim=1))


def test_compute_features_labelled_and_plain(labelled_folder, tiny_model, tmp_path):
    t = eval_transform(32, 32)
    fs = compute_features(tiny_model, labelled_folder / "train", transform=t, batch_size=4)
    assert fs.classes == ["blue", "green", "red"] and len(fs) == 18 and fs.dim == 192
    assert fs.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    # row i is the model's CLS feature of paths[i]
    i = 7
    with torch.no_grad():
        want = tiny_model(t(open_rgb(fs.paths[i]))[None])[0]
    torch.testing.assert_close(fs.features[i], want, rtol=1e-4, atol=1e-5)
    assert fs.fingerprint["weights"].startswith("state:")
    # a plain folder is searched recursively and has no labels; an unreadable file is left out
    plain = tmp_path / "plain"
    shutil.copytree(labelled_folder / "val", plain / "deep" / "er")
    shutil.copy(labelled_folder / "train" / "red" / "0.png", plain / "top.png")
    (plain / "broken.png").write_bytes(b"not an image")
    fs2 = compute_features(tiny_model, plain, transform=t, batch_size=4)
    assert fs2.labels is None and len(fs2) == 7 and not any(p.endswith("broken.png") for p in fs2.paths)
    with pytest.raises(DataError, match="is empty"):
        (tmp_path / "none").mkdir()
        compute_features(tiny_model, tmp_path / "none", transform=t)


def test_save_and_load_round_trip(labelled_folder, tiny_model, tmp_path):
    fs = compute_features(tiny_model, labelled_folder / "val", transform=eval_transform(32, 32))
    save_features(fs, tmp_path / "f.pt")
    raw = torch.load(tmp_path / "f.pt", weights_only=True)  # plain data only
    assert set(raw) >= {"features", "labels", "classes", "paths", "fingerprint"}
    back = load_features(tmp_path / "f.pt")
    assert torch.equal(back.features, fs.features) and torch.equal(back.labels, fs.labels)
    assert back.paths == fs.paths and back.classes == fs.classes and back.fingerprint == fs.fingerprint
    with pytest.raises(dinokit.errors.OutputExistsError, match="already exists"):
        save_features(fs, tmp_path / "f.pt")
    written = save_features(fs, tmp_path / "npy", format="npy")
    assert {p.name for p in written} >= {"features.npy", "paths.txt"}
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "features.npy"), fs.features.numpy())
    assert (tmp_path / "npy" / "paths.txt").read_text().splitlines() == fs.paths
    back = load_features(tmp_path / "npy")
    assert torch.equal(back.labels, fs.labels) and back.fingerprint == fs.fingerprint


def test_embedder_cache_is_reused_only_when_fingerprint_matches(labelled_folder, tiny4_weights, tmp_path):
    spec = FeatureSpec(weights=str(tiny4_weights), resize=32, crop=32, device="cpu")
    cache = tmp_path / "cache.pt"
    a = Embedder(spec).embed(labelled_folder / "val", cache=cache)
    assert a.fingerprint["weights"].startswith("state:")
    stamp = cache.stat().st_mtime_ns
    b = Embedder(spec).embed(labelled_folder / "val", cache=cache)
    assert cache.stat().st_mtime_ns == stamp and torch.equal(a.features, b.features)
    # other feature options: recomputed
    spec2 = FeatureSpec(weights=str(tiny4_weights), resize=32, crop=32, device="cpu", n_last_blocks=2)
    c = Embedder(spec2).embed(labelled_folder / "val", cache=cache)
    assert c.dim == 2 * a.dim and cache.stat().st_mtime_ns != stamp
    with pytest.raises(DataError, match="more blocks than the model's 4"):
        Embedder(FeatureSpec(weights=str(tiny4_weights), n_last_blocks=5))
    # random weights are identified by their seed
    r = Embedder(FeatureSpec(weights="random", arch="vit_tiny", seed=3), depth=1)
    assert r.fingerprint["weights"] == "random(seed=3)"
