"""``pyro-iwem impute``: the MIWAE protocol on a small CSV file, its MSE and its errors."""

import json

import numpy as np
import pytest
import torch

from pyro_iwem.data import mcar_mask
from pyro_iwem.experiments.cli import main
from pyro_iwem.models import TabularVAE

SEED = 3
#: A few training steps and particles: enough to exercise every stage in about a second.
QUICK = ["--steps", "20", "--K", "5", "--J", "5", "--impute-K", "10", "--quiet"]


def correlated_table(n, seed=0):
    """Columns x, 2x + noise and -x + noise, shifted and scaled away from standard units."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    columns = [x, 2 * x + 0.1 * rng.normal(size=n), -x + 0.1 * rng.normal(size=n)]
    return np.stack(columns, axis=1) * [1.0, 10.0, 3.0] + [5.0, -2.0, 100.0]


def write_csv(path, rows, header=("a", "b", "c")):
    lines = [",".join(header)] if header else []
    lines += [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def impute(csv, out, method, *extra, benchmark=True):
    """``pyro-iwem impute`` on ``csv``: the benchmark protocol by default, else filling its gaps."""
    protocol = ["--benchmark"] if benchmark else []
    return main(["impute", "--csv", str(csv), "--method", method, "--seed", str(SEED), *protocol, *extra, "--out", str(out)])


def one_error_line(capsys, code):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyro-iwem impute: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("data") / "small.csv", correlated_table(80))


@pytest.fixture(scope="module")
def runs(csv_file, tmp_path_factory):
    """A finished ``mean`` and ``miss-iwem`` run on the small CSV, by method."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("mean", "miss-iwem"):
        assert impute(csv_file, root / method, method, *QUICK) == 0
    return {method: root / method for method in ("mean", "miss-iwem")}


# --- end to end -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mean", "miss-iwem"])
def test_metrics_and_imputed_table(runs, csv_file, method):
    metrics = json.loads((runs[method] / "metrics.json").read_text())
    expected = {"method": method, "seed": SEED, "n_rows": 80, "n_features": 3, "missing_rate": 0.5, "dataset": str(csv_file)}
    assert {key: metrics[key] for key in expected} == expected
    mask = mcar_mask((80, 3), 0.5, SEED).numpy()
    assert metrics["n_missing"] == (~mask).sum()
    assert np.isfinite(metrics["mse"]) and metrics["mse"] > 0
    assert metrics["train_seconds"] >= 0 and metrics["impute_seconds"] >= 0
    if method != "mean":
        assert (metrics["K"], metrics["J"], metrics["steps"], metrics["impute_K"]) == (5, 5, 20, 10)
        saved = torch.load(runs[method] / "model.pt", weights_only=False)
        model = TabularVAE(3)
        model.load_state_dict(saved["model"])  # the trained model round-trips
    assert (runs[method] / "model.pt").exists() == (method != "mean")

    truth = np.loadtxt(csv_file, delimiter=",", skiprows=1)
    imputed = np.loadtxt(runs[method] / "imputed.csv", delimiter=",")
    assert imputed.shape == (80, 3) and np.isfinite(imputed).all()
    assert np.array_equal(imputed[mask], truth[mask])  # observed entries exactly, in original units
    assert np.allclose(imputed.mean(0), truth.mean(0), atol=2 * truth.std(0))  # original units, not standardised


def test_mean_mse_by_hand(runs, csv_file):
    x = np.loadtxt(csv_file, delimiter=",", skiprows=1)
    z = (x - x.mean(0)) / x.std(0)
    mask = mcar_mask(x.shape, 0.5, SEED).numpy()
    column_means = np.array([z[mask[:, j], j].mean() for j in range(3)])
    filled = np.where(mask, z, column_means)
    expected = ((filled - z)[~mask] ** 2).mean()
    metrics = json.loads((runs["mean"] / "metrics.json").read_text())
    assert metrics["mse"] == pytest.approx(expected, rel=1e-12)
    imputed = np.loadtxt(runs["mean"] / "imputed.csv", delimiter=",")
    assert np.allclose(imputed[~mask], (column_means * x.std(0) + x.mean(0))[np.nonzero(~mask)[1]])


def test_table_of_impute_runs(runs, capsys):
    assert main(["table", str(runs["mean"].parent), "--metric", "mse"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.split("**wall-clock")[0].splitlines() if line.startswith("| ")]
    assert rows == ["method", "miss-iwem", "mean"]
    assert "small.csv" in out


def test_finished_run_needs_force(runs, csv_file, capsys):
    code = impute(csv_file, runs["mean"], "mean")
    assert "--force" in one_error_line(capsys, code)
    assert impute(csv_file, runs["mean"], "mean", "--force") == 0


def test_trained_method_beats_mean_on_correlated_data(tmp_path):
    csv = write_csv(tmp_path / "correlated.csv", correlated_table(200, seed=1))
    assert impute(csv, tmp_path / "run", "miss-iwae", "--steps", "300", "--impute-K", "100", "--quiet") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["mse"] < 0.6 * metrics["mean_mse"], metrics


# --- errors -------------------------------------------------------------------------------
def test_non_numeric_column(tmp_path, capsys):
    rows = [[f"{i}", f"id{i}", f"{i % 7}"] for i in range(20)]
    csv = write_csv(tmp_path / "text.csv", rows, header=("a", "name", "c"))
    line = one_error_line(capsys, impute(csv, tmp_path / "r", "mean"))
    assert "text.csv" in line and "'name'" in line and "not numeric" in line
    assert not (tmp_path / "r").exists()


def test_constant_column(tmp_path, capsys):
    rows = [[f"{i}", "4", f"{i % 7}"] for i in range(20)]
    csv = write_csv(tmp_path / "constant.csv", rows, header=("a", "flat", "c"))
    line = one_error_line(capsys, impute(csv, tmp_path / "r", "miss-iwae"))
    assert "constant.csv" in line and "'flat'" in line and "constant" in line


def test_too_few_rows(tmp_path, capsys):
    csv = write_csv(tmp_path / "short.csv", correlated_table(5))
    line = one_error_line(capsys, impute(csv, tmp_path / "r", "mean"))
    assert "short.csv" in line and "5 data rows" in line


def test_missing_file(tmp_path, capsys):
    line = one_error_line(capsys, impute(tmp_path / "absent.csv", tmp_path / "r", "mean"))
    assert "absent.csv" in line and "No such file" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "banknote", "--csv", "x.csv"], "not allowed with argument"),
        ([], "one of the arguments --dataset --csv is required"),
        (["--dataset", "iris"], "unknown dataset 'iris'"),
        (["--csv", "x.csv", "--missing-rate", "1"], "between 0 and 1"),
    ],
)
def test_bad_arguments(tmp_path, capsys, argv, message):
    code = main(["impute", *argv, "--method", "mean", "--out", str(tmp_path / "r")])
    assert message in one_error_line(capsys, code)
