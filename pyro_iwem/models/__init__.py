"""The paper's models as Pyro model/guide pairs.

Each model is an ``nn.Module`` with ``model(x, mask=None)`` (p(x, z; θ), parameters
registered as ``"decoder"``) and ``guide(x, mask=None)`` (q(z | x; φ), registered as
``"encoder"``), ``z_dim`` and ``sample(n)``.
"""

from .conv import ConvVAE, ConvVAELight
from .tabular import TabularVAE
from .vae import MLPVAE, MLPVAE2, VAE

#: The model classes by name, as :func:`build_model` and ``pyro-iwem train --model`` know them.
MODELS = {"mlp": MLPVAE, "mlp2": MLPVAE2, "cnn": ConvVAE, "cnn-light": ConvVAELight, "tabular": TabularVAE}


def build_model(name, **kwargs):
    """Construct a model by name: ``"mlp"``, ``"mlp2"``, ``"cnn"`` (the paper's CNN),
    ``"cnn-light"`` or ``"tabular"``; ``kwargs`` go to the constructor."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return cls(**kwargs)


__all__ = ["MLPVAE", "MLPVAE2", "MODELS", "VAE", "ConvVAE", "ConvVAELight", "TabularVAE", "build_model"]
