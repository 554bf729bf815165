"""Optimizers as pure gradient transformations, each written for one array and mapped over the tree.

An optimizer is a pair of pure functions, a :class:`GradientTransformation`::

    opt = fnn.optim.adam(learning_rate=1e-3)
    state = opt.init(params)                            # a NamedTuple pytree of arrays
    updates, state = opt.update(grads, state, params)   # updates are ADDED to params: u = −α ...
    params = fnn.optim.apply_updates(params, updates)   # θ ← θ + u, leaf by leaf, dtypes kept

It has the shape of optax's ``GradientTransformation``, so the two mix, but fnn does not import
optax. Small transforms compose with :func:`chain` and the public optimizers are short chains
of them, e.g. ``adam = chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(α))``.

Conventions:

- Each algorithm's maths is written once, for one leaf (``g``, ``m``, ``v`` are arrays of one
  parameter's shape); :func:`_map` lifts that rule over the whole tree.
- State is a NamedTuple per transform (``AdamState(count, mu, nu)``), so jit-able, donate-able and
  savable. The step counter ``count`` is a scalar ``int32`` (the number of updates done; it stops
  at 2³¹ − 1 rather than wrap); moment leaves have their parameter's shape and dtype, and keep
  that dtype through every update.
- ``learning_rate`` is a float ``α ≥ 0`` or a schedule ``t -> α_t`` from :mod:`fnn.schedules`,
  evaluated at the state's counter, so the update at step ``t = 0, 1, 2, ...`` uses ``α_t``.
  :func:`current_learning_rate` gives the rate the next update will use.
- Hyper-parameters are checked when the optimizer is built; a bad one raises ``ValueError``
  naming it and its value. Gradients, params and state must share the params' tree structure
  and leaf shapes (checked at trace time).
- Weight decay acts on the leaves a mask selects; the default, :func:`weights_only`, is the
  theory's convention: weights ``W`` are decayed, biases ``b`` are not.
- Scalar arithmetic (decay rates, bias corrections) is done in at least float32 and the result
  cast back to the leaf's dtype: in bfloat16, ``β₂ = 0.999`` would round to 1 and Adam's
  ``1 − β₂^t`` to 0.
- The public optimizers (:func:`sgd` … :func:`adamw`) return an :class:`Optimizer`: the same
  ``(init, update)`` pair, which also records its name and hyper-parameters, so that
  :func:`describe` can write it down as JSON data (checkpoints do) and :func:`from_description`
  can build it again.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fnn.checks import is_concrete, real_in
from fnn.losses import LOSSES, Loss, resolve
from fnn.mlp import MLP
from fnn.schedules import Schedule, constant

Params = Any  # a pytree of floating arrays, e.g. [{"W": (n_l, n_{l-1}), "b": (n_l,)}, ...]
Updates = Any  # a pytree with the structure of the params
State = Any  # a pytree of arrays (NamedTuples and tuples of them)
Mask = Any  # a pytree of bools with the params' structure, or a callable params -> such a pytree

__all__ = [
    "GradientTransformation",
    "Optimizer",
    "BatchOptimizer",
    "OPTIMIZERS",
    "describe",
    "from_description",
    "apply_updates",
    "step",
    "scheduled_learning_rate",
    "skipped_updates",
    "has_skip_nonfinite",
    "reads_objective",
    "check_built_for",
    "chain",
    "current_learning_rate",
    "weights_only",
    # transforms
    "scale_by_learning_rate",
    "trace",
    "scale_by_adagrad",
    "scale_by_rms",
    "scale_by_stddev",
    "scale_by_adam",
    "add_decayed_weights",
    "clip_by_global_norm",
    "global_norm",
    "scaled_global_norm",
    "scale_by_newton",
    "skip_nonfinite",
    # optimizers
    "sgd",
    "momentum",
    "nesterov",
    "adagrad",
    "rmsprop",
    "adam",
    "adamw",
    "newton",
    # states
    "EmptyState",
    "NewtonState",
    "ScaleByLearningRateState",
    "TraceState",
    "AdagradState",
    "RmsState",
    "StddevState",
    "AdamState",
    "SkipNonfiniteState",
]


class GradientTransformation(NamedTuple):
    """A pair of pure functions.

    Attributes:
      init: ``params -> state``.
      update: ``(grads, state, params=None) -> (updates, new_state)``; ``grads`` and ``updates``
        have the params' structure; ``params`` is needed by the transforms that read them
        (weight decay, Newton).
    """

    init: Callable[[Params], State]
    update: Callable[..., tuple[Updates, State]]


class Optimizer(GradientTransformation):
    """A :class:`GradientTransformation` that also records how it was built.

    It unpacks, indexes and compares exactly like the pair ``(init, update)``; in addition
    ``name`` is the factory's name in this module (``"adam"``) and ``hyperparams`` a read-only
    mapping of the factory's arguments, defaults filled in, as they were given
    (``{"learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8}``). Built by the public
    optimizers :func:`sgd` … :func:`adamw`; immutable. See :func:`describe`.
    """

    def __new__(cls, init, update, name: str = "", hyperparams: Mapping[str, Any] | None = None):
        self = super().__new__(cls, init, update)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "hyperparams", MappingProxyType(dict(hyperparams or {})))
        return self

    def __setattr__(self, attr, value):
        raise AttributeError(f"an Optimizer is immutable; build another one instead of setting {attr!r}.")


class BatchOptimizer(Optimizer):
    """An :class:`Optimizer` whose update also reads the batch: ``update(grads, state, params, batch)``
    with ``batch = (x, y)``, the inputs and targets the gradient was computed on. The second-order
    optimizers of :mod:`fnn.second_order` (K-FAC, Hessian-free) are such, since their curvature comes
    from the batch. :func:`step`, :func:`fnn.train_step` and :func:`fnn.fit` pass the batch to them."""


class EmptyState(NamedTuple):
    """The state of a transform that keeps none."""


class NewtonState(NamedTuple):
    """The (empty) state of :func:`scale_by_newton`; it marks an optimizer that reads its objective,
    a function of the data, beside the gradient (:func:`reads_objective`)."""


class ScaleByLearningRateState(NamedTuple):
    """``count``: int32 scalar, the number of updates done (the schedule's step ``t``)."""

    count: jax.Array


class TraceState(NamedTuple):
    """``velocity``: ``v``, one array per param leaf."""

    velocity: Updates


class AdagradState(NamedTuple):
    """``sum_of_squares``: ``r = Σ_s g_s ⊙ g_s``, one array per param leaf."""

    sum_of_squares: Updates


class RmsState(NamedTuple):
    """``nu``: the running mean of ``g ⊙ g``, one array per param leaf."""

    nu: Updates


class StddevState(NamedTuple):
    """``mu``, ``nu``: the running means of ``g`` and ``g ⊙ g``, one array each per param leaf."""

    mu: Updates
    nu: Updates


class AdamState(NamedTuple):
    """``count``: int32 steps done; ``mu``, ``nu``: the biased first and second moment estimates."""

    count: jax.Array
    mu: Updates
    nu: Updates


class SkipNonfiniteState(NamedTuple):
    """``inner``: the wrapped transform's state; ``skipped``: int32 count of the skipped updates."""

    inner: State
    skipped: jax.Array


# ---------------------------------------------------------------------------------------------
# Plumbing: the one place that maps a per-leaf rule over trees.


def _map(rule: Callable, tree, *others, outputs: int = 1):
    """``rule`` applied leaf by leaf to ``tree`` and the trees ``others`` of the same structure.

    ``rule(leaf, *matching_leaves)`` returns one array (``outputs=1``, the result is one tree)
    or a tuple of ``outputs`` arrays (the result is a tuple of ``outputs`` trees).
    """
    leaves, treedef = jax.tree.flatten(tree)
    columns = [_leaves_like(treedef, leaves, other) for other in others]
    results = [rule(*args) for args in zip(leaves, *columns)]
    if outputs == 1:
        return treedef.unflatten(results)
    return tuple(treedef.unflatten([r[i] for r in results]) for i in range(outputs))


def _leaves_like(treedef, leaves: list, other) -> list:
    """The leaves of ``other`` after checking its structure and leaf shapes against ``treedef``/``leaves``."""
    got = jax.tree.structure(other)
    if got != treedef:
        raise ValueError(
            f"tree structures differ: expected {treedef}, got {got}. Gradients, updates, params, "
            f"masks and optimizer state must all have the params' structure (init the optimizer "
            f"with the params it will update)."
        )
    others = jax.tree.leaves(other)
    for i, (a, b) in enumerate(zip(leaves, others)):
        if hasattr(b, "shape") and jnp.shape(a) != jnp.shape(b):
            where = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(other)[0][i][0])
            raise ValueError(
                f"leaf shapes differ at {where}: {jnp.shape(a)} and {jnp.shape(b)}. Gradients, params "
                f"and optimizer state must match leaf for leaf."
            )
    return others


def _zeros(params: Params) -> Updates:
    """One zero array per param leaf, of its shape and (floating) dtype: a moment's initial value."""
    return _map(_zero_leaf, params)


def _zero_leaf(p) -> jax.Array:
    dtype = jnp.result_type(p)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"params must be floating arrays to be optimized; got a leaf of dtype {dtype}.")
    return jnp.zeros(jnp.shape(p), dtype)


def _wide(*arrays) -> jnp.dtype:
    """The dtype scalar arithmetic on ``arrays`` is done in: their promoted dtype, at least float32.

    bfloat16 has 8 significant bits: ``0.999`` rounds to ``1.0`` and ``0.9`` to ``0.8984``.
    """
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _ema(average: jax.Array, x: jax.Array, decay: float) -> jax.Array:
    """``decay · average + (1 − decay) · x``, computed in :func:`_wide` precision, in the dtype of ``average``."""
    wide = _wide(average, x)
    return (decay * average.astype(wide) + (1 - decay) * x.astype(wide)).astype(average.dtype)


_INT32_MAX = jnp.iinfo(jnp.int32).max


def _zero_count() -> jax.Array:
    return jnp.zeros((), jnp.int32)


def _increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum instead of wrapping to a negative step."""
    return jnp.where(count < _INT32_MAX, count + 1, count)


def _as_schedule(learning_rate: float | Schedule) -> Schedule:
    if callable(learning_rate):
        return learning_rate
    return constant(real_in("learning_rate", learning_rate, 0.0))


def _rate(schedule: Schedule, count: jax.Array) -> jax.Array:
    """The schedule's scalar ``α_t`` at step ``t = count``."""
    rate = jnp.asarray(schedule(count))
    if rate.ndim != 0 or not jnp.issubdtype(rate.dtype, jnp.floating):
        raise ValueError(
            f"a learning-rate schedule must return a floating scalar for a scalar step; "
            f"got shape {rate.shape}, dtype {rate.dtype}."
        )
    return rate


def apply_updates(params: Params, updates: Updates) -> Params:
    """``θ ← θ + u`` leaf by leaf; every result leaf keeps its param leaf's dtype."""
    return _map(_add_leaf, params, updates)


def _add_leaf(p, u):
    return (p + u).astype(jnp.result_type(p))


def step(opt: GradientTransformation, grads: Updates, state: State, params: Params,
         batch: tuple | None = None) -> tuple[Params, State]:
    """One optimizer step: ``u, state ← opt.update(g, state, θ)``, then ``θ ← θ + u``.

    Returns ``(new_params, new_state)``; pure and jit-able. :func:`fnn.train_step` puts the
    gradient computation in front of it. A :class:`BatchOptimizer` also receives ``batch = (x, y)``
    (required for it, ignored by the others).
    """
    if isinstance(opt, BatchOptimizer):
        if batch is None:
            raise ValueError(f"the {opt.name} optimizer reads the batch: call step(opt, grads, state, params, (x, y)).")
        updates, state = opt.update(grads, state, params, batch)
        return apply_updates(params, updates), state
    updates, state = opt.update(grads, state, params)
    return apply_updates(params, updates), state


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """The composition: ``updates`` flow through ``transforms`` left to right.

    The state is the tuple of the inner states, in the same order. Any object with ``init`` and
    ``update`` (optax's transforms too) can be chained.
    """
    for i, t in enumerate(transforms):
        _check_transform(f"chain's argument {i}", t)

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(grads, state, params=None):
        if len(state) != len(transforms):
            raise ValueError(f"a chain of {len(transforms)} transforms needs a tuple of {len(transforms)} "
                             f"states (its init's result); got {len(state)}.")
        new_state = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    return GradientTransformation(init, update)


def _check_transform(name: str, t) -> None:
    if not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
        raise TypeError(f"{name} must be a GradientTransformation (init, update); got {t!r}.")


def current_learning_rate(learning_rate: float | Schedule, state: State) -> jax.Array:
    """``α_t``, the rate the next update will use: ``learning_rate`` at the counter found in ``state``.

    ``state`` is the state of an optimizer built with ``learning_rate`` (it holds exactly one
    :class:`ScaleByLearningRateState`, whose ``count`` is the step ``t``). The rate of the update
    just done is the same schedule at ``t − 1``.
    """
    found = [s for s in jax.tree.leaves(state, is_leaf=_is_rate_state) if _is_rate_state(s)]
    if len(found) != 1:
        raise ValueError(
            f"state must hold exactly one ScaleByLearningRateState (the step counter of the "
            f"learning rate); found {len(found)}."
        )
    return _rate(_as_schedule(learning_rate), found[0].count)


def _is_rate_state(node) -> bool:
    return isinstance(node, ScaleByLearningRateState)


def scheduled_learning_rate(opt, state: State, offset: int = 0) -> jax.Array | None:
    """``α_{t+offset}`` of an :class:`Optimizer` whose ``state`` has the step counter ``t``, or ``None``.

    ``offset=0`` is the rate of the next update, ``offset=-1`` that of the update just done
    (clamped at step 0). ``None`` when ``opt`` records no ``learning_rate`` (a :func:`chain` or a
    foreign transform) or its state does not hold exactly one step counter.
    """
    rate = getattr(opt, "hyperparams", {}).get("learning_rate")
    found = [s for s in jax.tree.leaves(state, is_leaf=_is_rate_state) if _is_rate_state(s)]
    if rate is None or len(found) != 1:
        return None
    return _rate(_as_schedule(rate), jnp.maximum(found[0].count + offset, 0))


def weights_only(params: Params) -> Mask:
    """The default weight-decay mask: ``True`` for leaves stored under the dict key ``"W"``, else ``False``.

    With fnn's params ``[{"W": (n_l, n_{l-1}), "b": (n_l,)}, ...]`` the weights are decayed and
    the biases are not, as in the theory's ``½β Σ_l ‖W^l‖²``.
    """
    return jax.tree_util.tree_map_with_path(_is_weight, params)


def _is_weight(path, leaf) -> bool:
    return bool(path) and getattr(path[-1], "key", None) == "W"


# ---------------------------------------------------------------------------------------------
# Transforms.


def scale_by_learning_rate(learning_rate: float | Schedule) -> GradientTransformation:
    """``u = −α_t g``, with ``α_t`` the learning rate (or schedule) at step ``t`` = the state's count.

    This is where every optimizer's minus sign and learning rate come from; the state
    :class:`ScaleByLearningRateState` holds the int32 step counter. ``α_t`` is cast to each
    gradient leaf's dtype, so a float32 leaf's update is computed in float32.
    """
    schedule = _as_schedule(learning_rate)

    def init(params):
        return ScaleByLearningRateState(_zero_count())

    def update(grads, state, params=None):
        rate = _rate(schedule, state.count)

        def leaf(g):
            return -rate.astype(g.dtype) * g

        return _map(leaf, grads), ScaleByLearningRateState(_increment(state.count))

    return GradientTransformation(init, update)


def trace(momentum: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum accumulation ``v ← ρv + g`` (``v₀ = 0``, ``ρ = momentum``).

    The update is ``u = v`` (classic momentum) or, with ``nesterov=True``, ``u = g + ρv`` with the
    new ``v`` (Nesterov's look-ahead, see :func:`nesterov`).
    """
    rho = real_in("momentum", momentum, 0.0, 1.0, high_open=True)

    def init(params):
        return TraceState(_zeros(params))

    def update(grads, state, params=None):
        def leaf(g, v):
            wide = _wide(g, v)
            v = (rho * v.astype(wide) + g.astype(wide)).astype(v.dtype)
            return ((g.astype(wide) + rho * v.astype(wide)).astype(jnp.result_type(g, v)) if nesterov else v), v

        updates, velocity = _map(leaf, grads, state.velocity, outputs=2)
        return updates, TraceState(velocity)

    return GradientTransformation(init, update)


def scale_by_adagrad(eps: float = 1e-7) -> GradientTransformation:
    """``r ← r + g ⊙ g`` (``r₀ = 0``), ``u = g / (δ + √r)`` with ``δ = eps``."""
    delta = real_in("eps", eps, 0.0)

    def init(params):
        return AdagradState(_zeros(params))

    def update(grads, state, params=None):
        def leaf(g, r):
            r = (r + g * g).astype(r.dtype)
            return g / (delta + jnp.sqrt(r)), r

        updates, r = _map(leaf, grads, state.sum_of_squares, outputs=2)
        return updates, AdagradState(r)

    return GradientTransformation(init, update)


def scale_by_rms(decay: float = 0.9, eps: float = 1e-8) -> GradientTransformation:
    """``r ← ρr + (1 − ρ) g ⊙ g`` (``r₀ = 0``, ``ρ = decay``), ``u = g / (√r + ε)``."""
    rho = real_in("decay", decay, 0.0, 1.0, high_open=True)
    eps = real_in("eps", eps, 0.0)

    def init(params):
        return RmsState(_zeros(params))

    def update(grads, state, params=None):
        def leaf(g, r):
            r = _ema(r, g * g, rho)
            return g / (jnp.sqrt(r) + eps), r

        updates, nu = _map(leaf, grads, state.nu, outputs=2)
        return updates, RmsState(nu)

    return GradientTransformation(init, update)


def scale_by_stddev(decay: float = 0.9, eps: float = 1e-8) -> GradientTransformation:
    """Centered RMS: ``m ← ρm + (1 − ρ) g``, ``r ← ρr + (1 − ρ) g ⊙ g``, ``u = g / (√(r − m²) + ε)``.

    ``r − m² ≥ 0`` in exact arithmetic (Cauchy–Schwarz: the weights of both running means are the
    same and sum to ``1 − ρ^t ≤ 1``); it is clamped at 0 against rounding.
    """
    rho = real_in("decay", decay, 0.0, 1.0, high_open=True)
    eps = real_in("eps", eps, 0.0)

    def init(params):
        return StddevState(_zeros(params), _zeros(params))

    def update(grads, state, params=None):
        def leaf(g, m, r):
            m, r = _ema(m, g, rho), _ema(r, g * g, rho)
            return g / (jnp.sqrt(jnp.maximum(r - m * m, 0)) + eps), m, r

        updates, mu, nu = _map(leaf, grads, state.mu, state.nu, outputs=3)
        return updates, StddevState(mu, nu)

    return GradientTransformation(init, update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction, with bias correction, at step ``t = 1, 2, ...``.

    ``m ← β₁m + (1 − β₁) g``, ``v ← β₂v + (1 − β₂) g ⊙ g`` (both 0 at first, one pair per leaf),
    ``m̂ = m / (1 − β₁^t)``, ``v̂ = v / (1 − β₂^t)``, ``u = m̂ / (√v̂ + ε)``.
    """
    b1 = real_in("b1", b1, 0.0, 1.0, high_open=True)
    b2 = real_in("b2", b2, 0.0, 1.0, high_open=True)
    eps = real_in("eps", eps, 0.0)

    def init(params):
        return AdamState(_zero_count(), _zeros(params), _zeros(params))

    def update(grads, state, params=None):
        count = _increment(state.count)

        def leaf(g, m, v):
            m, v = _ema(m, g, b1), _ema(v, g * g, b2)
            wide = _wide(m)
            t = count.astype(wide)
            m_hat, v_hat = m.astype(wide) / (1 - b1**t), v.astype(wide) / (1 - b2**t)
            return (m_hat / (jnp.sqrt(v_hat) + eps)).astype(m.dtype), m, v

        updates, mu, nu = _map(leaf, grads, state.mu, state.nu, outputs=3)
        return updates, AdamState(count, mu, nu)

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float = 1e-4, mask: Mask = weights_only) -> GradientTransformation:
    """L2 weight decay as a gradient transform: ``u = g + λθ`` on the masked leaves, ``u = g`` elsewhere.

    Chained before :func:`scale_by_learning_rate` this is the gradient of ``C + ½λ Σ‖θ‖²``, the sum
    over the masked leaves (for the default mask, the L2 term of :func:`fnn.l2_penalty`).

    Args:
      weight_decay: ``λ ≥ 0``.
      mask: which leaves decay: a pytree of static bools with the params' structure, or a
        callable ``params -> such a pytree``. Default :func:`weights_only`: the leaves under the
        dict key ``"W"`` (weights), not the biases ``"b"``.

    ``update`` needs ``params``.
    """
    lam = real_in("weight_decay", weight_decay, 0.0)
    if mask is None:
        raise TypeError("mask must be a pytree of bools or a callable params -> such a pytree; got None.")
    if not callable(mask):
        bad = [x for x in jax.tree.leaves(mask) if not isinstance(x, (bool, np.bool_))]
        if bad:
            raise TypeError(
                f"mask must be a pytree of bools with the params' structure, or a callable params -> "
                f"such a pytree; got a leaf {bad[0]!r}."
            )

    def init(params):
        return EmptyState()

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs the params: call update(grads, state, params).")
        decay = _map(bool, mask(params) if callable(mask) else mask)

        def leaf(g, p, decayed):
            return (g + lam * p).astype(g.dtype) if decayed else g

        return _map(leaf, grads, params, decay), state

    return GradientTransformation(init, update)


SMALL_LEAF = 4096  # see global_norm


def global_norm(tree) -> jax.Array:
    """``‖tree‖₂ = √(Σ_leaves Σ x²)``, summed in at least float32 (bfloat16 leaves too); ``0`` for an
    empty tree.

    Leaves of fewer than ``SMALL_LEAF`` entries (biases, γ, β) are joined into one vector and
    reduced once: on a CPU each reduction kernel costs microseconds whatever its size, and one per
    bias made the norm take 5 % of a 784-256-256-10 training step. The sum of squares can overflow
    for huge finite entries (``inf``); :func:`scaled_global_norm` cannot.
    """
    leaves = [jnp.asarray(leaf) for leaf in jax.tree.leaves(tree)]
    small = [leaf.ravel() for leaf in leaves if leaf.size < SMALL_LEAF]
    squares = [_sum_of_squares(leaf) for leaf in leaves if leaf.size >= SMALL_LEAF]
    if small:
        squares.append(_sum_of_squares(jnp.concatenate(small)))
    return jnp.sqrt(sum(squares)) if squares else jnp.zeros(())


def _sum_of_squares(x: jax.Array) -> jax.Array:
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.sum(jnp.square(x.astype(wide)))


def scaled_global_norm(tree) -> jax.Array:
    """:func:`global_norm` computed as ``m · ‖tree / m‖₂`` with ``m = max |x|``: no overflow for
    finite entries, at the price of one more pass; ``inf``/``NaN`` if an entry is."""
    leaves = [jnp.asarray(leaf) for leaf in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros(())
    m = jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in leaves]))
    scale = jnp.where(m > 0, m, 1)
    return m * global_norm([leaf / scale for leaf in leaves])


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """``u = g · min(1, c / ‖g‖)`` with ``‖g‖ = √(Σ_leaves Σ g²)`` the norm of the whole tree, ``c = max_norm > 0``.

    Rescales the gradient to norm ``c`` when it is longer, keeping its direction. A norm that
    overflows the dtype (finite gradients of about 1e19 and more in float32) is recomputed by
    :func:`scaled_global_norm`, so such a gradient is clipped, not zeroed.
    Reference: Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013.
    """
    c = real_in("max_norm", max_norm, 0.0, low_open=True)

    def init(params):
        return EmptyState()

    def update(grads, state, params=None):
        norm = global_norm(grads)  # the cheap form; only if it overflows, the scaled one
        norm = jax.lax.cond(jnp.isinf(norm), lambda: scaled_global_norm(grads).astype(norm.dtype), lambda: norm)
        factor = jnp.where(norm > c, c / norm, 1.0)

        def leaf(g):
            return factor.astype(g.dtype) * g

        return _map(leaf, grads), state

    return GradientTransformation(init, update)


