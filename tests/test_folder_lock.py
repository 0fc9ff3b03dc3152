"""A run folder belongs to one process at a time: two commands started together into one --output
are never both let in, the one refused names the other, a lock left by a killed process is taken
over, and the lock is gone when a command ends. Real processes throughout: the lock is between
processes, so a test within one process could not fail."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dinokit.errors import FolderInUseError
from dinokit.io import LOCK_NAME, lock_run_folder, prepare_output_dir, release_run_folder
from tests.helpers import run_cli

#: a process that takes the lock of argv[1], says so on stdout, and holds it until stdin closes
HOLDER = (
    "import sys; from dinokit.io import prepare_output_dir; prepare_output_dir(sys.argv[1]); "
    "print('held', flush=True); sys.stdin.read()"
)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DINOKIT_OFFLINE": "1"}


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dinokit(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dinokit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())  # fmt: skip


def test_a_folder_held_by_another_process_is_refused_naming_it(tmp_path, feature_files):
    out = tmp_path / "knn"
    holder = _holder(out)
    try:
        r = run_cli(["knn", "--train-features", feature_files[0], "--val-features", feature_files[1], "--output",
                     out, "--k", "3", "--quiet"])  # fmt: skip
        assert r.exit_code == 2, r.output
        assert f"The output folder {out} is in use by another dinokit run" in r.text
        assert f"pid {holder.pid} on {socket.gethostname()}" in r.text and "Traceback" not in r.output
        assert not (out / "metrics.json").exists()
        # --overwrite and --resume do not get past it either
        r = run_cli(["knn", "--train-features", feature_files[0], "--val-features", feature_files[1], "--output",
                     out, "--k", "3", "--quiet", "--overwrite"])  # fmt: skip
        assert r.exit_code == 2 and "in use by another dinokit run" in r.text, r.output
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert not (out / LOCK_NAME).exists()  # the holder released it as it ended
    r = run_cli(["knn", "--train-features", feature_files[0], "--val-features", feature_files[1], "--output", out,
                 "--k", "3", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert not (out / LOCK_NAME).exists()  # nor does a finished command leave one


def test_two_knn_runs_started_together_into_one_folder_let_in_only_one(tmp_path, feature_files):
    out = tmp_path / "knn"
    runs = {k: _dinokit("knn", "--train-features", feature_files[0], "--val-features", feature_files[1],
                        "--output", out, "--k", k, "--quiet") for k in ("1", "3")}  # fmt: skip
    done = {k: (p.wait(120), p.stdout.read(), p.stderr.read()) for k, p in runs.items()}
    codes = sorted(rc for rc, _, _ in done.values())
    assert codes == [0, 2], done
    (winner, _), (loser, (_, _, err)) = sorted(done.items(), key=lambda kv: kv[1][0])
    text = " ".join(err.split())
    # the second is refused whether it came while the first ran or after it had finished
    assert ("is in use by another dinokit run" in text and f"pid {runs[winner].pid}" in text) or (
        "already holds results" in text
    ), text
    assert "Traceback" not in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["ks"] == [int(winner)]  # the folder holds the winner's results alone
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_two_pretrain_runs_started_together_write_one_consistent_run(tmp_path):
    from tests.helpers import make_image

    data = tmp_path / "imgs"
    for i in range(8):
        make_image(data / f"{i}.png", size=(36, 36), seed=i)
    out = tmp_path / "run"
    tiny = ["--arch", "vit_tiny", "--depth", "1", "--batch-size", "4", "--out-dim", "64", "--local-crops", "0",
            "--global-size", "32", "--precision", "fp32", "--num-workers", "0", "--threads", "1", "--epochs", "2",
            "--quiet", "--device", "cpu"]  # fmt: skip
    runs = [
        _dinokit("pretrain", "--data", data, "--output", out, "--seed", seed, *tiny) for seed in ("1", "2")
    ]
    results = [(p.wait(300), p.stderr.read()) for p in runs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["seed"] == metrics["config"]["seed"]
    assert [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, feature_files, caplog):
    out = tmp_path / "knn"
    holder = _holder(out)
    holder.kill()  # SIGKILL: no chance to remove its lock
    holder.wait(30)
    holder.stdin.close()
    left = json.loads((out / LOCK_NAME).read_text())
    assert left["pid"] == holder.pid
    r = run_cli(["knn", "--train-features", feature_files[0], "--val-features", feature_files[1], "--output", out,
                 "--k", "3", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (out / "metrics.json").is_file() and not (out / LOCK_NAME).exists()


def test_a_lock_of_another_machine_is_never_taken_for_stale(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    other = {"pid": 1234567, "host": socket.gethostname() + "-elsewhere", "started": "2024-01-01 00:00:00",
             "command": "dinokit pretrain"}  # fmt: skip
    (folder / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(FolderInUseError, match=rf"pid 1234567 on .*-elsewhere.*delete {folder / LOCK_NAME}"):
        prepare_output_dir(folder, resume=True)
    assert json.loads((folder / LOCK_NAME).read_text()) == other


def test_a_dead_pid_of_this_machine_is_stale_and_a_reused_one_too(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / LOCK_NAME).write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"})
    )
    assert lock_run_folder(folder) is not None
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    release_run_folder(folder)
    assert not (folder / LOCK_NAME).exists()
    # a live pid whose start time is not the recorded one is another process that got the number
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / LOCK_NAME).write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(), "started": "x",
                                                    "process_start": "1"}))  # fmt: skip
        if Path(f"/proc/{alive.pid}/stat").is_file():
            assert lock_run_folder(folder) is not None
            release_run_folder(folder)
        (folder / LOCK_NAME).write_text(
            json.dumps({"pid": alive.pid, "host": socket.gethostname(), "started": "x"})
        )
        with pytest.raises(FolderInUseError, match=f"pid {alive.pid}"):
            lock_run_folder(folder)
    finally:
        alive.send_signal(signal.SIGKILL)
        alive.wait()


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert lock_run_folder(tmp_path) is None and not (tmp_path / LOCK_NAME).exists()


def test_the_same_process_may_open_its_folder_again(tmp_path):
    folder = tmp_path / "run"
    prepare_output_dir(folder)
    try:
        prepare_output_dir(folder, resume=True)  # the skeleton inside a command that opened it
        release_run_folder(folder)
        assert (folder / LOCK_NAME).exists()
    finally:
        release_run_folder(folder)
    assert not (folder / LOCK_NAME).exists()


@pytest.mark.slow
def test_of_two_processes_finding_one_stale_lock_one_takes_it(tmp_path):
    """Both see the same dead holder; the takeover is serialised so that exactly one gets the folder."""
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / LOCK_NAME).write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"})
    )
    script = (
        "import sys, time; from dinokit.io import lock_run_folder; from dinokit.errors import FolderInUseError\n"
        "start = float(sys.argv[2])\n"
        "while time.time() < start: time.sleep(0.001)\n"
        "try:\n    lock_run_folder(sys.argv[1]); print('took', flush=True)\n"
        "except FolderInUseError:\n    print('refused', flush=True)\n"
        "sys.stdin.read()\n"  # the folder stays held until every answer is in
    )
    start = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(folder), start], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env()) for _ in range(3)]  # fmt: skip
    answers = sorted(p.stdout.readline().strip() for p in procs)
    for p in procs:
        p.stdin.close()
        p.wait(30)
    assert answers == ["refused", "refused", "took"], answers


def test_a_command_run_inside_another_gives_back_only_its_own_folders(tmp_path, feature_files):
    """The demo runs its steps as commands in its own process while it holds its folder."""
    outer = tmp_path / "demo"
    prepare_output_dir(outer)
    try:
        r = run_cli(["knn", "--train-features", feature_files[0], "--val-features", feature_files[1], "--output",
                     outer / "knn", "--k", "3", "--quiet"])  # fmt: skip
        assert r.exit_code == 0, r.output
        assert (outer / LOCK_NAME).exists() and not (outer / "knn" / LOCK_NAME).exists()
    finally:
        release_run_folder(outer)
    assert not (outer / LOCK_NAME).exists()
