"""Backpropagation by the δ-recursion, written out by hand (no autodiff anywhere on this path).

For a batch of N samples (rows) and the cost ``C = (1/N) Σ_x C_x + ½β Σ_l ‖W^l‖²``:

- BP1  ``δ^L = ∂C_x/∂a^L ⊙ φ'(z^L)``; for softmax outputs the Jacobian-vector form
  ``δ^L = a ⊙ (g − Σ_k g_k a_k)``; for the canonical pairs the fused ``δ^L = φ(z^L) − y``.
- BP2  ``δ^l = (δ^{l+1} W^{l+1}) ⊙ φ'(z^l)`` (row form of ``(W^{l+1})ᵀ δ^{l+1} ⊙ φ'(z^l)``).
- BP3  ``∂C/∂b^l = (1/N) Σ_x δ^{x,l}``.
- BP4  ``∂C/∂W^l = (1/N) (δ^l)ᵀ a^{l−1} + β W^l``.

Here ``δ^l`` is kept per sample, shape ``(N, n_l)``; the batch mean ``1/N`` is applied once, in
BP3/BP4, exactly as ``C = (1/N) Σ_x C_x`` says. A batch-normalized layer passes δ through its own
hand-derived backward (:func:`fnn.batchnorm.backward`) before BP4, and has ∂C/∂γ, ∂C/∂β instead of
∂C/∂b. The two matmuls of BP2 and BP4 go through :meth:`fnn.MLP.matmul`, so a network with a
``compute_dtype`` (mixed precision) runs them on rounded operands as its forward pass does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fnn import batchnorm
from fnn.losses import Loss, l2_penalty, mark_invalid
from fnn.mlp import MLP, Params, State


def _nonzero(beta) -> bool:
    """False only for a Python 0 (then the L2 terms are left out of the graph); traced β counts."""
    return not (isinstance(beta, (int, float)) and beta == 0)


class Trace(NamedTuple):
    """Every intermediate of one backprop, layer by layer ``l = 1..L``: ``zs[l-1] = z^l``,
    ``acts[l] = a^l`` (``acts[0] = x``) and ``deltas[l-1] = δ^l = ∂C_x/∂z^l`` (per sample)."""

    zs: list
    acts: list
    deltas: list


def backprop(
    net: MLP,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    loss: Loss,
    l2: float = 0.0,
    state: State | None = None,
    train: bool = True,
):
    """The cost and its gradient with respect to ``params``, by the δ-recursion.

    Args:
      net: the network configuration (static under jit).
      params: ``[{"W": (n_l, n_{l-1}), "b": (n_l,)}, ...]``.
      x: inputs ``(N, n_0)``, floating, same dtype as ``params``.
      y: targets, as the loss reads them (see :mod:`fnn.losses`).
      loss: an :class:`fnn.losses.Loss` (a cost paired with its derivative).
      l2: ``β`` of the penalty ``½β Σ_l ‖W^l‖²`` (weights only).
      state: batch-norm running statistics (required exactly when ``net`` has batch norm).
      train: with batch norm, normalize with the batch's statistics (train mode, the default) or
        with the running ones (eval mode).

    Returns:
      ``(C, grads)``: the scalar cost and a pytree with exactly the structure of ``params``; with a
      ``state``, ``(C, grads, new_state)`` (the state is unchanged in eval mode).
    """
    cost, grads, new_state, _ = backprop_trace(net, params, x, y, loss, l2, state, train)
    return (cost, grads) if state is None else (cost, grads, new_state)


def backprop_trace(net: MLP, params: Params, x, y, loss: Loss, l2: float = 0.0, state: State | None = None,
                   train: bool = True) -> tuple[jax.Array, Params, State | None, Trace]:
    """:func:`backprop` that also returns its :class:`Trace` (every z^l, a^l and δ^l), for diagnostics.

    Returns ``(C, grads, new_state, trace)``; ``new_state`` is ``None`` without batch norm.
    """
    if not isinstance(loss, Loss):
        raise TypeError(
            f"backprop needs an fnn.losses.Loss (a cost paired with its derivative); got "
            f"{type(loss).__name__}. Use one of fnn.losses.LOSSES or build a Loss(...)."
        )
    fwd = net._forward(params, x, state, train=train)
    zs, acts = fwd.zs, fwd.acts
    target, valid = loss.target(acts[-1], y)
    n = acts[0].shape[0]
    cost = jnp.mean(mark_invalid(loss.per_sample(acts[-1], target), valid))
    cost = cost + l2_penalty(params, l2)

    phi = net.activations
    if loss.canonical_output == net.output:
        delta = loss.fused_delta(zs[-1], target)  # BP1, canonical pair: δ^L = φ(z^L) − y
    else:
        delta = phi[-1].backward(zs[-1], acts[-1], loss.grad(acts[-1], target))  # BP1
    delta = mark_invalid(delta, valid)

    grads, deltas = [None] * net.num_layers, [None] * net.num_layers
    for l in reversed(range(net.num_layers)):  # l indexes layer l+1 of the notes
        deltas[l] = delta
        if fwd.bn[l] is None:
            grads[l] = {"b": jnp.sum(delta, axis=0) / n}  # BP3
        else:
            delta, g_gamma, g_beta = batchnorm.backward(delta, params[l]["gamma"], fwd.bn[l], train=train)
            grads[l] = {"gamma": g_gamma, "beta": g_beta}
        grads[l]["W"] = net.matmul(delta.T, acts[l]) / n  # BP4
        if _nonzero(l2):
            grads[l]["W"] = grads[l]["W"] + l2 * params[l]["W"]
        if l > 0:
            # BP2: δ^l = (δ^{l+1} W^{l+1}) ⊙ φ'(z^l)
            delta = phi[l - 1].backward(zs[l - 1], acts[l], net.matmul(delta, params[l]["W"]))
    grads = [{k: g[k] for k in params[l]} for l, g in enumerate(grads)]  # the params' own key order
    return cost, grads, fwd.state, Trace(zs, acts, deltas)


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
    """The scalar cost ``C = loss(net(params, x), y) + ½β Σ‖W‖²`` that :func:`backprop` differentiates.

    With a batch-norm ``state`` it returns ``(C, new_state)``, the network run in train or eval mode.
    """
    if state is None:
        return loss(net.apply(params, x), y) + l2_penalty(params, l2)
    if train:
        out, new_state = net.apply_train(params, x, state)
    else:
        out, new_state = net.apply(params, x, state), state
    return loss(out, y) + l2_penalty(params, l2), new_state
