"""Hostile and careless input through the CLI: every case ends with exit 0 and the right result, or
exit 2 and one sentence; never a traceback, never a wrong number, nothing of the user's deleted.

New commands join by adding their cases here: images (truncated, zero-byte, 16-bit, CMYK, palette,
1x1, decompression bomb), checkpoints (text, truncated, malicious pickle, wrong shapes, NaN),
folders (missing, empty, symlink loop, read-only) and COCO files (malformed, huge coordinates)."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.eval.features import load_features
from tests.helpers import make_image, memory_headroom, run_cli, save_tiny_vit, write_bomb_png

SMALL = ["--resize", "32", "--image-size", "32", "--batch-size", "4", "--device", "cpu", "--quiet"]


def assert_refused(result, *needles: str) -> None:
    """Exit 2 with one plain sentence (holding each needle) and no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for needle in needles:
        assert needle in result.text, result.output


def _features(data: Path, out: Path, weights: Path, *extra):
    return run_cli(["features", "--weights", weights, "--data", data, "--output", out, *SMALL, *extra])


@pytest.fixture(scope="module")
def tiny1(tmp_path_factory) -> Path:
    """A one-block vit_tiny/16: the cheapest real backbone."""
    return save_tiny_vit(tmp_path_factory.mktemp("w") / "tiny1.pth", depth=1)


# -- images ----------------------------------------------------------------------------------------
def _image_zoo(root: Path) -> dict[str, bool]:
    """One image of every awkward kind; name -> whether it can be read."""
    root.mkdir(parents=True)
    make_image(root / "good.png", size=(40, 40))
    make_image(root / "truncated.png", size=(40, 40), seed=1)
    data = (root / "truncated.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "zero.png").write_bytes(b"")
    values = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)
    Image.fromarray(values).save(root / "grey16.png")
    Image.fromarray((values >> 8).astype(np.uint8), "L").save(root / "grey8.png")  # what grey16 must equal
    Image.open(root / "good.png").convert("CMYK").save(root / "cmyk.jpg")
    Image.open(root / "good.png").convert("P").save(root / "palette.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one.png")
    write_bomb_png(root / "bomb.png")
    return {"good": True, "truncated": False, "zero": False, "grey16": True, "grey8": True, "cmyk": True,
            "palette": True, "one": True, "bomb": False}


def test_features_skip_unreadable_images_and_read_the_awkward_ones_right(tmp_path, tiny1, caplog):
    zoo = _image_zoo(tmp_path / "zoo")
    out = tmp_path / "f.pt"
    r = _features(tmp_path / "zoo", out, tiny1)
    assert r.exit_code == 0, r.output
    fs = load_features(out)
    names = [Path(p).stem for p in fs.paths]
    assert sorted(names) == sorted(n for n, ok in zoo.items() if ok)
    assert torch.isfinite(fs.features).all()
    # a 16-bit image is read as its 8-bit scaling, not as a white picture
    f = dict(zip(names, fs.features))
    torch.testing.assert_close(f["grey16"], f["grey8"])


def test_pretrain_skips_a_decompression_bomb(tmp_path):
    data = tmp_path / "imgs"
    for i in range(4):
        make_image(data / f"{i}.png", size=(32, 32), seed=i)
    write_bomb_png(data / "bomb.png")
    r = run_cli(["pretrain", "--data", data, "--output", tmp_path / "run", "--epochs", "1", "--arch", "vit_tiny",
                 "--depth", "1", "--batch-size", "4", "--out-dim", "64", "--local-crops", "0", "--global-size", "32",
                 "--precision", "fp32", "--num-workers", "0", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output


def test_a_command_that_cannot_skip_an_image_says_so_in_one_sentence(tmp_path, tiny1):
    bomb = write_bomb_png(tmp_path / "bomb.png")
    r = run_cli(["attn", bomb, "-w", tiny1, "--image-size", "32", "-o", tmp_path / "maps", "-q"])
    assert_refused(r, "bomb.png")


# -- checkpoints -----------------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its refusal must hold)."""
    made: dict[str, tuple[Path, str]] = {}
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    made["text"] = (text, "not a readable PyTorch checkpoint")
    truncated = tmp_path / "truncated.pth"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    made["truncated"] = (truncated, "not a readable PyTorch checkpoint")
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"teacher": _RunsCode(tmp_path / "pwned")}, f)
    made["malicious pickle"] = (evil, "refuses to unpickle")
    sd = torch.load(good, weights_only=True)
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(500, 192)
    wrong = tmp_path / "wrong.pth"
    torch.save(sd, wrong)
    made["wrong shapes"] = (wrong, "has tensor shapes that fit no")
    sd = torch.load(good, weights_only=True)
    sd["norm.weight"][0] = float("nan")
    nan = tmp_path / "nan.pth"
    torch.save(sd, nan)
    made["NaN"] = (nan, "non-finite values (NaN or inf) in norm.weight")
    return made


