r"""Imputing the missing entries of a numeric table: a table's own gaps, or the MIWAE protocol (§5).

One ``pyro-iwem impute`` run (:class:`ImputeRun`) does one of two things.

**Filling a table's gaps** (``--csv FILE``, the default): the cells of FILE that are empty or
read ``nan``, ``NA``, ``N/A``, ``null``, ``None`` or ``?`` (any case; :data:`~pyro_iwem.data.MISSING_VALUES`,
and the texts of ``--missing-values``) are missing (:func:`~pyro_iwem.data.read_table`). Every
column is standardised on its observed cells, a :class:`~pyro_iwem.models.TabularVAE` is
trained on all rows by ``--method`` (as below; ``mean`` fills each column's mean), and
``imputed.csv`` is FILE again with exactly its missing cells filled: the header, the
``--drop-columns`` columns, every observed cell as written, blank lines and the row order are
kept, and a row with no observed cell is kept and filled (from the prior, through the
proposal). ``metrics.json`` reports the cells filled per column. With ``--multiple M`` the run
also writes ``imputed-1.csv`` ... ``imputed-M.csv``, M multiple imputations: each fills every
row with an independent draw from the importance-weighted posterior (``--impute-K`` particles,
one resampled by its normalised weight :math:`\bar w_k`, and the model's draw
:math:`x_m \sim p(x_m \mid z_k)`: :meth:`~pyro_iwem.infer.Imputer.sample`), so that an analysis
can be repeated on each and its spread carried on (Rubin's rules).

**Completing images** (``--images FILE --run TRAIN_RUN_DIR``, :class:`ImageImputeRun`): a
``.npy`` array of binary images with NaN (or 0 in ``--mask``) for a missing pixel, completed
by the model of a ``train`` run and the proposal of its method (``completed.npy``,
``completed.png``, and ``--multiple`` draws).

**The benchmark** (``--benchmark``, and always with ``--dataset``), on a complete table:

1. loads a UCI data set or a CSV file (:func:`load_table`; a missing cell is an error) and
   standardises every column on the complete data (:func:`~pyro_iwem.data.standardize`), as
   MIWAE does;
2. removes each entry independently with probability ``--missing-rate`` (default 0.5;
   :func:`~pyro_iwem.data.mcar_mask`, seeded with ``--seed``);
3. fills the removed entries in, either with the mean of each column's observed entries
   (``mean``, :func:`mean_imputation`) or with a :class:`~pyro_iwem.models.TabularVAE`
   trained on all rows, missing entries included (transductive, as MIWAE), by missIWAE,
   miss-IWEM or miss-IWEM-woa (:func:`train_method`), then the self-normalised importance
   sampling estimate :math:`\sum_k \bar w_k \mathbb E[x_m \mid z_k]` of
   :math:`\mathbb E[x_m \mid x_o]` with ``--impute-K`` particles drawn from the method's own
   proposal (:func:`model_imputation`);
4. scores the mean squared error over the removed entries, in standardised units
   (:func:`imputation_mse`), and writes ``metrics.json``, ``imputed.csv`` (the completed
   numeric matrix in the original units, no header: the removed entries are model guesses)
   and, for a trained method, ``model.pt`` (the :class:`~pyro_iwem.models.TabularVAE`'s
   ``state_dict`` and the standardisation; written when filling gaps too).

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

import contextlib
import json
import math
import pathlib
import sys
import time

import numpy as np
import pyro
import torch

from pyro_iwem.atomic import atomic_path
from pyro_iwem.data import UCI_DATASETS, load_csv, load_uci, mcar_mask, read_table, standardize
from pyro_iwem.infer import MISSING_DATA_INPUTS, Annealing, Imputer, ZeroFilledInputs
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
#: The ``--multiple`` imputations, numbered from 1.
MULTIPLE = "imputed-{}.csv"
#: The trained model's parameters and the standardisation (trained methods only).
MODEL = "model.pt"
#: ``--images``: the completed images, their picture (the first :data:`PICTURED` images), and
#: the ``--multiple`` draws.
COMPLETED = "completed.npy"
COMPLETED_PNG = "completed.png"
MULTIPLE_IMAGES = "completed-{}.npy"
PICTURED = 16

#: Defaults of the ``impute`` options. ``steps`` makes a miss-IWEM run on white-wine take
#: about 85 s of training on one thread (see the module docstring).
IMPUTE_DEFAULTS = {
    "missing_rate": 0.5,  # --benchmark's
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
@contextlib.contextmanager
def _reading(csv):
    """Turn a CSV file's ``OSError`` or ``UnicodeDecodeError`` into a :class:`RunError` naming it."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise RunError(f"{csv}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RunError(f"cannot read --csv {csv}: {e.strerror or e}") from None


