"""IWEM under PyTorch Lightning (pyro_iwem.lightning): a fit on one process takes exactly the
steps of a plain loop of ``IWEM.step`` and counts them; a fit on two processes (gloo on
127.0.0.1, spawned, each launching its own Trainer with ``strategy="ddp"``) keeps the two
processes' parameters identical; a checkpoint brings IWEM's state, the Adam state and the
parameters back; a pyro_iwem loss works as Pyro's ``ELBOModule``.

The model is linear-Gaussian (probabilistic PCA) in float64: an ``nn.Linear`` decoder and
encoder registered with ``pyro.module`` and a noise scale that is a ``pyro.param`` site alone,
so that both kinds of parameter go through the checkpoint.
"""

import importlib
import os
import socket
import sys
import time
import traceback

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from pyro_iwem import IWEM, Annealing, DReGLoss, IWAELoss  # noqa: E402
from pyro_iwem.distributed import DistributedOptim  # noqa: E402
from pyro_iwem.lightning import IWEMModule  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\). is deprecated"),  # lightning 2.6
]

N, DX, DZ, BATCH, EPOCHS, K, J = 32, 3, 2, 8, 2, 4, 3
X = torch.randn(N, DX, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
WORLD, JOIN_TIMEOUT = 2, 300  # about 25 s on an idle machine


class LinearGaussian(nn.Module):
    """``z ~ N(0, I)``, ``x | z ~ N(decoder(z), noise²)``; guide ``N(loc(x), scale(x))``."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(DZ, DX).double()
        self.encoder = nn.Linear(DX, 2 * DZ).double()

    def model(self, x):
        pyro.module("decoder", self.decoder)
        noise = pyro.param("noise", lambda: 0.5 + torch.rand(DX, dtype=x.dtype), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(DZ, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), noise).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        loc, scale = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, F.softplus(scale) + 1e-3).to_event(1))


def build(seed=0, optim=None):
    """A fresh param store and IWEM on a fresh model, its initial values drawn with ``seed``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    lg = LinearGaussian()
    optim = pyro.optim.Adam({"lr": 0.05}) if optim is None else optim
    return IWEM(lg.model, lg.guide, K=K, J=J, optim=optim, annealing=Annealing(0.25, every=1, unit="epoch"))


def loader():
    return DataLoader(TensorDataset(X), batch_size=BATCH, generator=torch.Generator().manual_seed(0))


def trainer(**kwargs):
    options = dict(accelerator="cpu", devices=1, max_epochs=EPOCHS, enable_progress_bar=False, logger=False,
                   enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    return pl.Trainer(**{**options, **kwargs})


def store():
    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


def max_difference(a, b):
    assert sorted(a) == sorted(b)
    return max((a[name] - b[name]).abs().max().item() for name in a)


def fit():
    iwem = build()
    module = IWEMModule(iwem)
    fitted = trainer()
    fitted.fit(module, loader())
    return module, fitted


# --- one process ------------------------------------------------------------------------------


def test_fit_takes_the_steps_of_a_plain_loop_and_counts_them():
    module, fitted = fit()
    found = store()
    iwem = build()
    for _ in range(EPOCHS):
        for (x,) in loader():
            iwem.step(x)
        iwem.end_epoch()
    assert max_difference(found, store()) == 0.0  # the same draws, the same arithmetic
    assert fitted.global_step == module.iwem.num_steps == EPOCHS * N // BATCH == 8
    assert module.iwem.alpha == iwem.alpha == 0.5  # +0.25 per epoch, twice
    metrics = fitted.callback_metrics
    assert metrics["alpha_epoch"].item() == 0.25  # the second epoch's steps ran at α = 0.25
    assert 1.0 <= metrics["ess_epoch"].item() <= K
    assert metrics["bound_step"].item() == pytest.approx(module.iwem.bound, rel=1e-6)
    assert {"loss_epoch", "p_loss_epoch", "bound_epoch"} <= set(metrics)


def test_the_model_parameters_are_the_module_parameters():
    module = IWEMModule(build())
    lg = module.iwem.model.__self__
    assert list(module.programs) == [lg]
    assert {id(p) for p in module.parameters()} == {id(p) for p in lg.parameters()}


def test_checkpoint_brings_back_iwem_adam_and_parameters(tmp_path):
    module, fitted = fit()
    path = tmp_path / "iwem.ckpt"
    fitted.save_checkpoint(path)
    saved = store()
    batch = X[:BATCH]
    pyro.set_rng_seed(5)
    module.iwem.step(batch)  # one more step: moves every parameter by Adam's state
    expected = store()

    iwem = build(seed=1)  # a fresh process's: empty param store, other initial values
    loaded = IWEMModule.load_from_checkpoint(path, iwem=iwem)
    assert (iwem.num_steps, iwem.alpha, iwem.annealing.count) == (8, 0.5, 2)
    iwem.evaluate_loss(batch)  # "noise", a pyro.param site, now exists
    assert max_difference(store(), saved) > 0.1  # ... at its initial value
    loaded.restore_pyro_params()
    assert max_difference(store(), saved) == 0.0
    pyro.set_rng_seed(5)
    iwem.step(batch)
    assert max_difference(store(), expected) == 0.0  # Adam's moments came back too


def test_resumed_fit_puts_back_a_pyro_param_site_before_its_first_step(tmp_path):
    _, fitted = fit()
    path = tmp_path / "iwem.ckpt"
    fitted.save_checkpoint(path)
    first = X[:BATCH]  # the first batch of the resumed epoch

    iwem = build(seed=1)  # by hand: load, run the programs once, put "noise" back, step
    loaded = IWEMModule.load_from_checkpoint(path, iwem=iwem)
    iwem.evaluate_loss(first)
    loaded.restore_pyro_params()
    iwem.step(first)
    expected = store()

    iwem = build(seed=1)  # Lightning resuming the fit for one more step, in a fresh process
    resumed = trainer(max_epochs=EPOCHS + 1, limit_train_batches=1)
    resumed.fit(IWEMModule(iwem), loader(), ckpt_path=path)
    assert iwem.num_steps == resumed.global_step == 9
    assert iwem.alpha == 0.75
    assert max_difference(store(), expected) == 0.0


def test_without_lightning_the_import_says_what_to_install(monkeypatch):
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "pyro_iwem.lightning")
    with pytest.raises(ImportError, match=r"pip install 'pyro-iwem\[lightning\]'"):
        importlib.import_module("pyro_iwem.lightning")


# --- the losses as Pyro's ELBOModule ----------------------------------------------------------


class LitIWAE(pl.LightningModule):
    def __init__(self, lg):
        super().__init__()
        self.lg = lg
        self.loss = IWAELoss(K)(lg.model, lg.guide)

    def training_step(self, batch, batch_idx):
        return self.loss(batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_a_loss_is_an_elbo_module_lightning_steps():
    pyro.set_rng_seed(0)
    lg = LinearGaussian()
    module = LitIWAE(lg)
    pyro.set_rng_seed(3)
    value = module.loss(X)
    pyro.set_rng_seed(3)
    assert value.requires_grad and value.item() == IWAELoss(K).differentiable_loss(lg.model, lg.guide, X).item()
    before = [p.detach().clone() for p in lg.parameters()]
    fitted = trainer(max_epochs=1)
    fitted.fit(module, loader())
    assert fitted.global_step == N // BATCH
    assert all(p.ne(b).any() for p, b in zip(lg.parameters(), before))
    with pytest.raises(NotImplementedError, match="different surrogates"):
        DReGLoss(K)(lg.model, lg.guide)(X)


# --- two processes ----------------------------------------------------------------------------


def _worker(rank, port, out_dir):
    """One rank of a two-process ``strategy="ddp"`` fit, launched as torchrun would: Lightning
    sees ``LOCAL_RANK`` and starts no processes of its own."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE=str(WORLD), GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    torch.set_num_threads(1)
    try:
        iwem = build(seed=rank)  # each rank its own initial values: the broadcast makes them rank 0's
        iwem.evaluate_loss(X[:2])
        initial = store()
        module = IWEMModule(iwem)
        fitted = trainer(devices=WORLD, strategy="ddp")
        fitted.fit(module, loader())
        result = {"initial": initial, "final": store(), "global_step": fitted.global_step,
                  "distributed": isinstance(iwem.optim, DistributedOptim), "bound": module.iwem.bound,
                  "logged_bound": fitted.callback_metrics["bound_step"].item()}  # fmt: skip
    except BaseException as error:
        result = {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_ddp_keep_identical_parameters(tmp_path):
    workers = torch.multiprocessing.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not workers.join(timeout=max(0.0, deadline - time.monotonic())):  # True once every worker exited
        if time.monotonic() >= deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the two processes did not finish within {JOIN_TIMEOUT} s; killed")
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result['error']}"
    first, second = results
    assert max_difference(first["initial"], second["initial"]) > 0.1  # they started apart...
    assert max_difference(first["final"], second["final"]) == 0.0  # ... and ended bit for bit alike
    assert max_difference(first["final"], first["initial"]) > 0.1  # after training
    assert first["distributed"] and second["distributed"]
    assert first["global_step"] == second["global_step"] == EPOCHS * N // BATCH // WORLD  # half a batch each
    # the logged bound is the mean of the two processes' bounds
    mean = (first["bound"] + second["bound"]) / 2
    assert first["logged_bound"] == second["logged_bound"] == pytest.approx(mean, rel=1e-6)
