r"""Imputing the missing entries of a numeric table: the MIWAE protocol (§5 of the paper).

One ``pyro-iwem impute`` run (:class:`ImputeRun`):

1. loads a UCI data set or a CSV file (:func:`load_table`) and standardises every column on
   the complete data (:func:`~pyro_iwem.data.standardize`), as MIWAE does;
2. removes each entry independently with probability ``--missing-rate``
   (:func:`~pyro_iwem.data.mcar_mask`, seeded with ``--seed``);
3. fills the removed entries in, either with the mean of each column's observed entries
   (``mean``, :func:`mean_imputation`) or with a :class:`~pyro_iwem.models.TabularVAE`
   trained on all rows, missing entries included (transductive, as MIWAE), by missIWAE,
   miss-IWEM or miss-IWEM-woa (:func:`train_method`), then the self-normalised importance
   sampling estimate :math:`\sum_k \bar w_k \mathbb E[x_m \mid z_k]` of
   :math:`\mathbb E[x_m \mid x_o]` with ``--impute-K`` particles drawn from the method's own
   proposal (:func:`model_imputation`);
4. scores the mean squared error over the removed entries, in standardised units
   (:func:`imputation_mse`), and writes ``metrics.json``, ``imputed.csv`` (the completed
   table in the original units) and, for a trained method, ``model.pt`` (the
   :class:`~pyro_iwem.models.TabularVAE`'s ``state_dict`` and the standardisation).

Schedule. Training takes ``--steps`` Adam steps on shuffled minibatches (a fresh
permutation of the rows per pass). IWEM's α grows by 0.01 every ``max(1, steps // 200)``
steps (:func:`annealing_every`), so it reaches 1 by half the steps (exactly half when
``steps`` is a multiple of 200). The paper adds 0.01 per epoch instead; at batch size 64 an
epoch is 9 (breast) to 77 (white-wine) steps, so α would stay below 1 for 900-7700 steps,
most or all of a run of the default length.

Costs, measured on one CPU thread (``--threads 1``, a 2-core machine running two other
one-thread jobs) with the defaults (K = J = 20, batch 64): a step takes about 16 ms with
miss-IWEM or miss-IWEM-woa and 8 ms with missIWAE, nearly whatever the table, so the
default 5 000 steps train in about 85 s and 40 s (white-wine miss-IWEM: 87 s). Imputing
white-wine (4898 x 11) with ``--impute-K 1000`` takes about 9 s; MIWAE's K = 10 000 takes
ten times as long, 65-90 s (timed on 512 rows).
"""

import json
import math
import pathlib
import sys
import time

import numpy as np
import pyro
import torch

from pyro_iwem.atomic import atomic_path
from pyro_iwem.data import UCI_DATASETS, load_csv, load_uci, mcar_mask, standardize
from pyro_iwem.infer import MISSING_DATA_INPUTS, Annealing, Imputer
from pyro_iwem.models import TabularVAE

from .checkpoint import METRICS, atomic_torch_save, atomic_write_json
from .errors import RunError, TrainingDiverged
from .setup import MISSING_METHOD_ORDER, PLATES, data_root, make_method

#: The imputation methods in the order of the paper's Table 3, mean imputation last.
IMPUTE_METHODS = MISSING_METHOD_ORDER + ("mean",)
#: The UCI data sets of ``--dataset``.
TABLE_DATASETS = tuple(UCI_DATASETS)
#: The completed table written next to ``metrics.json``.
IMPUTED = "imputed.csv"
#: The trained model's parameters and the standardisation (trained methods only).
MODEL = "model.pt"

#: Defaults of the ``impute`` options. ``steps`` makes a miss-IWEM run on white-wine take
#: about 85 s of training on one thread (see the module docstring).
IMPUTE_DEFAULTS = {
    "missing_rate": 0.5,
    "seed": 1234,
    "K": 20,
    "J": 20,
    "batch_size": 64,
    "lr": 1e-3,
    "steps": 5000,
    "impute_K": 1000,
    "likelihood": "gaussian",
}

#: Rows imputed together and particles drawn per pass: 256 x 100 particle-rows keep each
#: hidden activation near 13 MB (larger passes were no faster on one thread).
IMPUTE_ROWS = 256
IMPUTE_CHUNK = 100


