r"""Per-datum objectives on :class:`~pyro_iwem.infer.particles.Particles`.

Each function returns a ``(B,)`` tensor, one value per datum, computed in log space;
the caller applies the data plate's scale and sums over the batch. Weights are always
normalised over particles (dim 0), never over the batch.

The multi-sample objectives have the form :math:`F = R(\ell_1, \dots, \ell_N)` with
:math:`R` a log-mean-exp (IWAE, eq. 4; the optimal P-step, eq. 7) or a mean (the ELBO,
eq. 3) of per-particle terms :math:`\ell_n`. Their gradients flow pathwise through the
reparameterised sites; :func:`multi_sample` adds the score-function part for the proposal's
sites that are not reparameterised (``Particles.log_score``), with leave-one-out control
variates (VIMCO, Mnih & Rezende 2016):

.. math::
    \nabla F \approx \nabla_{\text{path}} F
        + \sum_n \big(F - F_{-n}\big)\, \nabla \log q(z_n),
    \qquad F_{-n} = R\big(\ell_1, .., \ell_{n-1}, \textstyle\frac{1}{N-1}\sum_{m \ne n} \ell_m, \ell_{n+1}, .., \ell_N\big),

:math:`\ell_n` replaced by the mean of the others (for the log-mean-exp, the geometric mean
of the other weights; for the mean, REINFORCE with the leave-one-out baseline). With N = 1
there are no others and the signal is :math:`F` itself (plain REINFORCE).
"""

import math

import torch

from .util import ModelError


def log_mean_exp(x, dim=0):
    r""":math:`\log \frac{1}{N} \sum_n \exp x_n` along ``dim``."""
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


def mean(x, dim=0):
    r""":math:`\frac1N \sum_n x_n` along ``dim``."""
    return x.mean(dim)


def leave_one_out(reduce, ell):
    r""":math:`F_{-n}` for every n, ``(N, B)``: ``reduce`` over particles with :math:`\ell_n`
    replaced by the mean of the other :math:`\ell_m`."""
    n = ell.shape[0]
    others = (ell.sum(0, keepdim=True) - ell) / (n - 1)
    diagonal = torch.eye(n, dtype=torch.bool, device=ell.device).reshape((n, n) + (1,) * (ell.dim() - 1))
    return reduce(torch.where(diagonal, others.unsqueeze(1), ell.unsqueeze(0)), dim=1)


def multi_sample(reduce, ell, log_score=None):
    r""":math:`F = R(\ell)` along the particles, plus a zero-valued term whose gradient is the
    score-function part :math:`\sum_n (F - F_{-n}) \nabla \log q(z_n)` for the sites in
    ``log_score`` (see the module doc). The value is :math:`F`."""
    value = reduce(ell, dim=0)
    if log_score is None or not log_score.requires_grad:
        return value
    ell = ell.detach()
    total = reduce(ell, dim=0)
    signal = total - leave_one_out(reduce, ell) if ell.shape[0] > 1 else total.unsqueeze(0)
    return value + (signal * (log_score - log_score.detach())).sum(0)


def normalized_weights(log_w):
    r"""Self-normalised importance weights :math:`\bar w_{ik} = \mathrm{softmax}_k \log w_{ik}`."""
    return torch.softmax(log_w, dim=0)


def effective_sample_size(log_w):
    r"""Kish's effective sample size per datum, :math:`1 / \sum_k \bar w_{ik}^2`."""
    return 1.0 / normalized_weights(log_w).pow(2).sum(0)


def snis_objective(particles, num_snis=None, alpha=1.0):
    r"""The (annealed) E-step objective :math:`\hat Q_\alpha`, eqs. (2) and (8).

    .. math::
        \hat Q_\alpha(\theta) = \alpha \sum_{k=1}^K \bar w_k \log p(x, z_k; \theta)
            + (1 - \alpha) \frac{1}{L} \sum_{l=1}^L \log p(x, z_{K+l}; \theta),

    with :math:`\bar w_k` the normalised weights of the first ``num_snis`` = K particles,
    detached, and the remaining L particles (drawn from the guide in the same pass) the
    ELBO term (the :math:`-\log q` of eq. (3) is constant in θ and left out); with no
    particles beyond the K, the ELBO term averages the same K (IWEM's one-pass step). Only
    θ's gradient is meant to be taken: the weights are detached.

    With missing data (eq. 9) Q̂ uses the full :math:`\log p(x_o, x_m^k, z_k)` while the
    ELBO term is :math:`\frac1L \sum_l \log p(x_o, z_l; \theta)`: latents the model proposes
    itself (``log_model_proposed``) are left out of it.
    """
    num_snis = particles.num_particles if num_snis is None else num_snis
    weights = normalized_weights(particles.log_w[:num_snis].detach())
    q_hat = (weights * particles.log_p[:num_snis]).sum(0)
    if alpha >= 1.0:
        return q_hat
    elbo_particles = slice(num_snis, None) if num_snis < particles.num_particles else slice(None)
    elbo = (particles.log_p - particles.log_model_proposed)[elbo_particles].mean(0)
    return alpha * q_hat + (1.0 - alpha) * elbo


