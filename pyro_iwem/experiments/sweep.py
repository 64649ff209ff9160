"""Grids of runs on Ray, from a laptop to a cluster.

Every configuration of a sweep is one Ray task that trains it in a run directory of its own,
``SWEEP_DIR/<dataset>-<model>-<method>-K<K>-J<J>-s<seed>``, as ``train --resume`` does: the
driver turns the run's ``train`` command line into a :class:`~.options.TrainConfig`, which the
task hands to a :class:`~.train.Trainer` (the command line itself is only printed):

- **where**: with no address, Ray starts on this machine and runs as many runs at once as
  ``cpus_per_run`` / ``gpus_per_run`` allow; with an address (``"auto"``, ``"HOST:PORT"``,
  ``"ray://HOST:PORT"``) the same sweep goes to an existing cluster, whose nodes must all
  reach ``SWEEP_DIR`` (a shared directory) and have this package and the data installed;
- **faults**: a task whose worker dies (killed, out of memory, node lost) is retried by Ray up
  to ``max_retries`` times, and the new attempt continues from the run's last checkpoint to
  the numbers an uninterrupted run gives; a run that fails for a reason of its own (a bad
  option, missing data, a diverged training) raises, is not retried, and is reported once;
- **progress**: every run reports its epochs to a :class:`ProgressBoard` actor, from which
  the driver prints a live summary (done / running / pending / failed, each running run's
  epoch and attempt);
- **restarts**: finished runs (``metrics.json``) are skipped, so a sweep cut off at any
  point is continued by running the same command again.

At the end ``SWEEP_DIR/table.md`` tabulates the sweep's finished runs.
"""

import datetime
import itertools
import logging
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .checkpoint import CHECKPOINT, METRICS, epoch_of, atomic_path, atomic_write_json, read_json
from .errors import RunError
from .options import TrainConfig
from .setup import USES_J, run_name
from .table import format_table

TABLE = "table.md"
#: Written by each attempt of a run into its directory: attempt number, host and process.
ATTEMPT = "attempt.json"
RAY_HINT = "pip install 'pyro-iwem[ray]'"


def sweep_runs(datasets, models, methods, seeds, K_grid, J_grid):
    """The configurations of a sweep as dicts, in a stable order. Methods that do not use
    J (VAE, IWAE, STL, DReG) run only with the first J of ``J_grid``."""
    runs = []
    for dataset, model, method, K in itertools.product(datasets, models, methods, K_grid):
        for J in J_grid if method in USES_J else J_grid[:1]:
            for seed in seeds:
                runs.append({"dataset": dataset, "model": model, "method": method, "K": K, "J": J, "seed": seed})
    return runs


def train_argv(run, run_dir, extra_argv=()):
    """The ``train`` arguments of one run (always with ``--resume``: it starts fresh when
    there is no checkpoint yet)."""
    return [
        "train",
        "--dataset", run["dataset"],
        "--model", run["model"],
        "--method", run["method"],
        "--K", str(run["K"]),
        "--J", str(run["J"]),
        "--seed", str(run["seed"]),
        *extra_argv,
        "--out", str(run_dir),
        "--resume",
    ]  # fmt: skip


def train_command(run, run_dir, extra_argv=(), processes=1):
    """The shell command that trains one run by itself, as the sweep's task does."""
    return pyro_iwem_command(train_argv(run, run_dir, extra_argv), processes)


def pyro_iwem_command(argv, processes=1):
    """``python -m pyro_iwem ARGV``, on ``processes`` processes of this machine under ``torchrun``
    when more than one."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [sys.executable, *(torchrun if processes > 1 else []), "-m", "pyro_iwem", *argv]


#: The logger of Ray's token-authentication set-up.
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class _QuietTokenNotice(logging.Filter):
    """Drops Ray's notice that a new local cluster has token authentication, its default (it
    says so at every ``ray.init``); its other warnings, e.g. that authentication is off, pass."""

    def filter(self, record):
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def import_ray(address=None):
    """``ray``, or a :class:`RunError` saying how to install it. Sets Ray's environment
    first, each unless already set:

    - no usage statistics (no network calls);
    - with no ``address`` (Ray started here for the sweep), workers at normal priority
      (``RAY_worker_niceness=0``): Ray's default of nice 15 leaves the runs about 3 % of a
      core beside any other busy process, where the loop of ``train`` subprocesses that
      ``sweep`` was before ran them at normal priority;
    - to connect to ``address`` with a token at hand, ``RAY_AUTH_MODE=token``: Ray (2.60)
      starts clusters with token authentication, but refuses a driver ("InvalidAuthToken")
      whose process did not have that mode set when it imported ``ray``;
    - with no ``address``, Ray's own choice for a new local cluster (token authentication, a
      token in ``~/.ray/auth_token`` made if missing), without the warning that it prints about
      that choice at every sweep (:class:`_QuietTokenNotice`).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address:
        os.environ.setdefault("RAY_worker_niceness", "0")
        logger = logging.getLogger(RAY_AUTH_LOGGER)
        if not any(isinstance(f, _QuietTokenNotice) for f in logger.filters):
            logger.addFilter(_QuietTokenNotice())
    elif "RAY_AUTH_MODE" not in os.environ and _auth_token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise RunError(f"pyro-iwem sweep runs on Ray, which is not installed: {RAY_HINT}") from None
    return ray


