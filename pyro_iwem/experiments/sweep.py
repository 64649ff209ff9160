"""Grids of runs: every configuration is a ``pyro-iwem train`` subprocess in its own run
directory; finished runs are skipped and interrupted ones resumed, so a sweep can simply be
started again after an interruption."""

import itertools
import pathlib
import shlex
import subprocess
import sys

from .checkpoint import METRICS, atomic_path
from .setup import USES_J, run_name
from .table import table_of_paths

TABLE = "table.md"


def sweep_runs(datasets, models, methods, seeds, K_grid, J_grid):
    """The configurations of a sweep as dicts, in a stable order. Methods that do not use
    J (VAE, IWAE, STL, DReG) run only with the first J of ``J_grid``."""
    runs = []
    for dataset, model, method, K in itertools.product(datasets, models, methods, K_grid):
        for J in J_grid if method in USES_J else J_grid[:1]:
            for seed in seeds:
                runs.append({"dataset": dataset, "model": model, "method": method, "K": K, "J": J, "seed": seed})
    return runs


def train_command(run, run_dir, extra_argv=()):
    """The ``train`` command line of one run (always with ``--resume``: it starts fresh
    when there is no checkpoint yet)."""
    return [
        sys.executable,
        "-m",
        "pyro_iwem",
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


def run_sweep(runs, sweep_dir, extra_argv=(), dry_run=False, fail_fast=False, out=None, metric="test_ll"):
    """Run every unfinished configuration of ``runs`` below ``sweep_dir``, then write and
    print the table. Returns the number of failed runs."""
    sweep_dir = pathlib.Path(sweep_dir)
    out = out or sys.stdout
    failed = []
    for i, run in enumerate(runs, 1):
        run_dir = sweep_dir / run_name(**run)
        prefix = f"[{i}/{len(runs)}]"
        if (run_dir / METRICS).is_file():
            print(f"{prefix} skip (finished): {run_dir}", file=out, flush=True)
            continue
        cmd = train_command(run, run_dir, extra_argv)
        print(f"{prefix} {shlex.join(cmd)}", file=out, flush=True)
        if dry_run:
            continue
        code = subprocess.run(cmd, check=False).returncode
        if code in (130, -2):  # the child was interrupted with the sweep: stop here
            raise KeyboardInterrupt
        if code != 0:
            failed.append(run_dir)
            print(f"{prefix} failed with exit status {code}: {run_dir}", file=out, flush=True)
            if fail_fast:
                break
    if dry_run:
        return 0
    if any(sweep_dir.rglob(METRICS)):
        table = table_of_paths([sweep_dir], metric=metric)
        with atomic_path(sweep_dir / TABLE) as tmp:
            pathlib.Path(tmp).write_text(table + "\n")
        print(table, file=out)
        print(f"(table written to {sweep_dir / TABLE})", file=out)
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(map(str, failed)), file=out)
    return len(failed)
