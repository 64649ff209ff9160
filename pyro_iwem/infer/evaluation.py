"""The IWAE bound with many samples: the test log-likelihood of the paper (§5)."""

import math
import weakref
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .objectives import (
    check_num_global_particles, effective_sample_size, nested_draws, nested_outer_bound, nested_terms,
)
from .sampler import ParticleSampler
from .transforms import ReplayGlobals
from .util import device_of

#: particles of the first chunk when the chunk size is chosen from a memory budget
PROBE_PARTICLES = 16
#: the largest chunk chosen on the CPU, where larger chunks only run slower (caches)
CPU_MAX_CHUNK = 512


def iwae_bound(
    model,
    guide,
    *args,
    num_particles=5000,
    chunk_size=None,
    memory_budget=2**30,
    sampler=None,
    vectorize_particles=True,
    inflation=1.0,
    global_particles=1,
    **kwargs,
):
    r"""Per-datum IWAE bound :math:`\log \frac{1}{K} \sum_{k=1}^K p(x_i, z_k) / q(z_k \mid x_i)`;
    with global latents :math:`\beta`, each datum's share of L_K per datum.

    With globals (latents outside the data plate) one :math:`\beta \sim q(\beta)` is drawn
    and every chunk is drawn given it; the value for datum :math:`i` of the ``B`` is

    .. math::
        b_i = \log \frac1K \sum_{k=1}^K \frac{p(x_i, z_{ik} \mid \beta)}{q(z_{ik} \mid x_i, \beta)}
            + \frac{1}{N} \big(\log p(\beta) - \log q(\beta)\big),

    with :math:`N` the data plate's full size, so that :math:`\frac NB \sum_i b_i` is one draw of
    L_K (:func:`~pyro_iwem.infer.objectives.outer_bound`), whose expectation is at most
    :math:`\log p(x)` (by :math:`\mathrm{KL}(q(\beta) \| p(\beta \mid x))` as K grows), and the mean
    of :math:`b_i` is comparable with :math:`\log p(x) / N`. Under subsampling it stays a bound in
    expectation (the :math:`N/B` is outside the log-mean-exp).

    The K = ``num_particles`` samples are drawn a chunk at a time (so K = 5000 fits in
    memory); each chunk's log weights are cast to float64 and folded into a running
    :math:`\mathrm{logsumexp}`, so the log-mean-exp is accumulated in float64. Runs without
    gradients. Returns a float64 tensor of shape ``(B,)`` (``(1,)`` for a model without a
    data plate). The bound is a lower bound of :math:`\log p(x_i)` that tightens as K grows.

    With a subsampled data plate every chunk is drawn on the minibatch the first chunk drew,
    so the weights of one datum are never pooled with another's; the bound is that
    minibatch's. Enumerated model sites are summed out; a non-reparameterised guide is fine.

    :param int chunk_size: particles per chunk; ``None`` (default) chooses it from
        ``memory_budget``: the first chunk, of ``PROBE_PARTICLES`` (16) particles (one when they
        are drawn one at a time), is measured
        (``peak_memory``: the allocator's peak on CUDA, the peak of live tensor bytes on the
        CPU) and the others hold as many particles as the budget allows (on the CPU at most
        512, beyond which chunks only run slower).
    :param int memory_budget: bytes a chunk may use at its peak (default 1 GiB).
    :param sampler: an optional :class:`ParticleSampler` for (model, guide), to reuse its
        plate settings; built from ``model`` and ``guide`` otherwise.
    :param bool vectorize_particles: as for :class:`ParticleSampler` (ignored with ``sampler``).
    :param float inflation: draw the samples from the guide with its variance multiplied by
        this factor, :math:`q_c` (:class:`ProposalInflation`), and weight them by
        :math:`p / q_c`: still a lower bound of :math:`\log p(x_i)`, tightening as K grows,
        whatever the factor (the official code scores every method with :math:`c = 1.5`).
    :param int global_particles: M draws of the globals: M > 1 returns the nested bound of
        :func:`nested_bound` (full batch only), divided equally among the data
        (``bound / B`` each), tighter than L_K; default 1, L_K.
    """
    if num_particles < 1 or (chunk_size is not None and chunk_size < 1) or memory_budget <= 0:
        raise ValueError(
            f"num_particles and chunk_size must be >= 1 and memory_budget > 0, got {num_particles}, "
            f"{chunk_size} and {memory_budget}"
        )
    sampler = ParticleSampler(model, guide, vectorize_particles=vectorize_particles) if sampler is None else sampler
    check_num_global_particles(global_particles)
    with torch.no_grad():
        if global_particles == 1:
            [draw] = _bounds_given_globals(sampler, args, kwargs, num_particles, chunk_size, memory_budget, inflation, 1)
            return draw.inner + draw.log_global_w / draw.data_size
        return _nested(sampler, args, kwargs, num_particles, chunk_size, memory_budget, inflation, global_particles).per_datum


