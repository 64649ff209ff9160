"""pyro_iwem: importance weighted EM (Kim, Hwang & Kim, AISTATS 2020) for Pyro models."""

from .infer import (
    IWEM,
    Annealing,
    DReGLoss,
    IWAEasEM,
    IWAELoss,
    OptimalProposalLoss,
    STLLoss,
    VAELoss,
    build_method,
    iwae_bound,
    observe_masked,
)

__version__ = "0.1.0"
__all__ = [
    "IWEM",
    "Annealing",
    "DReGLoss",
    "IWAELoss",
    "IWAEasEM",
    "OptimalProposalLoss",
    "STLLoss",
    "VAELoss",
    "__version__",
    "build_method",
    "iwae_bound",
    "observe_masked",
]
