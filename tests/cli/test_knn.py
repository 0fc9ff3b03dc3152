"""`dinokit knn` end to end on tiny images: metrics.json, the feature cache reused on a rerun, a
single test image, and one sentence for bad input."""

from __future__ import annotations

import json

import pytest

from dinokit.eval.knn import knn_classify
from tests.helpers import run_cli

# ---------------------------------------------------------------------------------------------
# `dinokit knn` end to end
# ---------------------------------------------------------------------------------------------
SMALL = ["--resize", "32", "--image-size", "32", "--batch-size", "8", "--quiet"]


def test_cli_knn_writes_metrics_and_reuses_cached_features(labelled_folder, tiny4_weights, tmp_path):
    out = tmp_path / "knn"
    args = [
        "knn",
        "--weights",
        str(tiny4_weights),
        "--train",
        str(labelled_folder / "train"),
        "--val",
        str(labelled_folder / "val"),
        "--k",
        "1,5,20",
        "--output",
        str(out),
        *SMALL,
    ]
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"knn", "per_class_top1", "config"}
    assert set(m["knn"]) == {"1", "5", "20"}
    for v in m["knn"].values():
        assert set(v) == {"top1", "top5"} and 0.0 <= v["top1"] <= v["top5"] <= 100.0
    assert m["knn"]["20"]["top5"] == 100.0  # 3 classes
    assert set(m["per_class_top1"]) == {"red", "green", "blue"}
    # the same numbers from the library, on the cached features
    from dinokit.eval.features import load_features

    tr, va = load_features(out / "train_features.pt"), load_features(out / "val_features.pt")
    lib = knn_classify(tr.features, tr.labels, va.features, va.labels, ks=(1, 5, 20))
    assert m["knn"]["5"]["top1"] == pytest.approx(lib[5][0])
    # a rerun reuses the cache (same file, untouched) and refuses the folder without --overwrite
    mtime = (out / "train_features.pt").stat().st_mtime_ns
    r = run_cli(args)
    assert r.exit_code == 2 and "--overwrite" in r.text
    r = run_cli([*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (out / "train_features.pt").stat().st_mtime_ns == mtime
    # from feature files, with no images
    r = run_cli(
        [
            "knn",
            "--train-features",
            str(out / "train_features.pt"),
            "--val-features",
            str(out / "val_features.pt"),
            "--k",
            "5",
            "--output",
            str(tmp_path / "k2"),
            "--quiet",
        ]
    )
    assert r.exit_code == 0, r.output
    m2 = json.loads((tmp_path / "k2" / "metrics.json").read_text())
    assert m2["knn"]["5"] == m["knn"]["5"]


def test_cli_knn_one_test_image(labelled_folder, tiny4_weights, tmp_path):
    import shutil

    val = tmp_path / "val1"
    (val / "green").mkdir(parents=True)
    shutil.copy(labelled_folder / "val" / "green" / "0.png", val / "green" / "0.png")
    r = run_cli(
        [
            "knn",
            "--weights",
            str(tiny4_weights),
            "--train",
            str(labelled_folder / "train"),
            "--val",
            str(val),
            "--output",
            str(tmp_path / "o"),
            *SMALL,
        ]
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert set(m["knn"]) == {"10", "20", "100", "200"}  # 100 and 200 clamped to the 18 training images
    assert m["knn"]["200"]["top1"] in (0.0, 100.0)
    assert m["config"]["k_used"] == {"10": 10, "20": 18, "100": 18, "200": 18}


def test_cli_knn_bad_input(labelled_folder, tiny4_weights, tmp_path):
    import shutil

    base = ["knn", "--weights", str(tiny4_weights), *SMALL]
    # a val class the training set lacks
    val = tmp_path / "val_extra"
    shutil.copytree(labelled_folder / "val", val)
    shutil.copytree(labelled_folder / "val" / "red", val / "purple")
    r = run_cli(
        [*base, "--train", str(labelled_folder / "train"), "--val", str(val), "--output", str(tmp_path / "a")]
    )
    assert r.exit_code == 2 and "classes the training set lacks: purple" in r.text
    assert "Traceback" not in r.text
    # an empty folder
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    r = run_cli(
        [
            *base,
            "--train",
            str(nothing),
            "--val",
            str(labelled_folder / "val"),
            "--output",
            str(tmp_path / "b"),
        ]
    )
    assert r.exit_code == 2 and "is empty" in r.text and "Traceback" not in r.text
    # class folders without images
    (nothing / "red").mkdir()
    r = run_cli(
        [
            *base,
            "--train",
            str(nothing),
            "--val",
            str(labelled_folder / "val"),
            "--output",
            str(tmp_path / "c"),
        ]
    )
    assert r.exit_code == 2 and "holds no images" in r.text and "Traceback" not in r.text


def test_cli_knn_table_shows_the_k_used(feature_files, tmp_path):
    """80 training features: k = 100 and 200 are both cut to 80; the table shows one 80-NN row that
    says so, not two rows that claim 100 and 200 neighbours."""
    train, val = feature_files
    r = run_cli(["knn", "--train-features", train, "--val-features", val, "--k", "10,100,200",
                 "--output", tmp_path / "knn", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "80-NN (asked 100, 200)" in r.text and "k cut to the 80 train images" in r.text
    assert "200-NN" not in r.text and "10-NN" in r.text
    m = json.loads((tmp_path / "knn" / "metrics.json").read_text())
    assert set(m["knn"]) == {"10", "100", "200"} and m["config"]["k_used"] == {"10": 10, "100": 80, "200": 80}
