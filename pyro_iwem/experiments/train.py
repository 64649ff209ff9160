"""Training a model with one inference method: the epoch loop of the paper's protocol (§5).

Per epoch: one pass over the shuffled training batches (``method.step``), ``method.end_epoch()``
(the paper's per-epoch annealing), the validation IWAE bound, early stopping, and an atomic
checkpoint from which ``--resume`` continues to exactly the result of an uninterrupted run.
At the end: the test log-likelihood of the best-validation parameters, ``metrics.json``, a
sample grid and the learning curve.
"""

import dataclasses
import math
import pathlib
import sys
import time

import pyro
import torch

from .checkpoint import (
    BEST,
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    COMPLETIONS,
    CURVE,
    METRICS,
    RUN_FILES,
    SAMPLES,
    RunDirLock,
    atomic_torch_save,
    atomic_write_json,
    clone_state_dict,
    read_json,
    readable,
    restore_parameters,
    rng_state,
    set_rng_state,
    torch_load,
)
from .errors import RunError, TrainingDiverged
from .options import PROG
from .evaluate import completions, gib, mean_log_likelihood, score_key, test_log_likelihood
from .images import save_completion_grid, save_image_grid, save_learning_curve
from .setup import (
    CONFIG_KEYS,
    IWEM_METHODS,
    LEGACY_CONFIG,
    MISSING_DATA_INPUTS,
    TRAIN_DEFAULTS,
    check_missing_data,
    data_root,
    load_data,
    make_method,
    make_model,
    protocol_defaults,
    protocol_log_p_offset,
    resolve_device,
    run_config,
)
from .tensorboard import ScalarLog
from .variance import subset_variances, summary, variance_metrics, variance_subset
from .world import World, local_device


