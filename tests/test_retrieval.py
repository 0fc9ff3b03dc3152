"""Revisited Oxford/Paris retrieval: AP and mP@k against the junk-shifting formulation and a
hand-worked ranking, safe reading of the ground-truth pickle, and ``dinokit retrieval`` end to end
on a generated miniature data set."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from typer.testing import CliRunner

import dinokit
from dinokit.errors import DataError
from dinokit.eval.metrics import trapezoid_ap
from dinokit.eval.retrieval import (
    load_ground_truth,
    parse_ground_truth,
    query_scores,
    revisited_map,
    safe_unpickle,
    thumbnail,
)

runner = CliRunner()


def _cli(args):
    from dinokit.commands import app

    return runner.invoke(app, args)


def _flat(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------
def _shifted_scores(ranking, positives, junk, kappas=(1, 5, 10)):
    """The other way to ignore junk: positions of positives in the full ranking, each moved up by the
    number of junk images ranked before it; then trapezoids, and precision at min(k, last positive)."""
    ranking = list(ranking)
    pos = [r for r, idx in enumerate(ranking) if idx in set(positives)]
    jpos = [r for r, idx in enumerate(ranking) if idx in set(junk) and idx not in set(positives)]
    shifted = [p - sum(1 for j in jpos if j < p) for p in pos]
    ap = 0.0
    for i, r in enumerate(shifted):
        p0 = 1.0 if r == 0 else i / r
        p1 = (i + 1) / (r + 1)
        ap += (p0 + p1) * (1.0 / len(positives)) / 2
    one = np.array(shifted) + 1
    prs = [float((one <= min(one.max(), k)).sum()) / min(one.max(), k) for k in kappas]
    return ap, prs


def test_scores_equal_the_junk_shifting_formulation():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = 30
        ranking = rng.permutation(n).tolist()
        ids = rng.permutation(n)
        positives = ids[: rng.integers(1, 6)].tolist()
        junk = ids[6 : 6 + rng.integers(0, 6)].tolist()
        ap, prs = query_scores(ranking, positives, junk)
        ap2, prs2 = _shifted_scores(ranking, positives, junk)
        assert ap == pytest.approx(ap2)
        assert prs == pytest.approx(prs2)


def test_ranking_worked_by_hand():
    # ranking 5, 2, 0, 3, 1, 4 with positives {0, 1} and junk {2}: without the junk the list is
    # 5, 0, 3, 1, 4 and the positives sit at ranks 1 and 3 (0-based)
    ap, prs = query_scores([5, 2, 0, 3, 1, 4], [0, 1], [2])
    assert ap == pytest.approx(((0 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2)  # = 1/3
    # the last positive is 4th: P@1 = 0/1, P@5 = P@10 = 2/4
    assert prs == pytest.approx([0.0, 0.5, 0.5])
    # a perfect ranking of 2 positives scores 1 everywhere (precision at min(k, last positive))
    assert query_scores([1, 0, 2, 3], [0, 1], []) == (pytest.approx(1.0), pytest.approx([1.0, 1.0, 1.0]))
    assert trapezoid_ap([], 3) == 0.0
    # means over queries; a query without positives is left out
    m, mp, per = revisited_map([[5, 2, 0, 3, 1, 4], [1, 0, 2, 3], [0, 1]], [[0, 1], [0, 1], []], [[2], [], []])
    assert m == pytest.approx((1 / 3 + 1) / 2)
    assert mp == pytest.approx([0.5, 0.75, 0.75])
    assert np.isnan(per[2])


def _gnd(n_db=8, nq=2):
    return {
        "imlist": [f"db_{i}" for i in range(n_db)],
        "qimlist": [f"q_{i}" for i in range(nq)],
        "gnd": [
            {"easy": [0, 1], "hard": [2], "junk": [3], "bbx": [4.0, 4.0, 60.0, 60.0]},
            {"easy": np.array([4], dtype=np.int64), "hard": np.array([5, 6], dtype=np.int64),
             "junk": np.array([], dtype=np.int64), "bbx": np.array([0.0, 0.0, 64.0, 48.0])},
        ][:nq],
    }


def test_protocols():
    gt = parse_ground_truth(_gnd())
    pos, ign = gt.protocol("medium")
    assert pos == [[0, 1, 2], [4, 5, 6]] and ign == [[3], []]
    pos, ign = gt.protocol("hard")
    assert pos == [[2], [5, 6]] and ign == [[3, 0, 1], [4]]


# ---------------------------------------------------------------------------------------------
# the ground-truth pickle
# ---------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/dinokit_pwned_marker",))


def test_pickle_is_read_safely(tmp_path):
    gt = parse_ground_truth(safe_unpickle(pickle.dumps(_gnd(), protocol=2)))
    assert gt.hard[1] == [5, 6] and gt.bbx[1] == (0.0, 0.0, 64.0, 48.0)
    marker = Path("/tmp/dinokit_pwned_marker")
    marker.unlink(missing_ok=True)
    bad = tmp_path / "gnd_roxford5k.pkl"
    bad.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil()]}))
    with pytest.raises(DataError, match="refuses to unpickle"):
        load_ground_truth(bad)
    assert not marker.exists()
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a readable"):
        load_ground_truth(bad)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda g: [1, 2, 3], "holds a list"),
        (lambda g: {k: v for k, v in g.items() if k != "gnd"}, "no gnd"),
        (lambda g: {**g, "gnd": g["gnd"][:1]}, "1 entries for 2 queries"),
        (lambda g: {**g, "gnd": [{**g["gnd"][0], "hard": "x"}, g["gnd"][1]]}, "is not a list of image indices"),
        (lambda g: {**g, "gnd": [{**g["gnd"][0], "easy": [99]}, g["gnd"][1]]}, "outside the 8 database images"),
        (lambda g: {**g, "gnd": [{**g["gnd"][0], "bbx": [1, 2]}, g["gnd"][1]]}, "not four numbers"),
    ],
)
def test_wrong_shape_is_one_sentence(mutate, words):
    with pytest.raises(DataError) as e:
        parse_ground_truth(mutate(_gnd()), "gnd.pkl")
    msg = str(e.value)
    assert words in msg and msg.count(". ") == 0 and msg.endswith(").")


# ---------------------------------------------------------------------------------------------
# end to end on a miniature data set
# ---------------------------------------------------------------------------------------------
def _scene(seed: int, size=(72, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(1))


@pytest.fixture
def mini_oxford(tmp_path) -> Path:
    root = tmp_path / "revisited"
    jpg = root / "roxford5k" / "jpg"
    jpg.mkdir(parents=True)
    for i in range(8):
        img = _scene(i // 2)  # pairs of views of 4 "landmarks"
        if i % 2:
            img = img.rotate(8).resize((80, 60))
        img.save(jpg / f"db_{i}.jpg", quality=90)
    _scene(0).save(jpg / "q_0.jpg")
    _scene(2, (64, 64)).save(jpg / "q_1.jpg")
    with open(root / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(_gnd(), f, protocol=2)
    return root


def _independent(weights, root, imsize, multiscale=False):
    from torchvision import transforms as T

    model = dinokit.load_backbone(str(weights)).eval()
    gnd = pickle.loads((root / "roxford5k" / "gnd_roxford5k.pkl").read_bytes())
    tf = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def desc(name, box=None):
        img = Image.open(root / "roxford5k" / "jpg" / f"{name}.jpg").convert("RGB")
        if box is not None:
            img = img.crop(tuple(int(round(float(v))) for v in box))
        img.thumbnail((imsize, imsize), Image.LANCZOS)
        x = tf(img)[None]
        with torch.no_grad():
            if not multiscale:
                v = model(x)
            else:
                v = sum(model(x if s == 1 else torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear",
                                                                               align_corners=False))
                        for s in (1, 2 ** -0.5, 0.5)) / 3
                v = v / v.norm()
        return (v / v.norm(dim=1, keepdim=True))[0]

    db = torch.stack([desc(n) for n in gnd["imlist"]])
    q = torch.stack([desc(n, g["bbx"]) for n, g in zip(gnd["qimlist"], gnd["gnd"])])
    ranks = torch.argsort(-(q @ db.T), dim=1).tolist()
    out = {}
    for proto in ("medium", "hard"):
        aps, prs = [], []
        for r, g in zip(ranks, gnd["gnd"]):
            easy, hard, junk = (list(np.asarray(g[k]).tolist()) for k in ("easy", "hard", "junk"))
            pos, ign = (easy + hard, junk) if proto == "medium" else (hard, junk + easy)
            ap, pr = _shifted_scores(r, pos, ign)
            aps.append(ap)
            prs.append(pr)
        out[proto] = (100 * np.mean(aps), 100 * np.mean(prs, axis=0))
    return out


@pytest.mark.parametrize("multiscale", [False, True])
def test_retrieval_cli_end_to_end(mini_oxford, tiny2_weights, tmp_path, multiscale):
    out = tmp_path / "run"
    args = ["retrieval", "--data", str(mini_oxford), "--dataset", "roxford5k", "--weights", str(tiny2_weights),
            "--image-size", "48", "--output", str(out), "--device", "cpu", "--quiet"]
    res = _cli(args + (["--multiscale"] if multiscale else []))
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["queries"] == 2 and m["database"] == 8
    want = _independent(tiny2_weights, mini_oxford, 48, multiscale)
    for proto in ("medium", "hard"):
        assert m["mAP"][proto] == pytest.approx(want[proto][0], abs=1e-3)
        assert [m["mP@k"][proto][k] for k in ("1", "5", "10")] == pytest.approx(list(want[proto][1]), abs=1e-3)
        assert 0 <= m["mAP"][proto] <= 100
    assert m["config"]["multiscale"] is multiscale
    assert "Medium" in res.output and "mP@10" in res.output


def test_thumbnail_keeps_aspect_and_never_enlarges():
    assert thumbnail(Image.new("RGB", (400, 100)), 224).size == (224, 56)
    assert thumbnail(Image.new("RGB", (100, 50)), 224).size == (100, 50)


def test_retrieval_bad_input(mini_oxford, tiny2_weights, tmp_path):
    base = ["retrieval", "--data", str(mini_oxford), "--weights", str(tiny2_weights), "--image-size", "48",
            "--device", "cpu", "--quiet"]
    res = _cli(base + ["--dataset", "rparis6k", "--output", str(tmp_path / "o1")])
    assert res.exit_code == 2 and "has no gnd_rparis6k.pkl" in _flat(res.output)
    res = _cli(base + ["--dataset", "holidays", "--output", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "Unknown dataset" in _flat(res.output)
    gnd_file = mini_oxford / "roxford5k" / "gnd_roxford5k.pkl"
    g = _gnd()
    g["gnd"] = g["gnd"][:1]
    gnd_file.write_bytes(pickle.dumps(g))
    res = _cli(base + ["--dataset", "roxford5k", "--output", str(tmp_path / "o3")])
    assert res.exit_code == 2 and "is not a revisited Oxford/Paris ground truth" in _flat(res.output)
    assert "Traceback" not in res.output
    gnd_file.write_bytes(pickle.dumps({"imlist": ["db_0"], "qimlist": [], "gnd": []}))
    res = _cli(base + ["--dataset", "roxford5k", "--output", str(tmp_path / "o4")])
    assert res.exit_code == 2 and "lists no query images" in _flat(res.output)
    # an unreadable database image is skipped and counted
    gnd_file.write_bytes(pickle.dumps(_gnd()))
    (mini_oxford / "roxford5k" / "jpg" / "db_7.jpg").write_bytes(b"broken")
    res = _cli(base + ["--dataset", "roxford5k", "--output", str(tmp_path / "o5")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o5" / "metrics.json").read_text())
    assert m["unreadable"] == {"database": 1, "queries": 0} and m["database"] == 7
    (mini_oxford / "roxford5k" / "jpg" / "db_6.jpg").unlink()
    res = _cli(base + ["--dataset", "roxford5k", "--output", str(tmp_path / "o6")])
    assert res.exit_code == 2 and "missing from" in _flat(res.output)
