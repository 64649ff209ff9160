"""What a run is made of: its configuration, data, model and inference method."""

import dataclasses
import math
import os

import numpy as np

import pyro.optim
import torch

from pyro_iwem.data import load_images, resolve_data_root
from pyro_iwem.data.files import DATA_ENV_VAR
from pyro_iwem.data.rng import numpy_generator
from pyro_iwem.distributed import DistributedOptim
from pyro_iwem.infer import MISSING_DATA_INPUTS, Annealing, build_method
from pyro_iwem.infer.methods import IWEM_METHODS, SPECS
from pyro_iwem.models import build_model
from pyro_iwem.models.layers import SCALE_LINKS

from .errors import RunError

DATASETS = ("static-mnist", "dynamic-mnist", "omniglot", "caltech101", "digits-8x8")
MODELS = ("mlp", "mlp2", "cnn", "cnn-light")
# What these say of each method comes from its specification (pyro_iwem.infer.methods.SPECS).
#: The paper's order of methods (Table 1), then this project's one-pass IWEM.
METHOD_ORDER = tuple(spec.name for spec in SPECS if not spec.missing_data)
#: Methods for data with missing entries (Table 3), in the paper's order.
MISSING_METHOD_ORDER = tuple(spec.name for spec in SPECS if spec.missing_data)
#: Every method of the command line, in the order of the paper's tables.
ALL_METHOD_ORDER = METHOD_ORDER + MISSING_METHOD_ORDER
#: Methods that use J (the others draw only K particles).
USES_J = tuple(spec.name for spec in SPECS if spec.uses_J)
#: Methods with IWEM's optimal P-step (eq. 7), whose |log p| ``--log-p-offset`` shifts.
OPTIMAL_P_STEP = tuple(spec.name for spec in SPECS if spec.optimal_p_step)
#: Models whose encoder scale ``--encoder-scale`` chooses (:data:`~pyro_iwem.models.layers.SCALE_LINKS`).
MLP_MODELS = ("mlp", "mlp2")
#: The protocols of ``train --protocol`` (docs/protocols.md): the paper's, and the authors' code's.
PROTOCOLS = ("paper", "official")

#: Settings that define a run: a resumed run must have the same values.
CONFIG_KEYS = (
    "dataset",
    "model",
    "method",
    "K",
    "J",
    "L",
    "lr",
    "anneal_increment",
    "anneal_start",
    "batch_size",
    "seed",
    "data_seed",
    "max_train",
    "max_eval",
    "eval_subset",
    "missing_patches",
    "valid_K",
    "eval_batch_size",
    "protocol",
    "proposal_inflation",
    "p_step_inflation",
    "score_inflation",
    "log_p_offset",
    "encoder_scale",
)

#: What the keys added after the first runs (``--protocol``'s, ``--anneal-start``, ``--L``,
#: ``eval_subset``) meant for the runs made before them (the paper's protocol; ``--max-eval``
#: kept the first validation and test images): a checkpoint without them resumes, and is
#: evaluated, with these.
LEGACY_CONFIG = {
    "L": 1,
    "eval_subset": "first",
    "anneal_start": 0.0,
    "protocol": "paper",
    "proposal_inflation": 1.0,
    "p_step_inflation": 1.0,
    "score_inflation": 1.0,
    "log_p_offset": 0.0,
    "encoder_scale": None,
}

#: Defaults of the ``train`` options (the paper's protocol, §5). The parser's defaults are
#: ``None`` so that ``--resume`` can tell given options from omitted ones: omitted options
#: take the checkpoint's values when resuming and these defaults otherwise.
TRAIN_DEFAULTS = {
    "dataset": None,
    "model": "mlp",
    "method": "iwem",
    "K": 50,
    "J": 50,
    "L": 1,
    "epochs": 1500,
    "batch_size": 100,
    "lr": 5e-4,
    "anneal_increment": 0.01,
    "anneal_start": 0.0,
    "seed": 1234,
    "data_seed": 1234,
    "device": "auto",
    "max_train": None,
    "max_eval": None,
    "eval_subset": "random",  # which validation and test images --max-eval keeps (not an option)
    "missing_patches": 0,
    "eval_K": 5000,
    "valid_K": 100,
    "eval_batch_size": 100,
    "eval_memory": 1.0,  # GiB; a setting of the machine, not of the run (not in CONFIG_KEYS)
    "patience": 50,
    "threads": None,
    "data_root": None,
    "record_variance": 0,
    "variance_repeats": 100,
    "protocol": "paper",
    "proposal_inflation": 1.0,
    "p_step_inflation": None,  # the same as proposal_inflation
    "score_inflation": 1.0,
    "log_p_offset": None,  # the protocol's: 0 for the paper, see protocol_log_p_offset
    "encoder_scale": None,  # the model's own: softplus for the MLPs, the CNN's clamped log-variance
}


