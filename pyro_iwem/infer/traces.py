"""The trace machinery every algorithm of the package is built on.

One call draws ``N`` particles from the guide in a single vectorised pass (an outer
particle plate, as Pyro's ``vectorize_particles=True`` does), replays the model on them
and reduces every site's log density to a ``(N, B)`` tensor: one row per particle, one
column per datum of the data plate, every other plate and event dimension summed.
The algorithms (:mod:`pyro_iwem.infer.objectives`) are a few lines on these tensors.
"""

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions.util import detach, scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import is_validation_enabled, site_is_subsample
from torch.distributions.utils import broadcast_all

PARTICLE_PLATE = "_iwem_particles"


@dataclass
class Particles:
    r"""Per-particle, per-datum log densities of one vectorised pass; tensors are ``(N, B)``.

    * ``log_p``: :math:`\log p(x_i, z_{ik}; \theta)`, every model site summed: observed
      sites, latents the guide proposed, and latents the model proposed itself (such as
      the missing entries of an ``obs_mask`` site).
    * ``log_q``: :math:`\log q(z_{ik} \mid x_i; \phi)`, every guide site summed.
    * ``log_model_proposed``: the part of ``log_p`` from latents the model proposed.
    * ``scale``: the data plate's subsampling scale (full size / subsample size); the
      tensors above are unscaled, so weights are normalised per datum before scaling.

    The importance weight of a particle is the joint over the whole proposal density,
    ``log_w = log_p - log_q - log_model_proposed``: model-proposed sites cancel.
    """

    log_p: torch.Tensor
    log_q: torch.Tensor
    log_model_proposed: torch.Tensor
    scale: float
    model_trace: poutine.Trace
    guide_trace: poutine.Trace

    @property
    def log_w(self):
        return self.log_p - self.log_q - self.log_model_proposed

    @property
    def num_particles(self):
        return self.log_p.shape[0]


