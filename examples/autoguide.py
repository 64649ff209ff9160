"""IWEM with a Pyro autoguide, on a model whose log-likelihood is known in closed form.

    python examples/autoguide.py                 # about 20 s on a 2-core CPU
    python examples/autoguide.py --steps 100     # a quick look

The model is probabilistic PCA (Tipping & Bishop 1999), a linear-Gaussian factor model with
a latent vector per datum and the loadings W, offset μ and noise scale σ as Pyro parameters:

    z_i ~ N(0, I_Z),   x_i | z_i ~ N(W z_i + μ, σ² I_D),   so that   x_i ~ N(μ, W Wᵀ + σ² I_D).

The guide is ``pyro.infer.autoguide.AutoNormal(model)``: a mean-field Normal with its own
location and scale for every datum's z_i, so IWEM weights each datum separately. Nothing about
the guide is IWEM-specific: IWEM finds θ = {W, μ, σ} (what log p depends on with z fixed) and
φ = the autoguide's locations and scales (what the guide's distributions depend on) from the
graph, and reads the autoguide's auxiliary ``z_unconstrained`` site as part of q.

AutoNormal is not amortised: its parameters belong to the training data. The data are
minibatched through the plate (``pyro.plate("data", N, subsample_size=B)``, shared with the
guide by ``create_plates``), the way Pyro subsamples a model with local latents. To evaluate
held-out data, a second AutoNormal (its own class name, so its own parameter names) is fitted to
the test set with θ fixed: ``SVI`` with ``OptimalProposalLoss``, IWEM's P-step, which steps only
the guide's parameters.

It prints per-datum log-likelihoods: ``iwae_bound`` (a lower bound), the exact log-likelihood of
the fitted parameters (the multivariate-normal marginal), and the exact log-likelihood of the
maximum-likelihood parameters (Tipping & Bishop's closed form, fitted to the training data; on the
training data nothing can exceed it).
"""

import argparse
import time

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal

from pyro_iwem import IWEM, Annealing, OptimalProposalLoss, iwae_bound

D, Z = 6, 2
TRUE_SIGMA = 0.5


# ---------------------------------------------------------------- the model
def model(x, batch_size=None):
    W = pyro.param("W", lambda: 0.1 * torch.randn(D, Z))
    mu = pyro.param("mu", lambda: torch.zeros(D))
    sigma = pyro.param("sigma", lambda: torch.tensor(1.0), constraint=dist.constraints.positive)
    with data_plate(x, batch_size) as rows:
        z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + mu, sigma).to_event(1), obs=x[rows])


def data_plate(x, batch_size=None):
    """The data plate, subsampled when ``batch_size`` is given; the guide creates the same one."""
    return pyro.plate("data", len(x), subsample_size=batch_size)


class HeldOutAutoNormal(AutoNormal):
    """AutoNormal for the test set: a class name of its own gives its parameters their own names
    in Pyro's param store ("HeldOutAutoNormal.locs.z"), apart from the training set's."""


# ---------------------------------------------------------------- closed forms
def marginal(W, mu, sigma):
    """p(x; θ) = N(μ, W Wᵀ + σ² I), in float64."""
    W, mu, sigma = W.double(), mu.double(), torch.as_tensor(sigma).double()
    return dist.MultivariateNormal(mu, W @ W.T + sigma**2 * torch.eye(len(mu), dtype=torch.float64))


def maximum_likelihood(x):
    """Tipping & Bishop's closed-form maximum-likelihood (W, μ, σ) of probabilistic PCA."""
    x = x.double()
    mu = x.mean(0)
    S = (x - mu).T @ (x - mu) / len(x)
    eigenvalues, eigenvectors = torch.linalg.eigh(S)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    sigma2 = eigenvalues[Z:].mean()
    W = eigenvectors[:, :Z] * (eigenvalues[:Z] - sigma2).sqrt()
    return W, mu, sigma2.sqrt()


def synthetic_data(n, generator):
    W = torch.randn(D, Z, generator=generator)
    mu = torch.linspace(-1.0, 1.0, D)
    z = torch.randn(n, Z, generator=generator)
    return z @ W.T + mu + TRUE_SIGMA * torch.randn(n, D, generator=generator)


# ---------------------------------------------------------------- training and evaluation
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="IWEM steps")
    parser.add_argument("--test-steps", type=int, default=None,
                        help="P-steps fitting the test set's guide (default: steps / 2)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--num-train", type=int, default=500)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--K", type=int, default=20)
    parser.add_argument("--J", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--eval-K", type=int, default=1000, help="particles of iwae_bound")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    test_steps = max(1, args.steps // 2) if args.test_steps is None else args.test_steps

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data = synthetic_data(args.num_train + args.num_test, generator)
    x_train, x_test = data[: args.num_train], data[args.num_train :]

    guide = AutoNormal(model, create_plates=data_plate)
    # Adam whose learning rate decays to a tenth over the run: the parameters settle at the end
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": 0.1 ** (1 / args.steps), "clip_norm": 1e6})
    iwem = IWEM(model, guide, K=args.K, J=args.J, optim=optim, annealing=Annealing.over(args.steps))
    start = time.perf_counter()
    for step in range(args.steps):
        iwem.step(x_train, args.batch_size)
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  alpha {iwem.alpha:4.2f}  bound/datum {iwem.bound:8.3f}  "
                  f"ESS {iwem.ess:5.2f} of {args.K}")
    train_seconds = time.perf_counter() - start

    # the held-out data: a guide of their own, fitted with θ fixed (the P-step alone)
    test_guide = HeldOutAutoNormal(model, create_plates=data_plate)
    svi = SVI(model, test_guide, pyro.optim.Adam({"lr": args.lr}), OptimalProposalLoss(args.J))
    start = time.perf_counter()
    for _ in range(test_steps):
        svi.step(x_test, args.batch_size)
    test_seconds = time.perf_counter() - start

    with torch.no_grad():
        fitted = marginal(pyro.param("W"), pyro.param("mu"), pyro.param("sigma"))
        ml = marginal(*maximum_likelihood(x_train))
        results = {
            "train": {
                "bound": iwae_bound(model, guide, x_train, num_particles=args.eval_K).mean().item(),
                "exact": fitted.log_prob(x_train.double()).mean().item(),
                "ml": ml.log_prob(x_train.double()).mean().item(),
            },
            "test": {
                "bound": iwae_bound(model, test_guide, x_test, num_particles=args.eval_K).mean().item(),
                "exact": fitted.log_prob(x_test.double()).mean().item(),
                "ml": ml.log_prob(x_test.double()).mean().item(),
            },
        }
    results["sigma"] = (pyro.param("sigma").item(), maximum_likelihood(x_train)[2].item())
    results["seconds"] = train_seconds + test_seconds
    print(f"{args.steps} IWEM steps (K={args.K}, J={args.J}, AutoNormal) in {train_seconds:.1f} s, "
          f"{test_steps} P-steps on the test set's AutoNormal in {test_seconds:.1f} s")
    print(f"log-likelihood per datum      iwae_bound (K={args.eval_K})   exact, fitted   exact, maximum likelihood")
    for split in ("train", "test"):
        r = results[split]
        print(f"  {split:5s}                       {r['bound']:10.4f}        {r['exact']:10.4f}        {r['ml']:10.4f}")
    print(f"noise scale sigma: fitted {results['sigma'][0]:.4f}, maximum likelihood {results['sigma'][1]:.4f}, "
          f"true {TRUE_SIGMA}")
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: extra threads only spin-wait
    main()
