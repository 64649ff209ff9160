"""A catalogue of Pyro model/guide patterns for importance-weighted inference.

Each :class:`Pattern` is a small model/guide pair with its data. ``valid`` patterns must
run under every method (IWEM, IWAE, VAE, the IWAE bound); ``invalid`` ones must be refused
with an error whose message matches ``error`` (a regular expression, searched
case-insensitively) before any parameter moves.

The catalogue covers the kinds of programs Pyro's own ``tests/infer/test_valid_models.py``
exercises, restricted to those that make sense for a model of data: plates of every kind
(nested, subsampled, sizeless, sequential, reused, stacked), event dimensions, scaling and
masking, discrete latents (proposed by the guide or summed out by enumeration in the
model), latents the guide leaves to the model, auxiliary guide sites, autoguides,
missing data, deterministic and factor sites, constrained parameters, ``nn.Module``\\ s,
and models written for one particle at a time (``vectorize=False``). The invalid entries
are the user errors these programs invite.

Parameters are created with ``pyro.param`` inside the model or guide, so each test starts
from the initial values once the param store is cleared. Models and guides that keep state
of their own (autoguides, ``nn.Module``\\ s) are given as :class:`Fresh` factories; use
:meth:`Pattern.build` to get a new model/guide pair.
"""

import re
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from torch import nn
from torch.distributions import constraints

from pyro_iwem import observe_masked

STANDARD_METHODS = ("iwem", "iwae", "vae", "bound")
ALL_METHODS = STANDARD_METHODS + ("stl", "dreg")


def _flags(regex):
    """Case-insensitive, dot-matches-newline: messages are matched wherever the text lies."""
    if regex is None or regex.startswith("(?"):
        return regex
    return "(?is)" + regex


def _names_all(*parts):
    """A regex that matches a message containing every part, in any order."""
    return "(?is)" + "".join(f"(?=.*{part})" for part in parts)


class Fresh:
    """A model or guide with state of its own (an autoguide, an ``nn.Module``), built anew for
    each use by :meth:`Pattern.build` so that no test sees another's trained state."""

    def __init__(self, factory):
        self.factory = factory

    def make(self):
        return self.factory()

    def __repr__(self):
        return f"Fresh({getattr(self.factory, '__name__', self.factory)!r})"


@dataclass
class Pattern:
    """One model/guide pair of the catalogue.

    :param str name: a short identifier (the test id).
    :param model: a Pyro model taking ``*args`` (or a :class:`Fresh` that builds one).
    :param guide: a Pyro guide taking ``*args`` (or a :class:`Fresh` that builds one).
    :param tuple args: the data.
    :param bool valid: whether inference must succeed.
    :param str error: for an invalid pattern, a regex the error message must match.
    :param warns: for a valid pattern, a regex a ``UserWarning`` must match; a string applies
        to every method, a dict ``{method: regex}`` to the methods it names.
    :param bool vectorize: run with ``vectorize_particles=vectorize``.
    :param tuple methods: the methods the pattern is run with.
    :param int datums: if set, the length ``iwae_bound`` must return (one value per datum).
    :param str note: what the pattern is about.
    :param tuple error_types: for an invalid pattern, the exception types accepted.
    """

    name: str
    model: Callable
    guide: Callable
    args: tuple
    valid: bool = True
    error: str | None = None
    warns: str | dict | None = None
    vectorize: bool = True
    methods: tuple = STANDARD_METHODS
    datums: int | None = None
    note: str = ""
    error_types: tuple = (ValueError, NotImplementedError, TypeError)

    def __post_init__(self):
        if not self.valid and self.error is None:
            raise ValueError(f"invalid pattern {self.name!r} needs the expected error")
        if self.valid and self.error is not None:
            raise ValueError(f"valid pattern {self.name!r} has an expected error")
        self.error = _flags(self.error)
        if isinstance(self.warns, dict):
            self.warns = {method: _flags(regex) for method, regex in self.warns.items()}
        else:
            self.warns = _flags(self.warns)
        for regex in [self.error] + (list(self.warns.values()) if isinstance(self.warns, dict) else [self.warns]):
            if regex is not None:
                re.compile(regex)

    def build(self):
        """``(model, guide)`` ready to run: :class:`Fresh` entries are instantiated anew."""
        return tuple(fn.make() if isinstance(fn, Fresh) else fn for fn in (self.model, self.guide))

    def warns_for(self, method):
        """The warning regex expected under ``method``, or ``None``."""
        if isinstance(self.warns, dict):
            return self.warns.get(method)
        return self.warns


# ---------------------------------------------------------------------------------------
# data


def _data(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


N = 3  # data points per batch
F32, F64 = torch.float32, torch.float64
X1 = _data(N)  # scalar data, float32
X1_64 = _data(N, dtype=F64, seed=1)  # scalar data, float64
X2 = _data(N, 2, seed=2)  # 2-vectors, float32
X2_64 = _data(N, 2, dtype=F64, seed=3)  # 2-vectors, float64
X4_64 = _data(N, 4, dtype=F64, seed=4)
X6 = _data(6, seed=5)  # a data set of six for the subsampled plate
BINARY = (_data(N, 4, seed=6) > 0).float()
COUNTS = torch.tensor([0.0, 2.0, 5.0])
SIMPLEX = torch.softmax(_data(N, 3, seed=7), -1)
MASK = torch.tensor([True, False, True])
MASK2 = torch.tensor([[True, False], [True, True], [False, True]])
MASK4 = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)


