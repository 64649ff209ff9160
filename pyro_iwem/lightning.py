r"""IWEM under PyTorch Lightning (docs/scaling.md): :class:`IWEMModule`, a ``LightningModule``
that takes one :meth:`IWEM.step <pyro_iwem.infer.IWEM.step>` per batch.

Imported only on request (``import pyro_iwem.lightning``); it needs Lightning,
``pip install 'pyro-iwem[lightning]'``. ::

    vae = MLPVAE(x_dim=784, z_dim=40)
    iwem = IWEM(vae.model, vae.guide, K=50, J=50, annealing=Annealing(0.01, every=1, unit="epoch"))
    module = IWEMModule(iwem)                           # vae's parameters become the module's
    trainer = lightning.pytorch.Trainer(max_epochs=100) # or devices=4, strategy="ddp"
    trainer.fit(module, DataLoader(TensorDataset(x), batch_size=100, shuffle=True))
    print(iwem.bound, iwem.alpha, trainer.global_step)  # global_step: IWEM steps taken

The losses need no class of their own: each is a :class:`pyro.infer.ELBO`, and
``loss(model, guide)`` is Pyro's ``ELBOModule``, whose call is the loss's
:meth:`~pyro_iwem.infer.ParticleLoss.differentiable_loss`, for Lightning's automatic
optimisation, as in Pyro's ``examples/svi_lightning.py``::

    class LitIWAE(lightning.pytorch.LightningModule):
        def __init__(self, vae, K=50):
            super().__init__()
            self.vae = vae                              # its parameters: the optimiser's, checkpointed
            self.loss = IWAELoss(K)(vae.model, vae.guide)

        def training_step(self, batch, batch_idx):
            loss = self.loss(batch[0])                  # -L_K, summed over the batch
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

This works for the losses with one surrogate for θ and φ (:class:`~pyro_iwem.infer.VAELoss`,
:class:`~pyro_iwem.infer.IWAELoss`, :class:`~pyro_iwem.infer.STLLoss`; for
:class:`~pyro_iwem.infer.OptimalProposalLoss` the guide's); :class:`~pyro_iwem.infer.DReGLoss`
raises ``NotImplementedError`` (two surrogates: use :class:`pyro.infer.SVI`). Its gradients
reach the parameters through ``backward()``, so under ``strategy="ddp"`` Lightning's
``DistributedDataParallel`` averages them as for any network.
"""

from collections.abc import Mapping

import pyro
import torch
import torch.distributed as dist

from .distributed import DistributedOptim

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pyro_iwem.lightning needs PyTorch Lightning (lightning>=2.0): pip install 'pyro-iwem[lightning]'"
    ) from error

__all__ = ["IWEMModule", "IWEMStepOptimizer"]

#: the attributes of IWEM logged after every step
METRICS = ("bound", "ess", "alpha", "p_loss")


class IWEMStepOptimizer(torch.optim.Optimizer):
    """The optimiser Lightning is given: :meth:`step` runs its closure, one IWEM step, and
    returns the closure's value. It holds one placeholder tensor and no state: IWEM steps the
    parameters with its own :class:`pyro.optim.PyroOptim` (its state is saved by
    :class:`IWEMModule`'s checkpoint hooks).

    Stepping through it, ``self.optimizers().step(closure)``, is Lightning's documented way
    for a manual-optimisation module to count a step: the wrapping ``LightningOptimizer``
    advances the progress counter that ``trainer.global_step`` reads, and runs the
    ``on_before_optimizer_step`` hooks, as for any optimiser."""

    def __init__(self):
        super().__init__([torch.zeros(0)], {})

    def step(self, closure=None):
        """``closure()`` (one IWEM step, which moves the parameters), or ``None`` without one."""
        return None if closure is None else closure()


