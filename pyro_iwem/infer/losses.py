r"""Pyro losses on the vectorised particle machinery: VAE, IWAE, STL and DReG (and, in
:mod:`~pyro_iwem.infer.proposal`, the optimal P-step).

Every loss draws ``num_particles`` reparameterised particles per datum in one pass and
defines two per-datum objectives to maximise, one whose gradient is taken for θ (the
parameters the model touches) and one for φ (the parameters only the guide touches). The
base class turns them into gradients with ``torch.autograd.grad``, computing only the
gradients each group needs, so each estimator is a few lines:

=====================  ===========================================  ==============================================
loss                   θ objective                                  φ objective
=====================  ===========================================  ==============================================
:class:`VAELoss`       :math:`\frac1L \sum_l \log w_l` (eq. 3)       same
:class:`IWAELoss`      :math:`\log \frac1K \sum_k w_k` (eq. 4)       same
:class:`STLLoss`       eq. (4)                                      eq. (4) with :math:`q`'s parameters stopped
:class:`DReGLoss`      eq. (4)                                      :math:`\sum_k \lfloor \bar w_k^2 \rfloor \log \tilde w_k`
:class:`OptimalProposalLoss`  —                                     eq. (7)
=====================  ===========================================  ==============================================

with :math:`w_k = p(x, z_k) / q(z_k \mid x)`, :math:`\tilde w_k` the same weight with the
guide's distribution parameters detached (the path through :math:`z_k(\phi)` kept), and
:math:`\bar w_k` the normalised weights. All losses work with :class:`pyro.infer.SVI`.
"""

from dataclasses import replace

import torch
from pyro.infer import ELBO

from .collective import collective_step
from .grads import accumulate_grads, gradients
from .objectives import (
    check_num_global_particles, effective_sample_size, elbo_objective, iwae_objective, log_mean_exp, nested_draws,
    nested_outer_bound, nested_terms, normalized_weights, outer_bound,
)
from .params import global_guide_params
from .sampler import ParticleSampler
from .sites import is_missing_entries
from .transforms import LatentViews, StopProposalParams
from .util import ModelError, warn_once


#: the decay of the running mean of L_K that is the baseline of discrete globals' REINFORCE term
BASELINE_DECAY = 0.9


