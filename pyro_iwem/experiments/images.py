"""Figures of a run: a PNG grid of model samples (PIL only), the learning curve and the
variance figures (the paper's Figures 1, 2 and 4)."""

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
    """Label a validation-per-epoch plot (whole epochs on the x axis) and write it to ``path``
    as a PNG, atomically."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation log-likelihood (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save_figure(fig, path)


def _log_y(ax):
    """A log y axis labelled in one notation: ticks at 1, 2 and 5 times the powers of ten,
    each written as ``%g`` (0.2, 0.5, 1, 2e-05), no labels on the minor ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


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
        (line,) = ax.plot(epochs, mean, lw=1.4, label=f"{method} ({len(runs)} run{'s' if len(runs) > 1 else ''}): {mean[-1]:.2f}")
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


def save_variance_curves(curves, path, title=""):
    """Figure 1 of the paper: the variance of the E-step estimate (eq. 2, left) and of the two
    readings of eq. (3) (its θ-part, the mean log p; the ELBO's value) per epoch, averaged over
    the data, written to ``path`` (PNG): for each group, the mean over its runs and, with several
    runs, their range as a band; log scale.

    :param dict curves: group label -> ``(epochs, values)``, where ``values`` maps ``var_q_hat``,
        ``var_joint`` and ``var_elbo`` to lists holding one value per run at each of ``epochs``.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = (
        ("var_q_hat", "(2): Q̂ = Σ w̄ log p, self-normalised IS"),
        ("var_joint", "(3), θ-part: mean log p, plain MC"),
        ("var_elbo", "(3): the ELBO, mean log p/q"),
    )
    fig = Figure(figsize=(14, 4.4), dpi=100)
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (key, name) in zip(axes, panels):
        positive = True
        for label, (epochs, values) in curves.items():
            values = np.array(values[key], dtype=float)
            mean = values.mean(1)
            runs = values.shape[1]
            (line,) = ax.plot(epochs, mean, marker="o" if len(epochs) < 30 else None, ms=3, lw=1.4,
                              label=f"{label} ({runs} run{'s' if runs > 1 else ''}): {mean[-1]:.3g}")
            if runs > 1:
                ax.fill_between(epochs, values.min(1), values.max(1), color=line.get_color(), alpha=0.15)
            positive = positive and bool((values > 0).all())
        if positive:
            _log_y(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(f"variance of {name}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("variance, mean over the data")
    fig.suptitle(title, fontsize=9)
    _save_figure(fig, path)


def save_variance_boxplots(boxes, path, title="", xlabel="", ylabel="variance"):
    """Figures 2 and 4 of the paper: box plots of per-datum variances, written to ``path`` (PNG):
    one position on the x axis per category, one coloured box per series within it (log scale
    when every value is positive; whiskers at 1.5 IQR, outliers as points).

    :param dict boxes: category -> {series -> list of per-datum values}.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    series = list(dict.fromkeys(name for inner in boxes.values() for name in inner))
    colors = {name: f"C{i}" for i, name in enumerate(series)}
    width = min(0.8 / max(len(series), 1), 0.4)
    fig = Figure(figsize=(max(5.0, 1.2 + 1.1 * len(boxes) * max(len(series), 1) ** 0.5) + 1.6, 4.5), dpi=100)
    ax = fig.add_subplot()
    positive = True
    for i, (category, inner) in enumerate(boxes.items()):
        for j, name in enumerate(series):
            if name not in inner or not inner[name]:
                continue
            values = np.asarray(inner[name], dtype=float)
            positive = positive and bool((values > 0).all())
            position = i + (j - (len(series) - 1) / 2) * width
            ax.boxplot(values, positions=[position], widths=width * 0.85, patch_artist=True,
                       boxprops={"facecolor": colors[name], "alpha": 0.6}, medianprops={"color": "black"},
                       flierprops={"markersize": 2})
    ax.set_xticks(range(len(boxes)))
    ax.set_xticklabels(list(boxes), fontsize=8, rotation=0 if len(boxes) < 5 else 20)
    ax.set_xlim(-0.6, len(boxes) - 0.4)
    if positive:
        _log_y(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    # beside the axes, not over the boxes and their whiskers
    ax.legend(handles=[Patch(facecolor=colors[n], alpha=0.6, label=n) for n in series], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    _save_figure(fig, path)
