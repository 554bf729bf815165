"""The cost that the backprop differentiates, and its autodiff gradient: the reference for every check.

``C(θ) = (1/N) Σ_x C_x(θ) + ½β Σ_l ‖W^l‖²``, written as plain JAX code. :func:`autodiff_grads` is
``jax.value_and_grad`` of it: the oracle the hand-written :func:`fnn.backprop` is proven equal to,
and the ``grad_source="autodiff"`` of training. :mod:`fnn.backprop`, the manual path, does not
import it.
"""

from __future__ import annotations

import jax

from fnn.losses import Loss, check_output, l2_penalty
from fnn.mlp import MLP, Params, State


def objective(
    net: MLP,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    loss: Loss,
    l2: float = 0.0,
    state: State | None = None,
    train: bool = True,
):
    """The scalar cost ``C = loss(net(params, x), y) + ½β Σ‖W‖²`` that :func:`fnn.backprop` differentiates.

    With a batch-norm ``state`` it returns ``(C, new_state)``, the network run in train or eval mode.
    ``loss`` is a :class:`fnn.losses.Loss` or its name, and must accept ``net.output``.
    """
    loss = check_output(loss, net.output)
    if state is None:
        return loss(net.apply(params, x), y) + l2_penalty(params, l2)
    if train:
        out, new_state = net.apply_train(params, x, state)
    else:
        out, new_state = net.apply(params, x, state), state
    return loss(out, y) + l2_penalty(params, l2), new_state


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
    """``(C, ∂C/∂params)`` (plus the new state, with one) from ``jax.value_and_grad`` of :func:`objective`.

    Same arguments and results as :func:`fnn.backprop`: the autodiff reference.
    """
    if state is None:
        return jax.value_and_grad(lambda p: objective(net, p, x, y, loss, l2))(params)
    (cost, new_state), grads = jax.value_and_grad(
        lambda p: objective(net, p, x, y, loss, l2, state, train), has_aux=True)(params)
    return cost, grads, new_state
