"""An AIR-like model written for one particle at a time: ``vectorize_particles=False``,
score-function gradients for the recurrent guide's presence head, one subsample per step."""

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, RenyiELBO

from pyro_iwem import IWEM, IWAELoss
from tests.air_like import AIRLike, make_scenes


@pytest.fixture
def scenes():
    images, _ = make_scenes(64, size=12, seed=0)
    return images


def grad_norm(params):
    return sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None) ** 0.5


def batches(images, batch_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield images[torch.randint(0, len(images), (batch_size,), generator=g)]


def test_vectorised_particles_fail_with_a_hint(scenes):
    net = AIRLike()
    with pytest.raises(Exception, match="vectorize_particles=False"):
        IWAELoss(5).loss_and_grads(net.model, net.guide, scenes[:8])
    pyro.clear_param_store()
    net = AIRLike()
    iwem = IWEM(net.model, net.guide, K=5, J=5, annealing=None)
    with pytest.raises(Exception, match="vectorize_particles=False"):
        iwem.step(scenes[:8])


def test_iwem_unvectorised_bound_rises(scenes):
    net = AIRLike()
    iwem = IWEM(
        net.model, net.guide, K=5, J=5, optim=pyro.optim.Adam({"lr": 1e-2}), annealing=None, vectorize_particles=False
    )
    bounds, data = [], batches(scenes, 8)
    for _ in range(80):
        loss = iwem.step(next(data))
        assert isinstance(loss, float)
        bounds.append(float(iwem.bound))
    first, last = sum(bounds[:10]) / 10, sum(bounds[-10:]) / 10
    assert torch.isfinite(torch.tensor(bounds)).all()
    assert last > first + 5.0, f"IWAE bound per datum: first 10 {first:.1f}, last 10 {last:.1f}"


def test_svi_iwae_loss_unvectorised_falls(scenes):
    net = AIRLike()
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 1e-2}), IWAELoss(5, vectorize_particles=False))
    losses, data = [], batches(scenes, 8)
    for _ in range(80):
        losses.append(svi.step(next(data)))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 40.0, f"IWAE loss (batch of 8): first 10 {first:.1f}, last 10 {last:.1f}"


def test_presence_head_gets_score_function_gradient(scenes):
    x = scenes[:16]
    net = AIRLike()
    IWAELoss(5, vectorize_particles=False).loss_and_grads(net.model, net.guide, x)
    presence = grad_norm(net.presence_head_params())
    assert presence > 1e-3
    assert all(torch.isfinite(p.grad).all() for p in net.presence_head_params())
    assert grad_norm(net.where_head.parameters()) > 1e-3

    # Pyro's IWAE drops the score term of a non-reparameterised site at alpha = 0
    for p in net.parameters():
        p.grad = None
    RenyiELBO(alpha=0, num_particles=5).loss_and_grads(net.model, net.guide, x)
    assert grad_norm(net.presence_head_params()) == 0.0
    assert grad_norm(net.where_head.parameters()) > 1e-3


def test_every_particle_sees_one_subsample(scenes):
    net = AIRLike(subsample_size=4)
    loss = IWAELoss(5, vectorize_particles=False)
    loss.loss_and_grads(net.model, net.guide, scenes)  # a first call may guess plate nesting
    seen = []
    for _ in range(3):
        net.guide_indices.clear()
        net.model_indices.clear()
        loss.loss_and_grads(net.model, net.guide, scenes)
        assert len(net.guide_indices) >= 5
        assert all(torch.equal(ix, net.guide_indices[0]) for ix in net.guide_indices), net.guide_indices
        assert all(torch.equal(ix, net.guide_indices[0]) for ix in net.model_indices), net.model_indices
        assert len(net.guide_indices[0]) == 4
        seen.append(net.guide_indices[0])
    assert not all(torch.equal(ix, seen[0]) for ix in seen), "the data plate did not subsample"

    # IWEM: the E-step's K particles and the P-step's J particles share one subsample
    pyro.clear_param_store()
    net = AIRLike(subsample_size=4)
    iwem = IWEM(net.model, net.guide, K=5, J=3, annealing=None, vectorize_particles=False)
    iwem.step(scenes)
    net.guide_indices.clear()
    net.model_indices.clear()
    iwem.step(scenes)
    assert len(net.guide_indices) >= 5 + 3
    assert all(torch.equal(ix, net.guide_indices[0]) for ix in net.guide_indices + net.model_indices)
