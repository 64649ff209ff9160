"""Log-likelihood estimates: the validation score and the test log-likelihood (§5), and the
test log-likelihood with a refitted encoder (:func:`refit_encoder`), which scores the decoder
independently of the proposal the method trained."""

import copy
import hashlib
import itertools
import os
import pathlib
import time
from typing import NamedTuple, Optional

import pyro
import torch

from pyro_iwem.data.files import DATA_ENV_VAR
from pyro_iwem.infer import MISSING_DATA_INPUTS, IWAELoss, Imputer, iwae_bound
from pyro_iwem.infer.evaluation import PROBE_PARTICLES, budget_chunk
from pyro_iwem.infer.sampler import ParticleSampler
from pyro_iwem.models.layers import glorot_init_

from .checkpoint import (
    BEST,
    METRICS,
    atomic_torch_save,
    atomic_write_json,
    clone_state_dict,
    read_json,
    rng_state,
    set_rng_state,
    torch_load,
)
from .errors import RunError
from .setup import PLATES, load_data, make_model, resolve_device
from .world import SOLO

#: bytes the evaluation's chunk of particles may hold at its peak (``--eval-memory``, in GiB)
EVAL_MEMORY_BUDGET = 2**30
#: particles per chunk of the evaluation's bounds where the memory budget allows it
EVAL_CHUNK = 500


def gib(value):
    """``value`` GiB in bytes."""
    return int(value * 2**30)


def mean_log_likelihood(
    model, data, split, num_particles, batch_size=100, device=None, inflation=1.0, memory_budget=EVAL_MEMORY_BUDGET,
    world=SOLO,
):
    """Mean over a split of the per-datum IWAE bound with ``num_particles`` samples
    (:func:`~pyro_iwem.infer.iwae_bound`, log-mean-exp in float64), drawn from the guide with
    its variance multiplied by ``inflation`` (1: the guide itself); a float in nats.

    The samples are drawn in chunks of :func:`eval_chunk_size` particles, which keeps a
    chunk's peak memory under ``memory_budget`` bytes. On the processes of a ``world``
    (:class:`~.world.World`) each bounds every ``world.size``-th batch and the sums are added up."""
    sampler = ParticleSampler(model.model, model.guide, **PLATES)
    total, count = 0.0, 0
    chunk_size = None
    for index, x in enumerate(data.batches(split, batch_size, device=device)):
        if not world.owns(index):
            continue
        if chunk_size is None:
            chunk_size = eval_chunk_size(model, x, memory_budget, inflation)
        bound = iwae_bound(
            model.model, model.guide, x, num_particles=num_particles, chunk_size=chunk_size, sampler=sampler,
            inflation=inflation,
        )
        total += bound.sum().item()
        count += len(x)
    total, count = world.sum(total, count)
    return total / count


def eval_chunk_size(model, x, memory_budget, inflation=1.0):
    """Particles per chunk of the evaluation's bounds on batches like ``x``: :data:`EVAL_CHUNK`,
    or as many as fit in ``memory_budget`` bytes at a chunk's peak if that is fewer (a probe
    of ``PROBE_PARTICLES`` particles of ``x``, measured by
    :func:`~pyro_iwem.infer.evaluation.budget_chunk` and drawn from a copy of the random
    state). The chunk size decides how the random numbers fall on the particles, so a fixed
    size keeps every score reproducible; the budget only cuts it where it would not fit (the
    CNN: about 0.8 MB per image and particle, 40 GB for chunks of 500 at batch 100)."""
    probe = ParticleSampler(model.model, model.guide, **PLATES)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        chunk, _ = budget_chunk(
            lambda: probe(PROBE_PARTICLES, (x,), {}, grad_guide=False, inflation=inflation),
            PROBE_PARTICLES, memory_budget, x.device,
        )
    return min(EVAL_CHUNK, chunk)