# --- data ------------------------------------------------------------------------------------
def load_table(dataset=None, csv=None, sep=",", drop_columns=None, header=None, root=None):
    """The raw table (float64, ``(rows, columns)``) of a UCI data set or of a CSV file.

    :raises RunError: if the CSV file cannot be opened (the message names it).
    :raises TableFormatError: (a ``ValueError``) if the table is not usable numeric data.
    :raises DataFileError: if a UCI file is missing or corrupt.
    """
    if dataset is not None:
        return load_uci(dataset, data_root(root))
    try:
        return load_csv(csv, sep=sep, drop_columns=drop_columns, header=header)
    except UnicodeDecodeError as e:
        raise RunError(f"{csv}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RunError(f"cannot read --csv {csv}: {e.strerror or e}") from None


def mean_imputation(z, mask):
    """``z`` with each missing entry (``mask`` False) replaced by the mean of its column's
    observed entries (0, the mean of standardised data, for a column with none)."""
    counts = mask.sum(0)
    sums = np.where(mask, z, 0.0).sum(0)
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return np.where(mask, z, means)


def imputation_mse(imputed, truth, mask):
    """Mean over the missing entries (``mask`` False) of ``(imputed - truth) ** 2``."""
    return float(np.mean((imputed[~mask] - truth[~mask]) ** 2))


def write_table(x, path):
    """Write the array ``x`` ``(rows, columns)`` as comma-separated shortest round-trip
    floats, no header, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(",".join(map(repr, row)) + "\n" for row in x.tolist())


# --- training and imputation ------------------------------------------------------------------
def annealing_every(steps):
    """Steps between IWEM's α increments of 0.01, so that α reaches 1 by half of ``steps``."""
    return max(1, steps // 200)


def shuffled_batches(n, batch_size):
    """Endless row-index minibatches: each pass is a fresh random permutation of ``range(n)``
    (torch's global generator), cut into ``batch_size`` pieces, the last possibly smaller."""
    while True:
        yield from torch.randperm(n).split(batch_size)


def train_method(method, x, mask, steps, batch_size, quiet=False):
    """``steps`` calls of ``method.step(x[rows], mask[rows])`` on shuffled minibatches.

    A tqdm bar on stderr shows the loss per datum (an exponential moving average) and α.
    Returns that average at the end.

    :raises TrainingDiverged: (a :class:`RunError`) if a loss is not finite.
    """
    from tqdm.auto import tqdm

    running = None
    batches = shuffled_batches(len(x), batch_size)
    bar = tqdm(range(steps), desc="train", disable=quiet, leave=False, dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        rows = next(batches)
        alpha = method.alpha
        loss = method.step(x[rows], mask[rows])
        if not math.isfinite(loss):
            bar.close()
            raise TrainingDiverged(f"the training loss became {loss} at step {step + 1}; nothing was written (try a smaller --lr)")
        per_datum = loss / len(rows)
        running = per_datum if running is None else 0.98 * running + 0.02 * per_datum
        postfix = {"loss": f"{running:.3f}"}
        if alpha is not None:
            postfix["α"] = f"{alpha:.2f}"
        bar.set_postfix(postfix, refresh=False)
    bar.close()
    return running


def model_imputation(model, name, x, mask, num_particles):
    """``x`` with its missing entries replaced by the importance sampling estimate of
    :math:`\\mathbb E[x_m \\mid x_o]` (:meth:`Imputer.mean`), ``num_particles`` particles per
    row from the proposal of method ``name``, :data:`IMPUTE_ROWS` rows at a time."""
    imputer = Imputer(model.model, model.guide, guide_inputs=MISSING_DATA_INPUTS[name](), **PLATES)
    parts = [
        imputer.mean(xb, mb, num_particles=num_particles, chunk_size=IMPUTE_CHUNK)
        for xb, mb in zip(x.split(IMPUTE_ROWS), mask.split(IMPUTE_ROWS))
    ]
    return torch.cat(parts)


# --- a run --------------------------------------------------------------------------------------
class ImputeRun:
    """One ``impute`` run, from parsed arguments (see :mod:`.cli`).

    :meth:`prepare` checks the run directory, loads, standardises and masks the table and
    builds the model and method; it raises :class:`RunError`, a ``ValueError`` for an
    unusable table or :class:`~pyro_iwem.data.DataFileError`. :meth:`run` trains, imputes,
    writes ``metrics.json`` and ``imputed.csv`` and returns the metrics.
    """

    def __init__(self, args):
        self.args = args
        self.run_dir = pathlib.Path(args.out)
        self.trained = args.method != "mean"

    def _check_run_dir(self):
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunError(f"--out {self.run_dir} exists and is not a directory")
        if (self.run_dir / METRICS).is_file() and not self.args.force:
            raise RunError(f"{self.run_dir} holds a finished run ({METRICS}); pass --force to overwrite it")

    def _check_options(self):
        args = self.args
        if args.dataset is not None and (args.sep != "," or args.drop_columns or args.header is not None):
            raise RunError("--sep, --drop-columns, --header and --no-header apply to --csv only")

    def _load(self):
        args = self.args
        self.x = load_table(args.dataset, args.csv, args.sep, args.drop_columns, args.header, args.data_root)
        self.z, self.col_mean, self.col_std = standardize(self.x)
        self.mask = mcar_mask(self.z.shape, args.missing_rate, args.seed).numpy()
        if self.mask.all():
            raise RunError(f"no entry of the {self.z.shape[0]} x {self.z.shape[1]} table was removed; raise --missing-rate")

    def _build(self):
        args = self.args
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        self.model = TabularVAE(self.z.shape[1], z_dim=args.z_dim, likelihood=args.likelihood)
        annealing = Annealing(0.01, every=annealing_every(args.steps))
        self.method = make_method(vars(args), self.model, annealing)

    def prepare(self):
        self._check_options()
        self._check_run_dir()
        if self.args.threads:
            torch.set_num_threads(self.args.threads)
        self._load()
        if self.trained:
            self._build()
        if self.args.force:  # the old files go once the new run is set up
            for name in (METRICS, IMPUTED, MODEL):
                (self.run_dir / name).unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self

    def _impute(self):
        """``(imputed z, final training loss, train seconds, impute seconds)``."""
        if not self.trained:
            start = time.perf_counter()
            return mean_imputation(self.z, self.mask), None, 0.0, time.perf_counter() - start
        args = self.args
        x0 = torch.as_tensor(np.where(self.mask, self.z, 0.0), dtype=torch.float32)
        mask = torch.as_tensor(self.mask)
        start = time.perf_counter()
        loss = train_method(self.method, x0, mask, args.steps, args.batch_size, args.quiet)
        middle = time.perf_counter()
        imputed = model_imputation(self.model, args.method, x0, mask, args.impute_K)
        imputed = np.where(self.mask, self.z, imputed.double().numpy())
        return imputed, loss, middle - start, time.perf_counter() - middle

    def run(self):
        imputed, loss, train_seconds, impute_seconds = self._impute()
        metrics = {
            **self._settings(),
            "mse": imputation_mse(imputed, self.z, self.mask),
            "mean_mse": imputation_mse(mean_imputation(self.z, self.mask), self.z, self.mask),
            "final_loss": loss,
            "final_alpha": self.method.alpha if self.trained else None,
            "train_seconds": train_seconds,
            "impute_seconds": impute_seconds,
            "wall_seconds": train_seconds + impute_seconds,
            "threads": torch.get_num_threads(),
        }
        original = np.where(self.mask, self.x, imputed * self.col_std + self.col_mean)
        write_table(original, self.run_dir / IMPUTED)
        if self.trained:
            state = {"model": self.model.state_dict(), "settings": metrics, "mean": self.col_mean, "std": self.col_std}
            atomic_torch_save(state, self.run_dir / MODEL)
        atomic_write_json(metrics, self.run_dir / METRICS)
        return metrics

    def _settings(self):
        args = self.args
        rows, cols = self.z.shape
        settings = {
            "method": args.method,
            "dataset": args.dataset if args.dataset is not None else str(args.csv),
            "csv": None if args.csv is None else str(pathlib.Path(args.csv).resolve()),
            "seed": args.seed,
            "missing_rate": args.missing_rate,
            "n_rows": rows,
            "n_features": cols,
            "n_missing": int((~self.mask).sum()),
        }
        if self.trained:
            settings.update(
                {key: getattr(args, key) for key in ("K", "J", "batch_size", "lr", "steps", "impute_K", "likelihood")},
                z_dim=self.model.z_dim,
                anneal_every=annealing_every(args.steps),
            )
        return settings


def summary_line(metrics, run_dir):
    """The one-line result of a run."""
    m = metrics
    trained = f" K={m['K']} J={m['J']} {m['steps']} steps" if "K" in m else ""
    return (
        f"{m['dataset']} {m['method']}{trained} seed={m['seed']}: imputation MSE {m['mse']:.4f} "
        f"(mean imputation {m['mean_mse']:.4f}) over {m['n_missing']} missing entries of "
        f"{m['n_rows']} x {m['n_features']}; train {m['train_seconds']:.0f} s, impute "
        f"{m['impute_seconds']:.0f} s -> {run_dir}"
    )


def metrics_text(metrics):
    """The metrics as indented JSON (for printing)."""
    return json.dumps(metrics, indent=2, sort_keys=True)
