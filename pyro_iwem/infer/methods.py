"""The one place that maps method names to inference algorithms."""

import math

import pyro.optim
from pyro.infer import SVI

from .annealing import Annealing
from .iwem import IWEM, IWAEasEM
from .losses import DReGLoss, IWAELoss, STLLoss, VAELoss
from .missing import ImputedInputs, ZeroFilledInputs


class SVIStep(SVI):
    """:class:`pyro.infer.SVI` with the attributes an :class:`IWEM` step has, so that training
    code treats every method alike (α, ESS and IWEM's E-step bound are not defined for these
    methods; their loss is already the negated bound)."""

    alpha = None
    ess = math.nan
    bound = math.nan

    def end_epoch(self):
        pass

    def state_dict(self):
        return {"optim": self.optim.get_state()}

    def load_state_dict(self, state):
        self.optim.set_state(state["optim"])


def _svi(loss_class, **options):
    def build(model, guide, K, J, L, optim, annealing, **plates):
        return SVIStep(model, guide, optim, loss_class(K, **options, **plates))

    return build


def _iwem(annealed=True, **options):
    def build(model, guide, K, J, L, optim, annealing, iwem_options=None, **plates):
        annealing = annealing if annealed else None
        return IWEM(
            model, guide, K=K, J=J, L=L, optim=optim, annealing=annealing, **options, **(iwem_options or {}), **plates
        )

    return build


#: What the guide sees in the methods for data with missing entries (§4.1): missIWAE's
#: zero-filled data, miss-IWEM's completion. The same inputs serve imputation afterwards.
MISSING_DATA_INPUTS = {"miss-iwae": ZeroFilledInputs, "miss-iwem": ImputedInputs, "miss-iwem-woa": ImputedInputs}

#: IWEM's options that only the IWEM methods take, with the values that mean "as the paper has it".
IWEM_OPTIONS = {"L": (1,), "proposal_inflation": (1.0,), "p_step_inflation": (None, 1.0), "log_p_offset": (0.0,)}

METHODS = {
    "vae": _svi(VAELoss),
    "iwae": _svi(IWAELoss),
    "stl": _svi(STLLoss),
    "dreg": _svi(DReGLoss),
    "iwae-em": lambda model, guide, K, J, L, optim, annealing, **plates: IWAEasEM(model, guide, K, J, optim, **plates),
    "iwem": _iwem(),
    "iwem-woo": _iwem(proposal="iwae"),
    "iwem-woa": _iwem(annealed=False),
    "iwem-one-pass": _iwem(one_pass=True),
    "miss-iwae": _svi(IWAELoss, guide_inputs=MISSING_DATA_INPUTS["miss-iwae"]()),
    "miss-iwem": _iwem(guide_inputs=MISSING_DATA_INPUTS["miss-iwem"]()),
    "miss-iwem-woa": _iwem(annealed=False, guide_inputs=MISSING_DATA_INPUTS["miss-iwem-woa"]()),
}
"""Method names of the paper and the command line: VAE (eq. 3), IWAE (eq. 4), STL, IWAE-DReG,
IWAE-as-EM (Algorithm 1), IWEM (Algorithm 2), IWEM without the optimal P-step (woo) and
IWEM without annealing (woa), IWEM's one-pass step (E-, M- and P-step on one draw at θ_t,
``IWEM(one_pass=True)``); for data with missing entries, called as ``model(x, mask)``:
missIWAE, miss-IWEM (Algorithm 3) and miss-IWEM without annealing."""

#: The methods with IWEM's E-step (built as :class:`IWEM`): they take ``IWEM_OPTIONS``.
IWEM_METHODS = ("iwem", "iwem-woo", "iwem-woa", "iwem-one-pass", "miss-iwem", "miss-iwem-woa")


def build_method(
    name, model, guide, K=50, J=50, L=1, optim=None, annealing=None, proposal_inflation=1.0, p_step_inflation=None,
    log_p_offset=0.0, **plates,
):
    """The inference object for method ``name``; every one has ``step(*args) -> float``,
    ``alpha``, ``ess``, ``end_epoch()`` and ``state_dict()``.

    :param int K: particles of the E-step (IWEM), of the bound (IWAE, STL, DReG, IWAE-as-EM)
        or of the ELBO average (VAE).
    :param int J: P-step particles (IWEM variants; IWAE-as-EM uses K when ``J`` is ``None``).
    :param annealing: the IWEM controller (default ``Annealing()``); ignored by methods without one.
    :param proposal_inflation: :class:`IWEM`'s option, for the IWEM methods only (``IWEM_METHODS``:
        iwem, iwem-woo, iwem-woa, iwem-one-pass, miss-iwem, miss-iwem-woa); the other methods
        refuse any value but the paper's (here and for the two options below).
    :param p_step_inflation: :class:`IWEM`'s option, for the IWEM methods only.
    :param log_p_offset: :class:`IWEM`'s option, for the IWEM methods with the optimal P-step.
    :param int L: :class:`IWEM`'s ELBO samples, for the IWEM methods only (the others refuse any
        value but 1).
    :param plates: ``max_plate_nesting`` and ``data_plate``, passed on.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    optim = pyro.optim.Adam({"lr": 5e-4}) if optim is None else optim
    annealing = Annealing() if annealing is None else annealing
    options = {"proposal_inflation": proposal_inflation, "p_step_inflation": p_step_inflation, "log_p_offset": log_p_offset}
    if name in IWEM_METHODS:
        return METHODS[name](model, guide, K, J, L, optim, annealing, iwem_options=options, **plates)
    options["L"] = L
    given = [key for key, value in options.items() if value not in IWEM_OPTIONS[key]]
    if given:
        raise ValueError(
            f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of the IWEM methods "
            f"({', '.join(IWEM_METHODS)}), not of {name}"
        )
    return METHODS[name](model, guide, K, J, L, optim, annealing, **plates)
