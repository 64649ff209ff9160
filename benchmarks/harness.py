"""Timing, memory and reporting for ``step_speed.py``.

:func:`load_batch` reads the batch every implementation steps on. :func:`time_methods` times
built steps interleaved (each repetition runs one step of every implementation, the order
alternating forwards and backwards) and checks that every implementation trained all its
weights. :func:`memory_child` measures the peak memory of one implementation, run alone in a
subprocess by :func:`measure_memory`. :func:`summarize` reduces the step times to medians,
minima and interquartile ranges; :func:`print_table` and :func:`print_ratios` print them;
:func:`write_json` writes the run. :func:`profile` prints cProfile and torch.profiler
summaries instead of timing. :func:`close` prints and asserts one comparison of the
correctness checks.
"""
import cProfile
import gzip
import io
import json
import pstats
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class Method:
    """An entry of ``step_speed.METHODS``.

    ``factory(ctx)`` builds one implementation on fresh copies of the context's networks
    (``ctx.fresh()``) and returns ``(step, modules)``: ``step()`` runs one training step on
    ``ctx.x`` and returns a float (the loss; calling ``.item()`` also synchronises), and
    ``modules`` are the networks it trains (timing checks that all their weights changed).
    ``default=False`` entries run only when named in ``--methods``; ``group`` names the
    ``--methods`` selection (``"baselines"``, ``"discrete"``, ``"evaluation"``) an entry is in.
    """

    factory: Callable
    description: str
    default: bool = True
    group: str | None = None


MNIST_TRAIN = Path("/work/shared/data/binarized_mnist/binarized_mnist_train.amat.gz")


def load_batch(batch_size, device, dtype=torch.float32, seed=0):
    """The first ``batch_size`` images of static binarised MNIST, else Bernoulli(0.13) pixels
    (and a description of which)."""
    if MNIST_TRAIN.exists():
        rows = []
        with gzip.open(MNIST_TRAIN, "rt") as f:
            for line in f:
                rows.append([float(v) for v in line.split()])
                if len(rows) == batch_size:
                    break
        if len(rows) == batch_size:
            return torch.tensor(rows, dtype=dtype, device=device), f"static binarized MNIST ({MNIST_TRAIN})"
    g = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((batch_size, 784), 0.13), generator=g)
    return x.to(device=device, dtype=dtype), "random Bernoulli(0.13) pixels"


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _parameters(modules):
    return [p for m in modules for p in m.parameters()]


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def time_methods(built, warmup, repeats, device):
    """Step times (seconds) of ``built`` (name -> ``(step, modules)``): ``warmup`` untimed steps
    each, then ``repeats`` interleaved rounds of one timed step of every implementation."""
    names = list(built)
    steps = {name: step for name, (step, _) in built.items()}
    initial = {name: [p.detach().clone() for p in _parameters(mods)] for name, (_, mods) in built.items()}
    for name in names:  # warm-up
        for _ in range(warmup):
            steps[name]()
    sync(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]  # alternate the order: no fixed neighbour
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    for name, (_, mods) in built.items():  # every implementation must have trained all its weights
        stale = [i for i, (p0, p) in enumerate(zip(initial[name], _parameters(mods))) if torch.equal(p0, p.detach())]
        if stale:
            raise RuntimeError(f"{name}: {len(stale)} parameter tensors never changed during timing")
    return times


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


def peak_rss_bytes():
    """Peak resident set size of this process image: VmHWM (per address space, so a child does
    not inherit its parent's peak across fork/exec as ru_maxrss does), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_tensor_bytes_cpu(step):
    """Peak bytes of CPU tensors allocated and still alive at any moment of one ``step()``, from
    torch.profiler's allocation records (independent of the malloc's caching, unlike RSS)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def memory_child(build, device, steps):
    """Runs in a subprocess: the peak memory of ``steps`` steps of ``build()`` (which returns a step).

    CPU: ``rss_mb``, the rise of the peak resident set size (VmHWM) over the steps, and
    ``tensor_mb``, the peak of tensor bytes allocated within one step (torch.profiler).
    CUDA: both are ``torch.cuda.max_memory_allocated()`` minus the memory allocated before.
    """
    # The first torch.optim step imports torch._dynamo (~150 MB RSS): do it on a dummy parameter
    # first, or implementations whose optimiser is built lazily (Pyro's) are charged for it.
    dummy = nn.Parameter(torch.zeros(2, device=device))
    (dummy * dummy).sum().backward()
    torch.optim.Adam([dummy]).step()
    step = build()
    sync(device)
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = peak_rss_bytes()
    for _ in range(steps):
        step()
    sync(device)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        return {"rss_mb": peak, "tensor_mb": peak, "measure": "cuda.max_memory_allocated"}
    rss = (peak_rss_bytes() - before) / 2**20
    return {"rss_mb": rss, "tensor_mb": peak_tensor_bytes_cpu(step) / 2**20, "measure": "VmHWM / torch.profiler"}


