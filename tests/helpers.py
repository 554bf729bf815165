"""Independent references and strategies shared by the tests (NumPy, float64; never fnn code)."""

from __future__ import annotations

import numpy as np


def np_sigmoid(z):
    z = np.asarray(z, np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1 / (1 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1 + e)
    return out


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rel_err(a, b) -> float:
    """``max |a − b| / max(|a|, |b|)`` over a whole leaf; 0 when both are exactly 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(a).max(initial=0), np.abs(b).max(initial=0))
    diff = np.abs(a - b).max(initial=0)
    return diff / scale if scale > 0 else diff