class NestedBound(NamedTuple):
    r"""The nested bound of :func:`nested_bound` with its diagnostics."""

    #: :math:`\log \frac1M \sum_m \frac{p(\beta_m)}{q(\beta_m)} \prod_i \hat p_K(x_i \mid \beta_m)`, a float64 scalar
    bound: torch.Tensor
    #: ``bound / N`` for each datum, ``(B,)``, N = B the data set's size (what :func:`iwae_bound` returns with ``global_particles``)
    per_datum: torch.Tensor
    #: Kish's ESS of the M draws of β, out of M
    global_ess: float
    #: the per-datum ESS of the K particles given each β, averaged over data and draws
    ess: float
    #: ``(M,)``: each draw's L_K, :math:`\log p(\beta_m) - \log q(\beta_m) + \sum_i \log \hat p_K(x_i \mid \beta_m)`
    terms: torch.Tensor


def nested_bound(
    model, guide, *args, global_particles=10, num_particles=1000, chunk_size=None, memory_budget=2**30, sampler=None,
    vectorize_particles=True, inflation=1.0, **kwargs,
):
    r"""The nested bound over M = ``global_particles`` draws of the globals :math:`\beta`
    (Tensor Monte Carlo's form, Aitchison 2018):

    .. math::
        \log \frac1M \sum_{m=1}^M \frac{p(\beta_m)}{q(\beta_m)} \prod_{i=1}^N \hat p_K(x_i \mid \beta_m),
        \qquad \hat p_K(x_i \mid \beta) = \frac1K \sum_{k=1}^K
            \frac{p(x_i, z_{ik} \mid \beta)}{q(z_{ik} \mid x_i, \beta)},

    a lower bound of :math:`\log p(x)` in expectation that approaches it as M and K grow
    (with M = 1 it is L_K). The M draws of β are one outer plate (drawn one at a time only with
    ``vectorize_particles=False``), their K particles drawn in chunks as by :func:`iwae_bound`,
    every chunk given the same M draws. It couples the whole data set (the
    product over every datum sits inside the log-mean-exp over β), so it is full batch
    only: a subsampled data plate is refused. Returns :class:`NestedBound`.
    """
    if sampler is None:
        sampler = ParticleSampler(model, guide, vectorize_particles=vectorize_particles)
    check_num_global_particles(global_particles)
    with torch.no_grad():
        return _nested(sampler, args, kwargs, num_particles, chunk_size, memory_budget, inflation, global_particles)


class _GivenGlobals(NamedTuple):
    """One draw of β with its chunks' per-datum bound: what ``objectives.outer_bound`` and
    ``objectives.nested_draws`` read of a :class:`Particles` (no score: it runs without gradients)."""

    inner: torch.Tensor  # (B,) log mean_k w_ik given β, float64
    log_global_w: torch.Tensor  # log p(β) - log q(β), float64 scalar (0 without globals)
    data_size: float
    scale: float
    ess: torch.Tensor  # (B,) per-datum ESS given β
    global_sites: tuple
    log_global_score: None = None


