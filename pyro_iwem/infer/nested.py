r"""The P-step on M draws of the globals :math:`\beta` (``IWEM(global_particles=M)``): the
local guide fitted per datum at each :math:`\beta_m`, weighted by the draws' :math:`\bar W_m`, and
:math:`q(\beta)` along the nested bound. The bound itself and the draws are
:mod:`pyro_iwem.infer.objectives`' (``nested_draws``, ``nested_terms``, ``nested_outer_bound``)."""

from .grads import gradients
from .objectives import nested_outer_bound, nested_terms, normalized_weights
from .params import global_guide_params


def nested_phi_gradients(loss, draws, phi):
    r"""``({param: gradient}, loss)``: the P-step on M draws of β (each with its J particles),
    with the P-step loss ``loss`` (:class:`~pyro_iwem.infer.ParticleLoss`) inside.

    With :math:`L_m` the draw's L_J with the bound that trains :math:`q(\beta)` inside (the
    loss's ``global_guide_objective``, IWAE for eq. 7; else its own φ objective) and
    :math:`\bar W_m = \mathrm{softmax}_m L_m` detached, the local guide's parameters step along
    :math:`-\sum_m \bar W_m P_m`, :math:`P_m` the draw's batch P-step objective (eq. 7 per datum
    at :math:`\beta_m`: :func:`~pyro_iwem.infer.objectives.outer_bound` of the φ objective), and
    the parameters of :math:`q(\beta)` along the nested bound
    :math:`-\log \frac1M \sum_m e^{L_m}` (pathwise). The loss returned is
    :math:`-\sum_m \bar W_m P_m`. For a loss whose φ objective is its bound (IWAE) both are the
    nested bound's gradient."""

    def own(particles):
        return loss.objectives(particles)[1]

    bounds = nested_terms(draws, loss.global_guide_objective or own)
    weights = normalized_weights(bounds.detach())
    p_loss = -(weights * (bounds if loss.global_guide_objective is None else nested_terms(draws, own))).sum()
    global_phi = {id(t) for d in draws for t in global_guide_params(d, phi)}
    grads = gradients(p_loss, tuple(p for p in phi if id(p) not in global_phi), retain_graph=bool(global_phi))
    grads.update(gradients(-nested_outer_bound(bounds), tuple(p for p in phi if id(p) in global_phi)))
    return grads, p_loss


def param_union(groups):
    """The tensors of ``groups`` (tuples of parameters), each once, in first-seen order."""
    found = {}
    for group in groups:
        for t in group:
            found.setdefault(id(t), t)
    return tuple(found.values())