def test_bad_checkpoints_are_one_sentence(tmp_path, tiny1):
    data = tmp_path / "imgs"
    make_image(data / "a.png", size=(32, 32))
    for name, (path, needle) in _bad_checkpoints(tmp_path, tiny1).items():
        r = _features(data, tmp_path / f"{name}.pt", path)
        assert_refused(r, needle)
        assert not (tmp_path / f"{name}.pt").exists(), name
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran


def test_wrong_shapes_in_safetensors_are_one_sentence(tmp_path, tiny1):
    safetensors = pytest.importorskip("safetensors.torch")
    sd = torch.load(tiny1, weights_only=True)
    sd["patch_embed.proj.weight"] = torch.zeros(193, 3, 16, 16)
    safetensors.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    data = tmp_path / "imgs"
    make_image(data / "a.png", size=(32, 32))
    r = _features(data, tmp_path / "f.pt", tmp_path / "model.safetensors")
    assert_refused(r, "has tensor shapes that fit no", "embedding dimension 193")


def test_knn_refuses_nonfinite_feature_files(tmp_path, labelled_folder, tiny1):
    made = {}
    for split in ("train", "val"):
        made[split] = tmp_path / f"{split}.pt"
        assert _features(labelled_folder / split, made[split], tiny1).exit_code == 0
    raw = torch.load(made["val"], weights_only=True)
    raw["features"][1, 0] = float("nan")
    torch.save(raw, made["val"])
    for command in ("knn", "linear"):
        r = run_cli([command, "--train-features", made["train"], "--val-features", made["val"],
                     "--output", tmp_path / command, "--quiet", *(["--epochs", "1"] if command == "linear" else [])])
        assert_refused(r, "non-finite values (NaN or inf)")


# -- folders ---------------------------------------------------------------------------------------
def test_missing_and_empty_folders_are_one_sentence(tmp_path, tiny1):
    assert_refused(_features(tmp_path / "nowhere", tmp_path / "a.pt", tiny1), "nowhere")
    (tmp_path / "empty").mkdir()
    assert_refused(_features(tmp_path / "empty", tmp_path / "b.pt", tiny1), "empty")


def test_symlink_loop_is_scanned_once(tmp_path, tiny1):
    root = tmp_path / "loop"
    make_image(root / "a" / "x.png", size=(32, 32))
    make_image(root / "b" / "y.png", size=(32, 32), seed=1)
    os.symlink("..", root / "a" / "up")
    os.symlink("..", root / "b" / "up")
    r = _features(root, tmp_path / "f.pt", tiny1)
    assert r.exit_code == 0, r.output
    assert sorted(Path(p).name for p in load_features(tmp_path / "f.pt").paths) == ["x.png", "y.png"]


def test_features_into_a_read_only_folder_is_refused_before_the_work(tmp_path, tiny1, monkeypatch):
    data = tmp_path / "imgs"
    make_image(data / "a.png", size=(32, 32))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):  # root writes anyway: the permission check sees the folder as others do
            real_access = os.access
            monkeypatch.setattr(
                os, "access", lambda p, mode, **kw: False if Path(p) == locked and mode & os.W_OK else real_access(p, mode, **kw)
            )
        r = _features(data, locked / "f.pt", tiny1)
        assert_refused(r, f"The folder {locked} is not writable")
        assert "reading" not in r.output and not list(locked.iterdir())
    finally:
        locked.chmod(stat.S_IRWXU)