def test_log_likelihood(
    model, data, num_particles, seed, batch_size=100, device=None, inflation=1.0, memory_budget=EVAL_MEMORY_BUDGET,
    world=SOLO,
):
    """The test log-likelihood: :func:`mean_log_likelihood` of the test split with the
    global RNG seeded from ``seed`` first (each process of a ``world`` from a seed of its
    own), so the same parameters give the same number."""
    pyro.set_rng_seed(world.seed(seed))
    return mean_log_likelihood(model, data, "test", num_particles, batch_size, device, inflation, memory_budget, world)


def score_key(K, inflation=1.0, all_test=False, refit_steps=None):
    """The ``metrics.json`` key of a test score: ``test_ll_K<K>``, with ``all_`` for the whole
    test split, ``refit<steps>_`` for a refitted encoder and ``inflated<c>_`` for a proposal
    with its variance multiplied by c ≠ 1 (e.g. ``test_ll_all_inflated1.5_K5000``), so that the
    scores of one run made different ways are recorded side by side."""
    return (
        "test_ll_"
        + ("all_" if all_test else "")
        + (f"refit{refit_steps}_" if refit_steps is not None else "")
        + (f"inflated{inflation:g}_" if inflation != 1 else "")
        + f"K{K}"
    )


def load_best(run_dir, device="cpu"):
    """The ``best.pt`` of a run directory (:class:`RunError` if there is none)."""
    path = pathlib.Path(run_dir) / BEST
    if not path.parent.exists():
        raise RunError(f"{run_dir} does not exist")
    if not path.parent.is_dir():
        raise RunError(f"{run_dir} is not a directory (give a run directory, which holds {BEST})")
    if not path.is_file():
        raise RunError(f"{run_dir} has no {BEST}: not a run directory, or no epoch finished yet")
    return torch_load(path, map_location=device)


def load_run(run_dir, device="cpu", data_root=None, all_test=False):
    """A run's best parameters, ready to score: ``(config, data, model)``.

    ``config`` is the run's (with ``max_eval=None`` if ``all_test``), ``data`` its data set
    (from ``data_root``, else ``$PYRO_IWEM_DATA``, else the run's own data root) and ``model``
    its model with ``best.pt``'s parameters, on ``device``; Pyro's param store is cleared."""
    best = load_best(run_dir, device)
    config = dict(best["config"], max_eval=None) if all_test else best["config"]
    if data_root is None and not os.environ.get(DATA_ENV_VAR):
        data_root = best.get("data_root")  # the run's own --data-root, if it had one
    data = load_data(config, data_root)
    pyro.clear_param_store()
    model = make_model(config, data, device)
    try:
        model.load_state_dict(best["model"])
    except RuntimeError as e:
        hint = ""
        if config["model"] == "cnn":
            hint = "; runs of the CNN made before --model cnn became the paper's network are --model cnn-light runs"
        first = str(e).strip().splitlines()[0]
        raise RunError(f"{run_dir}/{BEST} does not fit the {config['model']!r} model ({first}){hint}") from None
    return config, data, model


def reinitialise_(module, seed):
    """Draw ``module``'s parameters afresh, in place, as this package's models draw them when
    built: each layer's own ``reset_parameters()``, then Glorot-uniform weights and zero biases
    (:func:`~pyro_iwem.models.layers.glorot_init_`), with the global RNGs seeded from ``seed``
    first. The parameter tensors are kept (their values change). Returns ``module``."""
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            reset = getattr(layer, "reset_parameters", None)
            if callable(reset):
                reset()
    return glorot_init_(module)


