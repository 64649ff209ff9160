"""Per-step wall time of pyro_iwem.IWEM against plain-PyTorch implementations of the same step.

Every implementation trains its own deep copy of the same initial weights (the paper's MLP,
``reference.py``) with Adam (lr 5e-4) on the same batch, in one process, timed interleaved after
a warm-up; peak memory is measured per implementation in a subprocess (``harness.py``). This
script holds the pyro_iwem side, the table of methods (``METHODS``; derived numbers in
``RATIOS``), the correctness checks that each plain step computes pyro_iwem's (run first, and by
``tests/test_reference_equivalence.py``) and the command line: ``--help``;
``benchmarks/README.md`` explains the output.
"""

import argparse
import itertools
import json
import math
import platform
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

import pyro_iwem
import pyro_iwem.models
from pyro_iwem.infer import objectives
from pyro_iwem.infer.methods import SPECS
from pyro_iwem.infer.sampler import ParticleSampler

import harness
import reference as ref
from harness import Method, close

# Pyro's param store is global: every Pyro copy of the networks gets its own names, or a later
# pyro.module would return (and the optimiser would step) the parameters of an earlier copy.
_PYRO_COPIES = itertools.count()


# --------------------------------------------------------------------------------------
# The pyro_iwem side: the same networks as Pyro programs, and their steps
# --------------------------------------------------------------------------------------


