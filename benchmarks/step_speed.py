"""Per-step wall time of pyro_iwem.IWEM against plain-PyTorch implementations of the same step.

Every implementation trains its own deep copy of the same initial weights (the paper's MLP:
784-300-300-tanh encoder -> 40-d Gaussian, 40-300-300-tanh decoder -> 784 Bernoulli logits,
N(0, I) prior) with Adam (lr 5e-4) on the same batch, in one process. After a warm-up, the
implementations are timed interleaved: each repetition runs one step of every implementation
in turn (round robin), so a slow phase of the machine hits all of them alike. Peak memory is
measured per implementation in a separate subprocess.

Before timing, the plain implementations are checked against pyro_iwem (see ``check_correctness``).

Run ``python benchmarks/step_speed.py --help``; ``benchmarks/README.md`` explains the output.
More methods are added as entries of ``METHODS`` (name -> :class:`Method`) and, for derived
numbers, of ``RATIOS``.
"""

import argparse
import copy
import cProfile
import gzip
import io
import itertools
import json
import math
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

import pyro_iwem
import pyro_iwem.models
from pyro_iwem.infer import objectives
from pyro_iwem.infer.traces import ParticleSampler

LOG_2PI = math.log(2 * math.pi)
MNIST_TRAIN = Path("/work/shared/data/binarized_mnist/binarized_mnist_train.amat.gz")
X_DIM, H_DIM, Z_DIM = 784, 300, 40
# Pyro's param store is global: every Pyro copy of the networks gets its own names, or a later
# pyro.module would return (and the optimiser would step) the parameters of an earlier copy.
_PYRO_COPIES = itertools.count()


# --------------------------------------------------------------------------------------
# The model: the paper's MLP, shared by every implementation
# --------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """q(z | x): 784-300-300 tanh, then loc and softplus(.) + 1e-4 scale of a 40-d Gaussian."""

    def __init__(self, x_dim=X_DIM, h_dim=H_DIM, z_dim=Z_DIM):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(x_dim, h_dim), nn.Tanh(), nn.Linear(h_dim, h_dim), nn.Tanh())
        self.loc = nn.Linear(h_dim, z_dim)
        self.scale = nn.Linear(h_dim, z_dim)

    def forward(self, x):
        h = self.body(x)
        return self.loc(h), F.softplus(self.scale(h)) + 1e-4


class Decoder(nn.Module):
    """p(x | z): 40-300-300 tanh -> 784 Bernoulli logits."""

    def __init__(self, x_dim=X_DIM, h_dim=H_DIM, z_dim=Z_DIM):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(z_dim, h_dim), nn.Tanh(), nn.Linear(h_dim, h_dim), nn.Tanh(), nn.Linear(h_dim, x_dim)
        )

    def forward(self, z):
        return self.net(z)


def normal_log_prob(z, loc, scale):
    """Full normalised Normal log density, summed over the last (event) dim."""
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)


def log_joint(decoder, x, z):
    """log p(x, z) = log N(z; 0, I) + log Bernoulli(x; logits = decoder(z)), shape z.shape[:-1]."""
    logits = decoder(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    return (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1) + log_px


def log_joint_tdist(decoder, x, z):
    """log p(x, z) through torch.distributions, as a Pyro model computes it (Bernoulli.log_prob
    negates the full (N, B, 784) tensor before the event sum; validate_args=False)."""
    prior = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z), validate_args=False)
    lik = torch.distributions.Bernoulli(logits=decoder(z), validate_args=False)
    return prior.log_prob(z).sum(-1) + lik.log_prob(x).sum(-1)


def draw(loc, scale, n):
    """n reparameterised draws (n, B, D); consumes the RNG exactly as Pyro's vectorised rsample."""
    return loc + scale * torch.randn((n,) + loc.shape, dtype=loc.dtype, device=loc.device)


def pyro_model_and_guide(encoder, decoder, prefix):
    """The same networks as a Pyro model and guide (unique param-store names per copy)."""

    def model(x):
        pyro.module(prefix + "decoder", decoder)
        with pyro.plate("data", x.shape[0], dim=-1):
            zeros = x.new_zeros(x.shape[0], Z_DIM)
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module(prefix + "encoder", encoder)
        with pyro.plate("data", x.shape[0], dim=-1):
            loc, scale = encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


# --------------------------------------------------------------------------------------
# The implementations: factories ctx -> step() (one training step on ctx.x)
# --------------------------------------------------------------------------------------


@dataclass
class Context:
    """What a step factory needs; every factory deep-copies ``encoder`` and ``decoder``."""

    x: torch.Tensor
    encoder: Encoder
    decoder: Decoder
    K: int = 50
    J: int = 50
    L: int = 1
    lr: float = 5e-4

    def fresh(self):
        return copy.deepcopy(self.encoder), copy.deepcopy(self.decoder)


