"""The command line's options: the parser of every subcommand, and :class:`TrainConfig`.

This is the one place options are declared; :mod:`.cli` only dispatches the parsed arguments
to the commands. To add an option:

* to ``train`` (and so to every run of ``sweep``): an entry ``(flag, argparse kwargs)`` in
  :data:`FORWARDED_OPTIONS`, with no ``default`` (``None`` lets ``--resume`` tell an omitted
  option from a given one); a field of the same name in :class:`TrainConfig`; its default in
  :data:`~.setup.TRAIN_DEFAULTS`; and, if runs that differ in it are different runs (a resumed
  run must agree with its checkpoint), its key in :data:`~.setup.CONFIG_KEYS`, with what it
  meant for the runs made before it in :data:`~.setup.LEGACY_CONFIG`. A ``train`` option that
  ``sweep`` should not forward goes in :func:`add_train_parser` instead (still a field of
  :class:`TrainConfig`);
* to another command: an ``add_argument`` in its ``add_<command>_parser``;
* a new command: an ``add_<command>_parser`` called by :func:`build_parser`, and its function
  in :data:`.cli.COMMANDS`.
"""

import argparse
import dataclasses
import math

from pyro_iwem.infer import METHODS
from pyro_iwem.models.layers import SCALE_LINKS

from .figures import DEFAULT_NUM_DATA, DEFAULT_REPEATS, FIGURES
from .impute import IMPUTE_DEFAULTS, IMPUTE_METHODS, TABLE_DATASETS
from .setup import ALL_METHOD_ORDER, DATASETS, MLP_MODELS, MODELS, PROTOCOLS, TRAIN_DEFAULTS

PROG = "pyro-iwem"


class ArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- argument types -----------------------------------------------------------------------
def _number(convert, noun, lowest, strict=False):
    """An argparse type: ``convert(text)``, finite and >= ``lowest`` (> with ``strict``)."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not (value > lowest if strict else value >= lowest) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text}")
        return value

    return parse


positive_int = _number(int, "a positive integer", 1)
nonneg_int = _number(int, "a non-negative integer", 0)
positive_float = _number(float, "a positive finite number", 0.0, strict=True)
nonneg_float = _number(float, "a non-negative finite number", 0.0)
finite_float = _number(float, "a finite number", -math.inf, strict=True)


def unit_float(text):
    """An argparse type: a number ``0 <= value <= 1``."""
    value = nonneg_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return value


def list_of(item_type):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return [item_type(t) for t in items]

    parse.__name__ = f"list of {item_type.__name__}"
    return parse


def one_of(choices, what):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r} (choose from {', '.join(choices)})")
        return text

    parse.__name__ = what
    return parse


# --- options ------------------------------------------------------------------------------
def _default(key):
    value = TRAIN_DEFAULTS[key]
    return "all" if value is None else value


#: ``train`` options that ``sweep`` passes on to every run unchanged: ``(flag, argparse kwargs)``.
FORWARDED_OPTIONS = (
    ("--protocol", {"type": one_of(PROTOCOLS, "protocol"), "help": "the settings the options below default to: "
                    "paper (default), the paper's (§5); official, the authors' code's: --lr 3e-4, --valid-K the training K, "
                    "--score-inflation 1.5, and for the IWEM methods --proposal-inflation 1.5, --p-step-inflation "
                    "1.5 (1 for iwem-woo), --log-p-offset (latent dims / 2) log 2π; for the MLP models "
                    "--encoder-scale exp. Options given explicitly override it (docs/protocols.md)"}),
    ("--proposal-inflation", {"type": positive_float, "metavar": "C", "help": "IWEM methods: draw the E-step's K "
                              "importance samples from the guide with its variance multiplied by C (not the L "
                              "samples of the annealing term) (default 1; official 1.5)"}),
    ("--p-step-inflation", {"type": positive_float, "metavar": "C", "help": "IWEM methods: the same for the P-step's "
                            "J samples (default: --proposal-inflation; official: 1.5, and 1 for iwem-woo)"}),
    ("--score-inflation", {"type": positive_float, "metavar": "C", "help": "score validation and test (the IWAE "
                           "bounds of --valid-K and --eval-K samples) with the proposal's variance multiplied by C, "
                           "for every method (default 1; official 1.5)"}),
    ("--log-p-offset", {"type": finite_float, "metavar": "C", "help": "IWEM's optimal P-step fits the proposal to "
                        "abs(log p + C) p (default 0, eq. 7; official: (latent dims / 2) log 2π = 36.76 for a 40-d "
                        "latent, the Gaussian normalising constants the authors' abs(log p) leaves out)"}),
    ("--encoder-scale", {"type": one_of(SCALE_LINKS, "encoder scale"), "help": "the encoder scale of the "
                         f"MLP models ({', '.join(MLP_MODELS)}): softplus, softplus(.) + 1e-4 (default); exp, "
                         "exp(logvar / 2) of a linear logvar, unclamped (official). The CNN's is exp(logvar / 2) "
                         "with logvar clamped to [-6, 2] in both protocols"}),
    ("--epochs", {"type": positive_int, "help": f"maximum number of epochs (default {_default('epochs')})"}),
    ("--batch-size", {"type": positive_int, "help": f"training batch size (default {_default('batch_size')})"}),
    ("--lr", {"type": positive_float, "help": f"Adam learning rate (default {_default('lr')})"}),
    ("--anneal-increment", {"type": positive_float, "help": "increase of IWEM's α after each epoch, from 0 to 1 "
                                f"(default {_default('anneal_increment')}, the paper's)"}),
    ("--L", {"type": positive_int, "help": "iwem, iwem-woo, miss-iwem: ELBO samples of the annealed E-step, eq. (8) "
             f"(default {_default('L')}, the paper's; iwem-one-pass averages its K particles)"}),
    ("--anneal-start", {"type": unit_float, "metavar": "ALPHA", "help": "IWEM's α in the first epoch (default "
                        f"{_default('anneal_start')}, the paper's; 1: no annealing, e.g. to run iwem-one-pass as the "
                        "woa variants run)"}),
    ("--patience", {"type": positive_int, "help": "stop after this many epochs without a validation gain, "
                        f"not counting epochs with α < 1 (default {_default('patience')})"}),
    ("--valid-K", {"type": positive_int, "help": f"samples of the validation IWAE bound (default {_default('valid_K')}; "
                   "official: --K)"}),
    ("--eval-K", {"type": positive_int, "help": f"samples of the test IWAE bound (default {_default('eval_K')})"}),
    ("--eval-batch-size", {"type": positive_int, "help": f"batch size of validation and test (default {_default('eval_batch_size')})"}),
    ("--eval-memory", {"type": positive_float, "metavar": "GIB", "help": "memory a chunk of the validation and test "
                       "bounds' particles may hold at its peak: chunks hold 500 particles, or fewer where that is more "
                       f"(default {_default('eval_memory')} GiB)"}),
    ("--max-train", {"type": positive_int, "help": "use only the first N training images (default all)"}),
    ("--max-eval", {"type": positive_int, "help": "use only N validation and N test images, "
                   "drawn at random (seeded by --data-seed; recorded in the run) (default all)"}),
    ("--missing-patches", {"type": nonneg_int, "metavar": "N", "help": "remove N of the 3x3 patches of every training "
                               "image at random (fixed per image, seeded by --data-seed), for the methods "
                               "miss-iwae, miss-iwem-woa and miss-iwem; validation and test images stay complete (default 0)"}),
    ("--data-seed", {"type": nonneg_int, "help": "seed of the data's fixed random choices, e.g. the one-off "
                         f"binarisation of dynamic MNIST's test set (default {_default('data_seed')})"}),
    ("--data-root", {"metavar": "DIR", "help": "data directory (default: $PYRO_IWEM_DATA, else shared/data nearby)"}),
    ("--record-variance", {"type": nonneg_int, "metavar": "N", "help": "after every epoch, record the variance of "
                               "the E-step estimate (eq. 2) and of the ELBO's (eq. 3) over --variance-repeats importance "
                               "samplings of K particles, averaged over the first N training images, in the history "
                               "and metrics.json (for `figures`; costs N x repeats x K particles without gradients per "
                               "epoch; training is unchanged) (default 0: off)"}),
    ("--variance-repeats", {"type": _number(int, "an integer >= 2", 2), "metavar": "R",
                            "help": f"importance samplings per datum of --record-variance (default {_default('variance_repeats')}, the paper's)"}),
    ("--device", {"choices": ("auto", "cpu", "cuda"), "help": "auto: cuda when available (default auto)"}),
    ("--threads", {"type": positive_int, "help": "torch intra-op threads (default: torch's)"}),
    ("--quiet", {"action": "store_true", "default": False, "help": "no progress bars and per-epoch lines"}),
    ("--tensorboard", {"action": "store_true", "default": False, "help": "also write the per-epoch metrics (loss, α, "
                           "ESS, bound, validation LL, variances when recorded) and the test LL as TensorBoard scalars "
                           "in RUN_DIR/tensorboard (needs pip install 'pyro-iwem[tensorboard]'; view with "
                           "`tensorboard --logdir RUN_DIR`, or a sweep's directory to compare its runs)"}),
)


def _add(parser, flag, kwargs):
    kwargs = dict(kwargs)
    if kwargs.get("action") is None:
        kwargs.setdefault("default", None)
    parser.add_argument(flag, **kwargs)


def add_train_parser(subparsers):
    p = subparsers.add_parser(
        "train",
        help="train one model with one method, then evaluate it",
        description="Train a model on a binary image data set with one inference method "
        "(the paper's protocol, §5: Adam, batch 100, α +0.01 per epoch, early stopping; or, with "
        "--protocol official, the authors' code's), checkpointing every epoch; then the test "
        "log-likelihood (IWAE bound, --eval-K samples) of the best-validation parameters, "
        "metrics.json, samples.png and curve.png in --out. Omitted options take the checkpoint's "
        "values with --resume.",
    )
    p.add_argument("--dataset", type=one_of(DATASETS, "dataset"), help=f"one of {', '.join(DATASETS)} (required)")
    p.add_argument("--model", type=one_of(MODELS, "model"), help=f"one of {', '.join(MODELS)} (default mlp)")
    p.add_argument("--method", type=one_of(tuple(METHODS), "method"), help=f"one of {', '.join(ALL_METHOD_ORDER)} (default iwem)")
    p.add_argument("--K", type=positive_int, help="importance samples (E-step, or the bound's) (default 50)")
    p.add_argument("--J", type=positive_int, help="P-step samples (IWEM variants, IWAE-EM) (default 50)")
    p.add_argument("--seed", type=nonneg_int, help="seed of initialisation, batches and sampling (default 1234)")
    for flag, kwargs in FORWARDED_OPTIONS:
        _add(p, flag, kwargs)
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory; locked while the run uses it, so a second train on it stops at once")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt (start fresh if none)")
    p.add_argument("--force", action="store_true", help="overwrite a run already in RUN_DIR")


def add_evaluate_parser(subparsers):
    p = subparsers.add_parser(
        "evaluate",
        help="recompute the test log-likelihood of a run's best parameters",
        description="Reload RUN_DIR/best.pt, recompute the test log-likelihood (IWAE bound with "
        "--K samples, seeded with the run's seed) and record it as test_ll_K<K> in metrics.json; "
        "with --refit-encoder, also the same bound with a fresh encoder fitted to the frozen decoder, "
        "a score that does not depend on the proposal the method trained.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--K", type=positive_int, default=5000, help="samples of the IWAE bound (default 5000)")
    p.add_argument("--data-root", metavar="DIR", help="data directory (default: the run's, $PYRO_IWEM_DATA, ...)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=positive_int, help="test batch size (default: the run's)")
    p.add_argument("--memory", type=positive_float, default=TRAIN_DEFAULTS["eval_memory"], metavar="GIB",
                   help="memory a chunk of the bound's particles may hold at its peak: chunks hold 500 particles, "
                   f"or fewer where that is more (default {TRAIN_DEFAULTS['eval_memory']} GiB)")
    p.add_argument("--seed", type=nonneg_int, help="seed of the samples (default: the run's)")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--all-test", action="store_true",
                   help="use the whole test split even if the run used --max-eval; recorded as test_ll_all_K<K>")
    p.add_argument("--refit-encoder", type=positive_int, metavar="STEPS",
                   help="also score the decoder with a fresh encoder fitted to it: the encoder re-initialised "
                   "(seeded by --seed), STEPS Adam steps of IWAE on the run's training images and batch size "
                   "with the decoder frozen, then the same K-sample bound; recorded as test_ll_refit<STEPS>_K<K> "
                   "beside the plain score (a proposal-independent comparison of methods). The fit is saved "
                   "in RUN_DIR every 500 steps: an interrupted one resumes, a finished one is reused")
    p.add_argument("--refit-K", type=positive_int, default=50, help="particles of the refit's IWAE loss (default 50)")
    p.add_argument("--refit-lr", type=positive_float, help="Adam learning rate of the refit (default: the run's)")
    p.add_argument("--score-inflation", type=positive_float, metavar="C",
                   help="draw the bound's samples from the proposal with its variance multiplied by C (default: "
                   "the run's --score-inflation, 1 for the paper's protocol, 1.5 for the official one); a C other "
                   "than 1 is recorded under its own key, test_ll_inflated<C>_K<K>, beside the plain test_ll_K<K>")


def add_table_parser(subparsers):
    p = subparsers.add_parser(
        "table",
        help="tabulate finished runs (Table 1 style)",
        description="Read metrics.json of the given run directories (parent directories are "
        "searched recursively) and print mean ± std (n) over seeds: rows methods in the paper's "
        "order, split by every setting the runs differ in (K, J, L, --epochs, --patience, ...), "
        "columns data sets (and models); a run found twice (same settings and seed) counts once; "
        "then the mean wall-clock time per run.",
    )
    p.add_argument("paths", nargs="+", metavar="RUN_DIR")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    p.add_argument("--metric", default="test_ll", help="a numeric key of metrics.json (default test_ll)")
    p.add_argument("--output", metavar="FILE", help="also write the table to FILE")
    p.add_argument("--curves", metavar="PNG", help="also plot each method's validation curve (mean over runs)")
    p.add_argument("--against", metavar="METHOD", help="also tabulate each method's difference to METHOD's runs "
                   "(e.g. iwem) with its standard error, from the seed deviation pooled over the column's methods")
    p.add_argument("--paper", action="store_true",
                   help="put the paper's Table 1 beside each column (its MLP and CNN columns; columns name their model)")


def figure_numbers(text):
    """A ``--figures`` list: numbers among :data:`~pyro_iwem.experiments.figures.FIGURES`."""
    numbers = list_of(one_of(tuple(map(str, FIGURES)), "figure"))(text)
    return sorted({int(n) for n in numbers})


def add_figures_parser(subparsers):
    p = subparsers.add_parser(
        "figures",
        help="the variance figures of the paper (Figures 1, 2 and 4) from training runs",
        description="Draw, as PNG plus a JSON of the numbers in --out: Figure 1, the variance of the "
        "E-step estimate (eq. 2; and of the ELBO's estimate, eq. 3) per epoch that `train "
        "--record-variance N` recorded, one line per method (mean over seeds, range as a band); "
        "Figure 2, box plots over the first N training images of the per-datum variances of (2) and "
        "(3) at each run's best parameters (best.pt); Figure 4, the same variance of (9) with α = 1 "
        "for the missing-data runs, one box per number of missing patches. Parent directories are "
        "searched recursively for runs (checkpoint.pt).",
    )
    p.add_argument("paths", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="directory of the PNG and JSON files")
    p.add_argument("--figures", type=figure_numbers, metavar="1,2,4",
                   help="which figures (default: 1 and 2, and 4 when missing-data runs are given)")
    p.add_argument("--num-data", type=positive_int, metavar="N",
                   help=f"training images of Figures 2 and 4 (default: the run's --record-variance, else {DEFAULT_NUM_DATA})")
    p.add_argument("--repeats", type=_number(int, "an integer >= 2", 2), metavar="R",
                   help=f"importance samplings per datum (default: the run's --variance-repeats, else {DEFAULT_REPEATS})")
    p.add_argument("--data-root", metavar="DIR", help="data directory (default: the run's, $PYRO_IWEM_DATA, ...)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's)")


def add_sweep_parser(subparsers):
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of trainings on Ray (this machine or a cluster), then tabulate",
        description="Run every combination of --datasets, --models, --methods, --K-grid, "
        "--J-grid and --seeds as one Ray task each, doing `pyro-iwem train ... --out "
        "SWEEP_DIR/<dataset>-<model>-<method>-K<K>-J<J>-s<seed> --resume`: on this machine "
        "(Ray started for the sweep) or on the cluster at --address. Finished runs "
        "(metrics.json exists) are skipped and interrupted ones resume from their checkpoint; a "
        "run whose worker dies is retried from its checkpoint, one that fails by itself is "
        "reported once. A summary of the runs is printed as they go, and SWEEP_DIR/table.md at "
        "the end. Methods without J (vae, iwae, stl, dreg) run with the first J only. Needs "
        "pip install 'pyro-iwem[ray]'.",
    )
    p.add_argument("--methods", type=list_of(one_of(tuple(METHODS), "method")), required=True, help="e.g. iwae,iwem")
    p.add_argument("--datasets", type=list_of(one_of(DATASETS, "dataset")), required=True, help="e.g. static-mnist")
    p.add_argument("--models", type=list_of(one_of(MODELS, "model")), default=["mlp"], help="(default mlp)")
    p.add_argument("--seeds", type=list_of(nonneg_int), default=[1234], help="e.g. 1,2,3 (default 1234)")
    p.add_argument("--K-grid", type=list_of(positive_int), help="e.g. 1,5,10,20,50,70 (default: --K)")
    p.add_argument("--J-grid", type=list_of(positive_int), help="(default: --J)")
    p.add_argument("--K", type=positive_int, default=50, help="K when there is no --K-grid (default 50)")
    p.add_argument("--J", type=positive_int, default=50, help="J when there is no --J-grid (default 50)")
    for flag, kwargs in FORWARDED_OPTIONS:
        _add(p, flag, kwargs)
    p.add_argument("--out", "--storage", dest="out", required=True, metavar="SWEEP_DIR",
                   help="the directory of the run directories; on a cluster, a path that every node reaches (a shared file system)")
    p.add_argument("--address", help="a Ray cluster to send the runs to: auto (the cluster this machine belongs to), "
                   "HOST:PORT, or ray://HOST:PORT (Ray Client); default: start Ray on this machine for the sweep")
    p.add_argument("--cpus-per-run", type=positive_float, default=1.0,
                   help="CPUs reserved per run, also its torch threads unless --threads is given (default 1)")
    p.add_argument("--gpus-per-run", type=nonneg_float, default=0.0,
                   help="GPUs per run; a fraction lets runs share a GPU, e.g. 0.25 puts four MLP runs on one; a whole number P "
                   "> 1 trains each run on P processes, one GPU each, under torchrun (docs/scaling.md) (default 0)")
    p.add_argument("--max-retries", type=nonneg_int, default=3,
                   help="retries of a run whose worker or node died; each continues from the run's checkpoint (default 3)")
    p.add_argument("--interval", type=positive_float, default=30.0,
                   help="seconds between progress summaries while no run finishes (default 30)")
    p.add_argument("--metric", default="test_ll", help="the metric of the final table (default test_ll)")
    p.add_argument("--dry-run", action="store_true", help="print each run's train command, run nothing")
    p.add_argument("--fail-fast", action="store_true", help="cancel the other runs at the first failed run")


def missing_rate(text):
    """An argparse type: a probability ``0 < rate < 1``."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return value


