import math

import pyro
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_iwem.infer import ProposalInflation
from pyro_iwem.models import MLPVAE, MLPVAE2, MODELS, ConvVAE, ConvVAELight, TabularVAE, build_model
from pyro_iwem.models.layers import ClampedLogVarHead, Gated, GaussianHead

B, N = 5, 3

# Small configurations keep the CNN cheap; the MLP runs at the paper's size.
CONFIGS = {
    "mlp": lambda: MLPVAE(),
    "mlp2": lambda: MLPVAE2(),
    "cnn": lambda: ConvVAE(decoder_channels=(8, 8)),
    "cnn_light": lambda: ConvVAELight(decoder_channels=(8,)),
    "tabular": lambda: TabularVAE(x_dim=6),
    "tabular_t": lambda: TabularVAE(x_dim=6, likelihood="studentt"),
}
LATENTS = {"mlp": ["z"], "mlp2": ["z1", "z2"], "cnn": ["z"], "cnn_light": ["z"], "tabular": ["z"], "tabular_t": ["z"]}


@pytest.fixture(autouse=True)
def fresh():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def make_data(vae, batch=B):
    if isinstance(vae, TabularVAE):
        return torch.randn(batch, vae.x_dim)
    return torch.bernoulli(torch.full((batch, vae.x_dim), 0.3))


def _in_particles(fn, *args):
    with pyro.plate("particles", N, dim=-2):
        return fn(*args)


def traces(vae, x, mask=None, particles=None, model_x=None):
    """Trace the guide on ``x`` (optionally in a particle plate), replay the model on it."""

    def wrap(fn, *args):
        def run():
            if particles is None:
                return fn(*args)
            with pyro.plate("particles", particles, dim=-2):
                return fn(*args)

        return run

    guide_tr = poutine.trace(wrap(vae.guide, x, mask)).get_trace()
    model_x = x if model_x is None else model_x
    model_tr = poutine.trace(poutine.replay(wrap(vae.model, model_x, mask), trace=guide_tr)).get_trace()
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    return guide_tr, model_tr


def sample_sites(tr):
    return {n: s for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}


def bernoulli_log_lik(x, logits):
    return (x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).sum(-1)


def mlp_forward(mlp, h):
    """The decoder MLP computed by hand from its weights: tanh after every hidden layer."""
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    for lin in linears[:-1]:
        h = torch.tanh(h @ lin.weight.T + lin.bias)
    return h @ linears[-1].weight.T + linears[-1].bias


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("particles", [None, N])
def test_shapes_under_particle_plate(name, particles):
    vae = CONFIGS[name]()
    x = make_data(vae)
    guide_tr, model_tr = traces(vae, x, particles=particles)
    batch = (B,) if particles is None else (N, B)
    for tr in (guide_tr, model_tr):
        for site in sample_sites(tr).values():
            assert site["log_prob"].shape == batch, site["name"]
    assert set(sample_sites(guide_tr)) == set(LATENTS[name])
    assert set(sample_sites(model_tr)) == set(LATENTS[name]) | {"x"}
    z = model_tr.nodes[LATENTS[name][-1]]["value"]
    assert z.shape == batch + (vae.z_dim,)
    assert model_tr.nodes["x"]["is_observed"]
    for site in sample_sites(model_tr).values():
        assert torch.isfinite(site["log_prob"]).all()


def test_mlp2_latent_shapes():
    vae = MLPVAE2(z1_dim=7, z2_dim=3, hidden1=(11,), hidden2=(5,))
    x = make_data(vae)
    guide_tr, model_tr = traces(vae, x, particles=N)
    assert model_tr.nodes["z1"]["value"].shape == (N, B, 7)
    assert model_tr.nodes["z2"]["value"].shape == (N, B, 3)
    assert vae.z_dim == 3
    # replay: the model scores the guide's draws
    assert torch.equal(model_tr.nodes["z1"]["value"], guide_tr.nodes["z1"]["value"])


