"""``pyro-iwem train`` under ``torchrun --nproc_per_node 2`` (gloo on 127.0.0.1, digits 8x8):
one run on two processes writes one set of files, resumes after a kill to exactly the
uninterrupted run's result, refuses to resume on another number of processes, and scores
within Monte-Carlo error of the same run on one process. Every launch has a timeout."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

TRAIN = ["--dataset", "digits-8x8", "--model", "mlp", "--method", "iwem", "--K", "5", "--J", "5",
         "--eval-K", "200", "--threads", "1", "--quiet"]  # fmt: skip
EPOCHS = ["--epochs", "4"]
TIMEOUT = 240
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, processes=2):
    """The argv of ``pyro-iwem train ARGS`` on ``processes`` processes (one: no torchrun)."""
    train = ["-m", "pyro_iwem", "train", *TRAIN, *args]
    if processes == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *train]  # fmt: skip


def run(*args, processes=2):
    return subprocess.run(torchrun(*args, processes=processes), capture_output=True, text=True, timeout=TIMEOUT,
                          env=ENV)  # fmt: skip


def kill_run(out):
    """SIGKILL every process whose command line names ``out``: torchrun's agent and its workers
    (which run in sessions of their own, and would go on without the agent)."""
    for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(out).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The same 4-epoch run on one process and on two."""
    root = tmp_path_factory.mktemp("torchrun")
    done = {}
    for processes in (1, 2):
        out = root / f"p{processes}"
        result = run(*EPOCHS, "--out", str(out), processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        done[processes] = (out, result)
    return done


def test_two_processes_write_one_run(finished):
    out, result = finished[2]
    m = metrics(out)
    assert m["world_size"] == 2 and metrics(finished[1][0])["world_size"] == 1
    assert m["epochs"] == 4 and len(m) == len(metrics(finished[1][0]))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in finished[1][0].iterdir())
    assert result.stdout.count("test LL") == 1  # the summary line, from process 0 alone


def test_two_processes_score_as_one(finished):
    # measured: one process -23.64, two -23.62; seeds 1234 / 1235 on one process differ by 0.07
    one, two = (metrics(finished[p][0])["test_ll"] for p in (1, 2))
    assert abs(one - two) < 0.25, (one, two)


def test_killed_run_resumes_to_the_uninterrupted_result(finished, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(*EPOCHS, "--out", str(out)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "checkpoint.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        kill_run(out)
        proc.wait(timeout=30)
    time.sleep(1)  # the workers' ends (their locks go with them)
    assert (out / "checkpoint.pt").is_file() and not (out / "metrics.json").exists(), "killed too late"
    before = (out / "checkpoint.pt").stat().st_mtime_ns

    one = run("--out", str(out), "--resume", processes=1)  # the wrong number of processes
    assert one.returncode == 2
    assert "was trained on 2 process(es) and is resumed on 1" in one.stderr
    assert (out / "checkpoint.pt").stat().st_mtime_ns == before

    resumed = run("--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = metrics(out), metrics(finished[2][0])
    assert got["test_ll"] == want["test_ll"] and got["best_valid_ll"] == want["best_valid_ll"]


def test_refusals_come_once_from_every_process(finished, tmp_path):
    out = finished[2][0]
    again = run(*EPOCHS, "--out", str(out))  # a finished run, without --resume
    assert again.returncode == 1  # torchrun's status when a process fails (the processes exit with 2)
    assert again.stderr.count("holds a finished run") == 1, again.stderr
    small = run("--batch-size", "1296", "--epochs", "1", "--out", str(tmp_path / "small"))  # last batch: 1 image
    assert small.returncode == 1
    assert small.stderr.count("fewer than the 2 processes") == 1, small.stderr
    assert not (tmp_path / "small").exists()
