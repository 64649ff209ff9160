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

``--nested M ...`` times instead one gradient of the nested bound over M draws of μ on the
random-effects model (full batch, ``--K`` particles each): ``IWAELoss(K, global_particles=M)``,
whose M draws are one outer plate, against M calls of the sampler (one draw of μ each, the
implementation before the plate) and a plain-PyTorch nested bound written by hand, side by side.
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

from pyro_iwem.infer import IWEM, IWAELoss, ParticleSampler
from pyro_iwem.infer.objectives import iwae_objective, nested_outer_bound, nested_terms


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


def nested_gradients(x, M, K):
    """``{name: fn}``, each fn one loss and gradient of the nested bound over M draws of μ."""
    sampler = ParticleSampler(random_effects_model, random_effects_guide)
    loss = IWAELoss(K, global_particles=M)
    loss.loss(random_effects_model, random_effects_guide, x)  # creates the parameters

    def plate():
        value = loss.loss_and_grads(random_effects_model, random_effects_guide, x)
        _clear_grads()
        return value

    def calls():
        draws = [sampler(K, (x,), {}) for _ in range(M)]
        bound = nested_outer_bound(nested_terms(draws, iwae_objective))
        (-bound).backward()
        _clear_grads()
        return -bound.item()

    store = pyro.get_param_store()
    leaves = {n: store[n].unconstrained().detach().clone().requires_grad_() for n in ("q_m", "q_s", "q_a", "q_b", "q_c", "tau")}

    def by_hand():
        m, a, b = leaves["q_m"], leaves["q_a"], leaves["q_b"]
        s, c, tau = leaves["q_s"].exp(), leaves["q_c"].exp(), leaves["tau"].exp()
        mu = m + s * torch.randn(M, 1, 1)
        z = a * mu + b * x + c * torch.randn(M, K, len(x))
        normal = torch.distributions.Normal
        log_w = normal(mu, tau).log_prob(z) + normal(z, 0.5).log_prob(x) - normal(a * mu + b * x, c).log_prob(z)
        outer = (normal(0.0, 1.0).log_prob(mu) - normal(m, s).log_prob(mu)).reshape(M)
        terms = outer + (torch.logsumexp(log_w, 1) - torch.log(torch.tensor(float(K)))).sum(-1)
        bound = torch.logsumexp(terms, 0) - torch.log(torch.tensor(float(M)))
        (-bound).backward()
        for t in leaves.values():
            t.grad = None
        return -bound.item()

    return {"plain PyTorch": by_hand, f"IWAELoss, one plate of {M}": plate, f"{M} sampler calls": calls}


def _clear_grads():
    for p in pyro.get_param_store().values():
        p.unconstrained().grad = None


def measure_nested(Ms, K, steps, warmup):
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for M in Ms:
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            (x,) = random_effects()[2]
            methods = nested_gradients(x, M, K)
            times = {m: [] for m in methods}
            for i in range(warmup + steps):
                for method, fn in methods.items():
                    start = time.perf_counter()
                    fn()
                    if i >= warmup:
                        times[method].append(time.perf_counter() - start)
            base = statistics.median(times["plain PyTorch"])
            results[f"M={M}"] = {m: {"ms": 1000 * statistics.median(t), "ratio": statistics.median(t) / base}
                                 for m, t in times.items()}  # fmt: skip
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--K", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--nested", type=int, nargs="+", metavar="M", help="time the nested bound's gradient instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    if args.nested:
        results = measure_nested(args.nested, args.K[-1], args.steps, args.warmup)
        for name, found in results.items():
            print(f"random-effects, nested bound over {name} draws of μ, K = {args.K[-1]}, N = 1000 "
                  f"(median of {args.steps} interleaved gradients, {args.threads} thread(s)):")
            for method, r in found.items():
                print(f"  {method:26s} {r['ms']:8.2f} ms  {r['ratio']:6.2f}× plain PyTorch")
    for name in args.models if not args.nested else ():
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
