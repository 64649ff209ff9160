"""A model with two stochastic layers, trained with IWEM (Burda et al.'s two-layer VAE, small).

    python examples/two_layer.py                 # about a minute on a 2-core CPU
    python examples/two_layer.py --steps 200     # a quick look

The generative model stacks two Gaussian latent layers above binary images, and the guide
runs the other way, each conditional a small network:

    model:  z2 ~ N(0, I),   z1 | z2 ~ N(μ(z2), σ(z2)),   x | z1 ~ Bernoulli(logits(z1))
    guide:  z1 | x ~ N(μ(x), σ(x)),   z2 | z1 ~ N(μ(z1), σ(z1))

The data are scikit-learn's bundled 8x8 digits, binarised (no download). Nothing about the
model is IWEM-specific: two latent sites in one data plate, each proposed by the guide. IWEM
finds θ (the decoder's two networks: what log p(x, z1, z2) depends on with z1, z2 fixed) and φ
(the encoder's) from the graph; the guide's q(z2 | z1) takes the guide's own reparameterised z1,
so the P-step's gradient reaches the z1 network through both sites.

It prints the test log-likelihood per image (``iwae_bound`` with ``--eval-K`` particles) before
and after training.
"""

import argparse
import time

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
from torch import nn

from pyro_iwem import IWEM, Annealing, iwae_bound
from pyro_iwem.data import load_digits_binary


# ---------------------------------------------------------------- the model and guide
class GaussianNet(nn.Module):
    """``h -> (loc, scale)`` of a diagonal Normal, through one tanh hidden layer."""

    def __init__(self, in_dim, hidden, out_dim):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
        self.loc = nn.Linear(hidden, out_dim)
        self.scale = nn.Sequential(nn.Linear(hidden, out_dim), nn.Softplus())

    def forward(self, h):
        h = self.body(h)
        return self.loc(h), self.scale(h) + 1e-4


class TwoLayerVAE(nn.Module):
    def __init__(self, x_dim=64, z1_dim=16, z2_dim=8, hidden=64):
        super().__init__()
        self.z2_dim = z2_dim
        self.decoder = nn.ModuleDict({
            "z1": GaussianNet(z2_dim, hidden, z1_dim),  # p(z1 | z2)
            "x": nn.Sequential(nn.Linear(z1_dim, hidden), nn.Tanh(), nn.Linear(hidden, x_dim)),  # p(x | z1)
        })
        self.encoder = nn.ModuleDict({
            "z1": GaussianNet(x_dim, hidden, z1_dim),  # q(z1 | x)
            "z2": GaussianNet(z1_dim, hidden, z2_dim),  # q(z2 | z1)
        })

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(self.z2_dim), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(*self.decoder["z1"](z2)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder["x"](z1)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(*self.encoder["z1"](x)).to_event(1))
            pyro.sample("z2", dist.Normal(*self.encoder["z2"](z1)).to_event(1))


# ---------------------------------------------------------------- training and evaluation
def test_log_likelihood(vae, x, num_particles):
    with torch.no_grad():
        return iwae_bound(vae.model, vae.guide, x, num_particles=num_particles).mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="IWEM steps")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--K", type=int, default=20, help="E-step particles")
    parser.add_argument("--J", type=int, default=20, help="P-step particles")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-K", type=int, default=1000, help="particles of iwae_bound")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    data = load_digits_binary(seed=args.seed)
    x_train, x_test = data.train, data.test
    print(f"{data.name}: {len(x_train)} train / {len(x_test)} test images of {data.image_shape}")

    vae = TwoLayerVAE(x_dim=data.num_pixels)
    initial = test_log_likelihood(vae, x_test, args.eval_K)

    iwem = IWEM(vae.model, vae.guide, K=args.K, J=args.J, optim=pyro.optim.Adam({"lr": args.lr}),
                annealing=Annealing.over(args.steps))  # α from 0 to 1 over the run
    start = time.perf_counter()
    for step in range(args.steps):
        rows = torch.randint(0, len(x_train), (args.batch_size,))
        iwem.step(x_train[rows])
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  alpha {iwem.alpha:4.2f}  bound/datum {iwem.bound:8.3f}  "
                  f"ESS {iwem.ess:5.2f} of {args.K}")
    seconds = time.perf_counter() - start

    test = test_log_likelihood(vae, x_test, args.eval_K)
    print(f"{args.steps} IWEM steps (K={args.K}, J={args.J}) in {seconds:.1f} s")
    print(f"test log-likelihood (IWAE bound, K={args.eval_K}): {test:.2f} nats per image "
          f"(before training: {initial:.2f})")
    return {"initial": initial, "test": test, "seconds": seconds}


if __name__ == "__main__":
    torch.set_num_threads(1)  # small networks: extra threads only spin-wait
    main()
