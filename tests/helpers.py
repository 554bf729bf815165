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


ULPS = 64


def gradient_errors(manual, reference, rtol: float, ulps: int = ULPS):
    """Per leaf ``(path, error)`` where error ≤ 1 means the leaf agrees with the reference.

    A leaf agrees when ``max |m − r| ≤ rtol · max(|m|, |r|)`` over the leaf, or when the difference
    is within ``ulps`` units in the last place of the largest gradient entry of the whole tree. The
    second clause covers leaves whose exact gradient is (nearly) zero, where both sides hold only
    rounding noise from terms of the size of the other gradients (a bias in front of batch norm,
    a softmax whose upstream gradient is constant over the classes); a relative error there is
    meaningless.
    """
    import jax

    m_leaves = jax.tree_util.tree_leaves_with_path(manual)
    r_leaves = jax.tree_util.tree_leaves(reference)
    dtype = np.asarray(r_leaves[0]).dtype
    top = max(float(np.abs(np.asarray(r, np.float64)).max(initial=0)) for r in r_leaves)
    atol = ulps * float(np.finfo(dtype).eps) * top
    out = []
    for (path, m), r in zip(m_leaves, r_leaves):
        m, r = np.asarray(m, np.float64), np.asarray(r, np.float64)
        diff = float(np.abs(m - r).max(initial=0))
        scale = max(float(np.abs(m).max(initial=0)), float(np.abs(r).max(initial=0)))
        allowed = max(rtol * scale, atol)
        out.append((jax.tree_util.keystr(path), diff / allowed if allowed > 0 else diff))
    return out