@dataclass
class Method:
    """An entry of :data:`METHODS`.

    ``factory(ctx)`` builds one implementation on fresh copies of the context's networks
    (``ctx.fresh()``) and returns ``(step, modules)``: ``step()`` runs one training step on
    ``ctx.x`` and returns a float (the loss; calling ``.item()`` also synchronises), and
    ``modules`` are the networks it trains (timing checks that all their weights changed).
    ``default=False`` entries run only when named in ``--methods``.
    """

    factory: Callable
    description: str
    default: bool = True


def make_pyro_iwem(alpha, one_pass=False):
    def factory(ctx):
        encoder, decoder = ctx.fresh()
        model, guide = pyro_model_and_guide(encoder, decoder, f"copy{next(_PYRO_COPIES)}_")
        annealing = None if alpha >= 1.0 else pyro_iwem.Annealing(start=alpha, stop=alpha)
        iwem = pyro_iwem.IWEM(
            model, guide, K=ctx.K, J=ctx.J, L=ctx.L, optim=pyro.optim.Adam({"lr": ctx.lr}), annealing=annealing,
            max_plate_nesting=1,  # given, so no guessing run draws from the RNG (the end-to-end check needs this)
            one_pass=one_pass,
        )
        x = ctx.x
        return (lambda: iwem.step(x)), (encoder, decoder)

    return factory


def make_pyro_method(name):
    """Any method of ``pyro_iwem.build_method`` on the Pyro model/guide (for the per-method table)."""

    def factory(ctx):
        encoder, decoder = ctx.fresh()
        model, guide = pyro_model_and_guide(encoder, decoder, f"copy{next(_PYRO_COPIES)}_")
        method = pyro_iwem.build_method(
            name, model, guide, K=ctx.K, J=ctx.J, L=ctx.L, optim=pyro.optim.Adam({"lr": ctx.lr}),
            max_plate_nesting=1,
        )
        x = ctx.x
        return (lambda: method.step(x)), (encoder, decoder)

    return factory


def plain_e_loss(decoder, x, z, log_q, alpha, z_elbo=None):
    """-Q̂_α on given samples: detached snIS weights on z, ELBO term on z_elbo (eqs. 2, 8)."""
    log_p = log_joint(decoder, x, z)
    weights = torch.softmax((log_p - log_q).detach(), dim=0)
    loss = -alpha * (weights * log_p).sum()
    if z_elbo is not None:
        loss = loss - (1.0 - alpha) * log_joint(decoder, x, z_elbo).mean(0).sum()
    return loss


def plain_p_loss(decoder, x, z, log_q, joint=log_joint):
    """-L_opt (eq. 7): -(logsumexp_j(log|log p| + log p - log q) - log J), summed over data."""
    log_p = joint(decoder, x, z)
    return -(torch.logsumexp(log_p.abs().log() + log_p - log_q, dim=0) - math.log(z.shape[0])).sum()


def make_plain_iwem(alpha):
    """The straightforward plain-PyTorch IWEM step: .backward() on everything, separate ELBO pass."""

    def factory(ctx):
        encoder, decoder = ctx.fresh()
        opt_dec = torch.optim.Adam(decoder.parameters(), lr=ctx.lr)
        opt_enc = torch.optim.Adam(encoder.parameters(), lr=ctx.lr)
        x, K, J, L = ctx.x, ctx.K, ctx.J, ctx.L

        def step():
            # E-step + M-step
            loc, scale = encoder(x)
            z = draw(loc, scale, K).detach()
            log_q = normal_log_prob(z, loc, scale)
            z_elbo = draw(loc, scale, L).detach() if alpha < 1.0 else None
            loss = plain_e_loss(decoder, x, z, log_q, alpha, z_elbo)
            loss.backward()
            opt_dec.step()
            # P-step (its decoder gradients are computed and thrown away)
            loc, scale = encoder(x)
            z = draw(loc, scale, J)
            p_loss = plain_p_loss(decoder, x, z, normal_log_prob(z, loc, scale))
            p_loss.backward()
            opt_enc.step()
            opt_dec.zero_grad()
            opt_enc.zero_grad()
            return loss.item()

        return step, (encoder, decoder)

    return factory


def _set_grads(params, loss):
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        p.grad = g


