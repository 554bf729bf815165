"""Rosenblatt's perceptron: the classic mistake-driven learning rule for a linear threshold unit.

The unit predicts ``ŷ = sign(w·x + b)``. In augmented form ``x' = (x, 1)`` and ``w' = (w, b)``
the bias is one more weight and the boundary ``w'·x' = 0`` passes through the origin. With labels
``y ∈ {−1, +1}`` and ``w'`` starting at 0, the samples are visited in order, epoch after epoch:

    if  y_i w'·x'_i ≤ 0  (a mistake, or a point on the boundary):   w' ← w' + y_i x'_i

until an epoch makes no mistake (the data are then separated) or ``max_epochs`` is reached.

Novikoff's theorem (1962): if some unit vector ``u`` (``‖u‖ = 1``, augmented) separates the data
with margin ``γ = min_i y_i u·x'_i > 0``, the rule makes at most ``(R/γ)²`` updates, with
``R = max_i ‖x'_i‖``, whatever the order of the samples. On data that no line separates (XOR) it
never stops by itself.

Reference: Rosenblatt, "The perceptron: a probabilistic model for information storage and
organization in the brain", Psychological Review 65, 1958; Novikoff, "On convergence proofs for
perceptrons", 1962.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnn import checks

__all__ = ["PerceptronResult", "augment", "signs", "train", "predict", "mistake_bound"]


class PerceptronResult(NamedTuple):
    """The outcome of :func:`train`.

    Attributes:
      w: ``(d + 1,)`` augmented weights ``(w_1, ..., w_d, b)``, the input's dtype.
      updates: int32 scalar, the number of updates ``w' ← w' + y x'`` made (= mistakes).
      epochs: int32 scalar, the epochs run, the final mistake-free one included.
      converged: bool scalar, True when the last epoch run made no mistake.
    """

    w: jax.Array
    updates: jax.Array
    epochs: jax.Array
    converged: jax.Array


def augment(x) -> jax.Array:
    """``x (N, d) -> x' = (x, 1) (N, d + 1)``: a constant 1 appended to every sample, same dtype."""
    x = checks.float_array("x", x, ndim=2)
    return jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)


def signs(y) -> jax.Array:
    """Labels ``y (N,)`` as int32 signs ``s ∈ {−1, +1}``.

    The rule: ``+1 → +1``, ``−1 → −1`` and ``0 → −1``, so labels ``{−1, +1}`` are kept and labels
    ``{0, 1}`` become ``s = 2y − 1``. Labels known now must all be in ``{−1, +1}`` or all in
    ``{0, 1}``, else ``ValueError`` (a mix of ``−1`` and ``0`` means two conventions at once).
    Labels only known under ``jit`` cannot raise; any value outside ``{−1, 0, 1}`` becomes 0, and
    :func:`train` turns such a run's weights into NaN.
    """
    y = jnp.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels y must have shape (N,); got {tuple(y.shape)}.")
    if not (jnp.issubdtype(y.dtype, jnp.integer) or jnp.issubdtype(y.dtype, jnp.floating)):
        raise TypeError(f"labels y must be integers or floats in {{-1, +1}} or {{0, 1}}; got dtype {y.dtype}.")
    if checks.is_concrete(y):
        values = set(np.unique(np.asarray(y)).tolist())
        if not (values <= {-1, 1} or values <= {0, 1}):
            raise ValueError(
                f"labels y must all be in {{-1, +1}} or all in {{0, 1}} (0 is read as -1); got values "
                f"{sorted(values)}."
            )
    return jnp.where(y == 1, 1, jnp.where((y == 0) | (y == -1), -1, 0)).astype(jnp.int32)


