"""Every pattern of the model catalogue under every method.

A valid pattern: the step returns a finite float and moves at least one parameter (the
expected warning, if any, is raised), and ``iwae_bound`` returns finite values, one per
datum. An invalid pattern: the expected error, and no parameter of the param store moved
(an algorithm must validate before it updates anything).
"""

import math
import warnings
from collections import Counter, defaultdict
from contextlib import nullcontext

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI

from pyro_iwem import IWEM, DReGLoss, IWAELoss, STLLoss, VAELoss, iwae_bound

from tests.model_catalogue import ALL_METHODS, CATALOGUE

STANDARD = ("iwem", "iwae", "vae", "bound")

_RESULTS = {}  # (pattern name, method) -> "passed" | "failed", filled as the cases run


def _optim():
    return pyro.optim.Adam({"lr": 1e-2})


def _run(method, pattern, model, guide):
    kw = {"vectorize_particles": pattern.vectorize}
    args = pattern.args
    if method == "iwem":
        return IWEM(model, guide, K=4, J=4, optim=_optim(), annealing=None, **kw).step(*args)
    if method == "bound":
        return iwae_bound(model, guide, *args, num_particles=8, chunk_size=3, **kw)
    loss = {
        "iwae": lambda: IWAELoss(4, **kw),
        "vae": lambda: VAELoss(2, **kw),
        "stl": lambda: STLLoss(4, **kw),
        "dreg": lambda: DReGLoss(4, **kw),
    }[method]()
    return SVI(model, guide, _optim(), loss).step(*args)


def _initialise(model, guide, args):
    """Creates the parameters (one plain run of guide and model) so that a snapshot holds them all."""
    with torch.no_grad(), poutine.block(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            guide_trace = poutine.trace(guide).get_trace(*args)
            poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
        except Exception:
            pass  # an invalid pattern may fail here already; the snapshot holds what exists


def _snapshot():
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in store.keys()}


def _moved(before):
    store = pyro.get_param_store()
    return sorted(name for name, value in before.items() if name in store and not torch.equal(store[name], value))


def check(pattern, method):
    model, guide = pattern.build()
    _initialise(model, guide, pattern.args)
    before = _snapshot()
    if not pattern.valid:
        with pytest.raises(pattern.error_types, match=pattern.error):
            _run(method, pattern, model, guide)
        moved = _moved(before)
        assert not moved, f"the failed {method} call changed parameters {moved}"
        return
    expected_warning = pattern.warns_for(method)
    with pytest.warns(UserWarning, match=expected_warning) if expected_warning else nullcontext():
        result = _run(method, pattern, model, guide)
    if method == "bound":
        assert isinstance(result, torch.Tensor) and result.dim() == 1, result
        assert torch.isfinite(result).all(), result
        if pattern.datums is not None:
            assert result.shape == (pattern.datums,), result.shape
    else:
        assert isinstance(result, float) and math.isfinite(result), result
        assert before, "the pattern has no parameters"
        assert _moved(before), f"{method} step changed no parameter"


def _cases():
    for pattern in CATALOGUE:
        for method in pattern.methods:
            yield pytest.param(pattern, method, id=f"{pattern.name}-{method}")


@pytest.mark.parametrize("pattern, method", list(_cases()))
def test_pattern(pattern, method):
    try:
        check(pattern, method)
    except BaseException:
        _RESULTS[pattern.name, method] = "failed"
        raise
    _RESULTS[pattern.name, method] = "passed"


def test_global_latent_does_not_warn():
    """A latent outside the data plate is a global, drawn once per step: the weights stay per
    datum given it, and no step warns about it (it used to be weighted as one datum, with a warning)."""
    pattern = next(p for p in CATALOGUE if p.name == "global_latent_outside_data_plate")
    iwem = IWEM(pattern.model, pattern.guide, K=4, J=4, optim=_optim(), annealing=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            iwem.step(*pattern.args)
    naming = [w for w in caught if issubclass(w.category, UserWarning) and "'mu'" in str(w.message)]
    assert len(naming) == 0, [str(w.message) for w in caught]


def test_enumerated_mixture_bound_is_the_exact_log_likelihood():
    """A model latent marked for parallel enumeration is summed out exactly: with no other latent,
    every particle's weight is p(x_i), and the bound is the mixture's log-likelihood per datum."""
    pattern = next(p for p in CATALOGUE if p.name == "enumerated_mixture_empty_guide")
    model, guide = pattern.build()
    (x,) = pattern.args
    bound = iwae_bound(model, guide, x, num_particles=6, chunk_size=3)
    weights, locs, scale = pyro.param("weights"), pyro.param("locs"), pyro.param("scale")
    components = torch.distributions.Normal(locs, scale).log_prob(x.unsqueeze(-1)) + weights.log()
    torch.testing.assert_close(bound, components.logsumexp(-1).double())


@pytest.mark.parametrize("call", ["vae_one_particle", "bound_last_chunk_of_one"])
def test_enumerated_mixture_with_one_particle(call):
    pattern = next(p for p in CATALOGUE if p.name == "enumerated_mixture_empty_guide")
    model, guide = pattern.build()
    if call == "vae_one_particle":
        assert math.isfinite(SVI(model, guide, _optim(), VAELoss(1)).step(*pattern.args))
    else:
        assert torch.isfinite(iwae_bound(model, guide, *pattern.args, num_particles=4, chunk_size=3)).all()


def test_catalogue_counts():
    """Counts the catalogue and its outcomes per method (run with -s to see the table).

    Cases the parametrised test has not run in this session are run here."""
    outcomes = defaultdict(Counter)
    unexpected = []
    for pattern in CATALOGUE:
        for method in pattern.methods:
            key = pattern.name, method
            if key not in _RESULTS:
                pyro.clear_param_store()
                pyro.set_rng_seed(0)
                try:
                    check(pattern, method)
                    _RESULTS[key] = "passed"
                except BaseException:  # noqa: BLE001 - pytest.fail raises a BaseException
                    _RESULTS[key] = "failed"
            kind = "valid" if pattern.valid else "invalid"
            outcomes[method][kind, _RESULTS[key]] += 1
            if _RESULTS[key] != "passed":
                unexpected.append(f"{pattern.name}-{method}: {_RESULTS[key]}")
    n_valid = sum(p.valid for p in CATALOGUE)
    lines = [f"catalogue: {len(CATALOGUE)} patterns, {n_valid} valid, {len(CATALOGUE) - n_valid} invalid"]
    for method in ALL_METHODS:
        counts = outcomes[method]
        lines.append(
            f"  {method:6s} valid: {counts['valid', 'passed']} passed, {counts['valid', 'failed']} failed | "
            f"invalid (clear error, no parameter moved): {counts['invalid', 'passed']} passed, "
            f"{counts['invalid', 'failed']} failed"
        )
    print("\n" + "\n".join(lines))
    assert not unexpected, unexpected