def make_smart_iwem(alpha, joint=log_joint):
    """The lean plain-PyTorch IWEM step: θ-only and φ-only autograd.grad, one decoder pass for K+L."""

    def factory(ctx):
        encoder, decoder = ctx.fresh()
        theta, phi = list(decoder.parameters()), list(encoder.parameters())
        opt_dec = torch.optim.Adam(theta, lr=ctx.lr)
        opt_enc = torch.optim.Adam(phi, lr=ctx.lr)
        x, K, J = ctx.x, ctx.K, ctx.J
        L = ctx.L if alpha < 1.0 else 0

        def step():
            with torch.no_grad():
                loc, scale = encoder(x)
                z = draw(loc, scale, K + L)
                log_q = normal_log_prob(z[:K], loc, scale)
            log_p = joint(decoder, x, z)
            weights = torch.softmax(log_p[:K].detach() - log_q, dim=0)
            q_hat = (weights * log_p[:K]).sum(0)
            if L:
                q_hat = alpha * q_hat + (1.0 - alpha) * log_p[K:].mean(0)
            loss = -q_hat.sum()
            _set_grads(theta, loss)
            opt_dec.step()
            opt_dec.zero_grad()

            loc, scale = encoder(x)
            z = draw(loc, scale, J)
            _set_grads(phi, plain_p_loss(decoder, x, z, normal_log_prob(z, loc, scale), joint))
            opt_enc.step()
            opt_enc.zero_grad()
            return loss.item()

        return step, (encoder, decoder)

    return factory


def make_plain_iwae(ctx):
    """Plain-PyTorch IWAE (K = ctx.K): one forward, -Σ_i logmeanexp_k log w, backward, one Adam step."""
    encoder, decoder = ctx.fresh()
    opt = torch.optim.Adam(itertools.chain(encoder.parameters(), decoder.parameters()), lr=ctx.lr)
    x, K = ctx.x, ctx.K

    def step():
        loc, scale = encoder(x)
        z = draw(loc, scale, K)
        log_w = log_joint(decoder, x, z) - normal_log_prob(z, loc, scale)
        loss = -(torch.logsumexp(log_w, dim=0) - math.log(K)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    return step, (encoder, decoder)


# --------------------------------------------------------------------------------------
# A discrete-latent model: the same MLPs with 40 Bernoulli latents (a binary-code VAE)
# --------------------------------------------------------------------------------------


class BernoulliEncoder(nn.Module):
    """q(z | x): 784-300-300 tanh -> 40 Bernoulli logits (not reparameterisable)."""

    def __init__(self, x_dim=X_DIM, h_dim=H_DIM, z_dim=Z_DIM):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(x_dim, h_dim), nn.Tanh(), nn.Linear(h_dim, h_dim), nn.Tanh(), nn.Linear(h_dim, z_dim)
        )

    def forward(self, x):
        return self.net(x)


def discrete_fresh(ctx):
    """Fresh copies of a Bernoulli encoder and a decoder, the same for every implementation."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        encoder = BernoulliEncoder().to(device=ctx.x.device, dtype=ctx.x.dtype)
        decoder = Decoder().to(device=ctx.x.device, dtype=ctx.x.dtype)
    return encoder, decoder


def bernoulli_log_prob(z, logits):
    return -F.binary_cross_entropy_with_logits(logits.expand_as(z), z, reduction="none").sum(-1)


def discrete_log_joint(decoder, x, z):
    """log p(x, z) with a uniform Bernoulli(1/2) prior on the 40 bits."""
    logits = decoder(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    return z.shape[-1] * math.log(0.5) + log_px


def discrete_pyro_model_and_guide(encoder, decoder, prefix):
    def model(x):
        pyro.module(prefix + "decoder", decoder)
        with pyro.plate("data", x.shape[0], dim=-1):
            half = x.new_full((x.shape[0], Z_DIM), 0.5)
            z = pyro.sample("z", dist.Bernoulli(half).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module(prefix + "encoder", encoder)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Bernoulli(logits=encoder(x)).to_event(1))

    return model, guide


def make_pyro_discrete(name):
    def factory(ctx):
        encoder, decoder = discrete_fresh(ctx)
        model, guide = discrete_pyro_model_and_guide(encoder, decoder, f"copy{next(_PYRO_COPIES)}_")
        method = pyro_iwem.build_method(
            name, model, guide, K=ctx.K, J=ctx.J, optim=pyro.optim.Adam({"lr": ctx.lr}), max_plate_nesting=1
        )
        x = ctx.x
        return (lambda: method.step(x)), (encoder, decoder)

    return factory


def vimco_surrogate(ell, log_q):
    """log-mean-exp of ell plus VIMCO's zero-valued score term Σ_n (F - F_-n) (log q_n - ⌊log q_n⌋)."""
    n = ell.shape[0]
    value = torch.logsumexp(ell, 0) - math.log(n)
    e = ell.detach()
    others = (e.sum(0, keepdim=True) - e) / (n - 1)
    replaced = torch.where(torch.eye(n, dtype=torch.bool, device=e.device)[..., None], others[:, None], e[None])
    signal = (torch.logsumexp(e, 0) - math.log(n)) - (torch.logsumexp(replaced, 1) - math.log(n))
    return value + (signal * (log_q - log_q.detach())).sum(0)


