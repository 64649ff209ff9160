r"""A step refused on one process is refused on all: the hook steps run inside.

:meth:`IWEM.step <pyro_iwem.infer.IWEM.step>` and :meth:`ParticleLoss.loss_and_grads
<pyro_iwem.infer.ParticleLoss.loss_and_grads>` run inside :func:`collective_step`. On one
process, or without a multi-process optimiser, it costs one check of
``torch.distributed.is_initialized()``. With a voter active (an optimiser that all-reduces
gradients, :class:`pyro_iwem.distributed.DistributedOptim`), every process votes, in the
same order, before any parameter moves:

* each optimiser call votes "ok" (with the layout of the gradients it is about to reduce);
* an exception inside the step votes "refused" once, with its message;
* a step that ends without an exception votes once more as it closes, so that a refusal
  after the step's last optimiser call, or a process that ran fewer optimiser calls than
  another, is seen by every process instead of pairing with another step's vote;
* a process that learns of another's refusal from a vote raises
  :class:`~pyro_iwem.infer.StepRefused` (the same message on every process) and votes no
  more in this step.

Without a voter, the step refuses a :class:`~torch.nn.parallel.DistributedDataParallel`
module it can see (pyro_iwem takes gradients with :func:`torch.autograd.grad`, which the
wrapper's reduction hooks never see: its gradients would silently not be synchronised),
and warns once that gradients are not synchronised when the process group has more than
one process. This module imports nothing of :mod:`pyro_iwem.distributed`; the voter is
duck-typed (``register_voter``).
"""

import contextlib
import functools
import weakref

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .util import ModelError, warn_once

#: what a user of a DistributedDataParallel module without a voter is told
DDP_REMEDY = (
    "pyro_iwem takes gradients with torch.autograd.grad, which never reaches the wrapper's reduction hooks: "
    "its gradients would not be synchronised between processes. Step with "
    "pyro_iwem.distributed.DistributedOptim(optim), which all-reduces the gradients itself (the "
    "DistributedDataParallel wrapper is then not needed)"
)

_VOTERS = []  # weak references to the voters registered, oldest first
_WARNED = set()


class StepRefused(ModelError):
    """A step refused on some process of a process group, raised on every process of it with
    the same message: the refusing processes' ranks and errors. No parameter moved (IWEM puts
    back an M-step its P-step refused), unless the refusal came after the step's optimiser
    calls, which the message then says."""


def register_voter(voter):
    """Makes ``voter`` the voter of the steps that are not told their optimiser (the losses
    under :class:`pyro.infer.SVI`). A voter has ``stepping`` (a bool), ``refuse(error)`` and
    ``close()`` (each votes and raises :class:`StepRefused` if a process refused),
    ``hint_order(params)`` and ``active`` (whether its process group is up)."""
    _VOTERS[:] = [ref for ref in _VOTERS if ref() is not None]
    _VOTERS.append(weakref.ref(voter))


def active_voter():
    """The voter registered last that is still alive and active, or ``None``."""
    for ref in reversed(_VOTERS):
        voter = ref()
        if voter is not None and voter.active:
            return voter
    return None


def mark_voted(error):
    """``error``, marked as raised by (or after) a vote: the step it leaves votes no more."""
    error.collective_voted = True
    return error


class _Step:
    """What :func:`collective_step` yields."""

    def __init__(self, voter):
        self.voter = voter
        self.written = []

    def ordered(self, params):
        """Tells the voter the order of the parameters this step wrote gradients to (trace
        order), for an optimiser later handed them as a set (Pyro's SVI); their gradients are
        cleared if the step is refused. Returns ``params``."""
        self.written = list(params)
        if self.voter is not None:
            self.voter.hint_order(self.written)
        return params


def collective_step(model=None, guide=None, optim=None):
    """A context manager around one step (see the module doc): votes with the other
    processes if ``optim`` is a voter, or (``optim`` not given) if one is registered;
    otherwise refuses a DistributedDataParallel module behind ``model`` or ``guide`` or run
    by them, and warns once if a process group of several processes is up. Nested steps
    vote as the outermost. It yields an object whose ``ordered(params)`` tells the voter the
    order of the parameters the step wrote gradients to (for an optimiser handed a set)."""
    return _CollectiveStep(_voter_of(optim), model, guide)


class _CollectiveStep:
    def __init__(self, voter, model, guide):
        self.voter, self.programs = voter, (model, guide)
        self.outermost = voter is not None and not voter.stepping
        self.unsynchronised = None

    def __enter__(self):
        if self.voter is None:
            self.unsynchronised = _unsynchronised(*self.programs)
            self.unsynchronised.__enter__()
        elif self.outermost:
            self.voter.stepping = True
        self.step = _Step(self.voter)
        return self.step

    def __exit__(self, kind, error, tb):
        if self.voter is None:
            return self.unsynchronised.__exit__(kind, error, tb)
        if not self.outermost:
            return False
        try:
            if error is None:
                self.voter.close()
            elif isinstance(error, Exception) and not getattr(error, "collective_voted", False):
                self.voter.refuse(error)  # raises StepRefused on every process
        except StepRefused:
            for p in self.step.written:  # refused elsewhere: no gradient is left to add to the next step's
                p.grad = None
            raise
        finally:
            self.voter.stepping = False
        return False


def _voter_of(optim):
    if optim is None:
        return active_voter()
    return optim if getattr(optim, "votes_collectively", False) and optim.active else None


def _unsynchronised(model, guide):
    """Outside a vote: nothing on one process; under a process group, a refusal of the
    DistributedDataParallel modules the step can reach and a warning for several processes."""
    if not (dist.is_available() and dist.is_initialized()):
        return contextlib.nullcontext()
    for fn in (model, guide):
        found = find_ddp(fn)
        if found is not None:
            raise ModelError(f"{_describe(fn)} holds a DistributedDataParallel module ({type(found.module).__name__}): "
                             f"{DDP_REMEDY}")  # fmt: skip
    if dist.get_world_size() > 1:
        warn_once(
            _WARNED,
            "unsynchronised",
            f"torch.distributed is initialised with {dist.get_world_size()} processes and the optimiser is not a "
            "pyro_iwem.distributed.DistributedOptim: gradients are not synchronised, each process trains a model of "
            "its own",
        )
    return _refuse_ddp_forward()


def find_ddp(fn):
    """The first DistributedDataParallel module behind callable ``fn`` (an ``nn.Module``, a
    bound method of one, or a ``functools.partial`` of either), or ``None``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    for owner in (fn, getattr(fn, "__self__", None)):
        if isinstance(owner, torch.nn.Module):
            return next((m for m in owner.modules() if isinstance(m, DistributedDataParallel)), None)
    return None


def _describe(fn):
    return f"the {getattr(fn, '__qualname__', type(fn).__name__)!r} program"


@contextlib.contextmanager
def _refuse_ddp_forward():
    """Refuses a DistributedDataParallel forward pass the step runs (a module a plain function
    calls), before the module computes anything."""

    def refuse(module, args):
        if isinstance(module, DistributedDataParallel):
            raise ModelError(f"a DistributedDataParallel module ({type(module.module).__name__}) ran in this step: "
                             f"{DDP_REMEDY}")  # fmt: skip

    handle = torch.nn.modules.module.register_module_forward_pre_hook(refuse)
    try:
        yield
    finally:
        handle.remove()
