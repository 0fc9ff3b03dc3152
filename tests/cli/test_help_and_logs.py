"""Help at 80 columns, output that survives a pipe, the progress heartbeat, one-line usage errors and
the option names kept from before (and from the DINO reference scripts)."""

from __future__ import annotations

import re

import pytest
from dinokit.commands import _options, _progress, app
from typer.main import get_command
from typer.testing import CliRunner

from tests.helpers import make_image, run_cli

WIDTH = 80


def _commands(group, path=()):
    """(path, click command) for every command and sub-command, groups included."""
    yield path, group
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _commands(cmd, (*path, name))


ALL = list(_commands(get_command(app)))


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("path,cmd", ALL, ids=[" ".join(p) or "dinokit" for p, _ in ALL])
def test_help_at_80_columns_cuts_nothing(path, cmd):
    r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(WIDTH)})
    assert r.exit_code == 0, r.output
    out = r.output
    lines = out.splitlines()
    assert all(len(line) <= WIDTH for line in lines), [line for line in lines if len(line) > WIDTH]
    assert "…" not in out and "<" + "int" not in out and "range>" not in out and "x>=" not in out
    assert not any(line != line.rstrip() for line in lines)
    flat = _flat(out)
    for param in cmd.params:
        if getattr(param, "hidden", False) or param.name == "help":
            continue
        names = [*param.opts, *getattr(param, "secondary_opts", ())]
        for name in names if name_is_option(names) else []:
            # the whole name, not a prefix of it, and never split over two lines
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", out), (path, name)
        if param.help:
            assert _flat(param.help) in flat, (path, param.name)
    # the description reads as sentences: each paragraph is filled greedily, not broken where the
    # source code's lines ended
    if cmd.help:
        description = out.split("\n\n")[1:]
        for paragraph in description:
            if (
                paragraph.startswith("  ")
                and not paragraph.lstrip().startswith("-")
                and ":" not in paragraph[:20]
            ):
                para_lines = paragraph.splitlines()
                for line, following in zip(para_lines, para_lines[1:]):
                    assert len(line) + 1 + len(following.split()[0]) > WIDTH - 2, (path, line)


def name_is_option(names) -> bool:
    return all(n.startswith("-") for n in names)


def test_commands_list_shows_whole_summaries():
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": str(WIDTH)})
    flat = _flat(r.output)
    assert "..." not in r.output.replace("COMMAND [ARGS]...", "")
    # the longest summary, whole
    assert "only new or changed images are embedded." in flat


def test_missing_output_is_one_sentence():
    r = run_cli(["knn", "--train", "x"])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert lines == [
        "Error: dinokit knn needs --output (the run folder for results). See dinokit knn --help."
    ]


def test_unknown_option_is_one_sentence():
    r = run_cli(["davis", "--output", "o", "--short-sid", "3"])
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith(
        "Error: No such option: --short-sid"
    )


