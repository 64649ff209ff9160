"""Device and dtype: every tensor pyro_iwem makes follows the model's (the CUDA path, on the CPU).

While a test runs, torch's default device is ``meta`` and its default dtype float64; the
models, their parameters and the data are float32 on the CPU. A tensor the library made
without naming a device (``torch.zeros(n)``, as a CUDA run would get it on the CPU) lands on
``meta``, and the first operation that mixes it with the model's raises. One made without
naming a dtype is float64 and silently promotes what it touches: a dispatch mode records every
float64 tensor with at least one dimension that an operation returns (0-d tensors, such as
``torch.optim.Adam``'s step counter, never promote a tensor with dimensions). The last two
tests show that both guards catch what they are for.
"""

import math
from collections import Counter
from contextlib import contextmanager

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pyro_iwem import IWEM, Annealing, iwae_bound
from pyro_iwem.infer import METHODS, MISSING_DATA_INPUTS, Imputer, ImputedInputs, build_method, estimate_variance
from pyro_iwem.models import MLPVAE

F32 = torch.float32


class Float64Outputs(TorchDispatchMode):
    """Counts, per operation, the float64 tensors with dimensions that operations return."""

    def __init__(self):
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.dim() > 0:
                self.seen[str(func)] += 1
        return out


@contextmanager
def elsewhere():
    """The defaults a CPU float32 model must not depend on: device ``meta``, dtype float64
    (entered once the model and the data exist)."""
    torch.set_default_device("meta")
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_device(None)
        torch.set_default_dtype(torch.float32)


def _vae():
    torch.manual_seed(0)
    return MLPVAE(x_dim=12, z_dim=3, hidden=(8,))


def _data():
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(6, 12, generator=g) < 0.4).to(F32)
    mask = torch.rand(6, 12, generator=g) > 0.3
    return x, mask


def _params():
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in store.keys()}


def _check_steps(step, args, before=None):
    """Two steps: finite losses, no float64 tensor made, every parameter float32 on the CPU and moved."""
    with Float64Outputs() as recorder:
        losses = [step(*args) for _ in range(2)]
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses), losses
    assert not recorder.seen, f"float64 tensors made in a float32 step: {dict(recorder.seen)}"
    after = _params()
    assert after and all(p.device.type == "cpu" and p.dtype == F32 for p in after.values())
    if before is not None:
        assert [n for n in before if not torch.equal(before[n], after[n])], "no parameter moved"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_keeps_to_the_models_device_and_dtype(name):
    vae = _vae()
    x, mask = _data()
    args = (x, mask) if name in MISSING_DATA_INPUTS else (x,)
    iwem_options = {"proposal_inflation": 1.5} if name.startswith(("iwem", "miss-iwem")) else {}
    method = build_method(name, vae.model, vae.guide, K=4, J=3, annealing=Annealing(start=0.5, stop=0.5), **iwem_options)
    with elsewhere():
        method.step(*args)  # registers the parameters
        _check_steps(method.step, args, _params())


@pytest.mark.parametrize(
    "options",
    [{"one_pass": True}, {"p_step_inflation": 2.0}, {"proposal": "iwae", "annealing": None}, {"vectorize_particles": False}],
    ids=["one-pass", "p-step-inflation", "iwae-p-step", "one-particle-at-a-time"],
)
def test_iwem_options_keep_to_the_models_device_and_dtype(options):
    vae = _vae()
    x, _ = _data()
    iwem = IWEM(vae.model, vae.guide, K=4, J=3, **{"annealing": Annealing(start=0.5, stop=0.5), **options})
    with elsewhere():
        iwem.step(x)
        _check_steps(iwem.step, (x,), _params())


def _discrete_model(x):
    """A Bernoulli latent the guide proposes and a two-component mixture the model sums out."""
    w = pyro.param("w", lambda: x.new_zeros(2))
    locs = pyro.param("locs", lambda: x.new_tensor([-1.0, 1.0]))
    with pyro.plate("data", x.shape[0]):
        b = pyro.sample("b", dist.Bernoulli(logits=x.new_zeros(())))
        c = pyro.sample("c", dist.Categorical(logits=w), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[c] + b, 1.0), obs=x)


def _discrete_guide(x):
    a = pyro.param("a", lambda: x.new_zeros(x.shape[0]))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("b", dist.Bernoulli(logits=a))


def _autoguide_model(x):
    scale = pyro.param("scale", lambda: x.new_ones(()), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        pyro.sample("x", dist.Normal(z, scale), obs=x)


@pytest.mark.parametrize("which", ["discrete-and-enumerated", "autoguide"])
def test_discrete_enumerated_and_autoguide_models_keep_to_the_models_device_and_dtype(which):
    x = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=F32, device="cpu")
    if which == "autoguide":
        model, guide = _autoguide_model, AutoNormal(_autoguide_model)
    else:
        model, guide = _discrete_model, _discrete_guide
    with elsewhere():
        for name in ("iwem", "iwae", "vae"):
            pyro.clear_param_store()
            method = build_method(name, model, guide, K=4, J=3, annealing=Annealing(start=0.5, stop=0.5))
            method.step(x)  # creates the parameters, from the data's device and dtype
            _check_steps(method.step, (x,), _params())
        bound = iwae_bound(model, guide, x, num_particles=10, chunk_size=4)
    assert bound.shape == (4,) and bound.dtype == torch.float64 and bound.device.type == "cpu"


def test_evaluation_variance_and_imputation_keep_to_the_models_device():
    """Each accumulates in float64 on purpose; its result is float64, on the model's device."""
    vae = _vae()
    x, mask = _data()
    with elsewhere():
        _evaluate(vae, x, mask)


def _evaluate(vae, x, mask):
    results = {
        "iwae_bound (chunk from the memory budget)": iwae_bound(vae.model, vae.guide, x, num_particles=40),
        "iwae_bound (inflated proposal)": iwae_bound(vae.model, vae.guide, x, num_particles=20, chunk_size=8, inflation=1.5),
        "estimate_variance": estimate_variance(vae.model, vae.guide, x, num_particles=5, num_repeats=4).q_hat,
    }
    for what, value in results.items():
        assert value.shape == (6,) and value.dtype == torch.float64 and value.device.type == "cpu", what
        assert torch.isfinite(value).all(), what
    imputer = Imputer(vae.model, vae.guide, guide_inputs=ImputedInputs())
    for imputed in (imputer.mean(x, mask, num_particles=20, chunk_size=8), imputer.sample(x, mask, num_particles=8)):
        assert imputed.dtype == F32 and imputed.device.type == "cpu" and torch.equal(imputed[mask], x[mask])


def test_the_device_guard_catches_a_tensor_made_on_the_default_device():
    x, _ = _data()

    def careless(x):  # torch.zeros without device=: on the default device, as on the CPU under CUDA
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))

    with elsewhere(), pytest.raises(RuntimeError, match="meta"):
        IWEM(careless, _guide_for_careless, K=4, J=3).step(x)


def _guide_for_careless(x):
    loc = pyro.param("loc", lambda: x.new_zeros(x.shape[0]))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0))


def test_the_dtype_guard_catches_a_tensor_made_in_the_default_dtype():
    x = torch.ones(3, dtype=F32, device="cpu")
    with elsewhere(), Float64Outputs() as recorder:
        x * torch.ones(3, device="cpu")  # no dtype=: float64, and so is the product
    assert recorder.seen