def test_synth_overwrite_leaves_a_users_folder_alone(tmp_path):
    out = tmp_path / "photos"
    make_image(out / "train" / "myclass" / "photo.png", size=(16, 16))
    r = run_cli(["synth", "classify", "--output", out, "--classes", "1", "--per-class", "2", "--image-size", "16",
                 "--overwrite", "--quiet"])
    assert_refused(r, "did not write")
    assert (out / "train" / "myclass" / "photo.png").is_file()


# -- COCO ------------------------------------------------------------------------------------------
def _coco(tmp_path: Path, segmentation) -> Path:
    make_image(tmp_path / "images" / "a.png", size=(32, 32))
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}],
            "annotations": [{"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": segmentation}],
            "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def _attn_coco(tmp_path: Path, ann: Path, weights: Path, out: str):
    return run_cli(["attn", "--images", tmp_path / "images", "--coco", ann, "-w", weights, "--image-size", "32",
                    "-o", tmp_path / out, "-q"])


def test_coco_huge_coordinates_are_cut_to_the_image(tmp_path, tiny1):
    ann = _coco(tmp_path, [[4, 4, 1e308, 4, 28, 28, 4, 28]])
    with memory_headroom():
        r = _attn_coco(tmp_path, ann, tiny1, "huge")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "huge" / "metrics.json").read_text())["objects"] == 1


@pytest.mark.parametrize(
    "segmentation, needle",
    [([[4, 4]], "needs at least 3"), ({"size": [99999, 99999], "counts": [1]}, "not the image's [32, 32]")],
)
def test_coco_malformed_annotations_are_one_sentence(tmp_path, tiny1, segmentation, needle):
    ann = _coco(tmp_path, segmentation)
    with memory_headroom():
        assert_refused(_attn_coco(tmp_path, ann, tiny1, "bad"), "Annotation 4", needle)
    ann.write_text("{not json")
    assert_refused(_attn_coco(tmp_path, ann, tiny1, "bad2"), "not a COCO annotation file")


# -- DAVIS folders ---------------------------------------------------------------------------------
ELLIPSES = Path(__file__).parents[1] / "assets" / "davis-ellipses"


def _ellipses_copy(tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    shutil.copytree(ELLIPSES / "gt", tmp_path / "gt")
    shutil.copytree(ELLIPSES / "pred", tmp_path / "pred")
    return tmp_path / "gt", tmp_path / "pred"


def test_davis_folders_with_wrong_sizes_missing_frames_or_an_unknown_split_are_one_sentence(tmp_path):
    gt, pred = _ellipses_copy(tmp_path)
    frame = pred / "ellipses-drift" / "00002.png"
    img = Image.open(frame)
    img.resize((img.width // 2, img.height // 2)).save(frame)
    r = run_cli(["davis-score", "--gt", gt, "--pred", pred, "--output", tmp_path / "s1", "--quiet"])
    assert_refused(r, str(frame), "427x240", "854x480")

    gt, pred = _ellipses_copy(tmp_path / "second")
    (pred / "ellipses-drift" / "00004.png").unlink()
    r = run_cli(["davis-score", "--gt", gt, "--pred", pred, "--output", tmp_path / "s2", "--quiet"])
    assert_refused(r, "00004")

    root = tmp_path / "DAVIS"  # a DAVIS 2017 root: Annotations/480p/<seq> and ImageSets/2017/<split>.txt
    (root / "Annotations").mkdir(parents=True)
    gt.rename(root / "Annotations" / "480p")
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("ellipses-drift\n")
    r = run_cli(["davis-score", "--gt", root, "--pred", pred, "--split", "vall", "--output", tmp_path / "s3", "--quiet"])
    assert_refused(r, "vall.txt", "val")
