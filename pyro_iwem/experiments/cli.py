"""The ``pyro-iwem`` command line (also ``python -m pyro_iwem``): :func:`main` runs the command
that :func:`~.options.build_parser` parsed (:data:`COMMANDS`).

Subcommands: ``train``, ``evaluate``, ``table``, ``figures``, ``sweep`` and ``impute``; their
options are declared in :mod:`.options`. Bad arguments, a missing or corrupt data file and a
run directory in the way are reported as one line on stderr with exit status 2.
"""

import os
import pathlib
import sys

from pyro_iwem.data import DataFileError

from .errors import RunError
from .options import PROG, TrainConfig, build_parser, forwarded_argv


# --- commands -----------------------------------------------------------------------------
def cmd_train(args):
    from .train import Trainer, summary_line

    from .world import World

    world = World.from_env(args.device)  # several processes under torchrun (WORLD_SIZE)
    try:
        trainer = Trainer(TrainConfig.from_namespace(args), world=world).prepare()
        metrics = trainer.run()
    finally:
        world.close()
    if world.main:
        print(summary_line(metrics, trainer.run_dir), flush=True)
    return 0


def cmd_evaluate(args):
    from .evaluate import evaluate_run, gib

    result = evaluate_run(
        args.run_dir, args.K, args.data_root, args.device, args.batch_size, args.seed, args.threads, args.all_test,
        refit_steps=args.refit_encoder, refit_K=args.refit_K, refit_lr=args.refit_lr, progress=True,
        inflation=args.score_inflation, memory_budget=gib(args.memory),
    )
    where = f"recorded in metrics.json as {result.key}" if result.metrics is not None else "no metrics.json to record it in"
    scored = f", proposal variance x {result.inflation:g}" if result.inflation != 1 else ""
    print(f"{args.run_dir}: test LL {result.test_ll:.3f} nats (K={args.K}{scored}, {result.seconds:.1f} s; {where})", flush=True)
    if result.refit is not None:
        r = result.refit
        print(
            f"{args.run_dir}: test LL {result.refit_ll:.3f} nats with a refitted encoder (K={args.K}; encoder: "
            f"{r['steps']} IWAE steps, K={r['num_particles']}, lr {r['lr']:g}, batch {r['batch_size']}, "
            f"train bound {r['train_bound']:.3f}, {r['refit_seconds']:.1f} s; "
            + (f"recorded in metrics.json as {r['key']})" if result.metrics is not None else f"{r['key']}; {where})"),
            flush=True,
        )
    return 0


def cmd_table(args):
    from .checkpoint import atomic_path
    from .table import table_of_paths

    table = table_of_paths(args.paths, metric=args.metric, fmt=args.format, against=args.against, paper=args.paper)
    print(table)
    if args.curves:
        from .table import save_curves_of_paths

        save_curves_of_paths(args.paths, args.curves)
    if args.output:
        with atomic_path(args.output) as tmp:
            pathlib.Path(tmp).write_text(table + "\n")
    return 0


def cmd_figures(args):
    import torch

    from .figures import make_figures

    if args.threads:
        torch.set_num_threads(args.threads)
    written = make_figures(
        args.paths, args.out, args.figures, args.num_data, args.repeats, args.device, args.data_root
    )
    for number, png in written.items():
        print(f"Figure {number}: {png} (numbers in {png.with_suffix('.json').name})", flush=True)
    return 0


def cmd_sweep(args):
    from .sweep import run_sweep, sweep_runs

    runs = sweep_runs(
        args.datasets, args.models, args.methods, args.seeds, args.K_grid or [args.K], args.J_grid or [args.J]
    )
    failed = run_sweep(
        runs,
        args.out,
        forwarded_argv(args),
        dry_run=args.dry_run,
        fail_fast=args.fail_fast,
        metric=args.metric,
        address=args.address,
        cpus_per_run=args.cpus_per_run,
        gpus_per_run=args.gpus_per_run,
        max_retries=args.max_retries,
        interval=args.interval,
    )
    return 1 if failed else 0


def cmd_impute(args):
    from .impute import ImputeRun, metrics_text, summary_line

    run = ImputeRun(args)
    try:
        run.prepare()
    except ValueError as e:  # an unusable table (TableFormatError) or bad model settings
        raise RunError(str(e)) from None
    metrics = run.run()
    print(metrics_text(metrics))
    print(summary_line(metrics, run.run_dir), flush=True)
    return 0


#: The function of each subcommand: ``f(args)`` with its parsed arguments; returns the exit status.
COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "table": cmd_table,
    "figures": cmd_figures,
    "sweep": cmd_sweep,
    "impute": cmd_impute,
}


def _one_line(text):
    return " ".join(str(text).split())


#: The option naming where each command writes, for the advice on an unwritable path.
OUTPUT_OPTION = {"table": "--output", "figures": "--out", "train": "--out", "sweep": "--out", "impute": "--out"}


def _os_error_line(error, command):
    """One line for an ``OSError`` that names a file: for a file that could not be written, its
    directory (an atomic write's temporary file stands for it) and what to do; else the file
    and the system's reason."""
    import errno

    from .checkpoint import unwritable

    path = pathlib.Path(error.filename)
    if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return f"{path}: {error.strerror or error}"
    if path.name.startswith(".") and path.name.endswith(".tmp"):
        path = path.parent
    return str(unwritable(path, error, OUTPUT_OPTION.get(command, "another path")))


def main(argv=None):
    """Run the command line; returns the exit status (0 ok, 1 failed runs or a diverged
    training, 2 bad arguments or data, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line argument error (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    prog = f"{PROG} {args.command}"
    try:
        return COMMANDS[args.command](args)
    except RunError as e:
        if getattr(e, "echo", True):  # not an echo of another process's error (its process reports it)
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except DataFileError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = {"train": "; continue with --resume", "sweep": "; the same command continues it"}.get(args.command, "")
        if args.command == "evaluate" and args.refit_encoder:
            hint = "; the same command continues the encoder's refit from its last saved state"
        print(f"{prog}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader went away (`pyro-iwem table ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except OSError as e:  # e.g. a read-only output directory
        if e.filename is None:
            raise
        print(f"{prog}: error: {_one_line(_os_error_line(e, args.command))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