def scale_by_newton(objective: Callable[[Params], jax.Array], damping: float = 0.0) -> GradientTransformation:
    """The Newton direction ``u = (H + λI)⁻¹ g``, ``H = ∇²objective(θ)`` the full Hessian.

    ``H`` is ``(n, n)`` for the ``n`` parameters flattened by ``jax.flatten_util.ravel_pytree``,
    computed with ``jax.hessian`` (this is the reference method; autodiff is its point), so it
    suits small problems only. ``update`` needs ``params``.
    """
    if not callable(objective):
        raise TypeError(f"objective must be a function params -> scalar; got {objective!r}.")
    lam = real_in("damping", damping, 0.0)

    def init(params):
        return NewtonState()

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("the Newton step needs the params: call update(grads, state, params).")
        leaves, treedef = jax.tree.flatten(params)
        _leaves_like(treedef, leaves, grads)
        theta, unravel = ravel_pytree(params)
        g, _ = ravel_pytree(grads)

        def flat_objective(x):
            return objective(unravel(x))

        H = jax.hessian(flat_objective)(theta)
        step = jnp.linalg.solve(H + lam * jnp.eye(theta.size, dtype=H.dtype), g)
        return unravel(step), state

    return GradientTransformation(init, update)


def skip_nonfinite(inner: GradientTransformation) -> GradientTransformation:
    """``inner``, except that an update whose gradients are not all finite is skipped.

    A skipped update is all zeros and leaves the inner state as it was; the state
    :class:`SkipNonfiniteState` counts the skipped updates in ``skipped`` (int32).
    """
    _check_transform("skip_nonfinite's inner", inner)

    def init(params):
        return SkipNonfiniteState(inner.init(params), _zero_count())

    def update(grads, state, params=None):
        finite = jnp.asarray(True)
        for g in jax.tree.leaves(grads):
            finite = finite & jnp.all(jnp.isfinite(g))
        updates, new_inner = inner.update(grads, state.inner, params)

        def zero_unless_finite(u):
            return jnp.where(finite, u, 0)

        def keep_unless_finite(new, old):
            return jnp.where(finite, new, old)

        skipped = jnp.where(finite, state.skipped, _increment(state.skipped))
        new_state = SkipNonfiniteState(_map(keep_unless_finite, new_inner, state.inner), skipped)
        return _map(zero_unless_finite, updates), new_state

    return GradientTransformation(init, update)


