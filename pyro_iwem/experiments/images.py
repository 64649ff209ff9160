"""Figures of a run: a PNG grid of model samples (PIL only) and the learning curve."""

import math

import numpy as np

from .checkpoint import atomic_path

#: Images smaller than this many pixels on a side are upscaled (nearest neighbour) to it.
MIN_SIDE = 28


def upscale_factor(image_shape, min_side=MIN_SIDE):
    """The integer factor that brings the shorter side of an image to at least ``min_side``."""
    return max(1, math.ceil(min_side / min(image_shape)))


def grid_size(n, image_shape, nrow=8, padding=2, scale=None):
    """``(width, height)`` in pixels of the grid :func:`image_grid` makes of ``n`` images."""
    scale = upscale_factor(image_shape) if scale is None else scale
    h, w = (s * scale for s in image_shape)
    ncol = min(nrow, n)
    nrows = math.ceil(n / nrow)
    return ncol * w + (ncol + 1) * padding, nrows * h + (nrows + 1) * padding


def image_grid(images, image_shape, nrow=8, padding=2, scale=None, background=128):
    """Arrange images in ``[0, 1]`` into one 8-bit grayscale array.

    :param images: ``(n, H*W)`` or ``(n, H, W)`` array or tensor of intensities in ``[0, 1]``
        (1 = ink, shown white).
    :param image_shape: ``(H, W)``.
    :param int nrow: images per row.
    :param int padding: pixels between images and around the grid.
    :param int scale: nearest-neighbour upscaling; default :func:`upscale_factor`.
    :returns: a ``uint8`` array of shape ``(height, width)`` (see :func:`grid_size`).
    """
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    images = np.asarray(images, dtype=np.float64).reshape(-1, *image_shape)
    scale = upscale_factor(image_shape) if scale is None else scale
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w = images.shape
    width, height = grid_size(n, image_shape, nrow, padding, scale)
    grid = np.full((height, width), background, dtype=np.uint8)
    pixels = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid


def save_image_grid(images, image_shape, path, **kwargs):
    """Write :func:`image_grid` of ``images`` to ``path`` as a PNG, atomically."""
    from PIL import Image

    grid = Image.fromarray(image_grid(images, image_shape, **kwargs))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def _save_epoch_plot(fig, ax, title, path):
    """Label a validation-per-epoch plot and write it to ``path`` as a PNG, atomically."""
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation log-likelihood (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save_figure(fig, path)


def _save_figure(fig, path):
    """Lay out a matplotlib figure and write it to ``path`` as a PNG, atomically."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def save_method_curves(histories, path, title=""):
    """Plot the validation log-likelihood per epoch of several methods to ``path`` (PNG):
    for each method, the mean over its runs (seeds) and the range as a band.

    :param dict histories: method name -> list of per-run histories (lists of per-epoch dicts).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    for method, runs in histories.items():
        length = min(len(h) for h in runs)
        valid = np.array([[e["valid_ll"] for e in h[:length]] for h in runs], dtype=float)
        epochs = np.arange(1, length + 1)
        mean = valid.mean(0)
        (line,) = ax.plot(epochs, mean, lw=1.4, label=f"{method} ({len(runs)} runs): {mean[-1]:.2f}")
        if len(runs) > 1:
            ax.fill_between(epochs, valid.min(0), valid.max(0), color=line.get_color(), alpha=0.15)
    _save_epoch_plot(fig, ax, title, path)


def save_learning_curve(history, path, title=""):
    """Plot validation log-likelihood per epoch (and the best epoch) to ``path`` as a PNG
    (rendered with matplotlib's Agg, whatever the session's backend).

    :param history: a list of per-epoch dicts with ``epoch``, ``valid_ll`` and ``alpha``.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    epochs = [h["epoch"] for h in history]
    valid = [h["valid_ll"] for h in history]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(epochs, valid, marker="o" if len(epochs) < 30 else None, lw=1.2, label="validation IWAE bound")
    if valid:
        best = int(np.nanargmax(valid))
        ax.plot([epochs[best]], [valid[best]], "r*", ms=10, label=f"best {valid[best]:.2f} (epoch {epochs[best]})")
    annealed = [h["epoch"] for h in history if h.get("alpha") is not None and h["alpha"] >= 1]
    if annealed and annealed[0] != epochs[0]:
        ax.axvline(annealed[0], color="gray", ls="--", lw=0.8, label="α reaches 1")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save_epoch_plot(fig, ax, title, path)


def save_completion_grid(columns, image_shape, path, title=""):
    """Figure 5 of the paper: one row per image, one titled column per entry of ``columns``
    (e.g. observed, truth, completions), written to ``path`` as a PNG, atomically.

    :param dict columns: column title -> ``(n, H*W)`` tensor or array of intensities in ``[0, 1]``.
    """
    from matplotlib.figure import Figure

    images = {name: np.asarray(getattr(x, "cpu", lambda: x)(), dtype=float) for name, x in columns.items()}
    n = len(next(iter(images.values())))
    fig = Figure(figsize=(1.3 * len(images), 1.3 * n + 0.6), dpi=100)
    axes = fig.subplots(n, len(images), squeeze=False)
    for col, (name, x) in enumerate(images.items()):
        axes[0, col].set_title(name, fontsize=8)
        for row in range(n):
            axes[row, col].imshow(x[row].reshape(image_shape), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    _save_figure(fig, path)