def _bounds_given_globals(sampler, args, kwargs, num_particles, chunk_size, memory_budget, inflation, global_particles):
    """M = ``global_particles`` draws of β (one without globals; :meth:`ParticleSampler.draws`), then
    ``num_particles`` particles given each, a chunk at a time (the β replayed): one
    :class:`_GivenGlobals` per draw."""
    totals = sums_w2 = subsample = first = None  # per draw: log sum_k w_ik and, for the ESS, log sum_k w_ik^2
    replay = None  # the first chunk's globals, replayed in the others: the same M draws of β
    remaining = num_particles
    # drawn one at a time, particles of a chunk are held until they are stacked: probe with one
    probe = PROBE_PARTICLES if sampler.vectorize_particles else 1
    while remaining > 0:
        if chunk_size is None and totals is None and remaining > probe:
            n = probe
            chunk_size, draws = budget_chunk(
                lambda: sampler.draws(global_particles, n, args, kwargs, grad_guide=False, inflation=inflation),
                n, memory_budget, device_of(args),
            )  # fmt: skip
        else:
            n = min(chunk_size or remaining, remaining)
            draws = sampler.draws(
                global_particles, n, args, kwargs, replay, grad_guide=False, subsample=subsample, inflation=inflation
            )
        if first is None:
            first = [(p.log_global_w.double().sum(), p.data_size, p.scale, p.global_sites) for p in draws]
            replay = [ReplayGlobals(p) for p in draws] if draws[0].global_sites else None
        subsample, log_w = draws[0].subsample, torch.stack([p.log_w.double() for p in draws])
        del draws  # their traces hold the chunk's decoder output: free it before the next draw
        chunk, chunk_w2 = torch.logsumexp(log_w, 1), torch.logsumexp(2 * log_w, 1)
        totals = chunk if totals is None else torch.logaddexp(totals, chunk)
        sums_w2 = chunk_w2 if sums_w2 is None else torch.logaddexp(sums_w2, chunk_w2)
        remaining -= n
    return [
        _GivenGlobals(total - math.log(num_particles), log_global_w, data_size, scale, (2 * total - sum_w2).exp(), names)
        for total, sum_w2, (log_global_w, data_size, scale, names) in zip(totals, sums_w2, first)
    ]


def _nested(sampler, args, kwargs, num_particles, chunk_size, memory_budget, inflation, global_particles):
    draws = nested_draws(
        lambda m: _bounds_given_globals(sampler, args, kwargs, num_particles, chunk_size, memory_budget, inflation, m),
        global_particles,
    )
    log_terms = nested_terms(draws, lambda d: d.inner)
    bound = nested_outer_bound(log_terms)
    batch, data_size = draws[0].inner.shape[0], draws[0].data_size  # B = N: full batch when M > 1
    ess = torch.stack([d.ess for d in draws]).mean().item()
    return NestedBound(bound, bound.expand(batch) / data_size, effective_sample_size(log_terms).item(), ess, log_terms)


def budget_chunk(draw, num_particles, memory_budget, device=None):
    """``(particles per chunk, draw())``: runs ``draw`` (a probe of ``num_particles``
    particles) under ``peak_memory`` and scales its peak to ``memory_budget``; on the CPU
    at most ``CPU_MAX_CHUNK`` particles, beyond which chunks only run slower."""
    peak, result = peak_memory(draw, device)
    chunk = max(1, int(memory_budget * num_particles // max(peak, 1)))
    if device is None or device.type == "cpu":
        chunk = min(chunk, CPU_MAX_CHUNK)
    return chunk, result


def peak_memory(fn, device=None):
    """``(peak bytes, fn())``: the most memory ``fn`` held at once beyond what was allocated
    before; CUDA: the caching allocator's peak; CPU: the peak of the bytes of the tensors
    ``fn`` creates that are alive at the same time (:class:`_LiveTensorBytes`)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        return torch.cuda.max_memory_allocated(device) - before, result
    with _LiveTensorBytes() as counter:
        result = fn()
    return counter.peak, result


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the storage bytes of every tensor an operation returns while the mode is active,
    until the last tensor on that storage is freed; ``peak`` is the largest total at any time."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = {}  # data pointer -> [bytes, tensors alive on it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor):
        storage = tensor.untyped_storage()
        entry = self.storages.setdefault(storage.data_ptr(), [storage.nbytes(), 0])
        if entry[1] == 0:
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(tensor, self._release, storage.data_ptr())

    def _release(self, pointer):
        entry = self.storages[pointer]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[pointer]
