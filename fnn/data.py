"""Data sets as plain NumPy arrays, and z-score normalization fitted on the training split.

Every loader returns a :class:`Dataset` ``(x_train, y_train, x_test, y_test, num_classes, name)``
with samples as rows: inputs ``x`` are float32 ``(N, d)``; class labels ``y`` are int32 ``(N,)`` in
``[0, num_classes)``; regression targets are float32 ``(N, k)`` with ``num_classes=None``.

=================  ===========================================================  ==============
name               content                                                      train / test
=================  ===========================================================  ==============
``mnist``          the four standard MNIST files, found or downloaded           60,000/10,000
``mnist-10k``      the real 10,000-image MNIST test set alone: first 8,000      8,000/2,000
                   train, last 2,000 held out
``digits``         scikit-learn's 8×8 digits, pixels / 16, fixed permutation    1,437/360
``xor``            the four XOR points (test = train)                           4/4
``blobs``          two Gaussian blobs in 2-D with a guaranteed margin           160/40
``regression-1d``  ``y = sin(x) + noise``, ``x`` uniform on ``[−π, π]``          160/40
=================  ===========================================================  ==============

MNIST files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``, or the same names un-gzipped) are
looked up in ``data_dir``, then ``$FNN_DATA_DIR``, then the cache ``$XDG_CACHE_HOME/fnn/mnist``
(default ``~/.cache/fnn/mnist``); the first directory holding every file needed wins. Gzipped files
must have the standard MD5s; un-gzipped ones are checked by shape and label range only.

Note on ``mnist-10k``: MNIST's documentation says the first 5,000 test images (writers from NIST's
SD-3) are cleaner and easier than the last 5,000 (SD-1), so the 2,000 held-out images come from
the harder half and their accuracy is a pessimistic estimate.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn import checks


class DataError(ValueError):
    """A data file is missing, truncated, corrupt or inconsistent; the message names the file."""


class Dataset(NamedTuple):
    """A train/test split as NumPy arrays in host memory (``jnp.asarray`` moves them to a device).

    Attributes:
      x_train: ``(N_train, d)`` float32 inputs, samples as rows.
      y_train: ``(N_train,)`` int32 class labels in ``[0, num_classes)``, or ``(N_train, k)``
        float32 targets for regression.
      x_test: ``(N_test, d)`` float32, the held-out inputs.
      y_test: ``(N_test,)`` or ``(N_test, k)``, as ``y_train``.
      num_classes: the number of classes; ``None`` for regression.
      name: the registry name (``"mnist"``, ``"digits"``, ...).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None
    name: str


# ---------------------------------------------------------------------------------------- IDX

