"""``duplicates`` and ``similar`` share one descriptor store (``similar`` after ``duplicates`` on the
same folder with the same weights and settings runs the model on no image, counted at the model's
forward) and say when their results cannot mean much: untrained weights, nearly every pair above the
threshold (the share checked against the pairs the exact search lists)."""

from __future__ import annotations

import json
from itertools import combinations

import pytest
import torch

import dinokit.eval.descriptors as descriptors
from tests.cli.test_duplicates import planted  # noqa: F401 - the fixture
from tests.helpers import run_cli


@pytest.fixture
def forwards(monkeypatch):
    """The number of images the copy descriptor is computed for (every model forward of both commands)."""
    seen = []
    real = descriptors.copy_descriptor

    def counting(model, images: torch.Tensor, p: float = descriptors.GEM_P):
        seen.append(images.shape[0])
        return real(model, images, p)

    monkeypatch.setattr(descriptors, "copy_descriptor", counting)
    return seen


def _dups(folder, out, weights, *extra):
    return run_cli(
        ["duplicates", folder, "-o", out, "-w", weights, "--image-size", 64, "--device", "cpu", "-q", *extra]
    )


def _similar(query, folder, out, weights, *extra, size=64):
    return run_cli(
        [
            "similar",
            query,
            "--against",
            folder,
            "-o",
            out,
            "-w",
            weights,
            "--image-size",
            size,
            "--device",
            "cpu",
            "-q",
            *extra,
        ]
    )


def test_similar_after_duplicates_reuses_every_descriptor(planted, tiny2_weights, tmp_path, forwards):  # noqa: F811
    folder, _ = planted
    r = _dups(folder, tmp_path / "dups", tiny2_weights)
    assert r.exit_code == 0, r.output
    assert (
        sum(forwards) == 13 and json.loads((tmp_path / "dups" / "metrics.json").read_text())["embedded"] == 13
    )
    forwards.clear()
    query = next(iter(sorted(folder.rglob("*.png"))))
    r = _similar(query, folder, tmp_path / "sim", tiny2_weights, "--k", 3)
    assert r.exit_code == 0, r.output
    assert forwards == []  # not one image through the model
    m = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert m["embedded"] == 0 and m["reused"] == 13
    # other settings have their own store and leave the first one in place
    r = _similar(query, folder, tmp_path / "sim2", tiny2_weights, "--k", 3, size=48)
    assert r.exit_code == 0, r.output
    assert sum(forwards) == 13
    forwards.clear()
    assert _dups(folder, tmp_path / "dups", tiny2_weights, "--overwrite").exit_code == 0
    assert forwards == []
    # a store of its own where asked
    r = _dups(folder, tmp_path / "dups3", tiny2_weights, "--cache-dir", tmp_path / "mine")
    assert r.exit_code == 0 and sum(forwards) == 13 and list((tmp_path / "mine").glob("*/emb-*.npy"))


def test_duplicates_says_when_nearly_every_pair_passes(planted, tiny2_weights, tmp_path):  # noqa: F811
    folder, _ = planted
    n = 13
    for threshold, warned in (("-1", True), ("0.95", False)):
        out = tmp_path / f"d{threshold}"
        r = _dups(folder, out, tiny2_weights, "--min-similarity", threshold)
        assert r.exit_code == 0, r.output
        m = json.loads((out / "metrics.json").read_text())
        # the share is every pair the exact search lists over every pair there is (13 images: no sample)
        assert m["pairs_above_threshold_fraction"] == pytest.approx(m["n_pairs"] / (n * (n - 1) / 2))
        assert m["random_weights"] is False
        said = [w for w in m["warnings"] if "of all image pairs" in w]
        assert bool(said) == warned
        assert ("cannot mean much" in r.text) == warned
        assert json.loads((out / "pairs.json").read_text())["warnings"] == m["warnings"]
    assert m["pairs_above_threshold_fraction"] < 0.5


def test_random_weights_are_said_by_both_commands(planted, tmp_path):  # noqa: F811
    folder, _ = planted
    r = _dups(folder, tmp_path / "d", "random", "--arch", "vit_tiny", "--patch-size", 16)
    assert r.exit_code == 0, r.output
    assert "--weights random is an untrained network" in r.text
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert m["random_weights"] is True and any("untrained" in w for w in m["warnings"])
    query = sorted(folder.rglob("*.png"))[0]
    r = _similar(query, folder, tmp_path / "s", "random", "--arch", "vit_tiny", "--patch-size", 16, "--k", 20)
    assert r.exit_code == 0, r.output
    assert "--weights random is an untrained network" in r.text and "this ranking" in r.text
    data = json.loads((tmp_path / "s" / "similar.json").read_text())
    assert data["random_weights"] is True and data["warnings"] and data["embedded"] == 0  # the store of d
    # the share of (query, image) pairs at or above the threshold, from the full ranking
    scores = [mt["score"] for mt in data["queries"][0]["matches"]]
    assert len(scores) == 12  # the query's own file is never a match
    want = sum(s >= data["similarity_threshold"] - 1e-6 for s in scores) / len(scores)
    assert data["pairs_above_threshold_fraction"] == pytest.approx(want, abs=1e-6)


def test_pair_fraction_counts_each_pair_once_and_never_an_image_with_itself():
    import numpy as np

    from dinokit.eval.store import pair_fraction_above

    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 4)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    sims = [float(a[i] @ a[j]) for i, j in combinations(range(9), 2)]
    assert pair_fraction_above(a, None, 0.1) == pytest.approx(sum(s >= 0.1 for s in sims) / 36)
    b = a[:5]
    same = np.array([0, 1, 2, 3, 4, -1, -1, -1, -1])
    cross = [float(a[i] @ b[j]) for i in range(9) for j in range(5) if same[i] != j]
    assert pair_fraction_above(a, b, 0.1, same) == pytest.approx(sum(s >= 0.1 for s in cross) / len(cross))
    # a sample stands for the whole beyond its size
    big = np.repeat(a, 50, axis=0)
    assert 0.0 <= pair_fraction_above(big, None, 0.1, sample=40) <= 1.0
