"""The ``pyro-iwem`` command line: train, evaluate, tabulate, plot and sweep the paper's experiments.

* :mod:`.options` -- every command's options (``build_parser``; a new option goes here) and
  :class:`~.options.TrainConfig`, the frozen settings of one training run;
* :mod:`.cli` -- runs the parsed command (``pyro-iwem``, ``python -m pyro_iwem``), with one-line errors;
* :mod:`.setup` -- what a run is made of: defaults, protocols, data, model and method;
* :mod:`.train` -- :class:`~.train.Trainer`, the epoch loop with validation, early stopping,
  checkpoints and the final test log-likelihood;
* :mod:`.checkpoint` -- atomic files, run state (parameters, optimiser, annealing, RNG);
* :mod:`.evaluate` -- the test log-likelihood of a run's best parameters;
* :mod:`.table` -- Table-1-style summaries of many runs;
* :mod:`.variance` -- the variance of the E-step on a fixed subset of the training data
  (``train --record-variance``);
* :mod:`.figures` -- the paper's Figures 1, 2 and 4 (``figures``);
* :mod:`.sweep` -- grids of runs on Ray (this machine or a cluster): each run is one Ray task,
  a :class:`~.train.Trainer` in a worker process, retried from its checkpoint if the worker
  dies; finished runs are skipped, so the same command continues a sweep;
* :mod:`.impute` -- the MIWAE imputation protocol on numeric tables (``impute``);
* :mod:`.images` -- PNG sample grids and learning curves;
* :mod:`.tensorboard` -- the per-epoch metrics as TensorBoard scalars (``train --tensorboard``).
"""

from .errors import RunError

__all__ = ["RunError"]
