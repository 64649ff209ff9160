"""The one place that maps method names to inference algorithms."""

import math
from dataclasses import dataclass
from typing import Callable

import pyro.optim
from pyro.infer import SVI

from .annealing import Annealing
from .iwem import IWEM
from .variants import IWAEasEM
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


@dataclass(frozen=True)
class MethodSpec:
    r"""One method of the paper's tables and the command line.

    :param str name: its name (``train --method``).
    :param build: ``(model, guide, K, J, L, optim, annealing, **plates) -> step object``; the
        IWEM family's also takes ``iwem_options`` (``IWEM_OPTIONS``).
    :param str family: ``"svi"`` (a Pyro loss under ``SVIStep``, :class:`pyro.infer.SVI` with
        IWEM's attributes), ``"iwem"`` (IWEM's E-step: an :class:`IWEM`, which takes
        ``IWEM_OPTIONS``) or ``"em"`` (IWAE-as-EM).
    :param bool uses_J: whether it draws J P-step particles besides the K.
    :param bool optimal_p_step: whether its P-step is eq. (7), whose :math:`|\log p|` an offset shifts.
    :param guide_inputs: for data with missing entries (called as ``model(x, mask)``), the class
        of what the guide sees (§4.1): missIWAE's zero-filled data, miss-IWEM's completion; the
        same inputs serve imputation afterwards. ``None`` for complete data.
    :param str description: what it is, in a few words.
    """

    name: str
    build: Callable
    family: str
    uses_J: bool = False
    optimal_p_step: bool = False
    guide_inputs: type | None = None
    description: str = ""

    @property
    def missing_data(self):
        return self.guide_inputs is not None


def _iwae_as_em(model, guide, K, J, L, optim, annealing, **plates):
    return IWAEasEM(model, guide, K, J, optim, **plates)


#: Every method, in the order of the paper's tables (Table 1, then this project's one-pass
#: IWEM, then Table 3's methods for data with missing entries): the one registry from which
#: the command line, the tables, the benchmark and the tests take what they need.
SPECS = (
    MethodSpec("vae", _svi(VAELoss), "svi", description="VAE, the ELBO (eq. 3)"),
    MethodSpec("iwae", _svi(IWAELoss), "svi", description="IWAE (eq. 4)"),
    MethodSpec("stl", _svi(STLLoss), "svi", description="IWAE with the sticking-the-landing φ-gradient"),
    MethodSpec("dreg", _svi(DReGLoss), "svi", description="IWAE with the doubly reparameterised φ-gradient"),
    MethodSpec("iwae-em", _iwae_as_em, "em", uses_J=True, description="IWAE as EM (Algorithm 1)"),
    MethodSpec("iwem-woo", _iwem(proposal="iwae"), "iwem", uses_J=True, description="IWEM without the optimal P-step"),
    MethodSpec("iwem-woa", _iwem(annealed=False), "iwem", uses_J=True, optimal_p_step=True,
               description="IWEM without annealing"),
    MethodSpec("iwem", _iwem(), "iwem", uses_J=True, optimal_p_step=True, description="IWEM (Algorithm 2)"),
    MethodSpec("iwem-one-pass", _iwem(one_pass=True), "iwem", optimal_p_step=True,
               description="IWEM's one-pass step (E-, M- and P-step on one draw at θ_t, OnePassIWEM)"),
    MethodSpec("miss-iwae", _svi(IWAELoss, guide_inputs=ZeroFilledInputs()), "svi", guide_inputs=ZeroFilledInputs,
               description="missIWAE"),
    MethodSpec("miss-iwem-woa", _iwem(annealed=False, guide_inputs=ImputedInputs()), "iwem", uses_J=True,
               optimal_p_step=True, guide_inputs=ImputedInputs, description="miss-IWEM without annealing"),
    MethodSpec("miss-iwem", _iwem(guide_inputs=ImputedInputs()), "iwem", uses_J=True, optimal_p_step=True,
               guide_inputs=ImputedInputs, description="miss-IWEM (Algorithm 3)"),
)

#: The specifications by name.
SPEC = {spec.name: spec for spec in SPECS}

#: Method names of the paper and the command line, to their builders.
METHODS = {spec.name: spec.build for spec in SPECS}

#: The methods with IWEM's E-step (built as :class:`IWEM`): they take ``IWEM_OPTIONS``.
IWEM_METHODS = tuple(spec.name for spec in SPECS if spec.family == "iwem")

#: What the guide sees in the methods for data with missing entries (§4.1).
MISSING_DATA_INPUTS = {spec.name: spec.guide_inputs for spec in SPECS if spec.missing_data}

#: IWEM's options that only the IWEM methods take, with the values that mean "as the paper has it".
IWEM_OPTIONS = {"L": (1,), "proposal_inflation": (1.0,), "p_step_inflation": (None, 1.0), "log_p_offset": (0.0,)}


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
