"""``train --protocol``: the paper's settings and the authors' code's (docs/protocols.md); the
inflated scoring of ``evaluate``; runs made before the protocol options still resume."""

import json
import math
import shutil

import pyro
import pytest
import torch

from pyro_iwem.experiments.checkpoint import BEST, CHECKPOINT, atomic_torch_save, torch_load
from pyro_iwem.experiments.cli import main
from pyro_iwem.experiments.evaluate import load_run, mean_log_likelihood, score_key
from pyro_iwem.experiments.options import TrainConfig
from pyro_iwem.experiments.setup import LEGACY_CONFIG
from pyro_iwem.experiments.train import Trainer
from pyro_iwem.models.layers import GaussianHead
from tests.test_cli import DIGITS, TINY, one_error_line

OFFICIAL_40D_OFFSET = 20 * math.log(2 * math.pi)  # the 40-d N(0, I) prior's normalising constant
#: TINY without its --valid-K, so that the protocol's shows
SMALL = [a for i, a in enumerate(TINY) if a != "--valid-K" and TINY[i - 1] != "--valid-K"]


def prepared(tmp_path, *argv, method="iwem", model="mlp"):
    """A :class:`Trainer` set up (data, model, method) from ``train`` arguments, not run."""
    settings = TrainConfig.from_argv(
        ["train", "--dataset", "digits-8x8", "--model", model, "--method", method, *SMALL, *argv,
         "--out", str(tmp_path / f"{method}-{model}")]
    )
    return Trainer(settings).prepare()


def settings(config):
    keys = ("protocol", "lr", "valid_K", "score_inflation", "proposal_inflation", "p_step_inflation", "log_p_offset",
            "encoder_scale")
    return {k: config[k] for k in keys}


def encoder_links(model):
    return {m.link for m in model.encoder.modules() if isinstance(m, GaussianHead)}


def test_paper_protocol_is_the_default(tmp_path):
    trainer = prepared(tmp_path)
    assert settings(trainer.config) == {
        "protocol": "paper", "lr": 5e-4, "valid_K": 100, "score_inflation": 1.0, "proposal_inflation": 1.0,
        "p_step_inflation": 1.0, "log_p_offset": 0.0, "encoder_scale": None,
    }
    iwem = trainer.method
    assert (iwem.proposal_inflation, iwem.p_step_inflation, iwem.proposal_loss.log_p_offset) == (1.0, 1.0, 0.0)
    assert iwem.optim.pt_optim_args["lr"] == 5e-4 and encoder_links(trainer.model) == {"softplus"}


def test_official_protocol_reaches_the_method_and_the_model(tmp_path):
    trainer = prepared(tmp_path, "--protocol", "official", "--K", "50")
    assert settings(trainer.config) == {
        "protocol": "official", "lr": 3e-4, "valid_K": 50, "score_inflation": 1.5, "proposal_inflation": 1.5,
        "p_step_inflation": 1.5, "log_p_offset": pytest.approx(OFFICIAL_40D_OFFSET), "encoder_scale": "exp",
    }
    assert trainer.config["log_p_offset"] == pytest.approx(36.7575, abs=1e-4)
    iwem = trainer.method
    assert (iwem.proposal_inflation, iwem.p_step_inflation) == (1.5, 1.5)
    assert iwem.proposal_loss.log_p_offset == pytest.approx(OFFICIAL_40D_OFFSET)
    assert iwem.optim.pt_optim_args["lr"] == 3e-4 and encoder_links(trainer.model) == {"exp"}
    # validation: the IWAE bound with K = 50 from the proposal with its variance x 1.5
    scores = {}
    for inflation in (1.5, 1.0, None):
        pyro.set_rng_seed(7)
        scores[inflation] = trainer.validate() if inflation is None else mean_log_likelihood(
            trainer.model, trainer.data, "valid", 50, trainer.settings.eval_batch_size, inflation=inflation
        )
    assert scores[None] == scores[1.5] != scores[1.0]


@pytest.mark.parametrize(
    "method, model, expected",
    [
        # the authors' IWEM-woo: E-step inflated, its IWAE P-step not, no |log p|; validation with the K
        ("iwem-woo", "mlp", {"proposal_inflation": 1.5, "p_step_inflation": 1.0, "log_p_offset": 0.0, "valid_K": 3}),
        # IWAE trains with the plain proposal and is scored with the inflated one
        ("iwae", "mlp", {"proposal_inflation": 1.0, "p_step_inflation": 1.0, "log_p_offset": 0.0, "score_inflation": 1.5}),
        # the two-layer MLP: both Gaussian layers' constants, (100 + 50) / 2 log 2π
        ("iwem", "mlp2", {"log_p_offset": pytest.approx(75 * math.log(2 * math.pi)), "encoder_scale": "exp"}),
        # the CNN keeps its own clamped log-variance
        ("iwem", "cnn", {"encoder_scale": None, "log_p_offset": pytest.approx(OFFICIAL_40D_OFFSET)}),
    ],
)
def test_official_protocol_per_method_and_model(tmp_path, method, model, expected):
    config = prepared(tmp_path, "--protocol", "official", method=method, model=model).config
    assert {k: config[k] for k in expected} == expected


