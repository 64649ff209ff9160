"""The processes of one training run: one (:data:`SOLO`), or several under ``torchrun``.

``pyro-iwem train`` launched by ``torchrun --nproc_per_node P`` (``WORLD_SIZE`` = P > 1 in the
environment) is one run on P processes (docs/scaling.md): every process builds the same model
from the same seed, takes its share of every minibatch, and steps with
:class:`~pyro_iwem.distributed.DistributedOptim`; process 0 alone writes the run's files. A
:class:`World` is what the trainer and the evaluation need to know of that: which share is
this process's, how to add numbers up over the processes, and how to fail together.
"""

import dataclasses
import os

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import collective_device
from .errors import RunError


@dataclasses.dataclass(frozen=True)
class World:
    """This process's ``rank`` among ``size`` processes of one run (``size`` 1: a plain run)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self):
        """Whether this process writes the run's files and prints its progress (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.size > 1

    def share(self, batch):
        """This process's share of a minibatch (a tensor or a tuple of tensors of one length):
        every ``size``-th datum from ``rank`` on."""
        if isinstance(batch, tuple):
            return tuple(t[self.rank :: self.size] for t in batch)
        return batch[self.rank :: self.size]

    def owns(self, index):
        """Whether the ``index``-th evaluation batch is this process's (every ``size``-th)."""
        return index % self.size == self.rank

    def seed(self, seed):
        """A seed for this process's random draws: ``seed`` itself in a plain run, one of
        its own per rank otherwise (the particles of the processes' shares must differ)."""
        if not self.distributed:
            return seed
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])

    def sum(self, *values):
        """The sums over the processes of the floats ``values`` (one all-reduce, float64)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=collective_device())
        dist.all_reduce(t)
        return tuple(t.tolist())

    def gather(self, obj):
        """Every process's ``obj``, in rank order (``[obj]`` in a plain run)."""
        if not self.distributed:
            return [obj]
        found = [None] * self.size
        dist.all_gather_object(found, obj)
        return found

    def agree(self, fn):
        """``fn()`` on every process, failing on all if it failed on one: the process that
        raised re-raises its error, the others a :class:`RunError` that names the rank and
        the error; ``echo`` is set on each, True only on the first process that failed (the
        one that reports it). Nothing collective may run inside ``fn``."""
        try:
            result, error = fn(), None
        except Exception as e:  # noqa: BLE001 -- handed to every process, then re-raised
            result, error = None, e
        found = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(rank, text) for rank, text in enumerate(found) if text is not None]
        if not failed:
            return result
        first, text = failed[0]
        if error is None:
            error = RunError(f"process {first} of {self.size} failed: {text}")
        error.echo = self.rank == first  # one process reports it
        raise error

    @classmethod
    def from_env(cls, device="auto"):
        """The world ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
        ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), its process group initialised
        (NCCL when the run is on CUDA, else gloo) and, on CUDA, this process's GPU set to
        ``LOCAL_RANK``; :data:`SOLO` when ``WORLD_SIZE`` is unset or 1."""
        size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if size <= 1:
            return SOLO
        if not dist.is_initialized():
            cuda = torch.cuda.is_available() and str(device or "auto").split(":")[0] in ("auto", "cuda")
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def close(self):
        """Ends the process group (of a world made by :meth:`from_env`)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


#: A run on one process.
SOLO = World()


def local_device(device, world):
    """``device`` for this process of ``world``: each process of a run on CUDA its own GPU
    (``LOCAL_RANK``'s, set by :meth:`World.from_env`)."""
    if world.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
