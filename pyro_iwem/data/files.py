"""Locating, verifying and caching the local data files.

Nothing here downloads: every loader reads a file below the *data root* (see
:func:`resolve_data_root`) and checks its sha256 against :data:`CHECKSUMS` before
parsing it. Derived arrays that are slow to build (Omniglot at 28x28) are cached below
the *cache directory* (see :func:`resolve_cache_dir`).
"""

import hashlib
import os
import pathlib
import warnings

import numpy as np

from pyro_iwem.atomic import atomic_path

DATA_ENV_VAR = "PYRO_IWEM_DATA"
CACHE_ENV_VAR = "PYRO_IWEM_CACHE"

#: sha256 of every data file, keyed by its path relative to the data root
#: (the table in ``data/README.md``).
CHECKSUMS = {
    "mnist/train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "mnist/train-labels-idx1-ubyte.gz": "ec02e7948609e5754d47881c09b8afdd8dfa60600b9e5388c8c54a67069ec772",
    "mnist/t10k-images-idx3-ubyte.gz": "167310007f03058885c7e95e6c0b19c20de5c7fd3031f4cbdadc9014a523d80b",
    "mnist/t10k-labels-idx1-ubyte.gz": "fc607395669ec21321ea83e4b82c0544b7e8e63ff5b34337c06bc0a17cc0da3c",
    "binarized_mnist/binarized_mnist_train.amat.gz": "af247bd6075cf9adc4715459dcd5f13eaa99a2c92d8d81379a05da94770b6c0e",
    "binarized_mnist/binarized_mnist_valid.amat.gz": "533b71bc0198f4d73c54ae5fe6c96fc08dc3cf1b3fae24c5521dbc0452507e38",
    "binarized_mnist/binarized_mnist_test.amat.gz": "32a3c54d03504632bf9f131b4a148c7567aa6fc87da017049b044bdc14c2a0f2",
    "omniglot/images_background.zip": "69c21a3ba223676da9d78c5900e3e544e3a4a41c32dc501cc9c25503adde9106",
    "omniglot/images_evaluation.zip": "f46c7656511f067093b8bf65c0a8fa2cd8ffa30f835b609e76705c59f85861f0",
    "caltech101_silhouettes/caltech101_silhouettes_28_split1.mat": "eb6735e8d84b1850fabc5590124aab1755e90c9fd28123585324398405e1e42a",
    "uci/banknote/data_banknote_authentication.txt": "63cb547740b3d71fc4a7fa05a6f5005ba63e86a64d2dfb11251398611fb7b19c",
    "uci/wine_quality/winequality-red.csv": "4a402cf041b025d4566d954c3b9ba8635a3a8a01e039005d97d6a710278cf05e",
    "uci/wine_quality/winequality-white.csv": "76c3f809815c17c07212622f776311faeb31e87610d52c26d87d6e361b169836",
    "uci/breast_cancer_wisconsin/wdbc.data": "d606af411f3e5be8a317a5a8b652b425aaf0ff38ca683d5327ffff94c3695f4a",
}

_HOW_TO_SET_ROOT = (
    "Point the loaders at the data directory with the --data-root flag, the `root=` "
    f"argument, or the {DATA_ENV_VAR} environment variable."
)

# (resolved path, size, mtime_ns) of files whose checksum has already been verified.
_VERIFIED = set()


class DataFileError(OSError):
    """A data file is missing or corrupt (its sha256 does not match :data:`CHECKSUMS`).

    The message names the file, its expected sha256, the directory searched and how to
    point the loaders at another data root.
    """


class MissingDataFileError(DataFileError, FileNotFoundError):
    """A data file does not exist below the data root."""


def _default_roots():
    """Candidate data roots, in the order :func:`resolve_data_root` tries them."""
    repo = pathlib.Path(__file__).resolve().parents[2]
    return [
        pathlib.Path("shared", "data").absolute(),
        pathlib.Path("..", "shared", "data").absolute(),
        repo.parent / "shared" / "data",
    ]


def _setting(explicit, env_var):
    """A directory given explicitly, else by the environment variable ``env_var``, else ``None``."""
    value = explicit if explicit is not None else os.environ.get(env_var) or None
    return None if value is None else pathlib.Path(value).expanduser()


def resolve_data_root(root=None):
    """Return the data root directory.

    Order: the explicit ``root`` argument, then the ``PYRO_IWEM_DATA`` environment
    variable, then the first existing of ``./shared/data`` and ``../shared/data``
    (relative to the working directory) and ``<repo>/../shared/data`` (relative to this
    package). If none exists the first default candidate is returned anyway; loaders then
    raise :class:`DataFileError` naming it.

    :param root: an explicit directory (``str`` or ``os.PathLike``), or ``None``.
    :rtype: pathlib.Path
    """
    chosen = _setting(root, DATA_ENV_VAR)
    if chosen is not None:
        return chosen
    candidates = _default_roots()
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[0]


def data_root_exists(root=None):
    """Whether :func:`resolve_data_root` finds an existing directory."""
    return resolve_data_root(root).is_dir()


def sha256sum(path, chunk_size=1 << 20):
    """Hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_file(relpath, root=None):
    """Return the path of a data file after checking that it exists and is intact.

    The checksum of each file is computed once per process (memoised on its path, size
    and modification time).

    :param str relpath: path relative to the data root, a key of :data:`CHECKSUMS`.
    :param root: data root, see :func:`resolve_data_root`.
    :raises DataFileError: if the file is missing or its sha256 does not match.
    :rtype: pathlib.Path
    """
    if relpath not in CHECKSUMS:
        raise KeyError(f"{relpath!r} is not a known data file; known: {sorted(CHECKSUMS)}")
    expected = CHECKSUMS[relpath]
    root = resolve_data_root(root)
    path = root / relpath
    if not path.is_file():
        where = f"in {root}" if root.is_dir() else f"because the data root {root} does not exist"
        raise MissingDataFileError(
            f"Data file {relpath} (sha256 {expected}) was not found {where}. "
            + _HOW_TO_SET_ROOT
        )
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        actual = sha256sum(path)
        if actual != expected:
            raise DataFileError(
                f"Data file {path} is corrupt: sha256 {actual}, expected {expected} "
                f"(searched the data root {root}). Replace it with an intact copy. "
                + _HOW_TO_SET_ROOT
            )
        _VERIFIED.add(key)
    return path


def resolve_cache_dir(cache_dir=None):
    """Return the directory for derived arrays (it need not exist yet).

    Order: the explicit ``cache_dir`` argument, then the ``PYRO_IWEM_CACHE`` environment
    variable, then ``$XDG_CACHE_HOME/pyro_iwem``, then ``~/.cache/pyro_iwem``.

    :rtype: pathlib.Path
    """
    chosen = _setting(cache_dir, CACHE_ENV_VAR)
    if chosen is not None:
        return chosen
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    return base / "pyro_iwem"


def save_npz_atomic(path, **arrays):
    """Write ``arrays`` to a compressed ``.npz`` at ``path`` atomically.

    The arrays go to a temporary file in the same directory, which is then renamed over
    ``path`` with :func:`os.replace`, so readers never see a partial file. Failures to
    write (read-only or full disk) only warn: a cache is an optimisation.

    :returns: whether the file was written.
    """
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        return True
    except OSError as e:
        warnings.warn(f"could not write the cache file {path}: {e}", RuntimeWarning)
        return False