def test_mlp2_densities_by_hand_and_reparameterised_chain():
    vae = MLPVAE2(z1_dim=7, z2_dim=3, hidden1=(11,), hidden2=(5,))
    x = make_data(vae)
    guide_tr, model_tr = traces(vae, x, particles=N)
    z1, z2 = (guide_tr.nodes[n]["value"] for n in ("z1", "z2"))

    def normal_logpdf(value, loc, scale):
        args = (t.detach().numpy() for t in (value, loc, scale))
        return torch.as_tensor(scipy.stats.norm.logpdf(*args).sum(-1), dtype=torch.float32)

    # model: z1 | z2 from the decoder's Gaussian MLP; guide: z2 | z1 from the encoder's
    assert torch.allclose(model_tr.nodes["z1"]["log_prob"], normal_logpdf(z1, *vae.decoder["z1"](z2)), atol=1e-3)
    assert torch.allclose(guide_tr.nodes["z2"]["log_prob"], normal_logpdf(z2, *vae.encoder["z2"](z1)), atol=1e-3)
    # z2 is reparameterised through z1: its draw depends on the first encoder layer
    z2.sum().backward()
    assert vae.encoder["z1"][1].loc.weight.grad.abs().sum() > 0


def test_gaussian_head_scale_parametrisation():
    head = GaussianHead(2, 3, min_scale=1e-4)
    with torch.no_grad():
        head.scale.weight.zero_()
        head.scale.bias.copy_(torch.tensor([-100.0, 0.0, 3.0]))
    _, scale = head(torch.randn(4, 2))
    expected = torch.tensor([1e-4, math.log(2) + 1e-4, math.log1p(math.exp(3.0)) + 1e-4])
    assert torch.allclose(scale, expected.expand(4, 3), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("particles", [None, N])
def test_mlp_bernoulli_log_likelihood_by_hand(particles):
    vae = MLPVAE(train_mean=torch.rand(784))
    x = make_data(vae)
    _, model_tr = traces(vae, x, particles=particles)
    z = model_tr.nodes["z"]["value"]
    expected = bernoulli_log_lik(x, mlp_forward(vae.decoder, z))
    assert torch.allclose(model_tr.nodes["x"]["log_prob"], expected, rtol=1e-5, atol=1e-3)
    # prior: standard Normal, summed over the latent dims
    prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(model_tr.nodes["z"]["log_prob"], prior, rtol=1e-5, atol=1e-4)


def test_gaussian_head_exp_link_is_an_unclamped_log_variance():
    # the official code's MLP encoder: scale = exp(logvar / 2), logvar a linear layer, no floor
    head = GaussianHead(2, 3, min_scale=1e-4, link="exp")
    with torch.no_grad():
        head.scale.weight.zero_()
        head.scale.bias.copy_(torch.tensor([-100.0, 0.0, 3.0]))
    _, scale = head(torch.randn(4, 2))
    expected = torch.tensor([math.exp(-50.0), 1.0, math.exp(1.5)])
    assert torch.allclose(scale, expected.expand(4, 3), rtol=1e-6, atol=0)
    assert scale[0, 0] < 1e-20  # below min_scale: no floor
    with pytest.raises(ValueError, match="link must be one of softplus, exp, got 'relu'"):
        GaussianHead(2, 3, link="relu")


@pytest.mark.parametrize("cls", [MLPVAE, MLPVAE2])
def test_encoder_scale_option_reaches_every_encoder_head(cls):
    for link in ("softplus", "exp"):
        vae = cls(encoder_scale=link)
        heads = [m for m in vae.encoder.modules() if isinstance(m, GaussianHead)]
        assert heads and all(h.link == link for h in heads)
    # the model's own Gaussian layer (MLPVAE2's p(z1 | z2)) keeps the softplus
    decoder_heads = [m for m in cls(encoder_scale="exp").decoder.modules() if isinstance(m, GaussianHead)]
    assert all(h.link == "softplus" for h in decoder_heads)


@pytest.mark.parametrize("factor", [1.0, 1.5])
def test_guide_log_density_with_inflation(factor):
    vae = MLPVAE()
    x = make_data(vae)

    def guide():
        with ProposalInflation(factor), pyro.plate("particles", N, dim=-2):
            vae.guide(x)

    guide_tr = poutine.trace(guide).get_trace()
    guide_tr.compute_log_prob()
    z = guide_tr.nodes["z"]["value"]
    loc, scale = vae.encoder(x)
    scale = scale * math.sqrt(factor)
    expected = scipy.stats.norm.logpdf(z.detach().numpy(), loc.detach().numpy(), scale.detach().numpy()).sum(-1)
    assert torch.allclose(guide_tr.nodes["z"]["log_prob"], torch.as_tensor(expected, dtype=torch.float32), atol=1e-3)
    assert z.requires_grad  # reparameterised


@pytest.mark.parametrize("likelihood", ["gaussian", "studentt"])
def test_tabular_log_likelihood_closed_form(likelihood):
    vae = TabularVAE(x_dim=6, likelihood=likelihood)
    x = make_data(vae)
    _, model_tr = traces(vae, x, particles=N)
    z = model_tr.nodes["z"]["value"]
    params = [p.detach().numpy() for p in vae.decoder(z)]
    xs = x.numpy()
    if likelihood == "gaussian":
        loc, scale = params
        expected = (-0.5 * math.log(2 * math.pi) - torch.log(torch.as_tensor(scale))
                    - 0.5 * torch.as_tensor((xs - loc) / scale) ** 2).sum(-1)
    else:
        loc, scale, df = params
        assert (df >= 3).all()
        expected = torch.as_tensor(scipy.stats.t.logpdf(xs, df, loc, scale)).sum(-1)
    assert torch.allclose(model_tr.nodes["x"]["log_prob"], expected.float(), rtol=1e-5, atol=1e-3)
    assert torch.equal(vae.decoder_mean(z), vae.decoder(z)[0])


@pytest.mark.parametrize("name", ["mlp", "cnn", "tabular"])
def test_full_mask_equals_unmasked(name):
    vae = CONFIGS[name]()
    x = make_data(vae)
    mask = torch.ones_like(x, dtype=torch.bool)
    guide_tr, plain_tr = traces(vae, x, particles=N)
    masked_tr = poutine.trace(
        poutine.replay(lambda: _in_particles(vae.model, x, mask), trace=guide_tr)
    ).get_trace()
    masked_tr.compute_log_prob()
    assert torch.allclose(masked_tr.nodes["x_observed"]["log_prob"], plain_tr.nodes["x"]["log_prob"])
    assert torch.equal(masked_tr.nodes["x_unobserved"]["log_prob"], torch.zeros(N, B))
    assert torch.equal(masked_tr.nodes["x"]["value"], x.expand(N, B, -1))


@pytest.mark.parametrize("name", ["mlp", "tabular"])
def test_partial_mask_sums_to_completed_log_prob(name):
    vae = CONFIGS[name]()
    x = make_data(vae)
    mask = torch.rand(x.shape) < 0.5
    guide_tr, model_tr = traces(vae, x, mask=mask, particles=N)
    completed = model_tr.nodes["x"]["value"]
    missing = model_tr.nodes["x_unobserved"]["value"]
    assert completed.shape == missing.shape == (N, B, vae.x_dim)
    assert torch.equal(torch.where(mask, completed, 0.0), (x * mask).expand(N, B, -1))
    assert torch.equal(completed[:, ~mask], missing[:, ~mask])  # missing entries were drawn
    # full log density at the completed value, from an unmasked replay
    full_tr = poutine.trace(poutine.replay(lambda: _in_particles(vae.model, completed), trace=guide_tr)).get_trace()
    full_tr.compute_log_prob()
    total = model_tr.nodes["x_observed"]["log_prob"] + model_tr.nodes["x_unobserved"]["log_prob"]
    assert torch.allclose(total, full_tr.nodes["x"]["log_prob"], rtol=1e-5, atol=1e-3)
    if name == "mlp":
        logits = mlp_forward(vae.decoder, model_tr.nodes["z"]["value"])
        per_pixel = completed * F.logsigmoid(logits) + (1 - completed) * F.logsigmoid(-logits)
        assert torch.allclose(model_tr.nodes["x_observed"]["log_prob"], (per_pixel * mask).sum(-1), atol=1e-3)
        assert torch.allclose(model_tr.nodes["x_unobserved"]["log_prob"], (per_pixel * ~mask).sum(-1), atol=1e-3)


def test_mlp_parameter_counts():
    vae = MLPVAE()
    n_enc = sum(p.numel() for p in vae.encoder.parameters())
    n_dec = sum(p.numel() for p in vae.decoder.parameters())
    assert n_enc == (784 * 300 + 300) + (300 * 300 + 300) + 2 * (300 * 40 + 40)
    assert n_dec == (40 * 300 + 300) + (300 * 300 + 300) + (300 * 784 + 784)
    assert [m.out_features for m in vae.decoder if isinstance(m, nn.Linear)] == [300, 300, 784]
    assert sum(isinstance(m, nn.Tanh) for m in vae.modules()) == 4


def test_mlp2_parameter_counts():
    vae = MLPVAE2()
    count = lambda m: sum(p.numel() for p in m.parameters())
    lin = lambda i, o: i * o + o
    assert count(vae.encoder) == lin(784, 100) + lin(100, 100) + 2 * lin(100, 100) + lin(100, 50) + lin(50, 50) + 2 * lin(50, 50)
    assert count(vae.decoder) == lin(50, 50) + lin(50, 50) + 2 * lin(50, 100) + lin(100, 100) + lin(100, 100) + lin(100, 784)


def test_glorot_init_and_zero_biases():
    vae = MLPVAE()
    for lin in [m for m in vae.modules() if isinstance(m, nn.Linear)]:
        fan_in, fan_out = lin.in_features, lin.out_features
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert lin.weight.abs().max() <= bound
        if lin.weight.numel() > 10000:
            assert lin.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.03)
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    # the CNN is initialised the same way
    cnn = ConvVAE(decoder_channels=(8,))
    for conv in [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out))
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))


