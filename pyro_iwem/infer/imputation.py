r"""Imputing missing entries with a trained model and proposal (MIWAE's estimator, §5).

For a datum with observed entries :math:`x_o`, the conditional mean of the missing ones is

.. math::

    \mathbb E[x_m \mid x_o] = \int \mathbb E[x_m \mid z]\, p(z \mid x_o)\, dz
    \approx \sum_{k=1}^K \bar w_k\, \mathbb E[x_m \mid z_k],
    \qquad \bar w_k = \frac{w_k}{\sum_l w_l},\ w_k = \frac{p(x_o, z_k)}{q(z_k \mid \cdot)},\
    z_k \sim q(z \mid \cdot),

a self-normalised importance sampling estimate (consistent as :math:`K \to \infty`) with the
weights the samplers already compute (the model-proposed :math:`x_m` cancel). The decoder's
:math:`\mathbb E[x_m \mid z]` is read off the model's ``"{site}_unobserved"`` site, the site
:func:`~pyro_iwem.infer.masked.observe_masked` and Pyro's ``obs_mask=`` create.
"""

import torch

from .missing import ZeroFilledInputs
from .sampler import ParticleSampler
from .transforms import ReplayGlobals


class Imputer:
    r"""Fills the missing entries of ``x`` given its observed ones, for a model observing
    ``x`` with a mask (``model(x, mask)`` by default; see :class:`ZeroFilledInputs` for other
    argument positions).

    :param model: the Pyro model; it observes ``site`` through ``observe_masked`` or ``obs_mask=``.
    :param guide: the guide, :math:`q(z \mid \cdot)`.
    :param str site: the observed site's name.
    :param guide_inputs: what the guide sees (also names the data and mask arguments):
        :class:`ZeroFilledInputs` (default, missIWAE's :math:`q(z \mid x_o, 0)`) or
        :class:`~pyro_iwem.infer.missing.ImputedInputs` (miss-IWEM's proposal, §4.1).
    :param plates: ``max_plate_nesting`` and ``data_plate``, as for :class:`ParticleSampler`.
    """

    def __init__(self, model, guide, site="x", guide_inputs=None, **plates):
        self.site = f"{site}_unobserved"
        self.inputs = ZeroFilledInputs() if guide_inputs is None else guide_inputs
        self.sampler = ParticleSampler(model, guide, guide_inputs=self.inputs, **plates)

    def _draw(self, num_particles, args, kwargs, earlier=None):
        """``(log_w (N, B), E[x | z_k] (N, B, -1), x_m draws (N, B, -1), x, mask, earlier)`` of one
        pass; ``earlier`` (what an earlier pass returned) fixes the minibatch of a subsampled data
        plate and the global latents to that pass's, so that the chunks of one call weight every
        datum given one draw of β."""
        x, mask, _ = self.inputs.zero_filled(args, kwargs)
        subsample, replay = (None, ()) if earlier is None else earlier
        particles = self.sampler(num_particles, args, kwargs, grad_guide=False, subsample=subsample, transforms=replay)
        node = particles.model_trace.nodes.get(self.site)
        if node is None:
            raise ValueError(
                f"Imputer: the model has no site '{self.site}'; observe the data with obs_mask= or "
                "pyro_iwem.observe_masked, and name the observed site with site="
            )
        log_w = particles.log_w
        shape = (num_particles, log_w.shape[1], -1)
        full = (num_particles,) + x.shape
        mean = torch.broadcast_to(node["fn"].mean, full).reshape(shape)
        draws = torch.broadcast_to(node["value"], full).reshape(shape)
        if not replay and particles.global_sites:
            replay = (ReplayGlobals(particles),)
        return log_w, mean, draws, x, mask, (particles.subsample, replay)

    @torch.no_grad()
    def mean(self, *args, num_particles=1000, chunk_size=500, **kwargs):
        r"""``x`` with its missing entries replaced by :math:`\sum_k \bar w_k \mathbb E[x_m \mid z_k]`.

        The ``num_particles`` samples are drawn ``chunk_size`` at a time; each chunk's weighted
        sum is one batched matrix product, and the sums and weights are accumulated across
        chunks in float64 with a running maximum (log-space normalisation), so K = 10 000 fits
        in memory. Returns a tensor of ``x``'s shape and dtype.
        """
        if num_particles < 1 or chunk_size < 1:
            raise ValueError(f"num_particles and chunk_size must be >= 1, got {num_particles} and {chunk_size}")
        top = total = weighted = subsample = None
        remaining = num_particles
        while remaining > 0:
            n = min(chunk_size, remaining)
            log_w, mean, _, x, mask, subsample = self._draw(n, args, kwargs, subsample)
            log_w = log_w.double()
            chunk_top = log_w.amax(0)
            new_top = chunk_top if top is None else torch.maximum(top, chunk_top)
            w = (log_w - new_top).exp()  # in [0, 1]: the chunk's weighted sum is safe in mean's dtype
            chunk_total = w.sum(0)
            chunk_weighted = torch.einsum("nb,nbd->bd", w.to(mean.dtype), mean).double()
            if top is None:
                total, weighted = chunk_total, chunk_weighted
            else:
                rescale = (top - new_top).exp()
                total = total * rescale + chunk_total
                weighted = weighted * rescale.unsqueeze(-1) + chunk_weighted
            top = new_top
            remaining -= n
        imputed = (weighted / total.unsqueeze(-1)).reshape(x.shape).to(x.dtype)
        return torch.where(mask, x, imputed)

    @torch.no_grad()
    def sample(self, *args, num_particles=100, mean=True, chunk_size=None, **kwargs):
        r"""One completion per datum by sampling importance resampling: draw ``num_particles``
        particles, pick one per datum with probability :math:`\bar w_k`, and fill the missing
        entries with its :math:`\mathbb E[x_m \mid z_k]` (``mean=True``, smooth pictures) or its
        draw :math:`x_m \sim p(x_m \mid z_k)` (``mean=False``: a draw from the
        importance-weighted posterior, e.g. one of several multiple imputations, each call
        independent). Returns a tensor of ``x``'s shape.

        With ``chunk_size``, the particles are drawn ``chunk_size`` at a time and the pick is
        kept across chunks by weight (a chunk's own pick replaces the one so far with
        probability its share of the total weight), which is the same pick in distribution
        as one pass, in the memory of one chunk.
        """
        if num_particles < 1 or (chunk_size is not None and chunk_size < 1):
            raise ValueError(f"num_particles and chunk_size must be >= 1, got {num_particles} and {chunk_size}")
        chunk_size = num_particles if chunk_size is None else chunk_size
        chosen = log_total = subsample = None
        remaining = num_particles
        while remaining > 0:
            n = min(chunk_size, remaining)
            log_w, means, draws, x, mask, subsample = self._draw(n, args, kwargs, subsample)
            pick = torch.distributions.Categorical(logits=log_w.T).sample()  # (B,)
            picked = (means if mean else draws)[pick, torch.arange(log_w.shape[1], device=pick.device)]
            chunk_total = log_w.double().logsumexp(0)
            if chosen is None:
                chosen, log_total = picked, chunk_total
            else:
                new_total = torch.logaddexp(log_total, chunk_total)
                switch = torch.rand_like(new_total).log() < chunk_total - new_total
                chosen = torch.where(switch.unsqueeze(-1), picked, chosen)
                log_total = new_total
            remaining -= n
        return torch.where(mask, x, chosen.reshape(x.shape).to(x.dtype))
