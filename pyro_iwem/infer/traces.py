"""The trace machinery every algorithm of the package is built on.

One call draws ``N`` particles from the guide, replays the model on them and reduces every
site's log density to a ``(N, B)`` tensor: one row per particle, one column per datum of the
data plate, every other plate and event dimension summed. By default the particles are drawn
in one vectorised pass (an outer particle plate, as Pyro's ``vectorize_particles=True``);
models written for one particle at a time are run ``N`` times and stacked instead
(``vectorize_particles=False``), every run on the same subsample. The algorithms
(:mod:`pyro_iwem.infer.objectives`) are a few lines on these tensors.

What the sampler does with the sites of a Pyro model and guide:

* latents the guide samples enter :math:`\\log q` and are replayed in the model;
* auxiliary guide sites (``infer={"is_auxiliary": True}``, as Pyro's autoguides make) enter
  :math:`\\log q` only; their Delta sites carry the Jacobian in :math:`\\log q` too;
* model latents the guide leaves out are proposed from the model's own conditional (they
  cancel from the weights); those marked for parallel enumeration are summed out exactly
  (:mod:`pyro_iwem.infer.enumeration`);
* sites that are not reparameterised (discrete latents) contribute their log density to
  ``log_score``, to which the objectives attach a score-function gradient.
"""

import math
import numbers
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions.util import detach, scale_and_mask
from pyro.infer.inspect import get_dependencies
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import is_validation_enabled, site_is_subsample
from torch.distributions.utils import broadcast_all

from .enumeration import EnumerationPolicy, contract_enumerated, wants_enumeration
from .inflation import ProposalInflation
from .params import ParamSplitter
from .util import ModelError, warn_once

PARTICLE_PLATE = "_iwem_particles"

VECTORIZE_HINT = (
    "if the model or guide is written for one particle at a time (explicit batch shapes such as "
    "x.view(n, -1) or torch.cat(..., dim=1) on latents, recurrent cells, control flow on values), "
    "pass vectorize_particles=False"
)


@dataclass
class Particles:
    r"""Per-particle, per-datum log densities of one draw; tensors are ``(N, B)``.

    * ``log_p``: :math:`\log p(x_i, z_{ik}; \theta)`, every model site summed: observed
      sites, latents the guide proposed, latents the model proposed itself (such as the
      missing entries of an ``obs_mask`` site); enumerated sites summed out.
    * ``log_q``: :math:`\log q(z_{ik} \mid x_i; \phi)`, every guide site summed.
    * ``log_model_proposed``: the part of ``log_p`` from latents the model proposed.
    * ``log_score``: the log density of the proposal's non-reparameterised sites whose values
      the weights depend on (``None`` when there are none): the term a score-function
      estimator multiplies by its learning signal.
    * ``log_score_leaves``: the same for model-proposed sites nothing else depends on (the
      missing entries of an ``obs_mask`` site): they matter only to objectives that use the
      full :math:`\log p`, such as IWEM's optimal P-step.
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
    log_score: torch.Tensor | None = None
    log_score_leaves: torch.Tensor | None = None
    latents: list = field(default_factory=list)
    #: the tensors the model replayed for ``latents`` (the same ones, or their leaf copies
    #: when drawn with ``cut_latents``; ``None`` for a guide-only site)
    model_latents: list = field(default_factory=list)
    model_params: dict = field(default_factory=dict)
    guide_params: dict = field(default_factory=dict)
    subsample: poutine.Trace | None = None
    model_proposed: tuple = ()
    guide_has_graph: bool = False
    splitter: ParamSplitter | None = None
    structure: frozenset = frozenset()
    latent_event_dims: list = field(default_factory=list)
    layout: tuple | None = None  # (dims of a site's batch shape, position of the data dim): vectorised only

    @property
    def log_w(self):
        return self.log_p - self.log_q - self.log_model_proposed

    @property
    def num_particles(self):
        return self.log_p.shape[0]

    def param_groups(self):
        """θ, φ and their overlap, found from this draw's graph (``pyro_iwem.infer.params``)."""
        return self.splitter(self)

    def per_latent(self, per_datum):
        """``per_datum`` ``(N, B)`` reshaped to broadcast against each latent in ``latents``
        (vectorised draws only): its particle and data dims where the latent has them."""
        ndim, data_position = self.layout
        shape = [1] * ndim
        shape[0] = per_datum.shape[0]
        if data_position is not None:
            shape[data_position] = per_datum.shape[1]
        batch = per_datum.reshape(shape)
        return [batch.reshape(batch.shape + (1,) * event_dim) for event_dim in self.latent_event_dims]