def train(x, y, max_epochs: int = 100) -> PerceptronResult:
    """Run the perceptron rule on ``(x, y)`` from ``w' = 0`` until an epoch is mistake-free.

    Args:
      x: ``(N, d)`` floating inputs, ``N ≥ 1``; augmented here to ``x' = (x, 1)``.
      y: ``(N,)`` labels in ``{−1, +1}`` or ``{0, 1}`` (see :func:`signs` for the conversion).
      max_epochs: a positive Python int, the most passes over the data (static under jit).

    Returns:
      A :class:`PerceptronResult`. The samples are visited in the given order every epoch; an
      update happens when ``y_i w'·x'_i ≤ 0``. Jit-able: the epochs are a ``lax.while_loop`` and
      the samples a ``lax.fori_loop``.
    """
    xa = augment(x)
    s = signs(y)
    if s.shape[0] != xa.shape[0]:
        raise ValueError(f"y has {s.shape[0]} labels but x has {xa.shape[0]} samples; they must agree.")
    if xa.shape[0] == 0:
        raise ValueError("x must hold at least one sample; got shape (0, d).")
    max_epochs = checks.positive_int("max_epochs", max_epochs)
    w, updates, epochs, mistakes = _run(xa, s, jnp.asarray(max_epochs, jnp.int32))
    w = jnp.where(jnp.all(s != 0), w, jnp.nan)  # a traced label outside {−1, 0, 1}
    return PerceptronResult(w, updates, epochs, mistakes == 0)


@jax.jit
def _run(xa, s, max_epochs):
    """``(w', updates, epochs, mistakes in the last epoch)`` for ``xa (N, d+1)`` and signs ``s (N,)``."""

    def visit(i, carry):
        w, mistakes = carry
        wrong = s[i] * jnp.dot(w, xa[i]) <= 0  # a mistake: y w'·x' ≤ 0
        w = jnp.where(wrong, w + s[i] * xa[i], w)  # w' ← w' + y x'
        return w, mistakes + wrong.astype(jnp.int32)

    def epoch(state):
        w, updates, epochs, _ = state
        w, mistakes = lax.fori_loop(0, xa.shape[0], visit, (w, jnp.int32(0)))
        return w, updates + mistakes, epochs + 1, mistakes

    def keep_going(state):
        _, _, epochs, mistakes = state
        return (mistakes > 0) & (epochs < max_epochs)

    zero = jnp.int32(0)
    start = (jnp.zeros(xa.shape[1], xa.dtype), zero, zero, jnp.int32(1))  # "1 mistake": enter the loop
    return lax.while_loop(keep_going, epoch, start)


def predict(w, x) -> jax.Array:
    """Signs ``(N,)`` int32: ``+1`` where ``w'·x' > 0``, else ``−1``; ``w (d + 1,)``, ``x (N, d)``."""
    xa = augment(x)
    w = checks.float_array("w", w, ndim=1)
    if w.shape[0] != xa.shape[1]:
        raise ValueError(f"w must have shape (d + 1,) = ({xa.shape[1]},) for x of shape {x.shape}; got {w.shape}.")
    return jnp.where(xa @ w > 0, 1, -1).astype(jnp.int32)


def mistake_bound(x, y, u) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Novikoff's bound for the separator ``u (d + 1,)`` (augmented, normalized here to ``‖u‖ = 1``).

    Returns ``(bound, R, γ)`` with ``R = max_i ‖x'_i‖``, ``γ = min_i y_i u·x'_i / ‖u‖`` and
    ``bound = (R/γ)²``; the bound is only meaningful when ``γ > 0`` (``u`` separates the data),
    and is ``inf`` otherwise.
    """
    xa = augment(x)
    s = signs(y).astype(xa.dtype)
    u = checks.float_array("u", u, ndim=1)
    if u.shape[0] != xa.shape[1]:
        raise ValueError(f"u must have shape (d + 1,) = ({xa.shape[1]},) for x of shape {x.shape}; got {u.shape}.")
    radius = jnp.max(jnp.linalg.norm(xa, axis=1))
    gamma = jnp.min(s * (xa @ u)) / jnp.linalg.norm(u)
    return jnp.where(gamma > 0, (radius / gamma) ** 2, jnp.inf), radius, gamma
