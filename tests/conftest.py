import pyro
import pytest
import torch

# The tests use small tensors: one intra-op thread avoids OpenMP spin-waiting on 2 cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_pyro():
    """Every test starts with an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
