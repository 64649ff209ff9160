"""Two losses on one draw with one backward pass through the model (IWEM's one-pass step),
against autograd on the whole graph of the same draw."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

from pyro_iwem import IWEM, Annealing
from pyro_iwem.infer import ParticleSampler, snis_objective
from pyro_iwem.infer.grads import shared_draw_gradients
from pyro_iwem.infer.transforms import CutLatents, DetachModelProposals
from pyro_iwem.infer.objectives import iwae_objective, optimal_proposal_objective

D, d = 3, 2


class CountingIdentity(torch.autograd.Function):
    """The identity; counts the backward passes through it."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        CountingIdentity.calls += 1
        return grad


def params():
    g = torch.Generator().manual_seed(3)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return {"a": randn(d), "W": randn(D, d), "b": randn(D), "A1": 0.3 * randn(d, D), "A2": 0.3 * randn(d, D), "c": randn(d)}


def model(x):
    """z1 ~ N(0, I), z2 | z1 ~ N(a z1, I), x | z2 ~ N(W z2 + b, 0.7^2 I); the mean counts backward passes."""
    init = params()
    a, W, b = (pyro.param(n, init[n]) for n in ("a", "W", "b"))
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))
        z2 = pyro.sample("z2", dist.Normal(a * z1, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(CountingIdentity.apply(z2 @ W.T + b), 0.7).to_event(1), obs=x)


def guide(x):
    """q(z1 | x) q(z2 | z1, x): the second latent depends on the first, so a latent's gradient
    reaches φ along two paths through the guide."""
    init = params()
    A1, A2, c = (pyro.param(n, init[n]) for n in ("A1", "A2", "c"))
    s = pyro.param("s", torch.ones(d, dtype=torch.float64), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(x @ A1.T, s).to_event(1))
        pyro.sample("z2", dist.Normal(c * z1 + x @ A2.T, s).to_event(1))


def global_model(x):
    """A global latent u outside the data plate: particles' weights couple the whole batch."""
    w = pyro.param("w", torch.tensor(0.8, dtype=torch.float64))
    u = pyro.sample("u", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(CountingIdentity.apply(w * u), 0.7), obs=x)


def global_guide(x):
    m = pyro.param("m", torch.tensor(0.1, dtype=torch.float64))
    s = pyro.param("su", torch.tensor(0.9, dtype=torch.float64), constraint=constraints.positive)
    pyro.sample("u", dist.Normal(m, s))


def snis(alpha):
    return lambda p: -(p.scale * snis_objective(p, p.num_particles, alpha)).sum()


def scaled(objective):
    return lambda p: -(p.scale * objective(p)).sum()


def only_particle(k):
    return lambda p: -p.log_p[k].sum()


def draw(sampler, x, cut, seed=7):
    pyro.set_rng_seed(seed)
    return sampler(5, (x,), {}, grad_guide=True, transforms=(DetachModelProposals(),) + ((CutLatents(),) if cut else ()))


def shared_and_reference(model, guide, x, theta_loss, phi_loss):
    """``shared_draw_gradients`` on a cut draw, its backward passes through the model, and
    autograd on the whole graph of the same draw (θ along the θ-loss, φ along the φ-loss)."""
    sampler = ParticleSampler(model, guide)
    particles = draw(sampler, x, cut=True)
    groups = particles.param_groups()
    CountingIdentity.calls = 0
    grads, theta_value, phi_value = shared_draw_gradients(particles, theta_loss, phi_loss, groups.theta, groups.phi)
    passes = CountingIdentity.calls
    whole = draw(sampler, x, cut=False)
    theta, phi = sorted(groups.theta, key=id), sorted(groups.phi, key=id)
    expected = dict(zip(theta, torch.autograd.grad(theta_loss(whole), theta, retain_graph=True)))
    expected.update(zip(phi, torch.autograd.grad(phi_loss(whole), phi)))
    assert theta_value.item() == pytest.approx(theta_loss(whole).item())
    assert phi_value.item() == pytest.approx(phi_loss(whole).item())
    return grads, expected, passes


def assert_same(grads, expected):
    assert set(grads) == set(expected) and len(expected) >= 3
    for p, g in expected.items():
        torch.testing.assert_close(grads[p], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "theta_loss, phi_loss",
    [
        (snis(1.0), scaled(optimal_proposal_objective)),
        (snis(0.4), scaled(optimal_proposal_objective)),
        (snis(1.0), scaled(iwae_objective)),
    ],
    ids=["snis-optimal", "annealed-optimal", "snis-iwae"],
)
def test_one_backward_pass_through_the_model_gives_both_gradients(theta_loss, phi_loss):
    x = torch.randn(4, D, dtype=torch.float64)
    grads, expected, passes = shared_and_reference(model, guide, x, theta_loss, phi_loss)
    assert passes == 1
    assert_same(grads, expected)


def test_two_passes_where_the_theta_loss_gives_a_particle_no_weight_that_the_phi_loss_does():
    """a_k = 0 where b_k ≠ 0: b / a is undefined, so each loss gets its own backward pass."""
    x = torch.randn(4, D, dtype=torch.float64)
    grads, expected, passes = shared_and_reference(model, guide, x, only_particle(0), only_particle(1))
    assert passes == 2
    assert_same(grads, expected)


def test_two_passes_for_a_global_latent():
    """A latent every datum shares: its gradient sums over data with the θ-loss's weights and
    cannot be reweighted per datum."""
    x = torch.randn(6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="every latent of the model is global.*'u'"):
        grads, expected, passes = shared_and_reference(
            global_model, global_guide, x, snis(1.0), scaled(optimal_proposal_objective)
        )
    assert passes == 2
    assert set(grads) == set(expected) and len(expected) == 3
    for p, g in expected.items():
        torch.testing.assert_close(grads[p], g, rtol=1e-10, atol=1e-12)


def test_one_pass_iwem_step_takes_one_backward_pass_through_the_model():
    """IWEM(one_pass=True): one decoder backward per step; with SGD at lr 1 it moves θ along
    ∇θ Q̂_α and φ along ∇φ L_opt of the same draw."""
    x = torch.randn(4, D, dtype=torch.float64)
    iwem = IWEM(model, guide, K=5, optim=pyro.optim.SGD({"lr": 1.0}), one_pass=True,
                annealing=Annealing(start=0.5, stop=0.5))
    whole = draw(iwem.sampler, x, cut=False)
    groups = whole.param_groups()
    theta, phi = sorted(groups.theta, key=id), sorted(groups.phi, key=id)
    expected = [p.detach() + g for p, g in zip(theta, torch.autograd.grad(-snis(0.5)(whole), theta, retain_graph=True))]
    expected += [p.detach() + g for p, g in zip(phi, torch.autograd.grad(-scaled(optimal_proposal_objective)(whole), phi))]
    CountingIdentity.calls = 0
    pyro.set_rng_seed(7)
    iwem.step(x)
    assert CountingIdentity.calls == 1
    for p, e in zip(theta + phi, expected):
        torch.testing.assert_close(p.detach(), e)


def mixed_model(x):
    """A discrete latent c (score-function gradient in the guide) beside a Gaussian z."""
    init = params()
    W, b = pyro.param("W", init["W"]), pyro.param("b", init["b"])
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.5, dtype=x.dtype)))
        z = pyro.sample("z", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))
        loc = CountingIdentity.apply(z @ W.T + b + c.unsqueeze(-1))
        pyro.sample("x", dist.Normal(loc, 0.7).to_event(1), obs=x)


def mixed_guide(x):
    init = params()
    A1 = pyro.param("A1", init["A1"])
    logit = pyro.param("logit", torch.tensor(0.2, dtype=torch.float64))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Bernoulli(logits=logit.expand(x.shape[:1])))
        pyro.sample("z", dist.Normal(x @ A1.T, 0.8).to_event(1))


def test_one_backward_pass_beside_a_discrete_latent():
    """Only the reparameterised latent is cut; the discrete one keeps its score-function term
    (VIMCO) in the P-step's loss, and its ratio is not applied to the other latent."""
    x = torch.randn(4, D, dtype=torch.float64)
    grads, expected, passes = shared_and_reference(
        mixed_model, mixed_guide, x, snis(1.0), scaled(optimal_proposal_objective)
    )
    assert passes == 1
    assert_same(grads, expected)