def make_plain_discrete_iwem(ctx):
    """Plain-PyTorch IWEM (α = 1) on the Bernoulli-latent model: detached snIS M-step, then a
    VIMCO P-step on eq. (7) at θ_{t+1}; θ-only and φ-only autograd.grad."""
    encoder, decoder = discrete_fresh(ctx)
    theta, phi = list(decoder.parameters()), list(encoder.parameters())
    opt_dec, opt_enc = torch.optim.Adam(theta, lr=ctx.lr), torch.optim.Adam(phi, lr=ctx.lr)
    x, K, J = ctx.x, ctx.K, ctx.J

    def step():
        with torch.no_grad():
            logits = encoder(x)
            z = torch.bernoulli(torch.sigmoid(logits).expand((K,) + logits.shape))
            log_q = bernoulli_log_prob(z, logits)
        log_p = discrete_log_joint(decoder, x, z)
        loss = -(torch.softmax(log_p.detach() - log_q, 0) * log_p).sum()
        _set_grads(theta, loss)
        opt_dec.step()
        opt_dec.zero_grad()
        logits = encoder(x)
        z = torch.bernoulli(torch.sigmoid(logits.detach()).expand((J,) + logits.shape))
        log_q = bernoulli_log_prob(z, logits)
        log_p = discrete_log_joint(decoder, x, z)
        _set_grads(phi, -vimco_surrogate(log_p.abs().log() + log_p - log_q, log_q).sum())
        opt_enc.step()
        opt_enc.zero_grad()
        return loss.item()

    return step, (encoder, decoder)


def make_plain_discrete_iwae(ctx):
    """Plain-PyTorch VIMCO-IWAE on the Bernoulli-latent model: one pass, one backward, one Adam."""
    encoder, decoder = discrete_fresh(ctx)
    opt = torch.optim.Adam(itertools.chain(encoder.parameters(), decoder.parameters()), lr=ctx.lr)
    x, K = ctx.x, ctx.K

    def step():
        logits = encoder(x)
        z = torch.bernoulli(torch.sigmoid(logits.detach()).expand((K,) + logits.shape))
        log_q = bernoulli_log_prob(z, logits)
        loss = -vimco_surrogate(discrete_log_joint(decoder, x, z) - log_q, log_q).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    return step, (encoder, decoder)


METHODS = {
    "pyro_iwem_a05": Method(make_pyro_iwem(0.5), "pyro_iwem.IWEM step, alpha = 0.5 (K snIS + L ELBO particles)"),
    "pyro_iwem_a1": Method(make_pyro_iwem(1.0), "pyro_iwem.IWEM step, alpha = 1 (annealing=None)"),
    "pyro_iwem_1pass_a05": Method(make_pyro_iwem(0.5, one_pass=True), "pyro_iwem.IWEM(one_pass=True), alpha = 0.5"),
    "pyro_iwem_1pass_a1": Method(make_pyro_iwem(1.0, one_pass=True), "pyro_iwem.IWEM(one_pass=True), alpha = 1"),
    "plain_iwem_a05": Method(make_plain_iwem(0.5), "straightforward plain IWEM, alpha = 0.5"),
    "plain_iwem_a1": Method(make_plain_iwem(1.0), "straightforward plain IWEM, alpha = 1"),
    "smart_iwem_a05": Method(make_smart_iwem(0.5), "smart plain IWEM (theta/phi-only grads), alpha = 0.5"),
    "smart_iwem_a1": Method(make_smart_iwem(1.0), "smart plain IWEM (theta/phi-only grads), alpha = 1"),
    "smart_iwem_a05_tdist": Method(
        make_smart_iwem(0.5, log_joint_tdist),
        "smart_iwem_a05 with log p via torch.distributions (as Pyro computes it)", default=False,
    ),
    "plain_iwae": Method(make_plain_iwae, "plain IWAE, K particles, one Adam step on all params"),
}
# --------------------------------------------------------------------------------------
# Evaluation: the K = 5000 IWAE bound of one batch, pyro_iwem.iwae_bound against plain chunks
# --------------------------------------------------------------------------------------

#: particles of the bound per model: the paper's K = 5000 for the MLP; the CNN costs ~4 ms per
#: image and particle on a 2-core CPU, so it is timed with K = 100 (chunks of 50 for plain)
EVAL_K = {"mlp": 5000, "cnn": 100}
PLAIN_EVAL_CHUNK = {"mlp": 500, "cnn": 50}