def column(text):
    """A ``--drop-columns`` item: a negative index as an int, else the text (a header name,
    or a non-negative index that ``load_csv`` resolves when no column has that name)."""
    return int(text) if text.startswith("-") and text[1:].isdigit() else text


def separator(text):
    """An argparse type: a one-character field delimiter (``\\t`` or ``tab`` for a tab)."""
    sep = {"\\t": "\t", "tab": "\t"}.get(text, text)
    if len(sep) != 1:
        raise argparse.ArgumentTypeError(f"expected one character, got {text!r}")
    return sep


def add_impute_parser(subparsers):
    d = IMPUTE_DEFAULTS
    p = subparsers.add_parser(
        "impute",
        help="fill the missing cells of a numeric table (CSV) or of images, or score imputation (--benchmark)",
        description="Fill the gaps of a table: the cells of --csv FILE that are empty or read nan, NA, "
        "N/A, null, None or ? (any case), or a --missing-values text, are missing; a TabularVAE "
        "trained on all rows by --method (or the column means) fills exactly those, with the "
        "importance-sampled E[x_m | x_o] of --impute-K particles, and RUN_DIR/imputed.csv is FILE "
        "again with only its missing cells filled (header, dropped columns, observed cells as written, "
        "row order and rows with no observed cell kept); RUN_DIR/metrics.json reports the cells filled "
        "per column, and --multiple M also writes M draws from the importance-weighted posterior, "
        "RUN_DIR/imputed-1.csv ... imputed-M.csv. With --benchmark (always with --dataset), the MIWAE "
        "protocol (§5, Table 4) on a complete table: standardise every column, remove each entry with "
        "probability --missing-rate, fill the removed entries in as above, and write the MSE over them "
        "(standardised units) to RUN_DIR/metrics.json and the completed numeric matrix (original units, "
        "no header) to RUN_DIR/imputed.csv. With --images FILE --run TRAIN_RUN_DIR, binary images with "
        "missing pixels completed by the model of a train run (see --images).",
    )
    source = p.add_mutually_exclusive_group()  # one of them is required: ImputeRun says so
    source.add_argument("--dataset", type=one_of(TABLE_DATASETS, "dataset"), help=f"one of {', '.join(TABLE_DATASETS)}: a complete UCI table, scored by the --benchmark protocol")
    source.add_argument("--csv", metavar="FILE", help="a numeric delimited text file, one row per datum")
    source.add_argument("--images", metavar="FILE", help="a .npy array of binary images, (N, H, W) or (N, H*W), with NaN for a missing pixel, "
                        "completed by the model of --run: RUN_DIR/completed.npy (missing pixels replaced by their importance-sampled "
                        "probability of being on, E[x_m | x_o], with --impute-K particles of the run's proposal), completed.png, and "
                        "with --multiple M completed-1.npy ... completed-M.npy, binary draws from the importance-weighted posterior")
    p.add_argument("--run", metavar="TRAIN_RUN_DIR", help="--images: a train run directory (its best.pt) whose model and method complete the images")
    p.add_argument("--mask", metavar="FILE", help="--images: a .npy array of the images' shape, 1 (True) for an observed pixel and 0 for a missing one")
    p.add_argument("--sep", type=separator, default=",", help="the CSV's delimiter (default ,; \\t or tab for a tab)")
    p.add_argument("--drop-columns", type=list_of(column), metavar="A,B,3", help="CSV columns to leave out of the model, by header name or 0-based index (imputed.csv keeps them as written)")
    header = p.add_mutually_exclusive_group()
    header.add_argument("--header", dest="header", action="store_const", const=True, help="the CSV's first row is a header")
    header.add_argument("--no-header", dest="header", action="store_const", const=False,
                        help="the CSV has no header row (default: a first row without any number, and not only of missing cells, is a header)")
    p.add_argument("--missing-values", type=list_of(str), metavar="TEXT,TEXT", help="more cell texts that mean missing, e.g. -999 (compared after stripping blanks, any case)")
    p.add_argument("--multiple", type=positive_int, metavar="M", help="also write M multiple imputations, RUN_DIR/imputed-1.csv ... imputed-M.csv: each fills every missing cell with an independent draw from the importance-weighted posterior (a particle of --impute-K resampled by its normalised weight, and the model's draw of the missing entries given it), for analyses that carry the imputation's uncertainty on (trained methods only)")
    p.add_argument("--benchmark", action="store_true", help="score imputation on a complete table instead of filling gaps: remove entries at random (--missing-rate), fill them, and report the MSE against the removed values (the MIWAE protocol; implied by --dataset)")
    p.add_argument("--method", type=one_of(IMPUTE_METHODS, "method"), help=f"one of {', '.join(IMPUTE_METHODS)} (required for a table; --images use the --run's)")
    p.add_argument("--missing-rate", type=missing_rate, help=f"--benchmark: probability that an entry is removed (default {d['missing_rate']})")
    p.add_argument("--seed", type=nonneg_int, default=d["seed"], help=f"seed of initialisation, batches and sampling, and of --benchmark's mask (default {d['seed']})")
    p.add_argument("--steps", type=positive_int, default=d["steps"], help=f"training steps; IWEM's α grows by 0.01 every max(1, steps // 200) steps, reaching 1 by half of them (default {d['steps']}: about 85 s of miss-iwem, 40 s of miss-iwae on one thread)")
    p.add_argument("--K", type=positive_int, default=d["K"], help=f"importance samples of the bound or E-step (default {d['K']}, MIWAE's)")
    p.add_argument("--J", type=positive_int, default=d["J"], help=f"P-step samples of miss-iwem and miss-iwem-woa (default {d['J']})")
    p.add_argument("--batch-size", type=positive_int, default=d["batch_size"], help=f"training batch size (default {d['batch_size']})")
    p.add_argument("--lr", type=positive_float, default=d["lr"], help=f"Adam learning rate (default {d['lr']})")
    p.add_argument("--likelihood", choices=("gaussian", "studentt"), default=d["likelihood"], help=f"the decoder's distribution (default {d['likelihood']})")
    p.add_argument("--z-dim", type=positive_int, help="latent dimension (default: features - 1, MIWAE's)")
    p.add_argument("--impute-K", type=positive_int, default=d["impute_K"], help=f"particles of the imputation per row (default {d['impute_K']}: about 10 s for white-wine on one thread; MIWAE's 10000 takes ten times as long)")
    p.add_argument("--data-root", metavar="DIR", help="data directory of --dataset (default: $PYRO_IWEM_DATA, else shared/data nearby)")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--force", action="store_true", help="overwrite a run already in RUN_DIR")


