"""Data for the IWEM experiments: local files only, verified by checksum.

* :func:`load_images` -- binary image benchmarks as :class:`ImageData` (static and
  dynamic MNIST, Omniglot 28x28 rebuilt from the original images, Caltech 101
  Silhouettes), and :func:`load_digits_binary`, scikit-learn's 8x8 digits, when no data
  root exists;
* :func:`load_uci`, :func:`load_csv`, :func:`read_table` (a :class:`Table` with missing cells,
  written back filled), :func:`standardize` -- numeric tables;
* :func:`patch_mask`, :func:`mcar_mask` -- missingness masks (True = observed).

Files are looked up below the data root (:func:`resolve_data_root`: the ``root``
argument, ``PYRO_IWEM_DATA``, or ``shared/data`` nearby); a missing or corrupt file
raises :class:`DataFileError`.
"""

from .files import (
    CHECKSUMS,
    DataFileError,
    MissingDataFileError,
    data_file,
    data_root_exists,
    resolve_cache_dir,
    resolve_data_root,
)
from .images import SPLITS, ImageData
from .loaders import (
    IMAGE_DATASETS,
    caltech_to_row_major,
    load_caltech101,
    load_digits_binary,
    load_dynamic_mnist,
    load_images,
    load_static_mnist,
)
from .masks import mcar_mask, patch_index, patch_mask
from .omniglot import build_omniglot, load_omniglot
from .tabular import MISSING_VALUES, UCI_DATASETS, Table, TableFormatError, load_csv, load_uci, read_table, standardize

__all__ = [
    "CHECKSUMS",
    "IMAGE_DATASETS",
    "MISSING_VALUES",
    "SPLITS",
    "UCI_DATASETS",
    "DataFileError",
    "ImageData",
    "MissingDataFileError",
    "Table",
    "TableFormatError",
    "build_omniglot",
    "caltech_to_row_major",
    "data_file",
    "data_root_exists",
    "load_caltech101",
    "load_csv",
    "load_digits_binary",
    "load_dynamic_mnist",
    "load_images",
    "load_omniglot",
    "load_static_mnist",
    "load_uci",
    "mcar_mask",
    "patch_index",
    "patch_mask",
    "read_table",
    "resolve_cache_dir",
    "resolve_data_root",
    "standardize",
]
