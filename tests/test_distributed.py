"""One run on two processes (gloo on 127.0.0.1, spawned): DistributedOptim's averaged
gradient against the single-process full-batch gradient, the all-reduce order, a step
refused on one process, and DistributedDataParallel modules (pyro_iwem.distributed).

The guide's reparameterised noise for datum i comes from a fixed bank, indexed by the data
plate's subsample indices, so that the two processes' halves of a batch see the noise the
full batch sees: the mean of their gradients (each scaled by N / half) is then the full
batch's gradient up to rounding, for SVI + IWAELoss, IWEM.step and the one-pass step (in
float64, so that rounding stays far below the 1e-5 asked; in float32 the worst relative
error was 5.5e-6).

One pair of spawned processes runs every scenario in turn (starting them is most of the
time), saving each outcome as it finishes and stopping after a scenario that failed on
either; they are joined with a timeout and killed if still running, so nothing hangs.
"""

import gc
import os
import socket
import traceback
import warnings
from datetime import timedelta

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.infer import SVI
from pyro.optim import PyroOptim
from torch.nn.parallel import DistributedDataParallel

from pyro_iwem import IWEM, IWAELoss
from pyro_iwem.distributed import DistributedOptim, StepRefused, broadcast_parameters, collective_step
from pyro_iwem.infer.plates import PARTICLE_PLATE
from pyro_iwem.infer.util import ModelError, ModelWarning

