"""``pyro-iwem train --record-variance`` and ``pyro-iwem figures`` (the paper's Figures 1, 2, 4).

Trains on a slice of scikit-learn's 8x8 digits, as tests/test_cli.py does.
"""

import json
import math

import pytest
import torch
from PIL import Image

from pyro_iwem.experiments.checkpoint import torch_load
from pyro_iwem.experiments.cli import main

from tests.test_cli import one_error_line, train

RECORD = ["--record-variance", "10", "--variance-repeats", "5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """IWEM and IWEM-woo (2 epochs) and miss-IWEM with 3 and 5 missing patches (1 epoch), recording."""
    root = tmp_path_factory.mktemp("variance-runs")
    for method in ("iwem", "iwem-woo"):
        assert train(root / method, *RECORD, method=method, epochs=2) == 0
    for patches in (3, 5):
        assert train(root / f"miss-{patches}", *RECORD, "--missing-patches", str(patches), method="miss-iwem") == 0
    return root


def read(path):
    return json.loads(path.read_text())


def test_history_and_metrics_hold_the_variances_per_epoch(runs):
    history = torch_load(runs / "iwem" / "checkpoint.pt")["history"]
    assert len(history) == 2
    for entry in history:
        for key in ("var_q_hat", "var_elbo", "var_joint", "var_q_hat_median", "variance_seconds"):
            assert math.isfinite(entry[key]) and entry[key] > 0, key
    metrics = read(runs / "iwem" / "metrics.json")
    variance = metrics["variance"]
    assert (variance["num_data"], variance["num_repeats"], variance["K"], variance["epoch"]) == (10, 5, 3, [1, 2])
    assert variance["q_hat"] == [h["var_q_hat"] for h in history]
    assert variance["elbo"] == [h["var_elbo"] for h in history]
    assert metrics["var_q_hat"] == history[-1]["var_q_hat"]


def test_recording_leaves_training_unchanged(runs, tmp_path):
    """The variance draws from a stream of its own: the same run without recording ends with the
    same parameters and test log-likelihood."""
    assert train(tmp_path / "plain", method="iwem", epochs=2) == 0
    a, b = (torch_load(d / "checkpoint.pt") for d in (runs / "iwem", tmp_path / "plain"))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert read(runs / "iwem" / "metrics.json")["test_ll"] == read(tmp_path / "plain" / "metrics.json")["test_ll"]
    assert "var_q_hat" not in b["history"][0] and "variance" not in read(tmp_path / "plain" / "metrics.json")


def test_resumed_recording_equals_uninterrupted(runs, tmp_path):
    out = tmp_path / "resumed"
    assert train(out, *RECORD, method="iwem", epochs=1) == 0
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0  # recording resumes too
    straight = torch_load(runs / "iwem" / "checkpoint.pt")["history"]
    resumed = torch_load(out / "checkpoint.pt")["history"]
    for key in ("var_q_hat", "var_elbo", "var_joint"):
        assert [h[key] for h in resumed] == [h[key] for h in straight], key


def test_figures_1_2_4(runs, tmp_path, capsys):
    out = tmp_path / "figures"
    assert main(["figures", str(runs), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for number, name in ((1, "figure1-variance-per-epoch"), (2, "figure2-variance-boxplots"),
                         (4, "figure4-variance-missing-patches")):
        assert f"Figure {number}: " in printed
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG"
    figure1 = read(out / "figure1-variance-per-epoch.json")
    history = torch_load(runs / "iwem" / "checkpoint.pt")["history"]
    assert figure1["groups"]["iwem"]["epoch"] == [1, 2]
    assert figure1["groups"]["iwem"]["var_q_hat_mean"] == [h["var_q_hat"] for h in history]
    assert {"iwem", "iwem-woo", "miss-iwem, 3 patches missing", "miss-iwem, 5 patches missing"} == set(figure1["groups"])

    # Figure 2 at best.pt, in the stream the run used at its best epoch: the history's numbers, per datum
    figure2 = read(out / "figure2-variance-boxplots.json")
    (run,) = figure2["groups"]["iwem"]["runs"]
    best = history[run["best_epoch"] - 1]
    assert len(run["var_q_hat"]) == run["num_data"] == 10 and run["num_repeats"] == 5
    for name in ("q_hat", "elbo", "joint"):
        assert run[f"var_{name}_mean"] == pytest.approx(best[f"var_{name}"], rel=1e-9), name
    assert figure2["groups"]["iwem"]["q_hat"]["n"] == 10

    figure4 = read(out / "figure4-variance-missing-patches.json")
    assert set(figure4["patches"]) == {"3", "5"}
    assert figure4["patches"]["3"]["miss-iwem"]["q_hat"]["n"] == 10


def test_figures_options(runs, tmp_path):
    out = tmp_path / "figures"
    argv = ["figures", str(runs / "iwem"), str(runs / "iwem-woo"), "--out", str(out), "--figures", "2",
            "--num-data", "4", "--repeats", "3", "--device", "cpu"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["figure2-variance-boxplots.json", "figure2-variance-boxplots.png"]
    (run,) = read(out / "figure2-variance-boxplots.json")["groups"]["iwem-woo"]["runs"]
    assert run["num_data"] == 4 and run["num_repeats"] == 3


def test_figure_1_needs_recorded_variance(runs, tmp_path, capsys):
    plain = tmp_path / "plain"
    assert train(plain, method="iwem") == 0
    line = one_error_line(capsys, main(["figures", str(plain), str(runs / "iwem"), "--out", str(tmp_path / "f")]))
    assert str(plain) in line and "--record-variance" in line and str(runs / "iwem") + "," not in line
    assert not (tmp_path / "f").exists()
    assert main(["figures", str(plain), "--figures", "2", "--num-data", "3", "--repeats", "2",
                 "--out", str(tmp_path / "f"), "--device", "cpu"]) == 0  # Figure 2 needs only best.pt


@pytest.mark.parametrize(
    "argv, message",
    [
        (["figures", "{runs}/iwem", "--figures", "4", "--out", "{tmp}/f"], "Figure 4 needs runs of a missing-data method"),
        (["figures", "{runs}/iwem", "--figures", "3", "--out", "{tmp}/f"], "unknown figure '3'"),
        (["figures", "{tmp}/nothing", "--out", "{tmp}/f"], "does not exist"),
        (["figures", "{tmp}", "--out", "{tmp}/f"], "no run directory"),
        (["train", "--dataset", "digits-8x8", "--variance-repeats", "1", "--out", "{tmp}/r"], "an integer >= 2, got 1"),
    ],
)
def test_figures_errors(runs, tmp_path, capsys, argv, message):
    argv = [a.replace("{runs}", str(runs)).replace("{tmp}", str(tmp_path)) for a in argv]
    assert message in one_error_line(capsys, main(argv))


def test_sweep_forwards_the_recording(tmp_path, capsys):
    argv = ["sweep", "--methods", "iwem", "--datasets", "digits-8x8", "--out", str(tmp_path / "s"), "--dry-run", *RECORD]
    assert main(argv) == 0
    assert "--record-variance 10 --variance-repeats 5" in capsys.readouterr().out
