"""Omniglot at 28x28, built from Lake et al.'s original 105x105 images.

Burda et al.'s ``chardata.mat`` (the 28x28 Omniglot of the IWAE papers, 24,345 train /
8,070 test) is not available offline, so this module builds an approximation of it
from the two zips of original PNGs:

* all 1623 characters (964 background + 659 evaluation) x 20 drawers;
* each 105x105 1-bit image is inverted (strokes = 1) and resized to 28x28 grayscale
  intensities in ``[0, 1]`` with an antialiasing filter (PIL Lanczos by default);
* split *within each character*: its drawers sorted by drawer id, the first 15
  (``_01`` .. ``_15``) go to train and the last 5 (``_16`` .. ``_20``) to test
  (1623 x 15 = 24,345 train, 1623 x 5 = 8,115 test images);
* validation: a random 10% (rounded down) of those train images (seeded, see
  :func:`split_omniglot`), removed from train (21,911 train / 2,434 valid / 8,115 test);
* train is dynamically binarised (re-drawn every epoch); valid and test are binarised
  once with a fixed seed.

Its downsampling, split and validation set differ from chardata's, so results on it are
only comparable with each other, not with published Omniglot numbers; every
:class:`~pyro_iwem.data.images.ImageData` it returns carries a ``note`` saying so.

Building takes seconds; the 8-bit images are cached in the cache directory (see
:func:`~pyro_iwem.data.files.resolve_cache_dir`) under a name keyed by the zips'
checksums and the build options.
"""

import hashlib
import io
import json
import re
import warnings
import zipfile

import numpy as np
import torch
from PIL import Image, ImageOps

from .files import CHECKSUMS, data_file, resolve_cache_dir, save_npz_atomic
from .images import STREAM_VALID_SPLIT, ImageData, binarize_eval_splits
from .rng import numpy_generator

OMNIGLOT_ZIPS = ("omniglot/images_background.zip", "omniglot/images_evaluation.zip")

NOTE = (
    "Omniglot 28x28 built here by resizing the original 105x105 images (15/5 drawers "
    "per character for train/test, 10% of train held out for validation); an "
    "approximation of Burda et al.'s chardata.mat, not the same images or split, so "
    "results are not directly comparable with published Omniglot numbers."
)

RESAMPLING = {
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
}

# Bump when the build procedure changes, to invalidate old caches.
_BUILD_VERSION = 1

_PNG_NAME = re.compile(r"^images_(?:background|evaluation)/[^/]+/character\d+/\d+_(\d+)\.png$")


def _list_characters(archive):
    """Group the PNG names of a zip by character: a list of sorted ``[(drawer, name)]``,
    one per character, characters in sorted path order."""
    characters = {}
    for name in archive.namelist():
        match = _PNG_NAME.match(name)
        if match:
            character = name.rsplit("/", 1)[0]
            characters.setdefault(character, []).append((int(match.group(1)), name))
    return [sorted(characters[key]) for key in sorted(characters)]


def _render(png_bytes, size, resample):
    """A 105x105 1-bit PNG (strokes black) as ``size x size`` uint8 stroke intensities."""
    with Image.open(io.BytesIO(png_bytes)) as image:
        strokes = ImageOps.invert(image.convert("L"))
    return np.asarray(strokes.resize((size, size), RESAMPLING[resample]), dtype=np.uint8)


def build_omniglot(root=None, max_characters=None, size=28, resample="lanczos"):
    """Build downsampled Omniglot images from the two zips of original PNGs.

    Characters are numbered in the order background zip then evaluation zip, each sorted
    by ``<alphabet>/<character>`` path.

    :param root: data root, see :func:`~pyro_iwem.data.files.resolve_data_root`.
    :param int max_characters: build only the first this many characters (for tests).
    :param int size: output side length in pixels.
    :param str resample: ``"lanczos"`` (default), ``"box"`` or ``"bilinear"``.
    :returns: a dict of numpy arrays: ``images`` uint8 ``(N, size * size)`` stroke
        intensities (255 = stroke), ``character`` int32 ``(N,)`` and ``drawer`` int32
        ``(N,)`` (1-based drawer id from the file name).
    """
    if resample not in RESAMPLING:
        raise ValueError(f"unknown resample {resample!r}; expected one of {sorted(RESAMPLING)}")
    images, character_ids, drawers = [], [], []
    for relpath in OMNIGLOT_ZIPS:
        with zipfile.ZipFile(data_file(relpath, root)) as archive:
            for entries in _list_characters(archive):
                if max_characters is not None and len(drawers) >= max_characters:
                    break
                drawers.append([drawer for drawer, _ in entries])
                for drawer, name in entries:
                    images.append(_render(archive.read(name), size, resample).reshape(-1))
                    character_ids.append(len(drawers) - 1)
    return {
        "images": np.stack(images),
        "character": np.asarray(character_ids, dtype=np.int32),
        "drawer": np.concatenate(drawers).astype(np.int32),
    }


