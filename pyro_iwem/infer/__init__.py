"""Inference: the trace machinery, IWEM and its baselines, annealing, evaluation and the
E-step's variance.

Where things go:

* a new objective: a :class:`ParticleLoss` subclass in ``losses.py`` (its ``objectives`` on
  :class:`Particles`, with ``objectives.py``), or an :class:`IWEM` subclass in ``variants.py``;
  what it needs of the graph is a :class:`DrawTransform` (``transforms.py``), gradient helpers
  are in ``grads.py``; then one ``MethodSpec`` in ``methods.py``'s ``SPECS``;
* a new kind of site: a :class:`SiteRole`, a branch of ``classify`` and a row of ``TOTALS`` in
  ``sites.py``; the sampler (``sampler.py``) sums it where the table says; plates are in
  ``plates.py``, the checks on a user's model in ``checks.py``;
* a new command-line option: ``pyro_iwem/experiments/options.py``.
"""

from .annealing import Annealing, NoAnnealing
from .collective import StepRefused, collective_step
from .evaluation import NestedBound, iwae_bound, nested_bound
from .imputation import Imputer
from .inflation import ProposalInflation, inflate
from .iwem import IWEM
from .variants import IWAEasEM, OnePassIWEM
from .losses import DReGLoss, IWAELoss, ParticleLoss, STLLoss, VAELoss
from .masked import observe_masked
from .methods import METHODS, MISSING_DATA_INPUTS, build_method
from .missing import ImputedInputs, ZeroFilledInputs
from .objectives import (
    effective_sample_size,
    iwae_objective,
    log_mean_exp,
    normalized_weights,
    optimal_proposal_objective,
    outer_bound,
    snis_objective,
)
from .particles import Particles
from .proposal import OptimalProposalLoss
from .sampler import ParticleSampler
from .sites import SiteRole
from .transforms import (
    CutLatents, DetachModelProposals, DrawTransform, LatentViews, ReplayGlobals, ReplayGuide, StopProposalParams,
)
from .variance import VarianceEstimate, estimate_variance

__all__ = [
    "IWEM",
    "ImputedInputs",
    "Imputer",
    "METHODS",
    "MISSING_DATA_INPUTS",
    "Annealing",
    "CutLatents",
    "DReGLoss",
    "DetachModelProposals",
    "DrawTransform",
    "IWAELoss",
    "IWAEasEM",
    "LatentViews",
    "NestedBound",
    "NoAnnealing",
    "OnePassIWEM",
    "OptimalProposalLoss",
    "ParticleLoss",
    "ParticleSampler",
    "Particles",
    "ReplayGlobals",
    "ReplayGuide",
    "SiteRole",
    "StopProposalParams",
    "ProposalInflation",
    "STLLoss",
    "StepRefused",
    "VAELoss",
    "VarianceEstimate",
    "ZeroFilledInputs",
    "build_method",
    "collective_step",
    "effective_sample_size",
    "estimate_variance",
    "inflate",
    "iwae_bound",
    "iwae_objective",
    "log_mean_exp",
    "nested_bound",
    "normalized_weights",
    "observe_masked",
    "optimal_proposal_objective",
    "outer_bound",
    "snis_objective",
]
