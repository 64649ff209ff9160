r"""What an estimator changes about a draw, passed to the sampler as transforms.

The sampler draws particles one way; an estimator that needs something else of the graph
passes :class:`DrawTransform` objects (``sampler(..., transforms=[...])``), as Pyro's
estimators wrap trace collection in a messenger of their own. Each transform is one idea:

* :class:`StopProposalParams` -- :math:`\log q` with the guide's distribution parameters
  detached, the path through the reparameterised :math:`z(\phi)` kept; every proposed site
  must then be reparameterised (STL, DReG);
* :class:`LatentViews` -- each guide latent gets a view of its own in the graph, on which a
  hook sees exactly the gradient that reaches the guide through it (DReG's one-pass estimator);
* :class:`CutLatents` -- the model replays leaf copies of the guide's latents, so the graph of
  :math:`\log p` ends at them (IWEM's one-pass step, :func:`~pyro_iwem.infer.grads.shared_draw_gradients`);
* :class:`DetachModelProposals` -- the latents the model proposes itself are drawn without a
  gradient even when the guide keeps its graph; they then count as score-function sites;
* :class:`ReplayGuide` -- replay these latent values instead of drawing new ones;
* :class:`ReplayGlobals` -- replay the global latents :math:`\beta` of earlier particles, so that
  several draws share one :math:`\beta` (the chunks of :func:`~pyro_iwem.infer.iwae_bound`).
"""

from pyro import poutine
from pyro.distributions.util import detach

from .sites import SCORE_TOTALS, density_sites
from .util import ModelError


class DrawTransform:
    """A change to one draw; every hook does nothing by default."""

    #: the model's own proposals are drawn without a gradient
    detach_model_proposals = False
    #: whether the transform works only in a vectorised draw
    vectorized_only = False

    def guide(self, guide):
        """The guide program to run in place of ``guide``."""
        return guide

    def guide_trace(self, trace):
        """Changes the guide's trace in place, before the model replays it."""

    def replay_trace(self, trace):
        """The trace the model replays (default: the guide's)."""
        return trace

    def log_q_distribution(self, fn):
        """The distribution of a guide site whose log density enters :math:`\\log q`."""
        return fn

    def check(self, program, name, site, role, pathwise):
        """Refuses a site this transform cannot serve (raises :class:`~pyro_iwem.infer.util.ModelError`)."""


class StopProposalParams(DrawTransform):
    """:math:`\\log q(z(\\phi); \\lfloor\\phi\\rfloor)`: the guide's distribution parameters
    detached in :math:`\\log q`; every proposed site must be reparameterised.

    :param str needed_by: the estimator's name, for the error a non-reparameterised site gets.
    """

    def __init__(self, needed_by):
        self.needed_by = needed_by

    def log_q_distribution(self, fn):
        return detach(fn)

    def check(self, program, name, site, role, pathwise):
        if pathwise or SCORE_TOTALS.get(role) != "log_score":
            return
        kind = type(site["fn"]).__name__
        if program == "model":
            raise ModelError(
                f"model site '{name}' ({kind}) is proposed from the model and is not reparameterisable; "
                f"{self.needed_by} needs reparameterised proposals: add it to the guide, or use IWAELoss or IWEM "
                "(score-function gradients)"
            )
        raise ModelError(
            f"guide site '{name}' ({kind}) is not reparameterisable; {self.needed_by} needs reparameterised "
            "proposals: use IWAELoss or IWEM, which give it a score-function gradient"
        )


class LatentViews(DrawTransform):
    """The model and :math:`\\log q` see a view of each guide latent with a graph: a node of
    its own (``Particles.latents`` holds the views), on which a hook sees exactly the
    gradient that reaches the guide through that latent."""

    def guide_trace(self, trace):
        for _, site in density_sites(trace):
            if getattr(site["value"], "requires_grad", False):
                site["value"] = site["value"].view_as(site["value"])


class CutLatents(DrawTransform):
    r"""The model replays leaf copies :math:`\zeta` of the guide's latents with a graph
    (``Particles.model_latents``): :math:`\log p` has no graph into the guide, and the
    gradient the model sends back through a latent is read off its leaf."""

    def replay_trace(self, trace):
        cut = trace.copy()
        for name, site in density_sites(trace):
            if getattr(site["value"], "requires_grad", False):
                cut.nodes[name] = {**site, "value": site["value"].detach().requires_grad_()}
        return cut


class DetachModelProposals(DrawTransform):
    """The latents the model proposes itself are drawn without gradients even when the guide
    keeps its graph (IWEM's one-pass step, whose θ-update must not differentiate through
    them); they then count as score-function sites."""

    detach_model_proposals = True


class ReplayGuide(DrawTransform):
    """Replays the latent values of ``trace`` instead of drawing new ones (vectorised draws)."""

    vectorized_only = True

    def __init__(self, trace):
        self.trace = trace

    def guide(self, guide):
        return poutine.replay(guide, trace=self.trace)


class ReplayGlobals(DrawTransform):
    """Replays the global latents of ``particles`` (guide-drawn and model-proposed alike):
    the draw is given the same :math:`\beta`, and its ``log_global_*`` are those of that
    :math:`\beta` again."""

    def __init__(self, particles):
        self.trace = poutine.Trace()
        for trace in (particles.guide_trace, particles.model_trace):
            for name in particles.global_sites:
                if name in trace.nodes and name not in self.trace.nodes:
                    self.trace.add_node(name, **trace.nodes[name])

    def guide(self, guide):
        return poutine.replay(guide, trace=self.trace)

    def replay_trace(self, trace):
        missing = [name for name in self.trace.nodes if name not in trace.nodes]
        if not missing:
            return trace
        trace = trace.copy()
        for name in missing:
            trace.add_node(name, **self.trace.nodes[name])
        return trace


class DrawSettings:
    """The settings of one call of the sampler: the guide's grad mode, inflation factors, transforms."""

    def __init__(self, grad_proposal, inflation, transforms):
        self.grad_proposal = grad_proposal
        self.inflation = inflation
        self.transforms = tuple(transforms)
        self.detach_model_proposals = any(t.detach_model_proposals for t in self.transforms)


def with_replay(options, replay, m):
    """A sampler call's ``options`` with the transform ``replay[m]`` added (``replay``: one
    :class:`ReplayGlobals` per draw of β of an earlier call, or ``None``; under an outer plate the
    draws share their traces, and ``replay[0]`` holds every draw's β)."""
    if not replay:
        return options
    return {**options, "transforms": (*options.get("transforms", ()), replay[m])}


__all__ = [
    "CutLatents",
    "DetachModelProposals",
    "DrawTransform",
    "LatentViews",
    "ReplayGlobals",
    "ReplayGuide",
    "StopProposalParams",
]