def test_train_mean_output_bias():
    mean = torch.rand(784)
    mean[:3] = torch.tensor([0.0, 1.0, 0.5])
    vae = MLPVAE(train_mean=mean)
    bias = vae.decoder[-1].bias
    expected = torch.log(mean.clamp(1e-3, 1 - 1e-3)) - torch.log1p(-mean.clamp(1e-3, 1 - 1e-3))
    assert torch.allclose(bias, expected, atol=1e-4)
    assert bias[0].item() == pytest.approx(math.log(1e-3 / (1 - 1e-3)), rel=1e-4)
    # a decoder with zero output weights predicts the training means
    with torch.no_grad():
        vae.decoder[-1].weight.zero_()
    assert torch.allclose(vae.decoder_mean(torch.randn(2, 40)), mean.clamp(1e-3, 1 - 1e-3).expand(2, -1), atol=1e-5)
    with pytest.raises(ValueError):
        MLPVAE(train_mean=torch.rand(10))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_theta_and_phi_are_disjoint_and_complete(name):
    vae = CONFIGS[name]()
    guide_tr, model_tr = traces(vae, make_data(vae), particles=N)
    theta = {n for n, s in model_tr.nodes.items() if s["type"] == "param"}
    phi = {n for n, s in guide_tr.nodes.items() if s["type"] == "param"}
    assert theta and phi and not theta & phi
    assert theta == {"decoder$$$" + n for n, _ in vae.decoder.named_parameters()}
    assert phi == {"encoder$$$" + n for n, _ in vae.encoder.named_parameters()}
    assert len(theta) + len(phi) == len(list(vae.parameters()))


