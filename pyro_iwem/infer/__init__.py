"""Inference: the trace machinery, IWEM, its P-step loss, annealing and evaluation."""

from .annealing import Annealing, NoAnnealing
from .evaluation import iwae_bound
from .iwem import IWEM
from .masked import observe_masked
from .objectives import (
    effective_sample_size,
    iwae_objective,
    log_mean_exp,
    optimal_proposal_objective,
    snis_objective,
)
from .proposal import OptimalProposalLoss
from .traces import ParticleSampler, Particles

__all__ = [
    "Annealing",
    "IWEM",
    "NoAnnealing",
    "OptimalProposalLoss",
    "ParticleSampler",
    "Particles",
    "effective_sample_size",
    "iwae_bound",
    "iwae_objective",
    "log_mean_exp",
    "observe_masked",
    "optimal_proposal_objective",
    "snis_objective",
]
