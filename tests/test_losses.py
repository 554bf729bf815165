"""Losses against independent NumPy float64 formulas, their derivatives against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backprop import soft_class_targets

import fnn
from fnn.losses import CLASSES, LOSSES

from helpers import np_sigmoid, np_softmax


def _np_loss(name, a, y):
    """Batch cost from the textbook formula (NumPy, float64). ``y`` is (N, K)."""
    eps = np.finfo(np.float64).eps
    p = np.clip(a, eps, 1 - eps)
    if name == "mse":
        return np.mean((a - y) ** 2)
    if name == "half_mse":
        return np.mean(0.5 * np.sum((a - y) ** 2, axis=1))
    if name == "mae":
        return np.mean(np.abs(a - y))
    if name == "binary_cross_entropy":
        return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    if name == "binary_cross_entropy_with_logits":
        s = np_sigmoid(a)
        return -np.mean(y * np.log(s) + (1 - y) * np.log(1 - s))
    if name == "categorical_cross_entropy":
        return -np.mean(np.sum(y * np.log(p), axis=1))
    if name == "softmax_cross_entropy":
        return -np.mean(np.sum(y * np.log(np_softmax(a)), axis=1))
    raise AssertionError(name)


@st.composite
def batches(draw, loss):
    n, k = draw(st.sampled_from([(1, 1), (4, 3), (9, 5)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if loss.name in ("binary_cross_entropy", "categorical_cross_entropy"):
        a = rng.uniform(0.01, 0.99, (n, k))  # inside (eps, 1 − eps): the clip is not active
    else:
        a = rng.normal(0, 3, (n, k))
    # Every target form the loss accepts: class labels or soft rows of any positive sum (one-hot rows
    # are labels, see test_integer_labels_equal_one_hot); binary 0/1 or soft in [0, 1].
    if loss.targets == CLASSES:
        if draw(st.booleans()):
            labels = rng.integers(0, k, n)
            return a, labels, np.eye(k)[labels]
        y = soft_class_targets(rng, n, k)
    elif loss.name.startswith("binary"):
        y = rng.integers(0, 2, (n, k)).astype(float) if draw(st.booleans()) else rng.uniform(0, 1, (n, k))
    else:
        y = rng.normal(size=(n, k))
    return a, y, y


@pytest.mark.parametrize("name", sorted(LOSSES))
@settings(max_examples=25)
@given(data=st.data())
def test_value_matches_textbook_formula(name, data):
    loss = LOSSES[name]
    a, y, y_dense = data.draw(batches(loss))
    np.testing.assert_allclose(loss(jnp.asarray(a), jnp.asarray(y)), _np_loss(name, a, y_dense), rtol=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
@settings(max_examples=25)
@given(data=st.data())
def test_grad_is_the_derivative_of_the_per_sample_cost(name, data):
    loss = LOSSES[name]
    a, y, _ = data.draw(batches(loss))
    a = jnp.asarray(a)
    t, _ = loss.target(a, jnp.asarray(y))
    auto = jax.grad(lambda a: jnp.sum(loss.per_sample(a, t)))(a)
    np.testing.assert_allclose(loss.grad(a, t), auto, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", [n for n, loss in sorted(LOSSES.items()) if loss.fused_delta])
@settings(max_examples=25)
@given(data=st.data())
def test_fused_delta_is_the_derivative_through_the_canonical_output(name, data):
    """δ^L = φ(z) − y must equal ∂C_x/∂z of loss(φ(z)), for each canonical pair."""
    loss = LOSSES[name]
    _, y, _ = data.draw(batches(loss))
    k = 1 if np.ndim(y) == 1 and loss.targets != CLASSES else None
    n = len(y)
    k = k or (np.shape(y)[1] if np.ndim(y) == 2 else int(np.max(y)) + 1 + data.draw(st.integers(0, 2)))
    z = jnp.asarray(np.random.default_rng(0).normal(0, 3, (n, k)))
    phi = fnn.activations.ACTIVATIONS[loss.canonical_output].phi
    t, _ = loss.target(z, jnp.asarray(y))
    auto = jax.grad(lambda z: jnp.sum(loss.per_sample(phi(z), t)))(z)
    np.testing.assert_allclose(loss.fused_delta(z, t), auto, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["categorical_cross_entropy", "softmax_cross_entropy"])
def test_integer_labels_equal_one_hot(name):
    loss = LOSSES[name]
    z = jnp.asarray(np.random.default_rng(1).uniform(0.1, 1, (5, 4)))
    labels = jnp.array([3, 0, 1, 1, 2])
    assert float(loss(z, labels)) == float(loss(z, jax.nn.one_hot(labels, 4, dtype=z.dtype)))


def test_soft_targets_in_softmax_cross_entropy():
    """Soft targets (rows summing to 1 or not) keep the cross-entropy −Σ y log softmax(z), and its
    derivative ∂C_x/∂z = (Σ_k y_k) softmax(z) − y. Catches a fused δ^L that drops the factor Σ_k y_k
    (issue 21, first regression: off by a relative 0.4 for these rows), also through the backprop."""
    z = jnp.array([[0.5, -1.0, 2.0], [0.0, 3.0, -2.0]])
    y = jnp.array([[0.2, 0.3, 0.9], [0.1, 0.2, 0.3]])  # row sums 1.4 and 0.6
    p, t = np_softmax(np.asarray(z)), np.asarray(y)
    expected = -np.sum(t * np.log(p), axis=1)
    np.testing.assert_allclose(fnn.losses.softmax_cross_entropy(z, y), expected.mean(), rtol=1e-12)
    delta = t.sum(axis=1, keepdims=True) * p - t
    for loss in (fnn.losses.softmax_cross_entropy, fnn.losses.categorical_cross_entropy):
        np.testing.assert_allclose(loss.fused_delta(z, y), delta, rtol=1e-12)
    np.testing.assert_allclose(fnn.losses.softmax_cross_entropy.grad(z, y), delta, rtol=1e-12)
    # one identity layer with z = x: ∂C/∂b = (1/N) Σ_x δ^L_x
    net, eye = fnn.MLP((3, 3), output="identity"), [{"W": jnp.eye(3, dtype=z.dtype), "b": jnp.zeros(3, z.dtype)}]
    _, grads = fnn.backprop(net, eye, z, y, fnn.losses.softmax_cross_entropy)
    np.testing.assert_allclose(grads[0]["b"], delta.mean(axis=0), rtol=1e-12, atol=1e-15)


def test_logits_of_plus_minus_1e4():
    z = jnp.array([[1e4, -1e4], [-1e4, 1e4]], jnp.float32)
    np.testing.assert_allclose(fnn.losses.softmax_cross_entropy(z, jnp.array([1, 1])), 1e4, rtol=1e-6)
    y = jnp.array([[1.0, 0], [1, 0]], jnp.float32)  # row 1 right, row 2 wrong by 1e4 per unit
    np.testing.assert_allclose(fnn.losses.binary_cross_entropy_with_logits(z, y), 5e3, rtol=1e-6)


def test_l2_penalty_counts_weights_only():
    params = [{"W": jnp.array([[1.0, 2.0]]), "b": jnp.array([100.0])}, {"W": jnp.array([[3.0]]), "b": jnp.array([5.0])}]
    assert float(fnn.losses.l2_penalty(params, 0.5)) == pytest.approx(0.25 * (1 + 4 + 9))


@pytest.mark.parametrize("loss,output,target,err,msg", [
    (fnn.losses.mse, jnp.ones((4, 2)), jnp.ones((4,)), ValueError, r"\(4,\) does not match output shape \(4, 2\)"),
    (fnn.losses.mse, jnp.ones((4, 2)), jnp.ones((2, 4)), ValueError, "does not match"),
    (fnn.losses.mse, jnp.ones((4,)), jnp.ones((4,)), ValueError, "2 dimensions"),
    (fnn.losses.binary_cross_entropy, jnp.full((2, 1), 0.5), jnp.array([0.0, 2.0]), ValueError, r"\[0, 1\]"),
    (fnn.losses.softmax_cross_entropy, jnp.ones((3, 4)), jnp.array([0, 1]), ValueError, r"\(N,\) = \(3,\)"),
    (fnn.losses.softmax_cross_entropy, jnp.ones((3, 4)), jnp.array([0.0, 1, 2]), ValueError, r"\(N, K\) = \(3, 4\)"),
    (fnn.losses.softmax_cross_entropy, jnp.ones((3, 4)), jnp.array([0, 1, 4]), ValueError, r"\[0, 4\)"),
    (fnn.losses.softmax_cross_entropy, jnp.ones((3, 4), jnp.int32), jnp.array([0, 1, 2]), TypeError, "floating"),
])
def test_bad_targets(loss, output, target, err, msg):
    with pytest.raises(err, match=msg):
        loss(output, target)


def test_k1_target_may_be_a_vector():
    """The one documented reshape: (N,) targets for (N, 1) outputs, for every non-class loss."""
    a = jnp.array([[0.2], [0.7]])
    for loss in (fnn.losses.mse, fnn.losses.binary_cross_entropy):
        assert float(loss(a, jnp.array([0.0, 1.0]))) == float(loss(a, jnp.array([[0.0], [1.0]])))
