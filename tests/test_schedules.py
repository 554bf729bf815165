"""Learning-rate schedules: values against their formulas, warm-up continuity, jit, bad arguments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnn import schedules

# Each schedule next to its formula written with the math module (t a Python int).
CASES = {
    "constant": (schedules.constant(0.3), lambda t: 0.3),
    "inverse_sqrt": (schedules.inverse_sqrt(0.5), lambda t: 0.5 / math.sqrt(t + 1)),
    "exponential_decay": (schedules.exponential_decay(0.2, 0.1, 1000), lambda t: 0.2 * 0.1 ** (t / 1000)),
    "step_decay": (schedules.step_decay(0.4, 0.5, 30), lambda t: 0.4 * 0.5 ** (t // 30)),
    "cosine_decay": (
        schedules.cosine_decay(0.1, 500, alpha=0.05),
        lambda t: 0.1 * (0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 500) / 500)) + 0.05),
    ),
    "linear_warmup": (schedules.linear_warmup(0.2, 10), lambda t: 0.2 * t / 10 if t < 10 else 0.2),
}
STEPS = [0, 1, 2, 9, 10, 11, 29, 30, 31, 59, 60, 499, 500, 501, 1000, 2000, 123_457]


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_match_formula_at_chosen_steps(name):
    schedule, formula = CASES[name]
    want = np.array([formula(t) for t in STEPS])
    for t in STEPS:  # one step at a time, as an int32 scalar (what an optimizer passes) and as an int
        np.testing.assert_allclose(schedule(jnp.asarray(t, jnp.int32)), formula(t), rtol=1e-13, atol=0)
        np.testing.assert_allclose(schedule(t), formula(t), rtol=1e-13, atol=0)
    got = schedule(jnp.asarray(STEPS, jnp.int32))  # a whole array of steps at once
    assert got.shape == (len(STEPS),) and got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)


@settings(max_examples=40)
@given(t=st.integers(0, 2**31 - 1), name=st.sampled_from(sorted(CASES)))
def test_values_match_formula_at_any_step(t, name):
    schedule, formula = CASES[name]
    np.testing.assert_allclose(schedule(jnp.asarray(t, jnp.int32)), formula(t), rtol=1e-12, atol=1e-300)


def test_classic_inverse_sqrt_values():
    np.testing.assert_allclose(schedules.inverse_sqrt(1.0)(jnp.arange(4)), [1, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5])


def test_step_decay_is_a_staircase_and_exponential_is_smooth():
    steps = jnp.arange(0, 100)
    stair = np.asarray(schedules.step_decay(1.0, 0.5, 25)(steps))
    assert set(np.unique(stair)) == {1.0, 0.5, 0.25, 0.125}
    assert np.all(stair[:25] == 1.0) and stair[25] == 0.5 and stair[99] == 0.125
    smooth = np.asarray(schedules.exponential_decay(1.0, 0.5, 25)(steps))
    assert np.all(np.diff(smooth) < 0) and smooth[25] == pytest.approx(0.5, rel=1e-14)


def test_cosine_decay_ends_at_alpha_and_stays():
    s = schedules.cosine_decay(2.0, 100, alpha=0.1)
    values = np.asarray(s(jnp.arange(0, 300)))
    assert values[0] == 2.0 and np.all(np.diff(values[:101]) < 0)
    np.testing.assert_allclose(values[100:], 0.2, rtol=1e-15)
    np.testing.assert_allclose(s(50), 2.0 * (0.9 * 0.5 + 0.1), rtol=1e-15)  # half way: the mean of η and αη


def test_warmup_ramps_linearly_then_joins_the_next_schedule_continuously():
    peak, warm, decay = 0.1, 20, 200
    s = schedules.linear_warmup(peak, warm, then=schedules.cosine_decay(peak, decay))
    values = np.asarray(s(jnp.arange(0, warm + decay + 10)))
    np.testing.assert_allclose(values[: warm + 1], peak * np.arange(warm + 1) / warm, rtol=1e-15)  # 0 → η
    assert values[0] == 0.0 and values[warm] == peak
    # after the warm-up the schedule is cosine_decay shifted by `warm` steps
    tail = [peak * 0.5 * (1 + math.cos(math.pi * min(k, decay) / decay)) for k in range(decay + 10)]
    np.testing.assert_allclose(values[warm:], tail, rtol=1e-13, atol=1e-18)
    # continuity at the join: no jump bigger than one warm-up increment η/W
    jumps = np.abs(np.diff(values))
    assert jumps.max() <= peak / warm * (1 + 1e-12)
    # no `then`: constant peak; no warm-up: `then` itself
    np.testing.assert_allclose(schedules.linear_warmup(peak, warm)(jnp.arange(warm, 3 * warm)), peak)
    inv = schedules.inverse_sqrt(0.3)
    np.testing.assert_allclose(schedules.linear_warmup(0.3, 0, inv)(jnp.arange(50)), inv(jnp.arange(50)), rtol=1e-15)


def test_schedules_trace_once_under_jit():
    traces = []

    @jax.jit
    def rate(step):
        traces.append(step)
        return schedules.linear_warmup(1.0, 4, schedules.exponential_decay(1.0, 0.5, 2))(step)

    values = [float(rate(jnp.asarray(t, jnp.int32))) for t in range(8)]
    assert len(traces) == 1 and rate._cache_size() == 1
    np.testing.assert_allclose(values, [0, 0.25, 0.5, 0.75, 1, 0.5**0.5, 0.5, 0.5**1.5], rtol=1e-15)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: schedules.constant(-0.1), r"value .*got -0\.1"),
        (lambda: schedules.constant(float("nan")), r"value .*got nan"),
        (lambda: schedules.inverse_sqrt(-1.0), r"init_value .*got -1\.0"),
        (lambda: schedules.exponential_decay(0.1, 0.0, 10), r"decay_rate .*\(0, inf\).*got 0\.0"),
        (lambda: schedules.exponential_decay(0.1, 0.5, 0), r"transition_steps must be > 0; got 0"),
        (lambda: schedules.exponential_decay(0.1, 0.5, -3), r"transition_steps must be > 0; got -3"),
        (lambda: schedules.step_decay(0.1, -0.5, 10), r"factor .*got -0\.5"),
        (lambda: schedules.step_decay(0.1, 0.5, 0), r"step_size must be > 0; got 0"),
        (lambda: schedules.cosine_decay(0.1, -5), r"decay_steps must be > 0; got -5"),
        (lambda: schedules.cosine_decay(0.1, 10, alpha=1.5), r"alpha .*\[0, 1\].*got 1\.5"),
        (lambda: schedules.linear_warmup(0.1, -1), r"warmup_steps must be ≥ 0; got -1"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: schedules.constant("0.1"),
        lambda: schedules.constant(True),
        lambda: schedules.exponential_decay(0.1, 0.5, 2.5),
        lambda: schedules.step_decay(0.1, 0.5, True),
        lambda: schedules.linear_warmup(0.1, 5, then=0.1),
    ],
)
def test_wrong_argument_types_raise_type_error(make):
    with pytest.raises(TypeError):
        make()


def test_steps_must_be_non_negative_integers():
    s = schedules.inverse_sqrt(0.1)
    with pytest.raises(ValueError, match=r"step must be ≥ 0; got -1"):
        s(-1)
    with pytest.raises(ValueError, match=r"got -2"):
        s(jnp.asarray([3, -2, 0], jnp.int32))
    with pytest.raises(TypeError, match=r"integer"):
        s(1.5)
    # the warm-up never evaluates `then` at a negative step, even during the ramp
    assert float(schedules.linear_warmup(0.1, 5, s)(0)) == 0.0
