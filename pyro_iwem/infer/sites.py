r"""Sites with roles: what each sample site of a model and guide feeds.

Every sample site that carries a log density (``density_sites``) gets one
:class:`SiteRole` from :func:`classify`, and the role alone says which per-datum totals of
:class:`~pyro_iwem.infer.particles.Particles` its log density enters (:data:`TOTALS`) and,
when its value has no pathwise gradient, which score-function term (:data:`SCORE_TOTALS`):

=====================  =================================================  =======================================  ======================
role                   what it is                                         totals                                   score term
=====================  =================================================  =======================================  ======================
``OBSERVED``           a model site with data                             ``log_p``                                —
``REPLAYED``           a model latent the guide drew, replayed            ``log_p``                                — (the guide's)
``MODEL_PROPOSED``     a model latent the guide leaves out, drawn from    ``log_p``, ``log_model_proposed``        ``log_score``
                       the model (it cancels from the weights)
``MODEL_LEAF``         a model-proposed latent without a pathwise         ``log_p``, ``log_model_proposed``        ``log_score_leaves``
                       gradient that no other model site depends on
                       (the missing entries of an ``obs_mask`` site)
``ENUMERATED``         a model site that depends on an enumerated site    ``log_p``, contracted first              —
``GUIDE_LATENT``       a guide latent the model replays                   ``log_q``                                ``log_score``
``AUXILIARY``          a guide site marked ``is_auxiliary`` (autoguides)  ``log_q``                                ``log_score``
``GLOBAL``             a model latent outside the data plate, drawn       ``log_global_p``                         — (the guide's)
                       once (a global :math:`\beta`), replayed
``GLOBAL_PROPOSED``    a global the guide leaves out, drawn from the      ``log_global_p``,                        ``log_global_score``
                       model's prior                                      ``log_global_model_proposed``
``GLOBAL_GUIDE``       a guide site of the globals (or an autoguide's     ``log_global_q``                         ``log_global_score``
                       auxiliary site when every latent is global)
=====================  =================================================  =======================================  ======================

The importance weight is :math:`\log w = \log p - \log q - \log p_{\text{model proposed}}`,
per particle and datum given the globals; the globals' own terms are one number per draw of
:math:`\beta` (``log_global_*``), outside the per-datum log-mean-exp (L_K of
:func:`~pyro_iwem.infer.objectives.outer_bound`).
A new kind of site is a new role: a row here, a branch of :func:`classify`, and the
sampler sums it where the table says.
"""

import enum

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer.inspect import get_dependencies
from pyro.poutine.util import site_is_subsample
from torch.distributions.utils import broadcast_all

from .util import ModelError


class SiteRole(enum.Enum):
    """The kind of a sample site, which decides what its log density feeds (module doc)."""

    OBSERVED = "observed"
    REPLAYED = "replayed"
    MODEL_PROPOSED = "model-proposed"
    MODEL_LEAF = "model-proposed leaf"
    ENUMERATED = "enumerated"
    GUIDE_LATENT = "guide latent"
    AUXILIARY = "auxiliary"
    GLOBAL = "global"
    GLOBAL_PROPOSED = "model-proposed global"
    GLOBAL_GUIDE = "guide global"

    @property
    def model_proposed(self):
        return self in (SiteRole.MODEL_PROPOSED, SiteRole.MODEL_LEAF, SiteRole.GLOBAL_PROPOSED)

    @property
    def is_global(self):
        return self in (SiteRole.GLOBAL, SiteRole.GLOBAL_PROPOSED, SiteRole.GLOBAL_GUIDE)


#: The per-datum totals each role's log density enters (``ENUMERATED`` sites are contracted
#: together first, and their sum enters ``log_p``).
TOTALS = {
    SiteRole.OBSERVED: ("log_p",),
    SiteRole.REPLAYED: ("log_p",),
    SiteRole.MODEL_PROPOSED: ("log_p", "log_model_proposed"),
    SiteRole.MODEL_LEAF: ("log_p", "log_model_proposed"),
    SiteRole.ENUMERATED: ("log_p",),
    SiteRole.GUIDE_LATENT: ("log_q",),
    SiteRole.AUXILIARY: ("log_q",),
    SiteRole.GLOBAL: ("log_global_p",),
    SiteRole.GLOBAL_PROPOSED: ("log_global_p", "log_global_model_proposed"),
    SiteRole.GLOBAL_GUIDE: ("log_global_q",),
}

#: The score-function term a role's log density enters when its value has no pathwise gradient.
SCORE_TOTALS = {
    SiteRole.MODEL_PROPOSED: "log_score",
    SiteRole.MODEL_LEAF: "log_score_leaves",
    SiteRole.GUIDE_LATENT: "log_score",
    SiteRole.AUXILIARY: "log_score",
    SiteRole.GLOBAL_PROPOSED: "log_global_score",
    SiteRole.GLOBAL_GUIDE: "log_global_score",
}


