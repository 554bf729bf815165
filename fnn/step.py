"""One training step: the gradient (by the hand-written backprop or by autodiff), then the optimizer.

``θ, s ← optim.step(opt, ∇C(θ), s, θ)``. :func:`train_step` is pure and jit-able; the compiled epoch
of :func:`fnn.fit` scans its two halves over the batches (:func:`batch_gradient`, then
:func:`fnn.optim.step`; see :mod:`fnn.epoch`), and scripts use it for their own loops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from fnn import checks, distributed, optim
from fnn.backprop import Trace, backprop_trace
from fnn.epoch import BatchGradient
from fnn.losses import Loss
from fnn.mlp import MLP, Params, State
from fnn.objective import autodiff_grads


def _manual(net, params, x, y, loss, l2, state):
    return backprop_trace(net, params, x, y, loss, l2, state, True)


def _autodiff(net, params, x, y, loss, l2, state):
    if state is None:
        return (*autodiff_grads(net, params, x, y, loss, l2), None, None)
    return (*autodiff_grads(net, params, x, y, loss, l2, state, True), None)


GRAD_SOURCES: dict[str, Callable] = {"manual": _manual, "autodiff": _autodiff}
"""Gradient sources: ``(net, params, x, y, loss, l2, state) -> (C, grads, new_state, trace or None)``."""


class StepResult(NamedTuple):
    """What :func:`train_step` returns: the new params, optimizer state and batch-norm state, and the
    batch's cost ``C``, gradient ``∇C`` and :class:`fnn.backprop.Trace` (``None`` with autodiff)."""

    params: Params
    opt_state: Any
    state: State | None
    cost: jax.Array
    grads: Params
    trace: Trace | None


def train_step(net: MLP, opt, params: Params, opt_state, x: jax.Array, y: jax.Array, loss: Loss, *,
               l2: float = 0.0, state: State | None = None, grad_source: str = "manual") -> StepResult:
    """One step of gradient descent on the batch ``(x (B, n_0), y)``: ``∇C`` then ``opt``'s update.

    ``grad_source`` is ``"manual"`` (:func:`fnn.backprop`) or ``"autodiff"`` (``jax.grad``);
    with batch norm (``state``), the batch is normalized by its own statistics (train mode).
    """
    grads_of = checks.lookup(GRAD_SOURCES, "gradient source", grad_source)
    optim.check_built_for(opt, net, loss, l2)
    cost, grads, new_state, trace = grads_of(net, params, x, y, loss, l2, state)
    new_params, new_opt_state = optim.step(opt, grads, opt_state, params, (x, y))
    return StepResult(new_params, new_opt_state, new_state, cost, grads, trace)


def batch_gradient(net: MLP, loss: Loss, l2: float = 0.0, grad_source: str = "manual", mesh=None) -> Callable:
    """The gradient part of an epoch (:mod:`fnn.epoch`) for mini-batches given by sample indices:
    ``(params, state, x, y, idx (B,)) -> BatchGradient`` of ``C`` on ``(x[idx], y[idx])``.

    ``grad_source`` as in :func:`train_step`. With a ``mesh`` (:mod:`fnn.distributed`) the batch is
    sharded over its ``"data"`` axis, so that the partitioner turns the batch sums into all-reduces.
    """
    grads_of = checks.lookup(GRAD_SOURCES, "gradient source", grad_source)

    def gradient(params, state, x, y, idx):
        xb, yb = x[idx], y[idx]
        if mesh is not None:
            xb, yb = (jax.lax.with_sharding_constraint(t, distributed.batch_sharded(mesh)) for t in (xb, yb))
        cost, grads, new_state, trace = grads_of(net, params, xb, yb, loss, l2, state)
        return BatchGradient(cost, grads, new_state, trace, jax.numpy.asarray(idx.shape[0], "int32"), (xb, yb))

    return gradient