# IDX type code -> element type as stored (big-endian).
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (MNIST's format), gzip-compressed or raw.

    Layout, big-endian: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions ``ndim ≥ 1``, ``ndim`` uint32 sizes, then
    the ``prod(sizes)`` elements in C order and nothing else. Compression is recognised by the gzip
    magic bytes ``1f 8b``, not by the file name.

    Returns:
      An array of shape ``sizes`` with the stored element type, in native byte order.

    Raises:
      DataError: the file is not IDX, is truncated or over-long, or is a corrupt gzip stream.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip stream ({e}); replace the file with a fresh copy.") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[3] == 0:
        raise DataError(
            f"{path}: not an IDX file: expected the magic bytes 00 00 <type code> <ndim ≥ 1>, "
            f"found {data[:4].hex(' ') or 'an empty file'}."
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        known = ", ".join(f"0x{c:02X} {t.name}" for c, t in _IDX_TYPES.items())
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X}; expected one of {known}.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, found {len(data)}.")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_TYPES[code]
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "over-long"
        raise DataError(
            f"{path}: {kind} IDX file: a {dtype.name} array of shape {shape} takes {expected} bytes "
            f"(uncompressed), found {len(data)}; replace the file with a complete copy."
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


# -------------------------------------------------------------------------------------- MNIST

_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/")
_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_TRAIN = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _search_dirs(data_dir, cache_dir) -> list[Path]:
    """``[data_dir, $FNN_DATA_DIR, cache]`` without the unset ones; the cache is always last."""
    cache = cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fnn" / "mnist"
    return [Path(d).expanduser() for d in (data_dir, os.environ.get("FNN_DATA_DIR"), cache) if d]


def _locate(stems: tuple[str, ...], dirs: list[Path]) -> list[Path] | None:
    """The files ``stem.gz`` (preferred) or ``stem`` from the first directory that has all of them."""
    for d in dirs:
        found = [next((d / n for n in (s + ".gz", s) if (d / n).is_file()), None) for s in stems]
        if all(found):
            return found
    return None


def _md5_problem(name: str, data: bytes) -> str | None:
    """Why ``data`` is not the standard file ``name``; None if it is, or if ``name`` has no known MD5."""
    want = _MD5.get(name)
    got = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return None if want in (None, got) else f"MD5 {got}, expected {want}"


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``x (N, 784)`` float32 in [0, 1] and ``y (N,)`` int32 in [0, 10) from an MNIST image/label file pair."""
    for path in (images_path, labels_path):
        problem = _md5_problem(path.name, path.read_bytes())
        if problem:
            raise DataError(
                f"{path}: not the standard MNIST file ({problem}). Replace it with the original from "
                f"{_MIRRORS[0]}{path.name}, or un-gzip it (un-gzipped files are checked by shape only)."
            )
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise DataError(
            f"{images_path}: expected uint8 images of shape (N, 28, 28); found {images.dtype} {images.shape}."
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{labels_path}: expected uint8 labels of shape (N,); found {labels.dtype} {labels.shape}.")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            f"both files must come from the same MNIST split."
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: labels must be digits 0-9; found {labels.max()}.")
    return images.reshape(len(images), -1).astype(np.float32) / np.float32(255), labels.astype(np.int32)


def _fetch(url: str) -> bytes:
    """The bytes at ``url``: this module's only network access."""
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file and a rename, so it is never seen half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(name: str, cache: Path) -> str | None:
    """Install ``cache/name`` from the first mirror serving the right bytes; None, or why every mirror failed."""
    failures = []
    for url in (mirror + name for mirror in _MIRRORS):
        try:
            data = _fetch(url)
        except (OSError, http.client.HTTPException) as e:
            failures.append(f"{url}: {e}")
            continue
        problem = _md5_problem(name, data)
        if problem is None:
            _write_atomic(cache / name, data)
            return None
        failures.append(f"{url}: {problem}")
    return "; ".join(failures)


def _not_found(stems: tuple[str, ...], dirs: list[Path], why: str = "") -> DataError:
    names = ", ".join(s + ".gz" for s in stems)
    return DataError(
        f"MNIST files not found: looked for {names} (gzipped or not) in {', '.join(map(str, dirs))}.{why} "
        f"Put the files into {dirs[-1]} (or pass data_dir=..., or set FNN_DATA_DIR to their directory); "
        f"they are served at {_MIRRORS[0]}. With only the two t10k files, use load_dataset('mnist-10k')."
    )


def load_mnist(data_dir: str | os.PathLike | None = None, *, cache_dir=None, download: bool = True) -> Dataset:
    """MNIST: 60,000 training and 10,000 test images of handwritten digits.

    Args:
      data_dir: a directory to search first (see the module docstring for the search order).
      cache_dir: overrides the cache directory (the last one searched, and where downloads go).
      download: when no directory has all four files, fetch the missing ones from the standard
        mirrors into the cache, verifying their MD5s; nothing is written for a failed download.

    Returns:
      ``Dataset`` with ``x (N, 784)`` float32 in [0, 1] (pixel / 255, rows of the 28×28 image),
      ``y (N,)`` int32 in [0, 10), ``num_classes=10``, ``name="mnist"``.

    Raises:
      DataError: files missing (and not downloadable), damaged or inconsistent; it says where to
        put them.
    """
    stems = _TRAIN + _TEST
    dirs = _search_dirs(data_dir, cache_dir)
    paths = _locate(stems, dirs)
    if paths is None and download:
        cache = dirs[-1]
        missing = [s + ".gz" for s in stems if _locate((s,), [cache]) is None]
        failures = [f"{name}: {why}" for name in missing if (why := _download(name, cache))]
        if failures:
            raise _not_found(stems, dirs, " Downloading failed: " + " | ".join(failures) + ".")
        paths = _locate(stems, [cache])
    if paths is None:
        raise _not_found(stems, dirs)
    x_train, y_train = _read_pair(*paths[:2])
    x_test, y_test = _read_pair(*paths[2:])
    return Dataset(x_train, y_train, x_test, y_test, 10, "mnist")


def load_mnist_10k(data_dir: str | os.PathLike | None = None, *, cache_dir=None) -> Dataset:
    """The real 10,000-image MNIST test set alone, split in file order: first 8,000 train, last 2,000 test.

    Needs only ``t10k-images-idx3-ubyte(.gz)`` and ``t10k-labels-idx1-ubyte(.gz)``, searched like
    :func:`load_mnist`'s files (never downloaded). The held-out 2,000 come from the harder half of
    the test set (see the module docstring).

    Returns:
      ``Dataset`` with ``x_train (8000, 784)``, ``x_test (2000, 784)`` float32 in [0, 1],
      ``y (N,)`` int32 in [0, 10), ``num_classes=10``, ``name="mnist-10k"``.

    Raises:
      DataError: files missing, damaged, or not holding 10,000 images.
    """
    dirs = _search_dirs(data_dir, cache_dir)
    paths = _locate(_TEST, dirs)
    if paths is None:
        raise _not_found(_TEST, dirs)
    x, y = _read_pair(*paths)
    if len(x) != 10_000:
        raise DataError(f"{paths[0]}: mnist-10k needs the 10,000-image MNIST test set; found {len(x)} images.")
    return Dataset(x[:8000], y[:8000], x[8000:], y[8000:], 10, "mnist-10k")


# ------------------------------------------------------------------------- digits and synthetic


def load_digits() -> Dataset:
    """scikit-learn's bundled digits: 1,797 real 8×8 images of handwritten digits, no download.

    Pixels 0–16 are divided by 16. The split is fixed: ``numpy.random.RandomState(0).permutation(1797)``
    (a legacy stream NumPy keeps frozen), first 1,437 train, last 360 test (not stratified).

    Returns:
      ``Dataset`` with ``x (N, 64)`` float32 in [0, 1], ``y (N,)`` int32 in [0, 10),
      ``num_classes=10``, ``name="digits"``.

    Raises:
      ImportError: scikit-learn is not installed (``pip install 'fnn[digits]'``).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise ImportError(
            "the 'digits' data set is bundled with scikit-learn, which is not installed; "
            "install it with: pip install 'fnn[digits]'"
        ) from e
    bunch = sklearn_digits()
    x, y = (bunch.data / 16).astype(np.float32), bunch.target.astype(np.int32)
    order = np.random.RandomState(0).permutation(len(x))
    train, test = order[:-360], order[-360:]
    return Dataset(x[train], y[train], x[test], y[test], 10, "digits")


def _hold_out(x: np.ndarray, y: np.ndarray, num_classes: int | None, name: str) -> Dataset:
    """The last ``N // 5`` samples held out as the test split."""
    n_test = len(x) // 5
    return Dataset(x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:], num_classes, name)


def _check_size(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 5:
        raise ValueError(f"n must be an int ≥ 5 (the last n // 5 samples are the test split); got {n!r}.")


def xor() -> Dataset:
    """The four XOR points ``x ∈ {0, 1}²`` with ``y = x_1 XOR x_2``; the test split is the same 4 points.

    Returns:
      ``Dataset`` with ``x (4, 2)`` float32 rows ``(0,0), (0,1), (1,0), (1,1)``, ``y (4,)`` int32
      ``[0, 1, 1, 0]``, ``num_classes=2``, ``name="xor"``.
    """
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    y = np.array([0, 1, 1, 0], np.int32)
    return Dataset(x, y, x.copy(), y.copy(), 2, "xor")


def blobs(n: int = 200, seed: int = 0, margin: float = 0.5) -> Dataset:
    """Two linearly separable Gaussian blobs in 2-D, separated by a guaranteed margin.

    The boundary is the line ``w·x = 0`` with unit normal ``w = (1, 1)/√2``. Sample ``i`` has label
    ``y = i mod 2`` and sign ``s = 2y − 1``; it is drawn from ``N(s (margin + 2) w, I)`` and redrawn
    until ``s w·x ≥ margin`` (checked on the stored float32 values), so every point lies at distance
    ≥ ``margin`` from the boundary. Deterministic given ``seed`` (``numpy.random.RandomState``).

    Returns:
      ``Dataset`` with ``x (N, 2)`` float32, ``y (N,)`` int32 in {0, 1}, the last ``n // 5`` held
      out, ``num_classes=2``, ``name="blobs"``.
    """
    _check_size(n)
    if not margin >= 0:
        raise ValueError(f"margin must be ≥ 0; got {margin!r}.")
    rng = np.random.RandomState(seed)
    w = np.array([1.0, 1.0]) / np.sqrt(2)
    y = np.arange(n, dtype=np.int32) % 2
    sign = 2.0 * y - 1
    x = np.empty((n, 2), np.float32)
    todo = np.arange(n)
    while todo.size:
        x[todo] = sign[todo, None] * (margin + 2) * w + rng.standard_normal((todo.size, 2))
        todo = todo[sign[todo] * (x[todo].astype(np.float64) @ w) < margin]
    return _hold_out(x, y, 2, "blobs")


def regression_1d(
    n: int = 200, noise: float = 0.1, seed: int = 0, fn: Callable[[np.ndarray], np.ndarray] = np.sin
) -> Dataset:
    """A 1-D regression set: ``x ~ U[−π, π]``, ``y = fn(x) + noise · N(0, 1)``.

    Deterministic given ``seed`` (``numpy.random.RandomState``); ``fn`` is applied elementwise to
    the float32 ``x`` (as float64) and must keep its ``(N, 1)`` shape.

    Returns:
      ``Dataset`` with ``x (N, 1)`` and ``y (N, 1)`` float32, the last ``n // 5`` held out,
      ``num_classes=None``, ``name="regression-1d"``.
    """
    _check_size(n)
    if not noise >= 0:
        raise ValueError(f"noise must be ≥ 0 (the standard deviation of the target noise); got {noise!r}.")
    rng = np.random.RandomState(seed)
    x = rng.uniform(-np.pi, np.pi, (n, 1)).astype(np.float32)
    clean = np.asarray(fn(x.astype(np.float64)))
    if clean.shape != (n, 1):
        raise ValueError(f"fn must map x of shape {(n, 1)} to the same shape; got {clean.shape}.")
    y = (clean + noise * rng.standard_normal((n, 1))).astype(np.float32)
    return _hold_out(x, y, None, "regression-1d")


# ------------------------------------------------------------------------------------ registry

# name -> loader(data_dir); data_dir (None: the default search) is ignored by the built-in sets.
DATASETS: dict[str, Callable[[str | os.PathLike | None], Dataset]] = {
    "mnist": load_mnist,
    "mnist-10k": load_mnist_10k,
    "digits": lambda data_dir=None: load_digits(),
    "xor": lambda data_dir=None: xor(),
    "blobs": lambda data_dir=None: blobs(),
    "regression-1d": lambda data_dir=None: regression_1d(),
}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """The data set ``name`` from :data:`DATASETS` with its default arguments; ``ValueError`` if unknown.

    ``data_dir`` is searched first by the file-backed sets (``mnist``, ``mnist-10k``); the others
    ignore it.
    """
    return checks.lookup(DATASETS, "data set", name)(data_dir)


# ------------------------------------------------------------------------------------- z-score


class Normalizer(NamedTuple):
    """Per-feature statistics of a training split: ``mean (d,)`` and ``std (d,)``, the input's dtype."""

    mean: np.ndarray | jax.Array
    std: np.ndarray | jax.Array


def _xp(*arrays):
    """``jax.numpy`` if any argument is a JAX array (or tracer), else ``numpy``: results stay on their side."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _check_features(name: str, x, d: int | None = None) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating NumPy or JAX array; got {type(x).__name__} of dtype {dtype}.")
    if x.ndim != 2 or (d is not None and x.shape[1] != d):
        want = f"(N, {d})" if d is not None else "(N, d)"
        raise ValueError(f"{name} must have shape {want}, samples as rows; got {tuple(x.shape)}.")


def fit_zscore(x_train, min_std: float | None = None) -> Normalizer:
    """Per-feature mean and (population) standard deviation of the training split ``x_train (N, d)``.

    Standard deviations below a floor are raised to it: ``min_std``, by default 10 % of the root
    mean square of the per-feature standard deviations. Without a floor, a feature that is nearly
    constant in training (MNIST's edge pixels: std 4e-5 on ``mnist-10k``) maps a held-out value of
    0.13 to a z-score of 3,000. Constant features map to exactly 0; with ``min_std=0`` they get
    ``std = 1`` instead of dividing by zero. Fit on the training split only and apply the result to
    every split, so no test statistics leak in. NumPy input gives NumPy statistics (accumulated in
    float64), JAX input JAX statistics; both in the input's floating dtype.
    """
    _check_features("x_train", x_train)
    if x_train.shape[0] == 0:
        raise ValueError("x_train must hold at least one sample to fit a z-score; got shape (0, d).")
    if min_std is not None and not min_std >= 0:
        raise ValueError(f"min_std must be >= 0 or None; got {min_std!r}.")
    xp = _xp(x_train)
    acc = np.float64 if xp is np else None
    lo, hi = x_train.min(axis=0), x_train.max(axis=0)
    constant = lo == hi
    mean = xp.where(constant, lo, xp.mean(x_train, axis=0, dtype=acc))
    std = xp.where(constant, 0, xp.std(x_train, axis=0, dtype=acc))
    floor = 0.1 * xp.sqrt(xp.mean(std * std)) if min_std is None else xp.asarray(min_std, std.dtype)
    std = xp.where(floor > 0, xp.maximum(std, floor), xp.where(constant, 1, std))
    return Normalizer(mean.astype(x_train.dtype), std.astype(x_train.dtype))


def zscore(normalizer: Normalizer, x):
    """``(x − mean) / std`` per feature: ``x (N, d)`` -> ``(N, d)`` of ``x``'s dtype; jit-able."""
    _check_features("x", x, d=normalizer.mean.shape[0])
    xp = _xp(x, *normalizer)
    return (xp.asarray(x) - normalizer.mean.astype(x.dtype)) / normalizer.std.astype(x.dtype)


def zscore_dataset(dataset: Dataset) -> tuple[Dataset, Normalizer]:
    """``dataset`` with both splits' ``x`` z-scored by statistics fitted on ``x_train`` alone."""
    normalizer = fit_zscore(dataset.x_train)
    x_train, x_test = (zscore(normalizer, x) for x in (dataset.x_train, dataset.x_test))
    return dataset._replace(x_train=x_train, x_test=x_test), normalizer
