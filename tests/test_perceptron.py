"""The perceptron rule: convergence within Novikoff's bound, XOR's non-convergence, a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fnn
from fnn import perceptron


def np_perceptron(x, s, max_epochs):
    """Reference: the rule as a plain loop in float64; ``s`` in {−1, +1}."""
    xa = np.hstack([np.asarray(x, np.float64), np.ones((len(x), 1))])
    w = np.zeros(xa.shape[1])
    updates = 0
    for epoch in range(1, max_epochs + 1):
        mistakes = 0
        for xi, si in zip(xa, s):
            if si * (w @ xi) <= 0:
                w = w + si * xi
                mistakes += 1
        updates += mistakes
        if mistakes == 0:
            return w, updates, epoch, True
    return w, updates, max_epochs, False


def separable(rng, n, d, gamma, scale=3.0):
    """``n`` points in ``[−scale, scale]^d`` at margin ≥ ``gamma`` from a random augmented unit separator ``u``.

    Returns ``(x (n, d), s (n,) in {−1, +1}, u (d + 1,))``.
    """
    u = rng.normal(size=d + 1)
    u[-1] *= 0.3  # keep the boundary through the box
    u /= np.linalg.norm(u)
    xs = []
    while len(xs) < n:
        x = rng.uniform(-scale, scale, size=d)
        if abs(np.append(x, 1.0) @ u) >= gamma:
            xs.append(x)
    x = np.array(xs)
    s = np.sign(np.hstack([x, np.ones((n, 1))]) @ u).astype(np.int64)
    return x, s, u


def novikoff(x, s, u):
    """``(R/γ)²`` with ``R = max ‖x'‖`` and ``γ = min s u·x'`` for the unit vector ``u``, in NumPy."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    radius = np.max(np.linalg.norm(xa, axis=1))
    gamma = np.min(s * (xa @ u))
    assert gamma > 0
    return (radius / gamma) ** 2


@pytest.mark.parametrize("gamma", [0.05, 0.2, 1.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_converges_within_novikoff_bound(gamma, dtype):
    x, s, u = separable(np.random.default_rng(0), 120, 3, gamma)
    out = perceptron.train(x.astype(dtype), s, max_epochs=10_000)
    assert bool(out.converged)
    assert 0 < int(out.updates) <= novikoff(x, s, u)
    assert out.w.dtype == dtype and out.w.shape == (4,)
    assert np.all(perceptron.predict(out.w, x.astype(dtype)) == s)  # separates the training set
    bound, radius, margin = perceptron.mistake_bound(x, s, u)
    np.testing.assert_allclose(float(bound), novikoff(x, s, u), rtol=1e-12)


def test_xor_hits_the_epoch_limit():
    data = fnn.data.xor()
    out = perceptron.train(data.x_train, data.y_train, max_epochs=37)
    assert not bool(out.converged)
    assert int(out.epochs) == 37
    assert int(out.updates) >= 37  # at least one mistake in every epoch
    assert np.mean(perceptron.predict(out.w, data.x_train) == 2 * data.y_train - 1) <= 0.75


@pytest.mark.parametrize("seed", range(3))
def test_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 3))  # not separable in general: also compares the runs that stop at the limit
    s = np.where(x[:, 0] + 0.5 * x[:, 1] - 0.2 + 0.3 * rng.normal(size=40) > 0, 1, -1)
    want_w, want_updates, want_epochs, want_conv = np_perceptron(x, s, 25)
    out = perceptron.train(x, s, max_epochs=25)
    np.testing.assert_allclose(np.asarray(out.w), want_w, rtol=1e-12, atol=1e-12)
    assert (int(out.updates), int(out.epochs), bool(out.converged)) == (want_updates, want_epochs, want_conv)


@pytest.mark.slow  # a property sweep
@settings(max_examples=20)
@given(
    n=st.integers(1, 25),
    d=st.integers(1, 4),
    gamma=st.floats(0.1, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_separable_sets(n, d, gamma, seed):
    x, s, u = separable(np.random.default_rng(seed), n, d, gamma)
    out = perceptron.train(x, s, max_epochs=100_000)
    want_w, want_updates, want_epochs, _ = np_perceptron(x, s, 100_000)
    assert bool(out.converged)
    assert int(out.updates) <= novikoff(x, s, u)
    assert (int(out.updates), int(out.epochs)) == (want_updates, want_epochs)
    np.testing.assert_allclose(np.asarray(out.w), want_w, rtol=1e-9, atol=1e-9)


def test_zero_one_labels_mean_minus_one_plus_one():
    x, s, _ = separable(np.random.default_rng(1), 30, 2, 0.3)
    a = perceptron.train(x, s)
    b = perceptron.train(x, (s + 1) // 2)
    np.testing.assert_array_equal(np.asarray(a.w), np.asarray(b.w))
    np.testing.assert_array_equal(perceptron.signs(np.array([0, 1, 1, 0])), [-1, 1, 1, -1])
    np.testing.assert_array_equal(perceptron.signs(np.array([-1.0, 1.0])), [-1, 1])


def test_jit_gives_the_same_result():
    x, s, _ = separable(np.random.default_rng(2), 50, 2, 0.1)
    eager = perceptron.train(x, s, 500)
    jitted = jax.jit(perceptron.train, static_argnums=2)(jnp.asarray(x), jnp.asarray(s), 500)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_traced_bad_labels_give_nan_weights():
    x = np.array([[0.0, 1.0], [1.0, 0.0]])
    out = jax.jit(perceptron.train, static_argnums=2)(x, jnp.array([1, 2]), 10)
    assert np.all(np.isnan(np.asarray(out.w)))


@pytest.mark.parametrize(
    "x,y,max_epochs,error",
    [
        (np.zeros((3, 2)), np.array([1, -1, 0]), 10, ValueError),  # two label conventions mixed
        (np.zeros((3, 2)), np.array([1, 2, 1]), 10, ValueError),  # not a label
        (np.zeros((3, 2)), np.array([1, -1]), 10, ValueError),  # count mismatch
        (np.zeros((3, 2)), np.array([[1], [-1], [1]]), 10, ValueError),  # y not (N,)
        (np.zeros(3), np.array([1, -1, 1]), 10, ValueError),  # x not (N, d)
        (np.zeros((3, 2), np.int32), np.array([1, -1, 1]), 10, TypeError),  # integer inputs
        (np.zeros((0, 2)), np.zeros(0, np.int32), 10, ValueError),  # no samples
        (np.zeros((3, 2)), np.array([1, -1, 1]), 0, ValueError),
        (np.zeros((3, 2)), np.array([1, -1, 1]), 2.5, TypeError),
        (np.zeros((3, 2)), np.array([True, False, True]), 10, TypeError),
    ],
)
def test_bad_input_raises(x, y, max_epochs, error):
    with pytest.raises(error):
        perceptron.train(x, y, max_epochs)


def test_predict_and_bound_check_shapes():
    with pytest.raises(ValueError, match=r"\(3,\)"):
        perceptron.predict(np.zeros(2), np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        perceptron.mistake_bound(np.zeros((4, 2)), np.ones(4), np.ones(4))