def reads_objective(state: State) -> bool:
    """Whether an optimizer state holds a :func:`scale_by_newton` (known at trace time): its update reads
    the Hessian of an objective over the data, not only the gradient."""
    return any(isinstance(s, NewtonState) for s in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, NewtonState)))


def check_built_for(opt, net, loss, l2) -> None:
    """Raise ``ValueError`` unless a :class:`BatchOptimizer` (K-FAC, Hessian-free) was built for this
    network, loss and ``β``: its curvature is theirs, and another network's or loss's would give
    plausible, wrong steps. Other optimizers pass."""
    if not isinstance(opt, BatchOptimizer):
        return
    built = {k: opt.hyperparams.get(k) for k in ("net", "loss", "l2")}
    for what, mine, used in (("network", built["net"], net), ("loss", built["loss"], resolve(loss))):
        if mine is not None and mine != used:
            mine, name = getattr(mine, "name", mine), getattr(used, "name", used)
            raise ValueError(f"the {opt.name} optimizer was built for the {what} {mine!r} but is "
                             f"used with {name!r}: its curvature would be the other {what}'s. Build it for this "
                             f"one, e.g. fnn.second_order.{opt.name}(net, loss, ...).")
    if built["l2"] is not None and is_concrete(l2) and float(built["l2"]) != float(l2):
        raise ValueError(f"the {opt.name} optimizer was built with l2={built['l2']!r} but training uses l2={l2!r}: "
                         f"its curvature and cost would leave out (or add) the L2 term. Build it with l2={l2!r}.")


