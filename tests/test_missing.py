"""miss-IWEM's proposal inputs (§4.1) on the particle machinery."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_iwem import IWEM, observe_masked
from pyro_iwem.infer import ImputedInputs, ParticleSampler, ZeroFilledInputs, build_method

T = torch.float64


class LinearGaussian:
    """z ~ N(0, 1), x_d | z ~ N(w_d z, 0.5²); guide q(z | x) = N(a·x, 0.8²)."""

    w = torch.tensor([1.0, -2.0, 0.5], dtype=T)

    def model(self, x, mask):
        w = pyro.param("w", self.w.clone())
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=T), 1.0))
            observe_masked("x", dist.Normal(z.unsqueeze(-1) * w, 0.5), x, mask, event_dim=1)

    def guide(self, x, mask):
        a = pyro.param("a", torch.tensor([0.3, -0.2, 0.1], dtype=T))
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.Normal((x * a).sum(-1), 0.8))


def test_miss_iwem_weights_are_p_xo_z_over_q_z_given_the_completion():
    m = LinearGaussian()
    x = torch.randn(4, 3, dtype=T)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    x = torch.where(mask, x, torch.nan)  # missing entries may hold anything, even NaN
    completions = []
    inputs = ImputedInputs(site="x")

    def recording(model, guide, args, kwargs):
        out = inputs(model, guide, args, kwargs)
        completions.append(out[0][0])
        return out

    p = ParticleSampler(m.model, m.guide, guide_inputs=recording)(6, (x, mask), {})
    x_breve = completions[0]
    assert x_breve.shape == (4, 3) and torch.isfinite(x_breve).all()
    assert torch.equal(x_breve[mask], x[mask])  # observed entries kept, missing ones imputed
    z = p.guide_trace.nodes["z"]["value"]
    a, w = pyro.param("a"), pyro.param("w")
    lik = dist.Normal(z.unsqueeze(-1) * w, 0.5)
    x0 = torch.where(mask, x, 0.0)
    log_p_xo_z = dist.Normal(0.0, 1.0).log_prob(z) + (lik.log_prob(x0) * mask).sum(-1)
    log_q = dist.Normal((x_breve * a).sum(-1), 0.8).log_prob(z)
    torch.testing.assert_close(p.log_w, log_p_xo_z - log_q)
    x_m = p.model_trace.nodes["x_unobserved"]["value"]
    torch.testing.assert_close(p.log_p, log_p_xo_z + (lik.log_prob(x_m) * ~mask).sum(-1))


def test_imputation_draws_from_the_models_conditional_given_a_guide_draw():
    """x̆_m ~ p(x_m | z̆) with z̆ ~ q(z | x_o, 0): over many data, its moments match the closed form."""
    m = LinearGaussian()
    n = 20000
    x = torch.zeros(n, 3, dtype=T)
    x[:, 0] = 1.0
    mask = torch.tensor([True, False, False]).expand(n, 3)
    completed = ImputedInputs()(m.model, m.guide, (x, mask), {})[0][0]
    # z̆ ~ N(0.3 · 1, 0.8²), x_2 = -2 z̆ + 0.5 ε: mean -0.6, variance 4·0.64 + 0.25
    assert completed[:, 1].mean().item() == pytest.approx(-0.6, abs=0.05)
    assert completed[:, 1].var().item() == pytest.approx(4 * 0.64 + 0.25, rel=0.05)
    assert torch.equal(completed[:, 0], x[:, 0])


def test_zero_filled_inputs_are_miss_iwaes_proposal():
    m = LinearGaussian()
    x = torch.randn(5, 3, dtype=T)
    mask = torch.rand(5, 3) > 0.4
    (x0, mask_out), _ = ZeroFilledInputs()(m.model, m.guide, (x, mask), {})
    assert torch.equal(x0, torch.where(mask, x, 0.0)) and mask_out is mask


def test_with_nothing_missing_miss_iwem_is_iwem():
    """All entries observed: the completion is x itself, so one step of each moves the same way."""
    m = LinearGaussian()
    x = torch.randn(8, 3, dtype=T)
    mask = torch.ones(8, 3, dtype=torch.bool)

    def run(**kw):
        pyro.clear_param_store()
        pyro.set_rng_seed(5)
        IWEM(m.model, m.guide, K=5, J=5, max_plate_nesting=1, optim=pyro.optim.SGD({"lr": 0.01}), **kw).step(x, mask)
        return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    plain, missing = run(), run(guide_inputs=ImputedInputs())
    for name in plain:
        torch.testing.assert_close(plain[name], missing[name])


@pytest.mark.parametrize("name", ["miss-iwae", "miss-iwem", "miss-iwem-woa"])
def test_missing_data_methods_step(name):
    m = LinearGaussian()
    x = torch.randn(8, 3, dtype=T)
    mask = torch.rand(8, 3) > 0.3
    method = build_method(name, m.model, m.guide, K=4, J=4)
    assert torch.isfinite(torch.tensor(method.step(x, mask)))


def test_imputed_inputs_need_an_unobserved_site():
    m = LinearGaussian()
    x, mask = torch.randn(3, 3, dtype=T), torch.ones(3, 3, dtype=torch.bool)
    mask[0, 1] = False
    with pytest.raises(ValueError, match="no site 'y_unobserved'"):
        ImputedInputs(site="y")(m.model, m.guide, (x, mask), {})
    with pytest.raises(ValueError, match="argument 'mask'"):
        ImputedInputs(mask="mask")(m.model, m.guide, (x, mask), {})
