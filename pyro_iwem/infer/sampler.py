r"""The particle sampler every algorithm of the package is built on.

One call draws ``N`` particles from the guide, replays the model on them and reduces every
site's log density to a ``(N, B)`` tensor: one row per particle, one column per datum of the
data plate, every other plate and event dimension summed (:mod:`~pyro_iwem.infer.plates`).
By default the particles are drawn in one vectorised pass (an outer particle plate, as
Pyro's ``vectorize_particles=True``); models written for one particle at a time are run
``N`` times and stacked instead (``vectorize_particles=False``), every run on the same
subsample. Each site's role (:mod:`~pyro_iwem.infer.sites`) decides what its log density
feeds; estimators that need more of the graph pass transforms
(:mod:`~pyro_iwem.infer.transforms`); the objectives (``pyro_iwem.infer.objectives``)
are a few lines on the result, :class:`~pyro_iwem.infer.particles.Particles`.
"""

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import is_validation_enabled

from .checks import (
    ShapeMismatch, check_guide_plates, check_log_weights, check_observed, check_param_names, refuse_or_warn_coupled,
    vectorized_draw_error, warn_all_global, warn_guide_enumeration, warn_outer_plate,
)
from .enumeration import EnumerationAnnotations, EnumerationPolicy
from .inflation import ProposalInflation, per_particle
from .params import ParamSplitter
from .particles import Particles
from .plates import (
    GlobalLatents, PerDatum, data_frame, data_scale, find_data_plate, global_sites, in_plate,
    subsample_trace, vectorize,
)
from .programs import ProposeFromModel, max_plate_nesting_of, probe, run_guide
from .sites import (
    TOTALS, SCORE_TOTALS, SiteRole, classify, density_sites, is_pathwise, model_leaves, param_values, site_log_prob,
    structure,
)
from .transforms import DrawSettings, with_replay
from .util import ModelError


