"""The plain-PyTorch references of ``benchmarks/`` compute pyro_iwem's steps.

``benchmarks/step_speed.py`` times pyro_iwem against the plain steps of
``benchmarks/reference.py``. These tests run its correctness checks (the functions its
``--check`` runs at the benchmark's sizes) on a tiny MLP in float64: Proposition 1 on the plain
code; the plain log p, log q, E- and P-step losses and their gradients on particles drawn by
pyro_iwem's sampler (to 1e-9); two Adam steps of each plain step against the pyro_iwem step it
stands for, from the same weights and seed (losses to rtol 1e-9, parameters to rtol 1e-7 and
atol 1e-9); and the plain chunked IWAE bound against ``iwae_bound`` (to 1e-9).
"""

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # the benchmarks are scripts, run from their folder
    sys.path.insert(0, str(BENCHMARKS))

import reference as ref  # noqa: E402
import step_speed  # noqa: E402


@pytest.fixture
def ctx():
    """4 data of 12 pixels, a 12-8-8-4 encoder, a 4-8-8-12 decoder, K = 4, J = 3, L = 1.

    B x z_dim = 16 on purpose: torch's CPU ``randn`` fills a tensor of 16 or more numbers 16 at a
    time and a smaller one number by number, so one draw of K + L particles (pyro_iwem's) is the
    same numbers as a draw of K and then one of L (``make_plain_iwem``'s) only when K x B x z_dim
    is a multiple of 16 and L x B x z_dim at least 16 (the benchmark's 100 x 40 is 250 x 16)."""
    torch.manual_seed(1)
    x = torch.bernoulli(torch.full((4, 12), 0.3, dtype=torch.float64))
    dims = (12, 8, 4)
    return ref.Context(x, ref.Encoder(*dims).double(), ref.Decoder(*dims).double(), K=4, J=3, L=1)


def test_proposition_1(ctx):
    step_speed.check_proposition_1(ctx)


def test_shared_particles(ctx):
    step_speed.check_shared_particles(ctx)


@pytest.mark.parametrize("reference", list(step_speed.END_TO_END))
def test_end_to_end(ctx, reference):
    step_speed.check_end_to_end(ctx, reference, step_speed.END_TO_END[reference])


def test_bound(ctx):
    step_speed.check_bound(ctx, chunk=3)  # K = 4: a full chunk and a short one


def test_every_plain_step_is_checked():
    """Every plain implementation the benchmark times is checked against a pyro_iwem step."""
    checked = {name for others in step_speed.END_TO_END.values() for name in others}
    plain = {name for name in step_speed.METHODS if not name.startswith("pyro_") and "_bound_" not in name}
    assert plain <= checked, f"not checked end to end: {sorted(plain - checked)}"
