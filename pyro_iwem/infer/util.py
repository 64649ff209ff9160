"""Errors and warnings the machinery raises about a user's model and guide."""

import warnings


class ModelError(ValueError):
    """A model or guide the machinery refuses, with a message that names the site or argument."""


class ModelWarning(UserWarning):
    """A model or guide pattern whose consequence for the importance weights a user should know."""


def warn_once(seen, key, message):
    """Warn ``message`` (a :class:`ModelWarning`) unless ``key`` is already in the set ``seen``."""
    if key not in seen:
        seen.add(key)
        warnings.warn(message, ModelWarning, stacklevel=4)
