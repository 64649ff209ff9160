r"""Per-datum objectives on :class:`~pyro_iwem.infer.traces.Particles`.

Each function returns a ``(B,)`` tensor, one value per datum, computed in log space;
the caller applies the data plate's scale and sums over the batch. Weights are always
normalised over particles (dim 0), never over the batch.
"""

import math

import torch


def log_mean_exp(x, dim=0):
    r""":math:`\log \frac{1}{N} \sum_n \exp x_n` along ``dim``."""
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


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
    ELBO term (the :math:`-\log q` of eq. (3) is constant in θ and left out). Gradients
    flow to θ through ``log_p`` only.

    With missing data (eq. 9) Q̂ uses the full :math:`\log p(x_o, x_m^k, z_k)` while the
    ELBO term is :math:`\frac1L \sum_l \log p(x_o, z_l; \theta)`: latents the model proposes
    itself (``log_model_proposed``) are left out of it.
    """
    num_snis = particles.num_particles if num_snis is None else num_snis
    weights = normalized_weights(particles.log_w[:num_snis].detach())
    q_hat = (weights * particles.log_p[:num_snis]).sum(0)
    if alpha >= 1.0:
        return q_hat
    elbo = (particles.log_p - particles.log_model_proposed)[num_snis:].mean(0)
    return alpha * q_hat + (1.0 - alpha) * elbo


def iwae_objective(particles):
    r"""The IWAE bound of eq. (4): :math:`\log \frac{1}{K} \sum_k p(x, z_k) / q(z_k \mid x)`."""
    return log_mean_exp(particles.log_w)


def optimal_proposal_objective(particles):
    r"""The optimal P-step objective of eq. (7) (and eq. (10) with missing data).

    .. math::
        \hat L^{opt}(\phi) = \log \frac{1}{J} \sum_{j=1}^J
            \frac{|\log p(x, z_j; \theta)| \, p(x, z_j; \theta)}{q(z_j \mid x; \phi)},

    computed as :math:`\mathrm{logsumexp}_j(\log|\log p_j| + \log w_j) - \log J`. Here
    :math:`p / q` is the importance weight (model-proposed sites such as missing entries
    cancel, eq. 10) while :math:`|\log p|` is the full normalised joint, missing entries
    included.
    """
    return log_mean_exp(particles.log_p.abs().log() + particles.log_w)