def _density_sites(trace):
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


def _base_distribution(fn):
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def is_auxiliary(site):
    return bool(site["infer"].get("is_auxiliary"))


def is_missing_entries(name, trace):
    """Whether ``name`` is the latent half of an ``obs_mask`` observation (``x_unobserved``)."""
    return name.endswith("_unobserved") and trace.nodes.get(name[: -len("unobserved")] + "observed", {}).get(
        "is_observed", False
    )


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
        if msg["is_observed"] or site_is_subsample(msg):
            return
        if msg["name"] in self.guide_trace.nodes:
            _check_replayed_shape(msg["name"], msg)  # before the model computes with the value
            return
        if msg["infer"].get("_deterministic") or msg["infer"].get("_enumerate_dim") is not None:
            return
        if isinstance(_base_distribution(msg["fn"]), (dist.ImproperUniform, dist.Unit)):
            raise ModelError(
                f"model site '{msg['name']}' is a latent variable that the guide does not sample, "
                f"and its distribution ({type(_base_distribution(msg['fn'])).__name__}) cannot be "
                "sampled to propose it from the model: add the site to the guide"
            )
        if self.detach and msg["value"] is None:
            msg["value"] = msg["fn"].sample()


class _EnumerationAnnotations(Messenger):
    """Records whether any model site asks for enumeration (as the model wrote it)."""

    found = False

    def _pyro_sample(self, msg):
        self.found = self.found or wants_enumeration(msg)


def _run_guide(guide, args, kwargs):
    """Traces the guide; an error on data holding NaN or Inf is reported as such."""
    try:
        return poutine.trace(guide).get_trace(*args, **kwargs)
    except (ValueError, RuntimeError) as error:
        named = [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items())
        for name, value in named:
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise ModelError(
                    f"argument {name} passed to the guide contains NaN or Inf values; fill missing entries "
                    "with any finite value and mark them with obs_mask= or pyro_iwem.observe_masked"
                ) from error
        raise


def _subsample_trace(*traces):
    """A trace holding only the subsample sites of ``traces``: replaying it fixes the minibatch."""
    kept = poutine.Trace()
    for trace in traces:
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and site_is_subsample(site) and name not in kept.nodes and name != PARTICLE_PLATE:
                kept.add_node(name, **site)
    return kept


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
    for trace in (guide_trace, model_trace):
        for name, site in _density_sites(trace):
            _check_batch_dims_declared(name, site)
    return max(dims, default=0)


def _model_leaves(model, args, kwargs):
    """Model sites no other model site depends on (Pyro's provenance tracking); empty if it fails."""
    try:
        with poutine.block(), torch.no_grad(), torch.random.fork_rng():
            dependencies = get_dependencies(model, args, kwargs)["prior_dependencies"]
    except Exception:  # noqa: BLE001 - unknown structure: treat every site as a parent (unbiased)
        return frozenset()
    parents = {up for site, ups in dependencies.items() for up in ups if up != site}
    return frozenset(set(dependencies) - parents)


