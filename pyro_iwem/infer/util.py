"""Errors and warnings the machinery raises about a user's model and guide, and small helpers
shared by its modules."""

import os
import sys
import warnings

import pyro
import torch

_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) for m in (sys.modules[__name__.rsplit(".", 1)[0]], pyro, torch))


class ModelError(ValueError):
    """A model or guide the machinery refuses, with a message that names the site or argument."""


class ModelWarning(UserWarning):
    """A model or guide pattern whose consequence for the importance weights a user should know."""


def warn_once(seen, key, message):
    """Warn ``message`` (a :class:`ModelWarning`) unless ``key`` is already in the set ``seen``."""
    if key not in seen:
        seen.add(key)
        warnings.warn(message, ModelWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel():
    """The stack level of the first frame outside pyro_iwem.infer, Pyro and PyTorch: the user's call."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def device_of(args):
    """The device of the first tensor among ``args`` (``None`` if there is none)."""
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)