def protocol_defaults(protocol, method, model):
    """:data:`TRAIN_DEFAULTS` with the settings ``protocol`` gives a run of ``method`` on ``model``.

    ``"paper"`` is :data:`TRAIN_DEFAULTS`. ``"official"`` is the authors' code (MLE_Analysis.py,
    Models_Calculate.py, Models_MLP.py): Adam with lr 3e-4; validation by the IWAE bound with
    the training K (``valid_K`` left ``None``: 50 at the default K); validation and test scored with the proposal's variance × 1.5, for every method;
    for the IWEM methods, the E-step's importance samples and the P-step's samples drawn
    with variance × 1.5 too (but IWEM-woo's IWAE P-step un-inflated, as there); the MLP
    encoders' scale ``exp(logvar / 2)``, unclamped. The optimal P-step's offset depends on
    the model (:func:`protocol_log_p_offset`) and is left ``None`` here.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    defaults = dict(TRAIN_DEFAULTS, protocol=protocol)
    if protocol == "official":
        defaults.update(lr=3e-4, valid_K=None, score_inflation=1.5)
        if method in IWEM_METHODS:
            defaults.update(proposal_inflation=1.5, p_step_inflation=1.0 if method == "iwem-woo" else None)
        if model in MLP_MODELS:
            defaults["encoder_scale"] = "exp"
    return defaults


def protocol_log_p_offset(protocol, method, model):
    r"""The constant :math:`c` of the optimal P-step's :math:`|\log p + c|` under ``protocol``
    for ``method`` and a built ``model``: 0 for the paper (eq. 7); for the official code,
    which computes :math:`\log p` without the Gaussian normalising constants, the ones it
    leaves out, :math:`c = \frac{d}{2} \log 2\pi` with d = ``model.latent_size`` (36.76 for the
    40-d latent of the MLP and CNN). Its other dropped constant, the Bernoulli's
    :math:`\log(\mu + 10^{-5})` in place of :math:`\log \mu`, is not reproduced."""
    if protocol == "official" and method in OPTIMAL_P_STEP:
        return model.latent_size / 2 * math.log(2 * math.pi)
    return 0.0

# Our models have one plate over data points, named "data". Passing this explicitly spares
# the samplers a guessing run of the guide, which would draw random numbers at the first
# step (and so at a different moment in a resumed run than in an uninterrupted one).
PLATES = {"max_plate_nesting": 1, "data_plate": "data"}


def run_config(args):
    """The :data:`CONFIG_KEYS` of parsed arguments, as a plain dict."""
    return {key: getattr(args, key) for key in CONFIG_KEYS}


def data_root(root=None):
    """The data root: ``root``, else ``$PYRO_IWEM_DATA``, else :func:`resolve_data_root`."""
    if root is None:
        root = os.environ.get(DATA_ENV_VAR) or None
    return resolve_data_root(root)


def resolve_device(name):
    """A :class:`torch.device` (``"auto"``: CUDA if available, else the CPU); :class:`RunError`
    if CUDA is asked for but not available."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was given but CUDA is not available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise RunError(f"bad --device {name!r}: {e}") from None


def check_missing_data(config):
    """:class:`RunError` unless ``--missing-patches`` and a method for missing data go together."""
    patches, method = config.get("missing_patches") or 0, config["method"]
    if patches and method not in MISSING_DATA_INPUTS:
        raise RunError(f"--missing-patches needs a method for missing data ({', '.join(MISSING_METHOD_ORDER)}), not {method}")
    if method in MISSING_DATA_INPUTS and not patches:
        raise RunError(f"--method {method} is for data with missing entries: give --missing-patches N (1-9)")
    if patches > 9:
        raise RunError(f"--missing-patches must be at most 9 (a 3x3 grid of patches), got {patches}")