def plain_bound(vae, x, K, chunk):
    """Plain-PyTorch chunked IWAE bound of a pyro_iwem.models VAE (N(0, I) prior, Gaussian
    proposal, Bernoulli decoder): float64 running logsumexp over chunks of ``chunk`` particles."""
    total = None
    with torch.no_grad():
        loc, scale = vae.encode(x)
        for start in range(0, K, chunk):
            n = min(chunk, K - start)
            z = draw(loc, scale, n)
            logits = vae.decode(z)
            log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
            log_w = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1) + log_px - normal_log_prob(z, loc, scale)
            part = torch.logsumexp(log_w.double(), 0)
            total = part if total is None else torch.logaddexp(total, part)
    return total - math.log(K)


def make_bound(name, plain):
    def factory(ctx):
        with torch.random.fork_rng():
            torch.manual_seed(2)
            vae = pyro_iwem.models.build_model(name).to(device=ctx.x.device, dtype=ctx.x.dtype)
        vae.eval()
        x = ctx.x
        K = EVAL_K[name]
        if plain:
            return (lambda: plain_bound(vae, x, K, PLAIN_EVAL_CHUNK[name]).sum().item()), ()
        return (lambda: pyro_iwem.iwae_bound(vae.model, vae.guide, x, num_particles=K).sum().item()), ()

    return factory


EVALUATION = {
    f"{impl}_bound_{name}": Method(
        make_bound(name, impl == "plain"),
        f"{f'plain chunks of {PLAIN_EVAL_CHUNK[name]}' if impl == 'plain' else 'pyro_iwem.iwae_bound, chunk from a 1 GiB budget'}, "
        f"K = {EVAL_K[name]}, {name}",
        default=False,
    )
    for name in ("mlp", "cnn")
    for impl in ("pyro", "plain")
}
METHODS.update(EVALUATION)

DISCRETE = {
    "pyro_iwem_discrete": Method(make_pyro_discrete("iwem-woa"), "pyro_iwem IWEM (alpha = 1), 40 Bernoulli latents"),
    "plain_iwem_discrete": Method(make_plain_discrete_iwem, "plain IWEM with a VIMCO P-step, 40 Bernoulli latents"),
    "pyro_iwae_discrete": Method(make_pyro_discrete("iwae"), "pyro_iwem IWAELoss (VIMCO), 40 Bernoulli latents"),
    "plain_iwae_discrete": Method(make_plain_discrete_iwae, "plain VIMCO-IWAE, 40 Bernoulli latents"),
}
METHODS.update({name: Method(m.factory, m.description, default=False) for name, m in DISCRETE.items()})
# every method of the package, each timed against plain IWAE (run with --methods baselines)
BASELINES = ["vae", "iwae", "stl", "dreg", "iwae-em", "iwem-woo", "iwem-woa", "iwem"]
for _name in BASELINES:
    METHODS[f"pyro_{_name}"] = Method(
        make_pyro_method(_name), f"pyro_iwem build_method({_name!r}), K = J = 50 (iwem: alpha < 1)", default=False
    )

# (numerator, denominator, target ratio or None)
RATIOS = [
    ("pyro_iwem_a05", "plain_iwem_a05", 0.95),
    ("pyro_iwem_a1", "plain_iwem_a1", 0.95),
    ("pyro_iwem_a05", "plain_iwae", 1.7),
    ("pyro_iwem_a1", "plain_iwae", 1.7),
    ("pyro_iwem_1pass_a05", "plain_iwae", 1.2),
    ("pyro_iwem_1pass_a1", "plain_iwae", 1.2),
    ("pyro_iwem_a05", "smart_iwem_a05", None),
    ("pyro_iwem_a1", "smart_iwem_a1", None),
    ("pyro_iwem_a05", "smart_iwem_a05_tdist", None),
    ("smart_iwem_a05_tdist", "smart_iwem_a05", None),
    ("smart_iwem_a05", "plain_iwae", None),
    ("smart_iwem_a1", "plain_iwae", None),
    ("plain_iwem_a05", "plain_iwae", None),
    ("plain_iwem_a1", "plain_iwae", None),
] + [(f"pyro_{name}", "plain_iwae", 1.15 if name == "dreg" else None) for name in BASELINES] + [
    ("pyro_iwem_discrete", "plain_iwem_discrete", None),
    ("pyro_iwae_discrete", "plain_iwae_discrete", None),
    ("pyro_iwem_discrete", "plain_iwae_discrete", None),
    ("pyro_bound_mlp", "plain_bound_mlp", 1.05),
    ("pyro_bound_cnn", "plain_bound_cnn", 1.05),
]


# --------------------------------------------------------------------------------------
# Data and setup
# --------------------------------------------------------------------------------------