def test_cnn_shapes_and_backward():
    vae = ConvVAE()  # the default (Tomczak & Welling-sized) network
    z = torch.randn(2, 3, 40)
    logits = vae.decode(z)
    assert logits.shape == (2, 3, 784)
    # leading dims are flattened and restored without mixing data points
    assert torch.allclose(logits[1, 2], vae.decode(z[1, 2:3])[0], atol=1e-5)
    x = make_data(vae, batch=4)
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (4, 40)
    assert (scale > 0).all()
    assert torch.allclose(vae.encode(x.expand(2, 4, 784))[0][1], loc, atol=1e-5)
    # conv layout: 28x28 -> 6 x 7 x 7 features before the Gaussian head
    assert vae.encoder[1].loc.in_features == 294

    guide_tr, model_tr = traces(vae, x, particles=2)
    loss = -(model_tr.log_prob_sum() - guide_tr.log_prob_sum())
    loss.backward()
    for p in vae.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in vae.decoder.parameters())
    assert any(p.grad.abs().sum() > 0 for p in vae.encoder.parameters())


def test_cnn_image_shape():
    vae = ConvVAE(z_dim=5, image_shape=(16, 12), decoder_channels=(4,))
    assert vae.x_dim == 192
    assert vae.decode(torch.randn(3, 2, 5)).shape == (3, 2, 192)
    assert vae.encode(torch.rand(2, 192))[0].shape == (2, 5)


