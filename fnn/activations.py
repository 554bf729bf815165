"""Activation functions φ, each paired with its hand-written derivative φ'.

Every activation is an :class:`Activation` with

- ``phi(z)``: the activation itself, ``a = φ(z)``, applied to a batch ``z: (batch, units)``;
- ``backward(z, a, g)``: the vector-Jacobian product ``g · ∂a/∂z`` that the δ-recursion needs.
  For the element-wise activations it is ``g ⊙ φ'(z)`` (BP1/BP2 of the notes). For softmax the
  Jacobian is ``∂a_i/∂z_j = a_i(δ_ij − a_j)``, not diagonal, so ``backward`` returns
  ``a ⊙ (g − Σ_k g_k a_k)``.

Second order (for :mod:`fnn.curvature`): ``d2phi(z) = φ''(z)`` for the element-wise activations, and
``backward_r(z, a, g, r)``, the derivative of ``backward(z, a, g)`` with respect to ``z`` in the
direction ``r`` with ``g`` held fixed: ``g ⊙ φ''(z) ⊙ r`` element-wise; for softmax, with
``ȧ = a ⊙ (r − Σ_k a_k r_k)``, it is ``ȧ ⊙ (g − Σ_k g_k a_k) − a ⊙ Σ_k g_k ȧ_k``. Every Jacobian
here is symmetric (diagonal, or softmax's ``diag(a) − a aᵀ``), so ``backward(z, a, r)`` is also the
forward directional derivative ``∂a/∂z · r``.

Adding an activation is one edit here: write φ, φ' and φ'' side by side and register them.

NaN never vanishes: for every activation, ``φ(NaN)`` and ``φ'(NaN)`` are NaN (a ``where(z > 0, z, 0)``
would map a NaN input to a finite 0), while ``φ'(0)`` keeps the convention of ``jax.grad`` of ``φ``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

Array = jnp.ndarray

LEAKY_SLOPE = 0.01
"""Slope of ``leaky_relu`` for ``z < 0``."""


class Activation(NamedTuple):
    """An activation φ and its derivative.

    Attributes:
      name: the registry name, as accepted by :class:`fnn.MLP`.
      phi: ``z -> φ(z)``, any shape, element-wise (or row-wise for softmax).
      dphi: ``z -> φ'(z)`` for element-wise activations; ``None`` for softmax, whose
        derivative is a Jacobian.
      backward: ``(z, a, g) -> g ∂a/∂z``, with ``a = φ(z)`` and ``g = ∂C/∂a``.
      d2phi: ``z -> φ''(z)`` for element-wise activations; ``None`` for softmax.
      backward_r: ``(z, a, g, r) -> ∂/∂z[backward(z, a, g)] · r`` with ``g`` fixed (module docstring);
        ``None`` for an activation without second derivatives (curvature then refuses it).
    """

    name: str
    phi: Callable[[Array], Array]
    dphi: Callable[[Array], Array] | None
    backward: Callable[[Array, Array, Array], Array]
    d2phi: Callable[[Array], Array] | None = None
    backward_r: Callable[[Array, Array, Array, Array], Array] | None = None


def _elementwise(name: str, phi, dphi, d2phi) -> Activation:
    # BP1/BP2 for element-wise φ: the Jacobian is diagonal, so g ∂a/∂z = g ⊙ φ'(z); its derivative
    # in z along r is g ⊙ φ''(z) ⊙ r.
    return Activation(name, phi, dphi, lambda z, a, g: g * dphi(z), d2phi, lambda z, a, g, r: g * d2phi(z) * r)


def _sigmoid(z):
    # lax.logistic evaluates 1/(1+e^{-z}) without overflow: σ(-1000) = 0, σ(1000) = 1.
    return lax.logistic(z)


def _dsigmoid(z):
    s = lax.logistic(z)
    return s * (1 - s)


def _dtanh(z):
    t = jnp.tanh(z)
    return 1 - t * t


def _d2sigmoid(z):
    s = lax.logistic(z)
    return s * (1 - s) * (1 - 2 * s)


def _d2tanh(z):
    t = jnp.tanh(z)
    return -2 * t * (1 - t * t)


def _zero_curvature(z):
    # φ'' = 0 for the piecewise-linear activations (everywhere but the kink, as jax.grad has it)
    return _nan_through(z, jnp.zeros_like(z))


def _nan_through(z, d):
    """``d`` with NaN wherever ``z`` is NaN (a comparison such as ``z > 0`` is False for NaN)."""
    return jnp.where(jnp.isnan(z), z, d)


def _relu(z):
    # where, not maximum: autodiff of maximum splits the tie at z = 0 (slope ½), and z = 0 exactly
    # is common (a zero input row with zero biases). `z <= 0` is False for NaN, so NaN passes through.
    return jnp.where(z <= 0, 0, z).astype(z.dtype)


def _drelu(z):
    # φ'(0) := 0, the same sub-gradient convention as jax.nn.relu (and jax.grad of _relu).
    return _nan_through(z, (z > 0).astype(z.dtype))


def _leaky_relu(z):
    return jnp.where(z > 0, z, LEAKY_SLOPE * z)


def _dleaky_relu(z):
    return _nan_through(z, jnp.where(z > 0, 1, LEAKY_SLOPE).astype(z.dtype))


def _didentity(z):
    return _nan_through(z, jnp.ones_like(z))


def _elu(z):
    return jnp.where(z > 0, z, jnp.expm1(jnp.where(z > 0, 0, z)))


def _delu(z):
    return jnp.where(z > 0, 1, jnp.exp(jnp.where(z > 0, 0, z))).astype(z.dtype)


def _d2elu(z):
    return jnp.where(z > 0, 0, jnp.exp(jnp.where(z > 0, 0, z))).astype(z.dtype)


def _softplus(z):
    # log(1 + e^z), computed as logaddexp(z, 0) so that it neither overflows nor loses z ≫ 0.
    return jnp.logaddexp(z, 0)


def _silu(z):
    return z * lax.logistic(z)


def _dsilu(z):
    s = lax.logistic(z)
    return s * (1 + z * (1 - s))


def _d2silu(z):
    # d/dz [s (1 + z (1 − s))] = s(1 − s)(2 + z(1 − 2s)), s = σ(z)
    s = lax.logistic(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def softmax(z: Array) -> Array:
    """Row-wise softmax ``a_i = e^{z_i − m} / Σ_k e^{z_k − m}`` with ``m = max_k z_k`` (no overflow)."""
    e = jnp.exp(z - lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True)))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_backward(z, a, g):
    # Softmax Jacobian ∂a_i/∂z_j = a_i(δ_ij − a_j), so (g ∂a/∂z)_j = a_j (g_j − Σ_k g_k a_k).
    return a * (g - jnp.sum(g * a, axis=-1, keepdims=True))


def _softmax_backward_r(z, a, g, r):
    # d/dz of a ⊙ (g − Σ g a) along r, g fixed: ȧ ⊙ (g − Σ g a) − a ⊙ Σ g ȧ, with ȧ = a ⊙ (r − Σ a r).
    da = _softmax_backward(z, a, r)
    return da * (g - jnp.sum(g * a, axis=-1, keepdims=True)) - a * jnp.sum(g * da, axis=-1, keepdims=True)


ACTIVATIONS: dict[str, Activation] = {
    act.name: act
    for act in (
        _elementwise("identity", lambda z: z, _didentity, _zero_curvature),
        _elementwise("sigmoid", _sigmoid, _dsigmoid, _d2sigmoid),
        _elementwise("tanh", jnp.tanh, _dtanh, _d2tanh),
        _elementwise("relu", _relu, _drelu, _zero_curvature),
        _elementwise("leaky_relu", _leaky_relu, _dleaky_relu, _zero_curvature),
        _elementwise("elu", _elu, _delu, _d2elu),
        _elementwise("softplus", _softplus, _sigmoid, _dsigmoid),
        _elementwise("silu", _silu, _dsilu, _d2silu),
        Activation("softmax", softmax, None, _softmax_backward, None, _softmax_backward_r),
    )
}
"""Every activation by name."""

PIECEWISE_LINEAR = frozenset({"identity", "relu", "leaky_relu"})
"""Activations with ``φ'' = 0`` everywhere but at a kink: second-order passes may leave their term out."""

OUTPUT_ONLY = frozenset({"softmax"})
"""Activations that act on a whole row and are meant for the output layer."""
