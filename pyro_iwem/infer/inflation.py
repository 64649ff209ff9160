r"""Proposal inflation: widen a guide's sample sites by a variance factor.

The official IWEM code draws every importance sample from the encoder's Gaussian with its
variance multiplied by a constant :math:`c` (1.5): the proposal is

.. math::
    q_c(z \mid x) = \mathcal N\big(z;\ \mu(x),\ c\,\Sigma(x)\big)
    \qquad \text{for } q(z \mid x) = \mathcal N\big(z;\ \mu(x),\ \Sigma(x)\big),

a heavier-tailed proposal for the same :math:`\phi`. An importance weight of a draw from
:math:`q_c` is :math:`p(x, z) / q_c(z \mid x)`, with the log density of the distribution
actually sampled. :class:`ProposalInflation` does this to any guide: it replaces each sample
site's distribution by the widened one, so a trace records (and :math:`\log q` is computed
from) :math:`q_c`, and a draw is a reparameterised draw from it.

The factor is a number, or one number per particle of a vectorised particle plate (a
sequence placed at that plate's ``dim``), so that one pass draws some particles widened and
others not (IWEM's E-step: K inflated importance samples, L un-inflated ELBO samples).
"""

import numbers

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .sites import base_distribution
from .util import ModelError

#: The distributions :func:`inflate` widens, with what a variance factor ``c`` does to them.
WIDENED = "Normal (scale × √c), MultivariateNormal (scale_tril × √c), LowRankMultivariateNormal (cov_factor × √c, cov_diag × c)"


