"""A Gaussian mixture fitted with IWEM two ways: the assignment summed out, or sampled.

    python examples/mixture.py                 # about 15 s on a 2-core CPU
    python examples/mixture.py --steps 100     # a quick look

The model is a 1-D mixture of three Gaussians with a known scale, whose mixture weights and
locations are learnable parameters (θ), fitted to synthetic data:

    c_i ~ Categorical(weights),   x_i | c_i ~ Normal(locs[c_i], SCALE),   i = 1..N.

It is trained twice, with the same model function:

(a) **enumerated**: ``pyro.infer.config_enumerate(model)`` marks ``c`` for parallel
    enumeration and the guide is empty, so IWEM sums ``c`` out exactly: every particle's
    weight is p(x_i) itself, the M-step climbs the exact log-likelihood (EM with the exact
    posterior p(c | x)) and ``iwae_bound`` *is* the log-likelihood (to float precision).
    An empty guide has nothing to fit, so the P-step warns that it trains nothing; that is
    expected here and silenced.
(b) **sampled**: an amortised guide q(c | x; φ), a small network giving the assignment's
    logits, proposes ``c``; its P-step gradient is VIMCO's score-function estimator, since a
    Categorical cannot be reparameterised. α is annealed from 0 to 1 over the run
    (``Annealing.over(steps)``).

For each it prints the test log-likelihood per datum from ``iwae_bound`` beside the exact
log-likelihood of the fitted parameters (the closed-form mixture marginal
log Σ_c w_c N(x; μ_c, σ)) and of the true parameters, the same exact values on the training
data (where fitted parameters near the maximum likelihood beat the true ones), and the learned
weights and locations
beside the true ones (components sorted by location: a mixture is only defined up to their
order).
"""

import argparse
import time
import warnings

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
from pyro.infer import config_enumerate
from torch import nn

from pyro_iwem import IWEM, Annealing, iwae_bound

TRUE_WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
TRUE_LOCS = torch.tensor([-2.0, 0.5, 3.0])
SCALE = 0.6
C = len(TRUE_WEIGHTS)


# ---------------------------------------------------------------- model and guides
def model(x):
    weights = pyro.param("weights", torch.full((C,), 1.0 / C), constraint=dist.constraints.simplex)
    locs = pyro.param("locs", lambda: torch.quantile(x, torch.linspace(0.2, 0.8, C)))  # spread over the data
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[c], SCALE), obs=x)


enumerated_model = config_enumerate(model)  # (a): c is summed out, log p(x) = log Σ_c p(x, c)


def empty_guide(x):  # (a): nothing left to propose
    pass


def amortised_guide(classifier):  # (b): q(c | x; φ)
    def guide(x):
        pyro.module("classifier", classifier)
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Categorical(logits=classifier(x.unsqueeze(-1))))

    return guide


# ---------------------------------------------------------------- exact log-likelihood
def exact_log_likelihood(x, weights, locs):
    """Per-datum log Σ_c w_c N(x; μ_c, SCALE), in float64."""
    x, weights, locs = x.double(), weights.double(), locs.double()
    return torch.logsumexp(weights.log() + dist.Normal(locs, SCALE).log_prob(x.unsqueeze(-1)), -1)


def synthetic_data(n, generator):
    c = torch.multinomial(TRUE_WEIGHTS, n, replacement=True, generator=generator)
    return TRUE_LOCS[c] + SCALE * torch.randn(n, generator=generator)


# ---------------------------------------------------------------- training
def fit(name, guide, model_fn, x_train, x_test, steps, batch_size, K, J, lr, eval_K, annealing):
    # Adam whose learning rate decays to a tenth over the run: the parameters settle at the end
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps), "clip_norm": 1e6})
    iwem = IWEM(model_fn, guide, K=K, J=J, optim=optim, annealing=annealing)
    start = time.perf_counter()
    with warnings.catch_warnings():
        if name == "enumerated":  # the empty guide has no φ: "the P-step trains nothing" is expected
            warnings.filterwarnings("ignore", message="the guide's distributions depend on no parameter")
        for _ in range(steps):
            rows = torch.randint(0, len(x_train), (batch_size,))
            iwem.step(x_train[rows])
    seconds = time.perf_counter() - start
    with torch.no_grad():
        bound = iwae_bound(model_fn, guide, x_test, num_particles=eval_K).mean().item()
        weights, locs = pyro.param("weights").detach(), pyro.param("locs").detach()
        exact = exact_log_likelihood(x_test, weights, locs).mean().item()
        true = exact_log_likelihood(x_test, TRUE_WEIGHTS, TRUE_LOCS).mean().item()
        train_exact = exact_log_likelihood(x_train, weights, locs).mean().item()
        train_true = exact_log_likelihood(x_train, TRUE_WEIGHTS, TRUE_LOCS).mean().item()
    order = locs.argsort()
    result = {
        "bound": bound,
        "exact": exact,
        "true": true,
        "train_exact": train_exact,
        "train_true": train_true,
        "weights": weights[order].tolist(),
        "locs": locs[order].tolist(),
        "seconds": seconds,
    }
    print(f"({name}) {steps} IWEM steps, K={K}, J={J}, in {seconds:.1f} s")
    print(f"  test log-likelihood per datum: iwae_bound (K={eval_K}) {bound:.5f}   "
          f"exact, fitted {exact:.5f}   exact, true parameters {true:.5f}")
    print(f"  train log-likelihood per datum (exact): fitted {train_exact:.5f}   true parameters {train_true:.5f}")
    print(f"  weights: learned {_fmt(result['weights'])}   true {_fmt(TRUE_WEIGHTS.tolist())}")
    print(f"  locs:    learned {_fmt(result['locs'])}   true {_fmt(TRUE_LOCS.tolist())}")
    return result


def _fmt(values):
    return "[" + ", ".join(f"{v:6.3f}" for v in values) + "]"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="IWEM steps of each fit")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--K", type=int, default=20, help="E-step particles of the sampled fit")
    parser.add_argument("--J", type=int, default=20, help="P-step particles of the sampled fit")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--eval-K", type=int, default=1000, help="particles of iwae_bound")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(args.seed)
    x_train = synthetic_data(args.num_train, generator)
    x_test = synthetic_data(args.num_test, generator)
    results = {}

    # (a) c summed out: every particle's weight is p(x) itself, so one particle is as good as any number
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    results["enumerated"] = fit(
        "enumerated", empty_guide, enumerated_model, x_train, x_test, args.steps, args.batch_size,
        K=1, J=1, lr=args.lr, eval_K=1, annealing=None,
    )

    # (b) c sampled from an amortised guide, VIMCO score-function gradients for φ
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    classifier = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, C))
    results["sampled"] = fit(
        "sampled", amortised_guide(classifier), model, x_train, x_test, args.steps, args.batch_size,
        K=args.K, J=args.J, lr=args.lr, eval_K=args.eval_K, annealing=Annealing.over(args.steps),
    )
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: extra threads only spin-wait
    main()
