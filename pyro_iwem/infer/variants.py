"""IWEM's variants: IWAE read as an EM algorithm (Algorithm 1), and the one-pass step whose
E-, M- and P-step share one draw of particles."""

from .grads import accumulate_grads, shared_draw_gradients
from .iwem import IWEM
from .losses import check_num_particles
from .transforms import CutLatents, DetachModelProposals
from .util import ModelError, warn_once


class IWAEasEM(IWEM):
    r"""IWAE read as an EM algorithm (Algorithm 1): the E/M-step on θ with the snIS objective
    of eq. (2) (α ≡ 1), then a separate P-step on φ with the IWAE loss of eq. (4).

    By Proposition 1 its θ-update equals IWAE's on the same samples; it differs from IWAE
    only in drawing fresh particles for the P-step at :math:`\theta_{t+1}`. It is
    ``IWEM(model, guide, annealing=None, proposal="iwae")``.
    """

    def __init__(
        self, model, guide, K=50, J=None, optim=None, max_plate_nesting=None, data_plate=None, vectorize_particles=True,
        global_particles=1,
    ):
        super().__init__(
            model,
            guide,
            K=K,
            J=K if J is None else J,
            optim=optim,
            annealing=None,
            proposal="iwae",
            max_plate_nesting=max_plate_nesting,
            data_plate=data_plate,
            vectorize_particles=vectorize_particles,
            global_particles=global_particles,
        )


class OnePassIWEM(IWEM):
    r"""IWEM with the E-, M- and P-step on one draw of K particles at :math:`\theta_t`
    (``IWEM(..., one_pass=True)`` builds one).

    One guide pass and one model pass at :math:`\theta_t`: θ's gradient of
    :math:`\hat Q_\alpha` (its ELBO term averaging the same K particles) and φ's gradient of
    eq. (7) are taken from the same graph. It differs from Algorithm 2 in one respect: **the
    P-step runs at** :math:`\theta_t` **on the E-step's particles**, not at
    :math:`\theta_{t+1}` on J fresh ones (``J`` is unused). Both gradients come from one
    backward pass through the model (:func:`~pyro_iwem.infer.grads.shared_draw_gradients`),
    so a step costs about what an IWAE step does. ``proposal_inflation`` widens all K
    particles, the ones the ELBO term averages included; ``p_step_inflation``, if given, must
    equal it, and ``L`` must be 1. The other arguments are :class:`IWEM`'s. On a model with global
    latents it takes :class:`IWEM`'s two-pass step (J particles in the P-step), with a warning,
    and with it ``global_particles`` = M > 1 (the nested bound); without globals M has no effect.
    """

    one_pass = True

    def __init__(self, model, guide, K=50, J=50, L=1, *args, p_step_inflation=None, one_pass=True, **kwargs):
        if check_num_particles("L", L) != 1:
            raise ValueError(
                f"L is the number of particles IWEM draws for the ELBO term of its annealed E-step, got L={L}; "
                "IWEM(one_pass=True) averages that term over its K particles"
            )
        super().__init__(model, guide, K, J, L, *args, p_step_inflation=p_step_inflation, **kwargs)
        if self.p_step_inflation != self.proposal_inflation:
            raise ValueError(
                f"IWEM(one_pass=True) draws one set of particles for both steps: p_step_inflation "
                f"({self.p_step_inflation}) must equal proposal_inflation ({self.proposal_inflation})"
            )

    def _step(self, args, kwargs, guide_args):
        found = self.sampler.global_names(args, kwargs, guide_args)
        if found:  # q(β) steps along L_K, which the one pass through the cut latents cannot give
            warn_once(
                self.sampler.warned,
                "one-pass-globals",
                f"IWEM(one_pass=True) takes the two-pass step (Algorithm 2) on a model with global latents "
                f"({', '.join(repr(n) for n in found)}): their guide steps along L_K, whose gradient reaches them "
                "through every datum's weights, which the one-pass step's cut latents do not carry",
            )
            return IWEM._step(self, args, kwargs, guide_args)
        particles = self.sampler(
            self.K, args, kwargs, grad_guide=True, guide_args=guide_args, inflation=self.proposal_inflation,
            transforms=(DetachModelProposals(), CutLatents()),
        )
        groups = particles.param_groups()
        if groups.shared:
            raise ModelError(
                "IWEM(one_pass=True) needs a guide whose distributions do not use the model's parameters: "
                "θ's gradient would flow through the proposal. Use the default two-pass step"
            )
        self._warn_if_empty(theta=groups.theta, phi=groups.phi)
        grads, e_loss, p_loss = shared_draw_gradients(
            particles,
            lambda p: self._e_loss(p, self.alpha),
            self.proposal_loss.phi_loss,
            groups.theta,
            groups.phi,
        )
        for params in (groups.theta, groups.phi):  # every check passed: now parameters move
            self.optim(accumulate_grads({p: grads[p] for p in params if p in grads}))
        for p in grads:
            p.grad = None
        self._record_e_step(particles, particles.num_particles)
        self.p_loss = p_loss.item()
        return e_loss.item()
