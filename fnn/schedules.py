"""Learning-rate schedules: functions of the integer step ``t = 0, 1, 2, ...`` returning ``η_t``.

A schedule is any callable ``step -> scalar``. An optimizer of :mod:`fnn.optim` keeps the step
``t`` in its state as an ``int32`` counter of the updates done so far, so its first update uses
``η_0``; under ``jit`` the step is traced and the rate changes every step without recompiling.
The schedules here also take a Python int, or an integer array of steps (``jnp.arange(100)``, to
plot one), and return floats of JAX's default float dtype (float64 when x64 is enabled).

==========================================================  =========================================
schedule                                                    ``η_t``
==========================================================  =========================================
``constant(η)``                                             ``η``
``inverse_sqrt(η)``                                         ``η / √(t + 1)``
``exponential_decay(η, r, T)``                              ``η · r^(t/T)``
``step_decay(η, f, s)``                                     ``η · f^⌊t/s⌋``
``cosine_decay(η, T, α)``                                   ``η · ((1 − α) · ½(1 + cos(π·min(t, T)/T)) + α)``
``linear_warmup(η, W, then)``                               ``η · t/W`` for ``t < W``, then ``then(t − W)``
                                                            (or ``η``)
==========================================================  =========================================

Arguments are checked when the schedule is built (``ValueError``/``TypeError`` naming the value);
a step known at call time (not traced) must be a non-negative integer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fnn import checks

Schedule = Callable[[jax.Array], jax.Array]
"""``step (int array, any shape) -> η_t (float array, same shape)``."""

__all__ = [
    "Schedule",
    "constant",
    "inverse_sqrt",
    "exponential_decay",
    "step_decay",
    "cosine_decay",
    "linear_warmup",
]


def constant(value: float) -> Schedule:
    """``η_t = value`` for every step; ``value ≥ 0``."""
    value = checks.real_in("value", value, 0.0)

    def schedule(step):
        return jnp.full(jnp.shape(_step(step)), value, float)

    return schedule


def inverse_sqrt(init_value: float) -> Schedule:
    """``η_t = η / √(t + 1)``: the classic decay with ``Σ η_t = ∞``; ``η_0 = init_value ≥ 0``."""
    init_value = checks.real_in("init_value", init_value, 0.0)

    def schedule(step):
        return init_value / jnp.sqrt(_step(step).astype(float) + 1)

    return schedule


def exponential_decay(init_value: float, decay_rate: float, transition_steps: int) -> Schedule:
    """``η_t = η · r^(t/T)``: multiplied by ``r = decay_rate > 0`` every ``T = transition_steps`` steps, smoothly."""
    init_value = checks.real_in("init_value", init_value, 0.0)
    decay_rate = checks.real_in("decay_rate", decay_rate, 0.0, low_open=True)
    transition_steps = checks.positive_int("transition_steps", transition_steps)

    def schedule(step):
        return init_value * decay_rate ** (_step(step).astype(float) / transition_steps)

    return schedule


def step_decay(init_value: float, factor: float, step_size: int) -> Schedule:
    """``η_t = η · f^⌊t/s⌋``: multiplied by ``f = factor > 0`` after every ``s = step_size`` steps (a staircase)."""
    init_value = checks.real_in("init_value", init_value, 0.0)
    factor = checks.real_in("factor", factor, 0.0, low_open=True)
    step_size = checks.positive_int("step_size", step_size)

    def schedule(step):
        return init_value * factor ** (_step(step) // step_size).astype(float)

    return schedule


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """``η_t = η · ((1 − α) · ½(1 + cos(π · min(t, T)/T)) + α)``, ``T = decay_steps``.

    From ``η`` at ``t = 0`` down to ``α·η`` at ``t = T``, constant after; ``α ∈ [0, 1]``.
    Reference: Loshchilov & Hutter, "SGDR: stochastic gradient descent with warm restarts", ICLR 2017
    (one period, no restarts).
    """
    init_value = checks.real_in("init_value", init_value, 0.0)
    decay_steps = checks.positive_int("decay_steps", decay_steps)
    alpha = checks.real_in("alpha", alpha, 0.0, 1.0)

    def schedule(step):
        progress = jnp.minimum(_step(step), decay_steps).astype(float) / decay_steps
        return init_value * ((1 - alpha) * 0.5 * (1 + jnp.cos(math.pi * progress)) + alpha)

    return schedule


def linear_warmup(peak_value: float, warmup_steps: int, then: Schedule | None = None) -> Schedule:
    """``η_t = η · t/W`` for ``t < W = warmup_steps``, then ``then(t − W)`` (or the constant ``η``).

    The rate rises linearly from 0 at ``t = 0`` (so the first update is a zero step) to
    ``peak_value`` at ``t = W``. The warm-up joins ``then`` continuously when ``then(0) =
    peak_value``, e.g. ``linear_warmup(η, W, cosine_decay(η, T))``. ``W = 0`` means no warm-up.
    """
    peak_value = checks.real_in("peak_value", peak_value, 0.0)
    warmup_steps = checks.positive_int("warmup_steps", warmup_steps, allow_zero=True)
    if then is not None and not callable(then):
        raise TypeError(f"then must be a schedule (a function of the step) or None; got {then!r}.")

    def schedule(step):
        step = _step(step)
        rest = peak_value if then is None else then(jnp.maximum(step - warmup_steps, 0))
        ramp = peak_value * step.astype(float) / max(warmup_steps, 1)
        return jnp.where(step < warmup_steps, ramp, rest)

    return schedule


def _step(step) -> jax.Array:
    """``step`` as an integer array; a negative concrete step raises ``ValueError``."""
    step = jnp.asarray(step)
    if not jnp.issubdtype(step.dtype, jnp.integer):
        raise TypeError(f"a schedule's step must be an integer (t = 0, 1, 2, ...); got dtype {step.dtype}.")
    if checks.is_concrete(step) and step.size and int(step.min()) < 0:
        raise ValueError(f"a schedule's step must be ≥ 0; got {int(step.min())}.")
    return step
