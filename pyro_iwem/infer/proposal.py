"""The P-step loss of IWEM as a Pyro ELBO-style loss."""

import torch
from pyro.infer import ELBO

from .objectives import iwae_objective, optimal_proposal_objective
from .traces import ParticleSampler, theta_and_phi

PROPOSAL_OBJECTIVES = {"optimal": optimal_proposal_objective, "iwae": iwae_objective}


def proposal_objective(name):
    """The per-datum P-step objective called ``name`` ("optimal", eq. 7, or "iwae", eq. 4)."""
    try:
        return PROPOSAL_OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"proposal must be one of {sorted(PROPOSAL_OBJECTIVES)}, got {name!r}") from None


def check_num_particles(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (a number of particles), got {value!r}")
    return value


class SamplerCache:
    """One :class:`ParticleSampler` per (model, guide) pair, so plate guesses are made once."""

    def __init__(self, max_plate_nesting=None, data_plate=None):
        self.max_plate_nesting = max_plate_nesting
        self.data_plate = data_plate
        self._samplers = {}

    def sampler(self, model, guide):
        key = (model, guide)
        if key not in self._samplers:
            self._samplers[key] = ParticleSampler(model, guide, self.max_plate_nesting, self.data_plate)
        return self._samplers[key]


class OptimalProposalLoss(ELBO):
    r"""IWEM's optimal P-step loss, usable as a Pyro loss with :class:`pyro.infer.SVI`.

    .. math::
        -\sum_i s \, \log \frac{1}{J} \sum_{j=1}^J
            \frac{|\log p(x_i, z_{ij}; \theta)| \; p(x_i, z_{ij}; \theta)}{q(z_{ij} \mid x_i; \phi)},
        \qquad z_{ij} \sim q(z \mid x_i; \phi) \text{ reparameterised},

    eq. (7) of the paper, in log space, with :math:`s` the data plate's subsampling scale.
    With ``proposal="iwae"`` the :math:`|\log p|` factor is dropped (IWAE's P-step, eq. 4).

    The loss fits the proposal only: :meth:`loss_and_grads` computes gradients for the
    parameters that only the guide touches (φ) and leaves the model's (θ) untouched, so an
    ``SVI(model, guide, optim, OptimalProposalLoss())`` steps the guide alone. Guide sites
    must be reparameterisable.

    :param int num_particles: J, the number of proposal samples per datum.
    :param str proposal: "optimal" (eq. 7) or "iwae" (eq. 4).
    :param int max_plate_nesting: optional; guessed from one run otherwise.
    :param str data_plate: name of the plate over data points; detected when ``None``.
    """

    def __init__(self, num_particles=50, proposal="optimal", max_plate_nesting=None, data_plate=None):
        super().__init__(num_particles=check_num_particles("num_particles", num_particles), vectorize_particles=True)
        self.proposal = proposal
        self.objective = proposal_objective(proposal)
        self._samplers = SamplerCache(max_plate_nesting, data_plate)

    def sampler(self, model, guide):
        """The :class:`ParticleSampler` this loss uses for (model, guide)."""
        return self._samplers.sampler(model, guide)

    def loss_from_particles(self, particles):
        """The scaled, batch-summed loss on particles drawn with a reparameterised guide."""
        return -(particles.scale * self.objective(particles)).sum()

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("OptimalProposalLoss draws its particles with a ParticleSampler")

    def _particles(self, model, guide, args, kwargs):
        return self.sampler(model, guide)(self.num_particles, args, kwargs, grad_guide=True)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The loss as a tensor that can be differentiated (w.r.t. φ: θ should not be stepped)."""
        return self.loss_from_particles(self._particles(model, guide, args, kwargs))

    def loss(self, model, guide, *args, **kwargs):
        """The loss as a float, without gradients."""
        with torch.no_grad():
            particles = self.sampler(model, guide)(self.num_particles, args, kwargs, grad_guide=False)
            return self.loss_from_particles(particles).item()

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """The loss as a float; accumulates its gradient into ``.grad`` of the guide-only params."""
        particles = self._particles(model, guide, args, kwargs)
        loss = self.loss_from_particles(particles)
        _, phi = theta_and_phi(particles)
        accumulate_grads(loss, phi)
        return loss.item()


def accumulate_grads(loss, params):
    """Adds ∂loss/∂p to ``p.grad`` for ``params`` only (autograd skips every other gradient)."""
    params = [p for p in params if p.requires_grad]
    if not params or not loss.requires_grad:
        return []
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    return params
