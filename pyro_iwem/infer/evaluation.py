"""The IWAE bound with many samples: the test log-likelihood of the paper (§5)."""

import math

import torch

from .traces import ParticleSampler


def iwae_bound(
    model, guide, *args, num_particles=5000, chunk_size=500, sampler=None, vectorize_particles=True, **kwargs
):
    r"""Per-datum IWAE bound :math:`\log \frac{1}{K} \sum_{k=1}^K p(x_i, z_k) / q(z_k \mid x_i)`.

    The K = ``num_particles`` samples are drawn ``chunk_size`` at a time (so K = 5000 fits
    in memory); each chunk's log weights are cast to float64 and folded into a running
    :math:`\mathrm{logsumexp}`, so the log-mean-exp is accumulated in float64. Runs without
    gradients. Returns a float64 tensor of shape ``(B,)`` (``(1,)`` for a model without a
    data plate). The bound is a lower bound of :math:`\log p(x_i)` that tightens as K grows.

    With a subsampled data plate every chunk is drawn on the minibatch the first chunk drew,
    so the weights of one datum are never pooled with another's; the bound is that
    minibatch's. Enumerated model sites are summed out; a non-reparameterised guide is fine.

    :param sampler: an optional :class:`ParticleSampler` for (model, guide), to reuse its
        plate settings; built from ``model`` and ``guide`` otherwise.
    :param bool vectorize_particles: as for :class:`ParticleSampler` (ignored with ``sampler``).
    """
    if num_particles < 1 or chunk_size < 1:
        raise ValueError(f"num_particles and chunk_size must be >= 1, got {num_particles} and {chunk_size}")
    sampler = ParticleSampler(model, guide, vectorize_particles=vectorize_particles) if sampler is None else sampler
    total = subsample = None
    remaining = num_particles
    with torch.no_grad():
        while remaining > 0:
            n = min(chunk_size, remaining)
            particles = sampler(n, args, kwargs, grad_guide=False, subsample=subsample)
            subsample = particles.subsample
            log_w = particles.log_w.double()
            chunk = torch.logsumexp(log_w, 0)
            total = chunk if total is None else torch.logaddexp(total, chunk)
            remaining -= n
    return total - math.log(num_particles)