def checked_state(opt: GradientTransformation, params: Params, opt_state: State | None) -> State:
    """``opt_state``, or ``opt.init(params)`` for ``None``, after checking that it has the structure and
    shapes of ``opt.init(params)`` (a state of another optimizer, or of other params, is refused)."""
    if opt_state is None:
        return opt.init(params)
    want = jax.eval_shape(opt.init, params)
    if jax.tree.structure(opt_state) != jax.tree.structure(want) or \
            [jnp.shape(a) for a in jax.tree.leaves(opt_state)] != [a.shape for a in jax.tree.leaves(want)]:
        name = getattr(opt, "name", "") or type(opt).__name__
        raise ValueError(f"opt_state does not match the state of this optimizer ({name}) for these params: expected "
                         f"the structure of opt.init(params), {jax.tree.structure(want)}; got "
                         f"{jax.tree.structure(opt_state)}. Pass the state this optimizer made (or None for a fresh "
                         "one); a state of another optimizer cannot be resumed with this one.")
    return opt_state


def _is_skip(node) -> bool:
    return isinstance(node, SkipNonfiniteState)


def has_skip_nonfinite(state: State) -> bool:
    """Whether an optimizer state holds a :func:`skip_nonfinite` (known at trace time)."""
    return any(map(_is_skip, jax.tree.leaves(state, is_leaf=_is_skip)))


