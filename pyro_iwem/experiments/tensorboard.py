"""A run's learning curves as TensorBoard scalars (``train --tensorboard``).

The event files under ``RUN_DIR/tensorboard`` are derived from the checkpoint's history: a
resumed run rewrites them from that history, so an interruption between a checkpoint and
its scalars loses nothing and repeats nothing. ``tensorboard --logdir SWEEP_DIR`` then shows
every run of a sweep side by side, live.
"""

import math
import numbers
import shutil

from .errors import RunError

#: The event files' directory inside a run directory.
TENSORBOARD_DIR = "tensorboard"

INSTALL_HINT = "pip install 'pyro-iwem[tensorboard]'"


def scalars(record):
    """The ``(tag, value)`` pairs of one history record: every finite number in it but the
    epoch, which is the step (``train_loss``, ``train_bound``, ``valid_ll``, ``alpha``,
    ``ess``, ``seconds``, and ``var_q_hat``, ``var_elbo``, ... when recorded)."""
    return [
        (key, float(value))
        for key, value in record.items()
        if key != "epoch"
        and isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
    ]


class ScalarLog:
    """Per-epoch scalars of one run, one tag per history entry, step = epoch.

    :param run_dir: the run directory; events go to ``run_dir/tensorboard``, which is
        cleared first.
    :param history: the records of the epochs already trained (a resumed run's), written
        again.
    """

    def __init__(self, run_dir, history=()):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RunError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT}") from None
        self.logdir = run_dir / TENSORBOARD_DIR
        shutil.rmtree(self.logdir, ignore_errors=True)
        self.writer = SummaryWriter(str(self.logdir))
        for record in history:
            self.add(record, flush=False)
        self.writer.flush()

    def add(self, record, flush=True):
        """Write one history record (a dict with an ``"epoch"``)."""
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, record["epoch"])
        if flush:
            self.writer.flush()

    def close(self):
        self.writer.close()
