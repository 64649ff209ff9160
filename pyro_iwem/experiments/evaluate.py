"""Log-likelihood estimates: the validation score and the test log-likelihood (§5)."""

import os
import pathlib
import time

import pyro
import torch

from pyro_iwem.data.files import DATA_ENV_VAR
from pyro_iwem.infer import MISSING_DATA_INPUTS, Imputer, iwae_bound
from pyro_iwem.infer.traces import ParticleSampler

from .checkpoint import BEST, METRICS, atomic_write_json, read_json, torch_load
from .errors import RunError
from .setup import PLATES, load_data, make_model, resolve_device


def mean_log_likelihood(model, data, split, num_particles, batch_size=100, device=None, chunk_size=500):
    """Mean over a split of the per-datum IWAE bound with ``num_particles`` samples
    (:func:`~pyro_iwem.infer.iwae_bound`, log-mean-exp in float64); a float in nats."""
    sampler = ParticleSampler(model.model, model.guide, **PLATES)
    total, count = 0.0, 0
    for x in data.batches(split, batch_size, device=device):
        bound = iwae_bound(
            model.model, model.guide, x, num_particles=num_particles, chunk_size=chunk_size, sampler=sampler
        )
        total += bound.sum().item()
        count += len(x)
    return total / count


def test_log_likelihood(model, data, num_particles, seed, batch_size=100, device=None):
    """The test log-likelihood: :func:`mean_log_likelihood` of the test split with the
    global RNG seeded from ``seed`` first, so the same parameters give the same number."""
    pyro.set_rng_seed(seed)
    return mean_log_likelihood(model, data, "test", num_particles, batch_size, device)


def load_best(run_dir, device="cpu"):
    """The ``best.pt`` of a run directory (:class:`RunError` if there is none)."""
    path = pathlib.Path(run_dir) / BEST
    if not path.is_file():
        raise RunError(f"{run_dir} has no {BEST}: not a run directory, or no epoch finished yet")
    return torch_load(path, map_location=device)


def evaluate_run(
    run_dir, K=5000, data_root=None, device="cpu", batch_size=None, seed=None, threads=None, all_test=False
):
    """Recompute the test log-likelihood of a run's best parameters with K samples.

    Writes ``test_ll_K{K}`` (``test_ll_all_K{K}`` with ``all_test``: the whole test split,
    whatever ``--max-eval`` the run used) into the run's ``metrics.json`` (when it exists)
    and returns ``(test_ll, metrics_or_None, seconds)``.
    """
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    best = load_best(run_dir, device)
    config = dict(best["config"], max_eval=None) if all_test else best["config"]
    batch_size = config["eval_batch_size"] if batch_size is None else batch_size
    seed = config["seed"] if seed is None else seed
    if data_root is None and not os.environ.get(DATA_ENV_VAR):
        data_root = best.get("data_root")  # the run's own --data-root, if it had one
    data = load_data(config, data_root)
    pyro.clear_param_store()
    model = make_model(config, data, device)
    model.load_state_dict(best["model"])
    start = time.perf_counter()
    with torch.no_grad():
        test_ll = test_log_likelihood(model, data, K, seed, batch_size, device)
    seconds = time.perf_counter() - start
    metrics_path = pathlib.Path(run_dir) / METRICS
    metrics = None
    if metrics_path.is_file():
        metrics = read_json(metrics_path)
        metrics[f"test_ll_{'all_' if all_test else ''}K{K}"] = test_ll
        metrics.setdefault("eval_seconds_by_K", {})[str(K)] = seconds
        atomic_write_json(metrics, metrics_path)
    return test_ll, metrics, seconds


def completions(model, data, method, n_removed, seed, n_images=8, num_particles=1000, device=None):
    """Figure 5's columns for ``n_images`` test images spread over the (class-sorted) test split,
    each missing ``n_removed`` random patches: the observed image (missing pixels grey), the
    truth, the importance-weighted mean completion (:meth:`~pyro_iwem.infer.Imputer.mean`, with
    ``num_particles`` samples) and two resampled completions (:meth:`~pyro_iwem.infer.Imputer.sample`),
    all with the proposal of ``method``. Returns a dict of ``(n_images, H*W)`` tensors."""
    index = torch.linspace(0, len(data.test) - 1, n_images).long()
    x = data.test[index].to(device)
    mask = data.missing_patches_mask("test", n_removed, seed)[index].to(device)
    # the imputer never reads x's masked pixels (the guide sees them filled, the model masks them)
    imputer = Imputer(model.model, model.guide, guide_inputs=MISSING_DATA_INPUTS[method](), **PLATES)
    return {
        "observed": torch.where(mask, x, torch.full_like(x, 0.5)),
        "truth": x,
        f"IW mean (K={num_particles})": imputer.mean(x, mask, num_particles=num_particles),
        "draw 1": imputer.sample(x, mask, num_particles=100),
        "draw 2": imputer.sample(x, mask, num_particles=100),
    }
