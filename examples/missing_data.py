"""miss-IWEM on your own Pyro model: fit data with missing entries, then impute them.

The model below is an ordinary Pyro model of a table (a 2-d latent factor, a small decoder
network, Gaussian entries) that observes its data with a mask, True where an entry was
observed: ``pyro_iwem.observe_masked("x", d, x, mask, event_dim=1)``, which is Pyro's
``obs_mask=`` for a mask that also covers the event dimensions (Pyro's own ``obs_mask=`` works
as it is when the mask covers batch dimensions only). Nothing else is needed for miss-IWEM:

* ``IWEM(..., guide_inputs=ImputedInputs(site="x"))`` tells IWEM which argument is the data
  (position 0 by default), which is the mask (position 1) and which site is observed, so the
  guide sees miss-IWEM's completion of the data (§4.1 of the paper);
* ``Imputer(...).mean(x, mask)`` fills the missing entries with the importance-weighted mean
  of the decoder's mean.

Run:  python examples/missing_data.py     (about half a minute on a laptop CPU)
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_iwem import IWEM, observe_masked
from pyro_iwem.infer import ImputedInputs, Imputer

D, Z = 6, 2


class Table(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(Z, 32), nn.Tanh(), nn.Linear(32, 2 * D))
        self.encoder = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, 2 * Z))

    def model(self, x, mask):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            loc, log_scale = self.decoder(z).chunk(2, -1)
            observe_masked("x", dist.Normal(loc, log_scale.exp() + 1e-3), x, mask, event_dim=1)

    def guide(self, x, mask):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp() + 1e-3).to_event(1))


def synthetic_table(n, generator):
    """Six noisy non-linear functions of a 2-d factor, standardised."""
    u = torch.randn(n, Z, generator=generator)
    x = torch.stack([u[:, 0], u[:, 1], u[:, 0] * u[:, 1], torch.sin(u[:, 0]), u[:, 0] + u[:, 1], u[:, 1] ** 2], -1)
    x = x + 0.1 * torch.randn(n, D, generator=generator)
    return (x - x.mean(0)) / x.std(0)


def main(steps=1500, batch_size=64):
    pyro.set_rng_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = synthetic_table(1000, generator)
    mask = torch.rand(x.shape, generator=generator) > 0.3  # 30% missing completely at random
    x_seen = torch.where(mask, x, 0.0)  # what a user has: the missing entries hold anything finite

    table = Table()
    iwem = IWEM(table.model, table.guide, K=20, J=20, guide_inputs=ImputedInputs(site="x"),
                optim=pyro.optim.Adam({"lr": 3e-3}), annealing=None)  # α ≡ 1: miss-IWEM-woa
    for step in range(steps):
        rows = torch.randint(0, len(x), (batch_size,))
        loss = iwem.step(x_seen[rows], mask[rows])
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step:5d}  E-step loss/datum {loss / batch_size:8.3f}  ESS {iwem.ess:5.2f}")

    imputed = Imputer(table.model, table.guide, guide_inputs=ImputedInputs(site="x")).mean(
        x_seen, mask, num_particles=1000
    )
    column_means = (x_seen.sum(0) / mask.sum(0)).expand_as(x)
    for name, guess in (("miss-IWEM", imputed), ("column means", column_means)):
        print(f"imputation MSE, {name:12s}: {((guess - x)[~mask] ** 2).mean():.3f}")


if __name__ == "__main__":
    main()
