"""`pyro-iwem sweep` on Ray: a local cluster started by the test, a worker killed part-way,
runs that fail by themselves, and TensorBoard scalars."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from pyro_iwem.experiments.cli import main
from pyro_iwem.experiments.errors import RunError
from pyro_iwem.experiments.sweep import ATTEMPT, ProgressBoard, Sweep, import_ray, sweep_runs

ray = pytest.importorskip("ray")

TINY = ["--epochs", "4", "--max-train", "400", "--batch-size", "20", "--max-eval", "50", "--valid-K", "5",
        "--eval-K", "20", "--device", "cpu"]  # fmt: skip


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A one-node Ray cluster (`ray start --head --block`) on free ports; its address."""
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0")  # as a sweep's own local Ray
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats",
         "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not open its port in 120 s"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()  # --block: the head stops the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not there yet, or being replaced
        return None


def kill_worker_after_first_epoch(run_dir, sweep, timeout=900):
    """SIGKILL the Ray worker training ``run_dir`` once its first checkpoint exists; returns
    what happened: "killed", or why not."""
    deadline = time.monotonic() + timeout
    while sweep.poll() is None:
        if time.monotonic() > deadline:
            return f"no checkpoint of {run_dir.name} within {timeout} s"
        attempt = _read_json(run_dir / ATTEMPT)
        if attempt and (run_dir / "checkpoint.pt").is_file():
            if (run_dir / "metrics.json").is_file():
                return f"{run_dir.name} finished before its worker could be killed"
            os.kill(attempt["pid"], signal.SIGKILL)
            return "killed"
        time.sleep(0.02)
    return "the sweep ended first"