def measure_memory(script, names, child_args):
    """Runs ``script --_memory-child NAME *child_args`` for each name, in a fresh process each;
    returns name -> the JSON of its last output line (names whose run failed are left out)."""
    out = {}
    for name in names:
        cmd = [sys.executable, str(script), "--_memory-child", name] + child_args
        res = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"memory run for {name} failed:\n{res.stderr}", file=sys.stderr)
            continue
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------


def _print_stats(prof, sort, header, top):
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(sort).print_stats(top)
    print(header)
    print("\n".join(buf.getvalue().splitlines()[:top + 12]))


def profile(names, build, warmup, device, steps_per=10, top=25):
    """cProfile (Python-level) and torch.profiler (op-level) summaries of ``steps_per`` steps of
    each ``build(name)`` (which returns a step), after ``warmup`` untimed steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for name in names:
        step = build(name)
        for _ in range(warmup):
            step()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps_per):
            step()
        sync(device)
        prof.disable()
        _print_stats(prof, "tottime", f"===== cProfile: {name}, {steps_per} steps, top {top} by tottime =====", top)
        _print_stats(prof, "cumulative", f"===== cProfile: {name}, top {top} by cumulative =====", top)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
        with tprofile(activities=activities) as tp:
            for _ in range(steps_per):
                step()
            sync(device)
        print(f"===== torch.profiler: {name}, {steps_per} steps, top {top} ops by self CPU time =====")
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def summarize(times, memory):
    """name -> median, min and interquartile range of its step times (ms), all of them sorted,
    and its memory (``None`` where not measured)."""
    results = {}
    for name, seconds in times.items():
        t = sorted(1e3 * s for s in seconds)
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        results[name] = {"median_ms": statistics.median(t), "min_ms": t[0], "iqr_ms": q[2] - q[0], "times_ms": t,
                         "memory": memory.get(name)}
    return results


def print_table(results, descriptions, device):
    """One row per method: median, min and IQR of its step time, its two memory numbers."""
    cpu = device == "cpu"
    mem_labels = ("peak RSS+ MB", "peak tensors MB") if cpu else ("peak MB", "")
    w = max(len(n) for n in results)
    print(f"{'method':<{w}} {'median ms':>10} {'min ms':>8} {'IQR ms':>8} {mem_labels[0]:>13} {mem_labels[1]:>15}"
          "  description")
    for name, r in results.items():
        mem = r["memory"]
        rss_s = f"{mem['rss_mb']:.1f}" if mem else "-"
        tensor_s = f"{mem['tensor_mb']:.1f}" if mem and cpu else ("-" if not mem else "")
        print(f"{name:<{w}} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} {r['iqr_ms']:>8.2f} {rss_s:>13} "
              f"{tensor_s:>15}  {descriptions[name]}")


def print_ratios(results, ratios):
    """Prints and returns the ratios of median (and of min) step times of the ``(numerator,
    denominator, target or None)`` rows whose two methods both ran."""
    print("ratios of median step times (targets judged on these); ratio of min times in parentheses")
    w = max(len(n) for n in results)
    out = []
    for num, den, target in ratios:
        if num in results and den in results:
            r = results[num]["median_ms"] / results[den]["median_ms"]
            r_min = results[num]["min_ms"] / results[den]["min_ms"]
            verdict = "" if target is None else (f"target <= {target:.2f}: " + ("MET" if r <= target else "MISSED"))
            out.append({"numerator": num, "denominator": den, "ratio": r, "ratio_of_mins": r_min, "target": target})
            print(f"{num + ' / ' + den:<{2 * w + 3}} {r:6.3f}  (of mins {r_min:5.3f})   {verdict}")
    return out


def close(a, b, what, rtol, atol):
    """Prints the largest difference of ``a`` and ``b``; raises an AssertionError unless allclose."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    err = (a - b).abs().max().item()
    ok = torch.allclose(a, b, rtol=rtol, atol=atol)
    print(f"  [{'ok' if ok else 'FAIL'}] {what}: max |diff| = {err:.3g}")
    if not ok:
        raise AssertionError(f"correctness check failed: {what} (max |diff| {err:.3g})")


def write_json(path, payload):
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")
