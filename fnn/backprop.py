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

from fnn import batchnorm, checks
from fnn.losses import Loss, check_l2, check_output, l2_active, l2_penalty, mark_invalid
from fnn.mlp import MLP, ForwardTrace, Params, State


def __getattr__(name):  # ``from fnn.backprop import objective`` still works, without importing autodiff here
    if name == "objective":
        from fnn.objective import objective

        return objective
    raise AttributeError(f"module 'fnn.backprop' has no attribute {name!r}")


class Trace(NamedTuple):
    """One backprop, kept whole: the :class:`fnn.mlp.ForwardTrace` and the δ's, per sample.

    - ``forward``: every ``h^l``, ``z^l``, ``a^l`` and batch-norm cache (``trace.zs`` and
      ``trace.acts`` are short for ``trace.forward.zs`` and ``trace.forward.acts``);
    - ``costs``: ``C_x`` of every sample, shape ``(N,)``, without the L2 term (their mean plus
      ``½β Σ‖W‖²`` is ``C``);
    - ``deltas[l-1] = δ^l = ∂C_x/∂z^l``, shape ``(N, n_l)``: the gradient of sample x's own cost
      ``C_x``, not yet divided by ``N`` (NaN rows for samples whose label is out of range);
    - ``weight_deltas[l-1]``: the rows that meet ``a^{l-1}`` in BP4, ``∂C_x/∂h^l``: ``δ^l`` itself
      for a plain layer, ``δ_h = γ/√(v+ε) ⊙ δ^l`` for a batch-normalized layer in eval mode, and
      ``None`` for one in train mode, where every sample's row depends on the whole batch through
      μ and σ² (so no per-sample gradient exists);
    - ``l2``: the ``β`` of the cost the trace was taken for (the per-example quantities read it from
      here, so that they always match the gradient).

    Per-example quantities (:mod:`fnn.per_example`) are contractions of these rows:
    ``∂C_x/∂W^l = weight_deltas[l-1]_xᵀ acts[l-1]_x``. (Before per-example quantities existed the
    trace was the triple ``(zs, acts, deltas)``; those names still work as attributes.)
    """

    forward: ForwardTrace
    costs: jax.Array
    deltas: list
    weight_deltas: list
    l2: float = 0.0

    @property
    def zs(self) -> list:
        return self.forward.zs

    @property
    def acts(self) -> list:
        return self.forward.acts


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
    """:func:`backprop` that also returns its :class:`Trace` (every z^l, a^l and δ^l, per sample).

    Returns ``(C, grads, new_state, trace)``; ``new_state`` is ``None`` without batch norm.
    """
    loss = check_output(loss, net.output)
    l2 = check_l2(l2)
    fwd = net.forward_trace(params, x, state, train=train)
    checks.nonempty("x", fwd.acts[0].shape[0])
    zs, acts = fwd.zs, fwd.acts
    target, valid = loss.target(acts[-1], y)
    n = acts[0].shape[0]
    costs = mark_invalid(loss.per_sample(acts[-1], target), valid)
    cost = jnp.mean(costs) + l2_penalty(params, l2)

    phi = net.activations
    if loss.canonical_output == net.output:
        delta = loss.fused_delta(zs[-1], target)  # BP1, canonical pair: δ^L = φ(z^L) − y
    else:
        delta = phi[-1].backward(zs[-1], acts[-1], loss.grad(acts[-1], target))  # BP1
    delta = mark_invalid(delta, valid)

    L = net.num_layers
    grads, deltas, weight_deltas = [None] * L, [None] * L, [None] * L
    for l in reversed(range(L)):  # l indexes layer l+1 of the notes
        deltas[l] = delta
        if fwd.bn[l] is None:
            grads[l] = {"b": jnp.sum(delta, axis=0) / n}  # BP3
        else:
            delta, g_gamma, g_beta = batchnorm.backward(delta, params[l]["gamma"], fwd.bn[l], train=train)
            grads[l] = {"gamma": g_gamma, "beta": g_beta}
        weight_deltas[l] = None if fwd.bn[l] is not None and train else delta
        grads[l]["W"] = net.matmul(delta.T, acts[l]) / n  # BP4
        if l2_active(l2):
            grads[l]["W"] = grads[l]["W"] + l2 * params[l]["W"]
        if l > 0:
            # BP2: δ^l = (δ^{l+1} W^{l+1}) ⊙ φ'(z^l)
            delta = phi[l - 1].backward(zs[l - 1], acts[l], net.matmul(delta, params[l]["W"]))
    grads = [{k: g[k] for k in params[l]} for l, g in enumerate(grads)]  # the params' own key order
    return cost, grads, fwd.state, Trace(fwd, costs, deltas, weight_deltas, l2)