#: The stream of :func:`~pyro_iwem.data.rng.numpy_generator` that draws ``--max-eval``'s images.
EVAL_SUBSET_STREAM = 7


def eval_subset(data, max_eval, seed):
    """``data`` with ``max_eval`` validation and ``max_eval`` test images drawn at random
    without replacement (each split from its own stream seeded by ``seed``), kept in their order."""
    if max_eval is None:
        return data
    chosen = {}
    for number, split in enumerate(("valid", "test")):
        images = data.split(split)
        if max_eval < len(images):
            index = numpy_generator(seed, EVAL_SUBSET_STREAM, number).choice(len(images), max_eval, replace=False)
            images = images[torch.from_numpy(np.sort(index))]
        chosen[split] = images
    return dataclasses.replace(data, **chosen)


def load_data(config, root=None):
    """The config's :class:`~pyro_iwem.data.ImageData` (may raise ``DataFileError``); with
    ``missing_patches``, the training images miss that many patches each (seeded by ``data_seed``).

    ``max_train`` keeps the first training images; ``max_eval`` keeps a random subset of the
    validation and test images (:func:`eval_subset`, seeded by ``data_seed``), or, for runs
    made before it did (``eval_subset`` ``"first"``), the first ones."""
    first = config.get("eval_subset", LEGACY_CONFIG["eval_subset"]) == "first"
    data = load_images(
        config["dataset"],
        data_root(root),
        max_train=config["max_train"],
        max_eval=config["max_eval"] if first else None,
        seed=config["data_seed"],
    )
    if not first:
        data = eval_subset(data, config["max_eval"], config["data_seed"])
    if config.get("missing_patches"):
        data = data.with_missing_patches(config["missing_patches"], config["data_seed"])
    return data


def make_model(config, data, device):
    """The config's model for ``data`` (and ``encoder_scale``, for the MLPs), on ``device``."""
    name, scale = config["model"], config.get("encoder_scale")
    if scale is not None and name not in MLP_MODELS:
        raise ValueError(
            f"--encoder-scale is an option of the MLP models ({', '.join(MLP_MODELS)}), not of {name}, whose encoder "
            "scale is its own (the CNN's exp(logvar / 2) with logvar clamped to [-6, 2])"
        )
    if scale is not None and scale not in SCALE_LINKS:
        raise ValueError(f"--encoder-scale must be one of {', '.join(SCALE_LINKS)}, got {scale!r}")
    if name in ("cnn", "cnn-light"):
        model = build_model(name, image_shape=data.image_shape)
    else:
        options = {} if scale is None else {"encoder_scale": scale}
        model = build_model(name, x_dim=data.num_pixels, train_mean=data.train_mean(), **options)
    return model.to(device)


def make_method(config, model, annealing=None, distributed=False):
    """The config's inference method (keys ``method``, ``K``, ``J``, ``lr`` and IWEM's ``L``,
    ``proposal_inflation``, ``p_step_inflation``, ``log_p_offset``), with Adam and
    ``annealing``, by default the paper's per-epoch schedule (+``anneal_increment`` per epoch,
    from ``anneal_start``); with ``distributed``, Adam averages the gradients over the
    processes first (:class:`~pyro_iwem.distributed.DistributedOptim`)."""
    if annealing is None:
        start = config.get("anneal_start", 0.0)
        annealing = Annealing(config.get("anneal_increment", 0.01), every=1, start=start, unit="epoch")
    optim = pyro.optim.Adam({"lr": config["lr"]})
    return build_method(
        config["method"],
        model.model,
        model.guide,
        K=config["K"],
        J=config["J"],
        L=config.get("L", 1),
        optim=DistributedOptim(optim) if distributed else optim,
        annealing=annealing,
        proposal_inflation=config.get("proposal_inflation", 1.0),
        p_step_inflation=config.get("p_step_inflation"),
        log_p_offset=config.get("log_p_offset") or 0.0,
        **PLATES,
    )


def run_name(dataset, model, method, K, J, seed):
    """The directory name of one run of a sweep."""
    return f"{dataset}-{model}-{method}-K{K}-J{J}-s{seed}"