def load_table(dataset=None, csv=None, sep=",", drop_columns=None, header=None, root=None):
    """The raw complete table (float64, ``(rows, columns)``) of a UCI data set or of a CSV file.

    :raises RunError: if the CSV file cannot be opened (the message names it).
    :raises TableFormatError: (a ``ValueError``) if the table is not usable complete numeric data.
    :raises DataFileError: if a UCI file is missing or corrupt.
    """
    if dataset is not None:
        return load_uci(dataset, data_root(root))
    with _reading(csv):
        return load_csv(csv, sep=sep, drop_columns=drop_columns, header=header)


def load_gaps(csv, sep=",", drop_columns=None, header=None, missing_values=()):
    """The :class:`~pyro_iwem.data.Table` of a CSV file with missing cells
    (:func:`~pyro_iwem.data.read_table`).

    :raises RunError: if the file cannot be opened, or has no missing cell.
    :raises TableFormatError: (a ``ValueError``) if the table is not usable numeric data.
    """
    with _reading(csv):
        table = read_table(csv, sep=sep, drop_columns=drop_columns, header=header, missing_values=missing_values)
    if table.observed.all():
        rows, cols = table.values.shape
        raise RunError(
            f"{csv}: no cell of the {rows} x {cols} table is missing (empty, nan, NA, N/A, null, None "
            "or ?, or a --missing-values text), so there is nothing to fill; to score imputation on "
            "this complete table, pass --benchmark (it removes --missing-rate of the entries at random)"
        )
    return table


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


def _by_rows(name, model, x, mask, fill):
    """``fill(imputer, x rows, mask rows)`` for :data:`IMPUTE_ROWS` rows at a time, with the
    :class:`Imputer` of ``model`` and the proposal of method ``name``, concatenated."""
    inputs = MISSING_DATA_INPUTS.get(name, ZeroFilledInputs)()  # a method trained on complete data: q(z | x_o, 0)
    imputer = Imputer(model.model, model.guide, guide_inputs=inputs, **PLATES)
    return torch.cat([fill(imputer, xb, mb) for xb, mb in zip(x.split(IMPUTE_ROWS), mask.split(IMPUTE_ROWS))])


def model_imputation(model, name, x, mask, num_particles):
    """``x`` with its missing entries replaced by the importance sampling estimate of
    :math:`\\mathbb E[x_m \\mid x_o]` (:meth:`Imputer.mean`), ``num_particles`` particles per
    row from the proposal of method ``name``, :data:`IMPUTE_ROWS` rows at a time."""
    return _by_rows(name, model, x, mask, lambda imputer, xb, mb: imputer.mean(
        xb, mb, num_particles=num_particles, chunk_size=IMPUTE_CHUNK))


def model_draws(model, name, x, mask, num_particles):
    """``x`` with its missing entries replaced by one draw per row from the importance-weighted
    posterior (:meth:`Imputer.sample` with ``mean=False``): ``num_particles`` particles from the
    proposal of method ``name``, one resampled by its normalised weight, and the model's draw
    of the missing entries given it; :data:`IMPUTE_ROWS` rows at a time."""
    return _by_rows(name, model, x, mask, lambda imputer, xb, mb: imputer.sample(
        xb, mb, num_particles=num_particles, mean=False, chunk_size=IMPUTE_CHUNK))