def skipped_updates(state: State) -> int | None:
    """Updates skipped so far by :func:`skip_nonfinite` inside ``state`` (``None`` if there is none)."""
    found = [s for s in jax.tree.leaves(state, is_leaf=_is_skip) if _is_skip(s)]
    return sum(int(s.skipped) for s in found) if found else None


# ---------------------------------------------------------------------------------------------
# Optimizers: the published algorithms as short chains, each recording how it was built.


def _recorded(factory: Callable[..., GradientTransformation]) -> Callable[..., Optimizer]:
    """``factory``, made to return an :class:`Optimizer` that records its name and arguments."""
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def build(*args, **kwargs) -> Optimizer:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return Optimizer(*factory(*args, **kwargs), name=factory.__name__, hyperparams=bound.arguments)

    return build



@_recorded
def sgd(learning_rate: float | Schedule) -> GradientTransformation:
    """Stochastic gradient descent: ``θ ← θ − α_t g``.

    With a schedule such as ``fnn.schedules.inverse_sqrt(α)`` this is the classic
    ``α_t = α/√(t + 1)``. Reference: Robbins & Monro, "A stochastic approximation method", 1951;
    Goodfellow, Bengio & Courville, *Deep Learning*, 2016, Algorithm 8.1.
    """
    return scale_by_learning_rate(learning_rate)


