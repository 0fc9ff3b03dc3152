"""``dinokit copydetect`` end to end on a tiny generated Copydays: the mAP against an independent
trapezoid AP, whitening and distractors, and one sentence for a missing, empty or unreadable block."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.data.copydays import scan_copydays
from dinokit.errors import DataError
from tests.helpers import ap_from_relevance, run_cli, smooth_photo


def _independent_map(weights: Path, root: Path, block: str, size: int = 64, top: int = 20) -> float:
    """Descriptors and AP recomputed here from their definitions."""
    from torchvision import transforms as T

    model = dinokit.load_backbone(str(weights)).eval()
    tf = T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )

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
        pos = {
            j
            for j, o in enumerate(originals)
            if (o.name[:4] == qp.name[:4] if block == "strong" else o.name == qp.name)
        }
        rel = [int(j in pos) for j in order]
        aps.append(ap_from_relevance(rel, len(pos)))
    return float(np.mean(aps))


def test_copydetect_cli_end_to_end(copydays, tiny2_weights, tmp_path):
    out = tmp_path / "run"
    args = [
        "copydetect",
        "--data",
        str(copydays),
        "--weights",
        str(tiny2_weights),
        "--image-size",
        "64",
        "--output",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    ]
    res = run_cli(args)
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
    res2 = run_cli(args + ["--overwrite"])
    assert res2.exit_code == 0, res2.output
    assert [p.stat().st_mtime_ns for p in cache_files] == stamps
    assert json.loads((out / "metrics.json").read_text())["mAP"] == maps
    # without --overwrite an existing run is refused in one sentence
    res3 = run_cli(args)
    assert res3.exit_code == 2 and "--overwrite" in _flat(res3.output)


def test_copydetect_with_whitening_and_distractors(copydays, tiny2_weights, tmp_path):
    white = tmp_path / "white"
    distr = tmp_path / "distr"
    for i in range(6):
        white.mkdir(exist_ok=True)
        smooth_photo(100 + i).save(white / f"w{i}.jpg")
    for i in range(3):
        distr.mkdir(exist_ok=True)
        smooth_photo(200 + i).save(distr / f"d{i}.jpg")
    out = tmp_path / "run"
    res = run_cli(
        [
            "copydetect",
            "--data",
            str(copydays),
            "--weights",
            str(tiny2_weights),
            "--image-size",
            "32",
            "--whitening",
            str(white),
            "--distractors",
            str(distr),
            "--k",
            "0",
            "--output",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
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
    return (
        text.count("Error:") == 1
        and "Traceback" not in output
        and text.split("Error:")[1].strip().endswith(".")
    )


def test_missing_block_folder(copydays, tiny2_weights, tmp_path):
    import shutil

    shutil.rmtree(copydays / "strong")
    res = run_cli(
        [
            "copydetect",
            "--data",
            str(copydays),
            "--weights",
            str(tiny2_weights),
            "--output",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    assert res.exit_code == 2
    assert _one_sentence(res.output) and "no strong/ block" in _flat(res.output)
    with pytest.raises(DataError, match="original/"):
        shutil.rmtree(copydays / "original")
        scan_copydays(copydays)


def test_empty_query_block(copydays, tiny2_weights, tmp_path):
    for p in (copydays / "crops" / "50").iterdir():
        p.unlink()
    res = run_cli(
        [
            "copydetect",
            "--data",
            str(copydays),
            "--weights",
            str(tiny2_weights),
            "--output",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    assert res.exit_code == 2
    assert _one_sentence(res.output) and "holds no images" in _flat(res.output)


def test_unreadable_images_are_skipped_and_counted(copydays, tiny2_weights, tmp_path):
    (copydays / "jpegqual" / "50" / "200300.jpg").write_bytes(b"not a jpeg")
    (copydays / "strong" / "200101.jpg").write_bytes(b"")
    out = tmp_path / "run"
    res = run_cli(
        [
            "copydetect",
            "--data",
            str(copydays),
            "--weights",
            str(tiny2_weights),
            "--image-size",
            "32",
            "--output",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unreadable"]["jpegqual/50"] == 1
    assert metrics["unreadable"]["strong"] == 1
    assert metrics["queries"]["jpegqual/50"] == 3
    assert metrics["queries"]["strong"] == 4
    assert "2 unreadable images skipped." in _flat(res.output)


def test_all_queries_unreadable_is_an_error(copydays, tiny2_weights, tmp_path):
    for p in (copydays / "strong").iterdir():
        p.write_bytes(b"broken")
    res = run_cli(
        [
            "copydetect",
            "--data",
            str(copydays),
            "--weights",
            str(tiny2_weights),
            "--image-size",
            "32",
            "--output",
            str(tmp_path / "run"),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert res.exit_code == 2
    assert _one_sentence(res.output) and "could be read" in _flat(res.output)
