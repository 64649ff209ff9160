"""Train a deep latent-variable model with IWEM, the way you would with SVI.

    python examples/train_iwem.py                    # binarised MNIST from the data root
    python examples/train_iwem.py --data-root DIR    # or PYRO_IWEM_DATA=DIR
    python examples/train_iwem.py --epochs 5 --max-train 20000

Uses Larochelle's statically binarised MNIST when a data root with
``binarized_mnist/`` exists (``--data-root``, ``PYRO_IWEM_DATA`` or ``../shared/data``),
else scikit-learn's bundled 8x8 digits, binarised. Prints the test log-likelihood
(IWAE bound with ``--eval-K`` samples) at the end.
"""

import argparse
import time

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
import torch.nn as nn
from tqdm import tqdm

from pyro_iwem import IWEM, Annealing, iwae_bound
from pyro_iwem.data import data_root_exists, load_digits_binary, load_images


# ---------------------------------------------------------------- your model and guide
class Encoder(nn.Module):
    def __init__(self, x_dim, z_dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.loc = nn.Linear(hidden, z_dim)
        self.scale = nn.Sequential(nn.Linear(hidden, z_dim), nn.Softplus())

    def forward(self, x):
        h = self.net(x)
        return self.loc(h), self.scale(h) + 1e-4


def make_model_and_guide(x_dim, z_dim=40, hidden=300):
    decoder = nn.Sequential(
        nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, x_dim)
    )
    encoder = Encoder(x_dim, z_dim, hidden)

    def model(x):  # p(x, z; θ): z ~ N(0, I), x | z ~ Bernoulli(decoder(z))
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):  # q(z | x; φ): a Gaussian proposal
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(*encoder(x)).to_event(1))

    return model, guide


# ---------------------------------------------------------------- training
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-train", type=int, default=10000)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--K", type=int, default=50)
    parser.add_argument("--J", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-K", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    if data_root_exists(args.data_root):
        data = load_images("static-mnist", args.data_root, max_train=args.max_train, max_eval=args.max_test)
    else:
        print("no data root found: using scikit-learn's 8x8 digits instead of MNIST")
        data = load_digits_binary()
    print(f"{data.name}: {len(data.train)} train / {len(data.test)} test images of {data.image_shape}")

    model, guide = make_model_and_guide(data.num_pixels)
    steps = args.epochs * -(-len(data.train) // args.batch_size)
    # α grows from 0 to 1 over the first half of training (the paper: +0.01 per epoch)
    annealing = Annealing(increment=0.01, every=max(1, steps // 200))
    iwem = IWEM(model, guide, K=args.K, J=args.J, optim=pyro.optim.Adam({"lr": args.lr}), annealing=annealing)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        bar = tqdm(data.batches("train", args.batch_size, epoch=epoch, seed=args.seed), desc=f"epoch {epoch + 1}")
        total = n = 0
        for x in bar:
            total += iwem.step(x)
            n += len(x)
            bar.set_postfix(loss=f"{total / n:.2f}", alpha=f"{iwem.alpha:.2f}", ess=f"{iwem.ess:.1f}")
    train_seconds = time.perf_counter() - start

    test_ll = torch.cat(
        [iwae_bound(model, guide, x, num_particles=args.eval_K) for x in data.batches("test", args.batch_size)]
    ).mean()
    print(f"trained {args.epochs} epochs in {train_seconds:.0f} s")
    print(f"test log-likelihood (IWAE bound, K={args.eval_K}): {test_ll:.2f} nats")


if __name__ == "__main__":
    main()
