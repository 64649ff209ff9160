"""The ``pyro-iwem`` command line: train, evaluate, table, sweep, resume and errors.

Most tests train on a slice of scikit-learn's 8x8 digits (no data root needed); the
static MNIST test needs the data root and is skipped without it.
"""

import itertools
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pyro_iwem.data import data_root_exists
from pyro_iwem.experiments import evaluate
from pyro_iwem.experiments.checkpoint import torch_load
from pyro_iwem.experiments.cli import main
from pyro_iwem.experiments.images import grid_size
from pyro_iwem.experiments.options import TrainConfig
from pyro_iwem.experiments.table import format_table
from pyro_iwem.experiments.train import Trainer
from pyro_iwem.infer import IWAELoss

# 2 training batches per epoch, 50 validation and 50 test images.
TINY = ["--max-train", "200", "--max-eval", "50", "--K", "3", "--J", "3", "--eval-K", "20", "--valid-K", "5", "--device", "cpu", "--quiet"]
DIGITS = ["--dataset", "digits-8x8", "--model", "mlp"]

requires_data = pytest.mark.skipif(
    not data_root_exists(), reason="the data root (shared/data or $PYRO_IWEM_DATA) is absent"
)


def train(out, *extra, method="iwem", epochs=1):
    return main(["train", *DIGITS, "--method", method, "--epochs", str(epochs), *TINY, *extra, "--out", str(out)])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One finished 2-epoch IWEM run on digits, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("runs") / "digits-iwem"
    assert train(out, epochs=2) == 0
    return out


def one_error_line(capsys, code, expected_code=2):
    err = capsys.readouterr().err
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0] and "Traceback" not in err
    return lines[0]


