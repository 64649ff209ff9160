"""What a run is made of: its configuration, data, model and inference method."""

import os

import pyro.optim
import torch

from pyro_iwem.data import load_images, resolve_data_root
from pyro_iwem.data.files import DATA_ENV_VAR
from pyro_iwem.infer import MISSING_DATA_INPUTS, Annealing, build_method
from pyro_iwem.models import build_model

from .errors import RunError

DATASETS = ("static-mnist", "dynamic-mnist", "omniglot", "caltech101", "digits-8x8")
MODELS = ("mlp", "mlp2", "cnn", "cnn-light")
#: The paper's order of methods (Table 1), then this project's one-pass IWEM.
METHOD_ORDER = ("vae", "iwae", "stl", "dreg", "iwae-em", "iwem-woo", "iwem-woa", "iwem", "iwem-one-pass")
#: Methods for data with missing entries (Table 3), in the paper's order.
MISSING_METHOD_ORDER = ("miss-iwae", "miss-iwem-woa", "miss-iwem")
#: Every method of the command line, in the order of the paper's tables.
ALL_METHOD_ORDER = METHOD_ORDER + MISSING_METHOD_ORDER
#: Methods that use J (the others draw only K particles).
USES_J = ("iwae-em", "iwem", "iwem-woo", "iwem-woa", "miss-iwem", "miss-iwem-woa")

#: Settings that define a run: a resumed run must have the same values.
CONFIG_KEYS = (
    "dataset",
    "model",
    "method",
    "K",
    "J",
    "lr",
    "anneal_increment",
    "batch_size",
    "seed",
    "data_seed",
    "max_train",
    "max_eval",
    "missing_patches",
    "valid_K",
    "eval_batch_size",
)

#: Defaults of the ``train`` options (the paper's protocol, §5). The parser's defaults are
#: ``None`` so that ``--resume`` can tell given options from omitted ones: omitted options
#: take the checkpoint's values when resuming and these defaults otherwise.
TRAIN_DEFAULTS = {
    "dataset": None,
    "model": "mlp",
    "method": "iwem",
    "K": 50,
    "J": 50,
    "epochs": 1500,
    "batch_size": 100,
    "lr": 5e-4,
    "anneal_increment": 0.01,
    "seed": 1234,
    "data_seed": 1234,
    "device": "auto",
    "max_train": None,
    "max_eval": None,
    "missing_patches": 0,
    "eval_K": 5000,
    "valid_K": 100,
    "eval_batch_size": 100,
    "patience": 50,
    "threads": None,
    "data_root": None,
    "record_variance": 0,
    "variance_repeats": 100,
}

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


def load_data(config, root=None):
    """The config's :class:`~pyro_iwem.data.ImageData` (may raise ``DataFileError``); with
    ``missing_patches``, the training images miss that many patches each (seeded by ``data_seed``)."""
    data = load_images(
        config["dataset"],
        data_root(root),
        max_train=config["max_train"],
        max_eval=config["max_eval"],
        seed=config["data_seed"],
    )
    if config.get("missing_patches"):
        data = data.with_missing_patches(config["missing_patches"], config["data_seed"])
    return data


def make_model(config, data, device):
    """The config's model for ``data``, on ``device``."""
    name = config["model"]
    if name in ("cnn", "cnn-light"):
        model = build_model(name, image_shape=data.image_shape)
    else:
        model = build_model(name, x_dim=data.num_pixels, train_mean=data.train_mean())
    return model.to(device)


def make_method(config, model, annealing=None):
    """The config's inference method (keys ``method``, ``K``, ``J``, ``lr``), with Adam and
    ``annealing``, by default the paper's per-epoch schedule (+``anneal_increment`` per epoch)."""
    if annealing is None:
        annealing = Annealing(config.get("anneal_increment", 0.01), every=1, unit="epoch")
    return build_method(
        config["method"],
        model.model,
        model.guide,
        K=config["K"],
        J=config["J"],
        optim=pyro.optim.Adam({"lr": config["lr"]}),
        annealing=annealing,
        **PLATES,
    )


def run_name(dataset, model, method, K, J, seed):
    """The directory name of one run of a sweep."""
    return f"{dataset}-{model}-{method}-K{K}-J{J}-s{seed}"