# --- the paper's CNN (issue 10) -----------------------------------------------------------
#: (layer type, output shape less the batch dim) of every layer of ConvVAE() on 28x28 images
PAPER_CNN_ENCODER = [
    (nn.Unflatten, (1, 28, 28)),
    (Gated, (32, 28, 28)),  # 1 -> 32, 7x7, stride 1, padding 3
    (Gated, (32, 14, 14)),  # 32 -> 32, 3x3, stride 2, padding 1
    (Gated, (64, 14, 14)),  # 32 -> 64, 5x5, stride 1, padding 2
    (Gated, (64, 7, 7)),  # 64 -> 64, 3x3, stride 2, padding 1
    (Gated, (6, 7, 7)),  # 64 -> 6, 3x3, stride 1, padding 1
    (nn.Flatten, (294,)),
]
PAPER_CNN_DECODER = [
    (Gated, (300,)),  # gated dense 40 -> 300
    (Gated, (784,)),  # gated dense 300 -> 784
    (nn.Unflatten, (1, 28, 28)),
    (Gated, (64, 28, 28)),  # 1 -> 64, 3x3
    (Gated, (64, 28, 28)),  # 64 -> 64, 3x3
    (Gated, (64, 28, 28)),
    (Gated, (64, 28, 28)),
    (nn.Conv2d, (1, 28, 28)),  # 1x1 to one channel of logits
    (nn.Flatten, (784,)),
]