def load_batch(batch_size, device, dtype=torch.float32, seed=0):
    """The first ``batch_size`` images of static binarised MNIST, else Bernoulli(0.13) pixels."""
    if MNIST_TRAIN.exists():
        rows = []
        with gzip.open(MNIST_TRAIN, "rt") as f:
            for line in f:
                rows.append([float(v) for v in line.split()])
                if len(rows) == batch_size:
                    break
        if len(rows) == batch_size:
            return torch.tensor(rows, dtype=dtype, device=device), f"static binarized MNIST ({MNIST_TRAIN})"
    g = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((batch_size, X_DIM), 0.13), generator=g)
    return x.to(device=device, dtype=dtype), "random Bernoulli(0.13) pixels"


def make_context(args, dtype=torch.float32, seed=0):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    x, source = load_batch(args.batch_size, args.device, dtype)
    encoder = Encoder().to(device=args.device, dtype=dtype)
    decoder = Decoder().to(device=args.device, dtype=dtype)
    return Context(x, encoder, decoder, K=args.K, J=args.J, L=1), source


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------
# Correctness checks
# --------------------------------------------------------------------------------------


def _close(a, b, what, rtol, atol):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    err = (a - b).abs().max().item()
    ok = torch.allclose(a, b, rtol=rtol, atol=atol)
    print(f"  [{'ok' if ok else 'FAIL'}] {what}: max |diff| = {err:.3g}")
    if not ok:
        raise AssertionError(f"correctness check failed: {what} (max |diff| {err:.3g})")


def _grads(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])


def check_correctness(args):
    """Checks the plain code and its agreement with pyro_iwem, in float64 on one batch.

    1. Proposition 1: on the same detached samples, ∇θ of the plain Q̂ equals ∇θ of the plain
       IWAE bound.
    2. Shared samples: pyro_iwem's ParticleSampler draws K+L particles from the Pyro guide;
       on those very z the plain log p, log q, Q̂_α (eq. 8), L_opt (eq. 7) and their θ- and
       φ-gradients equal pyro_iwem's (objectives.snis_objective / optimal_proposal_objective).
    3. End to end: from identical weights and the same RNG seed, two steps of each plain IWEM
       variant leave the same parameters as two steps of pyro_iwem.IWEM (Adam, float64).
    """
    print("correctness checks (float64, one batch):")
    ctx, _ = make_context(args, dtype=torch.float64, seed=1)
    x, K, L, J = ctx.x, ctx.K, ctx.L, ctx.J
    tol = {"rtol": 1e-9, "atol": 1e-9}
    encoder, decoder = ctx.fresh()
    theta, phi = list(decoder.parameters()), list(encoder.parameters())

    # 1. Proposition 1
    with torch.no_grad():
        loc, scale = encoder(x)
        z = draw(loc, scale, K)
        log_q = normal_log_prob(z, loc, scale)
    q_hat_grad = _grads(plain_e_loss(decoder, x, z, log_q, alpha=1.0), theta)
    log_w = log_joint(decoder, x, z) - log_q
    iwae_grad = _grads(-(torch.logsumexp(log_w, 0) - math.log(K)).sum(), theta)
    _close(q_hat_grad, iwae_grad, "Prop. 1: grad_theta plain Q_hat == grad_theta plain IWAE bound", **tol)

    # 2. Shared samples from pyro_iwem's sampler
    model, guide = pyro_model_and_guide(encoder, decoder, f"check{next(_PYRO_COPIES)}_")
    sampler = ParticleSampler(model, guide)
    alpha = 0.5
    particles = sampler(K + L, (x,), {}, grad_guide=False)
    z = particles.guide_trace.nodes["z"]["value"]
    loc, scale = encoder(x)
    log_q = normal_log_prob(z, loc, scale).detach()
    _close(particles.log_p, log_joint(decoder, x, z), "log p(x, z) plain vs pyro_iwem", **tol)
    _close(particles.log_q, log_q, "log q(z | x) plain vs pyro_iwem", **tol)
    pyro_e = -objectives.snis_objective(particles, K, alpha).sum()
    plain_e = plain_e_loss(decoder, x, z[:K], log_q[:K], alpha, z[K:])
    _close(pyro_e, plain_e, "E-step loss -Q_hat_alpha (alpha=0.5) plain vs pyro_iwem", **tol)
    _close(_grads(pyro_e, theta), _grads(plain_e, theta), "grad_theta of -Q_hat_alpha plain vs pyro_iwem", **tol)

    particles = sampler(J, (x,), {}, grad_guide=True)
    z = particles.guide_trace.nodes["z"]["value"]  # reparameterised: a function of phi
    pyro_p = -objectives.optimal_proposal_objective(particles).sum()
    loc, scale = encoder(x)
    plain_p = plain_p_loss(decoder, x, z, normal_log_prob(z, loc, scale))
    _close(pyro_p, plain_p, "P-step loss -L_opt plain vs pyro_iwem", **tol)
    _close(_grads(pyro_p, phi), _grads(plain_p, phi), "grad_phi of -L_opt plain vs pyro_iwem", **tol)

    # 3. End to end: same seed, same weights, two steps each
    pairs = [
        ("pyro_iwem_a1", ["plain_iwem_a1", "smart_iwem_a1"]),
        ("pyro_iwem_a05", ["smart_iwem_a05", "smart_iwem_a05_tdist", "plain_iwem_a05"]),
        ("pyro_iwem_discrete", ["plain_iwem_discrete"]),  # VIMCO P-step, Bernoulli latents
        ("pyro_iwae_discrete", ["plain_iwae_discrete"]),  # VIMCO IWAE
    ]
    for reference, others in pairs:
        finals = {}
        for name in [reference] + others:
            step, modules = METHODS[name].factory(ctx)
            torch.manual_seed(1234)
            losses = [step() for _ in range(2)]
            finals[name] = (losses, torch.cat([p.detach().flatten() for m in modules for p in m.parameters()]))
        for name in others:
            _close(
                torch.tensor(finals[name][0]), torch.tensor(finals[reference][0]),
                f"end to end: 2-step E-losses {name} vs {reference}", rtol=1e-9, atol=1e-7,
            )
            _close(finals[name][1], finals[reference][1], f"end to end: params after 2 steps {name} vs {reference}",
                   rtol=1e-7, atol=1e-9)
    print()


