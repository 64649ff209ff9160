"""Missingness masks for the missing-data experiments (§4, §5).

Masks are ``torch.bool`` tensors with **True = observed** and False = missing, the
convention of Pyro's ``obs_mask``. They are drawn from their own seeded generators, so
the same arguments always give the same mask.
"""

import math

import numpy as np
import torch

from .rng import torch_generator


def _grid_shape(grid):
    """``grid`` as a pair ``(rows, cols)`` of positive ints."""
    grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid must be a positive int or a pair of them, got {grid!r}")
    return grid


def _band_of_each_pixel(length, num_bands):
    """Band number of each of ``length`` pixels cut into ``num_bands`` near-equal bands."""
    sizes = [len(band) for band in np.array_split(np.arange(length), num_bands)]
    return np.repeat(np.arange(num_bands), sizes)


def patch_index(image_shape=(28, 28), grid=3):
    """The patch each pixel belongs to, as a long tensor of shape ``(H * W,)``.

    Rows and columns are cut into ``grid`` contiguous bands as evenly as possible, larger
    bands first (:func:`numpy.array_split`): for 28 pixels and ``grid=3`` the bands are
    pixels 0-9, 10-18 and 19-27 (10 + 9 + 9). Patches are numbered row-major,
    ``band_row * grid_cols + band_col``.
    """
    height, width = image_shape
    grid_rows, grid_cols = _grid_shape(grid)
    if grid_rows > height or grid_cols > width:
        raise ValueError(
            f"a {grid_rows}x{grid_cols} grid does not fit images of shape {image_shape}"
        )
    row_band = _band_of_each_pixel(height, grid_rows)
    col_band = _band_of_each_pixel(width, grid_cols)
    return torch.as_tensor(row_band[:, None] * grid_cols + col_band[None, :]).reshape(-1)


def patch_mask(n_images, n_removed, seed, image_shape=(28, 28), grid=3):
    """Remove ``n_removed`` whole patches per image, chosen at random.

    Each image is cut into a ``grid x grid`` grid of patches (see :func:`patch_index`
    for the boundaries) and exactly ``n_removed`` distinct patches, drawn uniformly and
    independently per image, are marked missing.

    :param int n_images: number of images.
    :param int n_removed: patches to remove per image, ``0 <= n_removed <= grid**2``.
    :param int seed: seeds the draw (a non-negative int).
    :param tuple image_shape: ``(H, W)``.
    :param grid: patches per side, or ``(rows, cols)``.
    :returns: ``torch.bool`` tensor ``(n_images, H * W)``, True = observed.
    """
    patches = patch_index(image_shape, grid)
    num_patches = math.prod(_grid_shape(grid))
    if not 0 <= n_removed <= num_patches:
        raise ValueError(f"n_removed must be in 0..{num_patches}, got {n_removed}")
    scores = torch.rand(n_images, num_patches, generator=torch_generator(seed))
    chosen = scores.argsort(dim=1)[:, :n_removed]  # a uniformly random n_removed-subset
    removed = torch.zeros(n_images, num_patches, dtype=torch.bool).scatter_(1, chosen, True)
    return ~removed[:, patches]


def mcar_mask(shape, rate, seed, keep_one_observed=False):
    """Entries missing completely at random, each independently with probability ``rate``.

    This is the MIWAE protocol (``rate=0.5`` in the paper). By default a row may end up
    with every entry missing (for 4 features at rate 0.5, about 1 row in 16), as in the
    MIWAE code; such rows are imputed from the prior alone. With
    ``keep_one_observed=True`` the entries of such rows are re-drawn, from the same
    generator, until each row has at least one observed entry.

    :param tuple shape: mask shape, ``(rows, columns)`` or any shape (the last dimension
        is the row for ``keep_one_observed``).
    :param float rate: missingness probability, ``0 <= rate < 1``.
    :param int seed: seeds the draw (a non-negative int).
    :returns: ``torch.bool`` tensor of ``shape``, True = observed.
    """
    if not 0 <= rate < 1:
        raise ValueError(f"rate must satisfy 0 <= rate < 1, got {rate}")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    generator = torch_generator(seed)
    observed = torch.rand(shape, generator=generator) >= rate
    if keep_one_observed and observed.numel():
        rows = observed.reshape(-1, shape[-1])
        empty = ~rows.any(-1)
        while empty.any():
            rows[empty] = torch.rand(int(empty.sum()), shape[-1], generator=generator) >= rate
            empty = ~rows.any(-1)
    return observed
