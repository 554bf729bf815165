"""Checking the hand-written backprop against JAX's reverse-mode autodiff and finite differences.

:func:`check_gradients` compares the manual gradients with ``jax.grad`` (jit-able, one number per
layer). :func:`gradient_report` adds a third opinion that shares no code with either: central
finite differences of the cost, in float64, on a few random coordinates of every leaf. Autodiff
and the δ-recursion could in principle agree on a wrong answer (both differentiate the same
forward pass); the finite differences only evaluate the cost.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fnn.backprop import backprop
from fnn.losses import Loss
from fnn.mlp import MLP, Params, State
from fnn.objective import autodiff_grads, objective


def relative_difference(a: jax.Array, b: jax.Array) -> jax.Array:
    """``max |a − b| / max(max |a|, max |b|)`` (0 when both are 0): a scale-free leaf distance."""
    scale = jnp.maximum(jnp.max(jnp.abs(a)), jnp.max(jnp.abs(b)))
    diff = jnp.max(jnp.abs(a - b))
    return jnp.where(scale > 0, diff / jnp.where(scale > 0, scale, 1), diff)


def _leaf_differences(manual: Params, auto: Params) -> list[dict[str, jax.Array]]:
    """Per layer, ``{leaf name: relative_difference(manual, autodiff)}`` in the params' key order."""
    return [{k: relative_difference(m[k], a[k]) for k in m} for m, a in zip(manual, auto)]


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
    float32 and ``1e-13`` in float64. A network with a ``compute_dtype`` (mixed precision) is
    checked in full precision, ``net.replace(compute_dtype=None)``: the same code without the
    rounding, which would otherwise dominate the differences.
    """
    net = net.replace(compute_dtype=None)
    manual = backprop(net, params, x, y, loss, l2, state, train)[1]
    auto = autodiff_grads(net, params, x, y, loss, l2, state, train)[1]
    return jnp.stack([jnp.max(jnp.stack(list(d.values()))) for d in _leaf_differences(manual, auto)])


class LeafCheck(NamedTuple):
    """One row of :func:`gradient_report`: the manual gradient of one leaf against two references.

    Attributes:
      layer: ``l = 1..L``, the layer as numbered in the notes (``W^1`` is the first weight matrix).
      leaf: ``"W"``, ``"b"``, ``"gamma"`` or ``"beta"``.
      manual_vs_autodiff: :func:`relative_difference` of the whole leaf, manual vs ``jax.grad``.
      manual_vs_fd: ``max_{i∈S} |g_i − d_i| / max(max_all |g|, max_{i∈S} |d_i|)``: manual ``g``
        vs the central difference ``d`` on the sampled coordinates ``S``, relative to the leaf's
        largest gradient (so a coordinate whose gradient is nearly 0 cannot raise a false alarm).
      fd_coords: ``|S|``, the number of coordinates checked by finite differences.
    """

    layer: int
    leaf: str
    manual_vs_autodiff: float
    manual_vs_fd: float
    fd_coords: int


def gradient_report(
    net: MLP,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    loss: Loss,
    l2: float = 0.0,
    state: State | None = None,
    train: bool = True,
    *,
    num_coords: int = 16,
    key: jax.Array | None = None,
    eps: float = 1e-6,
) -> list[LeafCheck]:
    """The manual gradients leaf by leaf against autodiff and against float64 finite differences.

    For each leaf, ``min(num_coords, leaf size)`` coordinates ``i`` are drawn uniformly without
    replacement (from ``key``, default ``PRNGKey(0)``) and differentiated by central differences
    ``d_i = (C(θ + h e_i) − C(θ − h e_i)) / 2h`` with ``h = eps · max(1, |θ_i|)``, everything
    (params, ``x``, floating ``y`` and ``state``) cast to float64. The denominator is the actual
    distance ``(θ_i + h) − (θ_i − h)`` of the two float64 points. With ``eps = 1e-6`` the truncation
    error ``O(h² C''')`` is about ``1e-12`` and the rounding error ``O(2⁻⁵³ |C| / h)`` about
    ``1e-10 |C|``, so the finite differences are good to roughly 8 digits: far below the float32
    rounding of a float32 backprop (``manual_vs_fd`` ≈ 1e-7…1e-6) and well above float64's
    (``manual_vs_fd`` ≈ 1e-9…1e-7 for float64 params). A coordinate whose ``±h`` straddles a kink
    (ReLU at exactly 0) can differ; with ``h ≈ 1e-6`` that is rare.

    If JAX's 64-bit mode is off, it is switched on only for the finite differences, with the
    scoped ``jax.enable_x64`` (thread-local; restored on exit). Not jit-able itself (it draws
    coordinates and switches precision; it compiles its parts): use :func:`check_gradients` under
    ``jit``. A network with a ``compute_dtype`` is checked in full precision, as in
    :func:`check_gradients` (finite differences of a cost with rounded operands measure the rounding).

    Args: as :func:`check_gradients`, plus
      num_coords: coordinates per leaf checked by finite differences (``≥ 1``).
      key: PRNG key choosing the coordinates.
      eps: the relative step ``h / max(1, |θ_i|)``.

    Returns:
      One :class:`LeafCheck` per layer and leaf, layer by layer, leaves in JAX's order (sorted keys).
    """
    if not isinstance(num_coords, int) or isinstance(num_coords, bool) or num_coords < 1:
        raise ValueError(f"num_coords must be a positive int; got {num_coords!r}.")
    if not 0 < eps < 1e-2:
        raise ValueError(f"eps must be in (0, 1e-2), a small relative step (about 1e-6); got {eps!r}.")
    key = jax.random.PRNGKey(0) if key is None else key
    net = net.replace(compute_dtype=None)
    manual, versus_auto = _manual_and_autodiff(net, params, x, y, loss, l2, state, train)

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]  # the order of ravel_pytree
    draws = np.asarray(jax.random.uniform(key, (sum(int(np.size(leaf)) for _, leaf in leaves),)))
    names, coords, flat_coords, start = [], [], [], 0
    for path, leaf in leaves:
        size = int(np.size(leaf))
        chosen = np.argsort(draws[start:start + size], kind="stable")[:num_coords]  # uniform, no repeats
        names.append((path[0].idx, path[1].key))
        coords.append(chosen)
        flat_coords.append(chosen + start)
        start += size
    fd = _central_differences(net, params, x, y, loss, l2, state, train, np.concatenate(flat_coords), eps)
    fd = np.split(fd, np.cumsum([len(c) for c in coords])[:-1])

    rows = []
    for (l, name), chosen, d in zip(names, coords, fd):
        g = np.asarray(manual[l][name], np.float64).ravel()
        scale = max(np.max(np.abs(g)), np.max(np.abs(d)))
        diff = np.max(np.abs(g[chosen] - d))
        rows.append(LeafCheck(l + 1, name, float(versus_auto[l][name]), float(diff / scale if scale > 0 else diff),
                              len(chosen)))
    return rows


def _manual_and_autodiff(net, params, x, y, loss, l2, state, train):
    """The manual gradients and their :func:`_leaf_differences` from autodiff, compiled together (one
    compilation instead of one per operation run eagerly)."""

    def both(params, x, y, state):
        manual = backprop(net, params, x, y, loss, l2, state, train)[1]
        return manual, _leaf_differences(manual, autodiff_grads(net, params, x, y, loss, l2, state, train)[1])

    return jax.jit(both)(params, x, y, state)


def _as_float64(a):
    return jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else jnp.asarray(a)


def _central_differences(net, params, x, y, loss, l2, state, train, flat_coords, eps) -> np.ndarray:
    """``d_i = (C(θ + h e_i) − C(θ − h e_i)) / ((θ_i + h) − (θ_i − h))`` for each raveled index, in float64."""
    with jax.enable_x64(True):
        params, x, y, state = jax.tree.map(_as_float64, (params, x, y, state))
        d = _central_differences_float64(net, params, x, y, loss, l2, state, train, jnp.asarray(flat_coords), eps)
        return np.asarray(d, np.float64)


@functools.partial(jax.jit, static_argnames=("net", "loss", "train"))
def _central_differences_float64(net, params, x, y, loss, l2, state, train, flat_coords, eps):
    theta, unravel = ravel_pytree(params)

    def cost(t):
        c = objective(net, unravel(t), x, y, loss, l2, state, train)
        return c if state is None else c[0]

    def central(i):
        h = eps * jnp.maximum(1.0, jnp.abs(theta[i]))
        up, down = theta[i] + h, theta[i] - h
        return (cost(theta.at[i].set(up)) - cost(theta.at[i].set(down))) / (up - down)

    return jax.lax.map(central, flat_coords)


def format_report(report: list[LeafCheck]) -> str:
    """A compact table of a :func:`gradient_report`, one line per layer and leaf."""
    lines = ["layer leaf   manual vs autodiff  manual vs FD (float64)  FD coords"]
    lines += [f"{r.layer:>5} {r.leaf:<6} {r.manual_vs_autodiff:>18.1e}  {r.manual_vs_fd:>22.1e}  {r.fd_coords:>9}"
              for r in report]
    return "\n".join(lines)