def pyro_model_and_guide(encoder, decoder, prefix, discrete=False):
    """The networks as a Pyro model and guide (unique param-store names per copy); ``discrete``:
    Bernoulli(1/2) latents and a guide of Bernoulli logits, else N(0, I) and a Gaussian guide."""
    z_dim = decoder.dims[2]

    def model(x):
        pyro.module(prefix + "decoder", decoder)
        with pyro.plate("data", x.shape[0], dim=-1):
            if discrete:
                prior = dist.Bernoulli(x.new_full((x.shape[0], z_dim), 0.5))
            else:
                zeros = x.new_zeros(x.shape[0], z_dim)
                prior = dist.Normal(zeros, torch.ones_like(zeros))
            z = pyro.sample("z", prior.to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module(prefix + "encoder", encoder)
        with pyro.plate("data", x.shape[0], dim=-1):
            q = dist.Bernoulli(logits=encoder(x)) if discrete else dist.Normal(*encoder(x))
            pyro.sample("z", q.to_event(1))

    return model, guide


def make_pyro(name=None, alpha=1.0, one_pass=False, discrete=False):
    """``pyro_iwem.build_method(name)``, or with ``name=None`` ``pyro_iwem.IWEM`` with α fixed at
    ``alpha`` (``annealing=None`` for α = 1), on the Pyro model/guide."""

    def factory(ctx):
        encoder, decoder = ref.discrete_fresh(ctx) if discrete else ctx.fresh()
        model, guide = pyro_model_and_guide(encoder, decoder, f"copy{next(_PYRO_COPIES)}_", discrete)
        # max_plate_nesting given, so that no plate-guessing run draws from the RNG (the checks need it)
        common = {"K": ctx.K, "J": ctx.J, "optim": pyro.optim.Adam({"lr": ctx.lr}), "max_plate_nesting": 1}
        if name is None:
            annealing = None if alpha >= 1.0 else pyro_iwem.Annealing(start=alpha, stop=alpha)
            method = pyro_iwem.IWEM(model, guide, L=ctx.L, annealing=annealing, one_pass=one_pass, **common)
        else:
            method = pyro_iwem.build_method(name, model, guide, **({} if discrete else {"L": ctx.L}), **common)
        x = ctx.x
        return (lambda: method.step(x)), (encoder, decoder)

    return factory


#: particles of the bound per model: the paper's K = 5000 for the MLP; the CNN costs ~4 ms per
#: image and particle on a 2-core CPU, so it is timed with K = 100 (chunks of 50 for plain)
EVAL_K = {"mlp": 5000, "cnn": 100}
PLAIN_EVAL_CHUNK = {"mlp": 500, "cnn": 50}


def make_bound(name, plain):
    """The K = EVAL_K[name] IWAE bound of ``ctx.x`` under a ``pyro_iwem.models`` VAE:
    ``pyro_iwem.iwae_bound``, or the plain loop with chunks of PLAIN_EVAL_CHUNK[name]."""

    def factory(ctx):
        with torch.random.fork_rng():
            torch.manual_seed(2)
            vae = pyro_iwem.models.build_model(name).to(device=ctx.x.device, dtype=ctx.x.dtype)
        vae.eval()
        x = ctx.x
        K = EVAL_K[name]
        if plain:
            return (lambda: ref.plain_bound(vae, x, K, PLAIN_EVAL_CHUNK[name]).sum().item()), ()
        return (lambda: pyro_iwem.iwae_bound(vae.model, vae.guide, x, num_particles=K).sum().item()), ()

    return factory


# --------------------------------------------------------------------------------------
# The methods: the one table of what the benchmark knows
# --------------------------------------------------------------------------------------

#: pyro_iwem's methods for complete data (``build_method`` names, from the registry ``SPECS``), each
#: timed against plain IWAE by ``--methods baselines``; the one-pass step has rows of its own above
BASELINES = tuple(spec.name for spec in SPECS if not spec.missing_data and spec.name != "iwem-one-pass")
_EVAL_IMPL = {"pyro": "pyro_iwem.iwae_bound, chunk from a 1 GiB budget", "plain": "plain chunks of {chunk}"}
_TDIST = "smart_iwem_a05 with log p via torch.distributions (as Pyro computes it)"

METHODS = {
    "pyro_iwem_a05": Method(make_pyro(alpha=0.5), "pyro_iwem.IWEM step, alpha = 0.5 (K snIS + L ELBO particles)"),
    "pyro_iwem_a1": Method(make_pyro(alpha=1.0), "pyro_iwem.IWEM step, alpha = 1 (annealing=None)"),
    "pyro_iwem_1pass_a05": Method(make_pyro(alpha=0.5, one_pass=True), "pyro_iwem.IWEM(one_pass=True), alpha = 0.5"),
    "pyro_iwem_1pass_a1": Method(make_pyro(alpha=1.0, one_pass=True), "pyro_iwem.IWEM(one_pass=True), alpha = 1"),
    "plain_iwem_a05": Method(ref.make_plain_iwem(0.5), "straightforward plain IWEM, alpha = 0.5"),
    "plain_iwem_a1": Method(ref.make_plain_iwem(1.0), "straightforward plain IWEM, alpha = 1"),
    "smart_iwem_a05": Method(ref.make_smart_iwem(0.5), "smart plain IWEM (theta/phi-only grads), alpha = 0.5"),
    "smart_iwem_a1": Method(ref.make_smart_iwem(1.0), "smart plain IWEM (theta/phi-only grads), alpha = 1"),
    "smart_iwem_a05_tdist": Method(ref.make_smart_iwem(0.5, ref.log_joint_tdist), _TDIST, default=False),
    "plain_iwae": Method(ref.make_plain_iwae, "plain IWAE, K particles, one Adam step on all params"),
    **{
        f"{impl}_bound_{name}": Method(
            make_bound(name, impl == "plain"),
            f"{_EVAL_IMPL[impl].format(chunk=PLAIN_EVAL_CHUNK[name])}, K = {EVAL_K[name]}, {name}",
            default=False, group="evaluation",
        )
        for name in ("mlp", "cnn")
        for impl in ("pyro", "plain")
    },
    **{
        name: Method(factory, f"{description}, 40 Bernoulli latents", default=False, group="discrete")
        for name, factory, description in [
            ("pyro_iwem_discrete", make_pyro("iwem-woa", discrete=True), "pyro_iwem IWEM (alpha = 1)"),
            ("plain_iwem_discrete", ref.make_plain_discrete_iwem, "plain IWEM with a VIMCO P-step"),
            ("pyro_iwae_discrete", make_pyro("iwae", discrete=True), "pyro_iwem IWAELoss (VIMCO)"),
            ("plain_iwae_discrete", ref.make_plain_discrete_iwae, "plain VIMCO-IWAE"),
        ]
    },
    **{
        f"pyro_{name}": Method(make_pyro(name), f"pyro_iwem build_method({name!r}), K = J = 50 (iwem: alpha < 1)",
                               default=False, group="baselines")
        for name in BASELINES
    },
}


def group(name):
    """The names of ``METHODS`` in a ``--methods`` selection (``baselines`` adds plain IWAE)."""
    return (["plain_iwae"] if name == "baselines" else []) + [n for n, m in METHODS.items() if m.group == name]


# (numerator, denominator, target ratio or None)
RATIOS = [
    ("pyro_iwem_a05", "plain_iwem_a05", 0.95),
    ("pyro_iwem_a1", "plain_iwem_a1", 0.95),
    ("pyro_iwem_a05", "plain_iwae", 1.7),
    ("pyro_iwem_a1", "plain_iwae", 1.7),
    ("pyro_iwem_1pass_a05", "plain_iwae", 1.2),
    ("pyro_iwem_1pass_a1", "plain_iwae", 1.2),
    ("pyro_iwem_a05", "smart_iwem_a05", None),
    ("pyro_iwem_a1", "smart_iwem_a1", None),
    ("pyro_iwem_a05", "smart_iwem_a05_tdist", None),
    ("smart_iwem_a05_tdist", "smart_iwem_a05", None),
    ("smart_iwem_a05", "plain_iwae", None),
    ("smart_iwem_a1", "plain_iwae", None),
    ("plain_iwem_a05", "plain_iwae", None),
    ("plain_iwem_a1", "plain_iwae", None),
] + [(name, "plain_iwae", 1.15 if name == "pyro_dreg" else None) for name in group("baselines")[1:]] + [
    ("pyro_iwem_discrete", "plain_iwem_discrete", None),
    ("pyro_iwae_discrete", "plain_iwae_discrete", None),
    ("pyro_iwem_discrete", "plain_iwae_discrete", None),
    ("pyro_bound_mlp", "plain_bound_mlp", 1.05),
    ("pyro_bound_cnn", "plain_bound_cnn", 1.05),
]


def make_context(args, dtype=torch.float32, seed=0):
    """The batch and the initial networks every implementation copies (``seed`` draws them)."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    x, source = harness.load_batch(args.batch_size, args.device, dtype)
    encoder = ref.Encoder().to(device=args.device, dtype=dtype)
    decoder = ref.Decoder().to(device=args.device, dtype=dtype)
    return ref.Context(x, encoder, decoder, K=args.K, J=args.J, L=1), source


# --------------------------------------------------------------------------------------
# Correctness checks: each plain step computes pyro_iwem's (tests/test_reference_equivalence.py)
# --------------------------------------------------------------------------------------

TOL = {"rtol": 1e-9, "atol": 1e-9}  # losses and gradients on the same particles
#: end to end, two steps from the same weights and seed: a reference -> the plain steps that must match it
END_TO_END = {
    "pyro_iwem_a1": ["plain_iwem_a1", "smart_iwem_a1"],
    "pyro_iwem_a05": ["smart_iwem_a05", "smart_iwem_a05_tdist", "plain_iwem_a05"],
    "pyro_iwem_discrete": ["plain_iwem_discrete"],  # VIMCO P-step, Bernoulli latents
    "pyro_iwae_discrete": ["plain_iwae_discrete"],  # VIMCO IWAE
    "pyro_iwae": ["plain_iwae"],
}


def _grads(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])


def check_proposition_1(ctx):
    """On the same detached samples, ∇θ of the plain Q̂ equals ∇θ of the plain IWAE bound."""
    encoder, decoder = ctx.fresh()
    x, K, theta = ctx.x, ctx.K, list(decoder.parameters())
    with torch.no_grad():
        loc, scale = encoder(x)
        z = ref.draw(loc, scale, K)
        log_q = ref.normal_log_prob(z, loc, scale)
    q_hat_grad = _grads(ref.plain_e_loss(decoder, x, z, log_q, alpha=1.0), theta)
    log_w = ref.log_joint(decoder, x, z) - log_q
    iwae_grad = _grads(-(torch.logsumexp(log_w, 0) - math.log(K)).sum(), theta)
    close(q_hat_grad, iwae_grad, "Prop. 1: grad_theta plain Q_hat == grad_theta plain IWAE bound", **TOL)


def check_shared_particles(ctx, alpha=0.5):
    """On K + L (then J) particles drawn by pyro_iwem's ParticleSampler, the plain log p, log q,
    -Q̂_α (eq. 8), -L_opt (eq. 7) and their θ- and φ-gradients equal pyro_iwem's."""
    encoder, decoder = ctx.fresh()
    x, K, L, J = ctx.x, ctx.K, ctx.L, ctx.J
    theta, phi = list(decoder.parameters()), list(encoder.parameters())
    sampler = ParticleSampler(*pyro_model_and_guide(encoder, decoder, f"check{next(_PYRO_COPIES)}_"))
    particles = sampler(K + L, (x,), {}, grad_guide=False)
    z = particles.guide_trace.nodes["z"]["value"]
    loc, scale = encoder(x)
    log_q = ref.normal_log_prob(z, loc, scale).detach()
    close(particles.log_p, ref.log_joint(decoder, x, z), "log p(x, z) plain vs pyro_iwem", **TOL)
    close(particles.log_q, log_q, "log q(z | x) plain vs pyro_iwem", **TOL)
    pyro_e = -objectives.snis_objective(particles, K, alpha).sum()
    plain_e = ref.plain_e_loss(decoder, x, z[:K], log_q[:K], alpha, z[K:])
    close(pyro_e, plain_e, f"E-step loss -Q_hat_alpha (alpha={alpha}) plain vs pyro_iwem", **TOL)
    close(_grads(pyro_e, theta), _grads(plain_e, theta), "grad_theta of -Q_hat_alpha plain vs pyro_iwem", **TOL)

    particles = sampler(J, (x,), {}, grad_guide=True)
    z = particles.guide_trace.nodes["z"]["value"]  # reparameterised: a function of phi
    pyro_p = -objectives.optimal_proposal_objective(particles).sum()
    loc, scale = encoder(x)
    plain_p = ref.plain_p_loss(decoder, x, z, ref.normal_log_prob(z, loc, scale))
    close(pyro_p, plain_p, "P-step loss -L_opt plain vs pyro_iwem", **TOL)
    close(_grads(pyro_p, phi), _grads(plain_p, phi), "grad_phi of -L_opt plain vs pyro_iwem", **TOL)


def check_end_to_end(ctx, reference, others):
    """From the same weights and RNG seed, two steps of each of ``others`` give the same losses and
    parameters as two steps of ``reference`` (names of ``METHODS``)."""
    finals = {}
    for name in [reference] + others:
        step, modules = METHODS[name].factory(ctx)
        torch.manual_seed(1234)
        losses = [step() for _ in range(2)]
        finals[name] = (losses, torch.cat([p.detach().flatten() for m in modules for p in m.parameters()]))
    for name in others:
        close(torch.tensor(finals[name][0]), torch.tensor(finals[reference][0]),
              f"end to end: 2-step E-losses {name} vs {reference}", rtol=1e-9, atol=1e-7)
        close(finals[name][1], finals[reference][1], f"end to end: params after 2 steps {name} vs {reference}",
              rtol=1e-7, atol=1e-9)


def check_bound(ctx, chunk=16):
    """On the same seed, the plain chunked IWAE bound (K = ``ctx.K``) of a ``pyro_iwem.models``
    MLP VAE of the context's sizes equals ``pyro_iwem.iwae_bound`` in the same chunks."""
    x_dim, h_dim, z_dim = ctx.decoder.dims
    vae = pyro_iwem.models.build_model("mlp", x_dim=x_dim, z_dim=z_dim, hidden=(h_dim, h_dim)).to(ctx.x)
    bounds = []
    for plain in (True, False):
        torch.manual_seed(1234)
        bounds.append(ref.plain_bound(vae, ctx.x, ctx.K, chunk) if plain else
                      pyro_iwem.iwae_bound(vae.model, vae.guide, ctx.x, num_particles=ctx.K, chunk_size=chunk))
    close(*bounds, f"IWAE bound, K = {ctx.K} in chunks of {chunk}: plain_bound vs pyro_iwem.iwae_bound", **TOL)


def check_correctness(args):
    """Runs the checks in float64 on one batch: Proposition 1, the shared particles, every
    ``END_TO_END`` pair (Adam, two steps) and the bound."""
    print("correctness checks (float64, one batch):")
    ctx, _ = make_context(args, dtype=torch.float64, seed=1)
    check_proposition_1(ctx)
    check_shared_particles(ctx)
    for reference, others in END_TO_END.items():
        check_end_to_end(ctx, reference, others)
    check_bound(ctx)
    print()


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=20, help="timed steps per implementation (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first (default 3)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--K", type=int, default=50, help="E-step / IWAE particles (default 50)")
    p.add_argument("--J", type=int, default=50, help="P-step particles (default 50)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all defaults)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory subprocesses")
    p.add_argument("--no-pyro-validation", action="store_true",
                   help="pyro.enable_validation(False) (default: Pyro's default, validation on)")
    p.add_argument("--profile", default=None, metavar="M1,M2",
                   help="instead of timing, print cProfile and torch.profiler summaries of these methods")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_args(args):
    """The command line of a memory subprocess: the options that decide what a step computes."""
    out = ["--device", args.device, "--batch-size", str(args.batch_size), "--K", str(args.K), "--J", str(args.J),
           "--warmup", str(args.warmup)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.no_pyro_validation:
        out.append("--no-pyro-validation")
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_pyro_validation:
        pyro.enable_validation(False)
    pyro.clear_param_store()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")

    if args.memory_child:
        result = harness.memory_child(lambda: METHODS[args.memory_child].factory(make_context(args)[0])[0],
                                      args.device, args.warmup + 3)
        print(json.dumps(result))
        return
    if args.profile:
        ctx, _ = make_context(args)
        harness.profile(args.profile.split(","), lambda name: METHODS[name].factory(ctx)[0], args.warmup, args.device,
                        steps_per=args.profile_steps)
        return

    names = args.methods.split(",") if args.methods else [n for n, m in METHODS.items() if m.default]
    if names in (["baselines"], ["discrete"], ["evaluation"]):
        names = group(names[0])
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {list(METHODS)}")

    if not args.no_check:
        check_correctness(args)

    ctx, source = make_context(args)
    times = harness.time_methods({name: METHODS[name].factory(ctx) for name in names}, args.warmup, args.repeats,
                                 args.device)
    memory = {} if args.no_memory else harness.measure_memory(Path(__file__).resolve(), names, child_args(args))

    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch_size} K={args.K} J={args.J} "
          f"L=1 repeats={args.repeats} warmup={args.warmup} pyro_validation={not args.no_pyro_validation}")
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, python {platform.python_version()}; data: {source}")
    print()
    results = harness.summarize(times, memory)
    harness.print_table(results, {name: METHODS[name].description for name in names}, args.device)
    print()
    ratios = harness.print_ratios(results, RATIOS)
    if args.json:
        harness.write_json(args.json, {
            "config": {k: v for k, v in vars(args).items() if k != "memory_child"},
            "threads": torch.get_num_threads(), "torch": torch.__version__, "pyro": pyro.__version__,
            "data": source, "methods": results, "ratios": ratios,
        })


if __name__ == "__main__":
    main()