class ProgressBoard:
    """The sweep's live state, kept by a Ray actor: per run, its attempt, host and last epoch.

    Tasks call :meth:`report`; the driver reads :meth:`state`. (A plain class: the driver
    makes it an actor with ``ray.remote``.)"""

    def __init__(self):
        self.runs = {}

    def report(self, name, **fields):
        self.runs.setdefault(name, {}).update(fields)

    def state(self):
        return self.runs


def _next_attempt(run_dir):
    try:
        return int(read_json(run_dir / ATTEMPT)["attempt"]) + 1
    except (OSError, ValueError, KeyError, TypeError):  # none yet (or unreadable): the first
        return 1


def _auth_token_available():
    """Whether a Ray authentication token is at hand: ``$RAY_AUTH_TOKEN``,
    ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or pathlib.Path.home() / ".ray" / "auth_token"
    return pathlib.Path(path).is_file()


def train_config(argv):
    """The :class:`~.options.TrainConfig` of ``train`` arguments (:func:`train_argv`), or a
    :class:`RunError` naming them."""
    try:
        return TrainConfig.from_argv(argv)
    except SystemExit:
        raise RunError(f"bad train arguments: {shlex.join(argv)}") from None


def _start_attempt(run_dir):
    """Records a new attempt of the run in ``RUN_DIR/attempt.json``; returns it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    attempt = {"attempt": _next_attempt(run_dir), "host": socket.gethostname(), "pid": os.getpid()}
    atomic_write_json(attempt | {"started": datetime.datetime.now().isoformat(timespec="seconds")}, run_dir / ATTEMPT)
    return attempt


def processes_per_run(gpus_per_run):
    """The processes of one run given its GPUs: 1 for at most one GPU (a fraction shares one), P
    for a whole number P > 1 (one GPU each); a :class:`RunError` for another number above 1."""
    if gpus_per_run <= 1:
        return 1
    if gpus_per_run != int(gpus_per_run):
        raise RunError(
            f"--gpus-per-run {gpus_per_run:g}: above 1 it must be a whole number, the processes of one run on as "
            "many GPUs (torchrun); use at most 1 to share GPUs between runs"
        )
    return int(gpus_per_run)


def train_task(settings, name, board):
    """One run, in a Ray worker: ``train`` with ``settings`` (a :class:`~.options.TrainConfig`)
    in this process, reporting to ``board`` (a :class:`ProgressBoard` actor) once set up and
    after every epoch; returns the run's metrics. Records the attempt in
    ``RUN_DIR/attempt.json`` first."""
    from .train import Trainer

    attempt = _start_attempt(pathlib.Path(settings.out))

    def report_epoch(record):
        board.report.remote(name, epoch=record["epoch"], valid_ll=record["valid_ll"])

    trainer = Trainer(settings, on_epoch=[report_epoch]).prepare()
    board.report.remote(name, state="running", epoch=trainer.epoch, epochs=trainer.settings.epochs, **attempt)
    return trainer.run()


def distributed_train_task(settings, argv, name, board, processes, poll=5.0):
    """One run on ``processes`` processes, in a Ray worker that holds as many GPUs: ``torchrun
    --standalone --nproc_per_node P -m pyro_iwem train ARGV`` as its child (one run on several
    processes, docs/scaling.md; each process takes the GPU of its local rank among those Ray gave
    the worker, ``CUDA_VISIBLE_DEVICES``), reporting the checkpoint's epoch to ``board`` every
    ``poll`` seconds; returns the run's metrics. The child dies with the worker (a retried attempt
    resumes from the checkpoint); a run that fails by itself raises a :class:`RunError` with the
    end of its error output."""
    run_dir = pathlib.Path(settings.out)
    attempt = _start_attempt(run_dir)
    board.report.remote(name, state="running", epoch=epoch_of(run_dir / CHECKPOINT) or 0,
                        epochs=settings.epochs, processes=processes, **attempt)  # fmt: skip
    command = pyro_iwem_command(argv, processes)
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, preexec_fn=_end_with_parent)
        seen = None  # the checkpoint's mtime last read: a new epoch rewrites it
        while child.poll() is None:
            time.sleep(poll)
            stamp = _mtime(run_dir / CHECKPOINT)
            if stamp != seen:
                seen = stamp
                board.report.remote(name, epoch=epoch_of(run_dir / CHECKPOINT) or 0)
        if child.returncode:
            errors.seek(0)
            tail = " ".join(errors.read().decode(errors="replace").split()[-120:])
            raise RunError(f"{shlex.join(command)} exited with {child.returncode}: ... {tail}")
    return read_json(run_dir / METRICS)