def _layer_outputs(layers, run):
    """``(type, output shape)`` of each module in ``layers``, in call order, while ``run()`` runs."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((type(m), tuple(o.shape)))) for m in layers]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@pytest.mark.parametrize("lead", [(2,), (3, 2)], ids=["batch 2", "3 particles x batch 2"])
def test_paper_cnn_layer_shapes(lead):
    vae = ConvVAE()
    n = math.prod(lead)  # leading dims are flattened into one batch dim for the layers
    features, head = vae.encoder
    x = torch.bernoulli(torch.full(lead + (784,), 0.3))
    seen, (loc, scale) = _layer_outputs(list(features), lambda: vae.encode(x))
    assert seen == [(kind, (n,) + shape) for kind, shape in PAPER_CNN_ENCODER]
    assert isinstance(head, ClampedLogVarHead)
    for linear in (head.loc, head.logvar):
        assert (linear.in_features, linear.out_features) == (294, 40)
    assert loc.shape == scale.shape == lead + (40,)

    z = torch.randn(lead + (40,))
    seen, logits = _layer_outputs(list(vae.decoder), lambda: vae.decode(z))
    assert seen == [(kind, (n,) + shape) for kind, shape in PAPER_CNN_DECODER]
    assert logits.shape == lead + (784,)
    # the layers' own settings: dense 40-300-784, 3x3 "same" convs of 64 channels, a 1x1 conv
    dense = [m.a for m in vae.decoder if isinstance(m, Gated) and isinstance(m.a, nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(40, 300), (300, 784)]
    convs = [m.a for m in vae.decoder if isinstance(m, Gated) and isinstance(m.a, nn.Conv2d)] + [vae.decoder[-2]]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 64, (3, 3), (1, 1), (1, 1)), *[(64, 64, (3, 3), (1, 1), (1, 1))] * 3, (64, 1, (1, 1), (1, 1), (0, 0))
    ]
    if len(lead) == 2:  # no mixing across the flattened dims
        assert torch.allclose(logits[2, 1], vae.decode(z[2, 1:2])[0], atol=1e-5)
        assert torch.allclose(loc[2, 1], vae.encode(x[2, 1:2])[0][0], atol=1e-5)


def test_paper_cnn_parameter_count():
    def count(module):
        return sum(p.numel() for p in module.parameters())

    def conv(c_in, c_out, k):  # weight + bias
        return c_in * c_out * k * k + c_out

    def dense(n_in, n_out):
        return n_in * n_out + n_out

    def gated(n):  # two independent copies, a(x) and g(x)
        return 2 * n

    encoder = (
        gated(conv(1, 32, 7)) + gated(conv(32, 32, 3)) + gated(conv(32, 64, 5)) + gated(conv(64, 64, 3))
        + gated(conv(64, 6, 3))
        + dense(6 * 7 * 7, 40) + dense(6 * 7 * 7, 40)  # loc and (clamped) logvar
    )
    decoder = (
        gated(dense(40, 300)) + gated(dense(300, 784))
        + gated(conv(1, 64, 3)) + 3 * gated(conv(64, 64, 3))
        + conv(64, 1, 1)
    )
    # the same sums with every number written out
    assert encoder == (
        2 * (1 * 32 * 49 + 32)  # 3 200
        + 2 * (32 * 32 * 9 + 32)  # 18 496
        + 2 * (32 * 64 * 25 + 64)  # 102 528
        + 2 * (64 * 64 * 9 + 64)  # 73 856
        + 2 * (64 * 6 * 9 + 6)  # 6 924
        + 2 * (294 * 40 + 40)  # 23 600
    ) == 228_604
    assert decoder == (
        2 * (40 * 300 + 300)  # 24 600
        + 2 * (300 * 784 + 784)  # 471 968
        + 2 * (1 * 64 * 9 + 64)  # 1 280
        + 3 * 2 * (64 * 64 * 9 + 64)  # 221 568
        + (64 * 1 * 1 + 1)  # 65
    ) == 719_481
    vae = ConvVAE()
    assert count(vae.encoder) == encoder
    assert count(vae.decoder) == decoder
    assert count(vae) == 948_085
    # cnn-light: the same encoder (softplus head, same size); z -> 784 in one gated dense layer
    light = ConvVAELight()
    assert count(light.encoder) == encoder
    light_decoder = decoder - gated(dense(40, 300)) - gated(dense(300, 784)) + gated(dense(40, 784))
    assert count(light.decoder) == light_decoder == 287_201
    assert isinstance(light.encoder[1], GaussianHead)


def test_paper_cnn_clamps_the_log_variance():
    vae = ConvVAE()
    features, head = vae.encoder
    assert head.bounds == (-6.0, 2.0)
    x = torch.cat([1e6 * torch.rand(4, 784), -1e6 * torch.rand(4, 784)])  # huge inputs, both signs
    raw = head.logvar(features(x))
    assert raw.abs().max() > 1e3  # the linear layer alone is far outside [-6, 2]
    loc, scale = vae.encode(x)
    assert torch.isfinite(loc).all() and torch.isfinite(scale).all()
    logvar = 2 * torch.log(scale)
    assert (logvar >= -6 - 1e-5).all() and (logvar <= 2 + 1e-5).all()
    # both ends are reached: scale = exp(-3) and exp(1) exactly where the raw output is beyond them
    assert torch.allclose(scale[raw <= -6], torch.tensor(math.exp(-3.0)))
    assert torch.allclose(scale[raw >= 2], torch.tensor(math.exp(1.0)))
    assert (raw <= -6).any() and (raw >= 2).any()
    # within the interval the head is exp(logvar / 2) of the linear output
    h = 1e-3 * torch.randn(5, 294)
    assert torch.allclose(head(h)[1], torch.exp(0.5 * head.logvar(h)))
    # the guide's scale is the head's
    binary = (x > 0).float()
    guide_tr, _ = traces(vae, binary, particles=2)
    assert torch.equal(guide_tr.nodes["z"]["fn"].base_dist.scale, vae.encode(binary)[1].expand(2, 8, 40))
    with pytest.raises(ValueError):
        ClampedLogVarHead(3, 2, bounds=(2.0, -6.0))
    # the light CNN keeps the softplus head: scale floor min_scale, no upper bound
    light_scale = ConvVAELight().encode(x)[1]
    assert (light_scale >= 1e-4).all() and light_scale.max() > math.exp(1.0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sample(name):
    vae = CONFIGS[name]()
    s = vae.sample(7)
    assert s.shape == (7, vae.x_dim)
    assert not s.requires_grad
    if not name.startswith("tabular"):
        assert ((s >= 0) & (s <= 1)).all()
        assert s.std() > 0


def test_command_line_model_names():
    from pyro_iwem.data import load_digits_binary
    from pyro_iwem.experiments.setup import MODELS as CLI_MODELS
    from pyro_iwem.experiments.setup import make_model

    assert set(CLI_MODELS) <= set(MODELS) and {"cnn", "cnn-light"} <= set(CLI_MODELS)
    data = load_digits_binary()
    paper, light = (make_model({"model": name}, data, "cpu") for name in ("cnn", "cnn-light"))
    assert type(paper) is ConvVAE and type(light) is ConvVAELight
    assert paper.image_shape == light.image_shape == (8, 8)


def test_build_model():
    assert isinstance(build_model("mlp"), MLPVAE)
    assert isinstance(build_model("mlp2"), MLPVAE2)
    assert isinstance(build_model("cnn", decoder_channels=(4,)), ConvVAE)
    assert isinstance(build_model("cnn-light", decoder_channels=(4,)), ConvVAELight)
    tab = build_model("tabular", x_dim=4)
    assert isinstance(tab, TabularVAE) and tab.z_dim == 3
    assert build_model("mlp", z_dim=10, hidden=(20,)).z_dim == 10
    with pytest.raises(ValueError):
        build_model("rnn")
    with pytest.raises(ValueError):
        TabularVAE(x_dim=4, likelihood="poisson")


@pytest.mark.parametrize("name", ["mlp", "mlp2", "cnn"])
def test_guide_accepts_per_particle_inputs(name):
    # miss-IWEM proposes z from q(z | x_o, x_m^k) with a different completion per particle
    vae = CONFIGS[name]()
    x = make_data(vae)
    x_particles = torch.bernoulli(torch.full((N, B, vae.x_dim), 0.3))
    x_particles[0] = x
    guide_tr = poutine.trace(lambda: _in_particles(vae.guide, x_particles)).get_trace()
    guide_tr.compute_log_prob()
    top = LATENTS[name][-1]
    assert guide_tr.nodes[top]["value"].shape == (N, B, vae.z_dim)
    assert guide_tr.nodes[top]["log_prob"].shape == (N, B)
    first = LATENTS[name][0]
    loc = guide_tr.nodes[first]["fn"].base_dist.loc
    assert torch.allclose(loc[0], vae.encode(x)[0] if name != "mlp2" else vae.encoder["z1"](x)[0], atol=1e-5)
    assert not torch.allclose(loc[0], loc[1])
