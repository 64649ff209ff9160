r"""One run on several processes: an optimiser that all-reduces gradients, and the broadcast
of the initial parameters (docs/scaling.md).

pyro_iwem takes its gradients with :func:`torch.autograd.grad`, checks them, then writes
them: a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper never sees them (its
reduction hooks fire on ``backward()`` only). Multi-process training therefore all-reduces
inside the optimiser step, as Pyro's Horovod example does: :class:`DistributedOptim` wraps
any :class:`pyro.optim.PyroOptim` and averages the gradients of the parameters it is called
with, in one flat collective per call, in an order that is the same on every process, after a
vote that refuses the step on every process if it was refused on one. Under ``torchrun``::

    torch.distributed.init_process_group("gloo")        # "nccl" on GPUs
    pyro.set_rng_seed(seed)                             # 1. the same seed everywhere
    optim = DistributedOptim(pyro.optim.Adam({"lr": 1e-3}))
    iwem = IWEM(model, guide, optim=optim)
    iwem.evaluate_loss(first_batch)                     # 2. lazy parameters now exist
    broadcast_parameters()                              # 3. rank 0's values everywhere
    for indices in my_share_of_each_batch:              # 4. each process its share
        iwem.step(x, subsample=indices)                 # 5. gradients averaged

With the data plate's size the global batch (``pyro.plate("data", N, subsample=indices)``),
every process's loss is scaled to the whole data set, and the average of their gradients is
the gradient of the global batch.
"""

import functools
import zlib

import pyro
import torch
import torch.distributed as dist
from pyro.optim import PyroOptim

from .infer.collective import StepRefused, collective_step, mark_voted, register_voter
from .infer.util import ModelError

__all__ = ["DistributedOptim", "StepRefused", "broadcast_parameters", "collective_step"]

_OK, _CLOSE = 1, 2
_ABSENT = -(2**62)  # a refusing process's entries of a vote: below every other process's


