"""pyro_iwem: importance weighted EM (Kim, Hwang & Kim, AISTATS 2020) for Pyro models."""

from .infer import IWEM, Annealing, OptimalProposalLoss, iwae_bound, observe_masked

__version__ = "0.1.0"
__all__ = ["IWEM", "Annealing", "OptimalProposalLoss", "iwae_bound", "observe_masked", "__version__"]
