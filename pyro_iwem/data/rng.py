"""Reproducible random streams for data handling.

Every random choice the data package makes (shuffling, binarisation, validation slices,
missingness masks) draws from its own generator, seeded from a tuple of non-negative
integers such as ``(seed, epoch, stream)``. The generators do not touch the global torch
or numpy state, so a resumed run sees exactly the same data as an uninterrupted one.
"""

import numpy as np
import torch


def derive_seed(*keys):
    """Mix a tuple of non-negative integers into one 63-bit seed.

    Uses :class:`numpy.random.SeedSequence`, so nearby tuples such as ``(1234, 0)`` and
    ``(1234, 1)`` give unrelated streams.
    """
    for key in keys:
        if not isinstance(key, (int, np.integer)) or isinstance(key, bool) or key < 0:
            raise ValueError(f"seed keys must be non-negative integers, got {keys!r}")
    hi, lo = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return ((int(hi) << 32) | int(lo)) & ((1 << 63) - 1)


def torch_generator(*keys):
    """A CPU :class:`torch.Generator` seeded with :func:`derive_seed` of ``keys``."""
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*keys))
    return generator


def numpy_generator(*keys):
    """A :class:`numpy.random.Generator` seeded with ``keys``."""
    return np.random.default_rng(derive_seed(*keys))