@_recorded
def momentum(learning_rate: float | Schedule, momentum: float = 0.9) -> GradientTransformation:
    """Classic (heavy-ball) momentum: ``v ← ρv + g`` (``v₀ = 0``), ``θ ← θ − α_t v``; ``ρ = momentum ∈ [0, 1)``.

    Reference: Polyak, "Some methods of speeding up the convergence of iteration methods", 1964;
    Sutskever, Martens, Dahl & Hinton, "On the importance of initialization and momentum in deep
    learning", ICML 2013 (their velocity is ``−α v`` here when ``α`` is constant).
    """
    return chain(trace(momentum), scale_by_learning_rate(learning_rate))


@_recorded
def nesterov(learning_rate: float | Schedule, momentum: float = 0.9) -> GradientTransformation:
    """Nesterov momentum: ``v ← ρv + g`` (``v₀ = 0``), ``θ ← θ − α_t (g + ρv)`` with the new ``v``.

    This is Nesterov's accelerated gradient in the form of Bengio, Boulanger-Lewandowski & Pascanu
    ("Advances in optimizing recurrent networks", ICASSP 2013): the params ``θ`` kept here are the
    look-ahead point of the form of Sutskever et al. (ICML 2013), i.e. their iterate plus ``ρ``
    times their velocity (which is ``−αv`` here), so the gradient at the current params is the
    one Nesterov's method asks for; for a constant ``α`` the two sequences agree. Reference:
    Nesterov, "A method for solving the convex programming problem with convergence rate
    O(1/k²)", 1983.
    """
    return chain(trace(momentum, nesterov=True), scale_by_learning_rate(learning_rate))


