"""A small semi-supervised VAE after Kingma et al. (2014)'s M2, as a Pyro user writes it.

The model p(x, y, z; θ) = p(y) p(z) p(x | y, z; θ) has a discrete class label y, observed
for the labelled data and latent for the rest; the guide q(y | x) q(z | x, y) proposes the
label with a classifier, a non-reparameterisable site. One ``nn.Module`` holds the
classifier, the z-encoder and the decoder and is registered whole with
``pyro.module("ss_vae", self)`` in both model and guide (as Pyro's ``ss_vae_M2`` example
does), so which parameters are θ and which are φ can only be read off the autograd graph.

The data are tiny synthetic binary "images": noisy copies (independent pixel flips) of a
few class prototypes.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F


def _cat(*tensors):
    """Concatenates along the last dim, broadcasting the batch dims (the particle plate
    adds a dim on the left of latents but not of the data)."""
    batch = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(batch + t.shape[-1:]) for t in tensors], dim=-1)


class SSVAE(nn.Module):
    """M2: ``encoder_y`` (classifier, logits of q(y | x)), ``encoder_z`` (q(z | x, y)) and
    ``decoder`` (logits of p(x | y, z))."""

    def __init__(self, x_dim=16, y_dim=3, z_dim=2, hidden=32):
        super().__init__()
        self.x_dim, self.y_dim, self.z_dim = x_dim, y_dim, z_dim
        self.encoder_y = nn.Sequential(nn.Linear(x_dim, hidden), nn.Softplus(), nn.Linear(hidden, y_dim))
        self.encoder_z = nn.Sequential(nn.Linear(x_dim + y_dim, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim + y_dim, hidden), nn.Softplus(), nn.Linear(hidden, x_dim))

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        n = xs.shape[0]
        with pyro.plate("data", n):
            prior = xs.new_zeros(n, self.y_dim)  # uniform over the classes
            y = pyro.sample("y", dist.OneHotCategorical(logits=prior), obs=ys)
            z = pyro.sample("z", dist.Normal(xs.new_zeros(n, self.z_dim), 1.0).to_event(1))
            logits = self.decoder(_cat(z, y))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        pyro.module("ss_vae", self)
        n = xs.shape[0]
        with pyro.plate("data", n):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(logits=self.encoder_y(xs)))
            loc, scale = self.encoder_z(_cat(xs, ys)).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, F.softplus(scale) + 1e-3).to_event(1))

    def classify(self, xs):
        """The classifier's most probable class per image."""
        with torch.no_grad():
            return self.encoder_y(xs).argmax(-1)

    def classifier_params(self):
        return list(self.encoder_y.parameters())

    def decoder_params(self):
        return list(self.decoder.parameters())


def make_prototypes(num_classes=3, x_dim=16, seed=0):
    """Class prototypes: binary patterns, pairwise at Hamming distance >= x_dim / 3."""
    g = torch.Generator().manual_seed(seed)
    while True:
        protos = (torch.rand(num_classes, x_dim, generator=g) < 0.5).float()
        dist_ = (protos[:, None] != protos[None]).sum(-1) + x_dim * torch.eye(num_classes)
        if dist_.min() >= x_dim // 3:
            return protos


def make_data(n, prototypes, flip=0.1, seed=0):
    """``n`` images: a uniformly drawn class's prototype with each pixel flipped with
    probability ``flip``. Returns ``(xs, labels)``, labels as class indices."""
    g = torch.Generator().manual_seed(seed)
    num_classes = prototypes.shape[0]
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    flips = (torch.rand(n, prototypes.shape[1], generator=g) < flip).float()
    xs = (prototypes[labels] + flips) % 2
    return xs, labels


def one_hot(labels, num_classes):
    return F.one_hot(labels, num_classes).float()


class LabelMixture(nn.Module):
    """M2 without the style variable: p(y) uniform, p(x | y) independent Bernoulli pixels of
    learnt logits per class, q(y | x) a linear classifier. Small enough that the IWAE bound
    of K particles is an exact sum over the ``num_classes ** K`` label tuples."""

    def __init__(self, x_dim=16, y_dim=3):
        super().__init__()
        self.y_dim = y_dim
        self.class_logits = nn.Parameter(0.5 * torch.randn(y_dim, x_dim))
        self.encoder_y = nn.Linear(x_dim, y_dim)

    def model(self, xs):
        pyro.module("mixture", self)
        with pyro.plate("data", xs.shape[0]):
            y = pyro.sample("y", dist.OneHotCategorical(logits=xs.new_zeros(xs.shape[0], self.y_dim)))
            pyro.sample("x", dist.Bernoulli(logits=y @ self.class_logits).to_event(1), obs=xs)

    def guide(self, xs):
        pyro.module("mixture", self)
        with pyro.plate("data", xs.shape[0]):
            pyro.sample("y", dist.OneHotCategorical(logits=self.encoder_y(xs)))

    def exact_iwae(self, x, K):
        """The IWAE bound E_{y_1..K ~ q}[log 1/K sum_k p(x, y_k) / q(y_k | x)] of one image x."""
        import itertools
        import math

        log_q = torch.log_softmax(self.encoder_y(x), -1)
        log_p = -math.log(self.y_dim) + dist.Bernoulli(logits=self.class_logits).log_prob(x).sum(-1)
        log_w = log_p - log_q
        total = 0.0
        for ys in itertools.product(range(self.y_dim), repeat=K):
            ys = list(ys)
            total = total + log_q[ys].sum().exp() * (torch.logsumexp(log_w[ys], 0) - math.log(K))
        return total