class DistributedOptim(PyroOptim):
    r"""``optim`` with its gradients averaged over the processes of ``group`` before each step.

    Called, as any :class:`~pyro.optim.PyroOptim` is, on parameters whose ``.grad`` holds
    this process's gradient, it

    1. orders them the same way on every process: by name in Pyro's param store when every
       one has one, else in the order given (a list or tuple: IWEM and the losses pass theirs
       in trace order), else (a set, as :class:`pyro.infer.SVI` passes, of parameters without
       a name, ``pyro.settings.set(module_local_params=True)``) in the order the last
       :meth:`ParticleLoss.loss_and_grads <pyro_iwem.infer.ParticleLoss.loss_and_grads>`
       wrote their gradients; a set it cannot order is refused;
    2. votes with the other processes (:func:`~pyro_iwem.infer.collective_step`): if any
       process refused this step (an exception in its step before the optimiser ran: a NaN
       loss, a bad batch), every process raises the same :class:`~pyro_iwem.infer.StepRefused`, with no
       parameter moved and these parameters' gradients cleared; a process stepping other
       parameters (names, shapes) is refused alike;
    3. averages the gradients in one flat all-reduce, then steps ``optim``, whose state
       (``optim_objs``, ``get_state()``, ``set_state()``) it shares.

    ``torch.distributed`` must be initialised before the first step; the initial parameters
    are made equal with :func:`broadcast_parameters` after a first call has created them.

    :param pyro.optim.PyroOptim optim: the optimiser stepped after the average.
    :param group: the process group (default: the world).
    """

    #: what :func:`~pyro_iwem.infer.collective_step` recognises a voter by
    votes_collectively = True

    def __init__(self, optim, group=None):
        if not isinstance(optim, PyroOptim) or isinstance(optim, DistributedOptim):
            raise TypeError(f"DistributedOptim wraps a pyro.optim.PyroOptim (e.g. pyro.optim.Adam), got {optim!r}")
        self.optim = optim  # PyroOptim.__init__ is not called: the state is optim's
        self.group = group
        #: whether a step (:func:`~pyro_iwem.infer.collective_step`) is running
        self.stepping = False
        self._hint = []
        register_voter(self)

    def __getattr__(self, name):  # pt_optim_args and the rest of the wrapped optimiser's attributes
        if name.startswith("__") or name == "optim":
            raise AttributeError(name)
        return getattr(self.optim, name)

    @property
    def optim_objs(self):
        """The wrapped optimiser's per-parameter torch optimisers (IWEM's snapshot reads them)."""
        return self.optim.optim_objs

    @property
    def grad_clip(self):
        return self.optim.grad_clip

    def get_state(self):
        return self.optim.get_state()

    def set_state(self, state_dict):
        self.optim.set_state(state_dict)

    @property
    def active(self):
        """Whether ``torch.distributed`` is initialised (the steps vote only then)."""
        return dist.is_available() and dist.is_initialized()

    def __call__(self, params, *args, **kwargs):
        if not self.active:
            raise RuntimeError(
                "DistributedOptim steps after torch.distributed.init_process_group(...); it is not initialised"
            )
        params = params if isinstance(params, (list, tuple)) else set(params)  # an iterator is read once
        try:
            try:
                ordered, names = ordered_params(params, self._hint)
                layout = _layout(ordered, names, grads_only=True)
                stepped = [p for p in ordered if p.grad is not None]
                _check_flat([p.grad for p in stepped])
            except Exception as error:
                self.refuse(error)  # raises StepRefused on every process
            self._vote(_OK, layout)
        except StepRefused:
            for p in params:  # nothing moves, and no gradient is left to add to the next step's
                p.grad = None
            raise
        try:
            if stepped:
                _all_reduce_mean([p.grad for p in stepped], self.group, assign=stepped)
        except Exception as error:
            raise mark_voted(error)
        self.optim(ordered, *args, **kwargs)

    def hint_order(self, params):
        """The trace order of the parameters a loss wrote gradients to (see step 1 above)."""
        self._hint = list(params)

    def refuse(self, error):
        """Votes this step refused for ``error``; raises :class:`~pyro_iwem.infer.StepRefused`
        on every process."""
        self._vote(None, refusal=error)

    def close(self):
        """The vote that ends a step: raises :class:`~pyro_iwem.infer.StepRefused` if a process
        refused it."""
        self._vote(_CLOSE, (0, 0))

    def broadcast_parameters(self, src=0, params=None):
        """:func:`broadcast_parameters` in this optimiser's group."""
        broadcast_parameters(src, params, self.group)

    def _vote(self, kind, layout=None, refusal=None):
        if refusal is None:
            n, h = layout
            entries = [0, kind, -kind, n, -n, h, -h]
        else:
            entries = [1] + [_ABSENT] * 6
        try:
            found = _all_reduce_max(entries, self.group)
            if found[0]:
                message = f"{type(refusal).__name__}: {refusal}" if refusal is not None else None
                raise StepRefused(_refusal_message(_gather(message, self.group), found)) from refusal
            if found[1] != -found[2]:
                raise StepRefused(
                    "the processes are at different points of a step (one at an optimiser call, another at the "
                    "step's end): they ran different numbers of optimiser calls, e.g. a P-step with nothing to step "
                    "on some processes only"
                )
            if found[3] != -found[4] or found[5] != -found[6]:
                raise StepRefused(
                    "the processes' optimiser calls step different parameters (their names, shapes, or which have a "
                    "gradient differ): their gradients cannot be averaged; no parameter moved"
                )
        except Exception as error:
            raise mark_voted(error)


def _refusal_message(messages, found):
    world = len(messages)
    said = "; ".join(f"rank {rank} raised {text}" for rank, text in enumerate(messages) if text is not None)
    after = found[1] == _CLOSE and found[2] == -_CLOSE  # the others had stepped: the refusal came after
    when = (" after the step's optimiser calls (the parameters moved, alike on every process)" if after
            else ", on every process before its optimiser call")  # fmt: skip
    return f"the step is refused on all {world} processes{when}: {said}"


