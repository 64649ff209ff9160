r"""IWEM's P-step losses: the optimal proposal loss of eq. (7), and the choice between it and
IWAE's eq. (4) (IWEM-woo) by name."""

import math

from .losses import IWAELoss, ParticleLoss
from .objectives import iwae_objective, optimal_proposal_objective


class OptimalProposalLoss(ParticleLoss):
    r"""IWEM's optimal P-step loss (eq. 7), usable on its own with :class:`pyro.infer.SVI`.

    .. math::
        -\sum_i s \, \log \frac{1}{J} \sum_{j=1}^J
            \frac{|\log p(x_i, z_{ij}; \theta)| \; p(x_i, z_{ij}; \theta)}{q(z_{ij} \mid x_i; \phi)},
        \qquad z_{ij} \sim q(z \mid x_i; \phi) \text{ reparameterised},

    in log space, with :math:`s` the data plate's subsampling scale; with global latents
    :math:`\beta` the weights are given the drawn :math:`\beta` and the parameters of
    :math:`q(\beta)` step along the gradient of L_K instead (:meth:`phi_gradients`). The loss fits the
    proposal only: :meth:`loss_and_grads` computes gradients for the parameters only the
    guide touches (φ) and never for the model's (θ), so
    ``SVI(model, guide, optim, OptimalProposalLoss())`` steps the guide alone. (Stepping θ
    along this loss would not be IWEM; use :class:`IWEM` for the whole algorithm.)

    :param int num_particles: J, the number of proposal samples per datum.
    :param float log_p_offset: a constant :math:`c` added to :math:`\log p` inside the weight,
        :math:`|\log p(x_i, z_{ij}; \theta) + c|` (default 0, eq. 7; the official code's
        :math:`|\log p|` leaves out the normalising constants, see
        :func:`~pyro_iwem.infer.optimal_proposal_objective`).

    The other parameters are :class:`ParticleLoss`'s.
    """

    warns_model_proposed = False  # IWEM's P-step: model-proposed latents are the E-step's business
    global_guide_objective = staticmethod(iwae_objective)  # q(β) along L_K: eq. (7) is per datum at fixed β

    def __init__(
        self,
        num_particles=50,
        max_plate_nesting=None,
        data_plate=None,
        guide_inputs=None,
        vectorize_particles=True,
        log_p_offset=0.0,
    ):
        super().__init__(num_particles, max_plate_nesting, data_plate, guide_inputs, vectorize_particles)
        if not math.isfinite(log_p_offset):
            raise ValueError(f"log_p_offset must be a finite number, got {log_p_offset!r}")
        self.log_p_offset = float(log_p_offset)

    def objectives(self, particles):
        return None, optimal_proposal_objective(particles, self.log_p_offset)


PROPOSAL_LOSSES = {"optimal": OptimalProposalLoss, "iwae": IWAELoss}


def proposal_loss(
    name, num_particles, max_plate_nesting=None, data_plate=None, guide_inputs=None, vectorize_particles=True,
    log_p_offset=0.0,
):
    """The P-step loss called ``name``: "optimal" (eq. 7, with ``log_p_offset``) or "iwae" (eq. 4)."""
    try:
        cls = PROPOSAL_LOSSES[name]
    except KeyError:
        raise ValueError(f"proposal must be one of {sorted(PROPOSAL_LOSSES)}, got {name!r}") from None
    if cls is OptimalProposalLoss:
        return cls(num_particles, max_plate_nesting, data_plate, guide_inputs, vectorize_particles, log_p_offset)
    if log_p_offset != 0:
        raise ValueError(f"log_p_offset is a constant of the optimal P-step's |log p|; proposal={name!r} has no |log p|")
    return cls(num_particles, max_plate_nesting, data_plate, guide_inputs, vectorize_particles)