@_recorded
def adagrad(learning_rate: float | Schedule, eps: float = 1e-7) -> GradientTransformation:
    """AdaGrad: ``r ← r + g ⊙ g`` (``r₀ = 0``), ``θ ← θ − α_t g / (δ + √r)``; ``δ = eps``.

    Reference: Duchi, Hazan & Singer, "Adaptive subgradient methods for online learning and
    stochastic optimization", JMLR 2011; Goodfellow et al., *Deep Learning*, Algorithm 8.4
    (whose defaults these are).
    """
    return chain(scale_by_adagrad(eps), scale_by_learning_rate(learning_rate))


@_recorded
def rmsprop(
    learning_rate: float | Schedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    centered: bool = False,
    momentum: float = 0.0,
) -> GradientTransformation:
    """RMSProp: ``r ← ρr + (1 − ρ) g ⊙ g`` (``r₀ = 0``, ``ρ = decay``), ``θ ← θ − α_t g / (√r + ε)``.

    - ``centered=True`` divides by an estimate of the standard deviation instead:
      ``m ← ρm + (1 − ρ) g``, ``θ ← θ − α_t g / (√(r − m²) + ε)`` (Graves, "Generating sequences with
      recurrent neural networks", 2013, with ε outside the root).
    - ``momentum = μ > 0`` accumulates the scaled gradient: ``b ← μb + g / (…)`` (``b₀ = 0``),
      ``θ ← θ − α_t b`` (the form of PyTorch's ``torch.optim.RMSprop``).

    Reference: Tieleman & Hinton, Lecture 6.5 of "Neural networks for machine learning", 2012;
    Goodfellow et al., *Deep Learning*, Algorithm 8.5.
    """
    scale = scale_by_stddev(decay, eps) if centered else scale_by_rms(decay, eps)
    if real_in("momentum", momentum, 0.0, 1.0, high_open=True) == 0:
        return chain(scale, scale_by_learning_rate(learning_rate))
    return chain(scale, trace(momentum), scale_by_learning_rate(learning_rate))


@_recorded
def adam(
    learning_rate: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    """Adam, at step ``t = 1, 2, ...``, per parameter leaf (each leaf has its own ``m`` and ``v``):

    ``m ← β₁m + (1 − β₁) g``, ``v ← β₂v + (1 − β₂) g ⊙ g`` (both 0 at first),
    ``m̂ = m / (1 − β₁^t)``, ``v̂ = v / (1 − β₂^t)``, ``θ ← θ − α_t m̂ / (√v̂ + ε)``;
    ``β₁ = b1``, ``β₂ = b2`` in ``[0, 1)``.

    Reference: Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015, Algorithm 1.
    """
    return chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(learning_rate))


