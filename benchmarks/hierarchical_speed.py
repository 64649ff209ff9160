"""The step time of models with global latents against Pyro's Trace_ELBO (issue 20).

    python benchmarks/hierarchical_speed.py                  # both models, K = 1 and 10
    python benchmarks/hierarchical_speed.py --steps 300 --threads 1

Two models whose latents lie outside the data plate, each trained by ``SVI`` with
``Trace_ELBO`` and with ``IWAELoss(K)``, and by ``IWEM``:

* ``regression``: examples/hierarchical.py's ``PyroModule`` Bayesian linear regression (``nn.Linear`` with ``PyroSample``
  weights, a global noise scale, ``AutoNormal``), 1000 data, 10 features: every latent global;
* ``random-effects``: μ ~ N(0, 1) global, z_i ~ N(μ, τ²), x_i ~ N(z_i, 0.5²), 1000 data, a
  hand-written guide q(μ) q(z_i | x_i, μ).

The methods' steps are interleaved (one of each in turn, after a warm-up), so that a machine
busy with other work slows them alike; the median step of each is reported with its ratio to
``Trace_ELBO``'s. Target (issue 20): ``IWAELoss`` at K = 1 within 1.5× of ``Trace_ELBO``.
"""

import argparse
import importlib.util
import json
import pathlib
import statistics
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch.distributions import constraints

from pyro_iwem.infer import IWEM, IWAELoss


def _example():
    """examples/hierarchical.py as a module: its BayesianRegression is the model timed here."""
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "hierarchical.py"
    spec = importlib.util.spec_from_file_location("hierarchical_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def regression(n=1000, d=10):
    x = torch.randn(n, d)
    y = x @ torch.randn(d) + 0.5 * torch.randn(n)
    model = _example().BayesianRegression(d)
    return model, AutoNormal(model), (x, y)


def random_effects_model(x):
    tau = pyro.param("tau", torch.tensor(1.0), constraint=constraints.positive)
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(mu, tau))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def random_effects_guide(x):
    m = pyro.param("q_m", torch.tensor(0.0))
    s = pyro.param("q_s", torch.tensor(1.0), constraint=constraints.positive)
    a, b = pyro.param("q_a", torch.tensor(0.5)), pyro.param("q_b", torch.tensor(0.5))
    c = pyro.param("q_c", torch.tensor(0.5), constraint=constraints.positive)
    mu = pyro.sample("mu", dist.Normal(m, s))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(a * mu + b * x, c))


def random_effects(n=1000):
    x = 0.4 + 0.7 * torch.randn(n) + 0.5 * torch.randn(n)
    return random_effects_model, random_effects_guide, (x,)


MODELS = {"regression": regression, "random-effects": random_effects}


def steppers(model, guide, args, ks):
    optim = pyro.optim.Adam({"lr": 1e-3})
    found = {"Trace_ELBO": SVI(model, guide, optim, Trace_ELBO()).step}
    for k in ks:
        found[f"IWAELoss K={k}"] = SVI(model, guide, optim, IWAELoss(k)).step
        found[f"IWEM K=J={k}"] = IWEM(model, guide, K=k, J=k, optim=optim, annealing=None).step
    return found


def measure(name, steps, warmup, ks):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide, args = MODELS[name]()
    methods = steppers(model, guide, args, ks)
    times = {m: [] for m in methods}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(warmup + steps):
            for method, step in methods.items():
                start = time.perf_counter()
                step(*args)
                if i >= warmup:
                    times[method].append(time.perf_counter() - start)
    base = statistics.median(times["Trace_ELBO"])
    return {m: {"ms": 1000 * statistics.median(t), "ratio": statistics.median(t) / base} for m, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--K", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.models:
        results[name] = measure(name, args.steps, args.warmup, args.K)
        print(f"{name} (median of {args.steps} interleaved steps, {args.threads} thread(s)):")
        for method, r in results[name].items():
            print(f"  {method:16s} {r['ms']:7.2f} ms  {r['ratio']:5.2f}× Trace_ELBO")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