def build_parser():
    """The ``pyro-iwem`` argument parser: one subcommand per ``add_<command>_parser`` of this module."""
    parser = ArgumentParser(
        prog=PROG,
        description="IWEM (Kim, Hwang & Kim, AISTATS 2020) and its baselines as Pyro inference "
        "algorithms: train, evaluate, tabulate and sweep the paper's experiments.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_table_parser(subparsers)
    add_figures_parser(subparsers)
    add_sweep_parser(subparsers)
    add_impute_parser(subparsers)
    return parser


def forwarded_argv(args):
    """The :data:`FORWARDED_OPTIONS` given in ``args``, as command-line arguments."""
    argv = []
    for flag, kwargs in FORWARDED_OPTIONS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if kwargs.get("action") == "store_true":
            if value:
                argv.append(flag)
        elif value is not None:
            argv += [flag, str(value)]
    return argv


# --- the settings of one training run -----------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every setting of one ``train`` run: the options of ``pyro-iwem train`` (see its
    ``--help``), under their argparse names, in the parser's order (a checkpoint's ``args``
keep it).

    An option left ``None`` was not given: :class:`~.train.Trainer` fills it from the
    checkpoint when resuming and from the protocol's defaults (:data:`~.setup.TRAIN_DEFAULTS`)
    otherwise, in a copy (:func:`dataclasses.replace`); a ``TrainConfig`` is never changed.
    """

    dataset: str | None = None
    model: str | None = None
    method: str | None = None
    K: int | None = None
    J: int | None = None
    seed: int | None = None
    protocol: str | None = None
    proposal_inflation: float | None = None
    p_step_inflation: float | None = None
    score_inflation: float | None = None
    log_p_offset: float | None = None
    encoder_scale: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    anneal_increment: float | None = None
    L: int | None = None
    anneal_start: float | None = None
    patience: int | None = None
    valid_K: int | None = None
    eval_K: int | None = None
    eval_batch_size: int | None = None
    eval_memory: float | None = None
    max_train: int | None = None
    max_eval: int | None = None
    eval_subset: str | None = None
    missing_patches: int | None = None
    data_seed: int | None = None
    data_root: str | None = None
    record_variance: int | None = None
    variance_repeats: int | None = None
    device: str | None = None
    threads: int | None = None
    quiet: bool = False
    tensorboard: bool = False
    out: str
    resume: bool = False
    force: bool = False

    @classmethod
    def from_namespace(cls, args):
        """The settings of parsed ``train`` arguments (``build_parser().parse_args(["train", ...])``)."""
        values = {key: value for key, value in vars(args).items() if key != "command"}
        unknown = set(values) - {field.name for field in dataclasses.fields(cls)}
        if unknown:  # an option added to the parser but not here
            raise TypeError(f"TrainConfig has no field for the train option(s) {', '.join(sorted(unknown))}")
        return cls(**values)

    @classmethod
    def from_argv(cls, argv):
        """The settings of a ``train`` command line (``["train", "--dataset", ...]``); bad
        arguments exit as the command line does (``SystemExit``)."""
        args = build_parser().parse_args(argv)
        if args.command != "train":
            raise ValueError(f"not a train command line: {argv!r}")
        return cls.from_namespace(args)
