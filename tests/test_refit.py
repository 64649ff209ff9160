"""Scoring the model, not the proposal (issue 10): ``refit_encoder`` fits a fresh encoder to a
trained decoder that stays frozen, so that the test bound no longer depends on the proposal
the method trained. The command line's ``evaluate --refit-encoder`` is tested in test_cli.py."""

import math

import pytest
import torch

from pyro_iwem.experiments.cli import main
from pyro_iwem.experiments.evaluate import load_run, refit_encoder
from pyro_iwem.experiments.evaluate import test_log_likelihood as score  # not a test

EPOCHS = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The paper's MLP trained with IWAE (K = 5) for 10 epochs (130 steps) on the 8x8 digits."""
    out = tmp_path_factory.mktemp("refit") / "digits-iwae"
    argv = ["train", "--dataset", "digits-8x8", "--model", "mlp", "--method", "iwae", "--epochs", str(EPOCHS),
            "--K", "5", "--max-eval", "100", "--eval-K", "20", "--valid-K", "5", "--device", "cpu", "--quiet",
            "--out", str(out)]
    assert main(argv) == 0
    return out


def test_refit_recovers_the_score_of_a_damaged_encoder(trained):
    config, data, model = load_run(trained)
    good = score(model, data, 100, seed=0)
    with torch.no_grad():  # nonsense weights: the proposal is far off, the model is the same
        for p in model.encoder.parameters():
            p.mul_(5.0)
    damaged = score(model, data, 100, seed=0)
    # a fit with the training's own budget: as many steps, the run's K, batch size and lr
    steps = EPOCHS * data.num_batches("train", config["batch_size"])
    fitted = refit_encoder(model, data, steps, num_particles=config["K"], batch_size=config["batch_size"],
                           lr=config["lr"], seed=0)
    refit = score(model, data, 100, seed=0)
    print(f"undamaged {good:.3f}, damaged {damaged:.3f}, refit ({steps} steps) {refit:.3f} nats; "
          f"refit training bound {fitted['train_bound']:.3f}")
    assert damaged < good - 100  # the plain score of the damaged encoder collapses
    assert abs(refit - good) < 1.0  # the refitted one is the model's again
    assert fitted["step"] == steps and math.isfinite(fitted["train_bound"])


def test_refit_leaves_the_decoder_bitwise_unchanged(trained):
    _, data, model = load_run(trained)
    decoder = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    assert model.decoder.training
    refit_encoder(model, data, 5, num_particles=3, seed=1)
    for name, value in model.decoder.state_dict().items():
        assert torch.equal(value, decoder[name]), name
    assert all(p.grad is None for p in model.decoder.parameters())  # never even differentiated
    assert all(not torch.equal(v, encoder[k]) for k, v in model.encoder.state_dict().items())  # the encoder moved
    assert [p.requires_grad for p in model.parameters()] == flags and model.decoder.training  # restored

    # anything that moves θ anyway is caught
    def nudge(module, args):
        with torch.no_grad():
            module[-1].bias.add_(1e-3)

    hook = model.decoder.register_forward_pre_hook(nudge)
    try:
        with pytest.raises(RuntimeError, match="outside the encoder: decoder.4.bias"):
            refit_encoder(model, data, 1, num_particles=3, seed=1)
    finally:
        hook.remove()


def test_refit_is_repeatable_and_resumes_exactly(trained):
    config, data, model = load_run(trained)
    batch = 500  # 3 batches an epoch: 7 steps run into a third epoch
    straight = refit_encoder(model, data, 7, num_particles=3, batch_size=batch, seed=2)

    class Stop(Exception):
        pass

    saved = []

    def interrupt(state):
        saved.append(state)
        raise Stop

    with pytest.raises(Stop):
        refit_encoder(load_run(trained)[2], data, 7, num_particles=3, batch_size=batch, seed=2,
                      checkpoint_every=4, on_checkpoint=interrupt)
    assert saved[0]["step"] == 4  # in the middle of the second epoch
    resumed = refit_encoder(load_run(trained)[2], data, 7, num_particles=3, batch_size=batch, seed=2, state=saved[0])
    again = refit_encoder(load_run(trained)[2], data, 7, num_particles=3, batch_size=batch, seed=2)
    for other in (resumed, again):
        assert other["step"] == 7
        assert other["encoder"].keys() == straight["encoder"].keys()
        for name, value in straight["encoder"].items():
            assert torch.equal(other["encoder"][name], value), name
        assert other["bounds"] == straight["bounds"]
    with pytest.raises(ValueError, match="cannot resume"):
        refit_encoder(load_run(trained)[2], data, 7, num_particles=4, batch_size=batch, seed=2, state=saved[0])
    with pytest.raises(ValueError, match="steps"):
        refit_encoder(model, data, 0)
