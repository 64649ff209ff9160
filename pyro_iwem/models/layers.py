"""Building blocks shared by the paper's models: MLPs, distribution heads, gated layers."""

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    r"""A fully connected network ``in_dim -> hidden[0] -> ... -> hidden[-1] [-> out_dim]``.

    Every hidden layer is followed by ``activation()``. With ``out_dim=None`` the network
    ends with the last hidden activation (a body for a distribution head); otherwise it
    ends with a linear output layer and no activation (e.g. Bernoulli logits).
    Acts on the last dimension, so any leading batch dims are kept.

    :param int in_dim: input size.
    :param hidden: sizes of the hidden layers (possibly empty).
    :param out_dim: size of the linear output layer, or None for no output layer.
    :param activation: a module class such as ``nn.Tanh``.
    """

    def __init__(self, in_dim, hidden, out_dim=None, activation=nn.Tanh):
        layers = []
        for size in hidden:
            layers += [nn.Linear(in_dim, size), activation()]
            in_dim = size
        if out_dim is not None:
            layers.append(nn.Linear(in_dim, out_dim))
            in_dim = out_dim
        super().__init__(*layers)
        self.out_dim = in_dim


#: How :class:`GaussianHead` maps the raw output ``s = W_scale h + b_scale`` to the scale.
SCALE_LINKS = ("softplus", "exp")


class GaussianHead(nn.Module):
    r"""Maps features ``h`` to the parameters of a diagonal Normal:

        loc = W_loc h + b_loc,    scale = softplus(W_scale h + b_scale) + min_scale

    (``link="softplus"``, the default), or, with ``link="exp"``, the raw output read as a
    log-variance, unclamped and without a floor:

        scale = exp((W_scale h + b_scale) / 2),

    the official IWEM code's MLP encoder (``q_z_logvar``, a linear layer).

    The softplus parametrisation (as in Tucker et al.'s IWAE/DReG code) grows linearly
    rather than exponentially, so large raw outputs do not blow up the scale, and the
    floor ``min_scale`` keeps log densities finite. With zero-initialised biases the
    initial scale is about softplus(0) = 0.69 (softplus) or exp(0) = 1 (exp).

    :param str link: ``"softplus"`` or ``"exp"``; ``min_scale`` is unused with ``"exp"``.
    :returns: a tuple ``(loc, scale)``, each of shape ``h.shape[:-1] + (out_dim,)``.
    """

    def __init__(self, in_dim, out_dim, min_scale=1e-4, link="softplus"):
        super().__init__()
        if link not in SCALE_LINKS:
            raise ValueError(f"link must be one of {', '.join(SCALE_LINKS)}, got {link!r}")
        self.loc = nn.Linear(in_dim, out_dim)
        self.scale = nn.Linear(in_dim, out_dim)
        self.min_scale = min_scale
        self.link = link

    def forward(self, h):
        raw = self.scale(h)
        scale = torch.exp(0.5 * raw) if self.link == "exp" else F.softplus(raw) + self.min_scale
        return self.loc(h), scale


class ClampedLogVarHead(nn.Module):
    r"""Maps features ``h`` to the parameters of a diagonal Normal through a clamped
    log-variance, as in Tomczak & Welling's (2017) VAEs (their ``q_z_logvar``, a linear
    layer followed by ``nn.Hardtanh(-6, 2)``):

        loc = W_loc h + b_loc,    logvar = hardtanh(W_logvar h + b_logvar, lo, hi),
        scale = exp(logvar / 2).

    The scale stays within ``[exp(lo / 2), exp(hi / 2)]`` (about ``[0.050, 2.72]`` with the
    default ``bounds=(-6, 2)``), so no floor is needed; a saturated unit gets no gradient. With
    zero-initialised biases the initial scale is about exp(0) = 1.

    :param int in_dim: feature size.
    :param int out_dim: latent dimension.
    :param bounds: ``(lo, hi)``, the interval of the log-variance.
    :returns: a tuple ``(loc, scale)``, each of shape ``h.shape[:-1] + (out_dim,)``.
    """

    def __init__(self, in_dim, out_dim, bounds=(-6.0, 2.0)):
        super().__init__()
        lo, hi = map(float, bounds)
        if not lo < hi:
            raise ValueError(f"bounds must be (lo, hi) with lo < hi, got {tuple(bounds)}")
        self.loc = nn.Linear(in_dim, out_dim)
        self.logvar = nn.Linear(in_dim, out_dim)
        self.bounds = (lo, hi)

    def log_variance(self, h):
        """The clamped log-variance, ``hardtanh(W_logvar h + b_logvar, lo, hi)``."""
        return F.hardtanh(self.logvar(h), *self.bounds)

    def forward(self, h):
        return self.loc(h), torch.exp(0.5 * self.log_variance(h))