def is_variance_factor(value):
    """Whether ``value`` is a variance factor: a real number (not a bool), positive and finite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < float("inf")


def check_inflation(name, value):
    """``value`` as a float variance factor: positive and finite."""
    if not is_variance_factor(value):
        raise ValueError(f"{name} must be a positive finite number (a variance factor), got {value!r}")
    return float(value)


def inflate(fn, factor):
    r"""``fn`` with its covariance multiplied by ``factor``: :math:`\Sigma \mapsto c\,\Sigma`.

    :param fn: a :class:`~pyro.distributions.Normal`, :class:`~pyro.distributions.MultivariateNormal`
        or :class:`~pyro.distributions.LowRankMultivariateNormal`, possibly inside
        :class:`~pyro.distributions.Independent` (``.to_event``), a mask or an expansion.
    :param factor: a positive number, or a tensor that broadcasts against ``fn.batch_shape``
        (right-aligned): a factor per batch element.
    :raises TypeError: for any other distribution (:class:`ProposalInflation` names the site).
    """
    if isinstance(factor, numbers.Number) and factor == 1:
        return fn
    if isinstance(fn, torch.distributions.Independent):
        return dist.Independent(inflate(fn.base_dist, _event_dims(factor, fn.reinterpreted_batch_ndims)),
                                fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.MaskedDistribution):
        return dist.MaskedDistribution(inflate(fn.base_dist, factor), fn._mask)
    if isinstance(fn, dist.ExpandedDistribution):
        return inflate(fn.base_dist, factor).expand(fn.batch_shape)
    if isinstance(fn, torch.distributions.Normal):
        return dist.Normal(fn.loc, fn.scale * _sqrt(factor))
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return dist.MultivariateNormal(fn.loc, scale_tril=fn.scale_tril * _event_dims(_sqrt(factor), 2))
    if isinstance(fn, torch.distributions.LowRankMultivariateNormal):
        return dist.LowRankMultivariateNormal(
            fn.loc, fn.cov_factor * _event_dims(_sqrt(factor), 2), fn.cov_diag * _event_dims(factor, 1)
        )
    raise TypeError(f"cannot inflate a {type(fn).__name__}: inflation widens {WIDENED}")


def _sqrt(factor):
    return factor**0.5


def _event_dims(factor, n):
    """``factor`` with ``n`` trailing dims of size 1 (a number is left as it is)."""
    return factor.reshape(factor.shape + (1,) * n) if isinstance(factor, torch.Tensor) else factor


def as_factors(factor):
    """``factor`` checked: a variance factor (a float), or a sequence or 1-d tensor of them (a tuple)."""
    if isinstance(factor, torch.Tensor):
        if factor.dim() > 1:
            raise ValueError(f"a tensor factor must be 0-d or 1-d, got shape {tuple(factor.shape)}")
        factor = factor.tolist()
    if isinstance(factor, (list, tuple)):
        if not all(is_variance_factor(f) for f in factor):
            raise ValueError(f"every inflation factor must be positive and finite, got {list(factor)}")
        return tuple(float(f) for f in factor)
    if not is_variance_factor(factor):
        raise ValueError(f"the inflation factor must be a positive finite number, got {factor!r}")
    return float(factor)


def per_particle(factor, num_particles):
    """``factor`` (:func:`as_factors`) as a list of one variance factor per particle; ``None``
    (no inflation) for ``None`` or when every factor is 1."""
    if factor is None:
        return None
    factors = as_factors(factor)
    factors = [factors] * num_particles if isinstance(factors, float) else list(factors)
    if len(factors) != num_particles:
        raise ValueError(f"inflation has {len(factors)} factors for {num_particles} particles; give one per particle")
    return None if all(f == 1 for f in factors) else factors


class ProposalInflation(Messenger):
    r"""Widens every sample site of the code it wraps (a guide) by a variance factor.

    Each latent sample site's distribution :math:`q` is replaced by :math:`q_c`, the same
    distribution with covariance :math:`c\,\Sigma` (:func:`inflate`): the value is drawn
    from :math:`q_c` and a trace records :math:`q_c`, so :math:`\log q` computed from the
    trace is the log density of the distribution actually sampled. Observed and subsample
    sites are left alone, and so are :class:`~pyro.distributions.Delta` sites: they have no
    spread of their own, being a function of earlier sites (the latents of Pyro's
    autoguides, which are widened through their auxiliary site). Any other distribution
    raises :class:`~pyro_iwem.infer.util.ModelError` naming the site. With one factor per
    particle, a global latent drawn once outside the particle plate (no particle dim) is
    left alone.

    Used outside a particle plate, it sees the distributions the plates have broadcast::

        with ProposalInflation([1.5, 1.5, 1.0], dim=-2):
            with pyro.plate("particles", 3, dim=-2):
                guide(x)          # particles 0, 1 widened, particle 2 not

    :param factor: the variance factor :math:`c > 0`: a number, or a sequence (or 1-d tensor)
        of one factor per element of the batch dim ``dim`` (a vectorised particle plate), made
        into a tensor at each site in the dtype and on the device of its distribution.
    :param int dim: the batch dim (negative, counted from the right of a site's batch shape)
        that a sequence of factors runs along; required for one, ignored for a number.
    """

    def __init__(self, factor, dim=None):
        super().__init__()
        factor = as_factors(factor)
        if isinstance(factor, tuple):
            if not factor or dim is None or dim >= 0:
                raise ValueError(
                    "a sequence of factors needs one factor per element of the batch dim `dim` (a negative int), "
                    f"got {len(factor)} factors and dim={dim!r}"
                )
            self.factor, self.shape = factor, (len(factor),) + (1,) * (-1 - dim)
        else:
            self.factor, self.shape = factor, None

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg) or msg["infer"].get("_deterministic"):
            return
        if isinstance(base_distribution(msg["fn"]), dist.Delta):
            return
        factor = self.factor
        if self.shape is not None and len(msg["fn"].batch_shape) < len(self.shape):
            return  # a global drawn once, outside the particle plate: one draw for all particles, not widened
        if self.shape is not None:  # made here, in the site's dtype and on its device
            factor = torch.tensor(factor, **_dtype_and_device(msg["fn"])).reshape(self.shape)
        try:
            msg["fn"] = inflate(msg["fn"], factor)
        except TypeError:
            raise ModelError(
                f"guide site '{msg['name']}' has a {_describe(msg['fn'])} proposal, which cannot be inflated: "
                f"proposal inflation widens {WIDENED}, also inside .to_event(), masks and expansions"
            ) from None


def _describe(fn):
    inner = base_distribution(fn)
    return type(inner).__name__ if inner is fn else f"{type(inner).__name__} (in {type(fn).__name__})"


def _dtype_and_device(fn):
    """The dtype and device of ``fn``'s location (a factor tensor is cast to them)."""
    loc = getattr(base_distribution(fn), "loc", None)
    return {"dtype": loc.dtype, "device": loc.device} if isinstance(loc, torch.Tensor) else {}
