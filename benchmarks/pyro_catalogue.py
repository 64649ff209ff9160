"""Pyro's own catalogue of valid models under pyro_iwem (issue #20).

Runs Pyro's ``tests/infer/test_valid_models.py`` *unchanged* under pytest, with this file
as a plugin that replaces the module's ``assert_ok(model, guide, elbo, **kwargs)``, the
helper every valid pattern ends in, by a recorder. For each call it

1. runs Pyro's own ``assert_ok`` (an SVI step, then ``elbo.loss`` at seed 0) and records
   whether Pyro passes, and the given ELBO's value at seed 0;
2. runs ``IWAELoss(num_particles=1, max_plate_nesting=<the elbo's, if finite>)``: ``loss``
   (the first call also probes the programs), then ``differentiable_loss(...).backward()``
   (every parameter gradient finite), recording every warning it emits. If that raises,
   again with ``vectorize_particles=False`` (for a model written for one particle at a
   time, e.g. one asserting its sites' shapes), and, for an ELBO that vectorises N > 1
   particles, at K = N (the shapes the pattern was written for; no value compared then);
3. compares the value at K = 1 with ``Trace_ELBO``'s at K = 1, or ``TraceEnum_ELBO``'s where
   the model enumerates sites (both sum those out exactly), on the same seeds (0, 1, 2):
   after its first call (which probes the programs once) pyro_iwem draws what Pyro draws,
   in the same order, so both see the same randomness. Where they differ, both are
   computed again on one replayed guide trace (the same draws by construction), or, where
   the reference sums out sites pyro_iwem samples, the means over 200 seeds are compared
   (within 4 standard errors). Where the given ELBO
   is ``TraceEnum_ELBO`` summing out *guide* sites, which pyro_iwem samples (with a
   warning), its exact value is also compared with ours (the same at every seed, or equal
   to our mean over 200 seeds);
4. records what pyro_iwem found (data plate, globals, coupling guide sites) and, from the
   reference's traces, the latents outside every vectorised plate and those outside the
   data plate (the outermost plate around every observed site: "globals").

Nothing the test itself asserts can fail the run. Records go to ``--out`` (JSON), and a
summary is printed::

    .venv/bin/python benchmarks/pyro_catalogue.py --pyro-src /tmp/pyro-src [--out FILE] [-k EXPR]
    .venv/bin/python benchmarks/pyro_catalogue.py --report benchmarks/results/pyro_catalogue.json

Pyro's source is needed because Pyro's tests are not in its wheel: a checkout (or
``git archive``) of pyro-ppl/pyro at the installed version, of which ``tests/`` is used;
the installed pyro-ppl is the one imported. Nothing is copied from Pyro: its file is run
as is, with its own conftest and ``setup.cfg`` (``filterwarnings = error``, so every
value here is computed under ``warnings.catch_warnings``).
"""

import argparse
import json
import math
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from pyro_iwem import IWAELoss

RECORDS = []  # one per assert_ok call
SKIPPED = []  # node ids pytest skipped
SEEDS = (0, 1, 2)
MEAN_SEEDS = 200
COUPLING = "weighted as one datum"  # in the coupling warning's text, now and before issue #20


# ---------------------------------------------------------------------------------------- plugin


@pytest.fixture(autouse=True)
def _record_assert_ok(request, monkeypatch):
    module = getattr(request, "module", None)
    if module is None or not hasattr(module, "assert_ok"):
        yield
        return
    original, calls = module.assert_ok, []

    def recorder(model, guide, elbo, **kwargs):
        calls.append(None)
        record = {"id": request.node.nodeid, "call": len(calls), "function": request.node.originalname}
        start = time.perf_counter()
        try:
            check(record, original, model, guide, elbo, kwargs)
        except Exception as error:  # noqa: BLE001 - a bug here must not hide the other patterns
            record["harness_error"] = describe(error)
        record["seconds"] = round(time.perf_counter() - start, 2)
        RECORDS.append(record)

    monkeypatch.setattr(module, "assert_ok", recorder)
    yield


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        SKIPPED.append(report.nodeid)


# ---------------------------------------------------------------------------------------- checks