class StudentTHead(GaussianHead):
    r"""A :class:`GaussianHead` that also outputs degrees of freedom for a Student-t:
    ``df = softplus(W_df h + b_df) + min_df``. The default ``min_df=3`` (Mattei & Frellsen's
    MIWAE decoder) keeps the mean and the variance finite.

    :returns: a tuple ``(loc, scale, df)``.
    """

    def __init__(self, in_dim, out_dim, min_scale=1e-3, min_df=3.0):
        super().__init__(in_dim, out_dim, min_scale)
        self.df = nn.Linear(in_dim, out_dim)
        self.min_df = min_df

    def forward(self, h):
        loc, scale = super().forward(h)
        return loc, scale, F.softplus(self.df(h)) + self.min_df


def gaussian_mlp(in_dim, hidden, out_dim, activation=nn.Tanh, min_scale=1e-4, link="softplus"):
    r"""An MLP body followed by a :class:`GaussianHead` (with ``link``): ``h -> (loc, scale)``
    of a diagonal Normal over ``out_dim`` variables (an encoder q(z|x), or a conditional prior p(z1|z2))."""
    body = MLP(in_dim, hidden, activation=activation)
    return nn.Sequential(body, GaussianHead(body.out_dim, out_dim, min_scale, link))


class Gated(nn.Module):
    r"""A gated layer ``y = a(x) * sigmoid(g(x))``, where ``a`` and ``g`` are two
    independently parametrised copies of ``layer(*args, **kwargs)``. ``Gated(nn.Conv2d, ...)``
    is the GatedConv2d and ``Gated(nn.Linear, ...)`` the GatedDense layer of Tomczak & Welling
    (2017), "VAE with a VampPrior" (originally Dauphin et al. 2017)."""

    def __init__(self, layer, *args, **kwargs):
        super().__init__()
        self.a = layer(*args, **kwargs)
        self.g = layer(*args, **kwargs)

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.g(x))


def glorot_init_(module):
    r"""Glorot & Bengio (2010) initialisation, in place: ``xavier_uniform_`` weights and zero
    biases for every ``nn.Linear`` and ``nn.Conv2d`` in ``module``. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def init_bernoulli_bias_(linear, mean, eps=1e-3):
    r"""Set ``linear.bias`` to ``logit(clamp(mean, eps, 1 - eps))``, so that a decoder with zero
    output weights starts at the marginal pixel probabilities of the training data
    (Burda et al. 2015; Tucker et al. 2018 clip at 1e-3)."""
    mean = torch.as_tensor(mean, dtype=linear.bias.dtype, device=linear.bias.device)
    if mean.shape != linear.bias.shape:
        raise ValueError(f"train_mean must have shape {tuple(linear.bias.shape)}, got {tuple(mean.shape)}")
    with torch.no_grad():
        linear.bias.copy_(torch.logit(mean.clamp(eps, 1 - eps)))
    return linear


def apply_flat(module, x, event_dims=1):
    r"""Apply ``module`` (which expects one batch dim) to ``x`` with any number of leading
    batch dims: flatten them to one, apply, restore them on the output (or on each output
    of a tuple). ``event_dims`` is the number of trailing dims of ``x`` the module consumes."""
    batch_shape = x.shape[: x.dim() - event_dims]
    out = module(x.reshape((-1,) + x.shape[x.dim() - event_dims :]))

    def restore(y):
        return y.reshape(batch_shape + y.shape[1:])

    return tuple(map(restore, out)) if isinstance(out, tuple) else restore(out)
