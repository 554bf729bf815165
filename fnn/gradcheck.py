"""Checking the hand-written backprop against JAX's reverse-mode autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fnn.backprop import backprop, objective
from fnn.losses import Loss
from fnn.mlp import MLP, Params, State


def autodiff_grads(
    net: MLP,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    loss: Loss,
    l2: float = 0.0,
    state: State | None = None,
    train: bool = True,
):
    """``(C, ∂C/∂params)`` (plus the new state, with one) from ``jax.value_and_grad``: the reference.

    Same arguments and results as :func:`fnn.backprop`.
    """
    if state is None:
        return jax.value_and_grad(lambda p: objective(net, p, x, y, loss, l2))(params)
    (cost, new_state), grads = jax.value_and_grad(
        lambda p: objective(net, p, x, y, loss, l2, state, train), has_aux=True)(params)
    return cost, grads, new_state


def relative_difference(a: jax.Array, b: jax.Array) -> jax.Array:
    """``max |a − b| / max(max |a|, max |b|)`` (0 when both are 0): a scale-free leaf distance."""
    scale = jnp.maximum(jnp.max(jnp.abs(a)), jnp.max(jnp.abs(b)))
    diff = jnp.max(jnp.abs(a - b))
    return jnp.where(scale > 0, diff / jnp.where(scale > 0, scale, 1), diff)


def check_gradients(
    net: MLP,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    loss: Loss,
    l2: float = 0.0,
    state: State | None = None,
    train: bool = True,
) -> jax.Array:
    """Per layer, the largest relative difference between manual and autodiff gradients.

    Returns an array of shape ``(L,)``: entry ``l`` is the max over the layer's leaves (``W^l`` and
    ``b^l``, or ``γ^l`` and ``β^l``) of :func:`relative_difference`. Expect about ``1e-6`` in
    float32 and ``1e-13`` in float64.
    """
    manual = backprop(net, params, x, y, loss, l2, state, train)[1]
    auto = autodiff_grads(net, params, x, y, loss, l2, state, train)[1]
    return jnp.stack([
        jnp.max(jnp.stack([relative_difference(m[k], a[k]) for k in m])) for m, a in zip(manual, auto)
    ])