def _mtime(path):
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _end_with_parent():
    """In a child, before it runs: a SIGTERM when its parent (the Ray worker) dies (Linux), which
    torchrun passes on to its processes."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Sweep:
    """A sweep's runs on Ray: submits the unfinished ones, follows them, reports.

    :param runs: the configurations (:func:`sweep_runs`).
    :param sweep_dir: the directory of the run directories (shared by every node of a cluster).
    :param extra_argv: ``train`` options for every run; ``--quiet`` is added, and
        ``--threads`` from ``cpus_per_run`` unless given.
    :param address: a Ray cluster's address, or ``None`` to start Ray on this machine.
    :param float cpus_per_run: CPUs reserved per run (also its torch threads).
    :param float gpus_per_run: GPUs per run: a fraction (at most 1) lets runs share a GPU; a whole
        number P > 1 makes each run one run on P processes, one GPU each, under ``torchrun``
        (:func:`distributed_train_task`); another number above 1 is refused.
    :param int max_retries: retries of a run whose worker died.
    :param float interval: seconds between summaries while nothing finishes.
    :param str metric: the metric of the final table.
    """

    def __init__(
        self,
        runs,
        sweep_dir,
        extra_argv=(),
        address=None,
        cpus_per_run=1.0,
        gpus_per_run=0.0,
        max_retries=3,
        interval=30.0,
        metric="test_ll",
        out=None,
    ):
        self.runs = runs
        self.sweep_dir = pathlib.Path(os.path.abspath(sweep_dir))  # absolute, without ".." in it
        self.names = [run_name(**run) for run in runs]
        self.extra_argv = list(extra_argv)
        self.processes = processes_per_run(gpus_per_run)
        if "--threads" not in self.extra_argv:  # the run's CPUs shared by its processes
            self.extra_argv += ["--threads", str(max(1, int(cpus_per_run) // self.processes))]
        if "--quiet" not in self.extra_argv:
            self.extra_argv.append("--quiet")
        self.address = address
        self.cpus_per_run = cpus_per_run
        self.gpus_per_run = gpus_per_run
        self.max_retries = max_retries
        self.interval = interval
        self.metric = metric
        self.out = out or sys.stdout
        self.metrics = {}  # name -> metrics of the finished runs
        self.failed = {}  # name -> reason
        self.attempts = {}  # name -> the attempt last seen on the board

    def print(self, message):
        print(message, file=self.out, flush=True)

    def argv(self, run, name):
        return train_argv(run, self.sweep_dir / name, self.extra_argv)

    def command(self, run, name):
        """The shell command that trains one run by itself, as its task does."""
        return train_command(run, self.sweep_dir / name, self.extra_argv, self.processes)

    # --- running ------------------------------------------------------------------------
    def run(self, fail_fast=False):
        """Run every unfinished configuration; returns the number of failed runs."""
        todo = []
        for i, (run, name) in enumerate(zip(self.runs, self.names), 1):
            metrics_path = self.sweep_dir / name / METRICS
            if metrics_path.is_file():
                self.metrics[name] = read_json(metrics_path)
                self.print(f"[{i}/{len(self.runs)}] skip (finished): {self.sweep_dir / name}")
            else:
                todo.append((run, name))
        if todo:
            ray = import_ray(self.address)
            started_here = not ray.is_initialized()
            if started_here:
                self._init(ray)
            try:
                self._check_resources(ray)
                self._follow(ray, todo, fail_fast)
            finally:
                if started_here:
                    ray.shutdown()
        self.write_table()
        if self.failed:
            self.print(f"{len(self.failed)} run(s) failed: " + ", ".join(self.failed))
        return len(self.failed)

    def _init(self, ray):
        # "local": a new Ray instance for this sweep, even where `ray start` left one running
        where = {"address": self.address} if self.address else {"address": "local", "include_dashboard": False}
        ray.init(**where, logging_level=logging.WARNING, configure_logging=True)
        cpus = ray.cluster_resources().get("CPU", 0)
        self.print(f"Ray: {'cluster at ' + self.address if self.address else 'this machine'}, {cpus:g} CPUs, "
                   f"{ray.cluster_resources().get('GPU', 0):g} GPUs; {self.cpus_per_run:g} CPUs and "
                   f"{self.gpus_per_run:g} GPUs per run")  # fmt: skip

    def _check_resources(self, ray):
        total = ray.cluster_resources()
        for flag, need, kind in (("--cpus-per-run", self.cpus_per_run, "CPU"), ("--gpus-per-run", self.gpus_per_run, "GPU")):
            if need > total.get(kind, 0):
                message = f"{flag} {need:g} exceeds the {total.get(kind, 0):g} {kind}s of the Ray cluster"
                if not self.address:  # nothing will ever join this machine's Ray
                    raise RunError(message + " on this machine")
                self.print(f"warning: {message} now; the runs wait for nodes to join")

    def _follow(self, ray, todo, fail_fast):
        board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        task = ray.remote(
            num_cpus=self.cpus_per_run,
            num_gpus=self.gpus_per_run,
            max_retries=self.max_retries,
            retry_exceptions=False,
            max_calls=1,  # a fresh process per run: no state carried between runs
        )(train_task if self.processes == 1 else distributed_train_task)
        settings = {name: train_config(self.argv(run, name)) for run, name in todo}  # all checked before any runs
        pending = {}
        for run, name in todo:
            self.print(f"submit {name}: {shlex.join(self.command(run, name))}")
            args = (settings[name], name, board) if self.processes == 1 else (
                settings[name], self.argv(run, name), name, board, self.processes)  # fmt: skip
            pending[task.options(name=name).remote(*args)] = name
        last_summary = 0.0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.interval)
                for ref in ready:
                    self._collect(ray, ref, pending.pop(ref))
                if fail_fast and self.failed:
                    self.print("--fail-fast: cancelling the other runs")
                    break
                if ready or time.monotonic() - last_summary >= self.interval:
                    self.summary(ray.get(board.state.remote()), pending.values())
                    last_summary = time.monotonic()
        except KeyboardInterrupt:
            self.print("interrupted: cancelling the runs; the same command continues them from their checkpoints")
            raise
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def _collect(self, ray, ref, name):
        try:
            metrics = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the run's own error: not retried
            cause = e.cause if getattr(e, "cause", None) is not None else e
            self.failed[name] = f"{type(cause).__name__}: {' '.join(str(cause).split())}"
            self.print(f"failed {name}: {self.failed[name]}")
        except ray.exceptions.RayError as e:  # the worker or node died on every attempt
            self.failed[name] = f"{type(e).__name__} after {self.max_retries + 1} attempts"
            self.print(f"failed {name}: its worker died on every attempt ({type(e).__name__})")
        else:
            self.metrics[name] = metrics
            self.print(f"done {name}: test LL {metrics['test_ll']:.3f} (best epoch {metrics['best_epoch']}/{metrics['epochs']})")

    def summary(self, board, pending_names):
        """Print the counts and one line per running run; notes retried runs."""
        pending_names = set(pending_names)
        running = {name: board[name] for name in pending_names if board.get(name, {}).get("state") == "running"}
        for name, info in running.items():
            if info["attempt"] > self.attempts.get(name, 1):  # its worker died; a new attempt resumed
                self.print(f"retry {name}: attempt {info['attempt']} continues from epoch {info.get('epoch', 0)}")
            self.attempts[name] = info["attempt"]
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        self.print(
            f"[{stamp}] {len(self.metrics)} done, {len(running)} running, "
            f"{len(pending_names) - len(running)} pending, {len(self.failed)} failed"
        )
        for name, info in sorted(running.items()):
            attempt = f", attempt {info['attempt']}" if info["attempt"] > 1 else ""
            self.print(f"    {name}: epoch {info.get('epoch', 0)}/{info.get('epochs', '?')} on {info['host']}{attempt}")

    # --- the end ------------------------------------------------------------------------
    def write_table(self):
        """Print the table of the sweep's finished runs and write it to ``SWEEP_DIR/table.md``
        (when this machine sees that directory: a Ray client's cluster may keep it alone)."""
        finished = [self.metrics[name] for name in self.names if name in self.metrics]
        if not finished:
            return
        table = format_table(finished, metric=self.metric)
        self.print(table)
        if self.sweep_dir.is_dir():
            with atomic_path(self.sweep_dir / TABLE) as tmp:
                pathlib.Path(tmp).write_text(table + "\n")
            self.print(f"(table written to {self.sweep_dir / TABLE})")


def run_sweep(runs, sweep_dir, extra_argv=(), dry_run=False, fail_fast=False, **options):
    """Run every unfinished configuration of ``runs`` below ``sweep_dir`` on Ray (``options``:
    those of :class:`Sweep`), then write and print the table; with ``dry_run`` print each
    run's ``train`` command instead. Returns the number of failed runs."""
    sweep = Sweep(runs, sweep_dir, extra_argv, **options)
    if dry_run:
        for i, (run, name) in enumerate(zip(runs, sweep.names), 1):
            sweep.print(f"[{i}/{len(runs)}] {shlex.join(sweep.command(run, name))}")
        return 0
    return sweep.run(fail_fast)