def ordered_params(params, hint=()):
    """``(params, names)``, deduplicated and ordered the same way on every process: by name in
    Pyro's param store when every one has one, else as given if a list or tuple, else in the
    order of ``hint``; refuses an unordered collection it cannot order."""
    given = params
    params = list({id(p): p for p in params}.values())
    store = pyro.get_param_store()
    names = [store.param_name(p) for p in params]
    if all(name is not None for name in names):
        pairs = sorted(zip(names, params), key=lambda pair: pair[0])
        return [p for _, p in pairs], [name for name, _ in pairs]
    if isinstance(given, (list, tuple)):
        return params, names
    index = {id(p): i for i, p in enumerate(hint)}
    if all(id(p) in index for p in params):
        params = sorted(params, key=lambda p: index[id(p)])
        return params, [store.param_name(p) for p in params]
    nameless = sum(name is None for name in names)
    raise ModelError(
        f"DistributedOptim was handed {len(params)} parameters as an unordered {type(given).__name__}, {nameless} of "
        "them without a name in Pyro's param store (pyro.settings.set(module_local_params=True)?): the order in "
        "which their gradients are all-reduced could differ between processes. Pass them in a list, in an order "
        "that is the same on every process (IWEM and pyro_iwem's losses do), or register them by name with "
        "pyro.param / pyro.module"
    )


def _layout(params, names, grads_only):
    """``(number of entries, checksum)`` of what a collective over ``params`` sends: equal on
    every process that sends the same names, shapes and dtypes in the same order."""
    rows = [(name or "", tuple(p.shape), str(p.dtype), p.grad is not None) for name, p in zip(names, params)]
    entries = sum(p.numel() for p in params if p.grad is not None or not grads_only)
    return entries, zlib.crc32(repr(rows).encode())


def _check_flat(tensors):
    """Refuses tensors one flat collective cannot carry: sparse ones, or several devices."""
    if any(t.layout != torch.strided for t in tensors):
        raise ModelError("DistributedOptim all-reduces dense gradients only; a gradient is sparse")
    if len({t.device for t in tensors}) > 1:
        raise ModelError(f"DistributedOptim all-reduces one flat tensor: the gradients are on several devices "
                         f"({sorted(str(d) for d in {t.device for t in tensors})})")  # fmt: skip


def collective_device(group=None):
    """Where a collective's tensor lives for the backend of ``group``."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None


def _all_reduce_max(entries, group):
    t = torch.tensor(entries, dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def _gather(obj, group):
    found = [None] * dist.get_world_size(group)
    dist.all_gather_object(found, obj, group=group)
    return found


def _flatten(tensors):
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _unflatten(flat, like):
    return [chunk.view_as(t).to(t.dtype) for chunk, t in zip(flat.split([t.numel() for t in like]), like)]


def _all_reduce_mean(grads, group, assign):
    """The mean over the processes of ``grads`` (one flat all-reduce), written to ``assign``'s ``.grad``."""
    flat = _flatten(grads)
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    for p, g in zip(assign, _unflatten(flat, grads)):
        p.grad = g


def broadcast_parameters(src=0, params=None, group=None):
    """Copies process ``src``'s parameter values to every process of ``group`` (one flat
    broadcast), after checking that every process holds the same parameters.

    Call it once, after a first call of the programs has created the (lazy) parameters, with
    the same seed on every process: e.g. ``iwem.evaluate_loss(batch)`` or
    ``svi.evaluate_loss(batch)``, then ``broadcast_parameters()``.

    :param int src: the rank whose values are kept.
    :param params: ``None`` (every parameter in Pyro's param store, in name order), an
        ``nn.Module`` (its parameters and buffers: modules that keep their parameters outside
        the store), or a list of tensors in an order that is the same on every process.
    :param group: the process group (default: the world).
    """
    if params is None:
        params = [p for _, p in sorted(pyro.get_param_store().named_parameters(), key=lambda item: item[0])]
    elif isinstance(params, torch.nn.Module):
        params = [*params.parameters(), *params.buffers()]
    params, names = ordered_params(params)
    _check_flat(params)
    n, h = _layout(params, names, grads_only=False)
    found = _all_reduce_max([n, -n, h, -h], group)
    if found[0] != -found[1] or found[2] != -found[3]:
        raise ModelError(
            "broadcast_parameters: the processes hold different parameters (names, shapes or dtypes differ): make "
            "the same first call, with the same seed and programs, on every process before broadcasting"
        )
    if not params:
        return
    flat = _flatten(params)
    dist.broadcast(flat, src=src, group=group)
    with torch.no_grad():
        for p, value in zip(params, _unflatten(flat, params)):
            p.copy_(value)
