"""Train a deep latent-variable model with IWEM, the way you would with SVI.

    python examples/train_iwem.py                    # about 2 minutes on 2 CPU cores
    python examples/train_iwem.py --data-root DIR    # or PYRO_IWEM_DATA=DIR
    python examples/train_iwem.py --epochs 10 --max-train 50000 --K 50 --J 50 --out runs/longer

Uses Larochelle's statically binarised MNIST from the data root (``--data-root``,
``PYRO_IWEM_DATA``, else ``shared/data`` or ``../shared/data`` when one exists), else
scikit-learn's bundled 8x8 digits, binarised (``--dataset digits-8x8`` chooses them). A data root
that is given but does not exist is an error. Prints what it does at each stage, with progress
bars and their ETA, then the test log-likelihood (IWAE bound with ``--eval-K`` samples on
``--max-test`` test images drawn at random), and saves the run in ``--out``: ``best.pt`` and
``metrics.json``, which ``python -m pyro_iwem evaluate RUN_DIR`` scores again (e.g. with more
samples) and ``python -m pyro_iwem table`` tabulates.
"""

import argparse
import os
import pathlib
import sys
import time

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
import torch.nn as nn
from tqdm import tqdm

from pyro_iwem import IWEM, Annealing, iwae_bound
from pyro_iwem.data import DataFileError


# ---------------------------------------------------------------- your model and guide
class Encoder(nn.Module):
    def __init__(self, x_dim, z_dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.loc = nn.Linear(hidden, z_dim)
        self.scale = nn.Sequential(nn.Linear(hidden, z_dim), nn.Softplus())

    def forward(self, x):
        h = self.net(x)
        return self.loc(h), self.scale(h) + 1e-4


def make_model_and_guide(x_dim, z_dim=40, hidden=300):
    decoder = nn.Sequential(
        nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, x_dim)
    )
    encoder = Encoder(x_dim, z_dim, hidden)

    def model(x):  # p(x, z; θ): z ~ N(0, I), x | z ~ Bernoulli(decoder(z))
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):  # q(z | x; φ): a Gaussian proposal
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(*encoder(x)).to_event(1))

    return model, guide, nn.ModuleDict({"encoder": encoder, "decoder": decoder})


# ---------------------------------------------------------------- the command line
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")  # one line
    parser.add_argument("--data-root", default=None, help="data directory (default: $PYRO_IWEM_DATA, else shared/data nearby)")
    parser.add_argument("--dataset", choices=("static-mnist", "digits-8x8"),
                        help="default: static-mnist when a data root exists, else digits-8x8")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-train", type=int, default=10000, help="the first N training images (default 10000)")
    parser.add_argument("--max-test", type=int, default=500,
                        help="N test images drawn at random, seeded by --seed (default 500)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--K", type=int, default=20, help="E-step importance samples (default 20; the paper's 50)")
    parser.add_argument("--J", type=int, default=20, help="P-step samples (default 20; the paper's 50)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3, for a short run; the paper's 5e-4)")
    parser.add_argument("--eval-K", type=int, default=1000, help="samples of the test IWAE bound (default 1000)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a busy 2-core machine one thread ran a step 3x faster than two)")
    parser.add_argument("--out", default="runs/train-iwem", help="the run directory to save (default runs/train-iwem)")
    parser.add_argument("--force", action="store_true", help="replace a run already saved in --out")
    args = parser.parse_args(argv)
    given = args.data_root if args.data_root is not None else os.environ.get("PYRO_IWEM_DATA") or None
    if given is not None and not pathlib.Path(given).expanduser().is_dir():
        where = "--data-root" if args.data_root is not None else "PYRO_IWEM_DATA"
        parser.error(f"{where} {given} does not exist (leave it out to use the data root found nearby, or "
                     "--dataset digits-8x8 for the bundled 8x8 digits)")
    if (pathlib.Path(args.out) / "metrics.json").exists() and not args.force:
        parser.error(f"--out {args.out} holds a finished run; give another --out or --force to replace it")
    return parser, args


def load(args):
    """The data set, as the ``pyro-iwem`` runs load it, and the run's configuration."""
    from pyro_iwem.data import data_root_exists
    from pyro_iwem.experiments.setup import CONFIG_KEYS, TRAIN_DEFAULTS, data_root, load_data

    dataset = args.dataset or ("static-mnist" if data_root_exists(args.data_root) else "digits-8x8")
    root = data_root(args.data_root)
    config = {key: TRAIN_DEFAULTS.get(key) for key in CONFIG_KEYS} | {
        "dataset": dataset, "model": "mlp", "method": "iwem", "K": args.K, "J": args.J, "lr": args.lr,
        "batch_size": args.batch_size, "seed": args.seed, "data_seed": args.seed, "max_train": args.max_train,
        "max_eval": args.max_test, "eval_batch_size": args.batch_size, "p_step_inflation": 1.0, "log_p_offset": 0.0,
    }
    if dataset == "digits-8x8":
        print("[1/3] loading scikit-learn's 8x8 digits (no data root found; --data-root DIR for MNIST)", flush=True)
    else:
        print(f"[1/3] loading {dataset} from {root}", flush=True)
    return load_data(config, root), config, root


