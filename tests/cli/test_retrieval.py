"""``dinokit retrieval`` end to end on a tiny revisited-Oxford layout, and one sentence for bad input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import dinokit
from tests.helpers import oxford_ground_truth, run_cli, shifted_retrieval_scores


def _flat(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------
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
        pickle.dump(oxford_ground_truth(), f, protocol=2)
    return root


def _independent(weights, root, imsize, multiscale=False, crop=False):
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
                v = (
                    sum(
                        model(
                            x
                            if s == 1
                            else torch.nn.functional.interpolate(
                                x, scale_factor=s, mode="bilinear", align_corners=False
                            )
                        )
                        for s in (1, 2**-0.5, 0.5)
                    )
                    / 3
                )
                v = v / v.norm()
        return (v / v.norm(dim=1, keepdim=True))[0]

    db = torch.stack([desc(n) for n in gnd["imlist"]])
    q = torch.stack([desc(n, g["bbx"] if crop else None) for n, g in zip(gnd["qimlist"], gnd["gnd"])])
    ranks = torch.argsort(-(q @ db.T), dim=1).tolist()
    out = {}
    for proto in ("medium", "hard"):
        aps, prs = [], []
        for r, g in zip(ranks, gnd["gnd"]):
            easy, hard, junk = (list(np.asarray(g[k]).tolist()) for k in ("easy", "hard", "junk"))
            pos, ign = (easy + hard, junk) if proto == "medium" else (hard, junk + easy)
            ap, pr = shifted_retrieval_scores(r, pos, ign)
            aps.append(ap)
            prs.append(pr)
        out[proto] = (100 * np.mean(aps), 100 * np.mean(prs, axis=0))
    return out


@pytest.mark.parametrize("multiscale,crop", [(False, False), (True, False), (False, True)])
def test_retrieval_cli_end_to_end(mini_oxford, tiny2_weights, tmp_path, multiscale, crop):
    out = tmp_path / "run"
    args = [
        "retrieval",
        "--data",
        str(mini_oxford),
        "--dataset",
        "roxford5k",
        "--weights",
        str(tiny2_weights),
        "--image-size",
        "48",
        "--output",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    ]
    res = run_cli(args + (["--multiscale"] if multiscale else []) + (["--crop-queries"] if crop else []))
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["queries"] == 2 and m["database"] == 8
    assert m["query_region"] == ("box" if crop else "whole image") and m["config"]["crop_queries"] is crop
    want = _independent(tiny2_weights, mini_oxford, 48, multiscale, crop)
    if crop:  # the fixture's boxes change the scores, so the test tells the two protocols apart
        other = _independent(tiny2_weights, mini_oxford, 48, multiscale, not crop)
        assert any(
            abs(want[p][0] - other[p][0]) > 1e-3 or any(abs(want[p][1] - other[p][1]) > 1e-3)
            for p in ("medium", "hard")
        )
    for proto in ("medium", "hard"):
        assert m["mAP"][proto] == pytest.approx(want[proto][0], abs=1e-3)
        assert [m["mP@k"][proto][k] for k in ("1", "5", "10")] == pytest.approx(
            list(want[proto][1]), abs=1e-3
        )
        assert 0 <= m["mAP"][proto] <= 100
    assert m["config"]["multiscale"] is multiscale
    assert "Medium" in res.output and "mP@10" in res.output


def test_retrieval_bad_input(mini_oxford, tiny2_weights, tmp_path):
    base = [
        "retrieval",
        "--data",
        str(mini_oxford),
        "--weights",
        str(tiny2_weights),
        "--image-size",
        "48",
        "--device",
        "cpu",
        "--quiet",
    ]
    res = run_cli(base + ["--dataset", "rparis6k", "--output", str(tmp_path / "o1")])
    assert res.exit_code == 2 and "has no gnd_rparis6k.pkl" in _flat(res.output)
    res = run_cli(base + ["--dataset", "holidays", "--output", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "Unknown dataset" in _flat(res.output)
    gnd_file = mini_oxford / "roxford5k" / "gnd_roxford5k.pkl"
    g = oxford_ground_truth()
    g["gnd"] = g["gnd"][:1]
    gnd_file.write_bytes(pickle.dumps(g))
    res = run_cli(base + ["--dataset", "roxford5k", "--output", str(tmp_path / "o3")])
    assert res.exit_code == 2 and "is not a revisited Oxford/Paris ground truth" in _flat(res.output)
    assert "Traceback" not in res.output
    gnd_file.write_bytes(pickle.dumps({"imlist": ["db_0"], "qimlist": [], "gnd": []}))
    res = run_cli(base + ["--dataset", "roxford5k", "--output", str(tmp_path / "o4")])
    assert res.exit_code == 2 and "lists no query images" in _flat(res.output)
    # an unreadable database image is skipped and counted
    gnd_file.write_bytes(pickle.dumps(oxford_ground_truth()))
    (mini_oxford / "roxford5k" / "jpg" / "db_7.jpg").write_bytes(b"broken")
    res = run_cli(base + ["--dataset", "roxford5k", "--output", str(tmp_path / "o5")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o5" / "metrics.json").read_text())
    assert m["unreadable"] == {"database": 1, "queries": 0} and m["database"] == 7
    (mini_oxford / "roxford5k" / "jpg" / "db_6.jpg").unlink()
    res = run_cli(base + ["--dataset", "roxford5k", "--output", str(tmp_path / "o6")])
    assert res.exit_code == 2 and "missing from" in _flat(res.output)