def describe(error):
    """``Type: first line``, and whether it was raised by the pattern's own code (an assert in Pyro's test file)."""
    text = str(error).strip().splitlines()
    frames = traceback.extract_tb(error.__traceback__)
    own = bool(frames) and frames[-1].filename.endswith("test_valid_models.py")
    return f"{type(error).__name__}: {text[0] if text else ''}" + (" [raised by the pattern's own code]" if own else "")


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def seeded(seed, fn, *args, **kwargs):
    pyro.set_rng_seed(seed)
    return fn(*args, **kwargs)


def close(a, b, tol=1e-6):
    return a is not None and b is not None and abs(a - b) <= tol * max(1.0, abs(b))


def finite_nesting(elbo):
    n = getattr(elbo, "max_plate_nesting", float("inf"))
    return None if n == float("inf") else int(n)


def unguessed(nesting):
    return float("inf") if nesting is None else nesting


def enumerated_sites(model, guide, kwargs):
    """``(model-side, guide-side)`` names of sites marked for enumeration (read off one plain run)."""
    guide_trace = quiet(poutine.trace(guide).get_trace, **kwargs)
    model_trace = quiet(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace, **kwargs)

    def marked(trace):
        return {n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]
                and s["infer"].get("enumerate") and getattr(s["fn"], "has_enumerate_support", False)}  # fmt: skip

    guide_side = marked(guide_trace)
    return marked(model_trace) - set(guide_trace.nodes), guide_side


def data_plate_of(model_trace):
    """The outermost vectorised plate around every observed site (every sample site if none is observed)."""
    sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"]
    sites = [s for s in sites if s["is_observed"]] or sites
    stacks = [[f.name for f in s["cond_indep_stack"] if f.vectorized] for s in sites]
    common = set(stacks[0]).intersection(*stacks[1:]) if stacks else set()
    return next((name for name in (stacks[0] if stacks else []) if name in common), None)


def structure(reference, model, guide, kwargs):
    """From the reference's traces: the latents outside every vectorised plate, the data plate and the
    latents outside it ("globals"), the observed sites."""
    model_trace, guide_trace = quiet(reference._get_trace, model, guide, (), kwargs)
    latents = {n: s for n, s in model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]
               and s["infer"].get("_enumerate_dim") is None}  # fmt: skip
    outside = sorted(n for n, s in latents.items() if not any(f.vectorized for f in s["cond_indep_stack"]))
    observed = sorted(n for n, s in model_trace.nodes.items() if s["type"] == "sample" and s["is_observed"])
    data_plate = data_plate_of(model_trace)
    beside = [n for n, s in latents.items() if data_plate and all(f.name != data_plate for f in s["cond_indep_stack"])]
    return {"latents_outside_plates": outside, "latents_in_plates": sorted(set(latents) - set(outside)),
            "observed": observed, "data_plate": data_plate, "latents_outside_data_plate": sorted(beside)}


