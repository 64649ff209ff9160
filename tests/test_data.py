"""Tests for pyro_iwem.data, on the real files of the data root (skipped without it)."""

import re
import shutil

import numpy as np
import pytest
import scipy.io
import torch

from pyro_iwem.data import (
    CHECKSUMS,
    SPLITS,
    DataFileError,
    ImageData,
    MissingDataFileError,
    TableFormatError,
    build_omniglot,
    data_file,
    load_csv,
    load_digits_binary,
    load_images,
    load_omniglot,
    load_uci,
    mcar_mask,
    patch_index,
    patch_mask,
    resolve_cache_dir,
    resolve_data_root,
    standardize,
)
from pyro_iwem.data import omniglot as omniglot_module
from pyro_iwem.data.omniglot import split_omniglot

ROOT = resolve_data_root()
requires_data = pytest.mark.skipif(
    not ROOT.is_dir(),
    reason=f"data root {ROOT} not found; set PYRO_IWEM_DATA to the data directory",
)
CALTECH = "caltech101_silhouettes/caltech101_silhouettes_28_split1.mat"


def assert_binary(x):
    assert x.dtype == torch.float32
    assert ((x == 0) | (x == 1)).all()


# ----------------------------------------------------------------------------- files


def test_resolve_data_root_order(tmp_path, monkeypatch):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYRO_IWEM_DATA", raising=False)
    assert resolve_data_root() == tmp_path / "shared" / "data"
    monkeypatch.setenv("PYRO_IWEM_DATA", str(tmp_path / "env"))
    assert resolve_data_root() == tmp_path / "env"
    assert resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_resolve_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_IWEM_CACHE", str(tmp_path / "c"))
    assert resolve_cache_dir() == tmp_path / "c"
    assert resolve_cache_dir(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("PYRO_IWEM_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert resolve_cache_dir().parts[-2:] == (".cache", "pyro_iwem")


@requires_data
def test_checksum_table_matches_readme():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| ([\w./-]+) \| \d+ \| ([0-9a-f]{64}) \|$", readme, re.MULTILINE))
    assert rows == CHECKSUMS


@requires_data
@pytest.mark.parametrize("relpath", sorted(CHECKSUMS))
def test_data_files_verify(relpath):
    assert data_file(relpath).is_file()


@requires_data
def test_corrupt_file_raises(tmp_path):
    copy = tmp_path / CALTECH
    copy.parent.mkdir(parents=True)
    shutil.copyfile(ROOT / CALTECH, copy)
    with open(copy, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataFileError) as info:
        load_images("caltech101", root=tmp_path)
    message = str(info.value)
    assert str(copy) in message
    assert CHECKSUMS[CALTECH] in message
    assert "PYRO_IWEM_DATA" in message and "--data-root" in message
    assert not isinstance(info.value, FileNotFoundError)


def test_missing_file_names_directory(tmp_path):
    with pytest.raises(MissingDataFileError) as info:
        load_images("static-mnist", root=tmp_path)
    assert isinstance(info.value, (DataFileError, FileNotFoundError))
    message = str(info.value)
    assert str(tmp_path) in message
    assert "binarized_mnist/binarized_mnist_train.amat.gz" in message
    assert CHECKSUMS["binarized_mnist/binarized_mnist_train.amat.gz"] in message
    assert "PYRO_IWEM_DATA" in message


def test_missing_root_is_reported(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        load_uci("banknote", root=tmp_path / "nowhere")


# ------------------------------------------------------------------------ image data


@pytest.fixture(scope="module")
def static_mnist():
    return load_images("static-mnist")


@pytest.fixture(scope="module")
def dynamic_mnist():
    return load_images("dynamic-mnist")


@pytest.fixture(scope="module")
def caltech():
    return load_images("caltech101")


@requires_data
def test_static_mnist(static_mnist):
    assert static_mnist.sizes() == {"train": 50000, "valid": 10000, "test": 10000}
    assert not static_mnist.dynamic and static_mnist.image_shape == (28, 28)
    for split, fraction in zip(SPLITS, (0.130562, 0.131127, 0.132512)):
        x = static_mnist.split(split)
        assert x.shape[1] == 784
        assert_binary(x)
        assert x.double().mean().item() == pytest.approx(fraction, abs=1e-6)
    assert static_mnist.train_mean().shape == (784,)


@requires_data
def test_dynamic_mnist(dynamic_mnist):
    data = dynamic_mnist
    assert data.sizes() == {"train": 50000, "valid": 10000, "test": 10000}
    assert data.dynamic
    assert 0 <= data.train.min() and data.train.max() <= 1
    assert ((data.train > 0) & (data.train < 1)).any()  # grayscale, binarised per epoch
    assert_binary(data.valid)
    assert_binary(data.test)
    # test: one binarisation of the t10k images (pixel mean 0.132515 in the README)
    assert data.test.double().mean().item() == pytest.approx(0.132515, abs=2e-3)
    # valid and test are binarised once, with a fixed seed
    again = load_images("dynamic-mnist", max_train=10)
    assert torch.equal(again.valid, data.valid) and torch.equal(again.test, data.test)


@requires_data
def test_dynamic_binarisation(dynamic_mnist):
    data = dynamic_mnist.sliced(max_train=5000)
    first = list(data.batches("train", 1000, epoch=0))
    repeat = list(data.batches("train", 1000, epoch=0))
    other = list(data.batches("train", 1000, epoch=1))
    other_seed = list(data.batches("train", 1000, epoch=0, seed=1))
    assert len(first) == 5
    for batch in first:
        assert_binary(batch)
    assert all(torch.equal(a, b) for a, b in zip(first, repeat))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], other_seed[0])
    # the same permutation, a different binarisation, when shuffling is off
    x0 = data.binarized("train", epoch=0)
    x1 = data.binarized("train", epoch=1)
    assert not torch.equal(x0, x1)
    assert torch.equal(torch.cat(list(data.batches("train", 1000, shuffle=False))), x0)
    # the binarised mean matches the grayscale mean
    assert torch.cat(first).mean().item() == pytest.approx(data.train.mean().item(), abs=2e-3)


def test_batches_cover_split_once():
    x = torch.arange(23, dtype=torch.float32).repeat_interleave(2).reshape(23, 2)
    data = ImageData("toy", x, x[:7], x[:5], image_shape=(1, 2))
    batches = list(data.batches("train", 5, epoch=3))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3] and data.num_batches("train", 5) == 5
    order = torch.cat(batches)[:, 0]
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    assert len(list(data.batches("train", 5, drop_last=True))) == 4
    assert torch.equal(torch.cat(list(data.batches("valid", 3))), x[:7])  # not shuffled
    with pytest.raises(ValueError, match="split"):
        data.split("training")
    with pytest.raises(ValueError, match="shape"):
        ImageData("bad", x, x, x[:, :1], image_shape=(1, 2))