# --- end to end ---------------------------------------------------------------------------
def test_module_help_subprocess():
    result = subprocess.run([sys.executable, "-m", "pyro_iwem", "--help"], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("train", "evaluate", "table", "sweep"):
        assert command in result.stdout


def test_train_writes_metrics_samples_and_curve(digits_run):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    for key in ("test_ll", "best_valid_ll", "epochs", "method", "dataset", "model", "K", "J", "seed",
                "wall_seconds", "eval_K", "n_train", "note", "test_ll_K20"):
        assert key in metrics, key
    assert math.isfinite(metrics["test_ll"]) and metrics["test_ll"] < 0
    assert metrics["best_valid_ll"] < 0
    assert (metrics["method"], metrics["dataset"], metrics["model"]) == ("iwem", "digits-8x8", "mlp")
    assert (metrics["K"], metrics["J"], metrics["eval_K"], metrics["epochs"], metrics["n_train"]) == (3, 3, 20, 2, 200)
    assert metrics["final_alpha"] == pytest.approx(0.02)  # annealed once per epoch

    with Image.open(digits_run / "samples.png") as image:
        image.verify()
    with Image.open(digits_run / "samples.png") as image:
        assert image.format == "PNG"
        assert image.size == grid_size(64, (8, 8)) == (8 * 32 + 9 * 2,) * 2  # 8x8 images upscaled 4x
    with Image.open(digits_run / "curve.png") as image:
        assert image.format == "PNG"

    ckpt = torch_load(digits_run / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    assert ckpt["method"]["annealing"]["count"] == 2
    assert [h["alpha"] for h in ckpt["history"]] == [0.0, 0.01]
    assert (digits_run / "best.pt").is_file()


def test_train_prints_progress_and_summary(tmp_path, capsys):
    args = [a for a in TINY if a != "--quiet"]
    assert main(["train", *DIGITS, "--method", "vae", "--epochs", "1", *args, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "valid LL" in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("digits-8x8 mlp vae K=3") and "test LL -" in summary


def test_evaluate_reproduces_test_ll(digits_run, capsys):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert main(["evaluate", str(digits_run), "--K", "20", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "test LL" in out
    updated = json.loads((digits_run / "metrics.json").read_text())
    # same parameters, K, batches and seed: the same number
    assert updated["test_ll_K20"] == pytest.approx(metrics["test_ll"], abs=1e-6)
    assert updated["test_ll"] == metrics["test_ll"]


def test_table_markdown_and_csv(digits_run, capsys):
    assert main(["table", str(digits_run.parent)]) == 0  # a parent directory, searched recursively
    out = capsys.readouterr().out
    assert "| method | digits-8x8 |" in out
    assert "| iwem |" in out and "(1)" in out
    assert "wall-clock" in out
    assert main(["table", str(digits_run), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("method,K,J,settings,dataset,model,missing_patches,metric,mean,std,n")
    assert lines[1].startswith("iwem,3,3,,digits-8x8,mlp,0,test_ll,") and lines[1].split(",")[9:11] == ["", "1"]


def test_table_groups_seeds_in_paper_order():
    runs = [
        {"method": m, "dataset": d, "model": "mlp", "K": 50, "J": 50, "seed": s, "test_ll": v, "wall_seconds": 10.0}
        for m, d, s, v in [
            ("iwem", "static-mnist", 1, -88.0), ("iwem", "static-mnist", 2, -89.0), ("iwem", "static-mnist", 3, -90.0),
            ("iwae", "static-mnist", 1, -90.0), ("vae", "caltech101", 1, -130.0),
        ]
    ]
    table = format_table(runs)
    assert "-89.00 ± 1.00 (3)" in table
    body = [line for line in table.splitlines() if line.startswith("| ")]
    assert body[0] == "| method | static-mnist | caltech101 |"
    assert [line.split("|")[1].strip() for line in body[1:4]] == ["vae", "iwae", "iwem"]



def test_table_never_pools_runs_of_different_settings():
    """Runs of one method that differ in a setting (here L and the protocol) get rows of their own,
    named by it; a run made before a setting existed reads as the paper's value (L = 1)."""
    base = {"method": "iwem", "dataset": "static-mnist", "model": "mlp", "K": 50, "J": 50}
    runs = [
        {**base, "seed": 1, "L": 1, "protocol": "paper", "test_ll": -109.0},
        {**base, "seed": 2, "test_ll": -111.0},  # older: no L, no protocol
        {**base, "seed": 1, "L": 50, "protocol": "paper", "test_ll": -107.0},
        {**base, "seed": 1, "L": 1, "protocol": "official", "test_ll": -105.0},
        {**base, "method": "iwae", "seed": 1, "L": 1, "protocol": "paper", "test_ll": -108.0},
    ]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in format_table(runs).splitlines()[4:8]}
    assert rows == {
        "iwae L=1 protocol=paper": "-108.00 (1)",
        "iwem L=1 protocol=official": "-105.00 (1)",
        "iwem L=1 protocol=paper": "-110.00 ± 1.41 (2)",
        "iwem L=50 protocol=paper": "-107.00 (1)",
    }
    assert "| iwem |" in format_table(runs[:2])  # nothing differs: no settings in the label


def test_table_of_missing_data_runs_has_a_column_per_patch_count():
    runs = [
        {"method": m, "dataset": "static-mnist", "model": "mlp", "K": 50, "J": 50, "missing_patches": p, "test_ll": v}
        for m, p, v in [("miss-iwem", 3, -90.0), ("miss-iwae", 3, -91.0), ("miss-iwae", 6, -100.0), ("miss-iwem-woa", 6, -97.0)]
    ]
    body = [line for line in format_table(runs).splitlines() if line.startswith("| ")]
    assert body[0] == "| method | static-mnist, 3 patches missing | static-mnist, 6 patches missing |"
    assert [line.split("|")[1].strip() for line in body[1:4]] == ["miss-iwae", "miss-iwem-woa", "miss-iwem"]
    assert body[1].split("|")[2:4] == [" -91.00 (1) ", " -100.00 (1) "]
    mse = format_table([{"method": "miss-iwem", "dataset": "breast", "mse": v} for v in (0.3461, 0.3502)], metric="mse")
    assert "0.348 ± 0.003 (2)" in mse  # small metrics get three decimals

@pytest.mark.parametrize(
    "method, model",
    [(m, "mlp") for m in ("vae", "iwae", "stl", "dreg", "iwae-em", "iwem-woo", "iwem-woa")] + [("iwem", "mlp2"), ("iwem", "cnn")],
)
def test_every_method_and_model_trains(tmp_path, method, model):
    out = tmp_path / "r"
    argv = ["train", "--dataset", "digits-8x8", "--model", model, "--method", method, "--epochs", "1", *TINY,
            "--max-train", "100", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["test_ll"]) and metrics["test_ll"] < 0
    assert metrics["final_alpha"] == {"iwem": 0.01, "iwem-woo": 0.01, "iwem-woa": 1.0, "iwae-em": 1.0}.get(method)
    if model == "cnn":  # the paper's decoder: z (40) -> gated dense 300 -> gated dense to the 64 pixels
        state = torch_load(out / "best.pt")["model"]
        assert state["decoder.0.a.weight"].shape == (300, 40) and state["decoder.1.a.weight"].shape == (64, 300)


def test_anneal_start_sets_alpha_in_the_first_epoch(tmp_path, capsys):
    assert train(tmp_path / "a", "--anneal-start", "0.5", "--anneal-increment", "0.25", epochs=2) == 0
    ckpt = torch_load(tmp_path / "a" / "checkpoint.pt")
    assert [h["alpha"] for h in ckpt["history"]] == [0.5, 0.75] and ckpt["args"]["anneal_start"] == 0.5
    # α = 1 from the start: the one-pass step as the woa variants run (no ELBO term)
    assert train(tmp_path / "b", "--anneal-start", "1", method="iwem-one-pass", epochs=2) == 0
    assert [h["alpha"] for h in torch_load(tmp_path / "b" / "checkpoint.pt")["history"]] == [1.0, 1.0]
    assert "--anneal-start" in one_error_line(capsys, train(tmp_path / "c", "--anneal-start", "1.5"))
    # a run made before --anneal-start resumes with the paper's α = 0 start
    ckpt["args"].pop("anneal_start")
    torch.save(ckpt, tmp_path / "a" / "checkpoint.pt")
    assert train(tmp_path / "a", "--anneal-increment", "0.25", "--resume", epochs=3) == 0
    assert [h["alpha"] for h in torch_load(tmp_path / "a" / "checkpoint.pt")["history"]] == [0.5, 0.75, 0.5]


def test_L_reaches_the_e_step_of_the_iwem_methods_only(tmp_path, capsys):
    settings = TrainConfig.from_argv(["train", *DIGITS, "--method", "iwem", "--L", "4", *TINY, "--out", str(tmp_path / "a")])
    trainer = Trainer(settings).prepare()
    assert trainer.method.L == 4 and trainer.config["L"] == 4
    for method in ("iwae", "iwem-woa", "iwem-one-pass"):  # no ELBO term of their own: refused, naming L
        line = one_error_line(capsys, train(tmp_path / method, "--L", "4", method=method))
        assert "L is an option of the IWEM methods" in line or "got L=4" in line, line


@pytest.mark.parametrize("method", ["miss-iwae", "miss-iwem", "miss-iwem-woa"])
def test_missing_patches_train_and_draw_completions(tmp_path, method):
    out = tmp_path / "r"
    assert train(out, "--missing-patches", "5", method=method) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["missing_patches"] == 5 and metrics["method"] == method
    assert math.isfinite(metrics["test_ll"]) and metrics["test_ll"] < 0  # on complete test images
    with Image.open(out / "completions.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] / 3  # 5 columns of 8 images


def test_missing_patches_need_a_missing_data_method(tmp_path, capsys):
    line = one_error_line(capsys, train(tmp_path / "a", "--missing-patches", "3", method="iwem"))
    assert "--missing-patches needs a method for missing data" in line and "miss-iwem" in line
    line = one_error_line(capsys, train(tmp_path / "b", method="miss-iwae"))
    assert "give --missing-patches N" in line
    line = one_error_line(capsys, train(tmp_path / "c", "--missing-patches", "10", method="miss-iwem"))
    assert "at most 9" in line


def test_early_stopping_waits_for_alpha_one(tmp_path):
    # lr so small that validation only fluctuates: with α = 1 (iwem-woa) patience 1 stops
    # after the first non-improving epoch; while annealing (iwem, α < 1) it never does.
    common = ["--dataset", "digits-8x8", "--epochs", "8", "--patience", "1", "--lr", "1e-12", *TINY, "--max-train", "100"]
    assert main(["train", *common, "--method", "iwem-woa", "--out", str(tmp_path / "woa")]) == 0
    assert main(["train", *common, "--method", "iwem", "--out", str(tmp_path / "iwem")]) == 0
    woa = json.loads((tmp_path / "woa" / "metrics.json").read_text())
    assert woa["early_stopped"] and woa["epochs"] < 8
    history = torch_load(tmp_path / "woa" / "checkpoint.pt")["history"]
    valid = [h["valid_ll"] for h in history]
    assert all(b > a for a, b in itertools.pairwise(valid[:-1])) and valid[-1] <= max(valid[:-1])
    iwem = json.loads((tmp_path / "iwem" / "metrics.json").read_text())
    assert not iwem["early_stopped"] and iwem["epochs"] == 8


# --- resume -------------------------------------------------------------------------------
@pytest.mark.parametrize("method, extra", [("iwem", []), ("iwae", []), ("miss-iwem", ["--missing-patches", "3"])])
def test_resume_equals_uninterrupted(tmp_path, method, extra):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(straight, *extra, method=method, epochs=2) == 0
    assert train(resumed, *extra, method=method, epochs=1) == 0
    # continue the finished 1-epoch run to 2 epochs, only --epochs given
    assert main(["train", "--out", str(resumed), "--resume", "--epochs", "2", "--quiet"]) == 0

    a, b = torch_load(straight / "checkpoint.pt"), torch_load(resumed / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in a["best"]["model"]:
        assert torch.equal(a["best"]["model"][name], b["best"]["model"][name]), name
    assert [h["valid_ll"] for h in a["history"]] == [h["valid_ll"] for h in b["history"]]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, resumed))
    assert ma["test_ll"] == mb["test_ll"] and mb["epochs"] == 2


def test_resume_finished_run_does_nothing(digits_run, capsys):
    before = (digits_run / "checkpoint.pt").stat().st_mtime_ns
    assert main(["train", "--out", str(digits_run), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert (digits_run / "checkpoint.pt").stat().st_mtime_ns == before


def test_resume_with_other_settings_is_refused(digits_run, capsys):
    code = main(["train", "--out", str(digits_run), "--resume", "--K", "7"])
    line = one_error_line(capsys, code)
    assert "K 7 (checkpoint: 3)" in line


# --- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "mnist", "--out", "X"], "unknown dataset 'mnist'"),
        (["train", "--dataset", "digits-8x8", "--method", "em", "--out", "X"], "unknown method 'em'"),
        (["train", "--dataset", "digits-8x8", "--K", "0", "--out", "X"], "expected a positive integer, got 0"),
        (["train", "--dataset", "digits-8x8", "--lr", "-1", "--out", "X"], "positive"),
        (["train", "--dataset", "digits-8x8"], "required: --out"),
        (["train", "--out", "{tmp}/fresh"], "required: --dataset"),
        (["sweep", "--methods", "iwem,nope", "--datasets", "digits-8x8", "--out", "X"], "unknown method 'nope'"),
        (["table", "{tmp}/nothing-here"], "does not exist"),
        (["evaluate", "{tmp}"], "no best.pt"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = one_error_line(capsys, main(argv))
    assert message in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(tmp_path, capsys):
    code = main(["train", *DIGITS, "--device", "cuda", "--out", str(tmp_path / "r")])
    assert "CUDA is not available" in one_error_line(capsys, code)


def test_existing_finished_run_needs_resume_or_force(digits_run, tmp_path, capsys):
    code = main(["train", *DIGITS, "--out", str(digits_run)])
    assert "finished run" in one_error_line(capsys, code)
    code = main(["train", *DIGITS, "--out", str(digits_run), "--resume", "--force"])
    assert "exclude" in one_error_line(capsys, code)


def test_force_overwrites_only_once_the_new_run_is_set_up(digits_run, tmp_path, capsys):
    absent = str(tmp_path / "absent")
    code = main(["train", "--dataset", "static-mnist", "--data-root", absent, "--out", str(digits_run), "--force"])
    assert "not found" in one_error_line(capsys, code)
    assert (digits_run / "metrics.json").is_file() and (digits_run / "checkpoint.pt").is_file()
    out = tmp_path / "r"
    assert train(out, method="vae") == 0
    assert train(out, "--force", method="iwae") == 0
    assert json.loads((out / "metrics.json").read_text())["method"] == "iwae"


def test_missing_data_root(tmp_path, capsys):
    code = main(["train", "--dataset", "static-mnist", "--data-root", str(tmp_path / "absent"), "--out", str(tmp_path / "r")])
    line = one_error_line(capsys, code)
    assert "binarized_mnist/binarized_mnist_train.amat.gz" in line and "does not exist" in line
    assert not (tmp_path / "r").exists()


def test_corrupt_data_file(tmp_path, capsys):
    bad = tmp_path / "root" / "binarized_mnist" / "binarized_mnist_train.amat.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the file")
    code = main(["train", "--dataset", "static-mnist", "--data-root", str(tmp_path / "root"), "--out", str(tmp_path / "r")])
    assert "is corrupt" in one_error_line(capsys, code)


def test_env_var_data_root(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYRO_IWEM_DATA", str(tmp_path / "env-root"))
    code = main(["train", "--dataset", "caltech101", "--out", str(tmp_path / "r")])
    assert str(tmp_path / "env-root") in one_error_line(capsys, code)


# --- sweep --------------------------------------------------------------------------------
def test_sweep_dry_run(tmp_path, capsys):
    argv = ["sweep", "--methods", "iwae,iwem", "--datasets", "digits-8x8", "--seeds", "1,2", "--K-grid", "5,10",
            "--J-grid", "5,10", "--epochs", "3", "--out", str(tmp_path / "sweep"), "--dry-run"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # iwae: 2 K x 2 seeds (J unused); iwem: 2 K x 2 J x 2 seeds
    assert len(lines) == 4 + 8
    assert "-m pyro_iwem train --dataset digits-8x8 --model mlp --method iwae --K 5 --J 5 --seed 1 --epochs 3" in lines[0]
    # what the sweep's task runs: one thread per CPU of the run, no progress bars
    assert "--threads 1 --quiet" in lines[0]
    assert lines[0].endswith(f"--out {tmp_path / 'sweep' / 'digits-8x8-mlp-iwae-K5-J5-s1'} --resume")
    assert not (tmp_path / "sweep").exists()


def test_sweep_runs_skips_finished_and_tabulates(tmp_path, capsys):
    argv = ["sweep", "--methods", "vae", "--datasets", "digits-8x8", "--seeds", "1", "--K", "2", "--epochs", "1",
            "--max-train", "100", "--max-eval", "20", "--eval-K", "5", "--valid-K", "2", "--device", "cpu", "--quiet",
            "--out", str(tmp_path / "sweep")]
    assert main(argv) == 0
    run = tmp_path / "sweep" / "digits-8x8-mlp-vae-K2-J50-s1"
    assert (run / "metrics.json").is_file()
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert "| vae |" in table and "digits-8x8" in table
    capsys.readouterr()
    assert main(argv) == 0
    assert "skip (finished)" in capsys.readouterr().out


# --- real data ----------------------------------------------------------------------------
@requires_data
def test_static_mnist_slice(tmp_path):
    out = tmp_path / "mnist"
    argv = ["train", "--dataset", "static-mnist", "--method", "iwem", "--max-train", "200", "--max-eval", "100",
            "--K", "5", "--J", "5", "--epochs", "1", "--eval-K", "50", "--valid-K", "10", "--device", "cpu",
            "--quiet", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["test_ll"]) and metrics["test_ll"] < 0
    assert metrics["n_train"] == 200 and metrics["n_test"] == 100
    with Image.open(out / "samples.png") as image:
        assert image.size == grid_size(64, (28, 28)) == (8 * 28 + 9 * 2,) * 2


def test_evaluate_all_test_ignores_max_eval(tmp_path, capsys):
    """A run evaluated on a slice (--max-eval 50) can be re-evaluated on the whole test split."""
    out = tmp_path / "sliced"
    assert train(out, "--max-eval", "50", method="vae") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 50
    assert main(["evaluate", str(out), "--K", "20", "--all-test", "--device", "cpu"]) == 0
    assert main(["evaluate", str(out), "--K", "20", "--device", "cpu"]) == 0
    updated = json.loads((out / "metrics.json").read_text())
    assert updated["test_ll_K20"] == pytest.approx(metrics["test_ll"], abs=1e-6)  # the slice again
    assert updated["test_ll_all_K20"] != pytest.approx(updated["test_ll_K20"], abs=1e-3)  # more images


def test_evaluate_refit_encoder_records_both_scores_repeatably(digits_run, tmp_path, capsys, monkeypatch):
    """``--refit-encoder``: the plain score and the refitted one side by side; run again, from
    its saved fit, from scratch or after an interruption, the same number."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    argv = ["evaluate", str(run), "--K", "20", "--device", "cpu", "--refit-encoder", "6", "--refit-K", "3"]
    assert main(argv) == 0
    plain_line, refit_line = capsys.readouterr().out.strip().splitlines()
    metrics = json.loads((run / "metrics.json").read_text())
    plain, refit = metrics["test_ll_K20"], metrics["test_ll_refit6_K20"]
    assert plain == pytest.approx(metrics["test_ll"], abs=1e-6)  # the run's own score
    assert math.isfinite(refit) and refit < 0 and refit != plain
    assert f"test LL {plain:.3f} nats" in plain_line
    assert f"test LL {refit:.3f} nats with a refitted encoder" in refit_line and "test_ll_refit6_K20" in refit_line
    settings = metrics["refit"]["test_ll_refit6_K20"]
    assert (settings["steps"], settings["num_particles"], settings["batch_size"]) == (6, 3, metrics["batch_size"])
    assert (settings["lr"], settings["seed"]) == (metrics["lr"], metrics["seed"])
    (saved,) = run.glob("refit-6-*.pt")
    assert torch_load(saved)["step"] == 6
    best = torch_load(run / "best.pt")["model"]
    for name, value in best.items():  # best.pt is never rewritten
        assert torch.equal(value, torch_load(digits_run / "best.pt")["model"][name]), name

    def recorded():
        return json.loads((run / "metrics.json").read_text())["test_ll_refit6_K20"]

    assert main(argv) == 0 and recorded() == refit  # the saved fit, reused
    # from scratch, interrupted after a saved state (every 2 steps here) and run again: the same
    saved.unlink()
    monkeypatch.setattr(evaluate, "REFIT_CHECKPOINT_EVERY", 2)
    calls, original = [], IWAELoss.loss_and_grads

    def interrupted_at_step_5(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IWAELoss, "loss_and_grads", interrupted_at_step_5)
    capsys.readouterr()
    assert main(argv) == 130
    assert "continues the encoder's refit" in capsys.readouterr().err
    assert torch_load(saved)["step"] == 4
    assert main(argv) == 0 and recorded() == refit
    assert len(calls) == 4 + 1 + 2  # steps 1-4, the interrupted 5th, then only 5 and 6


def test_table_curves_png(digits_run, tmp_path, capsys):
    png = tmp_path / "curves.png"
    assert main(["table", str(digits_run), "--curves", str(png)]) == 0
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (700, 450)