def run_iwem(model, guide, kwargs, nesting, particles, vectorize, record):
    """The warm-up ``loss`` and the gradient check; the loss object (ready for seeded calls), or raises."""
    loss = IWAELoss(num_particles=particles, max_plate_nesting=nesting, vectorize_particles=vectorize)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = seeded(0, loss.loss, model, guide, **kwargs)
            params = dict(pyro.get_param_store().named_parameters())  # unconstrained
            for p in params.values():
                p.grad = None
            differentiable = seeded(0, loss.differentiable_loss, model, guide, **kwargs)
            record["iwem_loss_requires_grad"] = differentiable.requires_grad
            if differentiable.requires_grad:  # else it depends on no parameter (as Pyro's, checked below)
                differentiable.backward()
            bad = [name for name, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
            if not math.isfinite(value) or bad:
                raise FloatingPointError(f"loss {value}, non-finite gradients of {bad}")
        finally:
            messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
            record["iwem_warnings"] = messages
    sampler = loss.sampler(model, guide)
    found = getattr(sampler, "global_latents", None)  # None before issue #20
    record["iwem_structure"] = {"data_plate": sampler.data_plate or None, "max_plate_nesting": sampler.max_plate_nesting,
                                "globals": list(getattr(found, "names", ())),
                                "coupling_guide_sites": list(getattr(found, "coupling", ()))}  # fmt: skip
    return loss


def mean_se(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std() / math.sqrt(len(values))).item() if len(values) > 1 else 0.0


def check(record, original, model, guide, elbo, kwargs):
    nesting = finite_nesting(elbo)
    record.update(elbo=type(elbo).__name__, elbo_num_particles=elbo.num_particles,
                  elbo_max_plate_nesting=nesting, kwargs=sorted(kwargs))  # fmt: skip
    # 1. Pyro itself: its assert_ok (SVI step + loss at seed 0), and the given ELBO's value at seed 0
    try:
        original(model, guide, elbo, **kwargs)
        record["pyro_assert_ok"] = "passed"
    except Exception as error:  # noqa: BLE001
        record["pyro_assert_ok"] = describe(error)
    try:
        record["pyro_value"] = -quiet(seeded, 0, elbo.loss, model, guide, **kwargs)
    except Exception as error:  # noqa: BLE001
        record["pyro_value"], record["pyro_value_error"] = None, describe(error)

    # 2. pyro_iwem at K = 1, vectorised, else one particle at a time, else as the ELBO vectorises its N particles
    attempts = [(1, True), (1, False)]
    if getattr(elbo, "vectorize_particles", False) and elbo.num_particles > 1:
        attempts.append((elbo.num_particles, True))
    loss, record["iwem_errors"] = None, []
    for particles, vectorize in attempts:
        mode = f"K = {particles}" + ("" if vectorize else ", vectorize_particles=False")
        try:
            loss = run_iwem(model, guide, kwargs, nesting, particles, vectorize, record)
            record["iwem"] = f"ran ({mode})"
            break
        except Exception as error:  # noqa: BLE001
            record["iwem_errors"].append(f"{mode}: {describe(error)}")
    if loss is None:
        record["iwem"] = "raised"
    record["coupling_warnings"] = [m for m in record.get("iwem_warnings", []) if COUPLING in m]

    # 3. the value at K = 1 against a reference on the same draws: TraceEnum_ELBO where the model enumerates
    try:
        model_enum, guide_enum = enumerated_sites(model, guide, kwargs)
    except Exception as error:  # noqa: BLE001 - e.g. a pattern that asserts enumerated shapes
        model_enum, guide_enum = set(), set()
        record["plain_run_error"] = describe(error)
    record.update(model_enumerated=sorted(model_enum), guide_enumerated=sorted(guide_enum))
    enum = TraceEnum_ELBO(max_plate_nesting=unguessed(nesting), strict_enumeration_warning=False)
    reference = enum if model_enum else Trace_ELBO(max_plate_nesting=unguessed(nesting))
    record["reference"] = type(reference).__name__
    try:
        record["structure"] = structure(reference, model, guide, kwargs)
    except Exception as error:  # noqa: BLE001
        record["structure_error"] = describe(error)
    if loss is None:
        record["match"] = "not run"
        return
    try:
        reference_loss = quiet(seeded, 0, reference.differentiable_loss, model, guide, **kwargs)
        record["reference_loss_requires_grad"] = torch.is_tensor(reference_loss) and reference_loss.requires_grad
    except Exception as error:  # noqa: BLE001
        record["reference_differentiable_loss_error"] = describe(error)
    if loss.num_particles > 1:
        record["match"] = f"not comparable (ran at K = {loss.num_particles}, the ELBO's vectorised particles)"
        return
    ours = [-seeded(s, quiet, loss.loss, model, guide, **kwargs) for s in SEEDS]
    record["iwem_values"] = ours
    try:
        theirs = [-quiet(seeded, s, reference.loss, model, guide, **kwargs) for s in SEEDS]
    except Exception as error:  # noqa: BLE001
        record["reference_error"] = describe(error)
        record["match"] = "not comparable (the reference ELBO raises)"
        return
    record["reference_values"] = theirs
    if all(close(a, b) for a, b in zip(ours, theirs)):
        record["match"] = "same seeds"
    elif not model_enum:  # the same draws by construction: one replayed guide trace
        trace = quiet(seeded, 0, poutine.trace(guide).get_trace, **kwargs)
        replayed = poutine.replay(guide, trace=trace)
        fresh = IWAELoss(num_particles=1, max_plate_nesting=nesting, vectorize_particles=loss.vectorize_particles)
        pair = (-seeded(0, quiet, fresh.loss, model, replayed, **kwargs),
                -quiet(seeded, 0, reference.loss, model, replayed, **kwargs))  # fmt: skip
        record["replayed_values"] = pair
        record["match"] = "replayed guide trace" if close(*pair) else "no"
    else:  # TraceEnum_ELBO also sums out the guide's marked sites, which pyro_iwem samples
        record["match"] = compare_means(record, "means", loss, reference, model, guide, kwargs)
    # where the given ELBO sums out guide sites exactly (pyro_iwem samples them): its value is the mean of ours
    if guide_enum and not model_enum and type(elbo) is TraceEnum_ELBO:
        exact = [-quiet(seeded, s, enum.loss, model, guide, **kwargs) for s in SEEDS]
        record["enum_values"] = exact
        same = all(close(a, b) for a, b in zip(ours, exact))
        record["enum_check"] = "same seeds" if same else compare_means(record, "enum_means", loss, enum, model, guide, kwargs)


def compare_means(record, key, loss, reference, model, guide, kwargs):
    """Means (and standard errors) over ``MEAN_SEEDS`` seeds of ours and the reference's; equal within 4 SE?"""
    seeds = range(1000, 1000 + MEAN_SEEDS)
    (m1, s1), (m2, s2) = (mean_se([-seeded(s, quiet, loss.loss, model, guide, **kwargs) for s in seeds]),
                          mean_se([-quiet(seeded, s, reference.loss, model, guide, **kwargs) for s in seeds]))  # fmt: skip
    record[key] = {"iwem": [m1, s1], "reference": [m2, s2]}
    ok = abs(m1 - m2) <= 4 * math.hypot(s1, s2) + 1e-6 * max(1.0, abs(m2))
    return f"mean over {MEAN_SEEDS} seeds" if ok else "no (means)"


# ---------------------------------------------------------------------------------------- report


def why_couples(record):
    """Why the sites a coupling warning names couple the batch, from the pattern's structure."""
    structure, found = record.get("structure", {}), record.get("iwem_structure", {})
    reasons = set()
    for name in re.findall(r"site '([^']+)'", " ".join(record["coupling_warnings"])):
        if name in found.get("coupling_guide_sites", ()):
            reasons.add(f"'{name}': a guide site outside the data plate standing for per-datum latents")
        elif name in record.get("model_enumerated", ()):
            reasons.add(f"'{name}': an enumerated site outside the data plate")
        elif name in structure.get("latents_outside_data_plate", ()):
            reasons.add(f"'{name}': a global latent (outside the data plate '{structure['data_plate']}')")
        else:
            reasons.add(f"'{name}': a latent in a plate the data do not fill")
    return "; ".join(sorted(reasons))


def summary(records, skipped, seconds):
    functions = {r["function"] for r in records}
    ran = [r for r in records if r["iwem"] != "raised"]
    raised = [r for r in records if r["iwem"] == "raised"]
    warned = [r for r in records if r["coupling_warnings"]]
    with_globals = [r for r in ran if r.get("structure", {}).get("latents_outside_data_plate")]
    plateless = [r for r in ran if r.get("structure", {}).get("latents_outside_plates")]
    same = [r for r in ran if r["match"] == "same seeds"]
    largest = max((abs(a - b) for r in same for a, b in zip(r["iwem_values"], r["reference_values"])), default=0.0)
    grads = [r for r in ran if "reference_loss_requires_grad" in r
             and r["reference_loss_requires_grad"] != r["iwem_loss_requires_grad"]]  # fmt: skip
    lines = [
        f"Pyro's tests/infer/test_valid_models.py: {len(records)} assert_ok calls in {len({r['id'] for r in records})} "
        f"parametrised cases of {len(functions)} test functions (valid patterns); {len(skipped)} cases skipped by "
        "pytest (funsor missing)",
        f"Pyro's own assert_ok passed: {sum(r['pyro_assert_ok'] == 'passed' for r in records)}",
        f"pyro_iwem IWAELoss: ran {len(ran)} ("
        + "; ".join(f"{n} at {mode[5:-1]}" for mode, n in sorted(Counter(r["iwem"] for r in ran).items()))
        + f"), raised {len(raised)} (in {len({r['function'] for r in raised})} functions)",
        f"coupling ('one datum') warning: {len(warned)} calls in {len({r['function'] for r in warned})} functions",
        f"a latent outside the data plate (a global): {len(with_globals)} calls ran, "
        f"{sum(not r['coupling_warnings'] for r in with_globals)} of them with no coupling warning; "
        f"a latent outside every vectorised plate: {len(plateless)} ran, {sum(not r['coupling_warnings'] for r in plateless)} "
        "with no coupling warning",
        "value against the reference ELBO at K = 1: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(Counter(r["match"] for r in records).items())),
        f"  of the same-seed matches: bitwise equal {sum(r['iwem_values'] == r['reference_values'] for r in same)}, "
        f"largest |difference| {largest:.1e}, value 0 at every seed (the densities cancel) "
        f"{sum(not any(r['iwem_values']) for r in same)}",
        "TraceEnum_ELBO summing out guide sites (pyro_iwem samples them), its value against ours: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(Counter(r["enum_check"] for r in records if "enum_check" in r).items())),
        f"differentiable loss depends on parameters where the reference's does not, or the reverse: {len(grads)}",
        f"run time {seconds:.0f} s",
    ]
    if raised:
        lines.append("\nraised (function [cases]: the error of each attempt):")
        for (function, errors), n in Counter((r["function"], " | ".join(r["iwem_errors"])) for r in raised).items():
            lines.append(f"  {function} [{n}]: {errors}")
    detour = [r for r in ran if r["iwem_errors"]]
    if detour:
        lines.append("\nran on a later attempt (function [cases]: the errors before):")
        for (function, errors), n in Counter((r["function"], " | ".join(r["iwem_errors"])) for r in detour).items():
            lines.append(f"  {function} [{n}]: {errors}")
    if warned:
        lines.append("\ncoupling warning (function [cases]: why):")
        for (function, why), n in Counter((r["function"], why_couples(r)) for r in warned).items():
            lines.append(f"  {function} [{n}]: {why}")
    bad = [r for r in ran if not r["match"].startswith(("same", "replayed", "mean"))
           or r.get("enum_check", "same").startswith("no")]  # fmt: skip
    if bad:
        lines.append("\nran, value not matched or not compared (id: match):")
        lines += [f"  {r['id']}#{r['call']}: {r['match']}; {r.get('enum_check', '')}" for r in bad]
    lines += [f"  gradient dependence differs: {r['id']}" for r in grads]
    lines += [f"harness error: {r['id']}: {r['harness_error']}" for r in records if "harness_error" in r]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyro-src", type=Path, help="a checkout of pyro-ppl/pyro (its tests/)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pyro_catalogue.json")
    parser.add_argument("-k", default=None, help="pytest -k expression, to run a subset")
    parser.add_argument("--report", type=Path, help="print the summary of an earlier run's JSON instead")
    options = parser.parse_args()
    if options.report:
        saved = json.loads(options.report.read_text())
        print(summary(saved["records"], saved["skipped"], saved["seconds"]))
        return
    if options.pyro_src is None:
        parser.error("--pyro-src is required")
    src = options.pyro_src.resolve()
    sys.path.insert(0, str(src))  # tests.common
    args = [str(src / "tests/infer/test_valid_models.py"), "-q", "-p", "no:cacheprovider", "--rootdir", str(src)]
    args += ["-k", options.k] if options.k else []
    start = time.perf_counter()
    pytest.main(args, plugins=[sys.modules[__name__]])
    seconds = time.perf_counter() - start
    options.out.parent.mkdir(parents=True, exist_ok=True)
    import pyro_iwem

    options.out.write_text(json.dumps({"pyro": pyro.__version__, "pyro_src": str(src), "pyro_iwem": pyro_iwem.__file__,
                                       "seconds": round(seconds), "skipped": SKIPPED, "records": RECORDS},
                                      indent=1, default=str))  # fmt: skip
    print("\n" + summary(RECORDS, SKIPPED, seconds))
    print(f"\nrecords: {options.out}")


if __name__ == "__main__":
    main()