class _RunningMean:
    """The mean of the finite values added (``nan`` before any)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, value):
        if value is not None and math.isfinite(value):
            self.total += value
            self.count += 1

    @property
    def value(self):
        return self.total / self.count if self.count else math.nan


def _fmt(value, spec=".2f"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


class Trainer:
    """One training run, from its :class:`~.options.TrainConfig` (``train``'s options).

    :meth:`prepare` checks the run directory, loads the data, builds the model and the
    method and, with ``resume``, restores the checkpoint; it raises :class:`RunError` or
    :class:`~pyro_iwem.data.DataFileError` for bad arguments or missing data.
    :meth:`run` trains and evaluates and returns the metrics.

    :param settings: a :class:`~.options.TrainConfig`; settings left ``None`` take the
        checkpoint's values when resuming and :data:`TRAIN_DEFAULTS` otherwise. It is not
        changed: :attr:`settings` is, once prepared, a filled-in copy of it.
    :param out: where progress lines go (default ``sys.stdout``; none with ``settings.quiet``).
    :param on_epoch: callables ``f(record)``, called with each epoch's history record once
        its checkpoint is written (e.g. a sweep's progress report).
    :param world: the run's processes, a :class:`~.world.World` (default: what ``torchrun``
        set in the environment, :meth:`~.world.World.from_env`; one process without it).
        On several, each takes its share of every minibatch and steps with
        :class:`~pyro_iwem.distributed.DistributedOptim`; the evaluations split the data and
        add up; process 0 alone writes files, logs and calls ``on_epoch``.

    :attr:`config` is the dict of the settings that define the run (:data:`CONFIG_KEYS`), as
    checkpoints and ``metrics.json`` record it.
    """

    def __init__(self, settings, out=None, on_epoch=(), world=None):
        self.settings = settings
        self.world = world
        self.quiet = settings.quiet
        self.out_stream = out
        self.on_epoch = list(on_epoch)
        self.run_dir = pathlib.Path(settings.out)
        self.checkpoint = None
        self.lock = RunDirLock(self.run_dir)

    def log(self, message):
        if not self.quiet and self.world.main:
            print(message, file=self.out_stream or sys.stdout, flush=True)

    # --- setting up -------------------------------------------------------------------
    def _check_run_dir(self):
        s = self.settings
        if s.resume and s.force:
            raise RunError("--resume and --force exclude each other")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunError(f"--out {self.run_dir} exists and is not a directory")
        ckpt_path = self.run_dir / CHECKPOINT
        finished = (self.run_dir / METRICS).is_file()
        if s.force:  # the old files are removed once the new run is set up (prepare)
            return
        if s.resume:
            if ckpt_path.is_file():
                self.checkpoint = torch_load(ckpt_path, map_location="cpu")
                if self.checkpoint.get("format") != CHECKPOINT_FORMAT:
                    raise RunError(f"{ckpt_path} has an unknown checkpoint format; use --force to start over")
            elif finished:
                raise RunError(f"{self.run_dir} holds {METRICS} but no {CHECKPOINT} to resume from; use --force to start over")
            return
        if finished:
            raise RunError(
                f"{self.run_dir} holds a finished run ({METRICS}); pass --resume to continue it "
                "(e.g. with more --epochs) or --force to overwrite it"
            )
        if ckpt_path.is_file():
            raise RunError(f"{self.run_dir} holds an interrupted run ({CHECKPOINT}); pass --resume to continue it or --force to overwrite it")

    def _fill_options(self):
        """Fill omitted options from the checkpoint (resuming) or the protocol's defaults; check
        that the options defining the run agree with the checkpoint's (a checkpoint from before
        ``--protocol`` reads as the paper's protocol, :data:`~.setup.LEGACY_CONFIG`)."""
        s = self.settings
        saved = {**LEGACY_CONFIG, **self.checkpoint["args"]} if self.checkpoint else {}
        if self.checkpoint:
            given = {k: getattr(s, k) for k in CONFIG_KEYS if getattr(s, k) is not None}
            clash = [f"{k} {v!r} (checkpoint: {saved.get(k)!r})" for k, v in given.items() if saved.get(k) != v]
            if clash:
                raise RunError(
                    f"cannot resume {self.run_dir} with different settings: {', '.join(clash)}; "
                    "omit them or use --force to start over"
                )

        def chosen(key):
            return getattr(s, key, None) or saved.get(key) or TRAIN_DEFAULTS[key]

        defaults = protocol_defaults(chosen("protocol"), chosen("method"), chosen("model"))
        s = dataclasses.replace(
            s, **{key: saved.get(key, default) for key, default in defaults.items() if getattr(s, key) is None}
        )
        if s.valid_K is None:  # the official code validates with the training K (its num_sam)
            s = dataclasses.replace(s, valid_K=s.K)
        if s.p_step_inflation is None:  # an IWEM method's P-step draws as its E-step does
            s = dataclasses.replace(s, p_step_inflation=s.proposal_inflation if s.method in IWEM_METHODS else 1.0)
        if s.dataset is None:
            raise RunError(f"the following arguments are required: --dataset (see {PROG} train --help)")
        if s.epochs < 1:
            raise RunError(f"--epochs must be >= 1, got {s.epochs}")
        check_missing_data(dataclasses.asdict(s))
        self.settings = s

    def prepare(self):
        """Set the run up (see the class); holds the run directory's lock (:class:`~.checkpoint.RunDirLock`)
        from here to the end of :meth:`run` (or :meth:`close`): a second run on the same
        directory fails at once. A directory that does not exist yet is created (and locked) only
        once the data, model and method are built, so that bad arguments leave nothing behind.
        On several processes, every process prepares, all fail if one does, and process 0's
        parameters are then broadcast to the others."""
        if self.world is None:
            self.world = World.from_env(self.settings.device)
        self.world.agree(self._prepare_here)
        if self.world.distributed:
            self.method.optim.broadcast_parameters(params=list(self.model.state_dict(keep_vars=True).values()))
        return self

    def _prepare_here(self):
        if self.run_dir.is_dir() and self.world.main:
            self.lock.acquire()
        try:
            return self._prepare()
        except ValueError as e:  # raised while building data, model or method from the arguments
            self.close()
            raise RunError(str(e)) from None
        except BaseException:
            self.close()
            raise

    def close(self):
        """Release the run directory's lock (:meth:`run` does at its end)."""
        self.lock.release()

    def _prepare(self):
        self._check_run_dir()
        self._fill_options()
        s = self.settings
        self.config = self._run_config()
        self._check_world_size()
        self.device = local_device(resolve_device(s.device), self.world)
        if s.threads:
            torch.set_num_threads(s.threads)

        pyro.clear_param_store()
        pyro.set_rng_seed(s.seed)
        self.data = load_data(self.config, s.data_root)
        self.model = make_model(self.config, self.data, self.device)
        if s.model in ("cnn", "cnn-light") and tuple(self.data.image_shape) != (28, 28):
            h, w = self.data.image_shape
            print(
                f"{PROG} train: warning: --model {s.model} is the paper's network for 28x28 images (7x7 feature maps "
                f"after its strided convolutions); {s.dataset}'s {h}x{w} images leave it {math.ceil(h / 4)}x"
                f"{math.ceil(w / 4)}: an MLP (--model mlp) is the model for them",
                file=sys.stderr, flush=True,
            )
        if s.log_p_offset is None:  # the protocol's constant depends on the model's latent size
            offset = protocol_log_p_offset(s.protocol, s.method, self.model)
            self.settings = s = dataclasses.replace(s, log_p_offset=offset)
            self.config = self._run_config()
        self.method = make_method(self.config, self.model, distributed=self.world.distributed)
        self.variance_inputs = None
        if s.record_variance:  # the fixed subset of Figure 1
            self.variance_inputs = variance_subset(
                self.data, s.record_variance, s.seed, self.device, with_mask=s.method in MISSING_DATA_INPUTS
            )
        if self.world.distributed:  # the same model everywhere; from here on, particles of each rank's own
            pyro.set_rng_seed(self.world.seed(s.seed))
            self._check_shares()

        self.epoch = 0
        self.history = []
        self.best_valid = -math.inf
        self.best_epoch = None
        self.best_state = None
        self.bad_epochs = 0
        self.prior_seconds = 0.0
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        if not self.world.main:  # process 0 alone writes the run's files
            return self
        if self.lock.fd is None:  # the directory did not exist: create and lock it now
            self.lock.acquire()
            if not s.force and not s.resume and any((self.run_dir / n).exists() for n in (CHECKPOINT, METRICS)):
                raise RunError(f"another run started in {self.run_dir} while this one was setting up; give another --out")
        if s.force:
            for name in RUN_FILES:
                (self.run_dir / name).unlink(missing_ok=True)
        self._rewrite_best()
        return self

    def _run_config(self):
        """The settings that define the run, and the number of processes it runs on."""
        return {**run_config(self.settings), "world_size": self.world.size}

    def _check_world_size(self):
        """A run resumes on as many processes as it started on: each process's random stream
        is in the checkpoint, and so is which share of each batch it took."""
        saved = self.checkpoint["config"].get("world_size", 1) if self.checkpoint else self.world.size
        if saved != self.world.size:
            how = f"torchrun --nproc_per_node {saved} -m pyro_iwem train ..." if saved > 1 else "one process, without torchrun"
            raise RunError(
                f"{self.run_dir} was trained on {saved} process(es) and is resumed on {self.world.size}: resume it on "
                f"{saved} ({how}), or use --force to start over"
            )

    def _check_shares(self):
        """Every process needs a datum of every training batch: the last, incomplete one too."""
        s, n = self.settings, self.data.sizes()["train"]
        smallest = min(s.batch_size, n % s.batch_size or s.batch_size)
        if smallest < self.world.size:
            raise RunError(
                f"the training split's {n} images in batches of {s.batch_size} leave a last batch of {smallest}, fewer "
                f"than the {self.world.size} processes: each process needs a share of every batch; choose a "
                "--batch-size that leaves at least one image per process, or fewer processes"
            )

    def _rewrite_best(self):
        """A resumed run whose ``best.pt`` is missing or unreadable writes it again from the
        checkpoint's best parameters."""
        path = self.run_dir / BEST
        if self.checkpoint is None or self.best_state is None or (path.is_file() and readable(path)):
            return
        self._save_best(self.best_valid, self.best_epoch)
        self.log(f"wrote {path} again from {CHECKPOINT} (the best parameters, epoch {self.best_epoch})")

    def _save_best(self, valid_ll, epoch):
        if not self.world.main:
            return
        atomic_torch_save(
            {
                "model": self.best_state,
                "config": self.config,
                "epoch": epoch,
                "valid_ll": valid_ll,
                "data_root": self.settings.data_root,
            },
            self.run_dir / BEST,
        )

    def _restore(self, ckpt):
        restore_parameters(self.model, ckpt["model"], ckpt["param_store"])
        self.method.load_state_dict(ckpt["method"])
        self.epoch = ckpt["epoch"]
        self.history = list(ckpt["history"])
        self.best_valid = ckpt["best"]["valid_ll"]
        self.best_epoch = ckpt["best"]["epoch"]
        self.best_state = ckpt["best"]["model"]
        self.bad_epochs = ckpt["bad_epochs"]
        self.prior_seconds = ckpt["wall_seconds"]
        # last: building the model above drew random numbers; on several processes, each its own
        set_rng_state(ckpt["rng_ranks"][self.world.rank] if "rng_ranks" in ckpt else ckpt["rng"])

    # --- the loop -----------------------------------------------------------------------
    @property
    def done(self):
        return self.epoch >= self.settings.epochs or self.bad_epochs >= self.settings.patience

    def train_epoch(self):
        """One pass over the training batches; returns ``(loss per datum, mean ESS, α, mean bound)``.

        The bound is IWEM's :attr:`~pyro_iwem.infer.IWEM.bound` (the IWAE bound of its E-step
        particles, per datum): IWEM's loss is −Q̂_α, not a bound, so the bar shows the bound
        to set beside IWAE's loss. On several processes each steps on its share of every batch,
        its data plate of the share's size × the number of processes (the mean of the
        processes' gradients is then the whole batch's), and the numbers are the whole batch's."""
        from tqdm.auto import tqdm

        s, method, world = self.settings, self.method, self.world
        alpha = method.alpha
        masked = bool(s.missing_patches)
        batches = self.data.batches(
            "train", s.batch_size, epoch=self.epoch, seed=s.seed, device=self.device, with_mask=masked
        )
        total = self.data.num_batches("train", s.batch_size)
        bar = tqdm(
            batches,
            total=total,
            desc=f"epoch {self.epoch + 1}/{s.epochs}",
            disable=self.quiet or not world.main,
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        loss_sum, count = 0.0, 0
        means = {"ESS": _RunningMean(), "bound": _RunningMean()}
        kept = (
            f"the checkpoint of epoch {self.epoch} in {self.run_dir} is kept (try a smaller --lr)" if self.epoch
            else "no epoch had finished, so nothing was saved (try a smaller --lr)"
        )
        for step, batch in enumerate(bar, 1):
            share = world.share(batch)
            n, size = (len(batch[0]), len(share[0])) if masked else (len(batch), len(share))
            kwargs = {"data_size": world.size * size} if world.distributed else {}
            try:
                loss = method.step(*share, **kwargs) if masked else method.step(share, **kwargs)
            except ValueError as e:  # the method's refusal (NaN gradients) or torch's check of a parameter
                bar.close()
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise TrainingDiverged(f"training stopped in epoch {self.epoch + 1} at step {step}: {reason}; {kept}") from None
            ess, bound = method.ess, method.bound
            if world.distributed:  # the whole batch's: the loss summed, the ESS and the bound averaged
                loss, ess, bound = world.sum(loss / world.size, ess * size / n, bound * size / n)
            if not math.isfinite(loss):
                bar.close()
                raise TrainingDiverged(f"the training loss became {loss} in epoch {self.epoch + 1}; {kept}")
            loss_sum += loss
            count += n
            means["ESS"].add(ess)
            means["bound"].add(bound)
            postfix = {"loss": f"{loss_sum / count:.3f}"}
            if alpha is not None:
                postfix["α"] = f"{alpha:.2f}"
            postfix.update({name: f"{m.value:.2f}" for name, m in means.items() if m.count})
            bar.set_postfix(postfix, refresh=False)
        bar.close()
        return loss_sum / count, means["ESS"].value, alpha, means["bound"].value

    def validate(self):
        s = self.settings
        with torch.no_grad():
            return mean_log_likelihood(
                self.model, self.data, "valid", s.valid_K, s.eval_batch_size, self.device,
                s.score_inflation, gib(s.eval_memory), self.world,
            )

    def record_variance(self):
        """The history's variance entries after an epoch (``--record-variance N``): the mean
        and median over the first N training images of the per-datum variances of eqs. (2) and
        (3) at the current parameters, in a random stream of their own (training is unchanged);
        empty without the option (and on every process but process 0 of several)."""
        if self.variance_inputs is None or not self.world.main:
            return {}
        s = self.settings
        start = time.perf_counter()
        with torch.no_grad():
            variances = subset_variances(
                self.model, s.method, s.K, self.variance_inputs, s.variance_repeats, s.seed, self.epoch
            )
        return summary(variances) | {"variance_seconds": time.perf_counter() - start}

    def save_checkpoint(self, wall_seconds):
        """Writes the checkpoint (process 0), with every process's random state."""
        rng = self.world.gather(rng_state())
        if not self.world.main:
            return
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "config": self.config,
                "args": self._args_dict(),
                "epoch": self.epoch,
                "model": self.model.state_dict(),
                "param_store": pyro.get_param_store().get_state(),
                "method": self.method.state_dict(),
                "best": {"model": self.best_state, "valid_ll": self.best_valid, "epoch": self.best_epoch},
                "bad_epochs": self.bad_epochs,
                "history": self.history,
                "wall_seconds": wall_seconds,
                "rng": rng[0],
                "rng_ranks": rng,
            },
            self.run_dir / CHECKPOINT,
        )

    def _args_dict(self):
        """The checkpoint's ``args``: the settings, less where the run's files go and how to treat them."""
        skip = {"resume", "force", "quiet", "out"}
        return {f.name: getattr(self.settings, f.name) for f in dataclasses.fields(self.settings) if f.name not in skip}

    def run(self):
        """Train until ``--epochs`` or early stopping, then evaluate; returns the metrics.
        Releases the run directory's lock at the end."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self):
        s = self.settings
        start = time.perf_counter()
        if self.done and (self.run_dir / METRICS).is_file():
            metrics = read_json(self.run_dir / METRICS)
            self.log(f"{self.run_dir} is already finished (epoch {self.epoch}); nothing to do")
            return metrics
        main = self.world.main
        if main:
            (self.run_dir / METRICS).unlink(missing_ok=True)  # present only for finished runs
        if self.epoch:
            self.log(f"resuming {self.run_dir} after epoch {self.epoch}")
        scalar_log = ScalarLog(self.run_dir, self.history) if s.tensorboard and main else None
        listeners = (self.on_epoch + ([scalar_log.add] if scalar_log else [])) if main else []
        while not self.done:
            epoch_start = time.perf_counter()
            loss, ess, alpha, bound = self.train_epoch()
            self.method.end_epoch()
            valid_ll = self.validate()
            self.epoch += 1
            improved = valid_ll > self.best_valid
            if improved:
                self.best_valid, self.best_epoch = valid_ll, self.epoch
                self.best_state = clone_state_dict(self.model)
                self._save_best(valid_ll, self.epoch)
                self.bad_epochs = 0
            elif alpha is None or alpha >= 1:  # no patience is spent while annealing
                self.bad_epochs += 1
            seconds = time.perf_counter() - epoch_start
            variance = self.record_variance()
            self.history.append(
                {
                    "epoch": self.epoch,
                    "train_loss": loss,
                    "train_bound": bound,
                    "valid_ll": valid_ll,
                    "alpha": alpha,
                    "ess": ess,
                    "seconds": seconds,
                    **variance,
                }
            )
            self.save_checkpoint(self.prior_seconds + time.perf_counter() - start)
            self.log(
                f"epoch {self.epoch}/{s.epochs}  loss/datum {loss:.3f}  valid LL {valid_ll:.3f}"
                f"{' (best)' if improved else ''}  α {_fmt(alpha)}  ESS {_fmt(ess)}  bound {_fmt(bound)}  {seconds:.1f} s"
                + (f"  Var(Q̂) {variance['var_q_hat']:.4g}  Var(ELBO) {variance['var_elbo']:.4g}" if variance else "")
            )
            for listener in listeners:
                listener(self.history[-1])
        if self.bad_epochs >= s.patience:
            self.log(f"early stop: no validation gain in {self.bad_epochs} epochs at α = 1")
        metrics = self.finish(self.prior_seconds + time.perf_counter() - start)
        if scalar_log:
            scalar_log.add({"epoch": self.epoch, "test_ll": metrics["test_ll"]})
            scalar_log.close()
        return metrics

    # --- the end --------------------------------------------------------------------------
    def finish(self, train_wall_seconds):
        s, data = self.settings, self.data
        eval_start = time.perf_counter()
        if self.best_state is not None:  # None only if no validation score was finite
            self.model.load_state_dict(self.best_state)
        with torch.no_grad():
            test_ll = test_log_likelihood(
                self.model, data, s.eval_K, s.seed, s.eval_batch_size, self.device, s.score_inflation,
                gib(s.eval_memory), self.world,
            )
        eval_seconds = time.perf_counter() - eval_start
        if self.world.main:
            self._save_pictures()
        sizes = data.sizes()
        epoch_seconds = [h["seconds"] for h in self.history]
        metrics = {
            **self.config,
            "test_ll": test_ll,
            score_key(s.eval_K, s.score_inflation): test_ll,
            "best_valid_ll": self.best_valid,
            "best_epoch": self.best_epoch,
            "epochs": self.epoch,
            "max_epochs": s.epochs,
            "early_stopped": self.bad_epochs >= s.patience,
            "patience": s.patience,
            "eval_K": s.eval_K,
            "n_train": sizes["train"],
            "n_valid": sizes["valid"],
            "n_test": sizes["test"],
            "final_alpha": self.method.alpha,
            "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds),
            "train_seconds": train_wall_seconds,
            "eval_seconds": eval_seconds,
            "wall_seconds": train_wall_seconds + eval_seconds,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "data_root": str(data_root(s.data_root)),
            "note": data.note,
            **variance_metrics(
                self.history, len(self.variance_inputs[0]) if self.variance_inputs else None, s.variance_repeats, s.K
            ),
        }
        if self.world.main:
            atomic_write_json(metrics, self.run_dir / METRICS)
        return metrics

    def _save_pictures(self):
        """The sample grid, the learning curve and, with missing data, the completions."""
        s, data = self.settings, self.data
        pyro.set_rng_seed(s.seed)
        save_image_grid(self.model.sample(64), data.image_shape, self.run_dir / SAMPLES)
        title = f"{s.dataset} {s.model} {s.method} K={s.K} J={s.J} seed={s.seed}"
        if s.missing_patches:
            title += f", {s.missing_patches} patches missing"
        if self.world.distributed:
            title += f", {self.world.size} processes"
        save_learning_curve(self.history, self.run_dir / CURVE, title)
        if s.missing_patches:
            pyro.set_rng_seed(s.seed)
            with torch.no_grad():
                columns = completions(self.model, data, s.method, s.missing_patches, s.data_seed, device=self.device)
            save_completion_grid(columns, data.image_shape, self.run_dir / COMPLETIONS, title)


def summary_line(metrics, run_dir):
    """The one-line result of a run."""
    m = metrics
    inflation = m.get("score_inflation", 1.0)
    scored = f", proposal variance x {inflation:g}" if inflation != 1 else ""
    protocol = f" ({m['protocol']} protocol)" if m.get("protocol", "paper") != "paper" else ""
    return (
        f"{m['dataset']} {m['model']} {m['method']} K={m['K']} J={m['J']} seed={m['seed']}{protocol}: "
        f"test LL {m['test_ll']:.3f} nats (K={m['eval_K']}{scored}, {m['n_test']} images); "
        f"best valid {m['best_valid_ll']:.3f} at epoch {m['best_epoch']}/{m['epochs']}; "
        f"{m['seconds_per_epoch']:.1f} s/epoch, wall {m['wall_seconds']:.0f} s -> {run_dir}"
    )
