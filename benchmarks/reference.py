"""Plain-PyTorch references for the steps that ``step_speed.py`` times against pyro_iwem.

The networks are the paper's MLP: a 784-300-300-tanh encoder to the loc and softplus + 1e-4
scale of a 40-d Gaussian, a 40-300-300-tanh decoder to 784 Bernoulli logits, an N(0, I)
prior; all densities are fully normalised. A step factory takes a :class:`Context` and
returns ``(step, modules)``: ``step()`` runs one training step on ``ctx.x`` (Adam on fresh
copies of the context's networks) and returns the loss as a float; ``modules`` are the
networks it trains. The factories here:

* :func:`make_plain_iwem`: the straightforward IWEM step, ``.backward()`` on every loss;
* :func:`make_smart_iwem`: the lean IWEM step (θ-only and φ-only ``autograd.grad``, one
  decoder pass for the K + L particles), the floor a library can reach;
* :func:`make_plain_iwae`: the IWAE step;
* :func:`make_plain_discrete_iwem`, :func:`make_plain_discrete_iwae`: IWEM with a VIMCO
  P-step and VIMCO-IWAE on the same MLPs with 40 Bernoulli latents;

and :func:`plain_bound` is the chunked K-particle IWAE bound of a ``pyro_iwem.models`` VAE.
Every draw consumes the RNG as Pyro's vectorised samplers do, so that on the same seed a
reference and pyro_iwem compute the same step (``tests/test_reference_equivalence.py``).
"""

import copy
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)
X_DIM, H_DIM, Z_DIM = 784, 300, 40


# --------------------------------------------------------------------------------------
# The networks and their densities
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


def mlp(in_dim, h_dim, out_dim):
    """in -> h tanh -> h tanh -> out."""
    return nn.Sequential(
        nn.Linear(in_dim, h_dim), nn.Tanh(), nn.Linear(h_dim, h_dim), nn.Tanh(), nn.Linear(h_dim, out_dim)
    )


class Decoder(nn.Module):
    """p(x | z): 40-300-300 tanh -> 784 Bernoulli logits (``dims`` keeps the three sizes)."""

    def __init__(self, x_dim=X_DIM, h_dim=H_DIM, z_dim=Z_DIM):
        super().__init__()
        self.dims = (x_dim, h_dim, z_dim)
        self.net = mlp(z_dim, h_dim, x_dim)

    def forward(self, z):
        return self.net(z)


def normal_log_prob(z, loc, scale):
    """Full normalised Normal log density, summed over the last (event) dim."""
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)


def bernoulli_log_lik(logits, x):
    """log Bernoulli(x; logits), summed over the last (event) dim; ``x`` broadcasts to the logits."""
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def log_joint(decoder, x, z):
    """log p(x, z) = log N(z; 0, I) + log Bernoulli(x; logits = decoder(z)), shape z.shape[:-1]."""
    log_px = bernoulli_log_lik(decoder(z), x)
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


# --------------------------------------------------------------------------------------
# IWEM and IWAE steps on the Gaussian-latent MLP
# --------------------------------------------------------------------------------------


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


def _apply(opt, params, loss):
    """One optimiser step on ``params`` with the gradients of ``loss`` w.r.t. them only."""
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        p.grad = g
    opt.step()
    opt.zero_grad()


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
            _apply(opt_dec, theta, loss)

            loc, scale = encoder(x)
            z = draw(loc, scale, J)
            _apply(opt_enc, phi, plain_p_loss(decoder, x, z, normal_log_prob(z, loc, scale), joint))
            return loss.item()

        return step, (encoder, decoder)

    return factory


def _backward_step(opt, loss):
    """``loss.backward()``, one optimiser step, zeroed gradients; returns the loss as a float."""
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def _joint_adam(encoder, decoder, lr):
    return torch.optim.Adam(itertools.chain(encoder.parameters(), decoder.parameters()), lr=lr)


def make_plain_iwae(ctx):
    """Plain-PyTorch IWAE (K = ctx.K): one forward, -Σ_i logmeanexp_k log w, backward, one Adam step."""
    encoder, decoder = ctx.fresh()
    opt = _joint_adam(encoder, decoder, ctx.lr)
    x, K = ctx.x, ctx.K

    def step():
        loc, scale = encoder(x)
        z = draw(loc, scale, K)
        log_w = log_joint(decoder, x, z) - normal_log_prob(z, loc, scale)
        return _backward_step(opt, -(torch.logsumexp(log_w, dim=0) - math.log(K)).sum())

    return step, (encoder, decoder)