def classify(
    program, name, site, model_trace, guide_trace, enumerating=False, detach_proposals=False, leaves=None,
    is_global=None,
):
    """The :class:`SiteRole` of sample site ``name`` of ``program`` ("model" or "guide").

    :param bool enumerating: whether the model runs under enumeration (a site with
        enumerated dims is then ``ENUMERATED``).
    :param bool detach_proposals: whether the model's own proposals are drawn without a
        gradient (then none of them has a pathwise gradient).
    :param leaves: ``() -> set`` of model sites no other model site depends on, called only
        for a model-proposed site without a pathwise gradient.
    :param is_global: ``site -> bool``, whether a latent is a global drawn once
        (:meth:`~pyro_iwem.infer.plates.GlobalLatents.is_global`); ``None``: none is.
    :raises ModelError: for a guide site the model lacks that is not marked auxiliary.
    """
    global_site = is_global is not None and is_global(site)
    if program == "guide":
        if global_site:
            if not is_auxiliary(site) and name not in model_trace.nodes:
                _refuse_guide_only(name)
            return SiteRole.GLOBAL_GUIDE
        if is_auxiliary(site):
            return SiteRole.AUXILIARY
        if name not in model_trace.nodes:
            _refuse_guide_only(name)
        return SiteRole.GUIDE_LATENT
    if enumerating and site["infer"].get("_dim_to_id"):
        return SiteRole.ENUMERATED
    if site["is_observed"]:
        return SiteRole.OBSERVED
    if global_site:
        return SiteRole.GLOBAL if name in guide_trace.nodes else SiteRole.GLOBAL_PROPOSED
    if name in guide_trace.nodes:
        return SiteRole.REPLAYED
    if (not site["fn"].has_rsample or detach_proposals) and leaves is not None and name in leaves():
        return SiteRole.MODEL_LEAF
    return SiteRole.MODEL_PROPOSED


def _refuse_guide_only(name):
    raise ModelError(
        f"guide site '{name}' does not appear in the model; a guide-only site must be marked "
        "infer={'is_auxiliary': True}"
    )


def is_pathwise(role, site, detach_proposals=False):
    """Whether the value of a site of ``role`` carries a pathwise (reparameterised) gradient."""
    return site["fn"].has_rsample and not (detach_proposals and role.model_proposed)


def density_sites(trace):
    """Sample sites that carry a log density (latent or observed): no subsample or deterministic sites."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["infer"].get("_deterministic"):
            continue
        yield name, site


def param_values(trace):
    """The unconstrained parameters (leaf tensors) a trace touched, by name."""
    return {name: site["value"].unconstrained() for name, site in trace.nodes.items() if site["type"] == "param"}


def base_distribution(fn):
    """``fn`` without its ``Independent``, mask and expansion wrappers."""
    while isinstance(fn, (torch.distributions.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def is_auxiliary(site):
    return bool(site["infer"].get("is_auxiliary"))


def is_missing_entries(name, trace):
    """Whether ``name`` is the latent half of an ``obs_mask`` observation (``x_unobserved``)."""
    return name.endswith("_unobserved") and trace.nodes.get(name[: -len("unobserved")] + "observed", {}).get(
        "is_observed", False
    )


def model_leaves(model, args, kwargs):
    """Model sites no other model site depends on (Pyro's provenance tracking); empty if it fails."""
    try:
        with poutine.block(), torch.no_grad(), torch.random.fork_rng():
            dependencies = get_dependencies(model, args, kwargs)["prior_dependencies"]
    except Exception:  # noqa: BLE001 - unknown structure: treat every site as a parent (unbiased)
        return frozenset()
    parents = {up for site, ups in dependencies.items() for up in ups if up != site}
    return frozenset(set(dependencies) - parents)


def structure(model_trace, guide_trace):
    """The sample sites of model and guide, and which are observed: what a θ/φ split depends on."""
    return frozenset(
        (which, name, site["is_observed"])
        for which, trace in (("model", model_trace), ("guide", guide_trace))
        for name, site in density_sites(trace)
    )


def site_log_prob(fn, value, args, kwargs):
    """``fn.log_prob(value)``; for independent Bernoulli pixels the negation of the binary
    cross-entropy comes after the event sum, on a tensor ``event_size`` times smaller
    (the same number; it saves a full-size tensor forward and backward on image models)."""
    if (
        isinstance(fn, dist.Independent)
        and isinstance(fn.base_dist, torch.distributions.Bernoulli)
        and not fn._validate_args
        and not args
        and not kwargs
    ):
        logits, value = broadcast_all(fn.base_dist.logits, value)
        bce = F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        return -bce.sum(tuple(range(-fn.reinterpreted_batch_ndims, 0)))
    return fn.log_prob(value, *args, **kwargs)
