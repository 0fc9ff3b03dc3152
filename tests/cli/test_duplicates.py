"""``dinokit duplicates`` end to end: planted copies hidden among distinct images are found, the stored
descriptors are reused (a second run embeds nothing), exact and faiss search agree, bad input is one sentence."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import dinokit
from tests.helpers import make_image, run_cli, smooth_photo


def _flat(text: str) -> str:
    return " ".join(text.split())


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
        smooth_photo(i).save(p)
        names.append(p)
    copies = {
        root / "misc" / "zz_resized.png": (names[0], smooth_photo(0).resize((48, 48), Image.BICUBIC)),
        root / "home" / "q_reencoded.jpg": (names[3], _jpeg(smooth_photo(3), 40)),
        root / "trip" / "c_cropped.png": (names[7], smooth_photo(7).crop((3, 3, 61, 61))),
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


def _store_chunks():
    """The chunk files of every descriptor store of this test (conftest gives each test its own root)."""
    return sorted(Path(os.environ["DINOKIT_CACHE_DIR"]).glob("*/emb-*.npy"))


def run_duplicates(folder, out, weights, *extra):
    return run_cli(
        [
            "duplicates",
            str(folder),
            "--output",
            str(out),
            "--weights",
            str(weights),
            "--image-size",
            "64",
            "--min-similarity",
            "0.95",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ]
    )


def test_finds_planted_copies_and_second_run_embeds_nothing(planted, tiny2_weights, tmp_path):
    folder, truth = planted
    out = tmp_path / "dups"
    res = run_duplicates(folder, out, tiny2_weights)
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
    chunks = _store_chunks()
    assert chunks and not list((out / "index").glob("emb-*"))  # the store is shared, not the run's
    stamps = [p.stat().st_mtime_ns for p in chunks]

    # a second run embeds nothing and finds the same pairs
    res2 = run_duplicates(folder, out, tiny2_weights, "--overwrite")
    assert res2.exit_code == 0, res2.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["embedded"] == 0 and metrics["reused"] == 13
    assert "0 files read now, 13 from the index" in _flat(res2.output)
    assert [p.stat().st_mtime_ns for p in chunks] == stamps
    assert _pairs(out) == pairs

    # one new image: only it is embedded, in a new chunk
    smooth_photo(50).save(folder / "new.png")
    res3 = run_duplicates(folder, out, tiny2_weights, "--overwrite")
    assert res3.exit_code == 0, res3.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["embedded"] == 1 and metrics["reused"] == 13
    assert len(_store_chunks()) == len(chunks) + 1

    # other weights: the store does not match and everything is embedded again
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16, depth=2), other)
    res4 = run_duplicates(folder, out, other, "--overwrite")
    assert res4.exit_code == 0, res4.output
    assert json.loads((out / "metrics.json").read_text())["embedded"] == 14


def test_against_pairs_only_across_folders(planted, tiny2_weights, tmp_path):
    folder, _ = planted
    queries = tmp_path / "queries"
    queries.mkdir()
    _jpeg(smooth_photo(5), 50).save(queries / "suspect.jpg")
    smooth_photo(99).save(queries / "unrelated.png")
    smooth_photo(5).resize((40, 40)).save(queries / "suspect_small.png")
    out = tmp_path / "dups"
    res = run_duplicates(queries, out, tiny2_weights, "--against", str(folder))
    assert res.exit_code == 0, res.output
    pairs = _pairs(out)
    target = [p for p in folder.rglob("img_05.png")][0]
    assert {(Path(a).name, b) for _, a, b in pairs} == {
        ("suspect.jpg", str(target)),
        ("suspect_small.png", str(target)),
    }


def test_faiss_backend_agrees_with_exact(planted, tiny2_weights, tmp_path):
    pytest.importorskip("faiss")
    folder, truth = planted
    out = tmp_path / "dups"
    res = run_duplicates(folder, out, tiny2_weights, "--backend", "faiss", "--k", "3")
    assert res.exit_code == 0, res.output
    assert {frozenset((a, b)) for _, a, b in _pairs(out)} == truth


def test_unreadable_images_are_skipped_and_counted(planted, tiny2_weights, tmp_path):
    folder, truth = planted
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = tmp_path / "dups"
    res = run_duplicates(folder, out, tiny2_weights)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["unreadable"] == 1
    assert "(1 unreadable image skipped)" in _flat(res.output)
    assert {frozenset((a, b)) for _, a, b in _pairs(out)} == truth


def test_bad_input_is_one_sentence(tmp_path, tiny2_weights):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_duplicates(empty, tmp_path / "o1", tiny2_weights)
    assert res.exit_code == 2 and "holds no images" in _flat(res.output) and "Traceback" not in res.output
    res = run_duplicates(tmp_path / "nowhere", tmp_path / "o2", tiny2_weights)
    assert res.exit_code == 2 and "does not exist" in _flat(res.output)
    smooth_photo(0).save(empty / "x.png")
    res = run_cli(
        [
            "duplicates",
            str(empty),
            "--output",
            str(tmp_path / "o3"),
            "--min-similarity",
            "3",
            "--quiet",
            "--weights",
            "random",
        ]
    )  # (a missing --weights is refused first, before any import)
    assert res.exit_code == 2 and "between -1 and 1" in _flat(res.output)
    res = run_cli(
        [
            "duplicates",
            str(empty),
            "--output",
            str(tmp_path / "o4"),
            "--backend",
            "annoy",
            "--quiet",
            "--weights",
            "random",
        ]
    )
    assert res.exit_code == 2 and "Unknown backend" in _flat(res.output)


# -- clusters ----------------------------------------------------------------------------------------
def test_an_image_and_three_copies_are_one_cluster_of_four(tmp_path, tiny2_weights):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(6):
        smooth_photo(i).save(root / f"photo_{i}.png")
    original = smooth_photo(0)
    original.resize((48, 48), Image.BICUBIC).save(root / "copy_resized.png")
    _jpeg(original, 40).save(root / "copy_reencoded.jpg")
    original.transpose(Image.FLIP_LEFT_RIGHT).transpose(Image.FLIP_LEFT_RIGHT).save(root / "copy_same.png")
    group = {
        str(root / n) for n in ("photo_0.png", "copy_resized.png", "copy_reencoded.jpg", "copy_same.png")
    }
    out = tmp_path / "out"
    r = run_duplicates(root, out, tiny2_weights)
    assert r.exit_code == 0, r.output
    pairs = _pairs(out)
    assert {frozenset(p[1:]) for p in pairs} <= {frozenset((a, b)) for a in group for b in group if a != b}
    clusters = json.loads((out / "clusters.json").read_text())["clusters"]
    assert len(clusters) == 1 and set(clusters[0]["images"]) == group and clusters[0]["size"] == 4
    assert clusters[0]["pairs"] == len(pairs) >= 3
    with open(out / "clusters.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["image"] for r in rows} == group and {r["cluster"] for r in rows} == {"1"}
    assert {r["size"] for r in rows} == {"4"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_clusters"] == 1 and metrics["images_in_clusters"] == 4
    assert "in 1 cluster (4 images)" in _flat(r.output)


def test_unreadable_image_counts_agree_and_strict_stops(tmp_path, tiny2_weights):
    folder = tmp_path / "imgs"
    for i in range(3):
        make_image(folder / f"{i}.png", size=(48, 40), seed=i)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not the rest of a jpeg")
    out = tmp_path / "dups"
    res = run_duplicates(folder, out, tiny2_weights)
    assert res.exit_code == 0, res.output
    # 3 readable images searched, 1 skipped, 4 files read: the counts add up and say what they count
    assert "among 3 images (1 unreadable image skipped); 4 files read now, 0 from the index." in res.text
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["n_images"] == 3 and summary["unreadable"] == 1
    strict = tmp_path / "strict"
    res = run_duplicates(folder, strict, tiny2_weights, "--strict")
    assert res.exit_code == 2 and res.text.startswith("Error:") and "broken.jpg" in res.text


def test_the_decode_is_recorded_and_a_store_of_the_other_decode_is_not_reused(
    planted, tiny2_weights, tmp_path
):
    folder, _ = planted
    out = tmp_path / "dups"
    assert run_duplicates(folder, out, tiny2_weights).exit_code == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["exact_decode"] is False
    res = run_duplicates(folder, out, tiny2_weights, "--exact-decode", "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["config"]["exact_decode"] is True
    assert json.loads((out / "pairs.json").read_text())["embedded"] == 13  # embedded again, not reused
    assert run_duplicates(folder, out, tiny2_weights, "--exact-decode", "--overwrite").exit_code == 0
    assert json.loads((out / "pairs.json").read_text())["embedded"] == 0  # the same decode: reused
