"""Atomic files and the state a resumed run needs to continue exactly.

Every file of a run directory is written to a temporary file in the same directory and
renamed over its target with :func:`os.replace`, so an interrupted write leaves either
the old file or the new one, never a partial one.
"""

import errno
import fcntl
import json
import math
import os
import pathlib
import pickle
import random
import socket

import numpy as np
import pyro
import torch

from pyro_iwem.atomic import atomic_path

from .errors import RunError

#: File names inside a run directory.
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.json"
SAMPLES = "samples.png"
CURVE = "curve.png"
COMPLETIONS = "completions.png"
RUN_FILES = (CHECKPOINT, BEST, METRICS, SAMPLES, CURVE, COMPLETIONS)
#: The lock file of a run directory (:class:`RunDirLock`).
LOCK = ".lock"

#: Bumped when the checkpoint layout changes incompatibly.
CHECKPOINT_FORMAT = 1


def atomic_torch_save(obj, path):
    """``torch.save(obj, path)``, atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite_or_none(value):
    """NaN and infinities as ``None`` (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def atomic_write_json(obj, path):
    """Write ``obj`` as indented JSON (NaN written as ``null``), atomically."""
    text = json.dumps(_finite_or_none(obj), indent=2, sort_keys=True, default=_json_default)
    with atomic_path(path) as tmp:
        pathlib.Path(tmp).write_text(text + "\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


#: What ``torch.load`` raises on a truncated, empty or foreign file.
UNREADABLE = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
              IndexError, KeyError, UnicodeDecodeError)


def torch_load(path, map_location=None):
    """Load a file this package wrote (it holds RNG states and plain Python objects, so
    ``weights_only`` loading does not apply).

    A truncated, empty or foreign file raises :class:`RunError`: one line naming the file,
    saying which other file of its run directory is intact and what to do."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except UNREADABLE as e:
        path = pathlib.Path(path)
        size = path.stat().st_size
        what = "is empty" if size == 0 else f"is truncated or not a checkpoint ({size} bytes: {_first_line(e)})"
        raise RunError(f"{path} {what}; {intact_advice(path)}") from None


def _first_line(error):
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0].split(". ")[0].rstrip(".")


def epoch_of(path):
    """The epoch of a readable ``best.pt`` or ``checkpoint.pt``, else ``None``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["epoch"]
    except (OSError, *UNREADABLE):
        return None


def intact_advice(path):
    """What is intact in the run directory of an unreadable ``path`` and what to do."""
    run_dir = path.parent
    if path.name not in (CHECKPOINT, BEST):
        return "remove it to compute it afresh"
    other = BEST if path.name == CHECKPOINT else CHECKPOINT
    epoch = epoch_of(run_dir / other)
    if epoch is None:
        return f"no other file of the run is intact: start it over with `pyro-iwem train ... --out {run_dir} --force`"
    if other == BEST:
        return (f"{BEST} from epoch {epoch} is intact (`pyro-iwem evaluate {run_dir}` scores it); "
                f"to train again, start the run over with `pyro-iwem train ... --out {run_dir} --force`")
    return (f"{CHECKPOINT} from epoch {epoch} is intact and holds the best parameters: "
            f"`pyro-iwem train --out {run_dir} --resume` writes {BEST} again from it")


def readable(path):
    """Whether ``path`` is a file :func:`torch_load` reads."""
    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except (OSError, *UNREADABLE):
        return False


# --- the lock of a run directory ----------------------------------------------------------------
def unwritable(path, error, option="--out"):
    """The :class:`RunError` of an ``OSError`` met writing in ``path``'s directory."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    hint = f"; make it writable or give another {option}" if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
    return RunError(f"cannot write in {path}: {reason}{hint}")


class RunDirLock:
    """An exclusive lock on a run directory: ``fcntl.flock`` on its :data:`LOCK` file, which
    the system releases when the process ends, however it ends (no stale lock after a kill).
    :meth:`acquire` creates the directory and raises :class:`RunError` at once if another
    process holds the lock."""

    def __init__(self, run_dir):
        self.run_dir = pathlib.Path(run_dir)
        self.fd = None

    def acquire(self):
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise unwritable(self.run_dir, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise RunError(
                f"{self.run_dir} is in use by another run{f' ({holder})' if holder else ''}: wait for it to end "
                "or give another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self):  # a Trainer prepared and dropped without running lets the directory go
        self.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# --- random number generators ---------------------------------------------------------
def rng_state():
    """The states of every generator a training step may draw from."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in states])


# --- parameters --------------------------------------------------------------------------
def module_param_names(model):
    """Param-store names under which ``pyro.module(name, child)`` registers the parameters
    of the direct children of ``model`` (e.g. ``decoder$$$0.weight``)."""
    from pyro.params.param_store import param_with_module_name

    return {
        param_with_module_name(child_name, name)
        for child_name, child in model.named_children()
        for name, _ in child.named_parameters()
    }


def restore_parameters(model, model_state, param_store_state):
    """Load ``model_state`` into ``model`` in place and refill Pyro's param store.

    Parameters that ``pyro.module`` registers from ``model``'s children are restored via the
    module (in place, so the module and the param store keep sharing one tensor; the next
    ``pyro.module`` call registers them again under the same names); any other parameter of
    the saved store (plain ``pyro.param`` sites) is put back into the store.
    """
    model.load_state_dict(model_state)
    store = pyro.get_param_store()
    store.clear()
    from_modules = module_param_names(model)
    params = {k: v for k, v in param_store_state["params"].items() if k not in from_modules}
    if params:
        device = next(model.parameters()).device
        params = {k: v.detach().to(device).requires_grad_() for k, v in params.items()}
        constraints = {k: v for k, v in param_store_state["constraints"].items() if k in params}
        store.set_state({"params": params, "constraints": constraints})


def clone_state_dict(model):
    """A detached copy of ``model.state_dict()`` on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
