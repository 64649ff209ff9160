"""Observing data with missing entries, the Pyro way, at any granularity."""

import pyro
import torch


def observe_masked(name, fn, obs, obs_mask=None, event_dim=0):
    r"""Observe ``obs`` at the entries where ``obs_mask`` is true; sample the rest from the model.

    This is Pyro's ``pyro.sample(name, fn.to_event(event_dim), obs=obs, obs_mask=obs_mask)``
    with one difference: the mask may cover the event dimensions too, so a per-pixel mask
    works with an image likelihood such as ``Bernoulli(logits=...)`` over 784 pixels.
    ``fn`` is the element-wise distribution (its batch shape covers the masked dims) and
    ``event_dim`` of its rightmost batch dims are turned into event dims after masking.

    As with ``obs_mask``, two sites are created:

    * ``{name}_observed``: observed, log p(x_o | z) (the missing entries masked out);
    * ``{name}_unobserved``: a latent site, log p(x_m | z) (the observed entries masked
      out). The guide does not sample it: IWEM proposes it from the model's own
      conditional, so it enters the log joint and cancels from the importance weights.

    and the completed value ``where(obs_mask, obs, x_m)`` is recorded as a deterministic
    site ``name`` and returned. With ``obs_mask=None`` this is a plain observation at ``name``.
    """
    if obs_mask is None:
        return pyro.sample(name, fn.to_event(event_dim), obs=obs)
    if obs_mask.dtype != torch.bool:
        raise TypeError(f"observe_masked('{name}'): obs_mask must be a bool tensor, got {obs_mask.dtype}")
    try:
        fits = torch.broadcast_shapes(obs_mask.shape, obs.shape) == obs.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"observe_masked('{name}'): obs_mask has shape {tuple(obs_mask.shape)}, which does not fit the "
            f"observation's shape {tuple(obs.shape)}; the mask needs one entry per entry of obs (or broadcast to it)"
        )
    obs = torch.where(obs_mask, obs, torch.zeros((), dtype=obs.dtype, device=obs.device))
    pyro.sample(f"{name}_observed", fn.mask(obs_mask).to_event(event_dim), obs=obs)
    missing = pyro.sample(f"{name}_unobserved", fn.mask(~obs_mask).to_event(event_dim))
    value = torch.where(obs_mask, obs, missing)
    return pyro.deterministic(name, value, event_dim=event_dim)
