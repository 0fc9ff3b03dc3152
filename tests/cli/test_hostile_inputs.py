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
    return {
        "good": True,
        "truncated": False,
        "zero": False,
        "grey16": True,
        "grey8": True,
        "cmyk": True,
        "palette": True,
        "one": True,
        "bomb": False,
    }


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
    r = run_cli(
        [
            "pretrain",
            "--data",
            data,
            "--output",
            tmp_path / "run",
            "--epochs",
            "1",
            "--arch",
            "vit_tiny",
            "--depth",
            "1",
            "--batch-size",
            "4",
            "--out-dim",
            "64",
            "--local-crops",
            "0",
            "--global-size",
            "32",
            "--precision",
            "fp32",
            "--num-workers",
            "0",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
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
        r = run_cli(
            [
                command,
                "--train-features",
                made["train"],
                "--val-features",
                made["val"],
                "--output",
                tmp_path / command,
                "--quiet",
                *(["--epochs", "1"] if command == "linear" else []),
            ]
        )
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
        if os.access(
            locked, os.W_OK
        ):  # root writes anyway: the permission check sees the folder as others do
            real_access = os.access
            monkeypatch.setattr(
                os,
                "access",
                lambda p, mode, **kw: (
                    False if Path(p) == locked and mode & os.W_OK else real_access(p, mode, **kw)
                ),
            )
        r = _features(data, locked / "f.pt", tiny1)
        assert_refused(r, f"The folder {locked} is not writable")
        assert "reading" not in r.output and not list(locked.iterdir())
    finally:
        locked.chmod(stat.S_IRWXU)


def test_synth_overwrite_leaves_a_users_folder_alone(tmp_path):
    out = tmp_path / "photos"
    make_image(out / "train" / "myclass" / "photo.png", size=(16, 16))
    r = run_cli(
        [
            "synth",
            "classify",
            "--output",
            out,
            "--classes",
            "1",
            "--per-class",
            "2",
            "--image-size",
            "16",
            "--overwrite",
            "--quiet",
        ]
    )
    assert_refused(r, "did not write")
    assert (out / "train" / "myclass" / "photo.png").is_file()


# -- COCO ------------------------------------------------------------------------------------------
def _coco(tmp_path: Path, segmentation) -> Path:
    make_image(tmp_path / "images" / "a.png", size=(32, 32))
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}],
        "annotations": [
            {"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": segmentation}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def _attn_coco(tmp_path: Path, ann: Path, weights: Path, out: str):
    return run_cli(
        [
            "attn",
            "--images",
            tmp_path / "images",
            "--coco",
            ann,
            "-w",
            weights,
            "--image-size",
            "32",
            "-o",
            tmp_path / out,
            "-q",
        ]
    )


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
    r = run_cli(
        [
            "davis-score",
            "--gt",
            root,
            "--pred",
            pred,
            "--split",
            "vall",
            "--output",
            tmp_path / "s3",
            "--quiet",
        ]
    )
    assert_refused(r, "vall.txt", "val")


# -- read-only output folders ------------------------------------------------------------------------
def _read_only_mount_works() -> bool:
    """Whether this machine lets a test mount a folder read-only in a user namespace (unshare)."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount --bind -o ro / /mnt 2>/dev/null || mount --bind -o ro /tmp /tmp"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


@pytest.mark.skipif(not _read_only_mount_works(), reason="no read-only bind mount in a user namespace here")
def test_knn_and_pretrain_into_a_read_only_file_system_are_refused_before_the_work(tmp_path, feature_files):
    """Reproduction 3, on a real read-only file system (a bind mount in a user namespace): the write
    itself fails there, for root too, so the sentence can only come from the check before the work."""
    import subprocess
    import sys

    ro = tmp_path / "ro"
    ro.mkdir()
    images = tmp_path / "imgs"
    for i in range(4):
        make_image(images / f"{i}.png", size=(36, 36), seed=i)
    knn = [sys.executable, "-m", "dinokit", "knn", "--train-features", str(feature_files[0]), "--val-features",
           str(feature_files[1]), "--k", "3", "--quiet", "--output"]  # fmt: skip
    pretrain = [sys.executable, "-m", "dinokit", "pretrain", "--data", str(images), "--arch", "vit_tiny", "--depth",
                "1", "--batch-size", "2", "--out-dim", "64", "--local-crops", "0", "--global-size", "32",
                "--epochs", "1", "--quiet", "--output"]  # fmt: skip
    script = " ; ".join(
        [f"mount --bind -o ro {ro} {ro}"]
        + [
            " ".join(map(__import__("shlex").quote, [*cmd, out])) + " ; echo rc=$?"
            for cmd, out in ((knn, str(ro)), (knn, str(ro / "sub")), (pretrain, str(ro)))
        ]
    )
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    text = " ".join((r.stdout + r.stderr).split())
    assert text.count("rc=2") == 3, text
    assert f"The output folder {ro} is not writable (read-only file system); choose another --output." in text
    assert f"The output folder {ro / 'sub'} cannot be created (read-only file system)" in text
    assert "Traceback" not in text and "epoch 1" not in text


def test_a_read_only_output_folder_is_refused_before_the_work_even_for_root(
    tmp_path, feature_files, monkeypatch
):
    """The same check where no mount can be made: the file system's refusal (EROFS) is what the write in
    the folder raises, so the sentence comes from the check that writes the lock, before the work."""
    import errno
    import tempfile

    import dinokit.io

    out = tmp_path / "ro"
    out.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):
        if dir is not None and Path(dir) == out:
            raise OSError(errno.EROFS, "Read-only file system", str(out))
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(dinokit.io.tempfile, "mkstemp", mkstemp)
    r = run_cli(["knn", "--train-features", feature_files[0], "--val-features", feature_files[1], "--k", "3",
                 "--output", out, "--quiet"])  # fmt: skip
    assert_refused(
        r, f"The output folder {out} is not writable (read-only file system); choose another --output."
    )
    assert not list(out.iterdir())


# -- inputs that would run for minutes or allocate without bound -------------------------------------
def test_an_image_that_becomes_too_many_tokens_is_refused_with_the_size_that_fits(tmp_path, tiny1):
    """Reproduction 4: a 16x2000 strip with --keep-aspect at 480 is 480x60000 pixels, 112,500 tokens."""
    Image.fromarray(np.zeros((2000, 16, 3), np.uint8)).save(tmp_path / "strip.png")
    make_image(tmp_path / "ok.png", size=(32, 32))
    out = tmp_path / "maps"
    r = run_cli(
        ["attn", tmp_path / "ok.png", tmp_path / "strip.png", "-w", tiny1, "--keep-aspect", "-o", out, "-q"]
    )
    assert_refused(
        r,
        "strip.png (16x2000 pixels) at --image-size 480 with --keep-aspect becomes 480x60000 pixels",
        "112500 tokens",
        "limit of 100000",
        "use --image-size 457 or less for it",
        "--max-tokens",
    )
    assert not out.exists()  # refused before any map was written
    r = run_cli(["attn", tmp_path / "strip.png", "-w", tiny1, "--image-size", "0", "--max-tokens", "100",
                 "-o", out, "-q"])  # fmt: skip
    assert_refused(r, "at its own size of 16x2000 pixels is 125 tokens", "limit of 100")


def test_the_size_that_fits_is_the_largest_within_the_limit():
    from dinokit.eval.attention import largest_image_size, resized_size

    for w, h, keep, p, limit in [
        (16, 2000, True, 16, 100_000),
        (640, 480, False, 8, 5000),
        (30, 900, True, 14, 777),
    ]:
        s = largest_image_size(w, h, keep, p, limit)
        tokens = [(a // p) * (b // p) for a, b in (resized_size(w, h, t, keep) for t in (s, s + 1))]
        assert tokens[0] <= limit < tokens[1], (w, h, s, tokens)


def test_a_coco_file_that_claims_a_huge_image_is_refused_before_drawing(tmp_path, tiny1):
    """Reproduction 5: width/height of 100000 for a 32x32 image would allocate 37 GiB of masks."""
    ann = _coco(tmp_path, [[4, 4, 20, 4, 20, 20]])
    data = json.loads(ann.read_text())
    data["images"][0].update(width=100_000, height=100_000)
    ann.write_text(json.dumps(data))
    with memory_headroom():
        r = _attn_coco(tmp_path, ann, tiny1, "huge-claim")
    assert_refused(r, "gives the image", "a size of 100000x100000 pixels, but it is 32x32")


# -- option values ---------------------------------------------------------------------------------------
def test_option_values_longer_than_a_path_can_be_are_one_sentence(tmp_path):
    """Reproduction 6: a 5000-character --weights (or --output) used to end in OSError 36."""
    r = run_cli(["features", "--weights", "a" * 5000, "--data", tmp_path, "--output", tmp_path / "f.pt"])
    assert_refused(r, "--weights is 5000 characters long, longer than any path (4096 characters at most)")
    r = run_cli(["knn", "--weights", "w/" + "b" * 300, "--train", tmp_path, "--val", tmp_path, "--output",
                 tmp_path / "k"])  # fmt: skip
    assert_refused(
        r, "--weights holds a name of 300 characters, longer than a file name can be (255 at most)"
    )
    r = run_cli(["knn", "--train-features", tmp_path / "t.pt", "--val-features", tmp_path / "v.pt", "--output",
                 tmp_path / ("c" * 400)])  # fmt: skip
    assert_refused(r, "--output holds a name of 400 characters")


def test_two_values_for_one_option_are_refused(tmp_path):
    """Reproduction 7: the reference's name and dinokit's, or one name twice, with different values."""
    r = run_cli(["knn", "--pretrained_weights", "a.pth", "--weights", "random", "--train", tmp_path, "--val",
                 tmp_path, "--output", tmp_path / "k"])  # fmt: skip
    assert_refused(r, "--weights was given 2 times with different values (--pretrained_weights a.pth, --weights "
                      "random); give it once.")  # fmt: skip
    r = run_cli(
        ["features", "-w", "random", "--weights=dino_vits16", "--data", tmp_path, "-o", tmp_path / "f.pt"]
    )
    assert_refused(r, "--weights was given 2 times", "(-w random, --weights dino_vits16)")
    r = run_cli(["features", "--avgpool-patch-tokens", "--avgpool-patch-tokens", "--weights", "random", "--data",
                 tmp_path / "none", "-o", tmp_path / "f.pt"])  # fmt: skip
    assert "given 2 times" not in r.text  # the same value twice is harmless
    r = run_cli(["linear", "--avgpool-patch-tokens", "--no-avgpool-patch-tokens", "--train-features", tmp_path,
                 "--output", tmp_path / "l"])  # fmt: skip
    assert_refused(r, "--avgpool-patch-tokens was given 2 times", "--no-avgpool-patch-tokens")


# -- CSV: inert cells, and the output's ending agrees with --format -------------------------------------
def test_csv_cells_a_spreadsheet_would_run_are_inert_and_read_back_as_the_names(tmp_path, tiny1, monkeypatch):
    """Reproduction 8: a file named =HYPERLINK(1).png was written as a bare cell."""
    import csv

    from dinokit.eval.features import read_features_csv
    from dinokit.io import cell_text, inert_cell

    names = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@x.png", "'quoted.png", "plain.png"]
    for i, name in enumerate(names):
        make_image(tmp_path / "imgs" / name, size=(32, 32), seed=i)
    monkeypatch.chdir(tmp_path / "imgs")  # relative paths: the names begin the cells
    r = _features(Path("."), tmp_path / "f.csv", tiny1)
    assert r.exit_code == 0, r.output
    with open(tmp_path / "f.csv", newline="") as f:
        cells = [row[0] for row in csv.reader(f)][1:]
    assert sorted(cells) == sorted(["'=HYPERLINK(1).png", "'+1.png", "'-2.png", "'@x.png", "''quoted.png",
                                    "plain.png"])  # fmt: skip
    paths, _, feats = read_features_csv(tmp_path / "f.csv")
    assert sorted(paths) == sorted(names) and feats.shape == (6, 192)
    for text in ["=1+1", "\tx", "'", "''a", "-", "a=b", ""]:
        assert cell_text(inert_cell(text)) == text


def test_the_output_ending_and_the_format_agree_or_the_command_says_so(tmp_path, tiny1):
    """Reproduction 8 and issue 29's point 4: -o x.csv writes CSV, -o out.pt --format csv is refused
    (it made a folder out.pt/), an unknown ending is refused, a path without one is a folder."""
    import csv

    data = tmp_path / "imgs"
    make_image(data / "a.png", size=(32, 32))
    r = _features(data, tmp_path / "x.csv", tiny1)
    assert r.exit_code == 0, r.output
    assert next(csv.reader(open(tmp_path / "x.csv")))[:2] == ["path", "f0"]
    for out, fmt, needle in [("out.pt", "csv", "--output {} ends in .pt, a pt file, but --format csv was asked for; "
                                               "name the file out.csv, or leave out --format."),
                             ("x.npy", "pt", "ends in .npy, a npy file, but --format pt"),
                             ("x.txt", None, "ends in .txt: a features file ends in .pt, .csv or .npy")]:  # fmt: skip
        r = _features(data, tmp_path / out, tiny1, *(["--format", fmt] if fmt else []))
        assert_refused(r, needle.format(tmp_path / out))
        assert not (tmp_path / out).exists()
    r = _features(data, tmp_path / "folder", tiny1, "--format", "npy")
    assert r.exit_code == 0 and (tmp_path / "folder" / "features.npy").is_file(), r.output
    r = _features(data, tmp_path / "folder2", tiny1)
    assert r.exit_code == 0 and load_features(tmp_path / "folder2" / "features.pt").dim == 192, r.output


def test_knn_says_csv_is_not_read_back(tmp_path, feature_files):
    (tmp_path / "x.csv").write_text("path,f0\na.png,1.0\n")
    r = run_cli(["knn", "--train-features", tmp_path / "x.csv", "--val-features", feature_files[1], "--output",
                 tmp_path / "k"])  # fmt: skip
    assert_refused(
        r, "x.csv is a CSV file, which dinokit writes for spreadsheets and pandas but does not read back"
    )
    assert "weights only" not in r.text.lower()


# -- the smaller points of reproduction 10 ---------------------------------------------------------------
def test_a_patch_larger_than_the_input_names_the_option(tmp_path):
    make_image(tmp_path / "imgs" / "a.png", size=(32, 32))
    r = run_cli(["features", "--weights", "random", "--arch", "vit_tiny", "--patch-size", "1000", "--data",
                 tmp_path / "imgs", "--output", tmp_path / "f.pt"])  # fmt: skip
    assert_refused(r, "--patch-size 1000 is larger than the model's 224-pixel input")
    assert "img_size" not in r.text


def test_davis_frames_too_small_for_the_rounding_say_so(tmp_path):
    from dinokit.data.davis import propagation_size
    from dinokit.errors import DataError

    with pytest.raises(
        DataError, match="rounding down to a multiple of 64 makes 0; use --image-size 48 or more"
    ):
        propagation_size(30, 40, short_side=32)
    assert propagation_size(30, 40, short_side=48) == (48, 64)


def test_an_unreachable_hugging_face_hub_is_said_at_once(monkeypatch):
    """Offline, --weights facebook/dinov2-small answered after 54 s of the client's retries."""
    import socket

    huggingface_hub = pytest.importorskip("huggingface_hub")
    from dinokit.errors import CheckpointError
    from dinokit.presets import fetch_hf_weights

    monkeypatch.delenv("DINOKIT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    tried_online = []

    def download(repo, name, local_files_only=False, **kw):
        if not local_files_only:
            tried_online.append(name)  # would retry for about a minute
        raise huggingface_hub.utils.LocalEntryNotFoundError("not cached")

    def no_network(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(
        CheckpointError, match="not in the Hugging Face cache and huggingface.co cannot be reached"
    ):
        fetch_hf_weights("facebook/dinov2-small")
    assert not tried_online


def test_similar_stops_at_the_first_unreadable_image_with_strict(tmp_path, tiny1):
    make_image(tmp_path / "q.png", size=(32, 32))
    for i in range(2):
        make_image(tmp_path / "folder" / f"{i}.png", size=(32, 32), seed=i)
    (tmp_path / "folder" / "broken.png").write_bytes(b"\x89PNG not really")
    args = ["similar", tmp_path / "q.png", "--against", tmp_path / "folder", "-w", tiny1, "--image-size", "32",
            "--device", "cpu", "-q"]  # fmt: skip
    r = run_cli([*args, "--output", tmp_path / "s1"])
    assert r.exit_code == 0 and "skipped 1 unreadable" in r.text, r.output
    r = run_cli([*args, "--output", tmp_path / "s2", "--strict"])
    assert_refused(r, "broken.png")
