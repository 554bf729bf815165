import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fnn.activations import ACTIVATIONS, LEAKY_SLOPE, softmax

from helpers import np_sigmoid, np_softmax

ELEMENTWISE = sorted(n for n, a in ACTIVATIONS.items() if a.dphi is not None)

NP_REFERENCE = {
    "identity": lambda z: z,
    "sigmoid": np_sigmoid,
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0),
    "leaky_relu": lambda z: np.where(z > 0, z, LEAKY_SLOPE * z),
    "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
    "softplus": lambda z: np.logaddexp(z, 0),
    "silu": lambda z: z * np_sigmoid(z),
    "softmax": np_softmax,
}

finite = st.floats(-30, 30, allow_nan=False, width=64)
# A few fixed shapes: eager JAX compiles each primitive once per shape, and the values are what vary.
batches = hnp.arrays(np.float64, st.sampled_from([(1, 1), (3, 5), (8, 16)]), elements=finite)
few = settings(max_examples=30)


def _slow_but(names, *fast):
    """``names`` as parameters, all but ``fast`` marked slow: the fast tier keeps one aimed case."""
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


def test_every_activation_has_a_reference():
    assert set(NP_REFERENCE) == set(ACTIVATIONS)


@pytest.mark.slow  # a property sweep per activation
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@few
@given(z=batches)
def test_phi_matches_numpy(name, z):
    np.testing.assert_allclose(ACTIVATIONS[name].phi(jnp.asarray(z)), NP_REFERENCE[name](z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", _slow_but(ELEMENTWISE, "tanh"))  # a property sweep per activation
@few
@given(z=batches.filter(lambda z: np.all(np.abs(z) > 1e-6)))  # relu-type kinks at 0 excluded
def test_dphi_equals_autodiff(name, z):
    act = ACTIVATIONS[name]
    auto = jax.vmap(jax.vmap(jax.grad(act.phi)))(jnp.asarray(z))
    np.testing.assert_allclose(act.dphi(jnp.asarray(z)), auto, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", _slow_but(sorted(ACTIVATIONS), "softmax"))  # a property sweep per activation
@few
@given(z=batches.filter(lambda z: np.all(np.abs(z) > 1e-6)), seed=st.integers(0, 2**31 - 1))
def test_backward_is_the_vector_jacobian_product(name, z, seed):
    """backward(z, a, g) = g ∂a/∂z, including softmax's full (non-diagonal) Jacobian."""
    act = ACTIVATIONS[name]
    z = jnp.asarray(z)
    g = jax.random.normal(jax.random.PRNGKey(seed), z.shape, z.dtype)
    a, vjp = jax.vjp(act.phi, z)
    np.testing.assert_allclose(act.backward(z, a, g), vjp(g)[0], rtol=1e-11, atol=1e-12)


def test_softmax_jacobian_is_not_diagonal():
    """Catches a backward that treats softmax as element-wise: δ_j must depend on g_k, k ≠ j."""
    z = jnp.array([[0.3, -1.0, 2.0]])
    a = softmax(z)
    g = jnp.array([[1.0, 0.0, 0.0]])
    out = ACTIVATIONS["softmax"].backward(z, a, g)
    expected = np_softmax(z) * (np.asarray(g) - np.sum(np.asarray(g) * np_softmax(z)))
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert abs(float(out[0, 1])) > 1e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_stable_at_extremes(dtype):
    z = jnp.array([[-1000.0, -50.0, 0.0, 50.0, 1000.0]], dtype)
    for name, act in ACTIVATIONS.items():
        a = act.phi(z)
        assert a.dtype == dtype, name
        assert bool(jnp.all(jnp.isfinite(a))), name
        if act.dphi is not None:
            assert bool(jnp.all(jnp.isfinite(act.dphi(z)))), name
    s = ACTIVATIONS["sigmoid"].phi(z)
    assert float(s[0, 0]) == 0.0 and float(s[0, -1]) == 1.0
    np.testing.assert_allclose(ACTIVATIONS["softplus"].phi(z)[0, -1], 1000.0)
    np.testing.assert_allclose(jnp.sum(softmax(z)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_nan_in_is_nan_out(name):
    """Before, relu's where(z > 0, z, 0) mapped a NaN input to 0 (and relu' and leaky_relu' to finite
    slopes), so a NaN sample gave finite logits through a ReLU network while sigmoid gave NaN."""
    act = ACTIVATIONS[name]
    z = jnp.array([[np.nan, 0.0, -1.5, 2.0]])
    a = act.phi(z)
    assert np.isnan(a[0, 0]) and np.all(np.isfinite(a[0, 1:]) | (name == "softmax"))
    if act.dphi is not None:
        d = act.dphi(z)
        assert np.isnan(d[0, 0]) and np.all(np.isfinite(d[0, 1:]))
        # the derivative at exactly 0 keeps jax.grad's convention
        assert float(d[0, 1]) == float(jax.grad(lambda t: act.phi(t[None, None])[0, 0])(0.0))
    g = act.backward(z, a, jnp.ones_like(z))
    assert np.isnan(g[0, 0])