def iwae_objective(particles):
    r"""The IWAE bound of eq. (4): :math:`\log \frac{1}{K} \sum_k p(x, z_k) / q(z_k \mid x)`,
    with VIMCO's score-function term for non-reparameterised sites."""
    return multi_sample(log_mean_exp, particles.log_w, particles.log_score)


def elbo_objective(particles):
    r"""The ELBO of eq. (3): :math:`\frac1L \sum_l \log p(x, z_l) / q(z_l \mid x)`, with
    leave-one-out REINFORCE for non-reparameterised sites."""
    return multi_sample(mean, particles.log_w, particles.log_score)


def optimal_proposal_objective(particles, log_p_offset=0.0):
    r"""The optimal P-step objective of eq. (7) (and eq. (10) with missing data).

    .. math::
        \hat L^{opt}(\phi) = \log \frac{1}{J} \sum_{j=1}^J
            \frac{|\log p(x, z_j; \theta) + c| \, p(x, z_j; \theta)}{q(z_j \mid x; \phi)},

    computed as :math:`\mathrm{logsumexp}_j(\log|\log p_j + c| + \log w_j) - \log J`, with
    :math:`c` = ``log_p_offset``: 0, the paper's eq. (7), or a constant that the official code
    left out of :math:`\log p` (its :math:`|\log p|` drops the Gaussian normalising constants,
    :math:`c = \frac d2 \log 2\pi` for a d-dimensional standard Normal prior). Here
    :math:`p / q` is the importance weight (model-proposed sites such as missing entries
    cancel, eq. 10) while :math:`|\log p|` is the full normalised joint, missing entries
    included. It has the log-mean-exp form of eq. (4) with :math:`p` replaced by
    :math:`|\log p|\,p`, so the same VIMCO estimator serves non-reparameterised sites;
    since :math:`|\log p|` depends on the model-proposed latents, their score terms count too.
    """
    ell = (particles.log_p + log_p_offset).abs().log() + particles.log_w
    return multi_sample(log_mean_exp, ell, _sum_optional(particles.log_score, particles.log_score_leaves))


def outer_bound(particles, per_datum):
    r"""The batch objective with global latents :math:`\beta` (drawn once, outside the particle plate):

    .. math::
        L_K = \log p(\beta) - \log q(\beta)
            + \frac{N}{B} \sum_{i=1}^B F_i(\beta),
        \qquad \beta \sim q(\beta),

    with :math:`F_i` = ``per_datum`` (for IWAE :math:`\log \frac1K \sum_k p(x_i, z_{ik} \mid \beta) /
    q(z_{ik} \mid x_i, \beta)`, the per-datum IWAE given β) and :math:`N/B` the data plate's
    scale, outside the log: an ordinary ELBO over β with the per-datum bound inside, unbiased
    under subsampling. Without globals it is :math:`\frac{N}{B} \sum_i F_i`. The gradient is
    pathwise through a reparameterised β; for globals without ``rsample`` a zero-valued term adds
    REINFORCE's :math:`(L_K - b)\, \nabla \log q(\beta)`, with the baseline :math:`b` =
    ``particles.global_baseline`` (a number from earlier draws only, so that the estimator stays
    unbiased: the losses keep a running mean of L_K; 0 when ``None``)."""
    value = (particles.scale * per_datum).sum()
    if not particles.global_sites:
        return value
    value = value + particles.log_global_w.sum()
    score = particles.log_global_score
    if score is not None and score.requires_grad:
        signal = value.detach() - (particles.global_baseline or 0.0)
        value = value + signal * (score - score.detach()).sum()
    return value