def check_num_particles(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (a number of particles), got {value!r}")
    return value


class ParticleLoss(ELBO):
    """Base class: a loss on one draw of particles, with θ and φ objectives.

    Subclasses define :meth:`objectives`. ``stop_proposal_params = True`` computes
    :math:`\\log q` with the guide's distribution parameters detached (STL, DReG), which needs
    every proposed site reparameterised; the other losses give non-reparameterised sites a
    score-function gradient (``pyro_iwem.infer.objectives.multi_sample``).

    θ and φ are found from the graph (``pyro_iwem.infer.params``): θ the parameters the
    model's density depends on with the latents fixed, φ those the guide's distributions
    depend on, less θ.

    :param int num_particles: particles per datum.
    :param int max_plate_nesting: optional; guessed from one run otherwise.
    :param str data_plate: the plate over data points; detected when ``None``.
    :param guide_inputs: what the guide sees in place of the model's arguments, for data
        with missing entries (see :class:`~pyro_iwem.infer.ZeroFilledInputs`, :class:`~pyro_iwem.infer.ImputedInputs`); ``None``: the same.
    :param bool vectorize_particles: draw the particles in one pass (default), or one at a
        time for models written for a single particle.
    """

    stop_proposal_params = False
    #: with global latents, the per-datum objective whose L_K gradient the global guide's
    #: parameters take when the φ objective is not itself a bound (OptimalProposalLoss: IWAE);
    #: ``None``: the φ objective's own.
    global_guide_objective = None
    #: give the latents views of their own in the graph (a hook on them rescales what reaches the guide)
    latent_views = False
    #: whether a model latent the guide leaves out changes what this loss means (it is then
    #: proposed from the model's prior); warned about once per site.
    warns_model_proposed = True

    def __init__(
        self, num_particles=50, max_plate_nesting=None, data_plate=None, guide_inputs=None, vectorize_particles=True
    ):
        super().__init__(
            num_particles=check_num_particles("num_particles", num_particles), vectorize_particles=vectorize_particles
        )
        self._plates = (max_plate_nesting, data_plate, guide_inputs)
        self._samplers = {}
        self._baseline = None  # running mean of L_K over earlier draws: the REINFORCE baseline of discrete globals
        self._baseline_draw = None

    def sampler(self, model, guide):
        """The :class:`ParticleSampler` of this loss for (model, guide), built once."""
        if (model, guide) not in self._samplers:
            max_plate_nesting, data_plate, guide_inputs = self._plates
            self._samplers[model, guide] = ParticleSampler(
                model, guide, max_plate_nesting, data_plate, guide_inputs, vectorize_particles=self.vectorize_particles
            )
        return self._samplers[model, guide]

    def transforms(self):
        """What this estimator changes about a draw (:mod:`~pyro_iwem.infer.transforms`)."""
        found = [StopProposalParams(type(self).__name__)] if self.stop_proposal_params else []
        return found + ([LatentViews()] if self.latent_views else [])

    def objectives(self, particles):
        """Per-datum ``(theta_objective, phi_objective)`` to maximise; either may be ``None``."""
        raise NotImplementedError

    def value(self, particles):
        """The per-datum objective whose negative the loss reports (θ's, else φ's)."""
        theta_objective, phi_objective = self.objectives(particles)
        return theta_objective if theta_objective is not None else phi_objective

    def scaled(self, particles, objective):
        r"""The batch loss of a per-datum objective, ``-sum_i scale * objective_i``; with global
        latents :math:`-L`, :math:`L = \log p(\beta) - \log q(\beta) + \frac NB \sum_i F_i`
        (:func:`~pyro_iwem.infer.objectives.outer_bound`). Non-reparameterised globals get the
        REINFORCE baseline :math:`b` of the draws before this one (a running mean of L_K, rate
        ``BASELINE_DECAY`` = 0.9), updated once per draw."""
        scored = particles.log_global_score is not None
        if scored and particles.global_baseline is None:
            particles.global_baseline = self._baseline
        loss = -outer_bound(particles, objective)
        if scored and self._baseline_draw is not particles:
            self._baseline_draw = particles
            value = -loss.detach().item()
            self._baseline = value if self._baseline is None else BASELINE_DECAY * self._baseline + (1 - BASELINE_DECAY) * value
        return loss

    def phi_loss(self, particles):
        """The batch loss whose φ-gradient this estimator takes (its φ objective, scaled)."""
        return self.scaled(particles, self.objectives(particles)[1])

    def phi_gradients(self, particles, phi):
        r"""``({param: gradient}, loss)``: the φ loss (:meth:`phi_loss`) and its gradient for
        ``phi``; with global latents and a ``global_guide_objective``, the parameters of
        :math:`q(\beta)` take instead the gradient of :math:`-L_K` with that objective inside
        (:func:`~pyro_iwem.infer.objectives.outer_bound`), the others keep the φ loss's, taken
        with :math:`\beta` held at its draw (it does not depend on them)."""
        loss = self.phi_loss(particles)
        if self.global_guide_objective is None or not particles.global_sites:
            return gradients(loss, phi), loss
        global_phi = global_guide_params(particles, phi)
        grads = gradients(loss, tuple(p for p in phi if p not in set(global_phi)), retain_graph=bool(global_phi))
        if global_phi:
            grads.update(gradients(self.scaled(particles, self.global_guide_objective(particles)), global_phi))
        return grads, loss

    def _particles(self, model, guide, args, kwargs, global_particles=1):
        """The loss's reparameterised particles, a list of ``global_particles`` draws of the globals
        (:meth:`~pyro_iwem.infer.sampler.ParticleSampler.draws`; one without globals or at M = 1)."""
        sampler = self.sampler(model, guide)
        draws = sampler.draws(global_particles, self.num_particles, args, kwargs, grad_guide=True,
                              transforms=self.transforms())  # fmt: skip
        if self.warns_model_proposed:
            for name in draws[0].model_proposed:
                if not is_missing_entries(name, draws[0].model_trace):
                    warn_once(
                        sampler.warned,
                        ("model-proposed", name),
                        f"model site '{name}' is a latent the guide does not sample: {type(self).__name__} proposes "
                        "it from the model's own prior, where it cancels from the weights, so the bound uses the "
                        "prior as its proposal for it (looser than a fitted one) and its parameters get a "
                        "score-function gradient if it is not reparameterised. Add it to the guide, or mark a "
                        "discrete site infer={'enumerate': 'parallel'} to sum it out exactly",
                    )
        return draws

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError(f"{type(self).__name__} draws its particles with a ParticleSampler")

    def loss(self, model, guide, *args, **kwargs):
        """The loss as a float, without gradients."""
        with torch.no_grad():
            particles = self.sampler(model, guide)(self.num_particles, args, kwargs, grad_guide=False)
            return self.scaled(particles, self.value(particles)).item()

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """The loss as a float; accumulates θ's and φ's estimator into the params' ``.grad``.
        Every check runs, and every gradient is computed, before any ``.grad`` is written; a
        step refused on one process is refused on all (:func:`~pyro_iwem.infer.collective_step`)."""
        with collective_step(model, guide) as step:
            [particles] = self._particles(model, guide, args, kwargs)
            step.ordered(self.grads_from_particles(particles))  # the trace order, for an optimiser handed a set
            return self.scaled(particles, self.value(particles)).item()

    def grads_from_particles(self, particles):
        """Accumulates this estimator's θ and φ gradients on ``particles`` into ``.grad``."""
        return accumulate_grads(self.gradients(particles))

    def gradients(self, particles):
        """This estimator's θ and φ gradients on ``particles``, as ``{param: gradient}``."""
        groups, grads = self._groups(particles)
        theta_objective, phi_objective = self.objectives(particles)
        if theta_objective is phi_objective:  # one surrogate: one backward pass for both groups
            grads.update(gradients(self.scaled(particles, theta_objective), groups.theta + groups.phi))  # shared ⊂ θ
            return grads
        if theta_objective is not None:  # both from one graph: keep it for the second
            grads.update(gradients(self.scaled(particles, theta_objective), groups.theta, retain_graph=True))
        if phi_objective is not None:
            grads.update(self.phi_gradients(particles, groups.phi)[0])
        return grads

    def _groups(self, particles):
        r"""``(groups, grads)``: the parameter groups this estimator's surrogates step, and the
        gradients already taken for the others. With stopped proposal parameters (STL, DReG) and
        global latents, the estimator is the inner part's: the parameters of :math:`q(\beta)` take
        the pathwise gradient of L_K with IWAE inside and :math:`\log q` unstopped (a local
        proposal :math:`q(z \mid x, \beta)` depends on :math:`\beta`, a path that stopping its
        parameters would cut), and leave φ."""
        groups = particles.param_groups()
        self._refuse_shared(groups)
        if not self.stop_proposal_params or particles.log_q_unstopped is None:
            return groups, {}
        global_phi = global_guide_params(particles, groups.phi)
        if not global_phi:
            return groups, {}
        unstopped = replace(
            particles, log_q=particles.log_q_unstopped, log_global_q=particles.log_global_q_unstopped
        )
        grads = gradients(-outer_bound(unstopped, iwae_objective(unstopped)), global_phi, retain_graph=True)
        kept = set(global_phi)
        return groups._replace(phi=tuple(p for p in groups.phi if p not in kept)), grads

    def _refuse_shared(self, groups):
        if self.stop_proposal_params and groups.shared:
            raise ModelError(
                f"{type(self).__name__} detaches the guide's distribution parameters, and this guide uses "
                "model parameters: their IWAE gradient would lose its score term. Use IWAELoss."
            )

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The loss as a differentiable tensor, for losses whose θ and φ objectives coincide
        (for :class:`OptimalProposalLoss`, the φ objective: step the guide only)."""
        [particles] = self._particles(model, guide, args, kwargs)
        theta_objective, phi_objective = self.objectives(particles)
        if theta_objective is not None and phi_objective is not None and theta_objective is not phi_objective:
            raise NotImplementedError(
                f"{type(self).__name__} uses different surrogates for θ and φ; use loss_and_grads (or SVI)"
            )
        return self.scaled(particles, phi_objective if theta_objective is None else theta_objective)


class VAELoss(ParticleLoss):
    r"""The ELBO of eq. (3) with L = ``num_particles`` samples:
    :math:`\hat L^{VAE} = \frac1L \sum_{l=1}^L \log \frac{p(x, z_l; \theta)}{q(z_l \mid x; \phi)}`,
    reparameterised gradients for θ and φ, and for non-reparameterised sites REINFORCE with
    the leave-one-out baseline of the other samples (none when L = 1)."""

    def __init__(
        self, num_particles=1, max_plate_nesting=None, data_plate=None, guide_inputs=None, vectorize_particles=True
    ):
        super().__init__(num_particles, max_plate_nesting, data_plate, guide_inputs, vectorize_particles)

    def objectives(self, particles):
        elbo = elbo_objective(particles)
        return elbo, elbo


class IWAELoss(ParticleLoss):
    r"""The IWAE bound of eq. (4),
    :math:`\hat L^{IWAE} = \log \frac1K \sum_{k=1}^K \frac{p(x, z_k; \theta)}{q(z_k \mid x; \phi)}`,
    with the reparameterised gradient for θ and φ (Burda et al. 2015) and VIMCO's
    leave-one-out score-function gradient for non-reparameterised sites (Mnih & Rezende 2016).
    Its value equals Pyro's ``RenyiELBO(alpha=0)`` on the same samples.

    :param int global_particles: M draws of the global latents per step (default 1: L_K). With
        M > 1 the loss is the nested bound
        :math:`-\log \frac1M \sum_m \frac{p(\beta_m)}{q(\beta_m)} \prod_i \hat p_K(x_i \mid \beta_m)`
        (:func:`~pyro_iwem.infer.nested_bound`), the M draws one outer plate, with its
        pathwise gradient; full batch only (a subsampled data plate is refused), reparameterised
        globals only. :attr:`global_ess` is then the ESS of the last step's M draws.

    The other parameters are :class:`ParticleLoss`'s.
    """

    def __init__(
        self, num_particles=50, max_plate_nesting=None, data_plate=None, guide_inputs=None, vectorize_particles=True,
        global_particles=1,
    ):
        super().__init__(num_particles, max_plate_nesting, data_plate, guide_inputs, vectorize_particles)
        self.global_particles = check_num_global_particles(global_particles)
        #: the ESS of the last step's draws of the globals, out of ``global_particles``
        self.global_ess = float("nan")

    def objectives(self, particles):
        bound = iwae_objective(particles)
        return bound, bound

    def _nested(self, model, guide, args, kwargs, grad):
        """``(draws, nested bound)`` of ``global_particles`` draws of the globals (:func:`~pyro_iwem.infer.objectives.nested_draws`)."""
        sampler = self.sampler(model, guide)
        if grad:
            draws = nested_draws(lambda m: self._particles(model, guide, args, kwargs, m), self.global_particles, "IWAELoss")
        else:
            draws = nested_draws(
                lambda m: sampler.draws(m, self.num_particles, args, kwargs, grad_guide=False), self.global_particles
            )
        values = nested_terms(draws, iwae_objective)
        self.global_ess = effective_sample_size(values.detach()).item()
        return draws, nested_outer_bound(values)

    def loss(self, model, guide, *args, **kwargs):
        if self.global_particles == 1:
            return super().loss(model, guide, *args, **kwargs)
        with torch.no_grad():
            return -self._nested(model, guide, args, kwargs, grad=False)[1].item()

    def loss_and_grads(self, model, guide, *args, **kwargs):
        if self.global_particles == 1:
            return super().loss_and_grads(model, guide, *args, **kwargs)
        with collective_step(model, guide) as step:
            draws, bound = self._nested(model, guide, args, kwargs, grad=True)
            params = []
            for p in draws:
                groups = p.param_groups()
                params += [t for t in groups.theta + groups.phi if all(t is not q for q in params)]
            step.ordered(accumulate_grads(gradients(-bound, params)))
            return -bound.item()


class STLLoss(IWAELoss):
    r"""IWAE with the "sticking the landing" φ-gradient (Roeder et al. 2017).

    The objective is eq. (4) evaluated with :math:`\log q(z_k(\phi); \lfloor\phi\rfloor)`:
    the guide's distribution parameters are detached, so the φ-gradient
    :math:`\sum_k \bar w_k \, \partial_z \log \tilde w_k \, \partial_\phi z_k` drops the score
    term :math:`\partial_\phi \log q`. The θ-gradient and the value are IWAE's. With K = 1 it
    is the STL estimator of the ELBO gradient. With global latents :math:`\beta` it is the
    estimator of the inner part, given :math:`\beta`; :math:`q(\beta)`'s parameters take the
    pathwise gradient of L_K, with its log q unstopped."""

    stop_proposal_params = True


class DReGLoss(ParticleLoss):
    r"""IWAE with the doubly reparameterised φ-gradient (IWAE-DReG, Tucker et al. 2018).

    θ: the IWAE gradient of eq. (4). φ: the surrogate
    :math:`\sum_k \lfloor \bar w_k^2 \rfloor \log \tilde w_k`, whose gradient is
    :math:`\sum_k \bar w_k^2 \, \partial_z \log \tilde w_k \, \partial_\phi z_k`, with
    :math:`\tilde w_k` computed with the guide's distribution parameters detached. Unbiased
    for the IWAE φ-gradient, with lower variance. The value reported is the IWAE bound. With
    global latents :math:`\beta`, as :class:`STLLoss`: the inner part's estimator, and
    :math:`q(\beta)` along the pathwise gradient of L_K."""

    stop_proposal_params = True
    latent_views = True

    def objectives(self, particles):
        log_w = particles.log_w
        squared = normalized_weights(log_w.detach()).pow(2)
        return log_mean_exp(log_w), (squared * log_w).sum(0)

    def gradients(self, particles):
        r"""One backward pass for both groups (vectorised draws): the IWAE surrogate, whose
        gradient reaching latent :math:`z_k` is :math:`\bar w_k \partial_z \log \tilde w_k`,
        with a hook on each latent's view that multiplies it by :math:`\bar w_k` once more;
        θ's gradient does not pass through the latents and stays IWAE's."""
        if particles.layout is None:  # particles drawn one at a time: two surrogates, two passes
            return super().gradients(particles)
        groups, grads = self._groups(particles)
        weights = particles.per_latent(normalized_weights(particles.log_w.detach()))
        hooks = [z.register_hook(lambda g, w=w: g * w) for z, w in zip(particles.latents, weights) if z.requires_grad]
        try:
            bound = log_mean_exp(particles.log_w)
            grads.update(gradients(self.scaled(particles, bound), groups.theta + groups.phi))
            return grads
        finally:
            for hook in hooks:
                hook.remove()
