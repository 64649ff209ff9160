"""Inference: the trace machinery, IWEM and its baselines, annealing, evaluation and the
E-step's variance."""

from .annealing import Annealing, NoAnnealing
from .evaluation import iwae_bound
from .imputation import Imputer
from .inflation import ProposalInflation, inflate
from .iwem import IWEM, IWAEasEM
from .losses import DReGLoss, IWAELoss, OptimalProposalLoss, ParticleLoss, STLLoss, VAELoss
from .masked import observe_masked
from .methods import METHODS, MISSING_DATA_INPUTS, build_method
from .missing import ImputedInputs, ZeroFilledInputs
from .objectives import (
    effective_sample_size,
    iwae_objective,
    log_mean_exp,
    normalized_weights,
    optimal_proposal_objective,
    snis_objective,
)
from .traces import Particles, ParticleSampler
from .variance import VarianceEstimate, estimate_variance

__all__ = [
    "IWEM",
    "ImputedInputs",
    "Imputer",
    "METHODS",
    "MISSING_DATA_INPUTS",
    "Annealing",
    "DReGLoss",
    "IWAELoss",
    "IWAEasEM",
    "NoAnnealing",
    "OptimalProposalLoss",
    "ParticleLoss",
    "ParticleSampler",
    "Particles",
    "ProposalInflation",
    "STLLoss",
    "VAELoss",
    "VarianceEstimate",
    "ZeroFilledInputs",
    "build_method",
    "effective_sample_size",
    "estimate_variance",
    "inflate",
    "iwae_bound",
    "iwae_objective",
    "log_mean_exp",
    "normalized_weights",
    "observe_masked",
    "optimal_proposal_objective",
    "snis_objective",
]