WORLD, JOIN_TIMEOUT = 2, 60
N, DX, DZ, K, J = 8, 3, 2, 4, 3
X = torch.randn(N, DX, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
# noise for K + L particles (IWEM's E-step) of every datum
BANK = torch.randn(K + 1, N, DZ, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
THETA = ("W", "b", "s")
_INIT_SEED = [0]  # the seed of the lazy initial values (a process's own, before the broadcast)


# --- the programs ------------------------------------------------------------------------


class BankNormal(dist.TorchDistribution):
    """``Normal(loc, scale)`` (its log density) whose reparameterised draw for particle k of
    datum i is ``loc + scale * noise[k, i]``: ``noise`` is the bank at the batch's indices."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc, scale, noise):
        self.loc, self.scale, self.noise = loc, scale, noise
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return BankNormal(self.loc.expand(shape), self.scale.expand(shape), self.noise)

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        noise = self.noise[: shape[-3]] if len(shape) >= 3 else self.noise[0]  # vectorised: particles at dim -3
        return self.loc + self.scale * noise.expand(shape)

    def sample(self, sample_shape=torch.Size()):
        return self.rsample(sample_shape).detach()

    def log_prob(self, value):
        return dist.Normal(self.loc, self.scale).log_prob(value).sum(-1)


def _param(name, shape):
    def initial():
        g = torch.Generator().manual_seed(_INIT_SEED[0] * 100 + sum(map(ord, name)))
        return 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)

    return pyro.param(name, initial)


def model(x, idx):
    W, b, s = _param("W", (DX, DZ)), _param("b", (DX,)), _param("s", (DX,))
    with pyro.plate("data", N, subsample=idx):
        z = pyro.sample("z", dist.Normal(torch.zeros(DZ, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + b, F.softplus(s) + 0.1).to_event(1), obs=x)


def guide(x, idx):
    A, c, B, d = _param("A", (DZ, DX)), _param("c", (DZ,)), _param("B", (DZ, DX)), _param("d", (DZ,))
    loc, scale = x @ A.T + c, F.softplus(x @ B.T + d) + 0.1
    with pyro.plate("data", N, subsample=idx):
        pyro.sample("z", BankNormal(loc, scale, BANK[:, idx]))


class RecordingSGD(PyroOptim):
    """SGD that records, per call, the gradients it steps along, by parameter name."""

    def __init__(self, lr=0.05):
        super().__init__(torch.optim.SGD, {"lr": lr})
        self.calls = []

    def __call__(self, params, *args, **kwargs):
        store = pyro.get_param_store()
        self.calls.append({store.param_name(p): p.grad.detach().clone() for p in params if p.grad is not None})
        super().__call__(params, *args, **kwargs)


METHODS = ("svi_iwae", "iwem", "one_pass")


def _method(name, optim):
    """``(step, first_call)`` of one method on (model, guide)."""
    if name == "svi_iwae":
        svi = SVI(model, guide, optim, IWAELoss(K))
        return svi.step, svi.evaluate_loss
    iwem = IWEM(model, guide, K=K, J=J, optim=optim, one_pass=name == "one_pass")
    return iwem.step, iwem.evaluate_loss


def _store():
    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


def run_method(name, idx, steps=3, distributed=False):
    """``(recorded gradients per optimiser call, parameters after the steps)`` of ``steps``
    steps of method ``name`` on the data at ``idx`` (the plate's subsample)."""
    pyro.clear_param_store()
    recorder = RecordingSGD()
    step, first_call = _method(name, DistributedOptim(recorder) if distributed else recorder)
    first_call(X[idx], idx)  # the lazy parameters exist
    if distributed:
        broadcast_parameters()
    for _ in range(steps):
        step(X[idx], idx)
    return recorder.calls, _store()


def _share(rank):
    return torch.arange(N)[rank::WORLD]


# --- the scenarios each process runs -------------------------------------------------------


def scenario_exact(rank):
    _INIT_SEED[0] = rank  # each process its own initial values: the broadcast makes them rank 0's
    return {name: run_method(name, _share(rank), distributed=True) for name in METHODS}


def scenario_order(rank):
    out = {}
    # the same parameters, created (and handed to the optimiser) in an order of each process's own
    names = ["a", "b", "c"] if rank == 0 else ["c", "a", "b"]
    params = [pyro.param(n, torch.zeros(2)).unconstrained() for n in names]
    for n, p in zip(names, params):
        p.grad = torch.full((2,), float(10 * (rank + 1) + ord(n) - ord("a")))
    recorder = RecordingSGD(lr=1.0)
    DistributedOptim(recorder)(params)
    out["named"] = recorder.calls[0]
    # IWEM on a model whose parameter sites come in a process's own order
    pyro.clear_param_store()
    _INIT_SEED[0] = 0
    order = list(THETA) if rank == 0 else list(reversed(THETA))

    def shuffled_model(x, idx):
        for n in order:
            _param(n, {"W": (DX, DZ), "b": (DX,), "s": (DX,)}[n])
        model(x, idx)

    iwem = IWEM(shuffled_model, guide, K=K, J=J, optim=DistributedOptim(RecordingSGD()))
    iwem.evaluate_loss(X[_share(rank)], _share(rank))
    broadcast_parameters()
    for _ in range(2):
        iwem.step(X[_share(rank)], _share(rank))
    out["iwem"] = _store()
    # nameless parameters: a list is taken in its order, a set is refused on every process
    nameless = [torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)]
    for i, p in enumerate(nameless):
        p.grad = torch.full(p.shape, float(rank + i))
    optim = DistributedOptim(pyro.optim.SGD({"lr": 1.0}))
    optim(nameless)
    out["nameless"] = [p.detach().clone() for p in nameless]
    try:
        optim(set(nameless))
    except StepRefused as error:
        out["set_refused"] = str(error)
    # ... unless a step told the optimiser their trace order, as ParticleLoss.loss_and_grads does under SVI
    for i, p in enumerate(nameless):
        p.grad = torch.full(p.shape, float(rank + i))
    with collective_step() as step:
        step.ordered(nameless)
    optim(set(nameless))
    out["hinted"] = [p.detach().clone() for p in nameless]
    return out


def scenario_refusal(rank):
    out = {}
    _INIT_SEED[0] = 0
    for name in METHODS:
        pyro.clear_param_store()
        optim = DistributedOptim(pyro.optim.Adam({"lr": 0.05}))
        step, first_call = _method(name, optim)
        idx = _share(rank)
        first_call(X[idx], idx)
        broadcast_parameters()
        step(X[idx], idx)
        before = _store()
        bad = X[idx].clone()
        if rank == 1:
            bad[0, 0] = float("nan")  # a bad batch on one process
        try:
            step(bad, idx)
            out[name] = {"error": None}
        except StepRefused as error:
            out[name] = {"error": str(error), "moved": _max_change(before), "grads_left": _grads_left()}
        step(X[idx], idx)  # after a refusal caught, the processes still step together
        out[name]["after"] = _store()
    # a refusal in IWEM's P-step on one process, after both M-steps moved θ: θ is put back everywhere
    pyro.clear_param_store()
    iwem = IWEM(model, nan_in_p_step_guide(rank), K=K, J=J, optim=DistributedOptim(pyro.optim.Adam({"lr": 0.05})))
    idx = _share(rank)
    iwem.evaluate_loss(X[idx], idx)
    broadcast_parameters()
    before = _store()
    try:
        iwem.step(X[idx], idx)
        out["p_step"] = {"error": None}
    except StepRefused as error:
        out["p_step"] = {"error": str(error), "moved": _max_change(before), "num_steps": iwem.num_steps}
    return out


def nan_in_p_step_guide(rank):
    def p_step_fails(x, idx):
        particles = next((f.size for f in pyro.poutine.runtime.get_plates() if f.name == PARTICLE_PLATE), None)
        guide(x * float("nan") if rank == 1 and particles == J else x, idx)

    return p_step_fails


def _grads_left():
    """The parameters with a gradient that a next step would add to (SVI leaves zeros)."""
    return [name for name, value in pyro.get_param_store().named_parameters()
            if value.grad is not None and value.grad.abs().max() > 0]  # fmt: skip


def _max_change(before):
    after = _store()
    return max((after[n] - v).abs().max().item() for n, v in before.items())


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(DX, 2 * DZ)

    def forward(self, x):
        loc, scale = self.net(x).chunk(2, -1)
        return loc, F.softplus(scale) + 0.1


class VAE(torch.nn.Module):
    """Model and guide as methods of one module whose networks may be wrapped in DDP."""

    def __init__(self, wrap):
        super().__init__()
        self.encoder = wrap(Encoder().double())
        self.decoder = wrap(torch.nn.Linear(DZ, DX).double())

    def model(self, x, idx):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", N, subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(DZ, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    def guide(self, x, idx):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("z", BankNormal(*self.encoder(x), BANK[:, idx]))


def scenario_ddp(rank):
    out = {}
    idx = _share(rank)
    torch.manual_seed(rank)  # networks initialised differently per process
    # without DistributedOptim and without DDP: a warning that nothing is synchronised (warned once)
    plain = VAE(lambda m: m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        IWEM(plain.model, plain.guide, K=K, J=J).step(X[idx], idx)
    out["warning"] = [str(w.message) for w in caught if issubclass(w.category, ModelWarning)]
    # without DistributedOptim: refused, for IWEM and for SVI, bound methods or plain functions
    vae = VAE(DistributedDataParallel)
    for label, make in (
        ("iwem", lambda m, g: IWEM(m, g, K=K, J=J, optim=pyro.optim.Adam({"lr": 0.01})).step),
        ("svi", lambda m, g: SVI(m, g, pyro.optim.Adam({"lr": 0.01}), IWAELoss(K)).step),
    ):
        for programs in ("methods", "functions"):
            m, g = vae.model, vae.guide
            if programs == "functions":  # the modules are not reachable from the callables, only run by them
                m, g = (lambda *a: vae.model(*a)), (lambda *a: vae.guide(*a))
            pyro.clear_param_store()
            try:
                make(m, g)(X[idx], idx)
                out[label, programs] = None
            except ModelError as error:
                out[label, programs] = (str(error), max(p.grad.abs().max().item() if p.grad is not None else 0.0
                                                        for p in vae.parameters()))  # fmt: skip
    # with DistributedOptim: DDP's own hooks never fire, the gradients are averaged anyway
    for method in ("iwem", "svi"):
        pyro.clear_param_store()
        vae = VAE(DistributedDataParallel)  # DDP broadcasts rank 0's initial values
        initial = {n: p.detach().clone() for n, p in vae.named_parameters()}
        optim = DistributedOptim(pyro.optim.Adam({"lr": 0.01}))
        if method == "iwem":
            step = IWEM(vae.model, vae.guide, K=K, J=J, optim=optim).step
        else:
            step = SVI(vae.model, vae.guide, optim, IWAELoss(K)).step
        for _ in range(3):
            step(X[idx], idx)
        out[method] = ({n: p.detach().clone() for n, p in vae.named_parameters()}, initial)
    return out


SCENARIOS = {f.__name__[len("scenario_"):]: f for f in (scenario_exact, scenario_order, scenario_refusal, scenario_ddp)}


# --- two processes -------------------------------------------------------------------------


def _worker(rank, port, out_dir):
    """Runs every scenario in order on process ``rank``; saves what each returned or raised
    after each one, and stops after one that failed on any process."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    torch_dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30)
    )
    outcomes = {}
    for name, scenario in SCENARIOS.items():
        gc.collect()  # no DistributedOptim of an earlier scenario stays registered
        pyro.set_rng_seed(0)
        pyro.clear_param_store()
        try:
            outcomes[name] = {"result": scenario(rank)}
        except BaseException as error:  # reported by the test of this scenario, with the traceback
            outcomes[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        torch.save(outcomes, os.path.join(out_dir, f"rank{rank}.pt"))
        failed = [None] * WORLD
        torch_dist.all_gather_object(failed, "error" in outcomes[name])
        if any(failed):
            break
    torch_dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario's outcome on ranks 0 and 1: one pair of spawned processes (starting
    one costs most of the time), joined within the timeout and killed if still running."""
    out_dir = tmp_path_factory.mktemp("two_processes")
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, str(out_dir))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT)
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    saved = [out_dir / f"rank{rank}.pt" for rank in range(WORLD)]
    outcomes = [torch.load(path, weights_only=False) if path.exists() else {} for path in saved]
    return outcomes, hung, [p.exitcode for p in procs]


def two_processes(runs, scenario):
    """The results of ``scenario`` on ranks 0 and 1."""
    outcomes, hung, exitcodes = runs
    for rank, outcome in enumerate(outcomes):
        if scenario not in outcome:
            how = f"hung, killed after {JOIN_TIMEOUT} s" if rank in hung else f"exit code {exitcodes[rank]}"
            pytest.fail(f"rank {rank} did not finish scenario {scenario!r} ({how}; finished: {sorted(outcome)})")
        found = outcome[scenario]
        assert "error" not in found, f"rank {rank} of {scenario!r}: {found['error']}\n{found['traceback']}"
    return [outcome[scenario]["result"] for outcome in outcomes]


def relative_error(found, expected):
    return ((found - expected).norm() / expected.norm()).item()


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_average_to_the_full_batch_gradient(runs, method):
    exact = two_processes(runs, "exact")
    _INIT_SEED[0] = 0
    reference_calls, reference_params = run_method(method, torch.arange(N))
    worst = 0.0
    for rank, result in enumerate(exact):
        calls, params = result[method]
        assert len(calls) == len(reference_calls) == {"svi_iwae": 3}.get(method, 6)
        for call, reference in zip(calls, reference_calls):
            assert call.keys() == reference.keys()
            for name, grad in reference.items():
                worst = max(worst, relative_error(call[name], grad))
        for name, value in reference_params.items():
            worst = max(worst, relative_error(params[name], value))
    print(f"{method}: worst relative error of the gradients and parameters {worst:.1e}")  # shown with -s
    assert worst < 1e-5, f"{method}: relative error {worst:.2e}"
    for name in reference_params:  # both processes apply the same averaged gradients: equal bit for bit
        assert torch.equal(exact[0][method][1][name], exact[1][method][1][name]), name


def test_one_order_on_every_process(runs):
    results = two_processes(runs, "order")
    for result in results:  # a, b, c got the means of their own gradients, whatever the order given
        for i, name in enumerate("abc"):
            assert torch.equal(result["named"][name], torch.full((2,), 15.0 + i)), name
        for p, mean in zip(result["nameless"], (-0.5, -1.5)):
            assert torch.equal(p, torch.full(p.shape, mean))
        for p, mean in zip(result["hinted"], (-1.0, -3.0)):
            assert torch.equal(p, torch.full(p.shape, mean))
        assert "unordered set" in result["set_refused"] and "in a list" in result["set_refused"]
    assert results[0]["set_refused"] == results[1]["set_refused"]
    for name, value in results[0]["iwem"].items():
        assert torch.equal(value, results[1]["iwem"][name]), name


def test_a_step_refused_on_one_process_is_refused_on_both(runs):
    results = two_processes(runs, "refusal")
    for key in (*METHODS, "p_step"):
        errors = [result[key]["error"] for result in results]
        assert errors[0] is not None and errors[0] == errors[1], (key, errors)
        assert "rank 1 raised ModelError" in errors[0] and "rank 0 raised" not in errors[0], errors[0]
        assert all(result[key]["moved"] == 0.0 for result in results), key
        assert all(not result[key].get("grads_left") for result in results), key
    assert all(result["p_step"]["num_steps"] == 0 for result in results)
    for key in METHODS:  # the next step is taken together
        for name, value in results[0][key]["after"].items():
            assert torch.equal(value, results[1][key]["after"][name]), (key, name)


def test_ddp_modules_are_synchronised_or_refused(runs):
    results = two_processes(runs, "ddp")
    for result in results:
        for key in (("iwem", "methods"), ("iwem", "functions"), ("svi", "methods"), ("svi", "functions")):
            assert result[key] is not None, f"{key}: a DDP module without DistributedOptim was not refused"
            message, largest_grad = result[key]
            assert "DistributedDataParallel" in message and "pyro_iwem.distributed.DistributedOptim" in message
            assert largest_grad == 0.0
        assert any("not synchronised" in w for w in result["warning"]), result["warning"]
    for method in ("iwem", "svi"):
        (final0, initial0), (final1, initial1) = results[0][method], results[1][method]
        for name in final0:
            assert torch.equal(initial0[name], initial1[name]), name
            assert not torch.equal(final0[name], initial0[name]), f"{method}: {name} did not move"
            assert torch.equal(final0[name], final1[name]), f"{method}: {name} differs between the processes"


# --- one process ----------------------------------------------------------------------------


def test_parameters_are_ordered_by_name_else_as_given_else_by_the_trace():
    from pyro_iwem.distributed import ordered_params

    b, a = pyro.param("b", torch.zeros(1)).unconstrained(), pyro.param("a", torch.zeros(2)).unconstrained()
    ordered, names = ordered_params({b, a})
    assert names == ["a", "b"] and ordered[0] is a and ordered[1] is b
    x, y = torch.zeros(1, requires_grad=True), torch.zeros(2, requires_grad=True)
    assert [id(p) for p in ordered_params([y, x, y])[0]] == [id(y), id(x)]
    assert [id(p) for p in ordered_params({x, y}, hint=[y, x])[0]] == [id(y), id(x)]
    with pytest.raises(ModelError, match="unordered set.*in a list"):
        ordered_params({x, y})


def test_a_distributed_optimiser_needs_a_pyro_optimiser_and_a_process_group():
    with pytest.raises(TypeError, match="PyroOptim"):
        DistributedOptim(torch.optim.SGD)
    optim = DistributedOptim(pyro.optim.SGD({"lr": 1.0}))
    with pytest.raises(TypeError, match="PyroOptim"):
        DistributedOptim(optim)
    assert optim.pt_optim_args == {"lr": 1.0} and optim.optim_objs is optim.optim.optim_objs
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        optim([p])
    with collective_step(optim=optim):  # no process group: the step does not vote
        pass
