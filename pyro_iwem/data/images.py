"""The :class:`ImageData` container for binary image benchmarks and its minibatches."""

import dataclasses
import math

import torch

from .masks import patch_mask
from .rng import derive_seed, torch_generator

#: The split names of :class:`ImageData`, in order.
SPLITS = ("train", "valid", "test")

# Stream tags, mixed into seeds as ``(seed, stream, ...)`` so that each random choice
# has its own stream.
STREAM_SHUFFLE = 0
STREAM_BINARIZE = 1
STREAM_EVAL_BINARIZE = 2
STREAM_VALID_SPLIT = 3
STREAM_MISSING = 4


def binarize(probs, *keys):
    """Draw ``Bernoulli(probs)`` with a generator seeded from ``keys``; float32 0/1."""
    return torch.bernoulli(probs.float(), generator=torch_generator(*keys))


def binarize_eval_splits(valid, test, seed):
    """Binarise grayscale validation and test images once, with fixed seeded streams.

    This is the dynamic-binarisation protocol: only the training images are re-drawn every
    epoch; the evaluation images are one fixed binary sample.
    """
    return (
        binarize(valid, seed, STREAM_EVAL_BINARIZE, 0),
        binarize(test, seed, STREAM_EVAL_BINARIZE, 1),
    )


@dataclasses.dataclass(eq=False)
class ImageData:
    """A binary image benchmark: three splits of flattened images.

    Each split is a float32 tensor of shape ``(N, H * W)`` in row-major pixel order.
    ``valid`` and ``test`` are always binary (0/1). ``train`` is binary too unless
    ``dynamic`` is true, in which case it holds grayscale intensities in ``[0, 1]``
    that :meth:`batches` re-binarises every epoch (dynamic binarisation); use
    :meth:`binarized` to get a binary copy of a split.

    :param str name: data set name, e.g. ``"static-mnist"``.
    :param torch.Tensor train: training images.
    :param torch.Tensor valid: validation images.
    :param torch.Tensor test: test images.
    :param bool dynamic: whether ``train`` is re-binarised every epoch.
    :param tuple image_shape: ``(H, W)``.
    :param str note: caveats to report alongside results (e.g. approximations).
    :param torch.Tensor train_mask: optional bool tensor of ``train``'s shape, True where a
        pixel is observed (see :meth:`with_missing_patches`); the evaluation splits are complete.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    dynamic: bool = False
    image_shape: tuple = (28, 28)
    note: str = ""
    train_mask: torch.Tensor | None = None

    def __post_init__(self):
        self.image_shape = tuple(self.image_shape)
        num_pixels = math.prod(self.image_shape)
        for split in SPLITS:
            x = getattr(self, split)
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.size(1) != num_pixels:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"{self.name}: split {split!r} must be a tensor of shape (N, {num_pixels}), "
                    f"got {shape}"
                )
        if self.train_mask is not None and (
            self.train_mask.shape != self.train.shape or self.train_mask.dtype != torch.bool
        ):
            raise ValueError(f"{self.name}: train_mask must be a bool tensor of shape {tuple(self.train.shape)}")

    @property
    def num_pixels(self):
        """Number of pixels per image, ``H * W``."""
        return math.prod(self.image_shape)

    def split(self, split):
        """The tensor of a split, by name (``"train"``, ``"valid"`` or ``"test"``)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)

    def sizes(self):
        """A dict of split sizes."""
        return {split: len(self.split(split)) for split in SPLITS}

    def sliced(self, max_train=None, max_eval=None):
        """A copy whose train split keeps its first ``max_train`` rows and whose valid and
        test splits keep their first ``max_eval`` rows (``None`` keeps all)."""
        for arg, value in (("max_train", max_train), ("max_eval", max_eval)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{arg} must be a positive int or None, got {value!r}")
        return dataclasses.replace(
            self,
            train=self.train[:max_train],
            valid=self.valid[:max_eval],
            test=self.test[:max_eval],
            train_mask=None if self.train_mask is None else self.train_mask[:max_train],
        )

    def missing_patches_mask(self, split, n_removed, seed=1234, grid=3):
        """A :func:`~pyro_iwem.data.patch_mask` for every image of a split: ``n_removed`` of the
        ``grid x grid`` patches missing per image, drawn from a stream of ``(seed, split)``."""
        stream = derive_seed(seed, STREAM_MISSING, SPLITS.index(split))
        return patch_mask(len(self.split(split)), n_removed, stream, self.image_shape, grid)

    def with_missing_patches(self, n_removed, seed=1234, grid=3):
        """A copy whose training images miss ``n_removed`` random patches each (§5, Table 3):
        the mask is fixed per image (one incomplete data set); validation and test stay complete."""
        return dataclasses.replace(self, train_mask=self.missing_patches_mask("train", n_removed, seed, grid))

    def train_mean(self):
        """Per-pixel mean intensity of the training images, shape ``(H * W,)``.

        For dynamic data this is the mean of the grayscale intensities, i.e. the expected
        mean of the binarised images. Typically used to initialise a Bernoulli decoder's
        output bias as ``logit(mean.clamp(eps, 1 - eps))``.
        """
        return self.train.mean(0)

    def binarized(self, split, epoch=0, seed=1234):
        """A split as binary float32 images, in the stored order.

        For a dynamic training split, this is the Bernoulli sample of epoch ``epoch``,
        drawn with a generator seeded from ``(seed, epoch)``; other splits are returned
        as stored.
        """
        x = self.split(split)
        if self.dynamic and split == "train":
            return binarize(x, seed, STREAM_BINARIZE, epoch)
        return x

    def num_batches(self, split, batch_size, drop_last=False):
        """How many minibatches :meth:`batches` yields."""
        n = len(self.split(split))
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    def batches(
        self, split, batch_size, epoch=0, seed=1234, shuffle=None, drop_last=False, device=None, with_mask=False
    ):
        """Iterate over minibatches of binary float32 images.

        The batches depend only on ``(split, batch_size, epoch, seed, shuffle,
        drop_last)``: a resumed run gets exactly the same ones. The training split is
        shuffled by default with a generator seeded from ``(seed, epoch)`` and, if
        ``dynamic``, re-binarised every epoch with another generator seeded from
        ``(seed, epoch)``. Validation and test are not shuffled by default.

        :param str split: ``"train"``, ``"valid"`` or ``"test"``.
        :param int batch_size: images per batch.
        :param int epoch: epoch number (a non-negative int).
        :param int seed: base seed.
        :param bool shuffle: shuffle the split; default ``split == "train"``.
        :param bool drop_last: drop a final incomplete batch.
        :param device: if given, each batch is moved there (randomness stays on CPU, so
            the batches do not depend on the device).
        :param bool with_mask: yield ``(x, mask)`` pairs: the training split's ``train_mask``
            (all True for other splits or without one), with the missing pixels of ``x`` set to 0,
            so that nothing downstream can see them.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if shuffle is None:
            shuffle = split == "train"
        x = self.binarized(split, epoch, seed)
        if device is not None:
            x = x.to(device)
        n = len(x)
        if shuffle:
            order = torch.randperm(n, generator=torch_generator(seed, STREAM_SHUFFLE, epoch))
        else:
            order = torch.arange(n)
        mask = None
        if with_mask:
            mask = self.train_mask if split == "train" and self.train_mask is not None else torch.ones_like(x, dtype=torch.bool)
            mask = mask.to(x.device)
            x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        stop = self.num_batches(split, batch_size, drop_last) * batch_size
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size].to(x.device)
            yield x[index] if mask is None else (x[index], mask[index])
