"""A semi-supervised VAE (M2) with a discrete latent label: score-function gradients for the
classifier, θ/φ read off the autograd graph of one module registered in model and guide."""

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, RenyiELBO

from pyro_iwem import IWEM, IWAELoss
from tests.semi_supervised import SSVAE, LabelMixture, make_data, make_prototypes, one_hot

NUM_CLASSES = 3


@pytest.fixture
def data():
    prototypes = make_prototypes(NUM_CLASSES, 16, seed=0)
    labelled = make_data(30, prototypes, flip=0.1, seed=1)
    unlabelled = make_data(300, prototypes, flip=0.1, seed=2)
    return labelled, unlabelled


def grad_norm(params):
    """The gradient's norm over ``params``; a missing ``.grad`` counts as zero."""
    return sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None) ** 0.5


def snapshot(params):
    return [p.detach().clone() for p in params]


def moved(before, params):
    return max(float((b - p.detach()).abs().max()) for b, p in zip(before, params))


class RecordingAdam(pyro.optim.PyroOptim):
    """Adam that records which parameters (by param-store name) each call steps."""

    def __init__(self, optim_args):
        super().__init__(torch.optim.Adam, optim_args)
        self.calls = []

    def __call__(self, params, *args, **kwargs):
        params = list(params)
        store = pyro.get_param_store()
        self.calls.append({store.param_name(p) for p in params})
        return super().__call__(params, *args, **kwargs)


def test_iwae_loss_gives_the_classifier_a_gradient(data):
    _, (xs, _) = data
    net = SSVAE()
    loss = IWAELoss(8)
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 1e-2}), loss)
    value = loss.loss_and_grads(net.model, net.guide, xs[:64])
    assert torch.isfinite(torch.tensor(value))
    classifier = grad_norm(net.classifier_params())
    assert classifier > 1e-3, "the classifier q(y|x) gets no gradient: the score-function term is missing"
    assert all(torch.isfinite(p.grad).all() for p in net.classifier_params())
    assert grad_norm(net.decoder_params()) > 1e-3
    assert grad_norm(net.encoder_z.parameters()) > 1e-3
    # SVI steps it as well
    for p in net.parameters():
        p.grad = None
    before = snapshot(net.classifier_params())
    svi.step(xs[:64])
    assert moved(before, net.classifier_params()) > 0


def test_iwem_step_moves_classifier_in_the_p_step_and_decoder_in_the_m_step(data):
    _, (xs, _) = data
    net = SSVAE()
    optim = RecordingAdam({"lr": 1e-2})
    iwem = IWEM(net.model, net.guide, K=8, J=8, optim=optim, annealing=None)
    iwem.step(xs[:64])  # creates the parameters
    classifier, decoder, encoder_z = net.classifier_params(), net.decoder_params(), list(net.encoder_z.parameters())
    before = [snapshot(ps) for ps in (classifier, decoder, encoder_z)]
    optim.calls.clear()
    loss = iwem.step(xs[:64])
    assert isinstance(loss, float) and torch.isfinite(torch.tensor(loss))
    assert moved(before[0], classifier) > 0, "IWEM's P-step did not step the classifier"
    assert moved(before[1], decoder) > 0, "IWEM's M-step did not step the decoder"
    assert moved(before[2], encoder_z) > 0, "IWEM's P-step did not step the z-encoder"

    # θ (M-step) and φ (P-step) are stepped separately: no optimiser call steps both the
    # decoder and an encoder (one module, registered whole in model and guide)
    def touches(call, part):
        return any(name.startswith(f"ss_vae$$${part}.") for name in call)

    assert optim.calls, "IWEM did not step through its optim"
    assert any(touches(c, "encoder_y") for c in optim.calls)
    assert any(touches(c, "decoder") for c in optim.calls)
    for call in optim.calls:
        assert not (touches(call, "decoder") and (touches(call, "encoder_y") or touches(call, "encoder_z"))), sorted(call)