class _SiteTerms:
    """Accumulates per-datum log densities: one ``(n, b)`` tensor per site (n ∈ {1, N},
    b ∈ {1, B}), summed into named totals at the end."""

    def __init__(self, ndim, data_position):
        self.ndim = ndim
        self.data_position = data_position
        self.terms = []  # (total name, site name, is latent, (n, b) tensor, data scale applies)

    def per_datum(self, name, log_prob):
        if log_prob.dim() > self.ndim:
            raise ModelError(
                f"site '{name}' has batch shape {tuple(log_prob.shape)} with dims left of the particle plate "
                f"(dim {-self.ndim}): declare its batch dims with plates or .to_event(); {VECTORIZE_HINT}"
            )
        log_prob = log_prob.reshape((1,) * (self.ndim - log_prob.dim()) + log_prob.shape)
        keep = {0} if self.data_position is None else {0, self.data_position}
        summed = [d for d in range(self.ndim) if d not in keep]
        if summed:
            log_prob = log_prob.sum(summed)
        return log_prob if self.data_position is not None else log_prob.unsqueeze(-1)

    def add(self, total, name, log_prob, latent, in_data_plate):
        self.terms.append((total, name, latent, self.per_datum(name, log_prob), in_data_plate))

    def shared_latents(self):
        """Latent sites with one value for a batch of several data (a sizeless plate that broadcast)."""
        batch = max(t.shape[1] for *_, t, _ in self.terms)
        return [name for _, name, latent, t, _ in self.terms if latent and t.shape[1] == 1 and batch > 1]

    def totals(self, shape, data_scale=None):
        """Named ``(N, B)`` totals; with ``data_scale``, the batch is one datum (the data plate's
        sites scaled by it and summed over the batch)."""
        out = {}
        for total, _, _, t, in_data_plate in self.terms:
            if data_scale is not None:
                t = (t * data_scale if in_data_plate else t).sum(1, keepdim=True)
            out[total] = t if total not in out else out[total] + t
        return {k: v.expand(shape) for k, v in out.items()}


