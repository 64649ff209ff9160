"""Loaders for the binary image benchmarks of the paper (§5) and a no-data fallback.

===============  ============================  ========================  ==========
name             source files                  train / valid / test      binarised
===============  ============================  ========================  ==========
static-mnist     Larochelle's ``.amat.gz``     50,000 / 10,000 / 10,000  fixed
dynamic-mnist    MNIST idx files               50,000 / 10,000 / 10,000  train: every epoch
omniglot         Lake's PNG zips (approx.)     21,911 / 2,434 / 8,115    train: every epoch
caltech101       Marlin's split 1 ``.mat``     4,100 / 2,264 / 2,307     fixed
digits-8x8       scikit-learn's bundled digits 1,297 / 250 / 250         fixed
===============  ============================  ========================  ==========

Dynamic MNIST follows the IWAE protocol: train is the first 50,000 training images,
validation the last 10,000, test the 10,000 t10k images; validation and test are
binarised once with streams seeded from ``seed``.
"""

import gzip

import numpy as np
import torch

from .files import DataFileError, data_file
from .images import ImageData, binarize_eval_splits
from .omniglot import load_omniglot
from .rng import numpy_generator

_IDX_IMAGES_MAGIC = 2051


def read_idx_images(path):
    """Read a gzipped idx3 image file as a uint8 array of shape ``(N, rows * cols)``."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = (int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(4))
    if magic != _IDX_IMAGES_MAGIC or len(raw) != 16 + n * rows * cols:
        raise DataFileError(f"{path} is not an idx3 image file (magic {magic}, {len(raw)} bytes)")
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows * cols)


def read_amat(path, num_columns=784):
    """Read a gzipped ``.amat`` text file of 0/1 values as a uint8 array ``(N, num_columns)``.

    Parses the bytes directly (much faster than :func:`numpy.loadtxt`): every value must
    be a single ``0`` or ``1`` digit, one image per line.
    """
    with gzip.open(path, "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8)
    is_digit = (raw == ord("0")) | (raw == ord("1"))
    is_space = (raw == ord(" ")) | (raw == ord("\n")) | (raw == ord("\r")) | (raw == ord("\t"))
    values = raw[is_digit] - ord("0")
    num_rows = int(np.count_nonzero(raw == ord("\n"))) + (len(raw) > 0 and raw[-1] != ord("\n"))
    if not (is_digit | is_space).all() or values.size != num_rows * num_columns:
        raise DataFileError(
            f"{path} is not a 0/1 .amat file with {num_columns} values per line"
        )
    return values.reshape(num_rows, num_columns)


def _as_float(array):
    """A numpy array as a float32 torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def load_static_mnist(root=None, seed=1234):
    """Larochelle & Murray's statically binarised MNIST, 50k / 10k / 10k.

    ``seed`` is unused (the binarisation is fixed); it is accepted for a uniform loader
    signature.
    """
    splits = [
        _as_float(read_amat(data_file(f"binarized_mnist/binarized_mnist_{split}.amat.gz", root)))
        for split in ("train", "valid", "test")
    ]
    return ImageData("static-mnist", *splits)


def load_dynamic_mnist(root=None, seed=1234):
    """Dynamically binarised MNIST: the first 50k training images are grayscale and
    re-binarised every epoch; the last 10k (validation) and the t10k test images are
    binarised once with streams seeded from ``seed``."""
    train = _as_float(read_idx_images(data_file("mnist/train-images-idx3-ubyte.gz", root))) / 255
    test = _as_float(read_idx_images(data_file("mnist/t10k-images-idx3-ubyte.gz", root))) / 255
    valid, test = binarize_eval_splits(train[50000:], test, seed)
    return ImageData("dynamic-mnist", train[:50000], valid, test, dynamic=True)


def caltech_to_row_major(data):
    """Caltech 101 Silhouettes rows as stored (column-major 28x28, silhouette 0) to
    row-major images with the silhouette 1 and the background 0."""
    n = len(data)
    images = np.asarray(data).reshape(n, 28, 28).transpose(0, 2, 1)
    return 1 - images.reshape(n, 784)


def load_caltech101(root=None, seed=1234):
    """Caltech 101 Silhouettes 28x28, split 1 (4100 / 2264 / 2307), silhouette = 1.

    ``seed`` is unused (the data are binary); it is accepted for a uniform loader
    signature.
    """
    import scipy.io

    path = data_file("caltech101_silhouettes/caltech101_silhouettes_28_split1.mat", root)
    mat = scipy.io.loadmat(path)
    splits = [
        _as_float(caltech_to_row_major(mat[f"{key}_data"])) for key in ("train", "val", "test")
    ]
    return ImageData("caltech101", *splits)


def load_digits_binary(seed=0, root=None):
    """scikit-learn's bundled 8x8 digits (1797 images, no download), binarised.

    A pixel is 1 if its intensity is above 7 (of 16). The images are split 1297 / 250 /
    250 by a permutation seeded from ``seed``. This is the fallback when no data root
    exists; ``root`` is ignored.
    """
    from sklearn.datasets import load_digits

    images = (load_digits().data > 7).astype(np.float32)
    order = numpy_generator(seed).permutation(len(images))
    train, valid, test = np.split(images[order], [1297, 1547])
    return ImageData(
        "digits-8x8", _as_float(train), _as_float(valid), _as_float(test), image_shape=(8, 8)
    )


#: Image data set loaders by name; each takes ``(root, seed, **options)``.
IMAGE_LOADERS = {
    "static-mnist": load_static_mnist,
    "dynamic-mnist": load_dynamic_mnist,
    "omniglot": load_omniglot,
    "caltech101": load_caltech101,
    "digits-8x8": load_digits_binary,
}

#: The names :func:`load_images` accepts.
IMAGE_DATASETS = tuple(IMAGE_LOADERS)


def load_images(name, root=None, max_train=None, max_eval=None, seed=1234, **options):
    """Load a binary image data set as :class:`~pyro_iwem.data.images.ImageData`.

    :param str name: one of :data:`IMAGE_DATASETS` (``"static-mnist"``,
        ``"dynamic-mnist"``, ``"omniglot"``, ``"caltech101"``, ``"digits-8x8"``).
    :param root: data root, see :func:`~pyro_iwem.data.files.resolve_data_root`.
    :param int max_train: keep only the first this many training images.
    :param int max_eval: keep only the first this many validation and test images.
    :param int seed: seeds the data set's fixed random choices (the one-off
        binarisation of dynamic data's validation and test images, Omniglot's
        validation slice, the digits split). It does not affect training batches: pass
        a seed to :meth:`~pyro_iwem.data.images.ImageData.batches` for those.
    :param options: passed to the data set's loader, e.g. ``max_characters`` for
        :func:`~pyro_iwem.data.omniglot.load_omniglot`.
    :raises DataFileError: if a file is missing or corrupt.
    """
    if name not in IMAGE_LOADERS:
        raise ValueError(f"unknown image data set {name!r}; expected one of {IMAGE_DATASETS}")
    data = IMAGE_LOADERS[name](root=root, seed=seed, **options)
    return data.sliced(max_train, max_eval)
