"""`dinokit features` end to end: .pt and .npy files, refusing features made another way, and the
same features under torchrun as in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dinokit
from dinokit.errors import DataError
from dinokit.eval.features import (
    Embedder,
    FeatureSpec,
    load_features,
)
from tests.helpers import make_image, run_cli

SMALL = ["--resize", "32", "--image-size", "32", "--batch-size", "4", "--quiet"]


def test_cli_features_pt_and_npy(labelled_folder, tiny4_weights, tmp_path):
    out = tmp_path / "f.pt"
    r = run_cli(
        [
            "features",
            "--weights",
            str(tiny4_weights),
            "--data",
            str(labelled_folder / "train"),
            "--output",
            str(out),
            *SMALL,
        ]
    )
    assert r.exit_code == 0, r.output
    fs = load_features(out)
    assert len(fs) == 18 and fs.classes == ["blue", "green", "red"]
    sd = torch.load(tiny4_weights, weights_only=True)
    assert fs.fingerprint["weights"] == "state:" + dinokit.checkpoints.state_dict_fingerprint(sd)
    # the same weights inside a training checkpoint (teacher) give the same fingerprint
    torch.save({"teacher": {"backbone." + k: v for k, v in sd.items()}, "epoch": 1}, tmp_path / "ck.pth")
    out2 = tmp_path / "f2.pt"
    r = run_cli(
        [
            "features",
            "--weights",
            str(tmp_path / "ck.pth"),
            "--data",
            str(labelled_folder / "val"),
            "--output",
            str(out2),
            *SMALL,
        ]
    )
    assert r.exit_code == 0, r.output
    assert load_features(out2).fingerprint["weights"] == fs.fingerprint["weights"]
    r = run_cli(
        [
            "features",
            "--weights",
            str(tiny4_weights),
            "--data",
            str(labelled_folder / "train"),
            "--output",
            str(out),
            *SMALL,
        ]
    )
    assert r.exit_code == 2 and "already exists; pass --overwrite" in r.text
    r = run_cli(
        [
            "features",
            "--weights",
            str(tiny4_weights),
            "--data",
            str(labelled_folder),
            "--output",
            str(tmp_path / "n"),
            "--format",
            "npy",
            "--avgpool-patch-tokens",
            *SMALL,
        ]
    )
    assert r.exit_code == 0, r.output
    feats = np.load(tmp_path / "n" / "features.npy")
    # labelled_folder holds train/ and val/ as "classes"; all 24 images, 2 x 192-d features
    assert feats.shape == (24, 384)
    assert len((tmp_path / "n" / "paths.txt").read_text().splitlines()) == 24


def test_knn_refuses_features_made_another_way(labelled_folder, tiny4_weights, tmp_path):
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16), other)
    made = {}
    for name, w, split, extra in [
        ("train", tiny4_weights, "train", []),
        ("val", tiny4_weights, "val", []),
        ("val_other", other, "val", []),
        ("val_2blocks", tiny4_weights, "val", ["--n-last-blocks", "2"]),
    ]:
        made[name] = tmp_path / f"{name}.pt"
        r = run_cli(
            [
                "features",
                "--weights",
                str(w),
                "--data",
                str(labelled_folder / split),
                "--output",
                str(made[name]),
                *SMALL,
                *extra,
            ]
        )
        assert r.exit_code == 0, r.output

    def knn(val, *extra):
        return run_cli(
            [
                "knn",
                "--train-features",
                str(made["train"]),
                "--val-features",
                str(made[val]),
                "--output",
                str(tmp_path / f"o_{val}_{len(extra)}"),
                "--quiet",
                *extra,
            ]
        )

    assert knn("val").exit_code == 0
    r = knn("val_other")
    assert r.exit_code == 2 and "were made with other weights" in r.text and "Traceback" not in r.text
    r = knn("val_2blocks")
    assert r.exit_code == 2 and "are 192-d but those of" in r.text and "384-d" in r.text
    assert "n_last_blocks 1 vs 2" in r.text
    # features checked against the weights asked for
    r = knn("val", "--weights", str(other))
    assert r.exit_code == 2 and "was made with other weights" in r.text
    assert knn("val", "--weights", str(tiny4_weights)).exit_code == 0
    # a cache made with another transform is named briefly
    from dinokit.eval.features import check_fingerprint

    emb = Embedder(FeatureSpec(weights=str(tiny4_weights), device="cpu"))
    with pytest.raises(DataError, match="transform resize 32/crop 32 vs resize 256/crop 224"):
        check_fingerprint(load_features(made["val"]), emb.fingerprint, "val.pt")
    # not a features file
    (tmp_path / "junk.pt").write_bytes(b"junk")
    r = run_cli(
        [
            "knn",
            "--train-features",
            str(tmp_path / "junk.pt"),
            "--val-features",
            str(made["val"]),
            "--output",
            str(tmp_path / "j"),
            "--quiet",
        ]
    )
    assert r.exit_code == 2 and "not a readable features file" in r.text


@pytest.mark.slow
def test_features_under_torchrun_match_one_process(labelled_folder, tiny4_weights, tmp_path):
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available():
        pytest.skip("no torch.distributed")
    one = tmp_path / "one.pt"
    r = run_cli(
        [
            "features",
            "--weights",
            str(tiny4_weights),
            "--data",
            str(labelled_folder / "train"),
            "--output",
            str(one),
            "--device",
            "cpu",
            *SMALL,
        ]
    )
    assert r.exit_code == 0, r.output
    two = tmp_path / "two.pt"
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "dinokit",
        "features",
        "--weights",
        str(tiny4_weights),
        "--data",
        str(labelled_folder / "train"),
        "--output",
        str(two),
        "--device",
        "cpu",
        *SMALL,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = load_features(one), load_features(two)
    assert a.paths == b.paths
    torch.testing.assert_close(a.features, b.features, rtol=1e-4, atol=1e-5)
    assert json.dumps(a.fingerprint, sort_keys=True) == json.dumps(b.fingerprint, sort_keys=True)


def test_features_csv_reads_back_as_the_pt_file(labelled_folder, tiny4_weights, tmp_path):
    import csv

    args = ["features", "--weights", str(tiny4_weights), "--data", str(labelled_folder / "val"), *SMALL]
    assert run_cli([*args, "--output", str(tmp_path / "f.pt")]).exit_code == 0
    r = run_cli([*args, "--output", str(tmp_path / "f.csv"), "--format", "csv"])
    assert r.exit_code == 0, r.output
    fs = load_features(tmp_path / "f.pt")
    with open(tmp_path / "f.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert header == ["path", "label", *(f"f{i}" for i in range(fs.dim))]
    assert len(body) == len(fs) == 6
    assert [b[0] for b in body] == fs.paths
    assert [b[1] for b in body] == [fs.classes[int(i)] for i in fs.labels]
    values = np.array([[np.float32(v) for v in b[2:]] for b in body], dtype=np.float32)
    assert np.array_equal(values, fs.features.numpy())  # every float32 reads back exactly
    # an unlabelled folder: no label column; a folder as --output gets features.csv
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((labelled_folder / "val" / "red").iterdir()):
        (flat / p.name).write_bytes(p.read_bytes())
    r = run_cli(
        [
            "features",
            "--weights",
            str(tiny4_weights),
            "--data",
            str(flat),
            *SMALL,
            "--output",
            str(tmp_path / "out"),
            "--format",
            "csv",
        ]
    )
    assert r.exit_code == 0, r.output
    with open(tmp_path / "out" / "features.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:2] == ["path", "f0"]


def test_unreadable_images_skipped_by_default_strict_stops(tmp_path, tiny2_weights):
    for i in range(3):
        make_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    r = run_cli(["features", "--data", tmp_path / "imgs", "--weights", tiny2_weights, "--output",
                 tmp_path / "f.pt", *SMALL])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(load_features(tmp_path / "f.pt")) == 3
    r = run_cli(["features", "--data", tmp_path / "imgs", "--weights", tiny2_weights, "--output",
                 tmp_path / "g.pt", "--strict", *SMALL])  # fmt: skip
    assert (
        r.exit_code == 2 and r.output.startswith("Error:") and "broken.png is not a readable image" in r.text
    )
    assert not (tmp_path / "g.pt").exists()


def test_a_failed_run_leaves_no_folder_behind(tmp_path, tiny2_weights):
    """The output check creates nothing: a run that fails (here: a folder with no images) leaves
    neither the file nor the folders of its --output path."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "new" / "deeper" / "feats.pt"
    r = run_cli(["features", "--weights", str(tiny2_weights), "--data", str(empty), "--output", str(out)])
    assert r.exit_code != 0
    assert not (tmp_path / "new").exists()


