import jax
import jax.numpy as jnp
import numpy as np

import fnn
from fnn.gradcheck import relative_difference


def _problem(dtype):
    net = fnn.MLP((6, 8, 8, 4), ("sigmoid", "tanh"), "identity")
    params = net.init(jax.random.PRNGKey(0), dtype)
    x = jax.random.normal(jax.random.PRNGKey(1), (10, 6), dtype)
    y = jnp.arange(10) % 4
    return net, params, x, y


def test_per_layer_report_is_small_for_correct_gradients():
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.float64, 1e-12)):
        net, params, x, y = _problem(dtype)
        report = fnn.check_gradients(net, params, x, y, fnn.losses.softmax_cross_entropy, l2=0.01)
        assert report.shape == (3,)
        assert float(jnp.max(report)) < tol, report


def test_checker_detects_a_wrong_gradient(monkeypatch):
    """A backprop that forgets φ' in one layer must show up in that layer's entry."""
    import fnn.gradcheck as gc
    net, params, x, y = _problem(jnp.float64)
    real = gc.backprop

    def broken(*args):
        cost, g = real(*args)
        g[0] = {"W": g[0]["W"] * 1.01, "b": g[0]["b"]}
        return cost, g

    monkeypatch.setattr(gc, "backprop", broken)
    report = fnn.check_gradients(net, params, x, y, fnn.losses.softmax_cross_entropy)
    assert float(report[0]) > 5e-3 and float(jnp.max(report[1:])) < 1e-12


def test_relative_difference():
    a = jnp.array([1.0, -2.0])
    assert float(relative_difference(a, a)) == 0.0
    assert float(relative_difference(jnp.zeros(2), jnp.zeros(2))) == 0.0
    np.testing.assert_allclose(relative_difference(a, jnp.array([1.0, -2.2])), 0.2 / 2.2)


def test_check_gradients_under_jit():
    net, params, x, y = _problem(jnp.float32)
    r = jax.jit(fnn.check_gradients, static_argnums=(0, 4))(net, params, x, y, fnn.losses.softmax_cross_entropy)
    assert float(jnp.max(r)) < 1e-5