def _cache_path(cache_dir, max_characters, size, resample):
    """Cache file name, keyed by the zips' checksums and the build options."""
    key = json.dumps(
        {
            "version": _BUILD_VERSION,
            "zips": [CHECKSUMS[relpath] for relpath in OMNIGLOT_ZIPS],
            "max_characters": max_characters,
            "size": size,
            "resample": resample,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    subset = "" if max_characters is None else f"-first{max_characters}"
    return resolve_cache_dir(cache_dir) / f"omniglot{size}-{resample}{subset}-{digest}.npz"


def _read_cache(path):
    """The arrays of a cache file, or ``None`` (with a warning) if it is unreadable."""
    try:
        with np.load(path) as cached:
            arrays = {key: cached[key] for key in ("images", "character", "drawer")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        warnings.warn(f"ignoring unreadable cache file {path}: {e}", RuntimeWarning)
        return None
    if not len(arrays["images"]) == len(arrays["character"]) == len(arrays["drawer"]):
        warnings.warn(f"ignoring inconsistent cache file {path}", RuntimeWarning)
        return None
    return arrays


def omniglot_arrays(
    root=None, max_characters=None, size=28, resample="lanczos", cache_dir=None, use_cache=True
):
    """:func:`build_omniglot`, memoised in an ``.npz`` cache file.

    The zips' checksums are verified even when the cache is used, so a cache never
    outlives the files it was built from.

    :param cache_dir: see :func:`~pyro_iwem.data.files.resolve_cache_dir`.
    :param bool use_cache: read and write the cache.
    """
    for relpath in OMNIGLOT_ZIPS:
        data_file(relpath, root)
    path = _cache_path(cache_dir, max_characters, size, resample)
    if use_cache and path.is_file():
        arrays = _read_cache(path)
        if arrays is not None:
            return arrays
    arrays = build_omniglot(root, max_characters=max_characters, size=size, resample=resample)
    if use_cache:
        save_npz_atomic(path, **arrays)
    return arrays


def split_omniglot(arrays, seed=1234, num_train_drawers=15, valid_fraction=0.1):
    """Split built Omniglot arrays into grayscale train / valid / test tensors.

    Within each character, the drawers sorted by id go ``num_train_drawers`` to train
    and the rest to test. Then ``floor(valid_fraction * n_train)`` train images, chosen
    by a permutation seeded from ``seed``, move to validation. Every split keeps the
    build order. Intensities are float32 in ``[0, 1]``.

    :returns: ``(train, valid, test)`` float32 tensors.
    """
    character, drawer = arrays["character"], arrays["drawer"]
    order = np.lexsort((drawer, character))
    rank = np.empty(len(order), dtype=np.int64)
    starts = np.searchsorted(character[order], character[order])
    rank[order] = np.arange(len(order)) - starts
    counts = np.bincount(character)
    if counts[counts > 0].min() <= num_train_drawers:
        raise ValueError(
            f"every Omniglot character needs more than {num_train_drawers} drawers; "
            f"the fewest found is {counts[counts > 0].min()}"
        )
    is_train = rank < num_train_drawers
    train_index = np.flatnonzero(is_train)
    num_valid = int(valid_fraction * len(train_index))
    valid_pick = numpy_generator(seed, STREAM_VALID_SPLIT).permutation(len(train_index))[:num_valid]
    is_valid = np.zeros(len(rank), dtype=bool)
    is_valid[train_index[valid_pick]] = True
    is_train &= ~is_valid
    images = torch.from_numpy(arrays["images"].astype(np.float32) / 255.0)
    return images[is_train], images[is_valid], images[~(is_train | is_valid)]


def load_omniglot(
    root=None,
    seed=1234,
    max_characters=None,
    resample="lanczos",
    cache_dir=None,
    use_cache=True,
):
    """Omniglot 28x28 (an approximation of Burda et al.'s ``chardata.mat``).

    See the module docstring for the build, split and binarisation rules. The result's
    ``note`` says it is an approximation; report it with any result.

    :param root: data root.
    :param int seed: seeds the validation slice and the one-off binarisation of the
        validation and test images.
    :param int max_characters: use only the first this many characters (fast tests).
    :param str resample: resize filter, see :func:`build_omniglot`.
    :param cache_dir: cache directory, see
        :func:`~pyro_iwem.data.files.resolve_cache_dir`.
    :param bool use_cache: read and write the cache.
    :rtype: ~pyro_iwem.data.images.ImageData
    """
    arrays = omniglot_arrays(root, max_characters, 28, resample, cache_dir, use_cache)
    train, valid, test = split_omniglot(arrays, seed)
    valid, test = binarize_eval_splits(valid, test, seed)
    return ImageData("omniglot", train, valid, test, dynamic=True, note=NOTE)