class ParticleSampler:
    r"""Draws particles from a guide, replays a model on them, reduces log densities per datum.

    :param model: a Pyro model, :math:`p(x, z; \theta)`.
    :param guide: a Pyro guide, :math:`q(z \mid x; \phi)`.
    :param int max_plate_nesting: the deepest plate nesting of model and guide; guessed
        from one run when ``None``.
    :param str data_plate: the name of the plate over data points whose dimension is kept
        (weights are normalised per datum). ``None`` detects it: the outermost plate that
        encloses every observed site of the model. A model with no such plate is one datum.
        A latent outside the data plate is a global :math:`\beta`, drawn once per call
        outside the particle plate (:class:`~pyro_iwem.infer.plates.GlobalLatents`): the
        weights stay per datum given :math:`\beta`, and its log densities go to
        ``Particles.log_global_*``. Only what cannot be drawn once (a joint autoguide's one
        vector over per-datum latents, a latent in a sizeless plate the data do not fill, an
        enumerated site outside the data plate) makes the batch one datum, with a warning
        naming the site.
    :param guide_inputs: optional ``f(model, guide, args, kwargs) -> (args, kwargs)``, the
        guide's inputs, computed once per call outside the particle plate (the model
        still sees ``args``): :class:`~pyro_iwem.infer.missing.ImputedInputs` for
        miss-IWEM's proposal, :class:`~pyro_iwem.infer.missing.ZeroFilledInputs` for missIWAE's.
    :param bool validate_model: keep Pyro's distribution validation on every call; by
        default it runs on the first call only (when Pyro's validation is enabled).
    :param bool vectorize_particles: draw the particles in one pass under a particle plate
        (default); ``False`` runs guide and model once per particle and stacks the results,
        for models written for one particle at a time.

    Calling the sampler returns :class:`~pyro_iwem.infer.particles.Particles`. With
    ``grad_guide=False`` the whole proposal is detached, as the E-step needs: the guide runs
    under ``torch.no_grad()`` and the latents the model proposes itself are drawn without
    gradients; the model's log densities always keep the caller's grad mode.
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
        self.global_latents = None  # GlobalLatents, found on the first call
        self._outer_plate = None  # whether the programs ran under an outer plate of draws of β (None: not tried)

    def __call__(self, num_particles, args, kwargs, grad_guide=True, guide_args=None, subsample=None, inflation=None,
                 transforms=()):  # fmt: skip
        r"""Draws ``num_particles`` particles per datum; returns :class:`~pyro_iwem.infer.particles.Particles`.

        :param bool grad_guide: keep the guide's graph (reparameterised proposals).
        :param guide_args: the guide's ``(args, kwargs)`` from :meth:`inputs_for_guide`, to
            share one draw of them between calls (IWEM's E- and P-step use one completion).
        :param subsample: the ``subsample`` of earlier :class:`~pyro_iwem.infer.particles.Particles`,
            to draw on the same minibatch of a subsampled data plate.
        :param inflation: draw from the guide with its variance multiplied by this factor
            (:class:`~pyro_iwem.infer.ProposalInflation`; ``log_q`` is then the log
            density of the widened proposal): a number for every particle, or a sequence of
            ``num_particles`` factors, one per particle (IWEM's E-step widens its K importance
            samples and not its L ELBO samples in one pass). ``None`` or 1: no inflation.
        :param transforms: :class:`~pyro_iwem.infer.transforms.DrawTransform` objects, what an
            estimator changes about the draw (STL's and DReG's stopped proposal parameters,
            DReG's latent views, the one-pass step's cut latents and detached model proposals,
            a replayed guide trace).
        """
        return self._draws(num_particles, args, kwargs, 1, grad_guide, guide_args, subsample, inflation, transforms)[0]

    def draws(self, global_particles, num_particles, args, kwargs, replay=None, **options):
        r"""M = ``global_particles`` draws of the globals :math:`\beta_1..\beta_M`, each with
        ``num_particles`` particles given it: a list of M :class:`~pyro_iwem.infer.particles.Particles`
        (one without globals). Vectorised, one pass under an outer plate of M (``GLOBAL_PLATE``, left
        of the particle plate), split by :meth:`~pyro_iwem.infer.particles.Particles.split` (one graph);
        drawn one particle at a time, M calls, as for programs that fail under the plate
        (``nn.Linear`` with ``PyroSample`` weights), with a warning. ``replay``: ``[ReplayGlobals(p)
        for p in earlier]`` of the list an earlier call returned, to draw new particles given the
        same M draws of β (:class:`~pyro_iwem.infer.transforms.ReplayGlobals`). ``options``: as for a call."""
        if global_particles == 1 or not self.global_names(args, kwargs, options.get("guide_args")):
            return [self(num_particles, args, kwargs, **with_replay(options, replay, 0))]
        if not self.vectorize_particles or self._outer_plate is False:
            return [self(num_particles, args, kwargs, **with_replay(options, replay, m)) for m in range(global_particles)]
        try:
            draws = self._draws(num_particles, args, kwargs, global_particles, **with_replay(options, replay, 0))
        except (ValueError, RuntimeError, IndexError) as error:
            if self._outer_plate or (isinstance(error, ModelError) and not isinstance(error, ShapeMismatch)):
                raise  # the plate ran before, or a refusal not about shapes: the error is not the plate's
            self._outer_plate = False  # a real error is raised again by the first of the M calls
            warn_outer_plate(self.warned, global_particles, self.global_latents.names, error)
            return self.draws(global_particles, num_particles, args, kwargs, replay, **options)
        self._outer_plate = True
        return draws

    def _draws(self, num_particles, args, kwargs, global_particles, grad_guide=True, guide_args=None, subsample=None,
               inflation=None, transforms=()):  # fmt: skip
        guide_args, guide_kwargs = self.inputs_for_guide(args, kwargs) if guide_args is None else guide_args
        self._probe_once(args, kwargs, (guide_args, guide_kwargs))
        self._model_inputs = (args, kwargs)
        # Pyro's distribution checks run on the first call; afterwards they cost ~7% of a step
        # and the sampler's own checks (finite data, log weights) remain.
        validating = is_validation_enabled() and (self.validate_model or not self._validated)
        draw = DrawSettings(grad_guide and torch.is_grad_enabled(), per_particle(inflation, num_particles), transforms)
        inputs = ((args, kwargs), (guide_args, guide_kwargs))
        with pyro.validation_enabled(validating):
            if self.vectorize_particles:
                draws = self._draw_vectorized(num_particles, inputs, subsample, draw, global_particles)
            else:
                refused = [type(t).__name__ for t in transforms if t.vectorized_only]
                if refused:
                    raise NotImplementedError(f"{refused[0]} needs vectorize_particles=True")
                draws = [self._draw_loop(num_particles, inputs, subsample, draw)]
        traces = (("model", draws[0].model_trace), ("guide", draws[0].guide_trace))
        if not self._validated:
            check_guide_plates(draws[0].model_trace, draws[0].guide_trace)
            check_param_names(draws[0].model_params, draws[0].guide_params)
        self._validated = True
        for particles in draws:
            check_log_weights(particles.log_w, traces)
        return draws

    def _probe_once(self, args, kwargs, guide_args=None):
        """Probes the programs on the first call (the guide's inputs computed only then if not given)."""
        if self.max_plate_nesting is None or self.global_latents is None:
            guide_args, guide_kwargs = self.inputs_for_guide(args, kwargs) if guide_args is None else guide_args
            self._probe(args, kwargs, guide_args, guide_kwargs)

    def _probe(self, args, kwargs, guide_args, guide_kwargs):
        """Reads max_plate_nesting, the data plate and the globals off one unvectorised run."""
        guide_trace, model_trace = probe(self.model, self.guide, args, kwargs, guide_args, guide_kwargs)
        if self.max_plate_nesting is None:
            self.max_plate_nesting = max_plate_nesting_of(guide_trace, model_trace)
        data_plate = self._find_data_plate(model_trace)
        self.global_latents = found = GlobalLatents.from_traces(data_plate, model_trace, guide_trace)
        if found.names and not found.has_locals:
            warn_all_global(self.warned, data_plate, found.names)

    def global_names(self, args, kwargs, guide_args=None):
        """The model's global latents (drawn once per call), found from one run on the first call."""
        self._probe_once(args, kwargs, guide_args)
        return self.global_latents.names

    def inputs_for_guide(self, args, kwargs):
        """The guide's ``(args, kwargs)``: ``guide_inputs`` applied to the model's, or the same."""
        if self.guide_inputs is None:
            return args, kwargs
        return self.guide_inputs(self.model, self.guide, args, kwargs)

    # drawing -------------------------------------------------------------------------

    def _run(self, guide, model, inputs, subsample, draw, first_enum_dim):
        """One run of guide and replayed model: ``(guide_trace, model_trace)``; ``subsample``:
        a trace both replay (the minibatch, and in a loop of particles the first run's globals)."""
        (args, kwargs), (guide_args, guide_kwargs) = inputs
        if subsample is not None:
            guide = poutine.replay(guide, trace=subsample)
            model = poutine.replay(model, trace=subsample)
        with torch.set_grad_enabled(draw.grad_proposal):
            guide_trace = run_guide(guide, guide_args, guide_kwargs)
        for name, site in density_sites(guide_trace):
            warn_guide_enumeration(name, site, self.warned)
        for transform in draw.transforms:
            transform.guide_trace(guide_trace)
        annotations = EnumerationAnnotations()  # read inside the replay, which overwrites a site's infer
        inner = annotations(model) if self._enumerates is None else model
        if self._enumerates:  # inside the replay, so that enum sees (and tracks) every site first
            inner = poutine.enum(EnumerationPolicy(guide_trace, self.warned)(model), first_available_dim=first_enum_dim)
        replay_trace = guide_trace
        for transform in draw.transforms:
            replay_trace = transform.replay_trace(replay_trace)
        detach = draw.detach_model_proposals or not draw.grad_proposal
        replayed = ProposeFromModel(guide_trace, detach=detach)(poutine.replay(inner, trace=replay_trace))
        model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
        if self._enumerates is None:  # the first run learns whether the model asks for enumeration
            self._enumerates = annotations.found
            if annotations.found:
                return self._run(guide, model, inputs, subsample, draw, first_enum_dim)
        return guide_trace, model_trace

    def _draw_vectorized(self, num_particles, inputs, subsample, draw, global_particles):
        """A list of Particles: one, or ``global_particles`` = M > 1 draws of β in an outer plate."""
        particle_dim = -1 - self.max_plate_nesting
        outer = int(global_particles > 1)  # the outer plate's dim, left of the particle plate
        guide = vectorize(self.guide, num_particles, particle_dim, self.global_latents, global_particles)
        factors = draw.inflation
        if factors is not None:  # outside the particle plate: it sees the distributions the plates broadcast
            same = all(f == factors[0] for f in factors)
            guide = ProposalInflation(factors[0] if same else factors, dim=particle_dim)(guide)
        for transform in draw.transforms:
            guide = transform.guide(guide)
        model = vectorize(self.model, num_particles, particle_dim, self.global_latents, global_particles)
        try:
            guide_trace, model_trace = self._run(guide, model, inputs, subsample, draw, particle_dim - 1 - outer)
            terms, info = self._log_densities(model_trace, guide_trace, outer - particle_dim, draw, 1 + outer)
        except (ValueError, RuntimeError, IndexError) as error:
            explained = vectorized_draw_error(error)
            if explained is error:
                raise
            raise explained from None
        subsample = subsample if subsample is not None else subsample_trace(guide_trace, model_trace)
        particles = self._particles(terms, info, num_particles, model_trace, guide_trace, subsample, draw, global_particles)
        return particles.split() if outer else [particles]

    def _draw_loop(self, num_particles, inputs, subsample, draw):
        ndim = 1 + self.max_plate_nesting
        runs = []
        replayed = subsample  # the minibatch, then with the first run's globals: one draw of them per call
        for i in range(num_particles):
            guide = self.guide if draw.inflation is None else ProposalInflation(draw.inflation[i])(self.guide)
            for transform in draw.transforms:
                guide = transform.guide(guide)
            guide_trace, model_trace = self._run(guide, self.model, inputs, replayed, draw, -ndim)
            if subsample is None:
                subsample = subsample_trace(guide_trace, model_trace)
            if i == 0:
                replayed = subsample_trace(guide_trace, model_trace)
                for trace in (guide_trace, model_trace):  # the model's own draws of globals it proposes, too
                    for name, site in global_sites(trace, self.global_latents):
                        if name not in replayed.nodes:
                            replayed.add_node(name, **site)
            runs.append((guide_trace, model_trace, *self._log_densities(model_trace, guide_trace, ndim, draw)))
        return Particles.cat([self._particles(terms, info, 1, mt, gt, subsample, draw) for gt, mt, terms, info in runs])

    # reducing --------------------------------------------------------------------------

    def _find_data_plate(self, model_trace):
        if self.data_plate is None:
            self.data_plate = find_data_plate(model_trace)
        return self.data_plate or None

    def _log_densities(self, model_trace, guide_trace, ndim, draw, lead=1):
        """Every site's per-datum log density, as :class:`~pyro_iwem.infer.plates.PerDatum`,
        summed where its role says (:data:`~pyro_iwem.infer.sites.TOTALS`), and what the weights need."""
        data_plate = self._find_data_plate(model_trace)
        frame = data_frame(model_trace, data_plate)
        terms = PerDatum(ndim, None if frame is None else ndim + frame.dim, lead)
        outside, enumerated, model_proposed = [], [], []  # latents outside the data plate, ...
        detached = draw.detach_model_proposals
        # STL/DReG with globals: the unstopped log q too, for q(β)'s L_K gradient (losses.ParticleLoss._groups)
        unstopped = any(self.global_latents.is_global(site) for _, site in density_sites(guide_trace))
        for program, trace in (("model", model_trace), ("guide", guide_trace)):
            for name, site in density_sites(trace):
                if program == "guide" and site["is_observed"]:
                    continue
                role = classify(
                    program, name, site, model_trace, guide_trace, self._enumerates, detached, self._model_leaves,
                    self.global_latents.is_global,
                )
                latent, inside = not site["is_observed"], in_plate(site, data_plate)
                pathwise = is_pathwise(role, site, detached)
                if role is SiteRole.OBSERVED or (role is SiteRole.ENUMERATED and not latent):
                    check_observed(name, site)
                if latent and not inside and not role.is_global:
                    outside.append(name)
                for transform in draw.transforms:
                    transform.check(program, name, site, role, pathwise)
                fn = site["fn"]
                if program == "guide":
                    for transform in draw.transforms:
                        fn = transform.log_q_distribution(fn)
                log_prob = site_log_prob(fn, site["value"], site["args"], site["kwargs"])
                if role is SiteRole.ENUMERATED:
                    enumerated.append((site, log_prob))  # contracted below
                    continue
                if role.model_proposed:
                    model_proposed.append(name)
                scale = site["scale"] / data_scale(frame) if inside else site["scale"]
                log_prob = scale_and_mask(log_prob, scale, site["mask"])
                add = terms.add_global if role.is_global else terms.add
                for total in TOTALS[role]:
                    add(total, name, log_prob, latent, inside)
                if program == "guide" and unstopped and fn is not site["fn"]:
                    own = scale_and_mask(site_log_prob(site["fn"], site["value"], site["args"], site["kwargs"]),
                                         scale, site["mask"])  # fmt: skip
                    for total in TOTALS[role]:
                        add(total + "_unstopped", name, own, latent, inside)
                if not pathwise and role in SCORE_TOTALS:
                    add(SCORE_TOTALS[role], name, log_prob, latent, inside)
        if enumerated:
            outside.extend(terms.add_enumerated(model_trace, enumerated, frame))
        if not terms.terms or not terms.has("log_p"):
            raise ModelError("the model has no sample site: there is nothing to weight")
        coupled = outside + terms.shared_latents()
        coupling = self.global_latents.coupling  # when a guide site couples, the model's latents outside follow it
        refuse_or_warn_coupled(
            [n for n in coupled if n in coupling] if coupling else coupled, data_plate, coupling,
            self._explicit_data_plate, self.warned,
        )
        return terms, dict(coupled=bool(coupled), frame=frame, model_proposed=tuple(model_proposed))

    def _model_leaves(self):
        if self._leaves is None:
            self._leaves = model_leaves(self.model, *self._model_inputs)
        return self._leaves

    def _particles(self, terms, info, num_particles, model_trace, guide_trace, subsample, draw, global_particles=1):
        """Particles of the draw; with ``global_particles`` = M > 1 its densities are ``(M, N, B)``
        and its global densities ``(M,)``, for :meth:`~pyro_iwem.infer.particles.Particles.split`."""
        frame = info["frame"]
        coupled = info["coupled"]
        batch = 1 if coupled or frame is None else terms.batch_size()
        shape = (num_particles, batch) if global_particles == 1 else (global_particles, num_particles, batch)
        totals = terms.totals(shape, data_scale=data_scale(frame) if coupled else None)
        zeros = totals["log_p"].new_zeros(shape)
        latent_sites = [site for _, site in density_sites(guide_trace) if isinstance(site["value"], torch.Tensor)]
        found = list(global_sites(guide_trace, self.global_latents))
        is_global = {name for name, _ in found}
        found = [(name, site) for name, site in found if isinstance(site["value"], torch.Tensor)]
        global_latents = [site["value"] for _, site in found]
        global_model_latents = [model_trace.nodes[n]["value"] if n in model_trace.nodes else None for n, _ in found]
        latent_sites = [site for site in latent_sites if site["name"] not in is_global]
        global_totals = terms.global_totals(zeros, global_particles) if terms.global_terms else {}
        return Particles(
            log_p=totals["log_p"],
            log_q=totals.get("log_q", zeros),
            log_model_proposed=totals.get("log_model_proposed", zeros),
            scale=1.0 if coupled else data_scale(frame),
            model_trace=model_trace,
            guide_trace=guide_trace,
            log_score=totals.get("log_score"),
            log_score_leaves=totals.get("log_score_leaves"),
            log_q_unstopped=totals.get("log_q_unstopped"),
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
            guide_has_graph=draw.grad_proposal,
            splitter=self.split_params,
            structure=structure(model_trace, guide_trace),
            global_sites=tuple(sorted(terms.global_names())),
            global_latents=global_latents,
            global_model_latents=global_model_latents,
            **global_totals,
        )
