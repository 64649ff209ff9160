"""The examples run as a user would copy them (shortened)."""

import importlib.util
import math
import pathlib
import re

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_data_example_imputes(capsys):
    load("missing_data").main(steps=200)
    out = capsys.readouterr().out
    mse = dict(re.findall(r"imputation MSE, (.+?)\s*: ([0-9.]+)", out))
    assert set(mse) == {"miss-IWEM", "column means"}
    assert float(mse["miss-IWEM"]) < float(mse["column means"])  # the fitted model beats column means


def test_mixture_example_enumerated_bound_is_exact_and_sampled_bound_is_below(capsys):
    results = load("mixture").main(["--steps", "300", "--eval-K", "200"])
    out = capsys.readouterr().out
    assert out.count("test log-likelihood per datum: iwae_bound") == 2
    for name in ("enumerated", "sampled"):
        r = results[name]
        values = [r["bound"], r["exact"], r["true"], r["train_exact"], r["train_true"], *r["weights"], *r["locs"]]
        assert all(math.isfinite(v) for v in values), (name, r)
        assert r["bound"] <= r["exact"] + 0.01, (name, r)  # a lower bound, up to Monte Carlo slack
        assert r["train_exact"] > r["train_true"] - 0.02, (name, r)  # fitted: near the maximum on its data
        assert abs(sum(r["weights"]) - 1) < 1e-5
        assert max(abs(w - t) for w, t in zip(r["weights"], [0.5, 0.3, 0.2])) < 0.05, (name, r["weights"])
        assert max(abs(m - t) for m, t in zip(r["locs"], [-2.0, 0.5, 3.0])) < 0.3, (name, r["locs"])
    # c summed out and nothing else latent: every weight is p(x) itself, the bound is the likelihood
    assert abs(results["enumerated"]["bound"] - results["enumerated"]["exact"]) < 1e-4


def test_autoguide_example_bound_below_exact_below_maximum(capsys):
    results = load("autoguide").main(["--steps", "300", "--eval-K", "200"])
    out = capsys.readouterr().out
    assert re.search(r"^\s+train\s+-?[0-9.]+\s+-?[0-9.]+\s+-?[0-9.]+$", out, re.M), out
    for split in ("train", "test"):
        r = results[split]
        assert all(math.isfinite(v) for v in r.values()), (split, r)
        assert r["bound"] <= r["exact"] + 0.01, (split, r)  # a lower bound, up to Monte Carlo slack
        assert r["exact"] > r["ml"] - 1.0, (split, r)  # it learned: from about -17.7 per datum at the start
    assert results["train"]["exact"] <= results["train"]["ml"] + 1e-6  # nothing beats the maximum likelihood


def test_train_iwem_example_trains_prints_a_test_log_likelihood_and_saves_a_run_evaluate_reads(capsys, tmp_path):
    import json

    import pytest

    from pyro_iwem.experiments.cli import main

    # scikit-learn's bundled 8x8 digits; two steps of a large batch
    out = tmp_path / "run"
    argv = ["--dataset", "digits-8x8", "--epochs", "1", "--batch-size", "700", "--K", "5", "--J", "5", "--eval-K", "20",
            "--max-test", "100", "--out", str(out)]
    load("train_iwem").main(argv)
    captured = capsys.readouterr()
    stages = [line.split("]")[0] + "]" for line in captured.out.splitlines() if line.startswith("[")]
    assert stages == ["[1/3]", "[2/3]", "[3/3]"], captured.out
    assert "/2 [" in captured.err  # the training bar has a total (2 steps), hence an ETA
    match = re.search(r"test log-likelihood \(IWAE bound, K=20\): (-?[0-9.]+) nats", captured.out)
    assert match, captured.out
    assert -64 * math.log(2) - 30 < float(match.group(1)) < 0  # per 8x8 binary image
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 100 and metrics["eval_subset"] == "random"
    # the saved run is one `pyro-iwem evaluate` reads: the same bound, the same samples
    assert main(["evaluate", str(out), "--K", "20", "--device", "cpu"]) == 0
    again = re.search(r"test LL (-?[0-9.]+) nats", capsys.readouterr().out)
    assert abs(float(again.group(1)) - float(match.group(1))) < 0.006, again.group(0)
    with pytest.raises(SystemExit) as stop:  # a second run does not overwrite the first
        load("train_iwem").main(argv)
    assert stop.value.code == 2 and "holds a finished run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # a mistyped data root is an error, not a switch to the digits
        load("train_iwem").main(["--data-root", str(tmp_path / "no-data")])
    assert stop.value.code == 2 and f"--data-root {tmp_path / 'no-data'} does not exist" in capsys.readouterr().err


def test_two_layer_example_learns(capsys):
    results = load("two_layer").main(["--steps", "150", "--eval-K", "50"])
    out = capsys.readouterr().out
    assert re.search(r"test log-likelihood \(IWAE bound, K=50\): -?[0-9.]+ nats per image", out), out
    assert all(math.isfinite(results[k]) for k in ("initial", "test")), results
    assert results["test"] > results["initial"] + 10, results  # about -45 at the start, -22 after 150 steps


def test_hierarchical_example_bounds_sit_below_the_exact_likelihood(capsys):
    results = load("hierarchical").main(["--steps", "150", "--eval-K", "50", "--M", "20"])
    out = capsys.readouterr().out
    assert "exact log p(x)/N at the ML τ" in out and "PyroModule" in out
    r = results["random_effects"]
    assert all(math.isfinite(r[k]) for k in ("bound", "nested", "exact", "ml"))
    assert r["bound"] <= r["exact"] + 0.01 and r["nested"] <= r["exact"] + 0.01  # bounds, up to Monte Carlo slack
    assert r["exact"] <= r["ml"] + 1e-9
    for name in ("IWAELoss(K=1)", "Trace_ELBO"):
        assert math.isfinite(results["regression"][name]["elbo"])