def test_old_names_and_reference_names_still_work(tmp_path, tiny2_weights):
    """--crop (now --image-size) and the reference's --data_path / --pretrained_weights / --output_dir /
    --patch_size / --batch_size_per_gpu are rewritten to dinokit's names, each with a one-line note."""
    for i in range(3):
        make_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    out = tmp_path / "feats.pt"
    r = CliRunner().invoke(app, [
        "features", "--data_path", str(tmp_path / "imgs"), "--pretrained_weights", str(tiny2_weights),
        f"--output_dir={out}", "--patch_size", "16", "--resize", "32", "--crop", "32",
        "--batch_size_per_gpu", "2", "--quiet",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert out.is_file()
    for old, new in [
        ("--data_path", "--data"),
        ("--pretrained_weights", "--weights"),
        ("--output_dir", "--output"),
        ("--patch_size", "--patch-size"),
        ("--crop", "--image-size"),
        ("--batch_size_per_gpu", "--batch-size"),
    ]:
        assert f"Note: {old} is {new} in dinokit features." in r.output
    import torch

    saved = torch.load(out, weights_only=True)
    assert (
        saved["features"].shape == (3, 192)
        and "CenterCrop(size=(32, 32))" in saved["fingerprint"]["transform"]
    )
    # the old names stay out of the help
    help_text = CliRunner().invoke(app, ["features", "--help"]).output
    assert "--crop" not in help_text and "--data_path" not in help_text


def test_renamed_options_map_per_command():
    cmd = get_command(app)
    rewrite = _options.rewrite_option_names
    assert rewrite(cmd.commands["davis"], ["--short-side", "64", "--topk", "3"]) == [
        "--image-size",
        "64",
        "--k",
        "3",
    ]
    assert rewrite(cmd.commands["attn"], ["--threshold=0.5"]) == ["--attention-mass=0.5"]
    assert rewrite(cmd.commands["duplicates"], ["--threshold", "0.9", "--neighbours", "4"]) == [
        "--min-similarity",
        "0.9",
        "--k",
        "4",
    ]
    assert rewrite(cmd.commands["copydetect"], ["--top", "0"]) == ["--k", "0"]
    # the reference's multi-value --nb_knn becomes dinokit's comma-separated --k
    assert rewrite(cmd.commands["knn"], ["--nb_knn", "10", "20", "--output_dir", "o"]) == [
        "--k=10,20",
        "--output",
        "o",
    ]
    assert rewrite(cmd.commands["predict"], ["--top", "2"]) == ["--k", "2"]
    assert rewrite(cmd.commands["synth"].commands["classify"], ["--size", "16"]) == ["--image-size", "16"]
    # a name the command does not have is left for click to refuse; values and "--" are left alone
    assert rewrite(cmd.commands["knn"], ["--threshold", "--", "--crop"]) == ["--threshold", "--", "--crop"]


def test_piped_output_keeps_long_paths_on_one_line(tmp_path):
    """Not a terminal (a log file, a scheduler): nothing is wrapped at COLUMNS, no line is padded."""
    out = tmp_path / ("a_rather_long_folder_name_for_the_synthetic_shapes_" * 3) / "shapes"
    r = CliRunner().invoke(app, ["synth", "classify", "--output", str(out), "--classes", "1", "--per-class", "2",
                                 "--image-size", "16"], env={"COLUMNS": "80"})  # fmt: skip
    assert r.exit_code == 0, r.output
    assert any(str(out / "train") in line for line in r.output.splitlines()), r.output
    assert all(line == line.rstrip() for line in r.output.splitlines())
    assert "1 class (" in r.output  # not "1 classes"


def test_heartbeat_without_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(_progress, "HEARTBEAT_MIN_SECONDS", 0.0)
    with _progress.RichProgress() as progress:
        assert progress.bar is None and progress.log_lines
        task = progress.task("embedding", total=20)
        for _ in range(20):
            task.advance(1, loss=1.5)
        task.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "embedding (20 steps)"
    beats = [line for line in err[1:] if line.startswith("embedding: ")]
    assert len(beats) == 10  # one line per tenth of the work
    assert beats[0].startswith("embedding: 2/20 (10%)") and beats[-1].startswith("embedding: 20/20 (100%)")
    assert "loss 1.5" in beats[0]


def test_heartbeat_plural(capsys):
    with _progress.RichProgress() as progress:
        progress.task("one", total=1).close()
    assert capsys.readouterr().err.splitlines()[0] == "one (1 step)"


def test_failed_run_leaves_no_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "new" / "run"
    r = run_cli(["duplicates", str(empty), "--output", str(out), "--weights", "random", "--arch", "vit_tiny",
                 "--quiet"])  # fmt: skip
    assert r.exit_code == 2 and r.output.startswith("Error:")
    assert not out.exists()
    # a folder that was there before stays
    out.mkdir(parents=True)
    r = run_cli(["duplicates", str(empty), "--output", str(out), "--weights", "random", "--arch", "vit_tiny",
                 "--quiet"])  # fmt: skip
    assert r.exit_code == 2 and out.is_dir()


@pytest.mark.parametrize("command", ["knn", "linear", "finetune"])
def test_reference_data_path_says_to_give_train_and_val(command, tmp_path):
    """The reference's evaluations take one --data_path holding train/ and val/; the commands that take
    the two folders apart say so instead of only 'No such option'."""
    r = run_cli([command, "--data_path", tmp_path, "--output", tmp_path / "out"])
    assert r.exit_code == 2
    assert (f"dinokit {command} has no --data_path: give --train DATA_PATH/train and --val DATA_PATH/val"
            in r.text), r.text  # fmt: skip
    assert not (tmp_path / "out").exists()
    # the same with the value joined by "="
    r = run_cli([command, f"--data_path={tmp_path}", "--output", tmp_path / "out"])
    assert r.exit_code == 2 and "give --train DATA_PATH/train" in r.text
    # a command without --train keeps click's refusal (with --data it is rewritten, see above)
    r = run_cli(["similar", tmp_path, "--data_path", tmp_path, "--output", tmp_path / "out"])
    assert r.exit_code == 2 and "No such option: --data_path" in r.text


def test_pretrain_data_path_gets_the_reference_note(tmp_path):
    r = run_cli(["pretrain", "--data_path", tmp_path / "nowhere", "--output", tmp_path / "out"])
    assert "Note: --data_path is --data in dinokit pretrain." in r.output
    assert r.exit_code == 2 and f"The data folder {tmp_path / 'nowhere'} does not exist." in r.text


def test_missing_weights_names_where_every_preset_is_listed(tmp_path):
    """The sentence names `dinokit models` and the number of presets it lists."""
    import json

    (tmp_path / "photos").mkdir()
    r = run_cli(["duplicates", tmp_path / "photos", "--output", tmp_path / "out"])
    assert r.exit_code == 2
    listed = run_cli(["models", "--json"])
    n = len(json.loads(listed.output)["presets"])
    assert n >= 20
    assert (
        f"a preset (one of the {n} that `dinokit models` lists, such as dino_vits16, dinov2_vits14" in r.text
    ), r.text


def test_counts_agree_with_their_nouns():
    from dinokit.commands._console import plural

    assert [plural(n, "query") for n in (0, 1, 2)] == ["0 queries", "1 query", "2 queries"]
    assert [plural(n, "class") for n in (1, 3)] == ["1 class", "3 classes"]
    assert (
        plural(2, "key") == "2 keys" and plural(1, "image") == "1 image" and plural(2, "image") == "2 images"
    )
    assert plural(2, "new image") == "2 new images"
