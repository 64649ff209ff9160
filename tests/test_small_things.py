"""What a user sees besides the numbers: plots with whole epochs and one notation per axis, a
legend beside the boxes, a warning for the CNN on small images, sweeps without Ray's warning
and with plain paths."""

import logging
import os

import numpy as np
import pytest

from pyro_iwem.experiments import images
from pyro_iwem.experiments.cli import main


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plotting functions save, kept for a look."""
    saved = []
    monkeypatch.setattr(images, "_save_figure", lambda fig, path: (fig.canvas.draw(), saved.append(fig)))
    return saved


def test_curves_have_whole_epochs_and_say_one_run(figures):
    images.save_method_curves({"iwem": [[{"valid_ll": -30.0 + e} for e in range(3)]]}, "unused.png")
    (ax,) = figures[0].axes
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["iwem (1 run): -28.00"]


def test_log_axes_use_one_notation_and_the_legend_stays_off_the_boxes(figures):
    rng = np.random.default_rng(0)
    images.save_variance_curves(
        {"iwem": ([1, 2, 3], {k: [[0.3 + 0.1 * rng.random()] for _ in range(3)] for k in ("var_q_hat", "var_joint", "var_elbo")})},
        "unused.png",
    )
    boxes = {"(2)": {"iwem": list(rng.lognormal(0, 1, 50)), "iwae": list(rng.lognormal(1, 1, 50))}}
    images.save_variance_boxplots(boxes, "unused.png")
    for fig in figures:
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert labels and all("$" not in text and "\\times" not in text for text in labels), labels  # plain %g
        assert not [t for t in ax.yaxis.get_minorticklabels() if t.get_text()]
    ax = figures[1].axes[0]
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1  # beside the axes, so it covers no whisker


def test_the_cnn_on_8x8_digits_is_a_warning(tmp_path, capsys):
    argv = ["train", "--dataset", "digits-8x8", "--model", "cnn", "--epochs", "1", "--max-train", "100", "--max-eval",
            "20", "--K", "2", "--J", "2", "--eval-K", "5", "--valid-K", "2", "--device", "cpu", "--quiet", "--out",
            str(tmp_path / "run")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: --model cnn is the paper's network for 28x28 images" in err and "leave it 2x2" in err


def test_a_sweep_says_its_paths_plainly_and_starts_ray_without_its_auth_warning(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from pyro_iwem.experiments import sweep

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    runs = sweep.sweep_runs(["digits-8x8"], ["mlp"], ["iwem"], [1], [2], [2])
    assert sweep.Sweep(runs, "a/../sweep").sweep_dir == tmp_path / "sweep"
    for name in ("RAY_worker_niceness", "RAY_USAGE_STATS_ENABLED"):  # put back as they were
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    sweep.import_ray()  # a local cluster: Ray's token authentication, without its notice about it
    logger = logging.getLogger(sweep.RAY_AUTH_LOGGER)

    def passes(message):
        return logger.filter(logging.LogRecord(logger.name, logging.WARNING, __file__, 1, message, None, None))

    assert not passes("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
    assert passes("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    assert "RAY_AUTH_MODE" not in os.environ  # Ray's own choice, unchanged