def nested_outer_bound(values):
    r"""The nested bound of M draws of the globals from their L_K values ``(M,)``:
    :math:`\log \frac1M \sum_m \exp L_K(\beta_m)
    = \log \frac1M \sum_m \frac{p(\beta_m)}{q(\beta_m)} \prod_i \hat p_K(x_i \mid \beta_m)` (full batch)."""
    return log_mean_exp(values, 0)


def check_num_global_particles(value):
    """``value`` if it is a positive integer (M, the draws of the globals), else a ValueError naming ``global_particles``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"global_particles must be a positive integer (draws of the globals), got {value!r}")
    return value


def nested_draws(draw, global_particles, owner=None):
    r"""The outer plate of the nested bound: M = ``global_particles`` draws of the globals
    :math:`\beta_1..\beta_M`, ``draw(M)`` (a list of :class:`~pyro_iwem.infer.particles.Particles`,
    or of anything with their ``scale`` and ``global_sites``, as
    :meth:`~pyro_iwem.infer.sampler.ParticleSampler.draws` returns: one pass under a plate of M
    draws, one draw when there are no globals). Refuses a subsampled data plate when M > 1
    (:func:`refuse_subsampled_nested`) and, for the estimator named ``owner`` (gradients will be
    taken), globals without ``rsample`` whose score carries a gradient (:func:`refuse_scored_nested`)."""
    draws = draw(global_particles)
    refuse_subsampled_nested(len(draws), draws[0].scale)
    if owner is not None:
        refuse_scored_nested(owner, len(draws), draws[0])
    return draws


def nested_terms(draws, per_datum):
    r"""``(M,)``: each draw's :math:`\log \hat W_m = L(\beta_m)`, :func:`outer_bound` with
    ``per_datum`` inside, e.g. :math:`\log p(\beta_m) - \log q(\beta_m) + \sum_i \log \hat p_K(x_i \mid \beta_m)`;
    :func:`nested_outer_bound` of them is the nested bound, ``normalized_weights`` of them detached
    the global weights :math:`\bar W_m`, and ``effective_sample_size`` the M draws' ESS."""
    return torch.stack([outer_bound(p, per_datum(p)) for p in draws])


def weighted_outer_bound(draws, weights, per_datum):
    r""":math:`\sum_m \bar W_m L(\beta_m)` with ``per_datum`` inside each draw's :func:`outer_bound`
    and the global weights :math:`\bar W_m` = ``weights`` detached: with the draws held fixed its
    gradient is the nested bound's, :math:`\nabla \log \frac1M \sum_m e^{L_m} = \sum_m \bar W_m \nabla L_m`,
    where :math:`L_m` is the bound inside."""
    return (weights * nested_terms(draws, per_datum)).sum()


def refuse_subsampled_nested(global_particles, scale):
    """Refuses the nested bound of ``global_particles`` > 1 draws of β on a subsampled batch (``scale`` != 1)."""
    if global_particles > 1 and scale != 1.0:
        raise ValueError(
            f"global_particles={global_particles} gives the nested bound log mean_m p(β_m)/q(β_m) Π_i p̂(x_i | β_m), "
            "which couples the whole data set: the product over every datum sits inside the log-mean-exp over β, "
            f"so a minibatch (the data plate is subsampled, scale {scale:g}) has no unbiased estimate of it. Pass "
            "the full batch, or use global_particles=1 (L_K)"
        )


def refuse_scored_nested(owner, global_particles, particles):
    """Refuses ``global_particles`` > 1 draws of globals some of which have no ``rsample`` and a
    score that carries a gradient (``Particles.log_global_score``): the nested bound's gradient
    is pathwise only. The error names those sites."""
    score = particles.log_global_score
    if global_particles == 1 or score is None or not score.requires_grad:
        return
    traces = (particles.guide_trace, particles.model_trace)
    scored = [
        n for n in particles.global_sites
        if not next(t.nodes[n] for t in traces if n in t.nodes)["fn"].has_rsample
    ]  # fmt: skip
    raise ModelError(
        f"{owner}(global_particles={global_particles}) needs reparameterised globals: "
        f"{', '.join(repr(n) for n in scored or particles.global_sites)} has no rsample, and the nested bound's "
        "gradient is taken pathwise only: use global_particles=1"
    )


def _sum_optional(a, b):
    return b if a is None else a if b is None else a + b
