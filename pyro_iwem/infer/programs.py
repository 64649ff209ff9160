"""Running a guide and the model replayed on its draws: the programs' side of a draw.

:class:`ProposeFromModel` proposes the model latents the guide leaves out from the model's
own conditional; :func:`run_guide` traces a guide, naming an input that holds NaN or Inf;
:func:`probe` runs both once, unvectorised and without gradients, for what the sampler must
know before it vectorises (the plate nesting, which latents are global).
"""

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .checks import check_batch_dims_declared, check_finite_inputs, check_finite_params, check_replayed_shape
from .plates import plate_dims
from .sites import base_distribution, density_sites
from .util import ModelError


class ProposeFromModel(Messenger):
    """Model latents the guide does not sample are proposed from the model's own conditional:
    checks that they can be drawn and, with ``detach``, draws them without a gradient path to
    the parameters (a detached proposal, as the E-step's must be: otherwise a reparameterised
    draw such as a Gaussian's missing entry feeds ∂x_m/∂θ into the M-step)."""

    def __init__(self, guide_trace, detach):
        super().__init__()
        self.guide_trace = guide_trace
        self.detach = detach

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg):
            return
        if msg["name"] in self.guide_trace.nodes:
            check_replayed_shape(msg["name"], msg, self.guide_trace.nodes[msg["name"]])  # before the model uses it
            return
        if msg["infer"].get("_deterministic") or msg["infer"].get("_enumerate_dim") is not None:
            return
        if isinstance(base_distribution(msg["fn"]), (dist.ImproperUniform, dist.Unit)):
            raise ModelError(
                f"model site '{msg['name']}' is a latent variable that the guide does not sample, "
                f"and its distribution ({type(base_distribution(msg['fn'])).__name__}) cannot be "
                "sampled to propose it from the model: add the site to the guide"
            )
        if self.detach and msg["value"] is None:
            msg["value"] = msg["fn"].sample()


def run_guide(guide, args, kwargs):
    """Traces the guide; an error on data or parameters holding NaN or Inf is reported as such."""
    try:
        return poutine.trace(guide).get_trace(*args, **kwargs)
    except (ValueError, RuntimeError) as error:
        check_finite_inputs(args, kwargs, error)
        check_finite_params(error)
        raise


def probe(model, guide, args, kwargs, guide_args=None, guide_kwargs=None):
    """``(guide_trace, model_trace)`` of one unvectorised run of the guide and the replayed
    model, without gradients, in a forked RNG stream (probing draws no random numbers of the caller's)."""
    guide_args = args if guide_args is None else guide_args
    guide_kwargs = kwargs if guide_kwargs is None else guide_kwargs
    with poutine.block(), torch.no_grad(), torch.random.fork_rng():
        guide_trace = run_guide(guide, guide_args, guide_kwargs)
        model = ProposeFromModel(guide_trace, detach=True)(poutine.replay(model, trace=guide_trace))
        model_trace = poutine.trace(model).get_trace(*args, **kwargs)
    return guide_trace, model_trace


def max_plate_nesting_of(guide_trace, model_trace):
    """The deepest plate nesting of the density sites of the traces (each checked to declare its batch dims)."""
    for trace in (guide_trace, model_trace):
        for name, site in density_sites(trace):
            check_batch_dims_declared(name, site)
    return max(plate_dims(guide_trace, model_trace), default=0)


def guess_max_plate_nesting(model, guide, args, kwargs, guide_args=None, guide_kwargs=None):
    """The deepest plate nesting of one unvectorised run of the guide and the replayed model (:func:`probe`)."""
    return max_plate_nesting_of(*probe(model, guide, args, kwargs, guide_args, guide_kwargs))