# --- a run --------------------------------------------------------------------------------------
class ImputeRun:
    """One ``impute`` run, from parsed arguments (see :mod:`.cli`).

    :meth:`prepare` checks the options and the run directory, loads and standardises the table,
    masks it (the benchmark) or finds its gaps, and builds the model and method; it raises
    :class:`RunError`, a ``ValueError`` for an unusable table or
    :class:`~pyro_iwem.data.DataFileError`. :meth:`run` trains, imputes, writes
    ``metrics.json`` and ``imputed.csv`` (and the ``--multiple`` imputations) and returns the
    metrics.
    """

    def __new__(cls, args):
        if cls is ImputeRun and getattr(args, "images", None) is not None:
            cls = ImageImputeRun
        return super().__new__(cls)

    def __init__(self, args):
        self.args = args
        self.run_dir = pathlib.Path(args.out)
        self.trained = args.method != "mean"
        self.benchmark = bool(getattr(args, "benchmark", False)) or args.dataset is not None
        self.multiple = getattr(args, "multiple", None) or 0
        self.table = None

    def _check_run_dir(self):
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunError(f"--out {self.run_dir} exists and is not a directory")
        if (self.run_dir / METRICS).is_file() and not self.args.force:
            raise RunError(f"{self.run_dir} holds a finished run ({METRICS}); pass --force to overwrite it")

    def _check_options(self):
        args = self.args
        if args.dataset is None and args.csv is None:
            raise RunError("one of the arguments --dataset --csv is required, or --images with --run (see pyro-iwem impute --help)")
        if args.method is None:
            raise RunError("the following arguments are required: --method (see pyro-iwem impute --help)")
        if getattr(args, "run", None) is not None or getattr(args, "mask", None) is not None:
            raise RunError("--run and --mask are options of --images, not of a table")
        if args.dataset is not None and (
            args.sep != "," or args.drop_columns or args.header is not None or getattr(args, "missing_values", None)
        ):
            raise RunError("--sep, --drop-columns, --header, --no-header and --missing-values apply to --csv only")
        if not self.benchmark and args.missing_rate is not None:
            raise RunError(
                "--missing-rate is the rate of --benchmark, which removes entries of a complete table "
                "at random and scores their imputation; add --benchmark (filling a table's own gaps takes no rate)"
            )
        if self.multiple and self.benchmark:
            raise RunError("--multiple applies to filling a table's gaps, not to --benchmark or --dataset")
        if self.multiple and not self.trained:
            raise RunError("--multiple needs a trained --method: mean imputation has no posterior to draw from")

    def _load(self):
        args = self.args
        if self.benchmark:
            self.x = load_table(args.dataset, args.csv, args.sep, args.drop_columns, args.header, args.data_root)
            self.z, self.col_mean, self.col_std = standardize(self.x)
            self.mask = mcar_mask(self.z.shape, self.missing_rate, args.seed).numpy()
            if self.mask.all():
                raise RunError(f"no entry of the {self.z.shape[0]} x {self.z.shape[1]} table was removed; raise --missing-rate")
        else:
            self.table = load_gaps(args.csv, args.sep, args.drop_columns, args.header, getattr(args, "missing_values", None) or ())
            self.x = self.table.values
            self.z, self.col_mean, self.col_std = standardize(self.x)
            self.mask = self.table.observed

    @property
    def missing_rate(self):
        """The benchmark's rate of removed entries (``None`` when filling gaps)."""
        if not self.benchmark:
            return None
        return IMPUTE_DEFAULTS["missing_rate"] if self.args.missing_rate is None else self.args.missing_rate

    def _build(self):
        args = self.args
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        self.model = TabularVAE(self.z.shape[1], z_dim=args.z_dim, likelihood=args.likelihood)
        annealing = Annealing(0.01, every=annealing_every(args.steps))
        self.method = make_method(vars(args), self.model, annealing)

    def _outputs(self):
        """The files a run writes (``--force`` removes those of an earlier run first)."""
        return [METRICS, IMPUTED, MODEL] + [path.name for path in self.run_dir.glob(MULTIPLE.format("*"))]

    def prepare(self):
        self._check_options()
        self._check_run_dir()
        if self.args.threads:
            torch.set_num_threads(self.args.threads)
        self._load()
        if self.trained:
            self._build()
        if self.args.force:  # the old files go once the new run is set up
            for name in self._outputs():
                (self.run_dir / name).unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self

    def _tensors(self):
        """The standardised table zero-filled where missing, and the mask, as tensors."""
        return torch.as_tensor(np.where(self.mask, self.z, 0.0), dtype=torch.float32), torch.as_tensor(self.mask)

    def _impute(self):
        """``(imputed z, final training loss, train seconds, impute seconds)``."""
        if not self.trained:
            start = time.perf_counter()
            return mean_imputation(self.z, self.mask), None, 0.0, time.perf_counter() - start
        args = self.args
        x0, mask = self._tensors()
        start = time.perf_counter()
        loss = train_method(self.method, x0, mask, args.steps, args.batch_size, args.quiet)
        middle = time.perf_counter()
        imputed = model_imputation(self.model, args.method, x0, mask, args.impute_K)
        imputed = np.where(self.mask, self.z, imputed.double().numpy())
        return imputed, loss, middle - start, time.perf_counter() - middle

    def _original(self, z):
        """``z`` in the table's units, with the observed entries exactly as read."""
        return np.where(self.mask, self.x, z * self.col_std + self.col_mean)

    def _write_completed(self, z, name):
        with atomic_path(self.run_dir / name) as tmp, open(tmp, "w", encoding=self.table.encoding, newline="") as f:
            f.write(self.table.completed_text(self._original(z)))

    def _write_multiple(self):
        """The ``--multiple`` imputations; returns their file names."""
        x0, mask = self._tensors()
        names = []
        for m in range(1, self.multiple + 1):
            draw = model_draws(self.model, self.args.method, x0, mask, self.args.impute_K).double().numpy()
            names.append(MULTIPLE.format(m))
            self._write_completed(np.where(self.mask, self.z, draw), names[-1])
        return names

    def run(self):
        imputed, loss, train_seconds, impute_seconds = self._impute()
        metrics = {**self._settings()}
        if self.benchmark:
            metrics["mse"] = imputation_mse(imputed, self.z, self.mask)
            metrics["mean_mse"] = imputation_mse(mean_imputation(self.z, self.mask), self.z, self.mask)
            write_table(self._original(imputed), self.run_dir / IMPUTED)
        else:
            self._write_completed(imputed, IMPUTED)
            start = time.perf_counter()
            metrics["files"] = [IMPUTED] + (self._write_multiple() if self.multiple else [])
            impute_seconds += time.perf_counter() - start
        metrics.update(
            final_loss=loss,
            final_alpha=self.method.alpha if self.trained else None,
            train_seconds=train_seconds,
            impute_seconds=impute_seconds,
            wall_seconds=train_seconds + impute_seconds,
            threads=torch.get_num_threads(),
        )
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
            "missing_rate": self.missing_rate,
            "n_rows": rows,
            "n_features": cols,
            "n_missing": int((~self.mask).sum()),
        }
        if not self.benchmark:
            settings.update(
                mode="fill",
                columns=self.table.kept_names,
                filled=self.table.missing_counts(),
                rows_without_observed=int((~self.mask).all(1).sum()),
                multiple=self.multiple,
            )
        if self.trained:
            settings.update(
                {key: getattr(args, key) for key in ("K", "J", "batch_size", "lr", "steps", "impute_K", "likelihood")},
                z_dim=self.model.z_dim,
                anneal_every=annealing_every(args.steps),
            )
        return settings


