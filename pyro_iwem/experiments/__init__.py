"""The ``pyro-iwem`` command line: train, evaluate, tabulate, plot and sweep the paper's experiments.

* :mod:`.cli` -- argument parsing and one-line errors (``pyro-iwem``, ``python -m pyro_iwem``);
* :mod:`.train` -- :class:`~.train.Trainer`, the epoch loop with validation, early stopping,
  checkpoints and the final test log-likelihood;
* :mod:`.checkpoint` -- atomic files, run state (parameters, optimiser, annealing, RNG);
* :mod:`.evaluate` -- the test log-likelihood of a run's best parameters;
* :mod:`.table` -- Table-1-style summaries of many runs;
* :mod:`.figures` -- the variance of the E-step per epoch (``train --record-variance``) and
  the paper's Figures 1, 2 and 4 (``figures``);
* :mod:`.sweep` -- grids of runs, each a subprocess, resumable;
* :mod:`.images` -- PNG sample grids and learning curves.
"""

from .errors import RunError

__all__ = ["RunError"]
