"""Each initializer's mean, variance and support, checked statistically."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.initializers import INITIALIZERS

FAN_IN, FAN_OUT = 400, 600  # 240,000 weights: the sample moments are tight

# name -> (W variance, W bound or None, bias rule)
EXPECTED = {
    "classic": (1 / (3 * FAN_IN), 1 / math.sqrt(FAN_IN), "uniform"),
    "xavier_normal": (1 / FAN_IN, None, "zero"),
    "xavier_uniform": (2 / (FAN_IN + FAN_OUT), math.sqrt(6 / (FAN_IN + FAN_OUT)), "zero"),
    "glorot_normal": (2 / (FAN_IN + FAN_OUT), None, "zero"),
    "he_normal": (2 / FAN_IN, None, "zero"),
    "he_uniform": (2 / FAN_IN, math.sqrt(6 / FAN_IN), "zero"),
    "sparse": (15 / FAN_IN, None, "zero"),  # a mixture: 15 of 400 entries N(0, 1), the rest 0
}


def test_every_initializer_is_specified():
    assert set(EXPECTED) == set(INITIALIZERS)


@pytest.mark.parametrize("name", sorted(INITIALIZERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_moments_and_support(name, dtype):
    var, bound, bias = EXPECTED[name]
    W, b = INITIALIZERS[name](jax.random.PRNGKey(7), FAN_IN, FAN_OUT, dtype)
    assert W.shape == (FAN_OUT, FAN_IN) and b.shape == (FAN_OUT,)
    assert W.dtype == dtype and b.dtype == dtype
    w = np.asarray(W, np.float64).ravel()
    n = w.size
    # mean: 6 standard errors; variance: 6 standard errors of the sample variance
    # (var·sqrt(2/n) for a normal, var·sqrt(0.8/n) for a uniform: excess kurtosis −1.2)
    assert abs(w.mean()) < 6 * math.sqrt(var / n)
    # (the sparse mixture: kurtosis 3·FAN_IN/15, so the term is that minus 1)
    kurt_term = 0.8 if bound else 3 * FAN_IN / 15 - 1 if name == "sparse" else 2.0
    assert abs(w.var() - var) < 6 * var * math.sqrt(kurt_term / n)
    if name == "sparse":  # Martens (2010): exactly 15 connections per unit, each N(0, 1)
        rows = np.asarray(W, np.float64)
        assert np.all(np.count_nonzero(rows, axis=1) == 15)
        nz = rows[rows != 0]
        assert abs(nz.var() - 1) < 6 * math.sqrt(2 / nz.size)
        assert abs(np.mean(np.abs(nz) > 2) - 0.0455) < 6 * math.sqrt(0.0455 * 0.9545 / nz.size)
        # the positions are spread over the inputs: every input column is used by some unit
        assert np.all(np.count_nonzero(rows, axis=0) > 0)
    elif bound:
        assert np.abs(w).max() <= np.asarray(bound, dtype)  # the limit as the dtype rounds it
        assert np.abs(w).max() > 0.99 * bound  # really uniform over the whole interval
    else:
        # normal: the fraction beyond 2σ is 4.55%
        frac = np.mean(np.abs(w) > 2 * math.sqrt(var))
        assert abs(frac - 0.0455) < 6 * math.sqrt(0.0455 * 0.9545 / n)
    if bias == "zero":
        assert not np.any(np.asarray(b))
    else:
        bb = np.asarray(b, np.float64)
        assert np.abs(bb).max() <= 1 / math.sqrt(FAN_IN)
        assert abs(bb.var() - var) < 6 * var * math.sqrt(0.8 / FAN_OUT)


def test_sparse_with_fewer_inputs_than_connections_is_dense():
    W, b = INITIALIZERS["sparse"](jax.random.PRNGKey(1), 6, 50)
    assert np.count_nonzero(np.asarray(W)) == 300 and not np.any(np.asarray(b))
    W2, _ = INITIALIZERS["sparse"](jax.random.PRNGKey(2), 6, 50)
    assert not np.array_equal(np.asarray(W), np.asarray(W2))


def test_mlp_init_uses_the_named_initializer_per_layer():
    net = fnn.MLP((300, 200, 10), "relu", init="he_normal")
    params = net.init(jax.random.PRNGKey(0))
    for layer, fan_in in zip(params, (300, 200)):
        assert abs(float(jnp.var(layer["W"])) - 2 / fan_in) < 0.1 * 2 / fan_in
        assert not np.any(np.asarray(layer["b"]))


def test_layers_get_independent_keys():
    params = fnn.MLP((5, 5, 5), "tanh", init="xavier_normal").init(jax.random.PRNGKey(0))
    assert not np.allclose(params[0]["W"], params[1]["W"])
