"""Copy detection: GeM, whitening and Holidays AP against formulas written here, a hand-worked mAP,
the Copydays layout rules, and ``dinokit copydetect`` end to end on a tiny generated Copydays."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from typer.testing import CliRunner

import dinokit
from dinokit.data.copydays import copydays_positives, scan_copydays
from dinokit.errors import DataError
from dinokit.eval.copy_detection import mean_average_precision, rank_database
from dinokit.eval.descriptors import copy_descriptor, copy_transform, gem, learn_whitening
from dinokit.eval.metrics import trapezoid_ap as holidays_ap

runner = CliRunner()


def _cli(args):
    from dinokit.commands import app

    return runner.invoke(app, args)


# ---------------------------------------------------------------------------------------------
# formulas
# ---------------------------------------------------------------------------------------------
def test_gem_matches_pooling_of_the_patch_grid():
    torch.manual_seed(0)
    b, h, w, d = 2, 3, 4, 5
    tokens = torch.randn(b, h * w, d)
    # the reference's formulation: clamp, 4th power, average-pool the whole grid, 4th root
    grid = tokens.reshape(b, h, w, d).clamp(min=1e-6).permute(0, 3, 1, 2)
    ref = torch.nn.functional.avg_pool2d(grid.pow(4), (h, w)).pow(1.0 / 4).reshape(b, -1)
    assert torch.allclose(gem(tokens), ref, atol=1e-6)
    # element by element: (mean x^4)^(1/4) with negatives clamped to 1e-6
    x = tokens[1, :, 2].numpy().astype(np.float64)
    expect = np.mean(np.maximum(x, 1e-6) ** 4) ** 0.25
    assert gem(tokens)[1, 2].item() == pytest.approx(expect, rel=1e-5)
    # p = 1 on positive tokens is the mean; large p approaches the max
    pos = torch.rand(b, h * w, d) + 0.1
    assert torch.allclose(gem(pos, p=1), pos.mean(dim=1), atol=1e-6)
    assert torch.allclose(gem(pos, p=64), pos.amax(dim=1), rtol=5e-2)


def test_descriptor_is_cls_then_gem_of_last_block_after_norm():
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_tiny", 16, depth=2).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        desc = copy_descriptor(model, x)
        last = model.get_intermediate_layers(x, 1)[0]  # after the final norm
        cls = model(x)
    assert desc.shape == (2, 2 * 192)
    assert torch.allclose(desc[:, :192], cls, atol=1e-5)
    patches = last[:, 1:].reshape(2, 3, 4, 192).clamp(min=1e-6).permute(0, 3, 1, 2)
    ref = torch.nn.functional.avg_pool2d(patches.pow(4), (3, 4)).pow(0.25).reshape(2, -1)
    assert torch.allclose(desc[:, 192:], ref, atol=1e-5)


def _numpy_whitening(f: np.ndarray, eps=1e-5):
    cov = f.T @ f / f.shape[0]  # UNcentred second moment, as the reference
    d, v = np.linalg.eigh(cov)
    floor = d.max() * eps
    d = np.where(d < floor, floor, d)
    idx = np.argsort(d)[::-1]
    d, v = d[idx], v[:, idx]
    return f.mean(0), np.diag(d**-0.5) @ v.T, d


def test_whitening_equals_eigendecomposition_formula():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 3.0  # a mean far from 0
    w = learn_whitening(torch.from_numpy(f).float())
    mean, proj, eig = _numpy_whitening(f)
    assert np.allclose(w.mean.numpy(), mean, atol=1e-5)
    assert np.allclose(w.eigenvalues.numpy(), eig, rtol=1e-4)
    # eigenvectors are defined up to sign: compare P^T P = V diag(1/eig) V^T and |P|
    assert np.allclose(w.projection.double().numpy().T @ w.projection.double().numpy(), proj.T @ proj, rtol=1e-3)
    assert np.allclose(np.abs(w.projection.numpy()), np.abs(proj), rtol=1e-3, atol=1e-5)
    # P M P^T = I for the uncentred second moment M (nothing clamped here)
    m = f.T @ f / len(f)
    p = w.projection.double().numpy()
    assert np.allclose(p @ m @ p.T, np.eye(6), atol=1e-4)
    assert w.n_clamped == 0
    # projection: normalise(P (x - mean))
    x = rng.normal(size=(3, 6))
    y = (x - mean) @ proj.T
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    got = w.apply(torch.from_numpy(x).float()).double().numpy()
    assert np.allclose(np.abs(got), np.abs(y), atol=1e-4)
    assert np.allclose(got @ got.T, y @ y.T, atol=1e-4)  # cosines do not depend on the signs


def test_whitening_clamps_small_eigenvalues():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(3, 8))  # rank 3 in 8 dimensions: 5 zero eigenvalues
    w = learn_whitening(torch.from_numpy(f).float())
    _, _, eig = _numpy_whitening(f)
    assert w.n_clamped == 5
    floor = eig.max() * 1e-5
    assert np.allclose(w.eigenvalues.numpy()[-5:], floor, rtol=1e-3)
    assert np.all(np.isfinite(w.projection.numpy()))
    assert np.allclose(w.eigenvalues.numpy(), eig, rtol=1e-3)


def _ap_from_relevance(relevance: list[int], n_pos: int) -> float:
    """The trapezoid rule on the precision-recall curve, walked item by item."""
    ap, hits = 0.0, 0
    for r, rel in enumerate(relevance):
        if rel:
            p_before = 1.0 if r == 0 else hits / r
            hits += 1
            p_after = hits / (r + 1)
            ap += (p_before + p_after) / 2 / n_pos
    return ap


def test_holidays_ap_equals_trapezoid_formula():
    rng = np.random.default_rng(0)
    for _ in range(50):
        rel = (rng.random(12) < 0.3).astype(int).tolist()
        n_pos = sum(rel) + int(rng.integers(0, 3))  # some positives never retrieved
        if n_pos == 0:
            continue
        ranks = [i for i, r in enumerate(rel) if r]
        assert holidays_ap(ranks, n_pos) == pytest.approx(_ap_from_relevance(rel, n_pos))
    assert holidays_ap([0, 1, 2], 3) == pytest.approx(1.0)
    assert holidays_ap([], 2) == 0.0


def _scores_to_vectors(scores):
    """Query vectors whose cosine with the one-hot database rows orders them as ``scores`` do."""
    q = torch.tensor(scores, dtype=torch.float32)
    return torch.nn.functional.normalize(q, dim=1), torch.eye(q.shape[1])


def test_three_queries_five_images_map_by_hand():
    # rankings: q0 -> [2,0,4,1,3], q1 -> [1,3,0,2,4], q2 -> [4,2,3,0,1]
    scores = [[4, 2, 5, 1, 3], [3, 5, 2, 4, 1], [2, 1, 4, 3, 5]]
    positives = [[2], [3, 4], [4, 0, 1]]
    q, db = _scores_to_vectors(scores)
    ranked, sims = rank_database(q, db, top=None)
    assert ranked.tolist() == [[2, 0, 4, 1, 3], [1, 3, 0, 2, 4], [4, 2, 3, 0, 1]]
    assert torch.all(sims[:, :-1] >= sims[:, 1:])
    # by hand: q0 positive at rank 0 -> (1 + 1)/2 = 1
    # q1 positives at ranks 1, 4 -> (0 + 1/2)/2 * 1/2 + (1/4 + 2/5)/2 * 1/2 = 0.125 + 0.1625 = 0.2875
    # q2 positives at ranks 0, 3, 4 -> 1/3 + (1/3 + 2/4)/6 + (2/4 + 3/5)/6 = 0.655556
    mAP, aps = mean_average_precision(ranked, positives)
    assert aps == pytest.approx([1.0, 0.2875, 1 / 3 + (1 / 3 + 0.5) / 6 + (0.5 + 0.6) / 6])
    assert mAP == pytest.approx((1.0 + 0.2875 + 0.6555556) / 3, abs=1e-6)
    # cut at the top 3: q1 keeps only its rank-1 positive, q2 only its rank-0 one
    ranked3, _ = rank_database(q, db, top=3)
    mAP3, _ = mean_average_precision(ranked3, positives)
    assert mAP3 == pytest.approx((1.0 + 0.125 + 1 / 3) / 3)


def test_positives_follow_copydays_naming():
    originals = [Path(f"{g:04d}00.jpg") for g in (2000, 2001, 2002)]
    strong = [Path("200001.jpg"), Path("200002.jpg"), Path("200203.jpg")]
    assert copydays_positives("strong", strong, originals) == [[0], [0], [2]]
    jpeg = [Path("200100.jpg"), Path("200000.jpg")]
    assert copydays_positives("jpegqual/50", jpeg, originals) == [[1], [0]]
    # a 4-character prefix shared by two originals makes both positives
    originals2 = [Path("100000.jpg"), Path("100050.jpg")]
    assert copydays_positives("strong", [Path("100001.jpg")], originals2) == [[0, 1]]
    with pytest.raises(DataError):
        copydays_positives("crops/10", [Path("999900.jpg")], originals)


# ---------------------------------------------------------------------------------------------
# a tiny Copydays
# ---------------------------------------------------------------------------------------------
def _photo(seed: int, size=64) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    return img.filter(ImageFilter.GaussianBlur(1))


def make_copydays(root: Path, n_groups: int = 4) -> Path:
    """original/{g}00.jpg, strong/{g}01.jpg (+ {g}02 for the first group), jpegqual/{10,50}, crops/50."""
    for g in range(n_groups):
        group = 2000 + g
        img = _photo(g)
        name = f"{group:04d}00.jpg"
        for sub in ("original",):
            (root / sub).mkdir(parents=True, exist_ok=True)
            img.save(root / sub / name, quality=95)
        for q in (10, 50):
            (root / "jpegqual" / str(q)).mkdir(parents=True, exist_ok=True)
            img.save(root / "jpegqual" / str(q) / name, quality=q)
        (root / "crops" / "50").mkdir(parents=True, exist_ok=True)
        img.crop((8, 8, 56, 56)).save(root / "crops" / "50" / name, quality=90)
        (root / "strong").mkdir(parents=True, exist_ok=True)
        img.rotate(10).filter(ImageFilter.GaussianBlur(2)).save(root / "strong" / f"{group:04d}01.jpg")
        if g == 0:
            Image.eval(img, lambda v: 255 - v).save(root / "strong" / f"{group:04d}02.jpg")
    (root / "notes").mkdir(exist_ok=True)  # other folders are ignored
    return root


@pytest.fixture
def copydays(tmp_path) -> Path:
    return make_copydays(tmp_path / "copydays")


@pytest.fixture
def tiny2_weights(tmp_path) -> Path:
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_tiny", 16, depth=2)
    path = tmp_path / "tiny2.pth"
    dinokit.save_backbone(model, path)
    return path


def test_scan_reads_blocks_from_folders(copydays):
    layout = scan_copydays(copydays)
    assert list(layout.blocks) == ["original", "strong", "jpegqual/10", "jpegqual/50", "crops/50"]
    assert len(layout.blocks["strong"]) == 5
    assert [p.name for p in layout.originals] == ["200000.jpg", "200100.jpg", "200200.jpg", "200300.jpg"]


def _independent_map(weights: Path, root: Path, block: str, size: int = 64, top: int = 20) -> float:
    """Descriptors and AP recomputed here from their definitions."""
    from torchvision import transforms as T

    model = dinokit.load_backbone(str(weights)).eval()
    tf = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def describe(paths):
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
        with torch.no_grad():
            t = model.get_intermediate_layers(x, 1)[0]
        g = (t[:, 1:].clamp(min=1e-6) ** 4).mean(1) ** 0.25
        d = torch.cat((t[:, 0], g), 1)
        return d / d.norm(dim=1, keepdim=True)

    originals = sorted((root / "original").glob("*.jpg"))
    queries = sorted((root / block).glob("*.jpg"))
    sim = describe(queries) @ describe(originals).T
    aps = []
    for qi, qp in enumerate(queries):
        order = torch.argsort(sim[qi], descending=True)[:top].tolist()
        pos = {j for j, o in enumerate(originals) if (o.name[:4] == qp.name[:4] if block == "strong" else o.name == qp.name)}
        rel = [int(j in pos) for j in order]
        aps.append(_ap_from_relevance(rel, len(pos)))
    return float(np.mean(aps))


def test_copydetect_cli_end_to_end(copydays, tiny2_weights, tmp_path):
    out = tmp_path / "run"
    args = ["copydetect", "--data", str(copydays), "--weights", str(tiny2_weights), "--image-size", "64",
            "--output", str(out), "--device", "cpu", "--quiet"]
    res = _cli(args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    maps = metrics["mAP"]
    assert set(maps) == {"original", "strong", "jpegqual/10", "jpegqual/50", "crops/50"}
    assert maps["original"] == pytest.approx(1.0)  # every original finds itself first
    assert all(0.0 <= v <= 1.0 for v in maps.values())
    assert metrics["queries"]["strong"] == 5
    assert metrics["config"]["image_size"] == 64
    for block in ("strong", "crops/50", "jpegqual/10"):
        assert maps[block] == pytest.approx(_independent_map(tiny2_weights, copydays, block), abs=1e-4)
    assert "strong" in res.output
    # a second run reuses every cached descriptor and gives the same numbers
    cache_files = sorted((out / "cache").glob("*.pt"))
    stamps = [p.stat().st_mtime_ns for p in cache_files]
    res2 = _cli(args + ["--overwrite"])
    assert res2.exit_code == 0, res2.output
    assert [p.stat().st_mtime_ns for p in cache_files] == stamps
    assert json.loads((out / "metrics.json").read_text())["mAP"] == maps
    # without --overwrite an existing run is refused in one sentence
    res3 = _cli(args)
    assert res3.exit_code == 2 and "--overwrite" in _flat(res3.output)


def test_copydetect_with_whitening_and_distractors(copydays, tiny2_weights, tmp_path):
    white = tmp_path / "white"
    distr = tmp_path / "distr"
    for i in range(6):
        white.mkdir(exist_ok=True)
        _photo(100 + i).save(white / f"w{i}.jpg")
    for i in range(3):
        distr.mkdir(exist_ok=True)
        _photo(200 + i).save(distr / f"d{i}.jpg")
    out = tmp_path / "run"
    res = _cli(["copydetect", "--data", str(copydays), "--weights", str(tiny2_weights), "--image-size", "32",
                "--whitening", str(white), "--distractors", str(distr), "--top", "0",
                "--output", str(out), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["database_size"] == 4 + 3
    assert metrics["n_distractors"] == 3
    assert metrics["whitening"]["images"] == 6
    # 6 whitening images span at most 6 of the 384 dimensions: the rest are clamped
    assert metrics["whitening"]["clamped_eigenvalues"] >= 384 - 6
    assert math.isclose(metrics["mAP"]["original"], 1.0)


# ---------------------------------------------------------------------------------------------
# bad input: one sentence, exit code 2
# ---------------------------------------------------------------------------------------------
def _flat(output: str) -> str:
    return " ".join(output.split())


def _one_sentence(output: str) -> bool:
    """Exactly one ``Error:`` sentence, last, and no traceback (warnings about skipped files may precede it)."""
    text = " ".join(output.split())
    return text.count("Error:") == 1 and "Traceback" not in output and text.split("Error:")[1].strip().endswith(".")


def test_missing_block_folder(copydays, tiny2_weights, tmp_path):
    import shutil

    shutil.rmtree(copydays / "strong")
    res = _cli(["copydetect", "--data", str(copydays), "--weights", str(tiny2_weights),
                "--output", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 2
    assert _one_sentence(res.output) and "no strong/ block" in _flat(res.output)
    with pytest.raises(DataError, match="original/"):
        shutil.rmtree(copydays / "original")
        scan_copydays(copydays)


def test_empty_query_block(copydays, tiny2_weights, tmp_path):
    for p in (copydays / "crops" / "50").iterdir():
        p.unlink()
    res = _cli(["copydetect", "--data", str(copydays), "--weights", str(tiny2_weights),
                "--output", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 2
    assert _one_sentence(res.output) and "holds no images" in _flat(res.output)


def test_unreadable_images_are_skipped_and_counted(copydays, tiny2_weights, tmp_path):
    (copydays / "jpegqual" / "50" / "200300.jpg").write_bytes(b"not a jpeg")
    (copydays / "strong" / "200101.jpg").write_bytes(b"")
    out = tmp_path / "run"
    res = _cli(["copydetect", "--data", str(copydays), "--weights", str(tiny2_weights), "--image-size", "32",
                "--output", str(out), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unreadable"]["jpegqual/50"] == 1
    assert metrics["unreadable"]["strong"] == 1
    assert metrics["queries"]["jpegqual/50"] == 3
    assert metrics["queries"]["strong"] == 4
    assert "2 unreadable images were skipped" in _flat(res.output)


def test_all_queries_unreadable_is_an_error(copydays, tiny2_weights, tmp_path):
    for p in (copydays / "strong").iterdir():
        p.write_bytes(b"broken")
    res = _cli(["copydetect", "--data", str(copydays), "--weights", str(tiny2_weights), "--image-size", "32",
                "--output", str(tmp_path / "run"), "--device", "cpu", "--quiet"])
    assert res.exit_code == 2
    assert _one_sentence(res.output) and "could be read" in _flat(res.output)


def test_transform_resizes_to_a_square_ignoring_aspect():
    img = Image.new("RGB", (120, 40), (200, 10, 10))
    x = copy_transform(32)(img)
    assert x.shape == (3, 32, 32)
    assert x[0].mean().item() == pytest.approx((200 / 255 - 0.485) / 0.229, abs=1e-2)