def refit_encoder(
    model,
    data,
    steps,
    num_particles=50,
    batch_size=100,
    lr=5e-4,
    seed=0,
    device=None,
    state=None,
    checkpoint_every=None,
    on_checkpoint=None,
    progress=False,
):
    r"""Fit a fresh encoder to a model's frozen decoder with IWAE, for a test score that does
    not depend on the proposal a method trained.

    A run's test log-likelihood is the IWAE bound with its own proposal,

    .. math::

        \hat L_K(x; \theta, \phi) = \log \frac{1}{K} \sum_{k=1}^K
        \frac{p(x, z_k; \theta)}{q(z_k \mid x; \phi)}, \qquad z_k \sim q(z \mid x; \phi),

    whose expectation is :math:`\log p(x; \theta)` less a gap that depends on φ. Methods
    fit φ to different targets (IWEM's P-step fits q to :math:`|\log p| \, p`, not to the
    posterior), so their scores differ partly by their proposals. This function replaces φ by
    one fitted the same way for every run, in place:

    1. θ, every parameter of ``model`` outside ``model.encoder``, is frozen (``requires_grad``
       off and the other child modules in eval mode while fitting, restored afterwards) and
       checked to be bitwise unchanged at the end (``RuntimeError`` otherwise);
    2. the encoder is drawn afresh as at construction, from ``seed`` (``reinitialise_``);
    3. ``steps`` Adam steps (learning rate ``lr``) on the encoder's parameters alone, each on
       :class:`~pyro_iwem.infer.IWAELoss`'s gradient with K' = ``num_particles`` particles on
       a minibatch of ``batch_size`` training images (shuffled, epoch after epoch, as
       ``data.batches("train", ...)`` deals them with ``seed``; complete images, whatever mask
       the data carry), maximise :math:`\mathbb{E}\,\hat L_{K'}(x; \theta, \phi)` over φ
       with θ fixed.

    The refitted score is then :math:`\hat L_K(x; \theta, \phi^*)` with the fitted
    :math:`\phi^*` on the test images (``test_log_likelihood``). It is a stochastic lower
    bound of :math:`\log p(x; \theta)` like the plain one, whatever φ* is, so of two runs'
    decoders the one with the higher refitted score is the better one as far as the fixed
    fitting budget can tell, whichever method trained it. The draws (initialisation, batches,
    particles) come from the global RNGs seeded from ``seed``, so a call is repeatable.

    Pyro's param store is cleared first (it must hold the encoder's own tensors).

    :param model: a model of :mod:`pyro_iwem.models` (``model.model``, ``model.guide`` and
        ``model.encoder``, the guide's parameters).
    :param data: an :class:`~pyro_iwem.data.ImageData`.
    :param int steps: Adam steps, counted from the start of the fit (a resumed fit continues
        to the same total).
    :param int num_particles: particles K' of the IWAE loss.
    :param int batch_size: training images per step.
    :param float lr: Adam's learning rate.
    :param int seed: seed of the initialisation, the batches and the particles.
    :param device: where the batches go (the model's device).
    :param dict state: a state that ``on_checkpoint`` received, to resume the fit from; the
        resumed fit ends exactly where an uninterrupted one would.
    :param int checkpoint_every: call ``on_checkpoint`` every this many steps (and at the end).
    :param on_checkpoint: ``on_checkpoint(state)``, with ``state`` a dict of plain CPU-side
        copies (``step``, ``encoder``, ``optim``, ``rng``, ``settings``, ``bounds``,
        ``train_bound``, ``seconds``).
    :param bool progress: show a progress bar on stderr.
    :returns: the final state (as ``on_checkpoint`` gets it): ``train_bound`` is the mean
        training IWAE bound per datum (K' particles) over the last epoch's worth of steps,
        ``seconds`` the time spent fitting.
    """
    from tqdm.auto import tqdm

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    settings = {"num_particles": num_particles, "batch_size": batch_size, "lr": lr, "seed": seed}
    encoder = model.encoder
    params = list(encoder.parameters())
    own = {id(p) for p in params}
    frozen = [(name, p) for name, p in model.named_parameters() if id(p) not in own]
    before = [p.detach().clone() for _, p in frozen]
    grad_flags = [p.requires_grad for _, p in frozen]
    others = [m for m in model.children() if m is not encoder]
    training = [m.training for m in others]

    pyro.clear_param_store()
    optim = torch.optim.Adam(params, lr=lr)
    n_batches = data.num_batches("train", batch_size)
    if state is None:
        reinitialise_(encoder, seed)
        step, prior_seconds, bounds = 0, 0.0, []
    else:
        if state["settings"] != settings:
            raise ValueError(f"cannot resume a refit made with {state['settings']} with {settings}")
        encoder.load_state_dict(state["encoder"])
        optim.load_state_dict(state["optim"])
        set_rng_state(state["rng"])
        step, prior_seconds, bounds = state["step"], state["seconds"], list(state["bounds"])
    bounds = bounds[-n_batches:]
    loss = IWAELoss(num_particles, **PLATES)
    start = time.perf_counter()

    def snapshot():
        return {
            "step": step,
            "encoder": clone_state_dict(encoder),
            "optim": copy.deepcopy(optim.state_dict()),
            "rng": rng_state(),
            "settings": dict(settings),
            "bounds": list(bounds),
            "train_bound": sum(bounds) / len(bounds) if bounds else float("nan"),
            "seconds": prior_seconds + time.perf_counter() - start,
        }

    bar = tqdm(total=steps, initial=step, desc="refit encoder", disable=True if not progress else None,
               leave=False, dynamic_ncols=True)
    try:
        for _, p in frozen:
            p.requires_grad_(False)
        for m in others:
            m.train(False)
        while step < steps:
            epoch, skip = divmod(step, n_batches)
            batches = data.batches("train", batch_size, epoch=epoch, seed=seed, device=device)
            for x in itertools.islice(batches, skip, skip + steps - step):
                value = loss.loss_and_grads(model.model, model.guide, x)
                optim.step()
                optim.zero_grad(set_to_none=True)
                step += 1
                bounds = (bounds + [-value / len(x)])[-n_batches:]
                bar.update()
                if step % 10 == 0:
                    bar.set_postfix({"bound": f"{sum(bounds) / len(bounds):.2f}"}, refresh=False)
                if on_checkpoint is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
                    on_checkpoint(snapshot())
    finally:
        bar.close()
        for (_, p), flag in zip(frozen, grad_flags):
            p.requires_grad_(flag)
        for m, flag in zip(others, training):
            m.train(flag)
    changed = [name for (name, p), old in zip(frozen, before) if not torch.equal(p.detach(), old)]
    if changed:
        raise RuntimeError(f"refit_encoder changed parameters outside the encoder: {', '.join(changed)}")
    final = snapshot()
    if on_checkpoint is not None:
        on_checkpoint(final)
    return final


