"""Importance weighted EM (IWEM), Algorithm 2 of Kim, Hwang & Kim (AISTATS 2020)."""

import pyro.optim
import torch

from .annealing import Annealing, NoAnnealing
from .collective import collective_step
from .grads import Snapshot, accumulate_grads, gradient_step
from .inflation import check_inflation
from .losses import check_num_particles
from .nested import nested_phi_gradients, param_union
from .objectives import (
    check_num_global_particles, effective_sample_size, log_mean_exp, nested_draws, nested_outer_bound, nested_terms,
    normalized_weights, outer_bound, snis_objective, weighted_outer_bound,
)
from .proposal import proposal_loss
from .util import warn_once


class _PaperAnnealing:
    """The default of ``IWEM(annealing=...)``: a fresh ``Annealing()`` per instance."""

    def __repr__(self):
        return "Annealing()"


_PAPER_ANNEALING = _PaperAnnealing()


class IWEM:
    r"""IWEM(model, guide, K=50, J=50, L=1, optim=None, annealing=Annealing(), proposal="optimal", max_plate_nesting=None, data_plate=None, guide_inputs=None, vectorize_particles=True, one_pass=False, proposal_inflation=1.0, p_step_inflation=None, log_p_offset=0.0, global_particles=1)

    Importance weighted EM: an E-step, an M-step on θ and a P-step on φ per :meth:`step`.

    For a minibatch :math:`x_1..x_B`, one :meth:`step` does

    1. **E-step**: draw :math:`z_{i1..iK}` (and L more for the annealing term) from the
       guide, detached, in one vectorised pass; weights
       :math:`\bar w_{ik} = \mathrm{softmax}_k(\log p(x_i, z_{ik}; \theta_t) - \log q(z_{ik} \mid x_i))`,
       detached, normalised per datum;
    2. **M-step**: one optimiser step on θ (the model's parameters) along
       :math:`-\sum_i \hat Q_\alpha(\theta; x_i)`, eq. (8) (:func:`~pyro_iwem.infer.objectives.snis_objective`);
    3. **P-step**: J fresh reparameterised draws at :math:`\theta_{t+1}`, one optimiser step
       on φ (the parameters the guide's distributions depend on, less θ) along :class:`OptimalProposalLoss`, eq. (7).

    With global latents :math:`\beta` (latents outside the data plate), a step draws
    :math:`\beta \sim q(\beta)` once per draw: the E-step's weights are per datum given the
    detached :math:`\beta`; the M-step steps θ along
    :math:`\log p(\beta; \theta) + \frac NB \sum_i \sum_k \bar w_{ik} \log p(x_i, z_{ik} \mid \beta; \theta)`
    (annealing mixes the per-datum part with its ELBO); the P-step fits the local guide by eq. (7)
    per datum at the drawn :math:`\beta` and the parameters of :math:`q(\beta)` along the gradient
    of L_K (pathwise where :math:`\beta` is reparameterised, REINFORCE otherwise;
    :func:`~pyro_iwem.infer.objectives.outer_bound`). :attr:`bound` is then L_K per datum.

    With ``global_particles`` = M > 1 a step draws M values :math:`\beta_m` (each with its K
    per-datum particles, one draw after the other), and the objective is the nested bound
    :math:`\log \frac1M \sum_m \hat W_m`,
    :math:`\log \hat W_m = \log p(\beta_m) - \log q(\beta_m) + \sum_i \log \hat p_K(x_i \mid \beta_m)`,
    with the global weights :math:`\bar W_m = \mathrm{softmax}_m \log \hat W_m`, detached. The
    M-step steps θ along
    :math:`\sum_m \bar W_m \big[\log p(\beta_m; \theta) + \sum_i \hat Q_\alpha(\theta; x_i \mid \beta_m)\big]`,
    at α = 1 the nested bound's θ-gradient with the draws held fixed; the P-step (on M fresh
    draws of J particles) fits the local guide by its loss (eq. 7, or eq. 4 for IWEM-woo) per
    datum at each :math:`\beta_m`, the draws weighted by their :math:`\bar W_m`, and
    :math:`q(\beta)` by the nested bound's pathwise gradient (with IWAE inside).

    :param model: a Pyro model :math:`p(x, z; \theta)`; any plates, several latent sites,
        subsampling, missing data through ``obs_mask=`` or :func:`~pyro_iwem.observe_masked`.
    :param guide: a Pyro guide :math:`q(z \mid x; \phi)`: reparameterised sites get pathwise
        gradients in the P-step, others (discrete latents) VIMCO's score-function gradient;
        Pyro's autoguides work. Model latents the guide leaves out are proposed from the model
        (the E-/M-step is then their EM update) or, if marked for parallel enumeration, summed out.
    :param int K: E-step importance samples (default 50).
    :param int J: P-step samples (default 50).
    :param int L: ELBO samples of the annealed E-step (default 1; ``annealing=None`` has no
        ELBO term and refuses any other value).
    :param pyro.optim.PyroOptim optim: stepped on θ and φ separately (default Adam, lr 5e-4).
    :param Annealing annealing: the controller α (default ``Annealing()``: +0.01 every 500
        steps, the paper's per-epoch schedule at 50 000 data and batch 100); ``None`` means
        α ≡ 1 (IWEM-woa). **A run much shorter than 50 000 steps stays near α = 0, where IWEM
        fits the ELBO**: fit the schedule to the run, ``annealing=Annealing.over(num_steps)``.
    :param str proposal: "optimal" (eq. 7) or "iwae" (IWEM-woo, eq. 4).
    :param int max_plate_nesting: optional; guessed from one run otherwise.
    :param str data_plate: name of the plate over data points; detected when ``None``.
    :param bool vectorize_particles: draw particles in one vectorised pass (default), or one
        at a time for models written for a single particle; every particle and both steps of
        one :meth:`step` see the same subsample of a subsampled data plate.
    :param guide_inputs: for data with missing entries, what the guide sees:
        :class:`~pyro_iwem.infer.missing.ImputedInputs` gives miss-IWEM (Algorithm 3), whose
        weights are :math:`p(x_o, z) / q(z \mid \breve x)` and whose E- and P-steps use
        :math:`\log p(x_o, x_m, z)` with :math:`x_m` drawn from the model (eqs. 9, 10).
    :param bool one_pass: ``True`` builds :class:`OnePassIWEM`, the E-, M- and P-step on one
        draw of K particles at :math:`\theta_t` (default ``False``).
    :param float proposal_inflation: the variance factor :math:`c` of the proposal the E-step
        draws its K importance samples from (default 1: the guide itself). With :math:`c \ne 1`
        they come from :math:`q_c`, the guide with its covariance multiplied by :math:`c`
        (:class:`~pyro_iwem.infer.ProposalInflation`), as in the official code
        (:math:`c = 1.5`), and the annealed objective (8) becomes

        .. math::
            \hat Q_\alpha(\theta) = \alpha \sum_{k=1}^K \bar w_k \log p(x, z_k; \theta)
                + (1 - \alpha) \frac1L \sum_{l=1}^L \log p(x, z_l; \theta),

        .. math::
            z_k \sim q_c,\quad \bar w_k \propto \frac{p(x, z_k; \theta_t)}{q_c(z_k \mid x)},
            \quad z_l \sim q :

        the L ELBO samples are drawn from the un-inflated guide, in the same vectorised pass
        (one variance factor per particle).
    :param float p_step_inflation: the variance factor of the P-step's J samples, which then
        come from :math:`q_c` in eq. (7) (or (4)): the φ-gradient flows through the widened
        reparameterised draws and :math:`\log q_c`. Default: ``proposal_inflation`` (the
        official code inflates IWEM's P-step and leaves IWEM-woo's IWAE P-step un-inflated:
        ``p_step_inflation=1``).
    :param float log_p_offset: the constant :math:`c` of the optimal P-step's
        :math:`|\log p + c|` (default 0, eq. 7; see :class:`OptimalProposalLoss`); only with
        ``proposal="optimal"``.
    :param int global_particles: M, the draws of the global latents per step (default 1: L_K,
        one draw). M > 1 gives the nested bound above, tighter over β: full batch only (a
        subsampled data plate is refused before any parameter moves), reparameterised globals
        only (a global without ``rsample`` whose guide has parameters is refused, naming it).
        On a model without global latents one draw is taken whatever M (every draw would give
        the same bound): the step is then M = 1's.

    θ are the parameters :math:`\log p` depends on with the latents fixed, φ those the guide's
    distributions depend on, less θ; both are found from the graph
    (``pyro_iwem.infer.params``), with a warning if either is empty.

    After each step, :attr:`ess` is the E-step's effective sample size (mean over the
    batch), :attr:`bound` the IWAE bound of the E-step's K particles at :math:`\theta_t`
    (mean per datum; :math:`-\hat Q_\alpha`, the loss, is not a bound and cannot be set
    beside other methods' losses, this can), :attr:`p_loss` the P-step loss and
    :attr:`global_ess` the ESS of the M draws of β. A step
    whose checks refuse it (bad data, shapes, a NaN loss) raises before any parameter moves.
    """

    #: whether E-, M- and P-step share one draw (:class:`OnePassIWEM`)
    one_pass = False

    def __new__(cls, *args, one_pass=False, **kwargs):
        from .variants import OnePassIWEM  # IWEM's subclass, in a module of its own

        return super().__new__(OnePassIWEM if one_pass and not issubclass(cls, OnePassIWEM) else cls)

    def __init__(
        self,
        model,
        guide,
        K=50,
        J=50,
        L=1,
        optim=None,
        annealing=_PAPER_ANNEALING,
        proposal="optimal",
        max_plate_nesting=None,
        data_plate=None,
        guide_inputs=None,
        vectorize_particles=True,
        one_pass=False,
        proposal_inflation=1.0,
        p_step_inflation=None,
        log_p_offset=0.0,
        global_particles=1,
    ):
        self.model = model
        self.guide = guide
        self.K = check_num_particles("K", K)
        self.L = check_num_particles("L", L)
        self.global_particles = check_num_global_particles(global_particles)
        self.proposal_inflation = check_inflation("proposal_inflation", proposal_inflation)
        self.p_step_inflation = check_inflation(
            "p_step_inflation", proposal_inflation if p_step_inflation is None else p_step_inflation
        )
        if self.L != 1 and annealing is None:
            raise ValueError(
                f"L is the number of particles IWEM draws for the ELBO term of its annealed E-step, got L={L}; "
                "with annealing=None (α ≡ 1) there is no such term"
            )
        self.proposal_loss = proposal_loss(
            proposal, check_num_particles("J", J), max_plate_nesting, data_plate, guide_inputs, vectorize_particles,
            log_p_offset,
        )
        self.sampler = self.proposal_loss.sampler(model, guide)
        if optim is None:
            optim = pyro.optim.Adam({"lr": 5e-4})
        if not isinstance(optim, pyro.optim.PyroOptim):
            raise TypeError(f"optim must be a pyro.optim.PyroOptim (e.g. pyro.optim.Adam), got {type(optim).__name__}")
        self.optim = optim
        if annealing is _PAPER_ANNEALING:
            annealing = Annealing()
        self.annealing = NoAnnealing() if annealing is None else annealing
        #: steps taken so far.
        self.num_steps = 0
        #: the last E-step's effective sample size, out of K (mean over the batch; with M draws of
        #: β, the draws' means weighted by :math:`\bar W_m`).
        self.ess = float("nan")
        #: the IWAE bound of the last E-step's K particles at θ_t (mean per datum): the number
        #: to compare with other methods, unlike the loss (with ``proposal_inflation``, the
        #: bound of the widened proposal the particles were drawn from); with M > 1 draws of
        #: β, the nested bound divided by N.
        self.bound = float("nan")
        #: the ESS of the last E-step's M draws of β, out of M (nan with one draw).
        self.global_ess = float("nan")
        #: the last P-step's loss.
        self.p_loss = float("nan")

    @property
    def J(self):
        """P-step samples."""
        return self.proposal_loss.num_particles

    @property
    def alpha(self):
        """The annealing controller's current α."""
        return self.annealing.alpha

    def _e_draw(self, alpha, args, kwargs, guide_args=None, global_particles=1):
        """``global_particles`` draws of β (one without globals) and of the E-step's particles given
        each, detached: K (widened) for the weights, L for the annealing's ELBO term while α < 1."""
        num_elbo = self.L if alpha < 1.0 else 0
        inflation = [self.proposal_inflation] * self.K + [1.0] * num_elbo  # K widened snIS samples, L ELBO samples
        return self.sampler.draws(
            global_particles, self.K + num_elbo, args, kwargs, grad_guide=False, guide_args=guide_args,
            inflation=inflation,
        )

    def _e_step(self, alpha, args, kwargs, guide_args=None):
        """``(particles, loss)`` of one draw of β (:meth:`_e_draw`, :meth:`_e_loss`)."""
        particles = self._e_draw(alpha, args, kwargs, guide_args)[0]
        return particles, self._e_loss(particles, alpha)

    def _e_loss(self, particles, alpha):
        r""":math:`-\sum_i s \, \hat Q_\alpha(\theta; x_i)`, eq. (8), on the first K particles' weights;
        with global latents :math:`\beta` (drawn from their guide, detached) the M-step objective
        :math:`-\big[\log p(\beta; \theta) + \frac NB \sum_i \hat Q_\alpha(\theta; x_i \mid \beta)\big]`,
        the weights normalised per datum given :math:`\beta` (``log q(β)`` enters as a constant)."""
        return -outer_bound(particles, snis_objective(particles, self.K, alpha))

    def _nested_e_step(self, alpha, args, kwargs, guide_args=None):
        r"""``(draws, log_weights, loss)``: :attr:`global_particles` = M draws of β (:meth:`_e_draw`;
        one at M = 1 or without globals), their :math:`\log \hat W_m` (:meth:`_log_global_weights`;
        ``None`` for one draw), and the M-step loss :math:`\sum_m \bar W_m\, \mathcal L_m`,
        :math:`\bar W_m = \mathrm{softmax}_m \log \hat W_m` and :math:`\mathcal L_m` = :meth:`_e_loss` of
        draw m (one draw: its :meth:`_e_loss`): at α = 1 θ's gradient is minus the nested bound's,
        the draws held fixed."""
        draws = nested_draws(lambda m: self._e_draw(alpha, args, kwargs, guide_args, m), self.global_particles)
        if len(draws) == 1:
            return draws, None, self._e_loss(draws[0], alpha)
        log_weights = self._log_global_weights(draws)
        weights = normalized_weights(log_weights)
        return draws, log_weights, -weighted_outer_bound(draws, weights, lambda p: snis_objective(p, self.K, alpha))

    def _log_global_weights(self, draws):
        r""":math:`\log \hat W_m = \log p(\beta_m) - \log q(\beta_m) + \sum_i \log \frac1K \sum_k w_{ik}^m`
        of the E-step's M draws (their first K particles), detached, ``(M,)``."""
        return nested_terms(draws, lambda p: log_mean_exp(p.log_w[: self.K].detach())).detach()

    def step(self, *args, **kwargs):
        r"""One E-, M- and P-step on a minibatch; returns the E-step loss :math:`-\hat Q_\alpha`.

        All or nothing: if the P-step refuses (a non-finite loss or gradient at
        :math:`\theta_{t+1}`), θ and its optimiser state are put back as they were; with a
        :class:`~pyro_iwem.distributed.DistributedOptim`, a step refused on one process is
        refused on all (:func:`~pyro_iwem.infer.collective_step`)."""
        with collective_step(self.model, self.guide, self.optim):
            guide_args = self.sampler.inputs_for_guide(args, kwargs)  # one completion x̆ per step (miss-IWEM)
            loss = self._step(args, kwargs, guide_args)
        self.annealing.step()
        self.num_steps += 1
        return loss

    def _step(self, args, kwargs, guide_args):
        loss, theta, subsample, before = self._m_step(args, kwargs, guide_args)
        try:
            self.p_loss = self._p_step(theta, args, kwargs, guide_args, subsample)
        except Exception:
            before.restore()
            raise
        return loss

    def _m_step(self, args, kwargs, guide_args):
        # a method of its own: the E-step's particles and graph are freed before the P-step
        draws, log_weights, loss = self._nested_e_step(self.alpha, args, kwargs, guide_args)
        theta = param_union(p.param_groups().theta for p in draws)
        self._warn_if_empty(theta=theta)
        before = Snapshot(theta, self.optim)
        gradient_step(loss, theta, self.optim)
        if log_weights is None:
            self._record_e_step(draws[0], self.K)
        else:
            self._record_nested_e_step(draws, log_weights)
        return loss.item(), theta, draws[0].subsample, before

    def _record_e_step(self, particles, num):
        r""":attr:`ess` and :attr:`bound` of the E-step's first ``num`` particles: the mean per-datum
        ESS (given β) and L_K per datum, :math:`\frac1N [\log p(\beta) - \log q(\beta)] + \frac1B \sum_i
        \log \frac1K \sum_k w_{ik}` (without globals the mean per-datum IWAE bound)."""
        log_w = particles.log_w[:num].detach()
        self.ess = effective_sample_size(log_w).mean().item()
        inner = log_mean_exp(log_w)
        if particles.global_sites:
            self.bound = (inner.mean() + particles.log_global_w.detach().sum() / particles.data_size).item()
        else:
            self.bound = inner.mean().item()

    def _record_nested_e_step(self, draws, log_weights):
        r""":attr:`bound`, :attr:`ess` and :attr:`global_ess` of M draws of β: the nested bound per
        datum, :math:`\frac1N \log \frac1M \sum_m \hat W_m`; the per-datum ESS given each
        :math:`\beta_m` (mean over data), weighted by :math:`\bar W_m`; Kish's ESS of the
        :math:`\hat W_m` (``log_weights``, :meth:`_log_global_weights`)."""
        self.bound = (nested_outer_bound(log_weights) / draws[0].data_size).item()
        per_draw = torch.stack([effective_sample_size(p.log_w[: self.K].detach()).mean() for p in draws])
        self.ess = (normalized_weights(log_weights) * per_draw).sum().item()
        self.global_ess = effective_sample_size(log_weights).item()

    def _warn_if_empty(self, theta=None, phi=None):
        """Warns once if a group given (not ``None``) is empty."""
        if theta is not None and not theta:
            warn_once(
                self.sampler.warned,
                "no-theta",
                "the model's log density depends on no parameter that requires a gradient: the M-step updates "
                "nothing (register the model's parameters with pyro.param or pyro.module)",
            )
        if phi is not None and not phi:
            warn_once(
                self.sampler.warned,
                "no-phi",
                "the guide's distributions depend on no parameter of their own (the guide has no parameters, or "
                "all of them are also parameters of the model's density): the P-step trains nothing",
            )

    def _p_step(self, theta, args, kwargs, guide_args, subsample):
        draws = nested_draws(
            lambda m: self.sampler.draws(
                m, self.J, args, kwargs, grad_guide=True, guide_args=guide_args, subsample=subsample,
                inflation=self.p_step_inflation,
            ),
            self.global_particles,
            "IWEM",
        )
        stepped = set(theta)
        phi = tuple(p for p in param_union(d.param_groups().phi for d in draws) if p not in stepped)  # in trace order
        self._warn_if_empty(phi=phi)
        if not phi:
            return float("nan")
        if len(draws) == 1:
            grads, loss = self.proposal_loss.phi_gradients(draws[0], phi)  # q(β): along L_K (class doc)
        else:
            grads, loss = nested_phi_gradients(self.proposal_loss, draws, phi)
        params = accumulate_grads(grads)
        self.optim(params)
        for p in params:
            p.grad = None
        return loss.item()

    def evaluate_loss(self, *args, **kwargs):
        r"""The E-step loss :math:`-\hat Q_\alpha` at the current parameters, without updating them
        (with M draws of β, the M-step loss :math:`-\sum_m \bar W_m [\dots]` that :meth:`step` returns)."""
        with torch.no_grad():
            return self._nested_e_step(self.alpha, args, kwargs)[2].item()

    def end_epoch(self):
        """Tell the annealing controller an epoch has ended (for ``Annealing(unit="epoch")``)."""
        self.annealing.end_epoch()

    def state_dict(self):
        """Step count, annealing and optimiser state (the parameters live in Pyro's param store)."""
        return {"num_steps": self.num_steps, "annealing": self.annealing.state_dict(), "optim": self.optim.get_state()}

    def load_state_dict(self, state):
        self.num_steps = int(state["num_steps"])
        self.annealing.load_state_dict(state["annealing"])
        self.optim.set_state(state["optim"])
