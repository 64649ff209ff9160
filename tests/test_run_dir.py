"""Runs are not lost or mixed: a run directory is locked while a run uses it, an unreadable
checkpoint or best.pt and an unwritable output directory are each one line (exit status 2)."""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from pyro_iwem.experiments.cli import main

TINY = ["--dataset", "digits-8x8", "--max-train", "200", "--max-eval", "50", "--K", "3", "--J", "3", "--eval-K", "20",
        "--valid-K", "5", "--device", "cpu", "--quiet"]


def one_error_line(capsys, code):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# --- the lock ------------------------------------------------------------------------------
def test_a_second_train_on_a_run_directory_in_use_fails_at_once_and_a_killed_one_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(  # another process in the middle of a run: it holds the lock
        [sys.executable, "-c", "import sys, time\nfrom pyro_iwem.experiments.checkpoint import RunDirLock\n"
         f"lock = RunDirLock({str(out)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        code = main(["train", *TINY, "--epochs", "1", "--out", str(out)])
        line = one_error_line(capsys, code)
        assert time.perf_counter() - start < 5  # before loading any data
        assert f"{out} is in use by another run (pid {holder.pid} on" in line and "give another --out" in line
        assert not (out / "metrics.json").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up, yet the lock goes with the process
        holder.wait()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1


def test_the_lock_is_held_from_prepare_to_the_end_of_the_run(tmp_path, capsys):
    from pyro_iwem.experiments.options import TrainConfig
    from pyro_iwem.experiments.train import Trainer

    out = tmp_path / "run"
    out.mkdir()
    trainer = Trainer(TrainConfig.from_argv(["train", *TINY, "--epochs", "1", "--out", str(out)])).prepare()
    line = one_error_line(capsys, main(["train", *TINY, "--epochs", "1", "--out", str(out)]))
    assert "is in use by another run" in line
    trainer.run()
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--resume"]) == 0


# --- unreadable files ------------------------------------------------------------------------
def spoil(path, how):
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "random": os.urandom(4096)}[how])


@pytest.mark.parametrize("how", ["truncated", "empty", "random"])
def test_an_unreadable_checkpoint_is_one_line_naming_it_and_the_intact_best(run, capsys, how):
    spoil(run / "checkpoint.pt", how)
    line = one_error_line(capsys, main(["train", "--out", str(run), "--resume"]))
    assert f"{run}/checkpoint.pt is {'empty' if how == 'empty' else 'truncated or not a checkpoint'}" in line
    assert "best.pt from epoch 2 is intact" in line and f"pyro-iwem evaluate {run}" in line and "--force" in line


@pytest.mark.parametrize("how", ["truncated", "empty", "random"])
def test_an_unreadable_best_is_one_line_and_resume_writes_it_again(run, capsys, how):
    spoil(run / "best.pt", how)
    line = one_error_line(capsys, main(["evaluate", str(run), "--K", "5", "--device", "cpu"]))
    assert f"{run}/best.pt is" in line
    assert "checkpoint.pt from epoch 2 is intact" in line and f"pyro-iwem train --out {run} --resume" in line
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--K", "5", "--device", "cpu"]) == 0


def test_both_files_unreadable_says_to_start_over(run, capsys):
    spoil(run / "best.pt", "empty")
    spoil(run / "checkpoint.pt", "random")
    line = one_error_line(capsys, main(["figures", str(run), "--out", str(run / "figs"), "--device", "cpu"]))
    assert f"{run}/checkpoint.pt is truncated" in line and "no other file of the run is intact" in line


def test_a_missing_run_directory_does_not_exist(tmp_path, capsys):
    line = one_error_line(capsys, main(["evaluate", str(tmp_path / "nope")]))
    assert line.endswith(f"{tmp_path / 'nope'} does not exist")


# --- an output directory that cannot be written ------------------------------------------------
@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A directory nothing can be written in (as a read-only mount is, even for root)."""
    ro = tmp_path / "ro"
    ro.mkdir()

    def inside(path):
        return pathlib.Path(path).absolute().is_relative_to(ro.absolute())

    def refuse(path):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    mkstemp, mkdir = tempfile.mkstemp, pathlib.Path.mkdir
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, dir=None, **k: refuse(
        pathlib.Path(dir) / ".x.tmp") if dir is not None and inside(dir) else mkstemp(*a, dir=dir, **k))
    monkeypatch.setattr(pathlib.Path, "mkdir", lambda self, *a, **k: refuse(self) if inside(self) else mkdir(self, *a, **k))
    return ro


@pytest.mark.parametrize("command", ["train", "figures", "table"])
def test_an_unwritable_output_directory_is_one_line(finished_run, read_only, capsys, command):
    argv = {
        "train": ["train", *TINY, "--epochs", "1", "--out", str(read_only / "run")],
        "figures": ["figures", str(finished_run), "--out", str(read_only / "figs"), "--figures", "2", "--num-data", "5",
                    "--repeats", "2", "--device", "cpu"],
        "table": ["table", str(finished_run), "--output", str(read_only / "table.md")],
    }[command]
    line = one_error_line(capsys, main(argv))
    option = "--output" if command == "table" else "--out"
    assert f"cannot write in {read_only}" in line and f"make it writable or give another {option}" in line, line


def test_a_diverging_training_is_one_line_and_exit_status_1(tmp_path, capsys):
    code = main(["train", *TINY, "--max-train", "300", "--epochs", "2", "--lr", "1e6", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "in epoch 1" in err and "nothing was saved (try a smaller --lr)" in err


def test_curves_of_a_run_without_checkpoint_is_one_line(run, tmp_path, capsys):
    (run / "checkpoint.pt").unlink()  # as examples/train_iwem.py saves a run: best.pt and metrics.json
    line = one_error_line(capsys, main(["table", str(run), "--curves", str(tmp_path / "c.png")]))
    assert f"{run} has no checkpoint.pt" in line


def test_a_prepared_trainer_that_is_dropped_lets_the_directory_go(tmp_path):
    import gc

    from pyro_iwem.experiments.checkpoint import RunDirLock
    from pyro_iwem.experiments.options import TrainConfig
    from pyro_iwem.experiments.train import Trainer

    out = tmp_path / "run"
    out.mkdir()
    Trainer(TrainConfig.from_argv(["train", *TINY, "--epochs", "1", "--out", str(out)])).prepare()
    gc.collect()
    RunDirLock(out).acquire().release()


def test_two_trains_on_one_directory_the_second_stops_and_the_first_finishes(tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "pyro_iwem", "train", *TINY, "--epochs", "3", "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / ".lock").is_file() and f"pid {first.pid} " in (out / ".lock").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        line = one_error_line(capsys, main(["train", *TINY, "--epochs", "1", "--force", "--out", str(out)]))
        assert f"is in use by another run (pid {first.pid} on" in line
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 3  # the first run's, whole
