"""Boundary checks shared by the public functions: they run at trace time, so also under jit."""

from __future__ import annotations

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
