"""Weight initializers: one function per scheme, ``(key, fan_in, fan_out, dtype) -> (W, b)``.

``W`` has shape ``(fan_out, fan_in)`` and ``b`` shape ``(fan_out,)``. With ``n = fan_in``:

==================  ===========================================  ==========================
name                W                                            b
==================  ===========================================  ==========================
``classic``         U(−1/√n, 1/√n)                               U(−1/√n, 1/√n)
``xavier_normal``   N(0, 1/n)                                    0
``xavier_uniform``  U(−√(6/(n+m)), √(6/(n+m))), m = fan_out      0
``glorot_normal``   N(0, 2/(n+m))                                0
``he_normal``       N(0, 2/n)                                    0
``he_uniform``      U(−√(6/n), √(6/n))                           0
==================  ===========================================  ==========================

``classic`` is the uniform fan-in rule of the early literature (and PyTorch's ``nn.Linear``
default). ``xavier_normal`` is the fan-in form N(0, 1/n) used in the course notes;
``xavier_uniform`` and ``glorot_normal`` are the "normalized initialization" of Glorot & Bengio
(2010, eq. 16), variance 2/(n+m). ``he_*`` is He et al. (2015), variance 2/n, for ReLU layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Initializer = Callable[[jax.Array, int, int, jnp.dtype], tuple[jax.Array, jax.Array]]


def _uniform(key, shape, limit, dtype):
    return jax.random.uniform(key, shape, dtype, -limit, limit)


def _normal(key, shape, std, dtype):
    return std * jax.random.normal(key, shape, dtype)


def classic(key, fan_in, fan_out, dtype=jnp.float32):
    """W, b ~ U(−1/√fan_in, 1/√fan_in)."""
    kw, kb = jax.random.split(key)
    limit = 1 / math.sqrt(fan_in)
    return _uniform(kw, (fan_out, fan_in), limit, dtype), _uniform(kb, (fan_out,), limit, dtype)


def xavier_normal(key, fan_in, fan_out, dtype=jnp.float32):
    """W ~ N(0, 1/fan_in), b = 0."""
    return _normal(key, (fan_out, fan_in), math.sqrt(1 / fan_in), dtype), jnp.zeros(fan_out, dtype)


def xavier_uniform(key, fan_in, fan_out, dtype=jnp.float32):
    """W ~ U(±√(6/(fan_in+fan_out))), b = 0 (Glorot & Bengio 2010, eq. 16)."""
    limit = math.sqrt(6 / (fan_in + fan_out))
    return _uniform(key, (fan_out, fan_in), limit, dtype), jnp.zeros(fan_out, dtype)


def glorot_normal(key, fan_in, fan_out, dtype=jnp.float32):
    """W ~ N(0, 2/(fan_in+fan_out)), b = 0."""
    std = math.sqrt(2 / (fan_in + fan_out))
    return _normal(key, (fan_out, fan_in), std, dtype), jnp.zeros(fan_out, dtype)


def he_normal(key, fan_in, fan_out, dtype=jnp.float32):
    """W ~ N(0, 2/fan_in), b = 0 (He et al. 2015)."""
    return _normal(key, (fan_out, fan_in), math.sqrt(2 / fan_in), dtype), jnp.zeros(fan_out, dtype)


def he_uniform(key, fan_in, fan_out, dtype=jnp.float32):
    """W ~ U(±√(6/fan_in)), b = 0 (variance 2/fan_in)."""
    return _uniform(key, (fan_out, fan_in), math.sqrt(6 / fan_in), dtype), jnp.zeros(fan_out, dtype)


INITIALIZERS: dict[str, Initializer] = {
    f.__name__: f
    for f in (classic, xavier_normal, xavier_uniform, glorot_normal, he_normal, he_uniform)
}
"""Every initializer by name."""