# ---------------------------------------------------------------- training
def main(argv=None):
    from pyro_iwem.experiments.checkpoint import RunDirLock
    from pyro_iwem.experiments.errors import RunError

    parser, args = parse_args(argv)
    start = time.perf_counter()
    lock = RunDirLock(args.out)
    try:
        lock.acquire()  # a second run on the same --out stops here
    except RunError as e:
        parser.error(str(e))
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        data, config, root = load(args)
    except DataFileError as e:
        parser.error(str(e))
    print(f"      {len(data.train)} training images, {len(data.test)} test images of {data.image_shape}", flush=True)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()

    model, guide, networks = make_model_and_guide(data.num_pixels)
    networks.to(device)
    batches = data.num_batches("train", args.batch_size)
    steps = args.epochs * batches
    # α grows from 0 to 1 over the first half of training (the paper: +0.01 per epoch)
    annealing = Annealing.over(max(1, steps // 2))
    iwem = IWEM(model, guide, K=args.K, J=args.J, optim=pyro.optim.Adam({"lr": args.lr}), annealing=annealing)

    print(f"[2/3] training with IWEM (K={args.K}, J={args.J}) on {device}: {args.epochs} epochs of {batches} "
          f"batches of {args.batch_size}, α from 0 to 1 over the first half", flush=True)
    train_start = time.perf_counter()
    bar = tqdm(total=steps, desc="training", unit="step", dynamic_ncols=True, file=sys.stderr)
    for epoch in range(args.epochs):
        for x in data.batches("train", args.batch_size, epoch=epoch, seed=args.seed, device=device):
            iwem.step(x)
            bar.update()
            bar.set_postfix(epoch=f"{epoch + 1}/{args.epochs}", bound=f"{iwem.bound:.2f}", alpha=f"{iwem.alpha:.2f}",
                            ess=f"{iwem.ess:.1f}", refresh=False)
    bar.close()
    train_seconds = time.perf_counter() - train_start

    print(f"[3/3] test log-likelihood: the IWAE bound with K={args.eval_K} samples on {len(data.test)} test images",
          flush=True)
    eval_start = time.perf_counter()
    pyro.set_rng_seed(args.seed)
    with torch.no_grad():
        test = tqdm(data.batches("test", args.batch_size, device=device), total=data.num_batches("test", args.batch_size),
                    desc="test LL", unit="batch", dynamic_ncols=True, file=sys.stderr)
        test_ll = torch.cat([iwae_bound(model, guide, x, num_particles=args.eval_K) for x in test]).mean().item()
    eval_seconds = time.perf_counter() - eval_start
    print(f"trained {args.epochs} epochs in {train_seconds:.0f} s; evaluated in {eval_seconds:.0f} s")
    print(f"test log-likelihood (IWAE bound, K={args.eval_K}): {test_ll:.2f} nats")

    save_run(args, config, root, networks, data, annealing, test_ll, train_seconds, eval_seconds, time.perf_counter() - start)
    lock.release()
    print(f"saved the run in {args.out} ({time.perf_counter() - start:.0f} s in all); score it again with "
          f"`python -m pyro_iwem evaluate {args.out} --K 5000`")
    return test_ll


def save_run(args, config, root, networks, data, annealing, test_ll, train_seconds, eval_seconds, wall_seconds):
    """``best.pt`` and ``metrics.json`` in ``args.out``, as ``pyro-iwem train`` writes them: the
    networks are those of the package's ``mlp`` model (``MLPVAE``, the same layers in the same
    order), so that ``pyro-iwem evaluate`` rebuilds the model and reloads them."""
    from pyro_iwem.experiments.checkpoint import BEST, METRICS, atomic_torch_save, atomic_write_json
    from pyro_iwem.experiments.evaluate import score_key
    from pyro_iwem.models import MLPVAE

    target = MLPVAE(data.num_pixels).state_dict()
    ours = [value.detach().cpu() for value in networks.state_dict().values()]
    assert [tuple(v.shape) for v in target.values()] == [tuple(v.shape) for v in ours], "not the mlp model's layers"
    state = dict(zip(target, ours))
    a = annealing
    note = f"examples/train_iwem.py: α +{a.increment:.4g} every {a.every} steps; the final parameters, no validation"
    config = dict(config, anneal_increment=a.increment * data.num_batches("train", args.batch_size) / a.every)  # per epoch
    metrics = {
        **config, "test_ll": test_ll, score_key(args.eval_K): test_ll, "best_valid_ll": None, "best_epoch": args.epochs,
        "epochs": args.epochs, "max_epochs": args.epochs, "eval_K": args.eval_K, "n_train": len(data.train),
        "n_test": len(data.test), "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "seconds_per_epoch": train_seconds / args.epochs, "wall_seconds": wall_seconds, "threads": args.threads,
        "data_root": str(root), "note": note,
    }
    out = pathlib.Path(args.out)
    atomic_torch_save({"model": state, "config": config, "epoch": args.epochs, "valid_ll": None,
                       "data_root": args.data_root}, out / BEST)
    atomic_write_json(metrics, out / METRICS)


if __name__ == "__main__":
    main()
