"""Hierarchical models: global latents beside per-datum latents, and a Bayesian regression.

    python examples/hierarchical.py                # about 30 s on a 2-core CPU
    python examples/hierarchical.py --steps 200    # a quick look

1. A random-effects model whose likelihood is known in closed form:

       μ ~ N(0, 1) (global),   z_i | μ ~ N(μ, τ²),   x_i | z_i ~ N(z_i, 0.5²),   i = 1..N,

   τ a parameter. Given μ the data are independent, x_i | μ ~ N(μ, τ² + 0.25), so
   x ~ N(0, (τ² + 0.25) I + 11ᵀ), and the posterior of μ is normal. μ lies outside the data
   plate: it is a *global*, drawn once per step outside the particle plate, and every objective
   is L_K, an ELBO over μ with a per-datum IWAE inside:

       L_K = E_q(μ)[ log p(μ) − log q(μ) + (N/B) Σ_i log (1/K) Σ_k p(x_i, z_ik | μ) / q(z_ik | x_i, μ) ].

   IWEM fits it on minibatches (B = 20 of N = 200); the script prints L_K per datum, the
   nested bound over M draws of μ (``nested_bound``, full batch only), and the exact
   log p(x)/N at the fitted τ and at the maximum-likelihood τ, with q(μ) beside the exact posterior.

2. A ``PyroModule`` Bayesian linear regression: ``nn.Linear`` with ``PyroSample`` weights and an
   ``AutoNormal`` guide. Every latent is global, so L_K is the ELBO whatever K (one warning says
   so) and the vectorised draw runs at about Trace_ELBO's cost.
"""

import argparse
import math
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch.distributions import constraints

from pyro_iwem import IWEM, iwae_bound
from pyro_iwem.infer import IWAELoss, nested_bound

SIGMA = 0.5


# ---------------------------------------------------------------- 1. random effects
def model(x, batch_size=None):
    tau = pyro.param("tau", torch.tensor(1.0), constraint=constraints.positive)
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))  # global: outside the data plate
    with pyro.plate("data", len(x), subsample_size=batch_size) as i:
        z = pyro.sample("z", dist.Normal(mu, tau))
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x[i])


def guide(x, batch_size=None):
    """q(μ) = N(m, s); q(z_i | x_i, μ) = N(a μ + b x_i, c): the family holds the exact posterior."""
    m = pyro.param("q_m", torch.tensor(0.0))
    s = pyro.param("q_s", torch.tensor(1.0), constraint=constraints.positive)
    a, b = pyro.param("q_a", torch.tensor(0.5)), pyro.param("q_b", torch.tensor(0.5))
    c = pyro.param("q_c", torch.tensor(0.5), constraint=constraints.positive)
    mu = pyro.sample("mu", dist.Normal(m, s))
    with pyro.plate("data", len(x), subsample_size=batch_size) as i:
        pyro.sample("z", dist.Normal(a * mu + b * x[i], c))


def log_marginal(x, tau):
    """log p(x; τ) in closed form, float64."""
    x = x.double()
    n = len(x)
    cov = (tau**2 + SIGMA**2) * torch.eye(n, dtype=x.dtype) + torch.ones(n, n, dtype=x.dtype)
    return dist.MultivariateNormal(torch.zeros(n, dtype=x.dtype), cov).log_prob(x).item()


def posterior_mu(x, tau):
    v = tau**2 + SIGMA**2
    precision = 1.0 + len(x) / v
    return x.sum().item() / v / precision, precision**-0.5


def ml_tau(x):
    """The maximum-likelihood τ (golden-section search on the closed form)."""
    lo, hi = 1e-3, 3.0
    for _ in range(60):
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        lo, hi = (lo, b) if log_marginal(x, a) > log_marginal(x, b) else (a, hi)
    return 0.5 * (lo + hi)


def random_effects(args):
    generator = torch.Generator().manual_seed(args.seed)
    z = 0.4 + 0.7 * torch.randn(args.num_data, generator=generator)
    x = z + SIGMA * torch.randn(args.num_data, generator=generator)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.1 ** (1 / args.steps)})
    iwem = IWEM(model, guide, K=args.K, J=args.K, optim=optim, annealing=None)
    start = time.perf_counter()
    for _ in range(args.steps):
        iwem.step(x, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    tau = pyro.param("tau").item()
    n = len(x)
    bound = iwae_bound(model, guide, x, num_particles=args.eval_K).mean().item()
    nested = nested_bound(model, guide, x, global_particles=args.M, num_particles=args.eval_K)
    exact, best = log_marginal(x, tau) / n, log_marginal(x, ml_tau(x)) / n
    mean, sd = posterior_mu(x, tau)
    print(f"random effects, N = {n}, B = {args.batch_size}, IWEM K = {args.K}, {args.steps} steps ({seconds:.1f} s)")
    print(f"  τ {tau:.4f} (maximum likelihood {ml_tau(x):.4f}); per-datum ESS given μ {iwem.ess:.1f} of {args.K}")
    print(f"  q(μ) = N({pyro.param('q_m').item():.4f}, {pyro.param('q_s').item():.4f}²), "
          f"exact posterior N({mean:.4f}, {sd:.4f}²)")
    print("  log-likelihood per datum:")
    rows = [
        (f"L_K (iwae_bound, K = {args.eval_K})", bound),
        (f"nested bound (M = {args.M}, global ESS {nested.global_ess:.1f})", nested.bound.item() / n),
        ("exact log p(x)/N at the fitted τ", exact),
        ("exact log p(x)/N at the ML τ", best),
    ]
    for label, value in rows:
        print(f"    {label:44s} {value:.4f}")
    return {"bound": bound, "nested": nested.bound.item() / n, "exact": exact, "ml": best, "tau": tau,
            "ml_tau": ml_tau(x), "q_m": pyro.param("q_m").item(), "q_s": pyro.param("q_s").item(),
            "posterior": (mean, sd), "ess": iwem.ess}  # fmt: skip


# ---------------------------------------------------------------- 2. a PyroModule regression
class BayesianRegression(PyroModule):
    def __init__(self, d):
        super().__init__()
        self.linear = PyroModule[torch.nn.Linear](d, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, d]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


def regression(args):
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(500, 3, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.5 * torch.randn(500, generator=generator)
    results = {}
    for name, loss in (("IWAELoss(K=1)", IWAELoss(1)), ("Trace_ELBO", Trace_ELBO())):
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        net = BayesianRegression(3)
        auto = AutoNormal(net)
        svi = SVI(net, auto, pyro.optim.Adam({"lr": 0.03}), loss)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="every latent of the model is global")
            for _ in range(args.steps):
                value = svi.step(x, y)
        seconds = time.perf_counter() - start
        weight = auto.median()["linear.weight"].flatten().tolist()
        results[name] = {"elbo": -value, "seconds": seconds, "weight": weight}
        print(f"  {name:14s} ELBO {-value:9.2f}, {1000 * seconds / args.steps:.2f} ms a step, "
              f"weights {', '.join(f'{w:.3f}' for w in weight)} (true 1, -2, 0.5)")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--num-data", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--K", type=int, default=10)
    parser.add_argument("--M", type=int, default=100, help="draws of μ of the nested bound")
    parser.add_argument("--eval-K", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = {"random_effects": random_effects(args)}
    print("Bayesian linear regression (PyroModule, AutoNormal), every latent global:")
    results["regression"] = regression(args)
    assert math.isfinite(results["random_effects"]["bound"])
    return results


if __name__ == "__main__":
    main()