def _p(name, value, **kw):
    return pyro.param(name, lambda: value.clone() if isinstance(value, torch.Tensor) else torch.tensor(value), **kw)


# ---------------------------------------------------------------------------------------
# building blocks: a per-datum Gaussian latent z and a linear-Gaussian observation


def _obs_normal(x, loc, scale=1.0, event=0, name="x"):
    fn = dist.Normal(loc, scale)
    return pyro.sample(name, fn.to_event(event) if event else fn, obs=x)


def _z_guide(x, name="z", plate=True):
    """q(z | x) = N(a x + b, s): one scalar latent per datum of x (shape (N,))."""
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    b = _p("q_b", torch.tensor(0.0, dtype=x.dtype))
    s = _p("q_s", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    if plate:
        with pyro.plate("data", x.shape[0]):
            return pyro.sample(name, dist.Normal(a * x + b, s))
    return pyro.sample(name, dist.Normal(a * x + b, s))


def normal_model(x):
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        _obs_normal(x, w * z)


def normal_guide(x):
    _z_guide(x)


def chain_model(x):
    """z1 -> z2 -> x, both latents per datum."""
    w = _p("w", torch.tensor(0.5, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        z2 = pyro.sample("z2", dist.Normal(w * z1, 1.0))
        _obs_normal(x, z2)


def chain_guide(x):
    a = _p("q_a", torch.tensor(0.2, dtype=x.dtype))
    s = _p("q_s", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(a * x, s))
        pyro.sample("z2", dist.Normal(0.5 * (z1 + x), s))


def gamma_poisson_model(counts):
    """A positive latent rate per datum (Gamma) observed through Poisson counts."""
    shape = _p("shape", torch.tensor(2.0), constraint=constraints.positive)
    with pyro.plate("data", counts.shape[0]):
        rate = pyro.sample("rate", dist.Gamma(shape, 1.0))
        pyro.sample("x", dist.Poisson(rate), obs=counts)


def gamma_poisson_guide(counts):
    loc = _p("q_loc", torch.zeros(counts.shape[0]))
    scale = _p("q_scale", torch.ones(counts.shape[0]), constraint=constraints.positive)
    with pyro.plate("data", counts.shape[0]):
        pyro.sample("rate", dist.LogNormal(loc, scale))


def vector_model(x):
    """z in R^2 per datum (.to_event(1)), x in R^D = W z + noise."""
    W = _p("W", 0.5 * torch.ones(x.shape[-1], 2, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        _obs_normal(x, z @ W.T, event=1)


def vector_guide(x):
    A = _p("q_A", torch.zeros(2, x.shape[-1], dtype=x.dtype))
    s = _p("q_s", torch.ones(2, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ A.T, s).to_event(1))


def matrix_model(x):
    """A 2x2 latent matrix per datum (.to_event(2)); x (N, 2) = Z @ v."""
    v = _p("v", torch.ones(2, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        Z = pyro.sample("Z", dist.Normal(torch.zeros(2, 2, dtype=x.dtype), 1.0).to_event(2))
        _obs_normal(x, Z @ v, event=1)


def matrix_guide(x):
    loc = _p("q_loc", torch.zeros(x.shape[0], 2, 2, dtype=x.dtype))
    s = _p("q_s", torch.ones(2, 2, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("Z", dist.Normal(loc, s).to_event(2))


def mvn_model(x):
    """A correlated 2-d latent (MultivariateNormal) per datum."""
    L = _p("L", torch.eye(2, dtype=x.dtype), constraint=constraints.lower_cholesky)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.MultivariateNormal(torch.zeros(2, dtype=x.dtype), scale_tril=L))
        _obs_normal(x, z, event=1)


def mvn_guide(x):
    A = _p("q_A", 0.5 * torch.eye(2, dtype=x.dtype))
    L = _p("q_L", torch.eye(2, dtype=x.dtype), constraint=constraints.lower_cholesky)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.MultivariateNormal(x @ A.T, scale_tril=L))


# --- plates ------------------------------------------------------------------------------


def nested_model(x):
    """Data plate (dim -2) around a feature plate (dim -1): a latent per datum and one per entry."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(torch.zeros(1, dtype=x.dtype), 1.0))  # (N, 1)
        with pyro.plate("features", x.shape[1], dim=-1):
            u = pyro.sample("u", dist.Normal(w * z, 1.0))  # (N, D)
            _obs_normal(x, u, 0.5)


def nested_guide(x):
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    s = _p("q_s", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(a * x.mean(-1, keepdim=True), s))
        with pyro.plate("features", x.shape[1], dim=-1):
            pyro.sample("u", dist.Normal(0.5 * (z + x), s))


def nested_auto_dims_model(xt):
    """Plates without dims: the data plate, entered first, gets dim -1; data are (D, N)."""
    w = _p("w", torch.tensor(1.0, dtype=xt.dtype))
    with pyro.plate("data", xt.shape[1]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=xt.dtype), 1.0))  # (N,)
        with pyro.plate("features", xt.shape[0]):
            _obs_normal(xt, w * z, 1.0)  # (D, N)


def nested_auto_dims_guide(xt):
    a = _p("q_a", torch.tensor(0.1, dtype=xt.dtype))
    with pyro.plate("data", xt.shape[1]):
        pyro.sample("z", dist.Normal(a * xt.sum(0), 1.0))


def plate_stack_model(x):
    """pyro.plate_stack: the outer plate of the stack is the data plate."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate_stack("data", x.shape):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        _obs_normal(x, w * z)


def plate_stack_guide(x):
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    with pyro.plate_stack("data", x.shape):
        pyro.sample("z", dist.Normal(a * x, 1.0))


def sequential_inner_model(x):
    """A sequential plate (a Python loop of steps) inside the vectorised data plate."""
    w = _p("w", torch.tensor(0.7, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = torch.zeros((), dtype=x.dtype)
        for t in pyro.plate("time", x.shape[1]):
            z = pyro.sample(f"z_{t}", dist.Normal(w * z, 1.0))
            _obs_normal(x[:, t], z, name=f"x_{t}")


def sequential_inner_guide(x):
    a = _p("q_a", torch.tensor(0.5, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        for t in pyro.plate("time", x.shape[1]):
            pyro.sample(f"z_{t}", dist.Normal(a * x[:, t], 1.0))


def sequential_data_model(x):
    """The data plate is sequential (a loop): there is no vectorised plate, one datum per batch."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    for i in pyro.plate("data", x.shape[0]):
        z = pyro.sample(f"z_{i}", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        _obs_normal(x[i], w * z, name=f"x_{i}")


def sequential_data_guide(x):
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    for i in pyro.plate("data", x.shape[0]):
        pyro.sample(f"z_{i}", dist.Normal(a * x[i], 1.0))


def plate_reuse_model(x):
    """One plate object entered twice."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    data = pyro.plate("data", x.shape[0], dim=-1)
    with data:
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
    with data:
        _obs_normal(x, w * z)


def subsample_model(x):
    """Six data, a plate subsampling three per step; the observation indexes with the subsample."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0], subsample_size=3) as idx:
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        _obs_normal(x[idx], w * z)


def subsample_index_guide(x):
    """Local guide parameters for all six data, indexed by the plate's subsample."""
    loc = _p("q_loc", torch.zeros(x.shape[0], dtype=x.dtype))
    scale = _p("q_scale", torch.ones(x.shape[0], dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0], subsample_size=3) as idx:
        pyro.sample("z", dist.Normal(loc[idx], scale[idx]))


def subsample_param_guide(x):
    """Local parameters declared inside the subsampled plate (event_dim=0): Pyro subsamples them."""
    with pyro.plate("data", x.shape[0], subsample_size=3):
        loc = pyro.param("q_loc", lambda: torch.zeros(x.shape[0], dtype=x.dtype), event_dim=0)
        scale = pyro.param(
            "q_scale", lambda: torch.ones(x.shape[0], dtype=x.dtype), constraint=constraints.positive, event_dim=0
        )
        pyro.sample("z", dist.Normal(loc, scale))


def sizeless_model(x):
    """plate("data", dim=-1) with no size: the size comes from broadcasting."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", dim=-1):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        _obs_normal(x, w * z)


def sizeless_guide(x):
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    s = _p("q_s", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", dim=-1):
        pyro.sample("z", dist.Normal(a * x, s))


# --- scale and mask ----------------------------------------------------------------------


def scaled_obs_model(x):
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        with poutine.scale(scale=0.5):
            _obs_normal(x, w * z)


def scaled_per_datum_model(x):
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        with poutine.scale(scale=torch.tensor([0.5, 1.0, 2.0], dtype=x.dtype)):
            _obs_normal(x, w * z)


def poutine_mask_model(x):
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        with poutine.mask(mask=MASK):
            _obs_normal(x, w * z)


def mask_false_model(x):
    """Two observations of each datum, one of them switched off with mask=False."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        _obs_normal(x, w * z)
        with poutine.mask(mask=False):
            _obs_normal(x + 100.0, w * z, name="x_ignored")


def dist_mask_model(x):
    """Distribution.mask() on a latent (in model and guide) and on the observation."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        u = pyro.sample("u", dist.Normal(z, 1.0).mask(MASK))
        pyro.sample("x", dist.Normal(w * z + 0.1 * u, 1.0).mask(torch.tensor([True, True, False])), obs=x)


def dist_mask_guide(x):
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(a * x, 1.0))
        pyro.sample("u", dist.Normal(z, 1.0).mask(MASK))


# --- discrete latents ----------------------------------------------------------------------


def bernoulli_model(x):
    p = _p("prior_p", torch.tensor(0.3), constraint=constraints.unit_interval)
    mu = _p("mu", torch.tensor(2.0))
    with pyro.plate("data", x.shape[0]):
        b = pyro.sample("b", dist.Bernoulli(p))
        _obs_normal(x, mu * b)


def bernoulli_guide(x):
    a = _p("q_a", torch.tensor(0.5))
    c = _p("q_c", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("b", dist.Bernoulli(logits=a * x + c))


def categorical_model(x):
    probs = _p("probs", torch.ones(3) / 3, constraint=constraints.simplex)
    locs = _p("locs", torch.tensor([-2.0, 0.0, 2.0]))
    with pyro.plate("data", x.shape[0]):
        k = pyro.sample("k", dist.Categorical(probs))
        _obs_normal(x, locs[k])


def categorical_guide(x):
    logits = _p("q_logits", torch.zeros(x.shape[0], 3))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("k", dist.Categorical(logits=logits))


def onehot_model(x):
    probs = _p("probs", torch.ones(3) / 3, constraint=constraints.simplex)
    locs = _p("locs", torch.tensor([-2.0, 0.0, 2.0]))
    with pyro.plate("data", x.shape[0]):
        h = pyro.sample("h", dist.OneHotCategorical(probs))
        _obs_normal(x, (h * locs).sum(-1))


def onehot_guide(x):
    logits = _p("q_logits", torch.zeros(x.shape[0], 3))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("h", dist.OneHotCategorical(logits=logits))


def poisson_model(x):
    rate = _p("rate", torch.tensor(2.0), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        k = pyro.sample("k", dist.Poisson(rate))
        _obs_normal(x, k)


def poisson_guide(x):
    rate = _p("q_rate", torch.ones(x.shape[0]), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("k", dist.Poisson(rate))


def mixed_model(x):
    """A continuous and a discrete latent per datum."""
    mu = _p("mu", torch.tensor(1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Bernoulli(0.5))
        _obs_normal(x, z + mu * b)


def mixed_guide(x):
    a = _p("q_a", torch.tensor(0.1))
    c = _p("q_c", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a * x, 1.0))
        pyro.sample("b", dist.Bernoulli(logits=c + a * x))


def z_only_guide(x):
    """Proposes z of :func:`mixed_model` and leaves its Bernoulli b to the model."""
    a = _p("q_a", torch.tensor(0.1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a * x, 1.0))


def unreparam_guide(x):
    """A Normal guide site whose reparameterisation is switched off (score-function gradients)."""
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a * x, 1.0).has_rsample_(False))


def enum_explicit_model(x):
    """A Bernoulli switch marked for parallel enumeration; the guide proposes z only."""
    p = _p("prior_p", torch.tensor(0.4), constraint=constraints.unit_interval)
    locs = _p("locs", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(p), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(locs[c.long()], 1.0))
        _obs_normal(x, z, 0.5)


@config_enumerate
def enum_gmm_model(x):
    """A Gaussian mixture whose only latent (the component) is summed out; the guide is empty."""
    weights = _p("weights", torch.ones(3) / 3, constraint=constraints.simplex)
    locs = _p("locs", torch.tensor([-1.0, 0.0, 1.0]))
    scale = _p("scale", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(weights))
        _obs_normal(x, locs[c], scale)


def empty_guide(*args, **kwargs):
    pass


def enum_sequential_model(x):
    p = _p("prior_p", torch.tensor(0.4), constraint=constraints.unit_interval)
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(p), infer={"enumerate": "sequential"})
        _obs_normal(x, 2.0 * c)


# --- latents the guide leaves out, auxiliary guide sites -----------------------------------


def omitted_latent_model(x):
    """w is a per-datum latent the guide does not propose: it is drawn from the model."""
    v = _p("v", torch.tensor(0.5, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        w = pyro.sample("w", dist.Normal(v * z, 1.0))
        _obs_normal(x, z + 0.1 * w)


def improper_omitted_model(x):
    """A latent with an improper prior that the guide omits: it cannot be proposed from the model."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        w = pyro.sample("w", dist.ImproperUniform(constraints.real, (), ()))
        _obs_normal(x, z + 0 * w)


def auxiliary_guide(x):
    """u is auxiliary (no model site): z ~ N(u, s) with u ~ N(a x, 1)."""
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    s = _p("q_s", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        u = pyro.sample("u", dist.Normal(a * x, 1.0), infer={"is_auxiliary": True})
        pyro.sample("z", dist.Normal(u, s))


def extra_site_guide(x):
    """Samples a site the model lacks, not marked auxiliary."""
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a * x, 1.0))
        pyro.sample("extra", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))


def shared_param_guide(x):
    """The guide reads a parameter of the model (w)."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    s = _p("q_s", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(w * x / (1.0 + w * w), s))


# --- global latents (drawn once, outside the particle plate) ----------------------------------------------------------


def global_model(x):
    """mu is global (outside the data plate), z local."""
    tau = _p("tau", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu, tau))
        _obs_normal(x, z)


def global_guide(x):
    m = _p("q_m", torch.tensor(0.0, dtype=x.dtype))
    a = _p("q_a", torch.tensor(0.5, dtype=x.dtype))
    mu = pyro.sample("mu", dist.Normal(m, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(mu + a * x, 1.0))


def dirichlet_model(p):
    """A global positive concentration (LogNormal, .to_event(1)) of Dirichlet observations."""
    c = pyro.sample("c", dist.LogNormal(0.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("data", p.shape[0]):
        pyro.sample("x", dist.Dirichlet(c), obs=p)


def dirichlet_guide(p):
    loc = _p("q_loc", torch.zeros(3))
    scale = _p("q_scale", torch.ones(3), constraint=constraints.positive)
    pyro.sample("c", dist.LogNormal(loc, scale).to_event(1))


def no_plate_model(x):
    """No plate at all: a vector latent, a vector observation; the batch is one datum."""
    s = _p("s", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[-1], dtype=x.dtype), 1.0).to_event(1))
    _obs_normal(x, z, s, event=1)


def no_plate_guide(x):
    loc = _p("q_loc", torch.zeros(x.shape[-1], dtype=x.dtype))
    pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def scalar_model(x):
    """No plate at all, scalars only."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
    _obs_normal(x, w * z)


def scalar_guide(x):
    _z_guide(x, plate=False)


# --- autoguides --------------------------------------------------------------------------


def two_latent_model(x):
    """x (N, 2) with two per-datum latents: a vector z and a positive scale r."""
    W = _p("W", 0.5 * torch.eye(2, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        r = pyro.sample("r", dist.LogNormal(torch.zeros((), dtype=x.dtype), 0.5))
        _obs_normal(x, z @ W.T, r.unsqueeze(-1), event=1)


def _autoguide_list(model):
    guide = AutoGuideList(model)
    guide.append(AutoNormal(poutine.block(model, expose=["z"])))
    guide.append(AutoNormal(poutine.block(model, expose=["r"])))
    return guide


def _auto(make_guide, model):
    """A fresh autoguide for ``model`` per use (autoguides keep their parameters and prototype trace)."""
    return Fresh(lambda: make_guide(model))


# --- missing data, deterministic and factor sites, constraints, nn.Module ------------------


def obs_mask_model(x):
    """Pyro's obs_mask=: missing data become a latent site the model proposes."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        pyro.sample("x", dist.Normal(w * z, 1.0), obs=x, obs_mask=MASK)


def obs_mask_entries_model(x):
    """obs_mask per entry, in a feature plate nested in the data plate."""
    w = _p("w", torch.ones(x.shape[1], dtype=x.dtype))
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(torch.zeros(1, dtype=x.dtype), 1.0))
        with pyro.plate("features", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(w * z, 1.0), obs=x, obs_mask=MASK4)


def obs_mask_entries_guide(x):
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    with pyro.plate("data", x.shape[0], dim=-2):
        pyro.sample("z", dist.Normal(a * x.nan_to_num().sum(-1, keepdim=True), 1.0))


def obs_mask_event_error_model(x):
    """An obs_mask covering the event dims of a MultivariateNormal: Pyro forbids it."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("x", dist.MultivariateNormal(z, torch.eye(2, dtype=x.dtype)), obs=x, obs_mask=MASK2)


def observe_masked_model(x, mask):
    """pyro_iwem.observe_masked with a per-entry mask over the event dim."""
    W = _p("W", 0.5 * torch.ones(x.shape[-1], 2, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        observe_masked("x", dist.Normal(z @ W.T, 1.0), x, mask, event_dim=1)


def observe_masked_guide(x, mask):
    A = _p("q_A", torch.zeros(2, x.shape[-1], dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal((x * mask) @ A.T, 1.0).to_event(1))


def deterministic_model(x):
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        loc = pyro.deterministic("loc", w * z)
        _obs_normal(x, loc)
    pyro.deterministic("w_squared", w * w)


def factor_model(x):
    """pyro.factor: an extra log density term per datum."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        pyro.factor("shrink", -0.5 * (w * z) ** 2)
        _obs_normal(x, w * z)


def constrained_model(x):
    """Parameters under several constraints: lower Cholesky, positive, interval, simplex."""
    L = _p("L", torch.eye(2, dtype=x.dtype), constraint=constraints.lower_cholesky)
    sigma = _p("sigma", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    rho = _p("rho", torch.tensor(0.2, dtype=x.dtype), constraint=constraints.interval(-1.0, 1.0))
    mix = _p("mix", torch.tensor([0.5, 0.5], dtype=x.dtype), constraint=constraints.simplex)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), sigma).to_event(1))
        loc = torch.stack([z[..., 0], rho * z[..., 0] + z[..., 1]], -1) * mix
        pyro.sample("x", dist.MultivariateNormal(loc, scale_tril=L), obs=x)


class NNModel(nn.Module):
    """A small VAE decoder, registered with pyro.module; Bernoulli pixels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.decoder = nn.Linear(2, 4)

    def forward(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class NNGuide(nn.Module):
    """Its encoder."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Linear(4, 4)

    def forward(self, x):
        pyro.module("encoder", self.encoder)
        loc, log_scale = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


# --- models written for one particle at a time ----------------------------------------------


def one_at_a_time_model(x):
    """Explicit batch shapes on the latents (view(n, -1), cat(dim=1)): one particle at a time only."""
    n = x.shape[0]
    W = _p("W", 0.1 * torch.ones(6, x.shape[1], dtype=x.dtype))
    with pyro.plate("data", n):
        Z = pyro.sample("Z", dist.Normal(torch.zeros(2, 2, dtype=x.dtype), 1.0).to_event(2))
        h = torch.cat([Z.view(n, -1), Z[:, 0, :].pow(2)], dim=1)  # (n, 6)
        _obs_normal(x, h @ W, event=1)


def one_at_a_time_guide(x):
    n = x.shape[0]
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    with pyro.plate("data", n):
        loc = (a * x[:, :2]).unsqueeze(-1).expand(n, 2, 2)
        pyro.sample("Z", dist.Normal(loc, 1.0).to_event(2))


def control_flow_model(x):
    """Python control flow on a latent's value: one particle at a time only."""
    s = _p("s", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
    if z > 0:
        loc = s * z
    else:
        loc = -z / s
    _obs_normal(x, loc.expand(x.shape), event=1)


def control_flow_guide(x):
    m = _p("q_m", torch.tensor(0.0, dtype=x.dtype))
    pyro.sample("z", dist.Normal(m, 1.0))


# --- invalid programs -----------------------------------------------------------------------


def wide_guide(x):
    """z has 3 components where the model's has 2."""
    with pyro.plate("data", x.shape[0]):
        loc = _p("q_loc", torch.zeros(x.shape[0], 3, dtype=x.dtype))
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def event_dim_guide(x):
    """z of shape (2, 1) with two event dims where the model's is (2,) with one."""
    loc = _p("q_loc", torch.zeros(x.shape[0], 2, 1, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(2))


def undeclared_left_model(x):
    """z has a batch dim of 5 left of every plate, declared by none."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(5, 1, x.shape[0], dtype=x.dtype), 1.0))
        _obs_normal(x, w * z.mean(0))


def undeclared_left_guide(x):
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal((a * x).expand(5, 1, x.shape[0]), 1.0))


def undeclared_two_model(x):
    """z has an undeclared batch dim of size 2 next to the data plate (sized like VAELoss(2)'s particles)."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, x.shape[0], dtype=x.dtype), 1.0))
        _obs_normal(x, w * z.sum(-2))


def undeclared_two_guide(x):
    a = _p("q_a", torch.tensor(0.1, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal((a * x).expand(2, x.shape[0]), 1.0))


def no_sample_model(x):
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    return w * x


def no_sample_guide(x):
    _p("q_a", torch.tensor(0.1, dtype=x.dtype))


def exponential_model(x):
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Exponential(torch.ones((), dtype=x.dtype)))
        _obs_normal(x, w * z)


def negative_guide(x):
    """Proposes z around -3, where the model's Exponential has no density."""
    m = _p("q_m", torch.tensor(-3.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(m, 0.1).expand([x.shape[0]]))


def mask_blind_guide(x, mask):
    """An observe_masked guide that does not read the mask."""
    A = _p("q_A", torch.zeros(2, x.shape[-1], dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ A.T, 1.0).to_event(1))


def summed_vector_model(x):
    """z in R^2 per datum, used only through its sum (so a wrong shape reaches the sample site only)."""
    w = _p("w", torch.tensor(1.0, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        _obs_normal(x, w * z.sum(-1))


X_NAN = X1.clone()
X_NAN[1] = float("nan")
X4_MASK = X4_64.clone()
BAD_MASK = torch.ones(N, 5, dtype=torch.bool)  # x has 4 entries per datum

# ---------------------------------------------------------------------------------------
# the catalogue

_per_datum_autoguide_warning = _names_all("AutoNormal", "'(z|r|_Auto\\w+_latent)'")

CATALOGUE = [
    # --- one latent, several latents, event dims
    Pattern("normal_latent", normal_model, normal_guide, (X1,), methods=ALL_METHODS, datums=N,
            note="one Normal latent per datum, float32"),
    Pattern("normal_latent_float64", normal_model, normal_guide, (X1_64,), datums=N),
    Pattern("latent_chain", chain_model, chain_guide, (X1_64,), note="z1 -> z2 -> x"),
    Pattern("positive_latent_lognormal_guide", gamma_poisson_model, gamma_poisson_guide, (COUNTS,),
            note="Gamma latent, LogNormal guide, Poisson likelihood"),
    Pattern("vector_latent_to_event", vector_model, vector_guide, (X4_64,), methods=ALL_METHODS),
    Pattern("matrix_latent_to_event2", matrix_model, matrix_guide, (X2_64,)),
    Pattern("mvn_latent", mvn_model, mvn_guide, (X2_64,)),
    # --- plates
    Pattern("nested_plates", nested_model, nested_guide, (X4_64,), datums=N),
    Pattern("nested_plates_default_dims", nested_auto_dims_model, nested_auto_dims_guide, (X4_64.T.contiguous(),),
            datums=N),
    Pattern("plate_stack", plate_stack_model, plate_stack_guide, (X2_64,)),
    Pattern("sequential_plate_in_data_plate", sequential_inner_model, sequential_inner_guide, (X2_64,), datums=N),
    Pattern("sequential_data_plate", sequential_data_model, sequential_data_guide, (X1_64,), datums=1,
            note="no vectorised plate: one datum"),
    Pattern("plate_reused", plate_reuse_model, normal_guide, (X1_64,), datums=N),
    Pattern("subsample_indices", subsample_model, subsample_index_guide, (X6,), datums=3),
    Pattern("subsample_param_event_dim", subsample_model, subsample_param_guide, (X6,), datums=3),
    Pattern("sizeless_plate", sizeless_model, sizeless_guide, (X1_64,), datums=N),
    # --- scale and mask
    Pattern("poutine_scale", scaled_obs_model, normal_guide, (X1_64,)),
    Pattern("poutine_scale_per_datum", scaled_per_datum_model, normal_guide, (X1_64,)),
    Pattern("poutine_mask", poutine_mask_model, normal_guide, (X1,)),
    Pattern("poutine_mask_false", mask_false_model, normal_guide, (X1_64,)),
    Pattern("distribution_mask", dist_mask_model, dist_mask_guide, (X1,)),
    # --- discrete and non-reparameterised guide sites
    Pattern("discrete_bernoulli_guide", bernoulli_model, bernoulli_guide, (X1,)),
    Pattern("discrete_categorical_guide", categorical_model, categorical_guide, (X1,)),
    Pattern("discrete_onehot_guide", onehot_model, onehot_guide, (X1,)),
    Pattern("discrete_poisson_guide", poisson_model, poisson_guide, (X1,)),
    Pattern("mixed_reparam_and_discrete_guide", mixed_model, mixed_guide, (X1,)),
    Pattern("non_reparameterised_normal_guide", normal_model, unreparam_guide, (X1_64,)),
    # --- enumeration in the model
    Pattern("enumerated_model_latent", enum_explicit_model, normal_guide, (X1,), datums=N,
            note="Bernoulli marked enumerate=parallel, summed out; the guide proposes z"),
    Pattern("enumerated_mixture_empty_guide", enum_gmm_model, empty_guide, (X1,), datums=N,
            note="config_enumerate; no guide sites at all"),
    Pattern("enumerate_sequential_in_model", enum_sequential_model, empty_guide, (X1,), warns="'c'.*sequential",
            note="model-side sequential enumeration is not supported: warned, and c is sampled from the model"),
    # --- latents the guide leaves out, auxiliary sites, shared parameters
    Pattern("model_latent_omitted_by_guide", omitted_latent_model, normal_guide, (X1_64,),
            warns={"iwae": "'w'", "vae": "'w'", "stl": "'w'", "dreg": "'w'"},
            note="w proposed from the model's prior"),
    Pattern("discrete_model_latent_omitted_by_guide", mixed_model, z_only_guide, (X1,),
            warns={"iwae": "'b'", "vae": "'b'"}, note="b ~ Bernoulli proposed from the prior: score-function term"),
    Pattern("auxiliary_guide_site", normal_model, auxiliary_guide, (X1_64,)),
    Pattern("guide_reads_model_param", normal_model, shared_param_guide, (X1_64,)),
    # --- global latents and no data plate
    # globals are drawn once and the weights stay per datum given them (issue 20): N data, no coupling warning
    Pattern("global_latent_outside_data_plate", global_model, global_guide, (X1_64,), datums=N),
    Pattern("global_latent_dirichlet_obs", dirichlet_model, dirichlet_guide, (SIMPLEX,),
            warns="every latent of the model is global.*'c'", datums=N),
    Pattern("no_data_plate", no_plate_model, no_plate_guide, (X2_64[0],), datums=1),
    Pattern("no_plate_scalar", scalar_model, scalar_guide, (X1_64[0],), datums=1),
    # --- autoguides
    Pattern("autoguide_normal", two_latent_model, _auto(AutoNormal, two_latent_model), (X2_64,), datums=N),
    Pattern("autoguide_delta", two_latent_model, _auto(AutoDelta, two_latent_model), (X2_64,)),
    Pattern("autoguide_list_of_autonormals", two_latent_model, _auto(_autoguide_list, two_latent_model), (X2_64,)),
    Pattern("autoguide_diagonal_normal_per_datum", two_latent_model, _auto(AutoDiagonalNormal, two_latent_model),
            (X2_64,), warns=_per_datum_autoguide_warning, datums=1),
    Pattern("autoguide_mvn_per_datum", two_latent_model, _auto(AutoMultivariateNormal, two_latent_model),
            (X2_64,), warns=_per_datum_autoguide_warning, datums=1),
    Pattern("autoguide_lowrank_per_datum", two_latent_model, _auto(AutoLowRankMultivariateNormal, two_latent_model),
            (X2_64,), warns=_per_datum_autoguide_warning, datums=1),
    Pattern("autoguide_diagonal_normal_no_plate", no_plate_model, _auto(AutoDiagonalNormal, no_plate_model),
            (X2_64[0],), datums=1),
    Pattern("autoguide_mvn_no_plate", no_plate_model, _auto(AutoMultivariateNormal, no_plate_model), (X2_64[0],)),
    # --- missing data, deterministic and factor sites, constrained parameters, nn.Module
    Pattern("obs_mask_missing_data", obs_mask_model, normal_guide, (X1_64,), datums=N),
    Pattern("obs_mask_per_entry", obs_mask_entries_model, obs_mask_entries_guide, (X4_64,), datums=N),
    Pattern("observe_masked_event_dim", observe_masked_model, observe_masked_guide, (X4_64, MASK4), datums=N),
    Pattern("deterministic_sites", deterministic_model, normal_guide, (X1_64,)),
    Pattern("factor_site", factor_model, normal_guide, (X1_64,)),
    Pattern("constrained_params", constrained_model, vector_guide, (X2_64,)),
    Pattern("nn_module", Fresh(NNModel), Fresh(NNGuide), (BINARY,), datums=N),
    # --- one particle at a time
    Pattern("one_at_a_time_view_cat", one_at_a_time_model, one_at_a_time_guide, (X2_64,), vectorize=False,
            datums=N),
    Pattern("one_at_a_time_control_flow", control_flow_model, control_flow_guide, (X2_64[0],), vectorize=False,
            datums=1),
    Pattern("normal_latent_unvectorised", normal_model, normal_guide, (X1_64,), vectorize=False, datums=N),
    # ===================================================== invalid
    Pattern("guide_site_missing_from_model", normal_model, extra_site_guide, (X1_64,), valid=False,
            error="'extra'"),
    Pattern("guide_shape_differs", vector_model, wide_guide, (X2_64,), valid=False, error="'z'"),
    Pattern("guide_shape_differs_value_summed", summed_vector_model, wide_guide, (X1_64,), valid=False,
            error="'z'", note="the model reads z only through z.sum(-1): only the sample site sees the shape"),
    Pattern("guide_event_dims_differ", vector_model, event_dim_guide, (X2_64,), valid=False, error="'z'"),
    Pattern("undeclared_batch_dim_left", undeclared_left_model, undeclared_left_guide, (X1_64,), valid=False,
            error=_names_all("'z'", "(plate|batch)")),
    Pattern("undeclared_batch_dim_of_two", undeclared_two_model, undeclared_two_guide, (X1_64,), valid=False,
            error=_names_all("'z'", "(plate|batch)")),
    Pattern("undeclared_batch_dim_unvectorised", undeclared_two_model, undeclared_two_guide, (X1_64,), valid=False,
            vectorize=False, error=_names_all("'z'", "(plate|batch)")),
    Pattern("nan_in_observed_data", normal_model, normal_guide, (X_NAN,), valid=False, error="nan"),
    Pattern("model_without_sample_sites", no_sample_model, no_sample_guide, (X1_64,), valid=False,
            error="sample site"),
    Pattern("observe_masked_wrong_mask_shape", observe_masked_model, mask_blind_guide, (X4_MASK, BAD_MASK),
            valid=False, error=_names_all("mask", "'x'")),
    Pattern("obs_mask_over_event_dims", obs_mask_event_error_model, vector_guide, (X2_64,), valid=False,
            error="obs_mask"),
    Pattern("model_latent_cannot_be_proposed", improper_omitted_model, normal_guide, (X1_64,), valid=False,
            error="'w'"),
    Pattern("guide_outside_model_support", exponential_model, negative_guide, (X1_64,), valid=False,
            error="(support|-inf)"),
    Pattern("stl_dreg_discrete_guide", bernoulli_model, bernoulli_guide, (X1,), valid=False,
            methods=("stl", "dreg"), error=_names_all("'b'", "reparameteri[sz]")),
    Pattern("stl_dreg_non_reparameterised_normal", normal_model, unreparam_guide, (X1_64,), valid=False,
            methods=("stl", "dreg"), error=_names_all("'z'", "reparameteri[sz]")),
    Pattern("stl_dreg_discrete_model_latent_omitted", mixed_model, z_only_guide, (X1,), valid=False,
            methods=("stl", "dreg"), error=_names_all("'b'", "reparameteri[sz]")),
    Pattern("vectorised_one_at_a_time_view_cat", one_at_a_time_model, one_at_a_time_guide, (X2_64,), valid=False,
            error="vectorize_particles=False",
            error_types=(ValueError, NotImplementedError, TypeError, RuntimeError)),
    Pattern("vectorised_one_at_a_time_control_flow", control_flow_model, control_flow_guide, (X2_64[0],),
            valid=False, error="vectorize_particles=False",
            error_types=(ValueError, NotImplementedError, TypeError, RuntimeError)),
]

_names = [p.name for p in CATALOGUE]
assert len(_names) == len(set(_names)), "pattern names must be unique"