def test_renyi_elbo_gives_the_classifier_no_gradient(data):
    """Why a score-function term matters: Pyro's IWAE (RenyiELBO, alpha=0) drops the
    non-reparameterised site's score term (its coefficient alpha / (1 - alpha) is 0), so the
    classifier gets exactly zero gradient from unlabelled data."""
    _, (xs, _) = data
    net = SSVAE()
    loss = RenyiELBO(alpha=0, num_particles=8)
    try:
        loss.loss_and_grads(net.model, net.guide, xs[:64])
    except NotImplementedError:  # would equally document the gap
        return
    assert grad_norm(net.classifier_params()) == 0.0
    assert grad_norm(net.decoder_params()) > 1e-3


@pytest.mark.parametrize("K", [1, 3])
def test_iwae_loss_classifier_gradient_is_unbiased(K):
    """The IWAE gradient of a discrete site, against the exact one: with three classes and K
    particles the bound is a sum over 3**K label tuples. The estimator's mean over 10 x 2000
    copies of one image must be within 3 standard errors of it (in norm, per parameter group)."""
    prototypes = make_prototypes(NUM_CLASSES, 16, seed=0)
    x = make_data(1, prototypes, seed=4)[0].double()
    net = LabelMixture().double()
    loss = IWAELoss(K)
    repeats, copies = 10, 2000
    estimates = []
    for _ in range(repeats):
        loss.loss_and_grads(net.model, net.guide, x.expand(copies, -1))
        params = [net.class_logits, *net.encoder_y.parameters()]
        estimates.append(torch.cat([-p.grad.reshape(-1) / copies for p in params]))
        for p in params:
            p.grad = None
    estimates = torch.stack(estimates)
    mean, se = estimates.mean(0), estimates.std(0) / repeats**0.5
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(net.exact_iwae(x[0], K), params)])
    n_decoder = net.class_logits.numel()
    for name, part in (("decoder", slice(0, n_decoder)), ("classifier", slice(n_decoder, None))):
        error, noise = (mean[part] - exact[part]).norm(), se[part].norm()
        assert exact[part].norm() > 5 * noise  # the test can tell a biased estimator
        assert error < 3 * noise, f"{name}: |mean - exact| {error:.4f}, |exact| {exact[part].norm():.4f}, se {noise:.4f}"


def test_iwem_trains_the_classifier_from_few_labels(data):
    (xl, yl), (xu, yu) = data
    net = SSVAE()
    iwem = IWEM(net.model, net.guide, K=8, J=8, optim=pyro.optim.Adam({"lr": 1e-2}), annealing=None)
    chance = 1.0 / NUM_CLASSES
    g = torch.Generator().manual_seed(3)
    losses = []
    # the first step is unlabelled: a labelled first step hides the classifier from φ
    # (test_labelled_batch_first_still_steps_the_classifier)
    for step in range(150):
        if step % 2 == 1:
            iwem.step(xl, one_hot(yl, NUM_CLASSES))
        else:
            losses.append(iwem.step(xu[torch.randint(0, len(xu), (64,), generator=g)]))
    accuracy = float((net.classify(xu) == yu).float().mean())
    assert accuracy > chance + 0.3, f"accuracy on the unlabelled data {accuracy:.3f}"
    assert sum(losses[-10:]) < sum(losses[:10])


@pytest.mark.parametrize("method", ["iwae_loss", "iwem"])
def test_labelled_batch_first_still_steps_the_classifier(data, method):
    (xl, yl), (xu, _) = data
    net = SSVAE()
    if method == "iwae_loss":
        loss = IWAELoss(8)
        loss.loss_and_grads(net.model, net.guide, xl, one_hot(yl, NUM_CLASSES))
        for p in net.parameters():
            p.grad = None
        loss.loss_and_grads(net.model, net.guide, xu[:64])
        assert grad_norm(net.classifier_params()) > 1e-3
    else:
        iwem = IWEM(net.model, net.guide, K=8, J=8, optim=pyro.optim.Adam({"lr": 1e-2}), annealing=None)
        iwem.step(xl, one_hot(yl, NUM_CLASSES))
        before = snapshot(net.classifier_params())
        iwem.step(xu[:64])
        assert moved(before, net.classifier_params()) > 0