def test_explicit_options_override_the_protocol(tmp_path):
    trainer = prepared(tmp_path, "--protocol", "official", "--lr", "1e-3", "--valid-K", "7", "--proposal-inflation",
                       "2", "--log-p-offset", "-1.5", "--encoder-scale", "softplus")
    assert settings(trainer.config) == {
        "protocol": "official", "lr": 1e-3, "valid_K": 7, "score_inflation": 1.5, "proposal_inflation": 2.0,
        "p_step_inflation": 2.0, "log_p_offset": -1.5, "encoder_scale": "softplus",
    }
    assert trainer.method.p_step_inflation == 2.0 and trainer.method.proposal_loss.log_p_offset == -1.5
    # and the paper's protocol takes them too
    config = prepared(tmp_path, "--score-inflation", "1.5", "--p-step-inflation", "3", method="iwem-woa").config
    assert (config["score_inflation"], config["proposal_inflation"], config["p_step_inflation"]) == (1.5, 1.0, 3.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "iwae", "--proposal-inflation", "1.5"], "proposal_inflation is an option of the IWEM methods"),
        (["--method", "iwem-woo", "--log-p-offset", "2"], "log_p_offset"),
        (["--method", "iwem-one-pass", "--p-step-inflation", "2"], "must equal proposal_inflation"),
        (["--model", "cnn", "--encoder-scale", "exp"], "--encoder-scale is an option of the MLP models"),
        (["--protocol", "authors"], "unknown protocol 'authors'"),
        (["--log-p-offset", "inf"], "expected a finite number"),
        (["--score-inflation", "0"], "expected a positive finite number"),
    ],
)
def test_options_a_run_cannot_take_are_refused_in_one_line(tmp_path, capsys, argv, message):
    code = main(["train", "--dataset", "digits-8x8", *SMALL, *argv, "--out", str(tmp_path / "run")])
    assert message in one_error_line(capsys, code)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def official_run(tmp_path_factory):
    """A finished 1-epoch IWEM run of the official protocol on digits."""
    out = tmp_path_factory.mktemp("runs") / "official"
    assert main(["train", *DIGITS, "--epochs", "1", *SMALL, "--protocol", "official", "--out", str(out)]) == 0
    return out


def test_official_run_records_its_settings_and_its_inflated_score(official_run):
    metrics = json.loads((official_run / "metrics.json").read_text())
    assert settings(metrics)["protocol"] == "official" and metrics["score_inflation"] == 1.5
    assert metrics["test_ll_inflated1.5_K20"] == metrics["test_ll"] and "test_ll_K20" not in metrics
    checkpoint = torch_load(official_run / CHECKPOINT)
    assert settings(checkpoint["config"]) == settings(metrics)
    # evaluate rebuilds the same model: the exp-scale encoder, and the same inflated score
    _, _, model = load_run(official_run)
    assert encoder_links(model) == {"exp"}


def test_evaluate_scores_a_run_both_ways_and_records_them_apart(official_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(official_run, run)
    before = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", str(run), "--K", "20", "--device", "cpu"]) == 0  # the run's own: inflated
    assert "proposal variance x 1.5" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--K", "20", "--device", "cpu", "--score-inflation", "1"]) == 0
    assert "recorded in metrics.json as test_ll_K20" in capsys.readouterr().out
    after = json.loads((run / "metrics.json").read_text())
    assert after["test_ll_inflated1.5_K20"] == pytest.approx(before["test_ll"], abs=1e-6)  # same seed, same number
    assert after["test_ll"] == before["test_ll"]
    plain, inflated = after["test_ll_K20"], after["test_ll_inflated1.5_K20"]
    assert math.isfinite(plain) and abs(plain - inflated) > 1e-3
    assert score_key(20, 1.5) == "test_ll_inflated1.5_K20" and score_key(5000, 1.0, True, 100) == "test_ll_all_refit100_K5000"


def test_official_run_resumes_to_the_uninterrupted_result(official_run, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *DIGITS, "--epochs", "2", *SMALL, "--protocol", "official", "--out", str(straight)]) == 0
    shutil.copytree(official_run, resumed)
    assert main(["train", "--out", str(resumed), "--resume", "--epochs", "2", "--quiet"]) == 0
    a, b = torch_load(straight / CHECKPOINT), torch_load(resumed / CHECKPOINT)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert [h["valid_ll"] for h in a["history"]] == [h["valid_ll"] for h in b["history"]]
    assert settings(b["config"]) == settings(a["config"])
    capsys.readouterr()
    code = main(["train", "--out", str(resumed), "--resume", "--epochs", "3", "--protocol", "paper"])
    assert "protocol 'paper' (checkpoint: 'official')" in one_error_line(capsys, code)


def test_a_run_from_before_the_protocol_options_resumes_and_evaluates_as_the_paper(tmp_path, capsys):
    run = tmp_path / "old"
    assert main(["train", *DIGITS, "--epochs", "1", *TINY, "--out", str(run)]) == 0
    for name in (CHECKPOINT, BEST):  # as such a run's files are: without the new keys
        saved = torch_load(run / name)
        for part in ("args", "config"):
            if part in saved:
                saved[part] = {k: v for k, v in saved[part].items() if k not in LEGACY_CONFIG}
        atomic_torch_save(saved, run / name)
    assert "protocol" not in torch_load(run / CHECKPOINT)["args"]
    code = main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet", "--score-inflation", "1"])
    assert code == 0, capsys.readouterr().err
    config = torch_load(run / CHECKPOINT)["config"]
    assert {k: config[k] for k in LEGACY_CONFIG} == LEGACY_CONFIG
    assert main(["evaluate", str(run), "--K", "20", "--device", "cpu"]) == 0
    assert "test_ll_K20" in json.loads((run / "metrics.json").read_text())


def test_sweep_forwards_the_protocol_options(tmp_path, capsys):
    argv = ["sweep", "--methods", "iwem", "--datasets", "digits-8x8", "--protocol", "official", "--score-inflation",
            "1.25", "--encoder-scale", "softplus", "--out", str(tmp_path / "sweep"), "--dry-run"]
    assert main(argv) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert "--protocol official --score-inflation 1.25" in line and "--encoder-scale softplus" in line