# --------------------------------------------------------------------------------------
# A discrete-latent model: the same MLPs with 40 Bernoulli latents (a binary-code VAE)
# --------------------------------------------------------------------------------------


class BernoulliEncoder(nn.Module):
    """q(z | x): 784-300-300 tanh -> 40 Bernoulli logits (not reparameterisable)."""

    def __init__(self, x_dim=X_DIM, h_dim=H_DIM, z_dim=Z_DIM):
        super().__init__()
        self.net = mlp(x_dim, h_dim, z_dim)

    def forward(self, x):
        return self.net(x)


def discrete_fresh(ctx):
    """Fresh copies of a Bernoulli encoder and a decoder (of ``ctx.decoder``'s sizes), the same
    for every implementation."""
    dims = ctx.decoder.dims
    with torch.random.fork_rng():
        torch.manual_seed(1)
        encoder = BernoulliEncoder(*dims).to(device=ctx.x.device, dtype=ctx.x.dtype)
        decoder = Decoder(*dims).to(device=ctx.x.device, dtype=ctx.x.dtype)
    return encoder, decoder


def bernoulli_log_prob(z, logits):
    return -F.binary_cross_entropy_with_logits(logits.expand_as(z), z, reduction="none").sum(-1)


def discrete_log_joint(decoder, x, z):
    """log p(x, z) with a uniform Bernoulli(1/2) prior on the 40 bits."""
    log_px = bernoulli_log_lik(decoder(z), x)
    return z.shape[-1] * math.log(0.5) + log_px


def bernoulli_draw(logits, n):
    """n draws (n, B, D) of Bernoulli(logits), not differentiable (as Pyro's Bernoulli.sample)."""
    return torch.bernoulli(torch.sigmoid(logits.detach()).expand((n,) + logits.shape))


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
            z = bernoulli_draw(logits, K)
            log_q = bernoulli_log_prob(z, logits)
        log_p = discrete_log_joint(decoder, x, z)
        loss = -(torch.softmax(log_p.detach() - log_q, 0) * log_p).sum()
        _apply(opt_dec, theta, loss)
        logits = encoder(x)
        z = bernoulli_draw(logits, J)
        log_q = bernoulli_log_prob(z, logits)
        log_p = discrete_log_joint(decoder, x, z)
        _apply(opt_enc, phi, -vimco_surrogate(log_p.abs().log() + log_p - log_q, log_q).sum())
        return loss.item()

    return step, (encoder, decoder)


def make_plain_discrete_iwae(ctx):
    """Plain-PyTorch VIMCO-IWAE on the Bernoulli-latent model: one pass, one backward, one Adam."""
    encoder, decoder = discrete_fresh(ctx)
    opt = _joint_adam(encoder, decoder, ctx.lr)
    x, K = ctx.x, ctx.K

    def step():
        logits = encoder(x)
        z = bernoulli_draw(logits, K)
        log_q = bernoulli_log_prob(z, logits)
        return _backward_step(opt, -vimco_surrogate(discrete_log_joint(decoder, x, z) - log_q, log_q).sum())

    return step, (encoder, decoder)


# --------------------------------------------------------------------------------------
# Evaluation: the chunked IWAE bound
# --------------------------------------------------------------------------------------


def plain_bound(vae, x, K, chunk):
    """Plain-PyTorch chunked IWAE bound of a pyro_iwem.models VAE (N(0, I) prior, Gaussian
    proposal, Bernoulli decoder): float64 running logsumexp over chunks of ``chunk`` particles."""
    total = None
    with torch.no_grad():
        loc, scale = vae.encode(x)
        for start in range(0, K, chunk):
            n = min(chunk, K - start)
            z = draw(loc, scale, n)
            log_w = log_joint(vae.decode, x, z) - normal_log_prob(z, loc, scale)
            part = torch.logsumexp(log_w.double(), 0)
            total = part if total is None else torch.logaddexp(total, part)
    return total - math.log(K)
