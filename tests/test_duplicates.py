"""``dinokit duplicates``: planted copies hidden among distinct images are found, the stored
descriptors are reused (a second run embeds nothing), block-wise search equals brute force."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from typer.testing import CliRunner

import dinokit
from dinokit.eval.near_duplicates import (
    EmbeddingStore,
    search_pairs_exact,
    search_pairs_faiss,
)

runner = CliRunner()


def _cli(args):
    from dinokit.commands import app

    return runner.invoke(app, args)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _photo(seed: int, size=64) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(1))


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.fixture
def planted(tmp_path):
    """10 distinct images in nested folders, and 3 edited copies under unrelated names."""
    root = tmp_path / "photos"
    names = []
    for i in range(10):
        sub = root / ("trip" if i % 2 else "home") / ("a" if i % 3 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"img_{i:02d}.png"
        _photo(i).save(p)
        names.append(p)
    copies = {
        root / "misc" / "zz_resized.png": (names[0], _photo(0).resize((48, 48), Image.BICUBIC)),
        root / "home" / "q_reencoded.jpg": (names[3], _jpeg(_photo(3), 40)),
        root / "trip" / "c_cropped.png": (names[7], _photo(7).crop((3, 3, 61, 61))),
    }
    truth = set()
    for path, (orig, img) in copies.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        truth.add(frozenset((str(orig), str(path))))
    return root, truth


def _pairs(out: Path) -> list[tuple[float, str, str]]:
    with open(out / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    return [(float(r["score"]), r["image_a"], r["image_b"]) for r in rows]


def _run(folder, out, weights, *extra):
    return _cli(["duplicates", str(folder), "--output", str(out), "--weights", str(weights), "--image-size", "64",
                 "--threshold", "0.95", "--device", "cpu", "--quiet", *extra])


def test_finds_planted_copies_and_second_run_embeds_nothing(planted, tiny2_weights, tmp_path):
    folder, truth = planted
    out = tmp_path / "dups"
    res = _run(folder, out, tiny2_weights)
    assert res.exit_code == 0, res.output
    pairs = _pairs(out)
    assert {frozenset((a, b)) for _, a, b in pairs} == truth
    assert [s for s, _, _ in pairs] == sorted((s for s, _, _ in pairs), reverse=True)
    assert all(s >= 0.95 for s, _, _ in pairs)
    data = json.loads((out / "pairs.json").read_text())
    assert data["n_pairs"] == 3 and len(data["pairs"]) == 3 and data["n_images"] == 13
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["embedded"] == 13 and metrics["reused"] == 0
    sheet = Image.open(out / "pairs.png")
    assert sheet.height > 3 * 160  # one row per pair
    chunks = sorted((out / "index").glob("emb-*.npy"))
    assert chunks
    stamps = [p.stat().st_mtime_ns for p in chunks]

    # a second run embeds nothing and finds the same pairs
    res2 = _run(folder, out, tiny2_weights, "--overwrite")
    assert res2.exit_code == 0, res2.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["embedded"] == 0 and metrics["reused"] == 13
    assert "embedded 0 new images" in _flat(res2.output)
    assert [p.stat().st_mtime_ns for p in chunks] == stamps
    assert _pairs(out) == pairs

    # one new image: only it is embedded, in a new chunk
    _photo(50).save(folder / "new.png")
    res3 = _run(folder, out, tiny2_weights, "--overwrite")
    assert res3.exit_code == 0, res3.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["embedded"] == 1 and metrics["reused"] == 13
    assert len(list((out / "index").glob("emb-*.npy"))) == len(chunks) + 1

    # other weights: the store does not match and everything is embedded again
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16, depth=2), other)
    res4 = _run(folder, out, other, "--overwrite")
    assert res4.exit_code == 0, res4.output
    assert json.loads((out / "metrics.json").read_text())["embedded"] == 14


def test_against_pairs_only_across_folders(planted, tiny2_weights, tmp_path):
    folder, _ = planted
    queries = tmp_path / "queries"
    queries.mkdir()
    _jpeg(_photo(5), 50).save(queries / "suspect.jpg")
    _photo(99).save(queries / "unrelated.png")
    _photo(5).resize((40, 40)).save(queries / "suspect_small.png")
    out = tmp_path / "dups"
    res = _run(queries, out, tiny2_weights, "--against", str(folder))
    assert res.exit_code == 0, res.output
    pairs = _pairs(out)
    target = [p for p in folder.rglob("img_05.png")][0]
    assert {(Path(a).name, b) for _, a, b in pairs} == {("suspect.jpg", str(target)), ("suspect_small.png", str(target))}


def test_faiss_backend_agrees_with_exact(planted, tiny2_weights, tmp_path):
    pytest.importorskip("faiss")
    folder, truth = planted
    out = tmp_path / "dups"
    res = _run(folder, out, tiny2_weights, "--backend", "faiss", "--neighbours", "3")
    assert res.exit_code == 0, res.output
    assert {frozenset((a, b)) for _, a, b in _pairs(out)} == truth


def _brute_pairs(q, d, t, self_search):
    out = set()
    for i in range(len(q)):
        for j in range(len(d)):
            if self_search and j <= i:
                continue
            s = float(np.dot(q[i], d[j]))
            if s >= t:
                out.add((i, j))
    return out


def test_blockwise_search_equals_brute_force():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 16))
    q = np.concatenate([base, base[:4] + 0.3 * rng.normal(size=(4, 16)), rng.normal(size=(7, 16))])
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    for block in (1, 3, 5, 100):
        a, b, s, truncated, best = search_pairs_exact(q, None, 0.6, block=block)
        assert set(zip(a.tolist(), b.tolist())) == _brute_pairs(q, q, 0.6, True)
        assert np.allclose(s, [q[i] @ q[j] for i, j in zip(a, b)], atol=1e-5)
        assert not truncated
        sim = q @ q.T
        np.fill_diagonal(sim, -np.inf)
        assert np.allclose(best, sim.max(1), atol=1e-5)
    d = q[3:12]
    same = np.array([i - 3 if 3 <= i < 12 else -1 for i in range(len(q))])
    a, b, s, _, _ = search_pairs_exact(q, d, 0.6, block=4, same=same)
    want = {(i, j) for i, j in _brute_pairs(q, d, 0.6, False) if same[i] != j}
    assert set(zip(a.tolist(), b.tolist())) == want
    # a cap keeps the best pairs
    a, b, s, truncated, _ = search_pairs_exact(q, None, -1.0, max_pairs=5, block=2)
    all_s = np.sort((q @ q.T)[np.triu_indices(len(q), 1)])[::-1]
    assert truncated and len(s) == 5 and np.allclose(s, all_s[:5], atol=1e-5)


def test_faiss_search_finds_close_pairs():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 32))
    q = np.concatenate([base, base[:5] + 0.05 * rng.normal(size=(5, 32))])
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    a, b, s, _, _ = search_pairs_faiss(q, None, 0.9, neighbours=4, block=16)
    assert set(zip(a.tolist(), b.tolist())) == _brute_pairs(q, q, 0.9, True)


def test_store_round_trip_in_chunks(tmp_path):
    from dinokit.eval.descriptors import (
        DescriptorEmbedder,
        copy_feature_fn,
        copy_transform,
    )
    from dinokit.eval.near_duplicates import embed_into_store

    paths = []
    for i in range(5):
        p = tmp_path / "imgs" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        _photo(i, 32).save(p)
        paths.append(p)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"nope")
    paths.append(tmp_path / "imgs" / "bad.png")
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_tiny", 16, depth=1).eval()
    emb = DescriptorEmbedder(model, "random", copy_transform(32), copy_feature_fn(), "cls+gem", torch.device("cpu"))
    store = EmbeddingStore(tmp_path / "index", emb.fingerprint)
    assert embed_into_store(store, paths, emb, chunk_size=2) == 6
    assert len(list((tmp_path / "index").glob("emb-*.npy"))) == 3
    assert store.readable(paths) == [True] * 5 + [False]
    again = EmbeddingStore(tmp_path / "index", emb.fingerprint)
    assert again.missing(paths) == []
    got = again.read(paths[:5][::-1])
    from dinokit.eval.descriptors import copy_descriptor

    with torch.no_grad():
        x = torch.stack([copy_transform(32)(Image.open(p).convert("RGB")) for p in paths[:5][::-1]])
        want = copy_descriptor(model, x).numpy()
    assert np.allclose(got, want, atol=1e-5)


def test_unreadable_images_are_skipped_and_counted(planted, tiny2_weights, tmp_path):
    folder, truth = planted
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = tmp_path / "dups"
    res = _run(folder, out, tiny2_weights)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["unreadable"] == 1
    assert "skipped 1 unreadable" in _flat(res.output)
    assert {frozenset((a, b)) for _, a, b in _pairs(out)} == truth


def test_bad_input_is_one_sentence(tmp_path, tiny2_weights):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _run(empty, tmp_path / "o1", tiny2_weights)
    assert res.exit_code == 2 and "holds no images" in _flat(res.output) and "Traceback" not in res.output
    res = _run(tmp_path / "nowhere", tmp_path / "o2", tiny2_weights)
    assert res.exit_code == 2 and "does not exist" in _flat(res.output)
    _photo(0).save(empty / "x.png")
    res = _cli(["duplicates", str(empty), "--output", str(tmp_path / "o3"), "--threshold", "3", "--quiet"])
    assert res.exit_code == 2 and "between -1 and 1" in _flat(res.output)
    res = _cli(["duplicates", str(empty), "--output", str(tmp_path / "o4"), "--backend", "annoy", "--quiet"])
    assert res.exit_code == 2 and "Unknown backend" in _flat(res.output)


def test_faiss_missing_is_one_sentence(monkeypatch):
    import sys

    from dinokit.errors import DinokitError

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now fails
    q = np.eye(3, dtype=np.float32)
    with pytest.raises(DinokitError, match=r"needs the faiss package \(pip install faiss-cpu"):
        search_pairs_faiss(q, None, 0.9)
