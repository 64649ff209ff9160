r"""Gradients taken with ``torch.autograd.grad`` for chosen parameters only, checked before
anything is written to ``.grad``: a refused step moves no parameter.

* :func:`gradients` -- ``{param: ∂loss/∂param}`` of one loss, refused if not finite;
* :func:`shared_draw_gradients` -- θ's gradient of one loss and φ's of another on one draw,
  with one backward pass through the model (IWEM's one-pass step);
* :func:`accumulate_grads`, :func:`gradient_step` -- writing them and stepping an optimiser;
* :class:`Snapshot` -- parameters and their optimiser state, to undo a step.
"""

import dataclasses

import torch

from .util import ModelError


def gradients(loss, params, retain_graph=False):
    """``{p: ∂loss/∂p}`` for ``params`` only (autograd skips every other gradient); refuses a
    non-finite loss or gradient before anything is written to ``.grad``."""
    return _check_grads(_grads([_checked(loss)], params, retain_graph=retain_graph))


def _checked(loss):
    """``loss``, refused if it is not finite."""
    if not torch.isfinite(loss.detach()).all():
        raise ModelError(f"the loss is {loss.item()}: no parameter was changed")
    return loss


def _check_grads(found):
    """``found`` (``{param: gradient}``), refused if any gradient is not finite."""
    if found and not _all_finite(list(found.values())):
        raise ModelError("a gradient is NaN or infinite: no parameter was changed")
    return found


def _grads(outputs, inputs, grad_outputs=None, retain_graph=False):
    """``{input: gradient}`` of ``outputs`` (with ``grad_outputs``) for the ``inputs`` that get one."""
    inputs = [t for t in inputs if t.requires_grad]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs or [None] * len(outputs)) if o.requires_grad]
    if not inputs or not pairs:
        return {}
    outputs, grad_outputs = zip(*pairs)
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph, allow_unused=True)
    return {t: g for t, g in zip(inputs, grads) if g is not None}


def _all_finite(tensors):
    """One fused norm over ``tensors`` (inf or NaN if any entry is)."""
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    norm = total_norm(tensors) if total_norm else torch.stack([t.norm() for t in tensors]).norm()
    return bool(torch.isfinite(norm))


def shared_draw_gradients(particles, theta_loss, phi_loss, theta, phi):
    r"""θ's gradient of ``theta_loss(particles)`` and φ's of ``phi_loss(particles)``, two
    losses on one draw of ``particles`` drawn with :class:`~pyro_iwem.infer.transforms.CutLatents` (the model's graph ends
    at leaf copies :math:`\zeta` of the guide's latents :math:`z(\phi)`), with one backward
    pass through the model where the losses allow it.

    Both losses see θ and the latents only through :math:`\log p_{ik}` (there are no
    model-proposed sites). With :math:`a_{ik} = \partial L_\theta / \partial \log p_{ik}`
    and :math:`b_{ik} = \partial L_\phi / \partial \log p_{ik}`, read off the losses
    (cheap: they are functions of a few ``(K, B)`` tensors), one backward pass of
    :math:`\sum_{ik} a_{ik} \log p_{ik}` gives θ's gradient and, at each leaf,
    :math:`a_{ik} \partial_\zeta \log p_{ik}`; times :math:`b_{ik} / a_{ik}` (per particle
    and datum: particles and data do not share latents) it is :math:`L_\phi`'s gradient at
    that latent, which is passed on to the guide with :math:`L_\phi`'s own path through
    :math:`\log q`:

    .. math::
        \nabla_\phi L_\phi = \sum_{ik} b_{ik}\, \partial_\zeta \log p_{ik}\,
            \frac{\partial z_{ik}}{\partial \phi} + \nabla_\phi L_\phi \big|_{\log p}.

    The model's backward pass then costs what IWAE's does. Two passes (one per loss) when
    the ratio is not defined: model-proposed sites (a second path from the latents to the
    losses), latents shared by particles or data (``Particles.layout`` is ``None``, or global
    latents, one value for every particle and datum), or an
    :math:`a_{ik}` that underflowed to 0 where :math:`b_{ik}` did not. Returns
    ``({param: gradient}, theta loss, phi loss)``; a non-finite loss or gradient is refused
    before anything is written to ``.grad``.
    """
    theta = [p for p in theta if p.requires_grad]
    latents = zip(particles.latents + particles.global_latents, particles.model_latents + particles.global_model_latents)
    cut = [(i, z, leaf) for i, (z, leaf) in enumerate(latents) if leaf is not None and leaf is not z]
    leaves = [leaf for _, _, leaf in cut]
    one_pass = (
        particles.log_p.requires_grad and not particles.model_proposed and particles.layout is not None
        and not particles.global_sites
    )
    if one_pass:  # the losses on a detached log p: a and b cost a few (K, B) operations
        detached = dataclasses.replace(particles, log_p=particles.log_p.detach().requires_grad_())
        theta_value, phi_value = _checked(theta_loss(detached)), _checked(phi_loss(detached))
        a = _grads([theta_value], [detached.log_p]).get(detached.log_p, torch.zeros_like(detached.log_p))
        b = _grads([phi_value], [detached.log_p], retain_graph=True).get(detached.log_p, torch.zeros_like(a))
        one_pass = not ((a == 0) & (b != 0)).any()
    if one_pass:
        found = _grads([particles.log_p], theta + leaves, [a])
        ratios = particles.per_latent(torch.where(a != 0, b / a, 0.0))  # one per latent, shaped to it
        leaf_grads = [found.pop(leaf) * ratios[i] if leaf in found else None for i, _, leaf in cut]
    else:  # the losses on the whole graph, one backward pass each
        theta_value, phi_value = _checked(theta_loss(particles)), _checked(phi_loss(particles))
        found = _grads([theta_value], theta, retain_graph=True)
        from_model = _grads([phi_value], leaves, retain_graph=True)
        leaf_grads = [from_model.get(leaf) for leaf in leaves]
    chained = [(z, g) for (_, z, _), g in zip(cut, leaf_grads) if g is not None]
    found.update(_grads([phi_value] + [z for z, _ in chained], phi, [None] + [g for _, g in chained]))
    return _check_grads(found), theta_value, phi_value


def accumulate_grads(grads):
    """Adds ``grads`` (from :func:`gradients`) to the parameters' ``.grad``; returns the parameters."""
    for p, g in grads.items():
        p.grad = g if p.grad is None else p.grad + g
    return list(grads)


def gradient_step(loss, params, optim):
    """One step of ``optim`` on ``params`` along ∂loss/∂params; other gradients are not computed.
    A non-finite loss or gradient is refused before any parameter moves."""
    params = accumulate_grads(gradients(loss, params))
    optim(params)
    for p in params:
        p.grad = None


class Snapshot:
    """Parameters' values and their optimiser state (one torch optimiser per parameter, as
    :class:`pyro.optim.PyroOptim` keeps them), to undo an M-step whose P-step refused."""

    def __init__(self, params, optim):
        self.optim = optim
        self.values = {p: p.detach().clone() for p in params}
        self.states = {p: _clone_state(self._optimizer(p).state.get(p, {})) for p in params if self._optimizer(p)}

    def _optimizer(self, p):
        found = self.optim.optim_objs.get(p)
        return getattr(found, "optimizer", found)  # an LR scheduler wraps its optimiser

    def restore(self):
        with torch.no_grad():
            for p, value in self.values.items():
                p.copy_(value)
        for p in self.values:
            optimizer = self._optimizer(p)
            if optimizer is not None:
                optimizer.state[p] = self.states.get(p, {})


def _clone_state(state):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