def train_alone(run, out, extra):
    threads = torch.get_num_threads()
    try:
        argv = ["train", "--dataset", run["dataset"], "--method", run["method"], "--K", str(run["K"]),
                "--J", str(run["J"]), "--seed", str(run["seed"]), *extra, "--threads", "1", "--quiet", "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "metrics.json").read_text())


def test_sweep_on_a_ray_cluster_survives_a_killed_worker(ray_head, tmp_path):
    sweep_dir = tmp_path / "sweep"
    argv = [sys.executable, "-m", "pyro_iwem", "sweep", "--methods", "vae,iwem", "--datasets", "digits-8x8",
            "--seeds", "1,2", "--K", "5", "--J", "5", *TINY, "--address", ray_head, "--cpus-per-run", "1",
            "--interval", "0.5", "--out", str(sweep_dir)]  # fmt: skip
    log = tmp_path / "sweep.log"  # a file, not a pipe that nobody reads while the runs go
    with log.open("w") as stdout:
        sweep = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.STDOUT, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
        victim = sweep_dir / "digits-8x8-mlp-iwem-K5-J5-s1"
        killed = kill_worker_after_first_epoch(victim, sweep)
        sweep.wait(timeout=900)  # about 30 s on an idle 2-core machine
    output = log.read_text()
    assert sweep.returncode == 0, output
    assert killed == "killed", f"{killed}:\n{output}"

    runs = sweep_runs(["digits-8x8"], ["mlp"], ["vae", "iwem"], [1, 2], [5], [5])
    assert len(runs) == 4
    for run in runs:
        run_dir = sweep_dir / f"digits-8x8-mlp-{run['method']}-K5-J5-s{run['seed']}"
        attempts = json.loads((run_dir / ATTEMPT).read_text())["attempt"]
        assert attempts == (2 if run_dir == victim else 1), (run_dir, output)
        swept = json.loads((run_dir / "metrics.json").read_text())
        alone = train_alone(run, tmp_path / "alone" / run_dir.name, TINY)
        for key in ("test_ll", "best_valid_ll", "best_epoch", "epochs"):
            assert swept[key] == alone[key], (run_dir.name, key, swept[key], alone[key])
    assert not [line for line in output.splitlines() if line.startswith("failed ")], output
    table = (sweep_dir / "table.md").read_text()
    assert "| vae |" in table and "| iwem |" in table and "(2)" in table


def test_a_run_that_fails_by_itself_is_reported_once(tmp_path, capsys):
    # local Ray (no --address); static MNIST from a data directory that does not exist
    sweep_dir = tmp_path / "sweep"
    argv = ["sweep", "--methods", "vae", "--datasets", "static-mnist,digits-8x8", "--seeds", "1", "--K", "2",
            "--epochs", "1", "--max-train", "100", "--max-eval", "20", "--eval-K", "5", "--valid-K", "2",
            "--device", "cpu", "--data-root", str(tmp_path / "no-data"), "--interval", "1", "--out", str(sweep_dir)]  # fmt: skip
    assert main(argv) == 1
    out = capsys.readouterr().out
    bad = "static-mnist-mlp-vae-K2-J50-s1"
    assert out.count(f"failed {bad}: MissingDataFileError") == 1, out
    assert json.loads((sweep_dir / bad / ATTEMPT).read_text())["attempt"] == 1  # not retried
    assert (sweep_dir / "digits-8x8-mlp-vae-K2-J50-s1" / "metrics.json").is_file()  # the others go on
    assert "1 run(s) failed: " + bad in out


def test_resources_beyond_this_machine_are_refused(tmp_path, capsys):
    argv = ["sweep", "--methods", "vae", "--datasets", "digits-8x8", "--cpus-per-run", "4096",
            "--out", str(tmp_path / "sweep")]  # fmt: skip
    assert main(argv) == 2
    assert "--cpus-per-run 4096 exceeds the" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(Exception, match=r"pip install 'pyro-iwem\[ray\]'"):
        import_ray()


def test_summary_counts_runs_and_notes_a_retry():
    import io

    runs = sweep_runs(["digits-8x8"], ["mlp"], ["vae"], [1, 2, 3], [5], [5])
    out = io.StringIO()
    sweep = Sweep(runs, "sweep", out=out)
    a, b, c = sweep.names
    sweep.metrics[a] = {"test_ll": -1.0}
    board = {b: {"state": "running", "attempt": 1, "epoch": 3, "epochs": 9, "host": "node-1"}}
    sweep.summary(board, [b, c])
    board[b].update(attempt=2, epoch=3)  # its worker died; the new attempt resumed at epoch 3
    sweep.summary(board, [b, c])
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("] 1 done, 1 running, 1 pending, 0 failed")
    assert lines[1] == f"    {b}: epoch 3/9 on node-1"
    assert lines[2] == f"retry {b}: attempt 2 continues from epoch 3"
    assert lines[4] == f"    {b}: epoch 3/9 on node-1, attempt 2"


def test_progress_board_merges_reports():
    board = ProgressBoard()
    board.report("a", state="running", attempt=1, epoch=0, epochs=3)
    board.report("a", epoch=2, valid_ll=-30.0)
    board.report("b", state="running", attempt=2, epoch=1, epochs=3)
    assert board.state() == {
        "a": {"state": "running", "attempt": 1, "epoch": 2, "epochs": 3, "valid_ll": -30.0},
        "b": {"state": "running", "attempt": 2, "epoch": 1, "epochs": 3},
    }


# --- TensorBoard --------------------------------------------------------------------------
def scalar_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_are_the_history_once_each_across_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits-8x8", "--method", "iwem", "--K", "3", "--J", "3", "--max-train", "100",
            "--max-eval", "20", "--eval-K", "5", "--valid-K", "2", "--device", "cpu", "--quiet", "--tensorboard",
            "--out", str(out)]  # fmt: skip
    assert main([*argv, "--epochs", "1"]) == 0
    assert main([*argv, "--epochs", "3", "--resume"]) == 0  # continues to epoch 3
    history = torch.load(out / "checkpoint.pt", weights_only=False)["history"]
    metrics = json.loads((out / "metrics.json").read_text())
    events = scalar_events(out / "tensorboard")
    for key in ("train_loss", "train_bound", "valid_ll", "alpha", "ess", "seconds"):
        expected = [(h["epoch"], h[key]) for h in history]
        assert [step for step, _ in events[key]] == [1, 2, 3], key  # each epoch once
        assert [v for _, v in events[key]] == pytest.approx([v for _, v in expected], rel=1e-6), key
    # the first run's test LL (at epoch 1) was cleared with the rewrite; the resumed run's is at epoch 3
    assert events["test_ll"] == [(3, pytest.approx(metrics["test_ll"], rel=1e-6))]


def test_two_gpus_per_run_train_one_run_on_two_processes(tmp_path, capsys):
    """--gpus-per-run 2 launches each run under torchrun on two processes (here a Ray cluster
    that declares 2 GPUs on a machine without any: the processes fall back to CPU and gloo)."""
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    try:
        runs = sweep_runs(["digits-8x8"], ["mlp"], ["iwem"], [1], [5], [5])
        extra = ["--epochs", "2", "--eval-K", "20", "--valid-K", "5", "--quiet"]
        failed = Sweep(runs, tmp_path, extra, cpus_per_run=2, gpus_per_run=2, interval=5).run()
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert failed == 0, out
    assert "torch.distributed.run --standalone --nproc_per_node 2 -m pyro_iwem train" in out
    metrics = json.loads(next(tmp_path.glob("*/metrics.json")).read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 2 and metrics["threads"] == 1


def test_gpus_per_run_above_one_must_be_whole(tmp_path):
    with pytest.raises(RunError, match="--gpus-per-run 1.5: above 1 it must be a whole number"):
        Sweep(sweep_runs(["digits-8x8"], ["mlp"], ["iwae"], [1], [5], [5]), tmp_path, gpus_per_run=1.5)