def decoder_fingerprint(model):
    """A SHA-256 hex digest of every parameter and buffer of ``model`` outside ``model.encoder``:
    a refit is reused only for the parameters it was fitted to."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if not name.startswith("encoder."):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


#: Steps between the saved states of a refit (``evaluate --refit-encoder``), to resume from.
REFIT_CHECKPOINT_EVERY = 500


def refit_file(steps, settings):
    """The file name of a refit's state in the run directory."""
    s = settings
    return f"refit-{steps}-K{s['num_particles']}-lr{s['lr']:g}-b{s['batch_size']}-s{s['seed']}.pt"


class Evaluation(NamedTuple):
    """What :func:`evaluate_run` computed: the plain test score and, with a refit, the refitted one."""

    test_ll: float
    metrics: Optional[dict]
    seconds: float
    refit_ll: Optional[float] = None
    refit: Optional[dict] = None
    #: the plain score's key in ``metrics.json`` (:func:`score_key`) and the inflation it was scored with
    key: str = ""
    inflation: float = 1.0


def evaluate_run(
    run_dir,
    K=5000,
    data_root=None,
    device="cpu",
    batch_size=None,
    seed=None,
    threads=None,
    all_test=False,
    refit_steps=None,
    refit_K=50,
    refit_lr=None,
    progress=False,
    inflation=None,
    memory_budget=EVAL_MEMORY_BUDGET,
):
    """Recompute the test log-likelihood of a run's best parameters with K samples.

    Writes ``test_ll_K{K}`` (``test_ll_all_K{K}`` with ``all_test``: the whole test split,
    whatever ``--max-eval`` the run used) into the run's ``metrics.json`` (when it exists).

    ``inflation`` scores with the proposal's variance multiplied by that factor (default: the
    run's own ``score_inflation``, 1 for runs made before it existed); a factor other than 1 is
    recorded under its own key, ``test_ll_inflated{c}_K{K}`` (:func:`score_key`), beside the plain score.

    With ``refit_steps``, also the score with a refitted encoder (:func:`refit_encoder`:
    ``refit_steps`` IWAE steps with ``refit_K`` particles, learning rate ``refit_lr`` (default
    the run's), the run's batch size and training images, seeded with ``seed``), recorded as
    ``test_ll_refit{refit_steps}_K{K}`` (``test_ll_all_refit...`` with ``all_test``) with its
    settings under ``refit``. The fit's state is saved in the run directory every
    :data:`REFIT_CHECKPOINT_EVERY` steps and at its end: an interrupted fit resumes, a finished
    one is reused (only for the same best parameters and settings).

    ``memory_budget``: bytes a chunk of the bound's particles may hold at its peak
    (:func:`mean_log_likelihood`).

    :returns: an :class:`Evaluation`.
    """
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    run_dir = pathlib.Path(run_dir)
    config, data, model = load_run(run_dir, device, data_root, all_test)
    batch_size = config["eval_batch_size"] if batch_size is None else batch_size
    seed = config["seed"] if seed is None else seed
    inflation = config.get("score_inflation", 1.0) if inflation is None else inflation
    start = time.perf_counter()
    with torch.no_grad():
        test_ll = test_log_likelihood(model, data, K, seed, batch_size, device, inflation, memory_budget)
    seconds = time.perf_counter() - start
    results = {score_key(K, inflation, all_test): test_ll}

    refit_ll = refit = None
    if refit_steps is not None:
        lr = config["lr"] if refit_lr is None else refit_lr
        settings = {"num_particles": refit_K, "batch_size": config["batch_size"], "lr": lr, "seed": seed}
        path = run_dir / refit_file(refit_steps, settings)
        fingerprint = decoder_fingerprint(model)
        state = None
        if path.is_file():
            saved = torch_load(path, map_location=device)
            if saved.get("fingerprint") == fingerprint and saved.get("settings") == settings:
                state = saved

        def save(snapshot):
            atomic_torch_save({**snapshot, "fingerprint": fingerprint, "total_steps": refit_steps}, path)

        if state is not None and state["step"] == refit_steps:
            model.encoder.load_state_dict(state["encoder"])
            fitted = state
        else:
            fitted = refit_encoder(
                model, data, refit_steps, refit_K, config["batch_size"], lr, seed, device, state=state,
                checkpoint_every=REFIT_CHECKPOINT_EVERY, on_checkpoint=save, progress=progress,
            )
        eval_start = time.perf_counter()
        with torch.no_grad():
            refit_ll = test_log_likelihood(model, data, K, seed, batch_size, device, inflation, memory_budget)
        key = score_key(K, inflation, all_test, refit_steps)
        results[key] = refit_ll
        refit = {
            "key": key,
            "steps": refit_steps,
            **settings,
            "train_bound": fitted["train_bound"],
            "refit_seconds": fitted["seconds"],
            "eval_seconds": time.perf_counter() - eval_start,
            "file": path.name,
        }

    metrics_path = run_dir / METRICS
    metrics = None
    if metrics_path.is_file():
        metrics = read_json(metrics_path)
        metrics.update(results)
        metrics.setdefault("eval_seconds_by_K", {})[str(K)] = seconds
        if refit is not None:
            metrics.setdefault("refit", {})[refit["key"]] = {k: v for k, v in refit.items() if k != "key"}
        atomic_write_json(metrics, metrics_path)
    return Evaluation(test_ll, metrics, seconds, refit_ll, refit, score_key(K, inflation, all_test), inflation)


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