def _density_sites(trace):
    """Sample sites that carry a log density (latent or observed): no subsample or deterministic sites."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["infer"].get("_deterministic"):
            continue
        yield name, site


def param_values(trace):
    """The unconstrained parameters (leaf tensors) a trace touched."""
    return {site["value"].unconstrained() for site in trace.nodes.values() if site["type"] == "param"}


def _base_distribution(fn):
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


class _ProposeFromModel(Messenger):
    """Model latents the guide does not sample are proposed from the model's own conditional:
    checks that they can be drawn and, with ``detach``, draws them without a gradient path to
    the parameters (a detached proposal, as the E-step's must be: otherwise a reparameterised
    draw such as a Gaussian's missing entry feeds ∂x_m/∂θ into the M-step)."""

    def __init__(self, guide_trace, detach):
        super().__init__()
        self.guide_trace = guide_trace
        self.detach = detach

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["name"] in self.guide_trace.nodes or site_is_subsample(msg):
            return
        if msg["infer"].get("_deterministic"):
            return
        if isinstance(_base_distribution(msg["fn"]), (dist.ImproperUniform, dist.Unit)):
            raise ValueError(
                f"model site '{msg['name']}' is a latent variable that the guide does not sample, "
                f"and its distribution ({type(_base_distribution(msg['fn'])).__name__}) cannot be "
                "sampled to propose it from the model: add the site to the guide"
            )
        if self.detach and msg["value"] is None:
            msg["value"] = msg["fn"].sample()


def _run_guide(guide, args, kwargs):
    """Traces the guide; an error on data holding NaN or Inf is reported as such."""
    try:
        return poutine.trace(guide).get_trace(*args, **kwargs)
    except (ValueError, RuntimeError) as error:
        named = [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items())
        for name, value in named:
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(
                    f"argument {name} passed to the guide contains NaN or Inf values; fill missing entries "
                    "with any finite value and mark them with obs_mask= or pyro_iwem.observe_masked"
                ) from error
        raise


def guess_max_plate_nesting(model, guide, args, kwargs, guide_args=None, guide_kwargs=None):
    """The deepest plate nesting of one unvectorised run of the guide and the replayed model.

    Runs in a forked RNG stream, so that guessing draws no random numbers of the caller's."""
    guide_args = args if guide_args is None else guide_args
    guide_kwargs = kwargs if guide_kwargs is None else guide_kwargs
    with poutine.block(), torch.no_grad(), torch.random.fork_rng():
        guide_trace = _run_guide(guide, guide_args, guide_kwargs)
        model = _ProposeFromModel(guide_trace, detach=True)(poutine.replay(model, trace=guide_trace))
        model_trace = poutine.trace(model).get_trace(*args, **kwargs)
    dims = [
        -frame.dim
        for trace in (guide_trace, model_trace)
        for _, site in _density_sites(trace)
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


class ParticleSampler:
    r"""Draws particles from a guide, replays a model on them, reduces log densities per datum.

    :param model: a Pyro model, :math:`p(x, z; \theta)`.
    :param guide: a Pyro guide, :math:`q(z \mid x; \phi)`.
    :param int max_plate_nesting: the deepest plate nesting of model and guide; guessed
        from one run when ``None``.
    :param str data_plate: the name of the plate over data points whose dimension is kept
        (weights are normalised per datum). ``None`` detects it: the outermost plate that
        encloses every sample site of the model. A model with no such plate is one datum.
    :param guide_inputs: optional ``f(model, guide, args, kwargs) -> (args, kwargs)``, the
        guide's inputs, computed once per call outside the particle plate (the model
        still sees ``args``): :class:`~pyro_iwem.infer.missing.ImputedInputs` for
        miss-IWEM's proposal, :class:`~pyro_iwem.infer.missing.ZeroFilledInputs` for missIWAE's.
    :param bool validate_model: keep Pyro's distribution validation on every call; by
        default it runs on the first call only (when Pyro's validation is enabled).

    Calling the sampler returns :class:`Particles`. With ``grad_guide=False`` the whole
    proposal is detached, as the E-step needs: the guide runs under ``torch.no_grad()`` and
    the latents the model proposes itself are drawn without gradients; the model's log
    densities always keep the caller's grad mode.
    """

    def __init__(
        self, model, guide, max_plate_nesting=None, data_plate=None, guide_inputs=None, validate_model=False
    ):
        self.model = model
        self.guide = guide
        self.max_plate_nesting = max_plate_nesting
        self.data_plate = data_plate  # None until detected; False: the model has no data plate
        self.guide_inputs = guide_inputs
        self.validate_model = validate_model
        self._validated = False

    def __call__(
        self,
        num_particles,
        args,
        kwargs,
        grad_guide=True,
        guide_trace=None,
        stop_proposal_params=False,
        rsample_for=None,
        validate=True,
        guide_args=None,
    ):
        """Draws ``num_particles`` particles per datum; returns :class:`Particles`.

        :param bool grad_guide: keep the guide's graph (reparameterised proposals).
        :param guide_args: the guide's ``(args, kwargs)`` from :meth:`inputs_for_guide`, to
            share one draw of them between calls (IWEM's E- and P-step use one completion).
        :param guide_trace: replay these latent values instead of drawing new ones.
        :param bool stop_proposal_params: compute log q with the guide's distribution
            parameters detached (the path through the reparameterised z is kept).
        :param str rsample_for: if given, every guide site must be reparameterisable; the
            error names this algorithm.
        """
        guide_args, guide_kwargs = self.inputs_for_guide(args, kwargs) if guide_args is None else guide_args
        if self.max_plate_nesting is None:
            self.max_plate_nesting = guess_max_plate_nesting(
                self.model, self.guide, args, kwargs, guide_args, guide_kwargs
            )
        # Pyro's distribution checks run on the first call; afterwards they cost ~7% of a step
        # and the sampler's own checks (finite data, log weights) remain.
        validating = is_validation_enabled() and (self.validate_model or not self._validated)
        with pyro.validation_enabled(validating):
            particles = self._draw(
                num_particles, (args, kwargs), (guide_args, guide_kwargs), guide_trace, grad_guide,
                stop_proposal_params, rsample_for,
            )
        self._validated = True
        if validate:
            _check_log_weights(particles.log_w)
        return particles

    def inputs_for_guide(self, args, kwargs):
        """The guide's ``(args, kwargs)``: ``guide_inputs`` applied to the model's, or the same."""
        if self.guide_inputs is None:
            return args, kwargs
        return self.guide_inputs(self.model, self.guide, args, kwargs)

    def _draw(self, num_particles, model_inputs, guide_inputs, guide_trace, grad_guide, stop_proposal_params, rsample_for):
        (args, kwargs), (guide_args, guide_kwargs) = model_inputs, guide_inputs
        particle_dim = -1 - self.max_plate_nesting

        def vectorize(fn):
            def vectorized(*a, **k):
                with pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
                    return fn(*a, **k)

            return vectorized

        guide = vectorize(self.guide)
        if guide_trace is not None:
            guide = poutine.replay(guide, trace=guide_trace)
        grad_proposal = grad_guide and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad_proposal):
            guide_trace = _run_guide(guide, guide_args, guide_kwargs)
        model = _ProposeFromModel(guide_trace, detach=not grad_proposal)(
            poutine.replay(vectorize(self.model), trace=guide_trace)
        )
        model_trace = poutine.trace(model).get_trace(*args, **kwargs)
        return self._reduce(model_trace, guide_trace, num_particles, particle_dim, stop_proposal_params, rsample_for)

    def _find_data_plate(self, model_trace):
        if self.data_plate is None:
            stacks = [
                [f.name for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE]
                for _, site in _density_sites(model_trace)
            ]
            common = set(stacks[0]).intersection(*stacks[1:]) if stacks else set()
            outermost = [name for name in (stacks[0] if stacks else []) if name in common]
            self.data_plate = outermost[0] if outermost else False
        return self.data_plate or None

    def _reduce(self, model_trace, guide_trace, num_particles, particle_dim, stop_proposal_params, rsample_for):
        data_plate = self._find_data_plate(model_trace)
        frame = _data_frame(model_trace, data_plate)
        batch = frame.size if frame is not None else 1
        scale = frame.full_size / frame.size if frame is not None and frame.full_size else 1.0
        shape = (num_particles, batch)
        reduce = _Reducer(particle_dim, frame, scale, shape)

        log_p = log_model = log_q = 0.0
        for name, site in _density_sites(model_trace):
            if site["is_observed"]:
                _check_observed(name, site)
            lp = reduce(name, site, data_plate)
            log_p = log_p + lp
            if not site["is_observed"] and name not in guide_trace.nodes:
                log_model = log_model + lp
        for name, site in _density_sites(guide_trace):
            if site["is_observed"]:
                continue
            if name not in model_trace.nodes:
                raise ValueError(f"guide site '{name}' does not appear in the model")
            if rsample_for and not site["fn"].has_rsample:
                raise NotImplementedError(
                    f"guide site '{name}' ({type(site['fn']).__name__}) is not reparameterisable; "
                    f"{rsample_for} needs reparameterised proposals (score-function gradients are not supported)"
                )
            if stop_proposal_params:
                site = dict(site, fn=detach(site["fn"]))
            log_q = log_q + reduce(name, site, data_plate)
        if not isinstance(log_p, torch.Tensor):
            raise ValueError("the model has no sample site: there is nothing to weight")
        zeros = log_p.new_zeros(shape)
        return Particles(
            log_p=log_p,
            log_q=_as_tensor(log_q, zeros),
            log_model_proposed=_as_tensor(log_model, zeros),
            scale=scale,
            model_trace=model_trace,
            guide_trace=guide_trace,
        )


def _as_tensor(value, zeros):
    return value if isinstance(value, torch.Tensor) else zeros


def _data_frame(trace, data_plate):
    if data_plate is None:
        return None
    for _, site in _density_sites(trace):
        for frame in site["cond_indep_stack"]:
            if frame.name == data_plate:
                return frame
    raise ValueError(f"data_plate '{data_plate}' is not a plate of the model")


class _Reducer:
    """Reduces one site's log density to (particles, data), applying non-data-plate scales."""

    def __init__(self, particle_dim, frame, data_scale, shape):
        self.particle_dim = particle_dim
        self.frame = frame
        self.data_scale = data_scale
        self.shape = shape

    def __call__(self, name, site, data_plate):
        lp = _log_prob(site["fn"], site["value"], site["args"], site["kwargs"])
        scale = site["scale"]
        if self.data_scale != 1.0:
            scale = scale / self.data_scale
        lp = scale_and_mask(lp, scale, site["mask"])
        if data_plate is not None and all(f.name != data_plate for f in site["cond_indep_stack"]):
            raise ValueError(
                f"site '{name}' is outside the data plate '{data_plate}': per-datum importance weights "
                "need every site inside it (pass data_plate=None to treat the batch as one datum)"
            )
        ndim = -self.particle_dim
        if lp.dim() > ndim:
            raise ValueError(
                f"site '{name}' has batch shape {tuple(lp.shape)} with dims left of the particle plate "
                f"(dim {self.particle_dim}): declare its batch dims with plates or .to_event()"
            )
        lp = lp.reshape((1,) * (ndim - lp.dim()) + lp.shape)
        keep = {0} if self.frame is None else {0, ndim + self.frame.dim}
        summed = [d for d in range(ndim) if d not in keep]
        if summed:
            lp = lp.sum(summed)
        if self.frame is None:
            lp = lp.unsqueeze(-1)
        return lp.expand(self.shape)


def _log_prob(fn, value, args, kwargs):
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


def _check_observed(name, site):
    value = site["value"]
    if torch.is_floating_point(value) and not torch.isfinite(value).all():
        raise ValueError(
            f"observed site '{name}' contains NaN or Inf values; fill missing entries with any finite "
            "value and mark them with obs_mask= or pyro_iwem.observe_masked"
        )


def _check_log_weights(log_w):
    if torch.isnan(log_w).any():
        raise ValueError("NaN importance log weight: a model or guide log density is NaN")
    dead = (log_w == -math.inf).all(0)
    if dead.any():
        index = dead.nonzero()[0].item()
        raise ValueError(
            f"all {log_w.shape[0]} importance log weights are -inf for datum {index}: the guide only "
            "proposes values where the model has zero density"
        )


def theta_and_phi(particles: Particles, theta: set | None = None):
    """The unconstrained parameters the model touches (θ) and those only the guide touches (φ)."""
    theta = param_values(particles.model_trace) if theta is None else theta
    phi = param_values(particles.guide_trace) - theta
    return theta, phi
