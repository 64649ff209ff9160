"""A small AIR-like model (after Eslami et al. 2016 and Pyro's ``examples/air/air.py``), as a
Pyro user writes it: for ONE particle at a time.

Canvases of ``size x size`` pixels hold 0-2 small bright squares. The model runs ``T``
steps; at step t a presence variable z_pres_t ~ Bernoulli(0.5 z_pres_{t-1}) says whether
an object is drawn (once one is absent, so are all later ones: its density is also masked
by the previous presence with ``poutine.mask``), z_where_t ~ N(0, 0.5^2 I) places it (its
density masked by z_pres_t with ``.mask()``), and a Gaussian blob of learnt amplitude and
width is added at z_where_t. The canvas is observed with a Normal likelihood of learnt
noise scale.

The guide is recurrent, as AIR's: a GRU cell over steps reads an embedding of the image and
the previous step's latents and emits the presence probability (``pres_head``) and the
z_where Normal's parameters (``where_head``).

Both are written with explicit batch shapes (``x.view(n, -1)``, ``z_pres.view(n)``,
``torch.cat(..., dim=1)`` of latents with per-datum tensors), so they break under a
vectorised particle plate and need ``vectorize_particles=False``.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro import poutine
from torch.distributions import constraints


class AIRLike(nn.Module):
    def __init__(self, size=12, num_steps=3, hidden=32, subsample_size=None):
        super().__init__()
        self.size, self.num_steps, self.hidden = size, num_steps, hidden
        self.subsample_size = subsample_size
        coords = torch.linspace(-1.0, 1.0, size)
        gy, gx = torch.meshgrid(coords, coords, indexing="ij")
        self.register_buffer("grid", torch.stack((gx.reshape(-1), gy.reshape(-1)), dim=1))  # (P, 2)
        # guide networks
        self.embed = nn.Linear(size * size, hidden)
        self.rnn = nn.GRUCell(hidden + 2 + 1, hidden)
        self.h_init = nn.Parameter(torch.zeros(1, hidden))
        self.pres_head = nn.Linear(hidden, 1)
        self.where_head = nn.Linear(hidden, 4)
        self.guide_indices = []  # the data plate's indices each guide run saw
        self.model_indices = []

    # ---- generative model -------------------------------------------------------------

    def render(self, z_where, amplitude, width):
        """A Gaussian blob per datum at z_where (n, 2): (n, size*size)."""
        n = z_where.size(0)
        d2 = (self.grid.view(1, -1, 2) - z_where.view(n, 1, 2)).pow(2).sum(-1)
        return amplitude * torch.exp(-0.5 * d2 / width**2)

    def model(self, data):
        amplitude = pyro.param("amplitude", torch.tensor(0.5), constraint=constraints.positive)
        width = pyro.param("width", torch.tensor(0.3), constraint=constraints.positive)
        sigma = pyro.param("sigma", torch.tensor(0.5), constraint=constraints.positive)
        with pyro.plate("data", data.size(0), subsample_size=self.subsample_size) as ix:
            self.model_indices.append(ix.clone())
            batch = data[ix]
            n = batch.size(0)
            canvas = batch.new_zeros(n, self.size * self.size)
            prev_pres = batch.new_ones(n, 1)
            for t in range(self.num_steps):
                with poutine.mask(mask=prev_pres.view(n).bool()):
                    z_pres = pyro.sample(f"z_pres_{t}", dist.Bernoulli(0.5 * prev_pres).to_event(1))
                z_where = pyro.sample(
                    f"z_where_{t}",
                    dist.Normal(batch.new_zeros(n, 2), 0.5).mask(z_pres.view(n, 1).bool()).to_event(1),
                )
                canvas = canvas + z_pres.view(n, 1) * self.render(z_where, amplitude, width)
                prev_pres = z_pres
            pyro.sample("obs", dist.Normal(canvas.view(n, -1), sigma).to_event(1), obs=batch.view(n, -1))

    # ---- recurrent guide --------------------------------------------------------------

    def guide(self, data):
        pyro.module("air_guide", self)
        with pyro.plate("data", data.size(0), subsample_size=self.subsample_size) as ix:
            self.guide_indices.append(ix.clone())
            batch = data[ix]
            n = batch.size(0)
            embedding = F.relu(self.embed(batch.view(n, -1)))
            h = self.h_init.expand(n, -1)
            prev_pres = batch.new_ones(n, 1)
            prev_where = batch.new_zeros(n, 2)
            for t in range(self.num_steps):
                h = self.rnn(torch.cat((embedding, prev_where, prev_pres), dim=1), h)
                pres_p = torch.sigmoid(self.pres_head(h))
                with poutine.mask(mask=prev_pres.view(n).bool()):
                    z_pres = pyro.sample(f"z_pres_{t}", dist.Bernoulli(pres_p * prev_pres).to_event(1))
                loc, scale = self.where_head(h).chunk(2, dim=1)
                z_where = pyro.sample(
                    f"z_where_{t}",
                    dist.Normal(loc, F.softplus(scale) + 1e-3).mask(z_pres.view(n, 1).bool()).to_event(1),
                )
                prev_pres, prev_where = z_pres, z_where

    def presence_head_params(self):
        return list(self.pres_head.parameters())


def make_scenes(n, size=12, square=3, max_objects=2, noise=0.05, seed=0):
    """``n`` canvases (n, size, size) with 0..max_objects squares of side ``square`` at uniform
    positions, plus Gaussian pixel noise. Returns ``(images, counts)``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, size, size)
    counts = torch.randint(0, max_objects + 1, (n,), generator=g)
    for i in range(n):
        for _ in range(int(counts[i])):
            r, c = torch.randint(0, size - square + 1, (2,), generator=g).tolist()
            images[i, r : r + square, c : c + square] += 1.0
    images = images + noise * torch.randn(n, size, size, generator=g)
    return images, counts
