"""The data module: IDX files, MNIST (real t10k files, lookup, download), digits, synthetic sets, z-score."""

import gzip
import hashlib
import sys
import urllib.error
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fnn import data
from fnn.data import DataError

# The README of the shared data directory.
README_MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
T10K = tuple(README_MD5)
IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: "i2", 0x0C: "i4", 0x0D: "f4", 0x0E: "f8"}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """An IDX file written by hand: 00 00 code ndim, big-endian uint32 sizes, big-endian elements."""
    header = bytes([0, 0, code, arr.ndim]) + b"".join(n.to_bytes(4, "big") for n in arr.shape)
    return header + arr.astype(">" + IDX_TYPES[code]).tobytes()


@pytest.fixture(scope="module")
def mnist10k(mnist_dir) -> data.Dataset:
    return data.load_mnist_10k(mnist_dir)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $FNN_DATA_DIR, the default cache inside tmp_path, and no network: fetching fails."""
    monkeypatch.delenv("FNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def offline(url):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(data, "_fetch", offline)


def write_fake_mnist(directory: Path, n_train: int, n_test: int = 2, n_train_labels: int | None = None, label=None):
    """Raw (un-gzipped, so no MD5) MNIST-shaped files; every train pixel equals ``n_train``."""
    directory.mkdir(parents=True, exist_ok=True)
    n_labels = n_train if n_train_labels is None else n_train_labels
    labels = np.arange(n_labels, dtype=np.uint8) % 10 if label is None else np.full(n_labels, label, np.uint8)
    files = {
        "train-images-idx3-ubyte": np.full((n_train, 28, 28), n_train, np.uint8),
        "train-labels-idx1-ubyte": labels,
        "t10k-images-idx3-ubyte": np.full((n_test, 28, 28), 255, np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for name, arr in files.items():
        (directory / name).write_bytes(idx_bytes(arr, 0x08))


# ------------------------------------------------------------------------------------------ IDX


@settings(max_examples=80)
@given(
    code=st.sampled_from(sorted(IDX_TYPES)),
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    gz=st.booleans(),
    data_=st.data(),
)
def test_idx_round_trip(tmp_path_factory, code, shape, gz, data_):
    arr = data_.draw(hnp.arrays(np.dtype(IDX_TYPES[code]), tuple(shape)))
    raw = idx_bytes(arr, code)
    # Misleading names on purpose: compression must be detected by the magic bytes.
    path = tmp_path_factory.mktemp("idx") / ("array.idx" if gz else "array.gz")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    got = data.read_idx(path)
    assert got.shape == tuple(shape)
    assert got.dtype == np.dtype(IDX_TYPES[code]).newbyteorder("=")
    assert got.tobytes() == arr.tobytes()  # bit-exact, NaNs and signed zeros included


def _valid() -> bytes:
    return idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5) * 7, 0x08)


def _flip(b: bytes, i: int) -> bytes:
    return b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1 :]


BROKEN_IDX = {
    "truncated": (lambda: _valid()[:-1], "truncated"),
    "over-long": (lambda: _valid() + b"\0", "over-long"),
    "wrong-magic": (lambda: b"\x01" + _valid()[1:], "magic"),
    "zero-ndim": (lambda: _valid()[:3] + b"\0" + _valid()[4:], "magic"),
    "bad-type-code": (lambda: _valid()[:2] + b"\x0a" + _valid()[3:], "type code 0x0A"),
    "truncated-header": (lambda: _valid()[:9], "truncated IDX header"),
    "empty": (lambda: b"", "empty file"),
    "gzip-truncated": (lambda: gzip.compress(_valid())[:-5], "corrupt gzip"),
    "gzip-bad-crc": (lambda: _flip(gzip.compress(_valid()), -8), "corrupt gzip"),
    "gzip-bad-body": (lambda: _flip(gzip.compress(_valid()), 12), "corrupt gzip"),
    "gzip-of-truncated": (lambda: gzip.compress(_valid()[:-3]), "truncated"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_IDX))
def test_idx_broken_files_raise_naming_the_file(tmp_path, case):
    make, phrase = BROKEN_IDX[case]
    path = tmp_path / f"{case}.idx"
    path.write_bytes(make())
    with pytest.raises(DataError, match=phrase) as err:
        data.read_idx(path)
    assert str(path) in str(err.value)


def test_idx_length_message_says_expected_and_found(tmp_path):
    path = tmp_path / "short.idx"
    path.write_bytes(_valid()[:-1])
    with pytest.raises(DataError, match=r"shape \(3, 4, 5\) takes 76 bytes .*found 75"):
        data.read_idx(path)


# ---------------------------------------------------------------------------------- real MNIST


def test_t10k_files_have_the_readme_md5(mnist_dir):
    for name, want in README_MD5.items():
        assert md5(mnist_dir / name) == want, name


def test_read_idx_real_t10k(mnist_dir):
    images = data.read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = data.read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8


def test_mnist_10k_is_the_documented_split_of_the_real_file(mnist_dir, mnist10k):
    # Independent decode: the header is 16 bytes (magic 2051, 10000, 28, 28), then uint8 pixels.
    raw = gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert int.from_bytes(raw[:4], "big") == 2051
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(10000, 784).astype(np.float64) / 255
    y = np.frombuffer(gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
    ds = mnist10k
    assert ds.name == "mnist-10k" and ds.num_classes == 10
    assert ds.x_train.shape == (8000, 784) and ds.x_test.shape == (2000, 784)
    assert ds.y_train.shape == (8000,) and ds.y_test.shape == (2000,)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32
    for xs in (ds.x_train, ds.x_test):
        assert xs.min() == 0 and xs.max() == 1
    np.testing.assert_allclose(np.concatenate([ds.x_train, ds.x_test]), x, rtol=1e-7, atol=0)
    np.testing.assert_array_equal(ds.x_train, x[:8000].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, y[:8000])
    np.testing.assert_array_equal(ds.y_test, y[8000:])
    for ys, n in ((ds.y_train, 8000), (ds.y_test, 2000)):
        counts = np.bincount(ys, minlength=10)
        assert len(counts) == 10 and counts.min() > n // 20, counts  # every digit present, none rare


def test_load_dataset_mnist_10k_matches(mnist_dir, mnist10k):
    ds = data.load_dataset("mnist-10k", mnist_dir)
    for a, b in zip(ds, mnist10k):
        np.testing.assert_array_equal(a, b)


def test_regzipped_t10k_is_rejected_and_ungzipped_accepted(isolated, mnist_dir, mnist10k, tmp_path):
    raw_dir, regz_dir = tmp_path / "raw", tmp_path / "regz"
    raw_dir.mkdir(), regz_dir.mkdir()
    for name in T10K:
        raw = gzip.decompress((mnist_dir / name).read_bytes())
        (raw_dir / name.removesuffix(".gz")).write_bytes(raw)
        (regz_dir / name).write_bytes(gzip.compress(raw, mtime=0))  # same content, other bytes
    ds = data.load_mnist_10k(raw_dir)
    np.testing.assert_array_equal(ds.x_test, mnist10k.x_test)
    with pytest.raises(DataError, match="MD5") as err:
        data.load_mnist_10k(regz_dir)
    assert str(regz_dir / "t10k-images-idx3-ubyte.gz") in str(err.value)


def test_mnist_10k_needs_10000_images(isolated, tmp_path):
    write_fake_mnist(tmp_path / "d", n_train=3, n_test=7)
    with pytest.raises(DataError, match="10,000.*found 7"):
        data.load_mnist_10k(tmp_path / "d")


# --------------------------------------------------------------------- MNIST files: consistency


def test_image_label_count_mismatch(isolated, tmp_path):
    write_fake_mnist(tmp_path / "d", n_train=5, n_train_labels=4)
    with pytest.raises(DataError) as err:
        data.load_mnist(tmp_path / "d")
    msg = str(err.value)
    assert "5 images" in msg and "4 labels" in msg
    assert str(tmp_path / "d" / "train-images-idx3-ubyte") in msg
    assert str(tmp_path / "d" / "train-labels-idx1-ubyte") in msg


def test_labels_out_of_range(isolated, tmp_path):
    write_fake_mnist(tmp_path / "d", n_train=3, label=10)
    with pytest.raises(DataError, match="0-9; found 10"):
        data.load_mnist(tmp_path / "d")


def test_wrong_image_shape(isolated, tmp_path):
    d = tmp_path / "d"
    write_fake_mnist(d, n_train=3)
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 28, 27), np.uint8), 0x08))
    with pytest.raises(DataError, match=r"\(N, 28, 28\).*\(3, 28, 27\)"):
        data.load_mnist(d)


def test_fake_mnist_values(isolated, tmp_path):
    write_fake_mnist(tmp_path / "d", n_train=3, n_test=4)
    ds = data.load_mnist(tmp_path / "d")
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (3, 784) and ds.x_test.shape == (4, 784)
    np.testing.assert_array_equal(ds.x_train, np.float32(3 / 255))
    np.testing.assert_array_equal(ds.x_test, 1)
    np.testing.assert_array_equal(ds.y_test, [0, 1, 2, 3])
    assert ds.y_train.dtype == np.int32 and ds.x_train.dtype == np.float32


# ------------------------------------------------------------------------- MNIST files: lookup


def test_lookup_order_explicit_then_env_then_cache(isolated, tmp_path, monkeypatch):
    explicit, env, cache, incomplete = (tmp_path / d for d in ("explicit", "env", "cache", "incomplete"))
    write_fake_mnist(explicit, 1)
    write_fake_mnist(env, 2)
    write_fake_mnist(cache, 3)
    write_fake_mnist(incomplete, 4)
    (incomplete / "train-labels-idx1-ubyte").unlink()  # a directory without every file is skipped
    monkeypatch.setenv("FNN_DATA_DIR", str(env))
    assert len(data.load_mnist(explicit, cache_dir=cache).x_train) == 1
    assert len(data.load_mnist(incomplete, cache_dir=cache).x_train) == 2
    assert len(data.load_mnist(cache_dir=cache).x_train) == 2
    monkeypatch.delenv("FNN_DATA_DIR")
    assert len(data.load_mnist(incomplete, cache_dir=cache).x_train) == 3
    write_fake_mnist(tmp_path / "xdg" / "fnn" / "mnist", 5)  # the default cache under $XDG_CACHE_HOME
    assert len(data.load_mnist().x_train) == 5
    assert len(data.load_dataset("mnist", explicit).x_train) == 1


def test_missing_without_download_never_fetches(isolated, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_fetch", lambda url: pytest.fail(f"fetched {url}"))
    with pytest.raises(DataError, match="not found") as err:
        data.load_mnist(tmp_path / "nothing", cache_dir=tmp_path / "cache", download=False)
    assert str(tmp_path / "nothing") in str(err.value) and str(tmp_path / "cache") in str(err.value)


def test_offline_message_says_where_to_put_the_files(isolated, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        data.load_mnist(cache_dir=cache)
    msg = str(err.value)
    assert f"Put the files into {cache}" in msg
    assert "network disabled" in msg and "train-images-idx3-ubyte.gz" in msg and "FNN_DATA_DIR" in msg
    assert not cache.exists()


def _serving(files: dict, calls: list, fail_first_mirror: bool = False):
    def fetch(url):
        calls.append(url)
        name = url.rsplit("/", 1)[1]
        if name not in files or (fail_first_mirror and url.startswith(data._MIRRORS[0])):
            raise urllib.error.URLError(f"offline ({url})")
        return files[name]

    return fetch


def test_download_installs_verified_t10k_into_the_cache(isolated, mnist_dir, mnist10k, tmp_path, monkeypatch):
    calls = []
    served = {name: (mnist_dir / name).read_bytes() for name in T10K}
    monkeypatch.setattr(data, "_fetch", _serving(served, calls, fail_first_mirror=True))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz") as err:
        data.load_mnist(cache_dir=cache)  # the training files cannot be fetched
    assert f"Put the files into {cache}" in str(err.value)
    assert sorted(p.name for p in cache.iterdir()) == sorted(T10K)  # no partial or temporary files
    for name in T10K:
        assert md5(cache / name) == README_MD5[name]
    assert len(calls) == 2 * 4  # every file tried on both mirrors
    ds = data.load_mnist_10k(cache_dir=cache)
    np.testing.assert_array_equal(ds.x_train, mnist10k.x_train)


def test_download_completes_the_set(isolated, mnist_dir, mnist10k, tmp_path, monkeypatch):
    served = {name: (mnist_dir / name).read_bytes() for name in T10K}
    fake_train = {
        "train-images-idx3-ubyte.gz": np.full((6, 28, 28), 51, np.uint8),
        "train-labels-idx1-ubyte.gz": np.arange(6, dtype=np.uint8),
    }
    for name, arr in fake_train.items():  # stand-ins for the 60,000-image files, registered by MD5
        served[name] = gzip.compress(idx_bytes(arr, 0x08), mtime=0)
        monkeypatch.setitem(data._MD5, name, hashlib.md5(served[name]).hexdigest())
    calls = []
    monkeypatch.setattr(data, "_fetch", _serving(served, calls))
    cache = tmp_path / "cache"
    ds = data.load_mnist(cache_dir=cache)
    assert len(calls) == 4 and all(url.startswith(data._MIRRORS[0]) for url in calls)
    np.testing.assert_array_equal(ds.x_train, np.float32(0.2))
    np.testing.assert_array_equal(ds.y_train, np.arange(6))
    np.testing.assert_array_equal(ds.x_test, np.concatenate([mnist10k.x_train, mnist10k.x_test]))
    data.load_mnist(cache_dir=cache)  # now found in the cache, nothing fetched again
    assert len(calls) == 4


def test_download_with_wrong_md5_leaves_nothing(isolated, tmp_path, monkeypatch):
    calls = []
    served = {name: b"<html>not the file</html>" for name in data._MD5}
    monkeypatch.setattr(data, "_fetch", _serving(served, calls))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="MD5 [0-9a-f]{32}, expected 9fb629c4189551a2d022fa330f9573f3"):
        data.load_mnist(cache_dir=cache)
    assert len(calls) == 8
    assert not cache.exists() or not any(cache.iterdir())


def test_failed_write_leaves_no_partial_file(isolated, mnist_dir, tmp_path, monkeypatch):
    served = {name: (mnist_dir / name).read_bytes() for name in T10K}
    monkeypatch.setattr(data, "_fetch", _serving(served, []))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(data.os, "replace", broken_replace)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="disk full"):
        data.load_mnist(cache_dir=cache)
    assert list(cache.iterdir()) == []


# -------------------------------------------------------------------------------------- digits


def test_digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    ds = data.load_digits()
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    assert ds.y_train.shape == (1437,) and ds.y_test.shape == (360,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    assert x.min() == 0 and x.max() == 1
    np.testing.assert_array_equal(x * 16, np.round(x * 16))  # pixel values k / 16
    assert set(np.unique(ds.y_train)) == set(np.unique(ds.y_test)) == set(range(10))
    # The splits partition the 1,797 (image, label) pairs.
    ref = sklearn_datasets.load_digits()
    ours = np.column_stack([x.astype(np.float64) * 16, y])
    theirs = np.column_stack([ref.data, ref.target])
    np.testing.assert_array_equal(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)])
    again = data.load_digits()
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    np.testing.assert_array_equal(again.x_test, ds.x_test)


def test_digits_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'fnn\[digits\]'"):
        data.load_digits()


# ----------------------------------------------------------------------------------- synthetic


def test_xor():
    ds = data.xor()
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    for xs, ys in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert xs.dtype == np.float32 and ys.dtype == np.int32
        np.testing.assert_array_equal(xs, x)
        np.testing.assert_array_equal(ys, x[:, 0] ^ x[:, 1])
    assert ds.num_classes == 2 and ds.name == "xor"


@pytest.mark.parametrize("margin", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_blobs_have_the_promised_margin(seed, margin):
    ds = data.blobs(n=300, seed=seed, margin=margin)
    w = np.array([1.0, 1.0]) / np.sqrt(2.0)  # the documented separating direction
    assert ds.x_train.shape == (240, 2) and ds.x_test.shape == (60, 2)
    for xs, ys in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert xs.dtype == np.float32 and ys.dtype == np.int32
        signed_distance = (2 * ys - 1) * (xs.astype(np.float64) @ w)
        assert signed_distance.min() >= margin
        assert signed_distance.min() < margin + 0.5  # the margin is tight, not an accident of far blobs
        assert abs(ys.mean() - 0.5) <= 0.01


def test_blobs_are_deterministic_per_seed():
    a, b, c = data.blobs(seed=3), data.blobs(seed=3), data.blobs(seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_regression_1d():
    ds = data.regression_1d(n=100, noise=0.0, seed=5)
    assert ds.x_train.shape == ds.y_train.shape == (80, 1)
    assert ds.x_test.shape == ds.y_test.shape == (20, 1)
    assert ds.num_classes is None and ds.name == "regression-1d"
    for xs, ys in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert xs.dtype == ys.dtype == np.float32
        assert np.all(np.abs(xs) <= np.float32(np.pi))
        np.testing.assert_allclose(ys, np.sin(xs.astype(np.float64)), rtol=0, atol=1e-7)
    assert ds.x_train.min() < -2.5 and ds.x_train.max() > 2.5  # spread over the interval
    noisy = data.regression_1d(n=100, noise=0.1, seed=5)
    np.testing.assert_array_equal(noisy.x_train, ds.x_train)
    residual = noisy.y_train.astype(np.float64) - np.sin(noisy.x_train.astype(np.float64))
    assert 0.05 < residual.std() < 0.15
    cubic = data.regression_1d(n=10, noise=0.0, fn=lambda x: x**3)
    np.testing.assert_allclose(cubic.y_train, cubic.x_train.astype(np.float64) ** 3, rtol=1e-6)
    np.testing.assert_array_equal(data.regression_1d(seed=2).y_test, data.regression_1d(seed=2).y_test)


@pytest.mark.parametrize(
    "call", [lambda: data.blobs(n=4), lambda: data.blobs(margin=-1.0), lambda: data.regression_1d(noise=-0.1)]
)
def test_synthetic_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


# ------------------------------------------------------------------------------------ registry


def test_registry():
    assert set(data.DATASETS) == {"mnist", "mnist-10k", "digits", "xor", "blobs", "regression-1d"}
    with pytest.raises(ValueError, match=r"unknown data set 'cifar'.*'digits'.*'mnist-10k'.*'xor'"):
        data.load_dataset("cifar")
    for name in ("xor", "blobs", "regression-1d"):
        ds = data.load_dataset(name)
        assert ds.name == name and len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
    np.testing.assert_array_equal(data.load_dataset("blobs").x_train, data.blobs().x_train)


# ------------------------------------------------------------------------------------- z-score


def _with_constant_features(seed=0, n=50):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, (n, 5)) * np.array([1, 0, 1, 0, 10])
    x[:, 1] = 0.0
    x[:, 3] = 0.3  # constant and not exactly representable
    return x.astype(np.float32)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zscore_on_the_training_split(backend, dtype):
    x = _with_constant_features().astype(dtype)
    x = jnp.asarray(x) if backend == "jax" else x
    norm = data.fit_zscore(x)
    z = data.zscore(norm, x)
    assert z.dtype == norm.mean.dtype == norm.std.dtype == dtype
    assert isinstance(z, jax.Array) == (backend == "jax")
    z = np.asarray(z, np.float64)
    varying = [0, 2, 4]
    np.testing.assert_allclose(z[:, varying].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, varying].std(0), 1, rtol=1e-5)
    np.testing.assert_array_equal(z[:, [1, 3]], 0)  # constant features map to exactly 0
    x64 = np.asarray(x, np.float64)
    floor = 0.1 * np.sqrt(np.mean(x64.std(0) ** 2))  # the default floor: 10 % of the RMS feature std
    np.testing.assert_allclose(np.asarray(norm.std)[[1, 3]], floor, rtol=1e-5)
    assert floor < x64[:, varying].std(0).min()  # so the varying features are not floored here
    # Against an independent float64 reference.
    x64 = np.asarray(x, np.float64)[:, varying]
    np.testing.assert_allclose(z[:, varying], (x64 - x64.mean(0)) / x64.std(0), atol=1e-5)


def test_zscore_floor_tames_nearly_constant_features():
    """Without a floor a feature with a tiny training std blows held-out values up to huge z-scores."""
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 1, 200), np.r_[np.zeros(199), 1e-4]], axis=1).astype(np.float32)
    held_out = np.array([[0.0, 0.1]], np.float32)
    assert abs(data.zscore(data.fit_zscore(x, min_std=0), held_out)[0, 1]) > 1000
    tamed = data.zscore(data.fit_zscore(x), held_out)[0, 1]
    assert abs(tamed) < 10
    np.testing.assert_array_equal(data.fit_zscore(x, min_std=0).std[1], np.float32(np.std(x[:, 1].astype(np.float64))))
    constant = np.ones((5, 2), np.float32)
    np.testing.assert_array_equal(data.fit_zscore(constant).std, 1)  # nothing varies: no floor, std 1
    with pytest.raises(ValueError, match="min_std"):
        data.fit_zscore(x, min_std=-1.0)


def test_zscore_does_not_leak_the_test_split():
    x = _with_constant_features(n=60)
    ds = data.Dataset(x[:40], np.zeros(40, np.int32), x[40:], np.zeros(20, np.int32), 2, "toy")
    other = ds._replace(x_test=ds.x_test * 100 + 7)
    (a, norm_a), (b, norm_b) = data.zscore_dataset(ds), data.zscore_dataset(other)
    for u, v in zip(norm_a, norm_b):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(b.x_test, data.zscore(norm_a, other.x_test))
    np.testing.assert_allclose(np.asarray(norm_a.mean)[0], x[:40, 0].astype(np.float64).mean(), rtol=1e-6)
    assert a.x_test.dtype == np.float32 and a.y_test is ds.y_test
    assert abs(a.x_test[:, 0].mean()) > 1e-3  # test statistics are not forced to 0


def test_zscore_under_jit_and_mixed_inputs():
    x = _with_constant_features()
    norm = data.fit_zscore(x)
    z_jit = jax.jit(data.zscore)(norm, jnp.asarray(x))
    np.testing.assert_allclose(z_jit, data.zscore(norm, x), rtol=1e-6, atol=1e-6)
    norm64 = data.Normalizer(norm.mean.astype(np.float64), norm.std.astype(np.float64))
    assert data.zscore(norm64, x).dtype == np.float32  # x's dtype wins


def test_zscore_bad_input():
    norm = data.fit_zscore(_with_constant_features())
    with pytest.raises(TypeError, match="floating"):
        data.fit_zscore(np.ones((3, 2), np.int32))
    with pytest.raises(ValueError, match=r"\(N, 5\).*\(3, 4\)"):
        data.zscore(norm, np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        data.fit_zscore(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="at least one sample"):
        data.fit_zscore(np.ones((0, 3), np.float32))
