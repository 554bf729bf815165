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
``sparse``          15 entries per row N(0, 1), the others 0     0
==================  ===========================================  ==========================

``classic`` is the uniform fan-in rule of the early literature (and PyTorch's ``nn.Linear``
default). ``xavier_normal`` is the fan-in form N(0, 1/n) used in the course notes;
``xavier_uniform`` and ``glorot_normal`` are the "normalized initialization" of Glorot & Bengio
(2010, eq. 16), variance 2/(n+m). ``he_*`` is He et al. (2015), variance 2/n, for ReLU layers.
``sparse`` is the sparse initialization of Martens ("Deep learning via Hessian-free optimization",
ICML 2010, section 5): each unit has ``min(15, n)`` non-zero incoming weights, at positions drawn
without replacement, each N(0, 1), so that units differ without the incoming sum saturating them
(variance over all weights ``min(15, n)/n``).
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


SPARSE_CONNECTIONS = 15
"""Non-zero incoming weights per unit of :func:`sparse` (Martens 2010)."""


def sparse(key, fan_in, fan_out, dtype=jnp.float32):
    """Per row ``min(15, fan_in)`` entries of W at distinct random positions, each N(0, 1); the rest
    of W and b are 0 (Martens 2010)."""
    k_pos, k_val = jax.random.split(key)
    keep = min(SPARSE_CONNECTIONS, fan_in)
    # a random permutation per row; its first ``keep`` columns are the row's connections
    ranks = jnp.argsort(jax.random.uniform(k_pos, (fan_out, fan_in)), axis=1)
    mask = jnp.zeros((fan_out, fan_in), bool).at[jnp.arange(fan_out)[:, None], ranks[:, :keep]].set(True)
    return jnp.where(mask, jax.random.normal(k_val, (fan_out, fan_in), dtype), 0), jnp.zeros(fan_out, dtype)


INITIALIZERS: dict[str, Initializer] = {
    f.__name__: f
    for f in (classic, xavier_normal, xavier_uniform, glorot_normal, he_normal, he_uniform, sparse)
}
"""Every initializer by name."""