@_recorded
def adamw(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Mask = weights_only,
) -> GradientTransformation:
    """Adam with decoupled weight decay: ``θ ← θ − α_t (m̂ / (√v̂ + ε) + λθ)``, ``λ = weight_decay``.

    ``m̂``, ``v̂`` as in :func:`adam`; the decay ``λθ`` bypasses the moments. It acts on the leaves
    ``mask`` selects (default :func:`weights_only`: the weights ``W``, not the biases), see
    :func:`add_decayed_weights`. The learning rate scales the decay too (as PyTorch and optax do);
    the paper's Algorithm 2 scales it by the schedule multiplier ``η_t`` alone.
    Reference: Loshchilov & Hutter, "Decoupled weight decay regularization", ICLR 2019.
    """
    return chain(
        scale_by_adam(b1, b2, eps),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def newton(
    objective: Callable[[Params], jax.Array], damping: float = 0.0, learning_rate: float | Schedule = 1.0
) -> GradientTransformation:
    """Newton's method: ``θ ← θ − α_t (H + λI)⁻¹ ∇C(θ)``, ``H = ∇²C(θ)``, ``C = objective``.

    The "first derivative over second derivative" step (``θ ← θ − C'(θ)/C''(θ)`` in one
    dimension): it minimises the local quadratic model, so with ``α = 1``, ``λ = 0`` a quadratic
    ``C`` is solved in one step. ``λ = damping ≥ 0`` (Levenberg–Marquardt) keeps the solve
    well-posed when ``H`` is singular or indefinite. ``objective(params) -> scalar`` is the cost
    whose gradients are passed to ``update``; the Hessian is the full ``(n, n)`` matrix over all
    ``n`` parameters (see :func:`scale_by_newton`), for small problems.
    Reference: Nocedal & Wright, *Numerical Optimization*, 2nd ed., 2006, §3.3.
    """
    return chain(scale_by_newton(objective, damping), scale_by_learning_rate(learning_rate))


_REGISTRY: dict[str, Callable[..., Optimizer]] = {}

OPTIMIZERS: Mapping[str, Callable[..., Optimizer]] = MappingProxyType(_REGISTRY)
"""Every optimizer that records how it was built, by name: the factories :func:`describe` writes
down and :func:`from_description` builds again. A read-only view of the registry that
:func:`register` fills: this module's first-order optimizers, and :mod:`fnn.second_order`'s
``kfac`` and ``hessian_free`` once that module is imported (``import fnn`` imports it)."""


def register(*factories: Callable[..., Optimizer]) -> None:
    """Add ``factories`` to :data:`OPTIMIZERS` under their ``__name__``, which must be the ``name`` of
    the :class:`Optimizer` they return (:func:`describe` records it, :func:`from_description` looks
    it up). A module of optimizers registers its own when it is imported, so this module need not
    import it.

    Raises ``ValueError`` for a name already registered to a factory defined elsewhere (the same
    definition, from a module imported again, replaces its earlier self).
    """
    for factory in factories:
        name, old = factory.__name__, _REGISTRY.get(factory.__name__)
        if old is not None and (old.__module__, old.__qualname__) != (factory.__module__, factory.__qualname__):
            raise ValueError(f"an optimizer named {name!r} is registered already ({old.__module__}."
                             f"{old.__qualname__}); give the factory another name.")
        _REGISTRY[name] = factory


register(sgd, momentum, nesterov, adagrad, rmsprop, adam, adamw)


def describe(opt: Optimizer) -> dict:
    """How ``opt`` was built, as JSON data: ``{"name": "adam", "hyperparams": {"learning_rate": 0.001, ...}}``.

    Numbers become floats (the factories use them as floats), ints stay ints where the factory counts
    with them (K-FAC's ``refresh``, Hessian-free's ``cg_iters``), and bools stay bools. A function of
    this module (the default mask :func:`weights_only`) is written ``{"function": "weights_only"}``;
    the network of a second-order optimizer ``{"mlp": net.config()}`` and its loss, one of
    :data:`fnn.losses.LOSSES`, ``{"loss": "mse"}``.
    Anything else, a learning-rate schedule or a custom mask, cannot be written down; it becomes
    ``{"not_stored": "<module>.<qualified name>"}`` (e.g. ``"fnn.schedules.cosine_decay.<locals>
    .schedule"``), which names its kind but not its arguments, and :func:`from_description`
    refuses to rebuild it.

    Raises ``TypeError`` for a transformation that is not an :class:`Optimizer` (a ``chain``,
    :func:`newton`): those record nothing.
    """
    if not isinstance(opt, Optimizer) or opt.name not in OPTIMIZERS:
        raise TypeError(
            f"only the optimizers {sorted(OPTIMIZERS)} of fnn.optim.OPTIMIZERS record how they were "
            f"built; got {type(opt).__name__}. Build the optimizer with one of them, or keep it out of the "
            "description."
        )
    return {"name": opt.name, "hyperparams": {k: _describe_value(v) for k, v in opt.hyperparams.items()}}


def _describe_value(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, MLP):
        return {"mlp": value.config()}
    if isinstance(value, Loss) and LOSSES.get(value.name) == value:
        return {"loss": value.name}
    name = getattr(value, "__name__", None)
    if callable(value) and globals().get(name) is value:
        return {"function": name}
    where = f"{getattr(value, '__module__', None) or type(value).__module__}."
    return {"not_stored": where + getattr(value, "__qualname__", type(value).__qualname__)}


def from_description(description: Mapping) -> Optimizer:
    """The optimizer :func:`describe` wrote down, built again with the same hyper-parameters.

    Raises ``ValueError`` naming the problem for an unknown optimizer or hyper-parameter, and for
    a value that was not stored (a schedule, a custom mask): build that optimizer yourself.
    """
    try:
        name, hyper = description["name"], dict(description["hyperparams"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"an optimizer description is {{'name': ..., 'hyperparams': {{...}}}}; got {description!r}."
        ) from None
    factory = OPTIMIZERS.get(name)
    if factory is None:
        raise ValueError(f"unknown optimizer {name!r} in the description; expected one of {sorted(OPTIMIZERS)}.")
    unknown = sorted(set(hyper) - set(inspect.signature(factory).parameters))
    if unknown:
        raise ValueError(f"{name} takes no hyper-parameter {', '.join(unknown)} (found in the description).")
    for key, value in hyper.items():
        if isinstance(value, dict) and "not_stored" in value:
            raise ValueError(
                f"the {name} optimizer's {key} is {value['not_stored']}, which a description cannot hold; "
                f"build the optimizer yourself (fnn.optim.{name}({key}=...)) and pass it instead."
            )
        if isinstance(value, dict):
            hyper[key] = _value_named(value)
    return factory(**hyper)


def _value_named(value: Mapping):
    """The network, loss or function of this module that a described value names."""
    if set(value) == {"mlp"} and isinstance(value["mlp"], Mapping):
        try:
            return MLP(**value["mlp"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{value!r} is not a valid fnn.MLP configuration: {e}") from None
    if set(value) == {"loss"}:
        if value["loss"] not in LOSSES:
            raise ValueError(f"{value!r} names no loss of fnn.losses; expected one of {sorted(LOSSES)}.")
        return resolve(value["loss"])
    function = globals().get(value.get("function")) if set(value) == {"function"} else None
    if not (callable(function) and getattr(function, "__module__", None) == __name__):
        raise ValueError(f"{value!r} names no function of fnn.optim.")
    return function
