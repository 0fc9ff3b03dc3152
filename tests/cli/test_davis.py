"""``dinokit davis`` and ``dinokit davis-score`` end to end on tiny DAVIS-layout videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinokit.data.palette import DAVIS_PALETTE
from tests.helpers import run_cli

DATA = Path(__file__).parents[1] / "assets"
KEYS = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]


def save_mask(labels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(DAVIS_PALETTE)
    img.save(path)


def make_davis(root: Path, n_frames: int = 4, size=(64, 160), seqs=("squares", "bars")) -> Path:
    """ROOT/{JPEGImages,Annotations}/480p/<seq>/ and ImageSets/2017/val.txt: textured objects moving
    over noise, with exact masks."""
    H, W = size
    for s, name in enumerate(seqs):
        rng = np.random.default_rng(s)
        bg = rng.integers(0, 120, (H, W, 3), dtype=np.uint8)
        tex = [rng.integers(150, 256, (H, W, 3), dtype=np.uint8) for _ in range(2)]
        for t in range(n_frames):
            img = bg.copy()
            lab = np.zeros((H, W), np.uint8)
            for k, (y, x) in enumerate([(10, 10 + 6 * t), (30, 100 - 5 * t)]):
                lab[y : y + 24, x : x + 32] = k + 1
                img[lab == k + 1] = tex[k][lab == k + 1]
            (root / "JPEGImages" / "480p" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95)
            save_mask(lab, root / "Annotations" / "480p" / name / f"{t:05d}.png")
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(seqs) + "\n")
    return root


def run(*args):
    return run_cli(args)


def one_sentence_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.lstrip().startswith("Error:")
    assert result.output.count(". ") <= 1, result.output
    flat = "".join(result.output.split())  # the console wraps long paths
    for f in fragments:
        assert "".join(f.split()) in flat, result.output


def test_davis_end_to_end_rerun_and_score(tmp_path, tiny2_weights):
    root = make_davis(tmp_path / "DAVIS")
    out = tmp_path / "out"
    args = ["davis", "--data", root, "--weights", tiny2_weights, "--output", out, "--image-size", "64",
            "--num-workers", "0", "--batch-size", "3", "--visualize", "--quiet"]  # fmt: skip
    r = run(*args)
    assert r.exit_code == 0, r.output
    for seq in ("squares", "bars"):
        pngs = sorted((out / seq).glob("*.png"))
        assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(4)]
        img = Image.open(pngs[2])
        assert img.mode == "P" and img.size == (160, 64) and img.getpalette()[:9] == DAVIS_PALETTE[:9]
        # frame 0's output is the given mask
        first = np.array(Image.open(root / "Annotations" / "480p" / seq / "00000.png"))
        np.testing.assert_array_equal(np.array(Image.open(pngs[0])), first)
        assert (out / "visualize" / f"{seq}.gif").is_file()
        assert len(list((out / "visualize" / seq).glob("*.png"))) == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics)[:7] == KEYS and all(0 <= metrics[k] <= 1 for k in KEYS if "Decay" not in k)
    assert set(metrics["per_object"]) == {"squares_1", "squares_2", "bars_1", "bars_2"}
    assert (out / "global_results-val.csv").is_file() and (out / "per-sequence_results-val.csv").is_file()
    # davis-score on the same folders gives the same numbers
    r = run("davis-score", "--gt", root, "--pred", out, "--output", tmp_path / "score", "--quiet")
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "score" / "metrics.json").read_text())
    for k in KEYS:
        assert again[k] == pytest.approx(metrics[k], abs=1e-12)
    # a rerun skips the finished sequences and rewrites nothing
    stamp = (out / "squares" / "00003.png").stat().st_mtime_ns
    r = run(*args)
    assert r.exit_code == 0 and "2 already done" in " ".join(r.output.split()), r.output
    assert (out / "squares" / "00003.png").stat().st_mtime_ns == stamp
    # other settings in the same folder need --overwrite
    r = run(*args, "--k", "3")
    one_sentence_error(r, "other weights or settings", "--overwrite")


def test_own_video_folder_and_file(tmp_path, tiny2_weights):
    root = make_davis(tmp_path / "DAVIS", seqs=("clip",))
    frames = root / "JPEGImages" / "480p" / "clip"
    mask = root / "Annotations" / "480p" / "clip" / "00000.png"
    out = tmp_path / "mine"
    r = run("davis", "--frames", frames, "--first-mask", mask, "--weights", tiny2_weights, "--output", out,
            "--image-size", "64", "--num-workers", "0", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(list((out / "clip").glob("*.png"))) == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scored"] is False
    av = pytest.importorskip("av")
    video = tmp_path / "clip.mkv"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 64, "yuv420p"
        for f in sorted(frames.glob("*.jpg")):
            for packet in stream.encode(av.VideoFrame.from_image(Image.open(f).convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    r = run("davis", "--frames", video, "--first-mask", mask, "--weights", tiny2_weights, "--output",
            tmp_path / "vid", "--image-size", "64", "--num-workers", "0", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "vid" / "clip").glob("*.png"))) == 4


def test_bad_davis_input(tmp_path, tiny2_weights):
    common = ["--weights", tiny2_weights, "--image-size", "64", "--num-workers", "0", "--quiet"]
    root = make_davis(tmp_path / "DAVIS", n_frames=3, seqs=("a",))
    first = root / "Annotations" / "480p" / "a" / "00000.png"
    # an RGB (not indexed) first-frame mask
    rgb = tmp_path / "rgb.png"
    Image.open(first).convert("RGB").save(rgb)
    r = run("davis", "--frames", root / "JPEGImages" / "480p" / "a", "--first-mask", rgb, "--output",
            tmp_path / "o1", *common)  # fmt: skip
    one_sentence_error(r, str(rgb), "not an indexed")
    # a frame that cannot be decoded, read in a data-loader worker
    bad = root / "JPEGImages" / "480p" / "a" / "00001.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    with_worker = [
        ("1" if a == "0" and common[i - 1] == "--num-workers" else a) for i, a in enumerate(common)
    ]
    r = run("davis", "--data", root, "--output", tmp_path / "o0", *with_worker)
    one_sentence_error(r, str(bad), "not a readable image")
    bad.write_bytes(good)
    # frames of differing sizes
    odd = root / "JPEGImages" / "480p" / "a" / "00002.jpg"
    Image.open(odd).resize((100, 50)).save(odd)
    r = run("davis", "--data", root, "--output", tmp_path / "o2", *common)
    one_sentence_error(r, str(odd), "one size")
    # a missing first-frame mask
    first.unlink()
    r = run("davis", "--data", root, "--output", tmp_path / "o3", *common)
    one_sentence_error(r, str(first), "does not exist")
    r = run("davis", "--frames", root / "JPEGImages" / "480p" / "a", "--output", tmp_path / "o4", *common)
    one_sentence_error(r, "--first-mask")


def _copy_tree(src: Path, dst: Path) -> None:
    for f in src.rglob("*"):
        if f.is_file():
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).write_bytes(f.read_bytes())


def test_davis_score_needs_output(tmp_path):
    pred = tmp_path / "pred"
    _copy_tree(DATA / "davis-ellipses" / "pred", pred)
    r = run("davis-score", "--gt", DATA / "davis-ellipses" / "gt", "--pred", pred, "--quiet")
    assert r.exit_code == 2
    assert [line for line in r.output.splitlines() if line.strip()] == [
        "Error: dinokit davis-score needs --output (the folder for metrics.json and the CSVs, or the --pred "
        "folder itself to write beside the predictions). See dinokit davis-score --help."
    ]
    assert not (pred / "metrics.json").exists()


def test_davis_score_cli(tmp_path):
    gt = DATA / "davis-ellipses" / "gt"
    pred = tmp_path / "pred"
    _copy_tree(DATA / "davis-ellipses" / "pred", pred)
    r = run("davis-score", "--gt", gt, "--pred", pred, "--output", pred, "--quiet")
    assert r.exit_code == 0, r.output
    metrics = json.loads((pred / "metrics.json").read_text())
    assert list(metrics)[:7] == KEYS
    assert metrics["J&F-Mean"] == pytest.approx(0.8399313647422748, abs=1e-6)
    assert metrics["per_object"]["ellipses-perfect_2"]["F-Decay"] == 0.0
    assert (pred / "global_results-val.csv").is_file()
    # a prediction folder missing frames
    (pred / "ellipses-drift" / "00005.png").unlink()
    r = run("davis-score", "--gt", gt, "--pred", pred, "--output", pred, "--quiet")
    one_sentence_error(r, str(pred / "ellipses-drift" / "00005.png"), "missing")
    _copy_tree(DATA / "davis-ellipses" / "pred", pred)
    # more predicted objects than the ground truth has
    target = pred / "ellipses-perfect" / "00002.png"
    lab = np.array(Image.open(target))
    lab[:5, :5] = 7
    save_mask(lab, target)
    r = run("davis-score", "--gt", gt, "--pred", pred, "--output", pred, "--quiet")
    one_sentence_error(r, str(target), "object 7", "only 2 object")
    nowhere = tmp_path / "nowhere"
    r = run("davis-score", "--gt", gt, "--pred", nowhere, "--output", nowhere, "--quiet")
    one_sentence_error(r, "does not exist")
