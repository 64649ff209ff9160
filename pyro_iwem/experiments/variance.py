"""The variance of the E-step estimate on a fixed subset of the training data (the paper's §3.3).

* ``train --record-variance N``: after every epoch, :func:`subset_variances` of the first N
  training images (:func:`variance_subset`) at the current parameters, averaged over them
  (:func:`summary`), goes into the run's history, and :func:`variance_metrics` into its
  ``metrics.json`` (Figure 1's curve). It draws from a random stream of its own, seeded from
  ``(seed, epoch)``, and puts the global generators back: a run trains exactly as it would
  without recording.
* ``figures`` (:mod:`.figures`): the same variances at a run's ``best.pt`` (Figures 2 and 4).
"""

import contextlib

import pyro
import torch

from pyro_iwem.data.rng import derive_seed
from pyro_iwem.infer import MISSING_DATA_INPUTS, ParticleSampler, VarianceEstimate, estimate_variance

from .checkpoint import rng_state, set_rng_state
from .setup import PLATES

#: Mixed into the seed of the variance's random stream (the data package uses 0-4).
STREAM_VARIANCE = 5


def variance_subset(data, num_data, seed, device=None, with_mask=False):
    """The model's arguments for the first ``num_data`` training images (all, if fewer): ``(x,)``,
    or ``(x, mask)`` with ``with_mask`` (missing pixels set to 0, as in training). Dynamic data
    are binarised once, as in epoch 0 (``seed``): the subset is the same at every epoch."""
    x = data.binarized("train", 0, seed)[:num_data]
    if not with_mask:
        return (x.to(device),)
    mask = data.train_mask[:num_data] if data.train_mask is not None else torch.ones_like(x, dtype=torch.bool)
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype))
    return x.to(device), mask.to(device)


@contextlib.contextmanager
def own_random_stream(*keys):
    """Seed every generator from ``derive_seed(*keys)`` and restore their states on exit."""
    state = rng_state()
    try:
        pyro.set_rng_seed(derive_seed(*keys) % 2**32)
        yield
    finally:
        set_rng_state(state)


def subset_variances(model, method, K, inputs, num_repeats, seed, epoch):
    """Per-datum :func:`~pyro_iwem.infer.estimate_variance` of eqs. (2) and (3) with the
    proposal of ``method`` (miss-IWEM's completion, missIWAE's zero filling), K particles and
    ``num_repeats`` repeats, in the random stream of ``(seed, epoch)``; the caller's generators
    are left as they were."""
    guide_inputs = MISSING_DATA_INPUTS[method]() if method in MISSING_DATA_INPUTS else None
    sampler = ParticleSampler(model.model, model.guide, guide_inputs=guide_inputs, **PLATES)
    with own_random_stream(seed, STREAM_VARIANCE, epoch):
        return estimate_variance(
            model.model, model.guide, *inputs, num_particles=K, num_repeats=num_repeats, sampler=sampler
        )


def summary(variances):
    """The history's entry of one recording: means (the paper's) and medians over the data."""
    entry = {}
    for name, values in variances._asdict().items():
        entry[f"var_{name}"] = values.mean().item()
        entry[f"var_{name}_median"] = values.median().item()
    return entry


def variance_metrics(history, num_data, num_repeats, K):
    """``metrics.json``'s record of the variances per epoch (empty if none was recorded):
    the last recorded values at the top level (``var_q_hat``, ``var_elbo``, for ``table
    --metric``) and the per-epoch lists under ``variance``."""
    recorded = [h for h in history if h.get("var_q_hat") is not None]
    if not recorded:
        return {}
    keys = [f"var_{name}{suffix}" for name in VarianceEstimate._fields for suffix in ("", "_median")]
    per_epoch = {key: [h.get(key) for h in recorded] for key in keys}
    return {
        **{f"var_{name}": recorded[-1].get(f"var_{name}") for name in VarianceEstimate._fields},
        "variance": {
            "num_data": num_data,
            "num_repeats": num_repeats,
            "K": K,
            "epoch": [h["epoch"] for h in recorded],
            **{key[4:]: values for key, values in per_epoch.items()},
        },
    }