def _jpeg(path, size, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    arr = np.stack([128 + 90 * np.sin(x / (11 + 5 * c + seed) + y / (17 + c)) for c in range(3)], axis=-1)
    arr += rng.normal(0, 3, arr.shape)
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def test_features_exact_decode_same_numbers_on_small_images_close_on_large_ones(tiny4_weights, tmp_path):
    """ImageNet-size files give the same features either way; a large JPEG decoded at a reduced
    scale stays within cosine 0.999 of its full decode; the fingerprint names the decode, so a cached
    feature file of one is not taken for the other."""
    for i in range(3):
        _jpeg(tmp_path / "small" / f"{i}.jpg", (500, 375), i)
        _jpeg(tmp_path / "large" / f"{i}.jpg", (1400, 1050), i)
    common = ["--weights", str(tiny4_weights), "--batch-size", "2", "--quiet"]
    sets = {}
    for folder in ("small", "large"):
        for how in ("reduced", "exact"):
            out = tmp_path / f"{folder}-{how}.pt"
            extra = ["--exact-decode"] if how == "exact" else []
            r = run_cli(["features", "--data", str(tmp_path / folder), "--output", str(out), *common, *extra])
            assert r.exit_code == 0, r.output
            sets[folder, how] = load_features(out)
            assert sets[folder, how].fingerprint["decode"] == how
    torch.testing.assert_close(
        sets["small", "reduced"].features, sets["small", "exact"].features, rtol=0, atol=0
    )
    cos = torch.nn.functional.cosine_similarity(
        sets["large", "reduced"].features, sets["large", "exact"].features
    )
    assert bool((cos > 0.999).all()), cos
    assert not torch.equal(sets["large", "reduced"].features, sets["large", "exact"].features)


def test_ctrl_c_exits_130_with_one_line_and_writes_nothing(tmp_path):
    """Ctrl-C while the images are embedded: exit status 130, one line that says the run stopped and
    that nothing was written (the file is written only once every image is embedded)."""
    import signal

    for i in range(150):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i)
    out = tmp_path / "f.pt"
    p = subprocess.Popen(
        [sys.executable, "-m", "dinokit", "features", "--data", str(tmp_path / "imgs"), "--weights", "random",
         "--arch", "vit_tiny", "--batch-size", "2", "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"},
        # Ctrl-C at its default in the child, as a terminal starts it: an ignored signal is inherited
        # across exec, and an earlier test of the suite can leave SIGINT ignored in pytest's process
        # (a child started then ran to the end and exited 0)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    seen = []
    for line in p.stderr:  # progress lines go to stderr in a pipe; the first says how many steps
        seen.append(line)
        if line.startswith("features ("):
            p.send_signal(signal.SIGINT)
            break
    stdout, rest = p.communicate(timeout=120)
    stopped = [line for line in rest.splitlines() if line.startswith("Stopped")]
    assert p.returncode == 130, "".join(seen) + rest
    assert stopped == [f"Stopped by Ctrl-C while embedding; nothing was written ({out} is written once every image "
                       "is embedded)."], rest  # fmt: skip
    assert "Traceback" not in rest and stdout == ""
    assert not out.exists()
