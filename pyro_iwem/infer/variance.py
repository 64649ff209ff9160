r"""The variance of the E-step estimate: the paper's case for the optimal P-step and annealing.

IWEM's E-step replaces the expected joint log-likelihood :math:`Q(\theta \mid \theta_t; x)` by
its self-normalised importance sampling estimate (eq. 2), and the annealed E-step mixes in the
ELBO's plain Monte Carlo estimate (eq. 3). The paper argues (§3.3, Figures 1, 2 and 4) that the
optimal P-step lowers the variance of (2), and that (2) has a larger variance than (3) early in
training. :func:`estimate_variance` measures both variances for any model and guide: per datum,
over independent importance samplings of K particles each.
"""

from typing import NamedTuple

import torch

from .evaluation import budget_chunk
from .sampler import ParticleSampler
from .util import device_of


class VarianceEstimate(NamedTuple):
    """Per-datum variances returned by :func:`estimate_variance`: float64 tensors of shape
    ``(B,)`` (``(1,)`` for a model without a data plate)."""

    q_hat: torch.Tensor
    """The variance of :math:`\\hat Q` (eq. 2), the self-normalised importance sampling estimate
    of the E-step."""

    elbo: torch.Tensor
    """The variance of the ELBO's estimate (eq. 3) from the same number of samples."""

    joint: torch.Tensor
    """The variance of the ELBO's θ-dependent part, :math:`\\frac1K \\sum_k \\log p(x, z_k; \\theta)`:
    the plain Monte Carlo estimate of the expected joint log-likelihood that the paper sets
    beside (2) in its Figure 2 and that the annealed E-step (eq. 8) mixes in."""


def estimate_variance(
    model,
    guide,
    *args,
    num_particles=50,
    num_repeats=100,
    sampler=None,
    chunk_size=None,
    memory_budget=2**30,
    fresh_guide_inputs=True,
    vectorize_particles=True,
    **kwargs,
):
    r"""The variances of the E-step's estimate :math:`\hat Q` (eq. 2) and of the ELBO's estimate
    (eq. 3), per datum, over ``num_repeats`` independent importance samplings.

    Each repeat :math:`r` draws K = ``num_particles`` particles :math:`z_{r1}, \dots, z_{rK}
    \sim q(z \mid x; \phi)` and computes, at the current θ,

    .. math::
        \hat Q_r = \sum_{k=1}^{K} \bar w_{rk} \log p(x, z_{rk}; \theta), \qquad
        \hat L_r = \frac{1}{K} \sum_{k=1}^{K} \bigl(\log p(x, z_{rk}; \theta) - \log q(z_{rk} \mid x; \phi)\bigr),

    with :math:`\bar w_{rk}` the self-normalised importance weights of the repeat's K particles,
    and :math:`\hat J_r = \frac1K \sum_k \log p(x, z_{rk}; \theta)`, the part of
    :math:`\hat L_r` that depends on θ (the paper reads eq. 3 so when it compares the two
    estimates of the expected joint log-likelihood, §3.3.2 and Figure 2). The result holds the
    unbiased sample variances of :math:`\hat Q_r`, :math:`\hat L_r` and :math:`\hat J_r` over
    the R = ``num_repeats`` repeats, per datum (the paper's Figures 1 and 2 average them over
    the training data). With missing data (a model that observes with ``obs_mask=`` or
    :func:`~pyro_iwem.infer.masked.observe_masked`), :math:`\log p` is the full
    :math:`\log p(x_o, x_m, z)` of eq. (9), the weights :math:`p(x_o, z) / q` and
    :math:`\hat J_r` averages :math:`\log p(x_o, z)`, as in IWEM's annealed E-step; pass a ``sampler`` built with the method's ``guide_inputs`` (e.g.
    :class:`~pyro_iwem.infer.missing.ImputedInputs` for miss-IWEM) to measure its proposal.

    The R·K particles are drawn vectorised, several repeats per :class:`ParticleSampler` call
    (reshaped to ``(R, K, B)``), in chunks that bound the memory. Runs without gradients; the
    estimates are accumulated in float64. A subsampled data plate is drawn once: every chunk
    uses the minibatch of the first.

    :param int num_particles: K, the particles of one importance sampling (the E-step's K).
    :param int num_repeats: R, the independent importance samplings (at least 2; the paper: 100).
    :param sampler: an optional :class:`ParticleSampler` for (model, guide), to reuse its
        plate settings and ``guide_inputs``; built from ``model`` and ``guide`` otherwise.
    :param int chunk_size: repeats per sampler call; ``None`` (default) chooses it from
        ``memory_budget`` as :func:`iwae_bound` does (a first call of one repeat is measured;
        on the CPU at most ``max(1, 512 // K)`` repeats per call).
    :param int memory_budget: bytes a call may use at its peak (default 1 GiB).
    :param bool fresh_guide_inputs: when the sampler has ``guide_inputs`` (miss-IWEM's
        completion :math:`\breve x`, drawn once per training step), draw them anew for every
        repeat, as every step of training does (then each repeat is one sampler call); ``False``
        draws them once and measures the variance given that draw. Without ``guide_inputs``
        it has no effect.
    :param bool vectorize_particles: as for :class:`ParticleSampler` (ignored with ``sampler``).
    :returns: a :class:`VarianceEstimate` ``(q_hat, elbo, joint)`` of float64 tensors of shape ``(B,)``.

    Example: does the optimal P-step lower the variance on your model? Train it with
    ``IWEM(..., proposal="optimal")`` and with ``proposal="iwae"`` and compare
    ``estimate_variance(model, guide, x, num_particles=K).q_hat.mean()`` after each epoch.
    """
    if num_particles < 1 or num_repeats < 2 or (chunk_size is not None and chunk_size < 1) or memory_budget <= 0:
        raise ValueError(
            "num_particles and chunk_size must be >= 1, num_repeats >= 2 and memory_budget > 0, got "
            f"{num_particles}, {chunk_size}, {num_repeats} and {memory_budget}"
        )
    K = num_particles
    sampler = ParticleSampler(model, guide, vectorize_particles=vectorize_particles) if sampler is None else sampler
    one_call_per_repeat = fresh_guide_inputs and sampler.guide_inputs is not None
    q_hats, elbos, joints = [], [], []
    subsample = guide_args = None
    done = 0
    with torch.no_grad():
        if sampler.guide_inputs is not None and not fresh_guide_inputs:
            guide_args = sampler.inputs_for_guide(args, kwargs)

        def draw(repeats):
            return sampler(
                repeats * K, args, kwargs, grad_guide=False, subsample=subsample, guide_args=guide_args
            )

        while done < num_repeats:
            if one_call_per_repeat:
                repeats = 1
                particles = draw(repeats)
            elif chunk_size is None:
                repeats = 1
                chunk, particles = budget_chunk(lambda: draw(repeats), K, memory_budget, device_of(args))
                chunk_size = max(1, chunk // K)
            else:
                repeats = min(chunk_size, num_repeats - done)
                particles = draw(repeats)
            subsample = particles.subsample
            log_w = particles.log_w.double().reshape(repeats, K, -1)
            log_p = particles.log_p.double().reshape(repeats, K, -1)
            log_p_observed = (particles.log_p - particles.log_model_proposed).double().reshape(repeats, K, -1)
            q_hats.append((torch.softmax(log_w, 1) * log_p).sum(1))
            elbos.append(log_w.mean(1))
            joints.append(log_p_observed.mean(1))
            done += repeats
    return VarianceEstimate(*(torch.cat(values).var(0) for values in (q_hats, elbos, joints)))
