"""The MLP configuration and its pure forward pass."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fnn

from helpers import np_softmax


def _np_forward(params, x, hidden, output):
    fns = {"tanh": np.tanh, "relu": lambda z: np.maximum(z, 0), "identity": lambda z: z, "softmax": np_softmax}
    a = np.asarray(x, np.float64)
    for l, layer in enumerate(params):
        z = a @ np.asarray(layer["W"], np.float64).T + np.asarray(layer["b"], np.float64)
        a = fns[hidden[l] if l < len(params) - 1 else output](z)
    return a


@pytest.mark.slow  # a property sweep
@settings(max_examples=30)
@given(
    depth=st.integers(1, 4),
    data=st.data(),
)
def test_apply_matches_numpy(depth, data):
    sizes = [data.draw(st.sampled_from([1, 3, 8])) for _ in range(depth + 1)]
    hidden = data.draw(st.lists(st.sampled_from(["tanh", "relu"]), min_size=depth - 1, max_size=depth - 1))
    output = data.draw(st.sampled_from(["identity", "softmax"]))
    net = fnn.MLP(sizes, hidden, output)
    params = net.init(jax.random.PRNGKey(data.draw(st.integers(0, 1000))), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (data.draw(st.sampled_from([1, 6])), sizes[0]), jnp.float64)
    out = net.apply(params, x)
    assert out.shape == (x.shape[0], sizes[-1]) and out.dtype == jnp.float64
    np.testing.assert_allclose(out, _np_forward(params, x, hidden, output), rtol=1e-12, atol=1e-14)


def test_configuration_is_static_and_hashable():
    a = fnn.MLP((3, 4, 2), "relu")
    b = fnn.MLP([3, 4, 2], ["relu"])
    assert a == b and hash(a) == hash(b)
    assert a != fnn.MLP((3, 4, 2), "tanh")
    assert a.activation == ("relu",) and a.initializer == "classic"
    with pytest.raises(dataclasses_frozen_error()):
        a.sizes = (1, 2)
    calls = []

    @jax.jit
    def run(params, x):
        return a.apply(params, x)

    f = jax.jit(lambda net, p, x: (calls.append(1), net.apply(p, x))[1], static_argnums=0)
    p = a.init(jax.random.PRNGKey(0))
    x = jnp.ones((2, 3), jnp.float32)
    f(a, p, x)
    f(b, p, x)  # equal configuration: cache hit, no retrace
    assert len(calls) == 1
    chex.assert_trees_all_close(run(p, x), a.apply(p, x))


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_params_are_a_plain_pytree():
    net = fnn.MLP((784, 256, 10), "relu")
    params = net.init(jax.random.PRNGKey(0))
    assert isinstance(params, list) and [sorted(p) for p in params] == [["W", "b"], ["W", "b"]]
    chex.assert_shape([params[0]["W"], params[0]["b"], params[1]["W"], params[1]["b"]],
                      [(256, 784), (256,), (10, 256), (10,)])
    doubled = jax.tree_util.tree_map(lambda t: 2 * t, params)
    chex.assert_trees_all_close(doubled[1]["W"], 2 * params[1]["W"])


@pytest.mark.slow  # vmapped initialization of an ensemble, eagerly
def test_apply_under_vmap_and_grad():
    net = fnn.MLP((3, 5, 2), "tanh")
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    xs = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 3), jnp.float64)
    out = jax.vmap(net.apply, in_axes=(None, 0))(params, xs)
    chex.assert_trees_all_close(out[2], net.apply(params, xs[2]))
    ensemble = jax.vmap(lambda k: net.init(k, jnp.float64))(jax.random.split(jax.random.PRNGKey(2), 3))
    outs = jax.vmap(net.apply, in_axes=(0, None))(ensemble, xs[0])
    assert outs.shape == (3, 6, 2)
    g = jax.grad(lambda p: jnp.sum(net.apply(p, xs[0]) ** 2))(params)
    chex.assert_trees_all_equal_shapes(g, params)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(sizes=(3,)), "at least two"),
    (dict(sizes=(3, 0, 2)), "positive"),
    (dict(sizes=(3, 2.5, 2)), "positive ints"),
    (dict(sizes=(3, 4, 4, 2), activation=("relu",)), "1 entries but sizes"),
    (dict(sizes=(3, 4, 2), activation="swish"), "unknown activation 'swish'"),
    (dict(sizes=(3, 4, 2), activation="softmax"), "only allowed as output"),
    (dict(sizes=(3, 4, 2), output="nope"), "unknown activation 'nope'"),
    (dict(sizes=(3, 4, 2), init="zeros"), "unknown initializer 'zeros'"),
])
def test_bad_configuration(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        fnn.MLP(**kwargs)


def test_apply_bad_input():
    net = fnn.MLP((3, 2), ())
    params = net.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"\(batch, 3\)"):
        net.apply(params, jnp.ones((2, 4), jnp.float32))
    with pytest.raises(TypeError, match="floating"):
        net.apply(params, np.ones((2, 3), np.int64))
    with pytest.raises(ValueError, match="2 dimensions"):
        jax.jit(net.apply)(params, jnp.ones((3,), jnp.float32))