# --- images ---------------------------------------------------------------------------------
def _load_npy(path, option):
    """The array of a ``.npy`` file, or a :class:`RunError` naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except OSError as e:
        raise RunError(f"cannot read {option} {path}: {e.strerror or e}") from None
    except (ValueError, EOFError) as e:
        raise RunError(f"{option} {path} is not a NumPy .npy array ({str(e).splitlines()[0]})") from None


def load_image_gaps(images, mask_file, image_shape):
    """``(x, mask, shape)`` of ``--images``: ``x`` ``(N, H*W)`` float32, zero where missing; ``mask``
    ``(N, H*W)`` bool, True where observed (not NaN, and nonzero in ``mask_file`` if given); the
    shape the images were given in, ``(N, H, W)`` or ``(N, H*W)``.

    :raises RunError: if a file cannot be read, the shapes do not fit the model's images, an
        observed pixel is not 0 or 1, or no pixel is missing.
    """
    x = _load_npy(images, "--images")
    pixels = math.prod(image_shape)
    if not ((x.ndim == 2 and x.shape[1] == pixels) or (x.ndim == 3 and x.shape[1:] == tuple(image_shape))):
        raise RunError(
            f"--images {images} holds an array of shape {x.shape}; the run's model takes images of "
            f"{image_shape[0]} x {image_shape[1]} pixels: give (N, {image_shape[0]}, {image_shape[1]}) or (N, {pixels})"
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise RunError(f"--images {images} holds {x.dtype} values, not pixel intensities")
    shape, x = x.shape, x.reshape(len(x), pixels).astype(np.float64)
    mask = ~np.isnan(x)
    if mask_file is not None:
        given = _load_npy(mask_file, "--mask")
        if given.shape != shape:
            raise RunError(f"--mask {mask_file} has shape {given.shape}, the images {shape}")
        if not np.isin(given, (0, 1)).all():
            raise RunError(f"--mask {mask_file} must hold 1 (or True) for an observed pixel and 0 for a missing one")
        mask &= given.reshape(len(x), pixels).astype(bool)
    observed = x[mask]
    wrong = observed[(observed != 0) & (observed != 1)]
    if wrong.size:
        raise RunError(
            f"--images {images}: an observed pixel is {wrong[0]:g}; the run's model is of binary images, "
            "so observed pixels must be 0 or 1 (binarise them, e.g. x > 0.5; a missing pixel is NaN or 0 in --mask)"
        )
    if mask.all():
        raise RunError(f"no pixel of the {len(x)} images of {images} is missing (NaN, or 0 in --mask); nothing to fill")
    return np.where(mask, x, 0.0).astype(np.float32), mask, shape


class ImageImputeRun(ImputeRun):
    """``impute --images FILE --run RUN_DIR``: a user's binary images with missing pixels (NaN, or
    0 in ``--mask``) completed by the model of a ``train`` run (its ``best.pt``) with the
    proposal of the run's method: ``completed.npy`` (the images in the shape given, each missing
    pixel replaced by the importance-sampled :math:`\\mathbb E[x_m \\mid x_o]`, the probability
    that it is on), ``completed.png`` (observed, completed and draws of the first
    :data:`PICTURED` images), and with ``--multiple M`` ``completed-1.npy`` ... , binary draws
    from the importance-weighted posterior. ImputeRun(args) is this class when ``args.images``
    is set."""

    def _check_options(self):
        args = self.args
        if getattr(args, "run", None) is None:
            raise RunError("--images needs --run RUN_DIR, the train run whose model completes them")
        table_options = {
            "--method": args.method, "--benchmark": getattr(args, "benchmark", False),
            "--missing-rate": args.missing_rate, "--drop-columns": args.drop_columns,
            "--missing-values": getattr(args, "missing_values", None),
            "--header/--no-header": args.header is not None, "--sep": args.sep != ",",
        }
        given = [flag for flag, value in table_options.items() if value]
        if given:
            raise RunError(f"{', '.join(given)} apply to tables, not to --images (the method is the --run's)")

    def _load(self):
        from .evaluate import load_run

        config, data, self.model = load_run(self.args.run, "cpu", self.args.data_root)
        self.config, self.image_shape = config, tuple(data.image_shape)
        self.x, self.mask, self.shape = load_image_gaps(self.args.images, self.args.mask, self.image_shape)

    def _build(self):
        pass  # the run's model, loaded by _load

    def _outputs(self):
        return [METRICS, COMPLETED, COMPLETED_PNG] + [path.name for path in self.run_dir.glob(MULTIPLE_IMAGES.format("*"))]

    def _save(self, x, name):
        with atomic_path(self.run_dir / name) as tmp, open(tmp, "wb") as f:
            np.save(f, x.reshape(self.shape))

    def run(self):
        args, method = self.args, self.config["method"]
        pyro.set_rng_seed(args.seed)
        x, mask = torch.as_tensor(self.x), torch.as_tensor(self.mask)
        start = time.perf_counter()
        columns = {"observed": torch.where(mask, x, torch.full_like(x, 0.5)),
                   "completed": model_imputation(self.model, method, x, mask, args.impute_K)}
        draws = [model_draws(self.model, method, x, mask, args.impute_K) for _ in range(self.multiple)]
        seconds = time.perf_counter() - start
        files = [COMPLETED, COMPLETED_PNG] + [MULTIPLE_IMAGES.format(m) for m in range(1, self.multiple + 1)]
        self._save(columns["completed"].numpy(), COMPLETED)
        for name, draw in zip(files[2:], draws):
            self._save(draw.numpy(), name)
        from .images import save_completion_grid

        pictured = {**columns, **{f"draw {m}": d for m, d in enumerate(draws[:2], 1)}}
        save_completion_grid({name: c[:PICTURED] for name, c in pictured.items()}, self.image_shape,
                             self.run_dir / COMPLETED_PNG)
        metrics = {
            "mode": "images", "images": str(pathlib.Path(args.images).resolve()),
            "mask": None if args.mask is None else str(pathlib.Path(args.mask).resolve()),
            "run": str(pathlib.Path(args.run).resolve()), "method": method, "dataset": self.config["dataset"],
            "model": self.config["model"], "seed": args.seed, "n_images": len(self.x),
            "image_shape": list(self.image_shape), "n_missing": int((~self.mask).sum()), "impute_K": args.impute_K,
            "multiple": self.multiple, "files": files, "impute_seconds": seconds, "threads": torch.get_num_threads(),
        }
        atomic_write_json(metrics, self.run_dir / METRICS)
        return metrics


def summary_line(metrics, run_dir):
    """The result of a run: one line for the benchmark; for a filled table, one line and
    the cells filled per column."""
    m = metrics
    if m.get("mode") == "images":
        height, width = m["image_shape"]
        return (
            f"{m['images']}: filled {m['n_missing']} missing pixels of {m['n_images']} images of {height} x {width} "
            f"with the {m['method']} model of {m['run']} ({m['impute_K']} particles); impute "
            f"{m['impute_seconds']:.0f} s -> {pathlib.Path(run_dir) / COMPLETED}, {', '.join(m['files'][1:])}"
        )
    trained = f" K={m['K']} J={m['J']} {m['steps']} steps" if "K" in m else ""
    times = f"train {m['train_seconds']:.0f} s, impute {m['impute_seconds']:.0f} s"
    if m.get("mode") != "fill":
        return (
            f"{m['dataset']} {m['method']}{trained} seed={m['seed']}: imputation MSE {m['mse']:.4f} "
            f"(mean imputation {m['mean_mse']:.4f}) over {m['n_missing']} missing entries of "
            f"{m['n_rows']} x {m['n_features']}; {times} -> {run_dir}"
        )
    files = m["files"]
    written = files[0] if len(files) == 1 else f"{files[0]}, and {len(files) - 1} multiple imputations {files[1]} ... {files[-1]}"
    empty = m["rows_without_observed"]
    lines = [
        f"{m['dataset']} {m['method']}{trained} seed={m['seed']}: filled {m['n_missing']} missing cells of "
        f"{m['n_rows']} x {m['n_features']}"
        + (f" ({empty} row(s) had no observed cell)" if empty else "")
        + f"; {times} -> {pathlib.Path(run_dir) / written}",
        "cells filled per column:",
    ]
    width = max(map(len, m["filled"]))
    lines += [f"  {name:<{width}}  {count}" for name, count in m["filled"].items()]
    return "\n".join(lines)


def metrics_text(metrics):
    """The metrics as indented JSON (for printing)."""
    return json.dumps(metrics, indent=2, sort_keys=True)