# --------------------------------------------------------------------------------------
# Timing, memory, profiling
# --------------------------------------------------------------------------------------


def time_methods(args, names):
    ctx, source = make_context(args)
    built = {name: METHODS[name].factory(ctx) for name in names}
    steps = {name: step for name, (step, _) in built.items()}
    initial = {name: [p.detach().clone() for m in mods for p in m.parameters()] for name, (_, mods) in built.items()}
    for name in names:  # warm-up
        for _ in range(args.warmup):
            steps[name]()
    sync(args.device)
    times = {name: [] for name in names}
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]  # alternate the order: no fixed neighbour
        for name in order:
            sync(args.device)
            t0 = time.perf_counter()
            steps[name]()
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
    for name, (_, mods) in built.items():  # every implementation must have trained all its weights
        stale = [i for i, (p0, p) in enumerate(zip(initial[name], (p for m in mods for p in m.parameters())))
                 if torch.equal(p0, p.detach())]
        if stale:
            raise RuntimeError(f"{name}: {len(stale)} parameter tensors never changed during timing")
    return times, source


def peak_rss_bytes():
    """Peak resident set size of this process image: VmHWM (per address space, so a child does
    not inherit its parent's peak across fork/exec as ru_maxrss does), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_tensor_bytes_cpu(step):
    """Peak bytes of CPU tensors allocated and still alive at any moment of one ``step()``, from
    torch.profiler's allocation records (independent of the malloc's caching, unlike RSS)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def memory_child(args, name):
    """Runs in a subprocess: the peak memory of ``args.warmup + 3`` steps of one implementation.

    CPU: ``rss_mb``, the rise of the peak resident set size (VmHWM) over the steps, and
    ``tensor_mb``, the peak of tensor bytes allocated within one step (torch.profiler).
    CUDA: both are ``torch.cuda.max_memory_allocated()`` minus the memory allocated before.
    """
    # The first torch.optim step imports torch._dynamo (~150 MB RSS): do it on a dummy parameter
    # first, or implementations whose optimiser is built lazily (Pyro's) are charged for it.
    dummy = nn.Parameter(torch.zeros(2, device=args.device))
    (dummy * dummy).sum().backward()
    torch.optim.Adam([dummy]).step()
    ctx, _ = make_context(args)
    step, _ = METHODS[name].factory(ctx)
    sync(args.device)
    cuda = str(args.device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = peak_rss_bytes()
    for _ in range(args.warmup + 3):
        step()
    sync(args.device)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        return {"rss_mb": peak, "tensor_mb": peak, "measure": "cuda.max_memory_allocated"}
    rss = (peak_rss_bytes() - before) / 2**20
    return {"rss_mb": rss, "tensor_mb": peak_tensor_bytes_cpu(step) / 2**20, "measure": "VmHWM / torch.profiler"}


def measure_memory(args, names):
    out = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", name] + child_args(args)
        res = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"memory run for {name} failed:\n{res.stderr}", file=sys.stderr)
            continue
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def child_args(args):
    out = ["--device", args.device, "--batch-size", str(args.batch_size), "--K", str(args.K), "--J", str(args.J),
           "--warmup", str(args.warmup)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.no_pyro_validation:
        out.append("--no-pyro-validation")
    return out


def profile(args, names, steps_per=10, top=25):
    """cProfile (Python-level) and torch.profiler (op-level) summaries of ``steps_per`` steps each."""
    ctx, _ = make_context(args)
    for name in names:
        step, _ = METHODS[name].factory(ctx)
        for _ in range(args.warmup):
            step()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps_per):
            step()
        sync(args.device)
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        print(f"===== cProfile: {name}, {steps_per} steps, top {top} by tottime =====")
        stats.sort_stats("tottime").print_stats(top)
        print("\n".join(buf.getvalue().splitlines()[:top + 12]))
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("cumulative").print_stats(top)
        print(f"===== cProfile: {name}, top {top} by cumulative =====")
        print("\n".join(buf.getvalue().splitlines()[:top + 12]))
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(args.device).startswith("cuda") else [])
        with tprofile(activities=activities) as tp:
            for _ in range(steps_per):
                step()
            sync(args.device)
        print(f"===== torch.profiler: {name}, {steps_per} steps, top {top} ops by self CPU time =====")
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=20, help="timed steps per implementation (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first (default 3)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--K", type=int, default=50, help="E-step / IWAE particles (default 50)")
    p.add_argument("--J", type=int, default=50, help="P-step particles (default 50)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all defaults)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory subprocesses")
    p.add_argument("--no-pyro-validation", action="store_true",
                   help="pyro.enable_validation(False) (default: Pyro's default, validation on)")
    p.add_argument("--profile", default=None, metavar="M1,M2",
                   help="instead of timing, print cProfile and torch.profiler summaries of these methods")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_pyro_validation:
        pyro.enable_validation(False)
    pyro.clear_param_store()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")

    if args.memory_child:
        print(json.dumps(memory_child(args, args.memory_child)))
        return
    if args.profile:
        profile(args, args.profile.split(","), steps_per=args.profile_steps)
        return

    names = args.methods.split(",") if args.methods else [n for n, m in METHODS.items() if m.default]
    if names == ["baselines"]:
        names = ["plain_iwae"] + [f"pyro_{name}" for name in BASELINES]
    if names == ["discrete"]:
        names = list(DISCRETE)
    if names == ["evaluation"]:
        names = list(EVALUATION)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {list(METHODS)}")

    if not args.no_check:
        check_correctness(args)

    times, source = time_methods(args, names)
    memory = {} if args.no_memory else measure_memory(args, names)

    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch_size} K={args.K} J={args.J} "
          f"L=1 repeats={args.repeats} warmup={args.warmup} pyro_validation={not args.no_pyro_validation}")
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, python {platform.python_version()}; data: {source}")
    print()
    mem_labels = ("peak RSS+ MB", "peak tensors MB") if args.device == "cpu" else ("peak MB", "")
    w = max(len(n) for n in names)
    print(f"{'method':<{w}} {'median ms':>10} {'min ms':>8} {'IQR ms':>8} {mem_labels[0]:>13} {mem_labels[1]:>15}  description")
    results = {}
    for name in names:
        t = sorted(1e3 * s for s in times[name])
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        med = statistics.median(t)
        mem = memory.get(name)
        results[name] = {"median_ms": med, "min_ms": t[0], "iqr_ms": q[2] - q[0], "times_ms": t, "memory": mem}
        rss_s = f"{mem['rss_mb']:.1f}" if mem else "-"
        tensor_s = f"{mem['tensor_mb']:.1f}" if mem and args.device == "cpu" else ("-" if not mem else "")
        print(f"{name:<{w}} {med:>10.2f} {t[0]:>8.2f} {q[2] - q[0]:>8.2f} {rss_s:>13} {tensor_s:>15}  "
              f"{METHODS[name].description}")
    print()
    print("ratios of median step times (targets judged on these); ratio of min times in parentheses")
    ratios = []
    for num, den, target in RATIOS:
        if num in results and den in results:
            r = results[num]["median_ms"] / results[den]["median_ms"]
            r_min = results[num]["min_ms"] / results[den]["min_ms"]
            verdict = "" if target is None else (f"target <= {target:.2f}: " + ("MET" if r <= target else "MISSED"))
            ratios.append({"numerator": num, "denominator": den, "ratio": r, "ratio_of_mins": r_min, "target": target})
            print(f"{num + ' / ' + den:<{2 * w + 3}} {r:6.3f}  (of mins {r_min:5.3f})   {verdict}")
    if args.json:
        payload = {
            "config": {k: v for k, v in vars(args).items() if k != "memory_child"},
            "threads": torch.get_num_threads(), "torch": torch.__version__, "pyro": pyro.__version__,
            "data": source, "methods": results, "ratios": ratios,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
