"""Module-local parameters (``pyro.settings.set(module_local_params=True)``): parameters that
the model and the guide name alike are refused with a message naming them, instead of one of
them silently never being trained; named apart, they train exactly as in the global store."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroParam

from pyro_iwem.infer import IWEM
from pyro_iwem.infer.util import ModelError


class _WithLoc(PyroModule):
    """A root module with one parameter ``loc`` (site name ``loc``, or ``NAME.loc``)."""

    def __init__(self, name=""):
        super().__init__(name=name)
        self.loc = PyroParam(torch.zeros(2))


class Model(_WithLoc):
    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(self.loc, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


class Guide(_WithLoc):
    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc + 0 * x, 1.0).to_event(1))


def _fit(local, guide_name):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.settings.context(module_local_params=local):
        model, guide = Model("model" if local else ""), Guide(guide_name)
        x = torch.randn(10, 2) + 3.0
        algo = IWEM(model, guide, K=5, J=5, optim=pyro.optim.Adam({"lr": 0.1}))
        for _ in range(3):
            algo.step(x)
        return model.loc.detach().clone(), guide.loc.detach().clone()


def test_same_names_refused_before_any_parameter_moves():
    pyro.clear_param_store()
    with pyro.settings.context(module_local_params=True):
        model, guide = Model(), Guide()
        algo = IWEM(model, guide, K=5, J=5, optim=pyro.optim.Adam({"lr": 0.1}))
        with pytest.raises(ModelError, match=r"own parameter 'loc'.*name=\"guide\""):
            algo.step(torch.randn(10, 2))
        assert torch.equal(model.loc.detach(), torch.zeros(2))
        assert torch.equal(guide.loc.detach(), torch.zeros(2))


def test_named_apart_trains_both_as_the_global_store_does():
    model_loc, guide_loc = _fit(local=True, guide_name="guide")
    ref_model, ref_guide = _fit(local=False, guide_name="guide")
    assert not torch.equal(guide_loc, torch.zeros(2))  # the guide is trained
    assert torch.allclose(model_loc, ref_model, atol=1e-6) and torch.allclose(guide_loc, ref_guide, atol=1e-6)