class IWEMModule(pl.LightningModule):
    r"""A ``LightningModule`` that takes one :meth:`IWEM.step <pyro_iwem.infer.IWEM.step>` (an
    E-step, an M-step on θ, a P-step on φ) per training batch.

    IWEM steps with its own Pyro optimiser, on gradients it takes with
    :func:`torch.autograd.grad`, so the module runs under manual optimisation
    (``automatic_optimization = False``); it

    * **counts the steps**: each IWEM step runs as the closure of
      ``self.optimizers().step(closure)``, the step of :class:`IWEMStepOptimizer`, so that
      Lightning's step counter (``trainer.global_step``, ``max_steps``, step-based
      checkpointing and logging) counts IWEM steps;
    * **maps a batch to IWEM's arguments** with :meth:`step_args`: a tuple or list
      (``TensorDataset``) is the positional arguments, a mapping the keyword arguments,
      anything else the one argument;
    * **logs** ``loss`` (:math:`-\hat Q_\alpha`, what the step returns) and IWEM's
      ``bound``, ``ess``, ``alpha`` and ``p_loss`` after every step, per step and per epoch,
      with ``sync_dist=True`` (averaged over the processes);
    * **advances the annealing per epoch**: :meth:`IWEM.end_epoch
      <pyro_iwem.infer.IWEM.end_epoch>` after every training epoch (it counts only for
      ``Annealing(unit="epoch")``; a step-counting schedule advances inside the step);
    * **checkpoints** IWEM's state (:meth:`IWEM.state_dict <pyro_iwem.infer.IWEM.state_dict>`:
      steps, annealing, the Pyro optimiser's state) and the values of the parameters in Pyro's
      param store that are not the module's (:meth:`on_save_checkpoint`): the module's own
      parameters are in Lightning's ``state_dict``;
    * **keeps several processes in step** (``strategy="ddp"``): Lightning's
      ``DistributedDataParallel`` wrapper never sees IWEM's gradients (its hooks fire in
      ``backward()``), so at the start of a fit on more than one process the optimiser is
      wrapped in :class:`~pyro_iwem.distributed.DistributedOptim` (unless it is one), which
      averages the gradients over the processes before each of IWEM's optimiser calls; and on
      the first batch, before the first step, the programs are run once
      (:meth:`IWEM.evaluate_loss <pyro_iwem.infer.IWEM.evaluate_loss>`: Pyro's lazy parameters
      now exist) and :func:`~pyro_iwem.distributed.broadcast_parameters` copies rank 0's values
      to every process. On one process nothing of this runs: a fit takes the steps a plain
      loop of ``iwem.step`` on the same batches takes.

    Each process gets batches of its own (Lightning's ``DistributedSampler``): one step takes
    ``devices * batch_size`` data. For the average of the processes' gradients to be the
    gradient of that global batch, each process's loss must stand for it: a data plate of the
    global batch's size with this process's rows as its subsample
    (:class:`~pyro_iwem.models.VAE`'s ``data_size=``; override :meth:`step_args` to pass it).
    Without it every gradient is divided by the number of processes, which Adam does not
    notice.

    :param iwem: the :class:`~pyro_iwem.infer.IWEM` (or :class:`~pyro_iwem.infer.IWAEasEM`,
        ``one_pass=True``) to step; its ``optim`` is any :class:`pyro.optim.PyroOptim`, or a
        :class:`~pyro_iwem.distributed.DistributedOptim` (with its own process group).
    :param modules: more ``nn.Module`` s holding parameters. They, and the modules that
        ``iwem.model`` and ``iwem.guide`` are or are bound methods of (``vae`` for
        ``vae.model``), are registered as submodules, in :attr:`programs`: in the
        ``state_dict``, moved to the device. Parameters created by ``pyro.param`` alone live
        in Pyro's param store only: they are saved in the checkpoint by name and put back in
        place; one that does not exist yet when a checkpoint is loaded (a fresh process: Pyro
        creates parameters on the first call) is put back after the first call of the next
        training batch, or after you run the programs once (``module.iwem.evaluate_loss(x)``)
        and call :meth:`restore_pyro_params`.
    """

    def __init__(self, iwem, modules=()):
        super().__init__()
        self.automatic_optimization = False
        self.iwem = iwem
        #: the modules holding the parameters (``modules``, and those of ``iwem.model`` and ``iwem.guide``)
        self.programs = torch.nn.ModuleList(_owners([iwem.model, iwem.guide, *modules]))
        self._first_call = False  # whether the next batch runs the programs once before its step
        self._pending_params = {}  # saved pyro.param values not yet in the param store

    def configure_optimizers(self):
        """An :class:`IWEMStepOptimizer`, through which the steps are counted."""
        return IWEMStepOptimizer()

    def on_fit_start(self):
        """On several processes: wraps IWEM's optimiser in
        :class:`~pyro_iwem.distributed.DistributedOptim`; the first batch broadcasts."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if not isinstance(self.iwem.optim, DistributedOptim):
                self.iwem.optim = DistributedOptim(self.iwem.optim)
        self._first_call = self._synchronised() or bool(self._pending_params)

    def step_args(self, batch):
        """``(args, kwargs)`` of :meth:`IWEM.step <pyro_iwem.infer.IWEM.step>` for ``batch``."""
        if isinstance(batch, (tuple, list)):
            return tuple(batch), {}
        if isinstance(batch, Mapping):
            return (), dict(batch)
        return (batch,), {}

    def training_step(self, batch, batch_idx):
        """One IWEM step on ``batch``, counted by Lightning; returns the loss, detached."""
        args, kwargs = self.step_args(batch)
        if self._first_call:
            self.iwem.evaluate_loss(*args, **kwargs)  # Pyro's lazy parameters now exist
            self.restore_pyro_params()
            if self._synchronised():
                self.iwem.optim.broadcast_parameters()
            self._first_call = False
        loss = self.optimizers().step(closure=lambda: self.iwem.step(*args, **kwargs))
        self._log_step(loss)
        return torch.tensor(loss)

    def _log_step(self, loss):
        for name, value in [("loss", loss), *((name, getattr(self.iwem, name)) for name in METRICS)]:
            self.log(name, float(value), on_step=True, on_epoch=True, sync_dist=True)

    def on_train_epoch_end(self):
        """Tells IWEM's annealing that an epoch ended."""
        self.iwem.end_epoch()

    def on_save_checkpoint(self, checkpoint):
        r"""Adds ``checkpoint["iwem"]``, :meth:`IWEM.state_dict <pyro_iwem.infer.IWEM.state_dict>`,
        and ``checkpoint["pyro_params"]``, the unconstrained values of the parameters in Pyro's
        param store that are not this module's, by name (tensors only: a checkpoint that
        ``torch.load(..., weights_only=True)`` reads)."""
        checkpoint["iwem"] = self.iwem.state_dict()
        own = {id(p) for p in self.parameters()}
        checkpoint["pyro_params"] = {
            name: value.detach().clone() for name, value in pyro.get_param_store().named_parameters()
            if id(value) not in own
        }

    def on_load_checkpoint(self, checkpoint):
        """Puts back IWEM's state and the saved param store values (:meth:`restore_pyro_params`)."""
        self.iwem.load_state_dict(checkpoint["iwem"])
        self._pending_params = dict(checkpoint.get("pyro_params", {}))
        self.restore_pyro_params()

    def restore_pyro_params(self):
        """Copies the saved values of the parameters that now exist in Pyro's param store into
        them, in place; the others wait for the first call of the next training batch."""
        store = dict(pyro.get_param_store().named_parameters())
        with torch.no_grad():
            for name in [name for name in self._pending_params if name in store]:
                store[name].copy_(self._pending_params.pop(name))
        self._first_call = self._first_call or bool(self._pending_params)

    def _synchronised(self):
        optim = self.iwem.optim
        return isinstance(optim, DistributedOptim) and optim.active


def _owners(programs):
    """The distinct ``nn.Module`` s among ``programs`` and the objects their bound methods
    belong to, in order."""
    found = {}
    for fn in programs:
        owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            found.setdefault(id(owner), owner)
    return list(found.values())