def test_missing_patches_follow_their_images_through_shuffled_batches():
    """Each training image keeps its own fixed mask; batches with masks hide the missing pixels."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(30, 36, generator=g) > 0.5).float()  # 30 distinct 6x6 images
    data = ImageData("toy", x, x[:4], x[:4], image_shape=(6, 6)).with_missing_patches(4, seed=7)
    mask = data.train_mask
    assert mask.shape == x.shape and torch.equal(mask, data.with_missing_patches(4, seed=7).train_mask)
    assert not torch.equal(mask, data.with_missing_patches(4, seed=8).train_mask)
    patches = patch_index((6, 6), 3)
    for row in mask:  # exactly 4 of the 9 patches missing, each wholly
        missing = patches[~row].unique()
        assert len(missing) == 4 and not row[torch.isin(patches, missing)].any()

    pairs = list(data.batches("train", 7, epoch=2, with_mask=True))
    plain = torch.cat(list(data.batches("train", 7, epoch=2)))  # the same shuffle, unmasked
    rows = [int((x == xi).all(1).nonzero()[0]) for xi in plain]
    assert sorted(rows) != rows and sorted(rows) == list(range(30))
    xs, masks = torch.cat([b for b, _ in pairs]), torch.cat([m for _, m in pairs])
    assert torch.equal(masks, mask[rows]) and torch.equal(xs, torch.where(mask, x, 0.0)[rows])
    assert torch.equal(data.sliced(max_train=10).train_mask, mask[:10])
    (valid, valid_mask), = data.batches("valid", 4, with_mask=True)
    assert torch.equal(valid, x[:4]) and valid_mask.all()  # evaluation splits are complete
    with pytest.raises(ValueError, match="train_mask"):
        ImageData("bad", x, x, x, image_shape=(6, 6), train_mask=mask.float())


@requires_data
def test_caltech101(caltech):
    assert caltech.sizes() == {"train": 4100, "valid": 2264, "test": 2307}
    for split, stored_fraction in zip(SPLITS, (0.5511, 0.5360, 0.5390)):
        x = caltech.split(split)
        assert_binary(x)
        # polarity flipped: silhouette 1, background 0
        assert x.mean().item() == pytest.approx(1 - stored_fraction, abs=1e-4)
    corners = caltech.train.reshape(-1, 28, 28)[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.mean() < 0.2  # the background is mostly at the border


@requires_data
def test_caltech101_orientation(caltech):
    raw = scipy.io.loadmat(ROOT / CALTECH)["train_data"][:50]
    naive = torch.from_numpy(1 - raw.astype(np.float32)).reshape(50, 28, 28)
    assert torch.equal(caltech.train[:50].reshape(50, 28, 28), naive.transpose(1, 2))
    fortran = np.stack([(1 - row).reshape(28, 28, order="F") for row in raw])
    assert np.array_equal(caltech.train[:50].reshape(50, 28, 28).numpy(), fortran)


@requires_data
def test_load_images_slicing_and_errors():
    data = load_images("caltech101", max_train=100, max_eval=30)
    assert data.sizes() == {"train": 100, "valid": 30, "test": 30}
    with pytest.raises(ValueError, match="unknown image data set"):
        load_images("mnist")
    with pytest.raises(ValueError, match="max_train"):
        load_images("caltech101", max_train=0)


def test_digits_fallback():
    data = load_digits_binary(seed=0)
    assert data.name == "digits-8x8" and data.image_shape == (8, 8)
    assert data.sizes() == {"train": 1297, "valid": 250, "test": 250}
    for split in SPLITS:
        assert_binary(data.split(split))
    assert torch.equal(load_digits_binary(seed=0).test, data.test)
    assert not torch.equal(load_digits_binary(seed=1).test, data.test)


# -------------------------------------------------------------------------- omniglot


def test_split_omniglot_rule():
    # 3 characters x 20 drawers, drawers in scrambled order; pixel 0 encodes 32 c + d
    rng = np.random.default_rng(0)
    character = np.repeat(np.arange(3), 20).astype(np.int32)
    drawer = np.concatenate([rng.permutation(20) + 1 for _ in range(3)]).astype(np.int32)
    images = np.zeros((60, 784), np.uint8)
    images[:, 0] = character * 32 + drawer
    arrays = {"images": images, "character": character, "drawer": drawer}
    train, valid, test = split_omniglot(arrays, seed=0)
    assert (len(train), len(valid), len(test)) == (41, 4, 15)  # floor(10% of 45) = 4 valid
    code = lambda x: np.rint(x[:, 0].numpy() * 255).astype(int)
    assert sorted(code(test) % 32) == sorted(list(range(16, 21)) * 3)
    assert np.array_equal(np.bincount(code(test) // 32), [5, 5, 5])
    train_valid = np.concatenate([code(train), code(valid)])
    assert sorted(train_valid % 32) == sorted(list(range(1, 16)) * 3)
    again = split_omniglot(arrays, seed=0)
    assert torch.equal(again[1], valid)
    assert not torch.equal(split_omniglot(arrays, seed=1)[1], valid)


@requires_data
def test_build_omniglot_few_characters():
    arrays = build_omniglot(max_characters=3)
    assert arrays["images"].shape == (60, 784) and arrays["images"].dtype == np.uint8
    assert np.array_equal(np.bincount(arrays["character"]), [20, 20, 20])
    assert np.array_equal(arrays["drawer"], np.tile(np.arange(1, 21), 3))
    ink = arrays["images"].mean() / 255
    assert 0.03 < ink < 0.2  # strokes are 1, background 0


@requires_data
def test_omniglot_cache_round_trip(tmp_path, monkeypatch):
    data = load_omniglot(max_characters=4, cache_dir=tmp_path)
    assert data.sizes() == {"train": 54, "valid": 6, "test": 20}
    assert data.dynamic and data.name == "omniglot"
    assert "chardata" in data.note and "approximation" in data.note
    assert 0 <= data.train.min() and data.train.max() <= 1
    assert_binary(data.valid)
    assert_binary(data.test)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]  # no temp file left

    def fail(*args, **kwargs):
        raise AssertionError("the builder ran although a cache file exists")

    monkeypatch.setattr(omniglot_module, "build_omniglot", fail)
    monkeypatch.setenv("PYRO_IWEM_CACHE", str(tmp_path))
    cached = load_images("omniglot", max_characters=4)
    for split in SPLITS:
        assert torch.equal(cached.split(split), data.split(split))
    # an unreadable cache is ignored and rebuilt
    monkeypatch.undo()
    (cache_file,) = tmp_path.iterdir()
    cache_file.write_bytes(b"not an npz")
    with pytest.warns(RuntimeWarning, match="cache"):
        rebuilt = load_omniglot(max_characters=4, cache_dir=tmp_path)
    assert torch.equal(rebuilt.test, data.test)


# ---------------------------------------------------------------------------- tables


@requires_data
@pytest.mark.parametrize(
    "name, shape",
    [
        ("banknote", (1372, 4)),
        ("breast", (569, 30)),
        ("red-wine", (1599, 11)),
        ("white-wine", (4898, 11)),
    ],
)
def test_uci_shapes(name, shape):
    x = load_uci(name)
    assert x.shape == shape and x.dtype == np.float64
    assert np.isfinite(x).all()


@requires_data
def test_uci_values():
    banknote_means = [0.4337, 1.9224, 1.3976, -1.1917]  # data/README.md
    assert load_uci("banknote").mean(0) == pytest.approx(banknote_means, abs=1e-4)
    assert load_uci("breast")[0, 0] == 17.99  # first feature after ID and diagnosis
    assert load_uci("red-wine")[0, -1] == 9.4  # alcohol, the last feature before quality


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(n, fmt="{i},{j},{k}"):
    return [fmt.format(i=i, j=2 * i + 1, k=(i * 7) % 5) for i in range(n)]


def test_load_csv_header_detection(tmp_path):
    plain = load_csv(write(tmp_path / "plain.csv", rows(12)))
    assert plain.shape == (12, 3) and plain[0].tolist() == [0, 1, 0]
    headed = write(tmp_path / "headed.csv", ['"a";"b";"c"'] + rows(12, "{i};{j};{k}"))
    assert np.array_equal(load_csv(headed, sep=";"), plain)
    assert np.array_equal(load_csv(headed, sep=";", drop_columns=["b"]), plain[:, [0, 2]])
    assert np.array_equal(load_csv(tmp_path / "plain.csv", drop_columns=[-1, 0]), plain[:, [1]])
    assert np.array_equal(load_csv(tmp_path / "plain.csv", drop_columns=["1"]), plain[:, [0, 2]])
    # a text column in a file without a header is data, not a header
    labelled = write(tmp_path / "labelled.csv", [r + ",M" for r in rows(12)])
    assert load_csv(labelled, drop_columns=[3]).shape == (12, 3)


def test_load_csv_errors(tmp_path):
    lines = rows(12)
    lines[4] = "4,x9,3"
    text = write(tmp_path / "text.csv", ["a,b,c"] + lines)
    message = r"text\.csv.*column 'b' \(index 1\) is not numeric.*line 6: 'x9'"
    with pytest.raises(TableFormatError, match=message):
        load_csv(text)
    short = write(tmp_path / "short.csv", rows(5))
    with pytest.raises(TableFormatError, match=r"short\.csv: 5 data rows, need at least 10"):
        load_csv(short)
    assert load_csv(short, min_rows=5).shape == (5, 3)
    constant = write(tmp_path / "constant.csv", ["a,b,c"] + rows(12, "{i},3,{k}"))
    message = r"constant\.csv: column 'b' \(index 1\) is constant.*--drop-columns"
    with pytest.raises(TableFormatError, match=message):
        load_csv(constant)
    assert load_csv(constant, drop_columns=["b"]).shape == (12, 2)
    ragged = write(tmp_path / "ragged.csv", rows(12) + ["1,2"])
    with pytest.raises(TableFormatError, match="row 13 has 2 fields"):
        load_csv(ragged)
    with pytest.raises(TableFormatError, match="no column named 'z'"):
        load_csv(constant, drop_columns=["z"])
    nan = write(tmp_path / "nan.csv", rows(12) + ["1,nan,2"])
    with pytest.raises(TableFormatError, match="column 1 is not finite"):
        load_csv(nan)
    assert issubclass(TableFormatError, ValueError)


def test_standardize():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(200, 4))
    z, mean, std = standardize(x)
    assert np.allclose(z.mean(0), 0) and np.allclose(z.std(0), 1)
    assert np.allclose(z * std + mean, x)
    with pytest.raises(ValueError, match=r"constant column\(s\) \[2\]"):
        standardize(np.c_[x, np.ones(200)][:, [0, 1, 4]])


# ----------------------------------------------------------------------------- masks


def test_patch_boundaries():
    bands = patch_index().reshape(28, 28)
    _, heights = bands[:, 0].unique_consecutive(return_counts=True)
    assert heights.tolist() == [10, 9, 9]  # rows 0-9, 10-18, 19-27
    assert torch.equal(bands[0].unique_consecutive(), torch.tensor([0, 1, 2]))
    assert torch.equal(bands[:, 0].unique_consecutive(), torch.tensor([0, 3, 6]))


@pytest.mark.parametrize("n_removed", range(10))
def test_patch_mask_counts(n_removed):
    mask = patch_mask(500, n_removed, seed=3)
    assert mask.shape == (500, 784) and mask.dtype == torch.bool
    patches = patch_index()
    observed = torch.stack([mask[:, patches == p].float().mean(1) for p in range(9)], 1)
    assert set(observed.unique().tolist()) <= {0.0, 1.0}  # whole patches only
    assert torch.equal((observed == 0).sum(1), torch.full((500,), n_removed))
    assert torch.equal(patch_mask(500, n_removed, seed=3), mask)
    if 0 < n_removed < 9:
        assert not torch.equal(patch_mask(500, n_removed, seed=4), mask)
        # every patch gets removed about equally often
        rate = (observed == 0).float().mean(0)
        assert torch.allclose(rate, torch.full((9,), n_removed / 9), atol=0.1)


def test_patch_mask_errors():
    with pytest.raises(ValueError, match="n_removed"):
        patch_mask(2, 10, seed=0)
    assert patch_mask(2, 2, seed=0, image_shape=(8, 8), grid=2).shape == (2, 64)


def test_mcar_mask():
    mask = mcar_mask((2000, 11), 0.5, seed=0)
    assert mask.dtype == torch.bool and mask.shape == (2000, 11)
    assert (~mask).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(mcar_mask((2000, 11), 0.5, seed=0), mask)
    assert not torch.equal(mcar_mask((2000, 11), 0.5, seed=1), mask)
    assert mcar_mask((100, 3), 0.0, seed=0).all()
    narrow = mcar_mask((4000, 2), 0.5, seed=0)
    assert (~narrow.any(1)).any()  # the MIWAE protocol allows fully missing rows
    kept = mcar_mask((4000, 2), 0.5, seed=0, keep_one_observed=True)
    assert kept.any(1).all()
    for rate in (-0.1, 1.0):
        with pytest.raises(ValueError, match="rate"):
            mcar_mask((3, 3), rate, seed=0)