class ParticleSampler:
    r"""Draws particles from a guide, replays a model on them, reduces log densities per datum.

    :param model: a Pyro model, :math:`p(x, z; \theta)`.
    :param guide: a Pyro guide, :math:`q(z \mid x; \phi)`.
    :param int max_plate_nesting: the deepest plate nesting of model and guide; guessed
        from one run when ``None``.
    :param str data_plate: the name of the plate over data points whose dimension is kept
        (weights are normalised per datum). ``None`` detects it: the outermost plate that
        encloses every observed site of the model. A model with no such plate is one datum;
        so is a batch whose latents are not all inside the data plate (a global latent, a
        joint autoguide's one vector), with a warning naming the site.
    :param guide_inputs: optional ``f(model, guide, args, kwargs) -> (args, kwargs)``, the
        guide's inputs, computed once per call outside the particle plate (the model
        still sees ``args``): :class:`~pyro_iwem.infer.missing.ImputedInputs` for
        miss-IWEM's proposal, :class:`~pyro_iwem.infer.missing.ZeroFilledInputs` for missIWAE's.
    :param bool validate_model: keep Pyro's distribution validation on every call; by
        default it runs on the first call only (when Pyro's validation is enabled).
    :param bool vectorize_particles: draw the particles in one pass under a particle plate
        (default); ``False`` runs guide and model once per particle and stacks the results,
        for models written for one particle at a time.

    Calling the sampler returns :class:`Particles`. With ``grad_guide=False`` the whole
    proposal is detached, as the E-step needs: the guide runs under ``torch.no_grad()`` and
    the latents the model proposes itself are drawn without gradients; the model's log
    densities always keep the caller's grad mode.
    """

    def __init__(
        self,
        model,
        guide,
        max_plate_nesting=None,
        data_plate=None,
        guide_inputs=None,
        validate_model=False,
        vectorize_particles=True,
    ):
        self.model = model
        self.guide = guide
        self.max_plate_nesting = max_plate_nesting
        self.data_plate = data_plate  # None until detected; False: the model has no data plate
        self._explicit_data_plate = data_plate is not None
        self.guide_inputs = guide_inputs
        self.validate_model = validate_model
        self.vectorize_particles = vectorize_particles
        self.split_params = ParamSplitter()
        self.warned = set()
        self._validated = False
        self._enumerates = None
        self._leaves = None

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
        subsample=None,
        detach_model_proposals=False,
        latent_views=False,
        cut_latents=False,
        inflation=None,
    ):
        r"""Draws ``num_particles`` particles per datum; returns :class:`Particles`.

        :param bool grad_guide: keep the guide's graph (reparameterised proposals).
        :param guide_args: the guide's ``(args, kwargs)`` from :meth:`inputs_for_guide`, to
            share one draw of them between calls (IWEM's E- and P-step use one completion).
        :param guide_trace: replay these latent values instead of drawing new ones (vectorised only).
        :param bool stop_proposal_params: compute log q with the guide's distribution
            parameters detached (the path through the reparameterised z is kept).
        :param str rsample_for: if given, every proposed site must be reparameterisable; the
            error names this algorithm.
        :param subsample: the ``subsample`` of earlier :class:`Particles`, to draw on the same
            minibatch of a subsampled data plate.
        :param bool detach_model_proposals: draw the latents the model proposes itself without
            gradients even when the guide keeps its graph (IWEM's one-pass step, whose θ-update
            must not differentiate through them); they then count as score-function sites.
        :param bool latent_views: give the model and :math:`\log q` a view of each guide
            latent, a node of its own in the graph (``Particles.latents`` holds the views): a
            hook on it sees exactly the gradient that reaches the guide through that latent
            (IWAE-DReG's one-pass estimator).
        :param bool cut_latents: the model replays leaf copies of the guide's reparameterised
            latents (``Particles.model_latents``), so :math:`\log p` has no graph into the
            guide: the gradient the model sends back through a latent is read off its leaf and
            passed on to the guide by the caller (:func:`~pyro_iwem.infer.losses.shared_draw_gradients`).
        :param inflation: draw from the guide with its variance multiplied by this factor
            (:class:`~pyro_iwem.infer.ProposalInflation`; ``log_q`` is then the log
            density of the widened proposal): a number for every particle, or a sequence of
            ``num_particles`` factors, one per particle (IWEM's E-step widens its K importance
            samples and not its L ELBO samples in one pass). ``None`` or 1: no inflation.
        """
        guide_args, guide_kwargs = self.inputs_for_guide(args, kwargs) if guide_args is None else guide_args
        if self.max_plate_nesting is None:
            self.max_plate_nesting = guess_max_plate_nesting(
                self.model, self.guide, args, kwargs, guide_args, guide_kwargs
            )
        self._model_inputs = (args, kwargs)
        # Pyro's distribution checks run on the first call; afterwards they cost ~7% of a step
        # and the sampler's own checks (finite data, log weights) remain.
        validating = is_validation_enabled() and (self.validate_model or not self._validated)
        options = dict(
            grad_proposal=grad_guide and torch.is_grad_enabled(),
            stop_proposal_params=stop_proposal_params,
            rsample_for=rsample_for,
            detach_model_proposals=detach_model_proposals,
            latent_views=latent_views,
            cut_latents=cut_latents,
            inflation=_inflation_factors(inflation, num_particles),
        )
        with pyro.validation_enabled(validating):
            if self.vectorize_particles:
                particles = self._draw_vectorized(
                    num_particles, (args, kwargs), (guide_args, guide_kwargs), guide_trace, subsample, options
                )
            else:
                if guide_trace is not None:
                    raise NotImplementedError("replaying a guide trace needs vectorize_particles=True")
                particles = self._draw_loop(num_particles, (args, kwargs), (guide_args, guide_kwargs), subsample, options)
        self._validated = True
        if validate:
            _check_log_weights(particles.log_w)
        return particles

    def inputs_for_guide(self, args, kwargs):
        """The guide's ``(args, kwargs)``: ``guide_inputs`` applied to the model's, or the same."""
        if self.guide_inputs is None:
            return args, kwargs
        return self.guide_inputs(self.model, self.guide, args, kwargs)

    # drawing -------------------------------------------------------------------------

    def _run(self, guide, model, model_inputs, guide_inputs, subsample, options, first_enum_dim):
        """One run of guide and replayed model: ``(guide_trace, model_trace)``."""
        (args, kwargs), (guide_args, guide_kwargs) = model_inputs, guide_inputs
        if subsample is not None:
            guide = poutine.replay(guide, trace=subsample)
            model = poutine.replay(model, trace=subsample)
        with torch.set_grad_enabled(options["grad_proposal"]):
            guide_trace = _run_guide(guide, guide_args, guide_kwargs)
        self._check_guide(guide_trace)
        if options["latent_views"]:
            for _, site in _density_sites(guide_trace):
                if isinstance(site["value"], torch.Tensor) and site["value"].requires_grad:
                    site["value"] = site["value"].view_as(site["value"])
        annotations = _EnumerationAnnotations()  # read inside the replay, which overwrites a site's infer
        inner = annotations(model) if self._enumerates is None else model
        if self._enumerates:  # inside the replay, so that enum sees (and tracks) every site first
            inner = poutine.enum(EnumerationPolicy(guide_trace, self.warned)(model), first_available_dim=first_enum_dim)
        detach = options["detach_model_proposals"] or not options["grad_proposal"]
        replay_trace = _cut_latents(guide_trace) if options["cut_latents"] else guide_trace
        replayed = _ProposeFromModel(guide_trace, detach=detach)(
            poutine.replay(inner, trace=replay_trace)
        )
        model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
        if self._enumerates is None:  # the first run learns whether the model asks for enumeration
            self._enumerates = annotations.found
            if annotations.found:
                return self._run(guide, model, model_inputs, guide_inputs, subsample, options, first_enum_dim)
        return guide_trace, model_trace

    def _draw_vectorized(self, num_particles, model_inputs, guide_inputs, guide_trace, subsample, options):
        particle_dim = -1 - self.max_plate_nesting

        def vectorize(fn):
            def vectorized(*a, **k):
                with pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
                    return fn(*a, **k)

            return vectorized

        guide = vectorize(self.guide)
        factors = options["inflation"]
        if factors is not None:  # outside the particle plate: it sees the distributions the plates broadcast
            same = all(f == factors[0] for f in factors)
            guide = ProposalInflation(factors[0] if same else factors, dim=particle_dim)(guide)
        if guide_trace is not None:
            guide = poutine.replay(guide, trace=guide_trace)
        try:
            guide_trace, model_trace = self._run(
                guide, vectorize(self.model), model_inputs, guide_inputs, subsample, options, particle_dim - 1
            )
            terms, info = self._log_densities(model_trace, guide_trace, -particle_dim, options)
        except ModelError:
            raise
        except (ValueError, RuntimeError, IndexError) as error:
            if error.args and isinstance(error.args[0], str):
                error.args = (f"{error.args[0]}\n({VECTORIZE_HINT})",) + error.args[1:]
            raise
        subsample = subsample if subsample is not None else _subsample_trace(guide_trace, model_trace)
        return self._particles(terms, info, num_particles, model_trace, guide_trace, subsample, options)

    def _draw_loop(self, num_particles, model_inputs, guide_inputs, subsample, options):
        ndim = 1 + self.max_plate_nesting
        runs = []
        factors = options["inflation"]
        for i in range(num_particles):
            guide = self.guide if factors is None else ProposalInflation(factors[i])(self.guide)
            guide_trace, model_trace = self._run(guide, self.model, model_inputs, guide_inputs, subsample, options, -ndim)
            if subsample is None:
                subsample = _subsample_trace(guide_trace, model_trace)
            runs.append((guide_trace, model_trace, *self._log_densities(model_trace, guide_trace, ndim, options)))
        stacked = [self._particles(terms, info, 1, mt, gt, subsample, options) for gt, mt, terms, info in runs]
        first = stacked[0]

        def cat(field):
            values = [getattr(p, field) for p in stacked]
            return None if values[0] is None else torch.cat(values, 0)

        first.log_p, first.log_q, first.log_model_proposed = cat("log_p"), cat("log_q"), cat("log_model_proposed")
        first.log_score, first.log_score_leaves = cat("log_score"), cat("log_score_leaves")
        first.latents = [z for p in stacked for z in p.latents]
        first.model_latents = [z for p in stacked for z in p.model_latents]
        first.layout = None
        return first

    # reducing --------------------------------------------------------------------------

    def _check_guide(self, guide_trace):
        for name, site in _density_sites(guide_trace):
            if wants_enumeration(site) and not is_auxiliary(site):
                warn_once(
                    self.warned,
                    ("guide-enumerate", name),
                    f"guide site '{name}' is marked for enumeration: guides are sampled here, not enumerated, "
                    "so it gets a score-function gradient; to sum it out exactly, leave it out of the guide and "
                    "mark the model's site",
                )

    def _find_data_plate(self, model_trace):
        if self.data_plate is None:
            sites = [s for _, s in _density_sites(model_trace) if s["is_observed"]] or [
                s for _, s in _density_sites(model_trace)
            ]
            stacks = [[f.name for f in s["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE] for s in sites]
            common = set(stacks[0]).intersection(*stacks[1:]) if stacks else set()
            outermost = [name for name in (stacks[0] if stacks else []) if name in common]
            self.data_plate = outermost[0] if outermost else False
        return self.data_plate or None

    def _log_densities(self, model_trace, guide_trace, ndim, options):
        """Every site's per-datum log density, as :class:`_SiteTerms`, and what the weights need."""
        data_plate = self._find_data_plate(model_trace)
        frame = _data_frame(model_trace, data_plate)
        terms = _SiteTerms(ndim, None if frame is None else ndim + frame.dim)
        outside = []  # latent sites outside the data plate
        enumerated = []
        model_proposed = []

        def in_plate(site):
            return data_plate is None or any(f.name == data_plate for f in site["cond_indep_stack"])

        for name, site in _density_sites(model_trace):
            latent = not site["is_observed"]
            if not latent:
                _check_observed(name, site)
            if latent and not in_plate(site):
                outside.append(name)
            log_prob = _log_prob(site["fn"], site["value"], site["args"], site["kwargs"])
            if self._enumerates and site["infer"].get("_dim_to_id"):
                enumerated.append((site, log_prob))  # depends on an enumerated site: contracted below
                continue
            scale = site["scale"] / _data_scale(frame) if in_plate(site) else site["scale"]
            log_prob = scale_and_mask(log_prob, scale, site["mask"])
            terms.add("log_p", name, log_prob, latent, in_plate(site))
            if latent and name not in guide_trace.nodes:
                model_proposed.append(name)
                terms.add("log_model_proposed", name, log_prob, latent, in_plate(site))
                if not site["fn"].has_rsample or options["detach_model_proposals"]:
                    leaf = name in self._model_leaves()
                    if options["rsample_for"] and not leaf:
                        raise ModelError(
                            f"model site '{name}' ({type(site['fn']).__name__}) is proposed from the model and is "
                            f"not reparameterisable; {options['rsample_for']} needs reparameterised proposals: "
                            "add it to the guide, or use IWAELoss or IWEM (score-function gradients)"
                        )
                    terms.add("log_score_leaves" if leaf else "log_score", name, log_prob, latent, in_plate(site))
        if enumerated:
            self._add_enumerated(terms, model_trace, enumerated, frame, outside)

        for name, site in _density_sites(guide_trace):
            if site["is_observed"]:
                continue
            if name not in model_trace.nodes and not is_auxiliary(site):
                raise ModelError(
                    f"guide site '{name}' does not appear in the model; a guide-only site must be marked "
                    "infer={'is_auxiliary': True}"
                )
            if not site["fn"].has_rsample and options["rsample_for"]:
                raise ModelError(
                    f"guide site '{name}' ({type(site['fn']).__name__}) is not reparameterisable; "
                    f"{options['rsample_for']} needs reparameterised proposals: use IWAELoss or IWEM, "
                    "which give it a score-function gradient"
                )
            if not in_plate(site):
                outside.append(name)
            fn = detach(site["fn"]) if options["stop_proposal_params"] else site["fn"]
            scale = site["scale"] / _data_scale(frame) if in_plate(site) else site["scale"]
            log_q = scale_and_mask(_log_prob(fn, site["value"], site["args"], site["kwargs"]), scale, site["mask"])
            terms.add("log_q", name, log_q, True, in_plate(site))
            if not site["fn"].has_rsample:
                terms.add("log_score", name, log_q, True, in_plate(site))

        if not terms.terms or all(t[0] != "log_p" for t in terms.terms):
            raise ModelError("the model has no sample site: there is nothing to weight")
        shared = terms.shared_latents()
        if (outside or shared) and self._explicit_data_plate:
            raise ModelError(
                f"site '{(outside or shared)[0]}' is outside the data plate '{data_plate}': per-datum importance "
                "weights need every latent inside it (pass data_plate=None to treat the batch as one datum)"
            )
        for name in outside + shared:
            warn_once(
                self.warned,
                ("outside", name),
                f"latent site '{name}' is not inside the data plate '{data_plate}' (a global latent, a sizeless "
                "plate it does not fill, or a joint autoguide's one vector for the whole batch): the minibatch "
                "is weighted as one datum, with one importance weight per particle and an ESS out of K for the "
                "whole batch. For per-datum weights, sample it inside the data plate (AutoNormal or an amortised "
                "guide instead of a joint autoguide)",
            )
        info = dict(
            coupled=bool(outside or shared),
            frame=frame,
            model_proposed=tuple(model_proposed),
        )
        return terms, info

    def _add_enumerated(self, terms, model_trace, enumerated, frame, outside):
        scales = {float(site["scale"]) for site, _ in enumerated}
        if len(scales) > 1:
            names = ", ".join(f"'{site['name']}'" for site, _ in enumerated)
            raise ModelError(f"sites {names} depend on an enumerated site and need one common poutine.scale")
        target = [PARTICLE_PLATE]
        if frame is not None and not any(
            all(f.name != frame.name for f in site["cond_indep_stack"]) and not site["is_observed"]
            for site, _ in enumerated
        ):
            target.append(frame.name)
        elif frame is not None:
            outside.extend(site["name"] for site, _ in enumerated if not site["is_observed"])
        masked = [(site, scale_and_mask(log_prob, 1.0, site["mask"])) for site, log_prob in enumerated]
        log_p = contract_enumerated(model_trace, masked, target) * (scales.pop() / _data_scale(frame))
        terms.add("log_p", enumerated[0][0]["name"], log_p, False, frame is not None and frame.name in target)

    def _model_leaves(self):
        if self._leaves is None:
            self._leaves = _model_leaves(self.model, *self._model_inputs)
        return self._leaves

    def _particles(self, terms, info, num_particles, model_trace, guide_trace, subsample, options):
        frame = info["frame"]
        coupled = info["coupled"]
        batch = 1 if coupled or frame is None else max(t.shape[1] for *_, t, _ in terms.terms)
        totals = terms.totals((num_particles, batch), data_scale=_data_scale(frame) if coupled else None)
        zeros = totals["log_p"].new_zeros((num_particles, batch))
        latent_sites = [site for _, site in _density_sites(guide_trace) if isinstance(site["value"], torch.Tensor)]
        return Particles(
            log_p=totals["log_p"],
            log_q=totals.get("log_q", zeros),
            log_model_proposed=totals.get("log_model_proposed", zeros),
            scale=1.0 if coupled else _data_scale(frame),
            model_trace=model_trace,
            guide_trace=guide_trace,
            log_score=totals.get("log_score"),
            log_score_leaves=totals.get("log_score_leaves"),
            latents=[site["value"] for site in latent_sites],
            model_latents=[
                model_trace.nodes[site["name"]]["value"] if site["name"] in model_trace.nodes else None
                for site in latent_sites
            ],
            latent_event_dims=[site["fn"].event_dim for site in latent_sites],
            layout=None if coupled else (terms.ndim, terms.data_position),
            model_params=param_values(model_trace),
            guide_params=param_values(guide_trace),
            subsample=subsample,
            model_proposed=info["model_proposed"],
            guide_has_graph=options["grad_proposal"],
            splitter=self.split_params,
            structure=_structure(model_trace, guide_trace),
        )


def _cut_latents(guide_trace):
    r"""A copy of ``guide_trace`` for the model to replay, whose latents with a graph are
    detached leaves that require a gradient: the graph of :math:`\log p` ends at them."""
    cut = guide_trace.copy()
    for name, site in _density_sites(guide_trace):
        value = site["value"]
        if isinstance(value, torch.Tensor) and value.requires_grad:
            cut.nodes[name] = {**site, "value": value.detach().requires_grad_()}
    return cut


def _inflation_factors(inflation, num_particles):
    """``inflation`` as a list of one variance factor per particle; ``None`` if every factor is 1."""
    if inflation is None:
        return None
    if isinstance(inflation, torch.Tensor):
        inflation = inflation.tolist()
    if isinstance(inflation, numbers.Real) and not isinstance(inflation, bool):
        factors = [float(inflation)] * num_particles
    else:
        factors = [float(f) for f in inflation]
    if len(factors) != num_particles:
        raise ValueError(f"inflation has {len(factors)} factors for {num_particles} particles; give one per particle")
    return None if all(f == 1 for f in factors) else factors


def _structure(model_trace, guide_trace):
    """The sample sites of model and guide, and which are observed: what a θ/φ split depends on."""
    return frozenset(
        (which, name, site["is_observed"])
        for which, trace in (("model", model_trace), ("guide", guide_trace))
        for name, site in _density_sites(trace)
    )


def _data_scale(frame):
    if frame is None or frame.full_size is None or frame.size is None or frame.size < 1 or frame.full_size < 1:
        return 1.0
    return frame.full_size / frame.size


def _data_frame(trace, data_plate):
    if data_plate is None:
        return None
    for _, site in _density_sites(trace):
        for frame in site["cond_indep_stack"]:
            if frame.name == data_plate:
                return frame
    raise ModelError(f"data_plate '{data_plate}' is not a plate of the model")


def _check_replayed_shape(name, site):
    """A latent replayed from the guide must have the shape the model's distribution gives it."""
    value, fn = site["value"], site["fn"]
    expected = tuple(fn.batch_shape + fn.event_shape)
    expected = expected[max(0, len(expected) - value.dim()) :]  # enumerated dims left of the value's
    event = tuple(fn.event_shape)
    try:
        broadcast = tuple(torch.broadcast_shapes(value.shape, expected))
    except RuntimeError:
        broadcast = None
    if broadcast != tuple(value.shape) or tuple(value.shape[value.dim() - len(event) :]) != event:
        raise ModelError(
            f"site '{name}': the guide's value has shape {tuple(value.shape)}, but the model's distribution "
            f"has batch shape {tuple(fn.batch_shape)} and event shape {event}; make the guide sample "
            "the site with the model's shape"
        )


def _check_batch_dims_declared(name, site):
    """Every batch dim of size > 1 must belong to a plate: the particle plate goes left of them."""
    declared = {f.dim for f in site["cond_indep_stack"] if f.vectorized}
    shape = site["fn"].batch_shape
    undeclared = [d - len(shape) for d, size in enumerate(shape) if size > 1 and d - len(shape) not in declared]
    if undeclared:
        raise ModelError(
            f"site '{name}' has batch shape {tuple(shape)}, and its dim {undeclared[0]} belongs to no plate: "
            "declare every batch dim with a pyro.plate, or move it into the event with .to_event()"
        )


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
        raise ModelError(
            f"observed site '{name}' contains NaN or Inf values; fill missing entries with any finite "
            "value and mark them with obs_mask= or pyro_iwem.observe_masked"
        )


def _check_log_weights(log_w):
    if torch.isnan(log_w).any():
        raise ModelError("NaN importance log weight: a model or guide log density is NaN")
    dead = (log_w == -math.inf).all(0)
    if dead.any():
        index = dead.nonzero()[0].item()
        raise ModelError(
            f"all {log_w.shape[0]} importance log weights are -inf for datum {index}: the guide only "
            "proposes values where the model has zero density"
        )
