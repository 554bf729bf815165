"""Boundary checks shared by the public functions: they run at trace time, so also under jit."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np

T = TypeVar("T")


def lookup(registry: Mapping[str, T], kind: str, name: str) -> T:
    """``registry[name]``, or a ``ValueError`` that lists the known names."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {kind} {name!r}; expected one of {sorted(registry)}") from None


def all_finite(tree) -> jax.Array:
    """True when every entry of every leaf is finite (no NaN, no ±inf)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def is_concrete(x) -> bool:
    """True when the values of ``x`` are known now (not a tracer under jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def float_array(name: str, x, ndim: int | None = None) -> jax.Array:
    """``x`` as a floating JAX array of rank ``ndim``; ``TypeError``/``ValueError`` otherwise."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = np.asarray(x)
        dtype = x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating array (float32, float64, ...); got dtype {dtype}. "
            f"Convert it first, e.g. {name}.astype(jnp.float32)."
        )
    if ndim is not None and jnp.ndim(x) != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions; got shape {tuple(jnp.shape(x))} "
            f"({jnp.ndim(x)} dimensions)."
        )
    return jnp.asarray(x)


def real_in(
    name: str, value, low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
) -> float:
    """``value`` as a float after checking it is a finite real in the interval ``low..high``.

    The interval is closed unless ``low_open``/``high_open``; an infinite ``high`` means no upper
    bound. Raises ``TypeError`` for non-numbers (bools included) and ``ValueError`` naming the value.
    A 0-d array counts as its number; a traced value (under ``jit``) cannot be checked and comes back
    as it is.
    """
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0 \
            and np.issubdtype(np.asarray(value).dtype, np.number):
        value = np.asarray(value).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r} of type {type(value).__name__}.")
    v = float(value)
    above = low < v if low_open else low <= v
    below = v < high if high_open else v <= high
    if not (math.isfinite(v) and above and below):
        left = "(" if low_open else "["
        right = ")" if high_open or math.isinf(high) else "]"
        raise ValueError(f"{name} must be a finite number in {left}{low:g}, {high:g}{right}; got {value!r}.")
    return v


def positive_int(name: str, value, allow_zero: bool = False) -> int:
    """``value`` after checking it is an int ``> 0`` (``≥ 0`` with ``allow_zero``); names the value otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r} of type {type(value).__name__}.")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'≥ 0' if allow_zero else '> 0'}; got {value!r}.")
    return int(value)


def prng_key(name: str, key) -> jax.Array:
    """``key`` as a PRNG key: a key array (``jax.random.PRNGKey(seed)`` or ``jax.random.key(seed)``), or a
    plain int seed, which becomes ``jax.random.PRNGKey(seed)``; ``TypeError`` otherwise."""
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return jax.random.PRNGKey(int(key))
    if isinstance(key, np.ndarray) and key.dtype == np.uint32 and key.shape == (2,):
        key = jnp.asarray(key)
    if isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
                                       or key.dtype == jnp.uint32 and key.shape == (2,)):
        return key
    raise TypeError(f"{name} must be a PRNG key (jax.random.PRNGKey(seed) or jax.random.key(seed)) or an int seed; "
                    f"got {type(key).__name__} {getattr(key, 'dtype', '')}{tuple(getattr(key, 'shape', ()))}.")


def nonempty(name: str, count: int) -> None:
    """Raise ``ValueError`` for a batch of no samples, whose mean cost is 0/0."""
    if count == 0:
        raise ValueError(f"{name} has 0 samples; the cost is a mean over the batch and needs at least one "
                         f"sample. Pass a batch of shape (N, features) with N >= 1.")


def data_set(name: str, net, params, loss, x, y, finite: bool = False):
    """``(x, y, local)`` of the ``name`` set (e.g. "training") for ``net`` (an :class:`fnn.MLP`) with
    ``params`` and ``loss`` (an :class:`fnn.losses.Loss`), after checking features, sample counts,
    targets (labels in range) and, with ``finite``, that every input and floating target is finite.
    Global arrays of several processes (``local`` False) are checked for shape only."""
    local = not isinstance(x, jax.Array) or x.is_fully_addressable
    try:
        x = net.check_input(params, x)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name} set: {e}") from None
    if x.shape[0] == 0:
        raise ValueError(f"the {name} set is empty: its x has 0 samples" +
                         ("; pass held_out=None instead." if name == "held-out" else "."))
    y = jnp.asarray(y) if local else y
    if jnp.ndim(y) == 0 or y.shape[0] != x.shape[0]:
        count = "no sample axis" if jnp.ndim(y) == 0 else f"{y.shape[0]} samples"
        raise ValueError(f"{name} targets have {count} but x has {x.shape[0]}; the first dimension of both is the "
                         f"sample (targets of shape {tuple(jnp.shape(y))}).")
    if not local:
        return x, y, local
    try:
        loss.target(jnp.zeros((x.shape[0], net.sizes[-1]), x.dtype), y)  # shapes, label range, soft targets
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name} targets: {e}") from None
    if finite:
        for what, a in (("x", x), ("targets", y)):
            if jnp.issubdtype(a.dtype, jnp.floating):
                bad = ~np.isfinite(np.asarray(a)).reshape(a.shape[0], -1).all(axis=1)
                if bad.any():
                    raise ValueError(f"{name} {what} has non-finite values in {int(bad.sum())} sample(s) (the first is "
                                     f"sample {int(np.argmax(bad))}); remove or impute them, they would make every "
                                     f"score NaN or, through a ReLU, silently finite.")
    return x, y, local
