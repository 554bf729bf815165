"""Mixed precision: bfloat16 matmul operands, float32 (or float64) everything else.

The reference is a NumPy float64 transcription of the δ-recursion in which every matmul operand is
rounded to bfloat16 (``ml_dtypes``, which ships with jax) and the products are summed exactly. With
float64 params the manual backprop does the same arithmetic, so the two agree to float64 rounding:
a missed or misplaced rounding (a matmul left in full precision, δ rounded after the ``1/N``
instead of before) changes results at the bfloat16 level, 2⁻⁹, nine orders of magnitude above the
tolerance.
"""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fnn
from fnn import optim

from helpers import np_sigmoid, np_softmax, rel_err

BF16 = 2.0**-8  # bfloat16's unit roundoff (8 significand bits): rounding errs by at most this, relatively


def _r(a):
    """``a`` rounded to bfloat16 (round to nearest even), as float64."""
    return np.asarray(a, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)


PHI = {"tanh": (np.tanh, lambda z, a: 1 - a**2), "relu": (lambda z: np.maximum(z, 0), lambda z, a: (z > 0) * 1.0),
       "sigmoid": (np_sigmoid, lambda z, a: a * (1 - a))}


def _np_mixed_backprop(params, x, y, hidden, task):
    """Cost and gradients with bfloat16-rounded matmul operands, identity output; ``task`` is
    ``"classes"`` (softmax cross-entropy on the logits, fused ``δ^L = softmax(z^L) − y``) or
    ``"regression"`` (``½‖a − y‖²``, ``δ^L = a − y``)."""
    n = x.shape[0]
    Ws = [np.asarray(p["W"], np.float64) for p in params]
    bs = [np.asarray(p["b"], np.float64) for p in params]
    acts, zs = [np.asarray(x, np.float64)], []
    for l, (W, b) in enumerate(zip(Ws, bs)):
        z = _r(acts[-1]) @ _r(W).T + b
        zs.append(z)
        acts.append(PHI[hidden[l]][0](z) if l < len(Ws) - 1 else z)
    if task == "classes":
        p = np_softmax(zs[-1])
        onehot = np.eye(p.shape[1])[np.asarray(y)]
        cost = -np.mean(np.log(np.sum(p * onehot, axis=1)))
        delta = p - onehot
    else:
        diff = acts[-1] - np.asarray(y, np.float64)
        cost = np.mean(0.5 * np.sum(diff**2, axis=1))
        delta = diff
    grads = [None] * len(Ws)
    for l in reversed(range(len(Ws))):
        grads[l] = {"W": _r(delta).T @ _r(acts[l]) / n, "b": delta.sum(axis=0) / n}
        if l:
            delta = (_r(delta) @ _r(Ws[l])) * PHI[hidden[l - 1]][1](zs[l - 1], acts[l])
    return cost, grads


@pytest.mark.slow  # a property sweep
@settings(max_examples=25)
@given(
    depth=st.integers(1, 3),
    task=st.sampled_from(["classes", "regression"]),
    data=st.data(),
)
def test_mixed_precision_backprop_equals_a_float64_transcription_with_rounded_operands(depth, task, data):
    sizes = [data.draw(st.sampled_from([1, 4, 16])) for _ in range(depth + 1)]
    sizes[-1] = max(sizes[-1], 2) if task == "classes" else sizes[-1]
    hidden = data.draw(st.lists(st.sampled_from(sorted(PHI)), min_size=depth - 1, max_size=depth - 1))
    n = data.draw(st.sampled_from([1, 3, 16]))
    seed = data.draw(st.integers(0, 2**16))
    net = fnn.MLP(sizes, hidden, "identity", init="xavier_uniform", compute_dtype="bfloat16")
    params = net.init(jax.random.PRNGKey(seed), jnp.float64)
    params = [{"W": p["W"], "b": p["b"] + 0.1} for p in params]  # non-zero biases
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (n, sizes[0]), jnp.float64)
    if task == "classes":
        y, loss = jax.random.randint(jax.random.PRNGKey(seed + 2), (n,), 0, sizes[-1]), fnn.losses.softmax_cross_entropy
    else:
        y, loss = jax.random.normal(jax.random.PRNGKey(seed + 2), (n, sizes[-1]), jnp.float64), fnn.losses.half_mse
    cost, grads = jax.jit(fnn.backprop, static_argnums=(0, 4))(net, params, x, y, loss)
    want_cost, want = _np_mixed_backprop(params, x, y, hidden, task)
    assert abs(float(cost) - want_cost) <= 1e-12 * max(1.0, abs(want_cost))
    for l, (g, w) in enumerate(zip(grads, want)):
        for k in ("W", "b"):
            assert g[k].dtype == jnp.float64
            assert rel_err(g[k], w[k]) <= 1e-10, (l, k)


def test_matmul_rounds_both_operands_and_sums_in_the_params_dtype():
    a = jax.random.normal(jax.random.PRNGKey(0), (64, 300), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (300, 50), jnp.float32)
    mixed = fnn.MLP((3, 2), compute_dtype="bfloat16").matmul(a, b)
    assert mixed.dtype == jnp.float32
    rounded = _r(a) @ _r(b)  # exact products of the rounded operands, summed in float64
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    assert rel_err(mixed, rounded) <= 1e-6  # float32 summation of 300 exact products
    assert rel_err(mixed, exact) >= 1e-4  # the operands really were rounded
    np.testing.assert_array_equal(fnn.MLP((3, 2)).matmul(a, b), a @ b)  # no compute_dtype: plain


def _dots(text: str) -> list[tuple[str, str, str]]:
    """``(lhs, rhs, result)`` element types of every dot_general in a StableHLO module."""
    pattern = r"stablehlo\.dot_general .*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>"
    return re.findall(pattern, text)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_every_matmul_of_a_training_step_is_bfloat16_and_nothing_else_is(batch_norm):
    """3L − 1 matmuls per step (no δ for the inputs), all bf16 × bf16 → f32; params, gradients,
    optimizer state, cost and batch-norm statistics stay float32."""
    net = fnn.MLP((20, 16, 16, 4), "relu", compute_dtype="bfloat16", batch_norm=batch_norm)
    params = net.init(jax.random.PRNGKey(0))
    state = net.init_state() if batch_norm else None
    opt = optim.adam(1e-3)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 20), jnp.float32)
    y = jnp.arange(32) % 4

    def step(params, opt_state, state):
        cost, grads, *new_state = fnn.backprop(net, params, x, y, fnn.losses.softmax_cross_entropy, state=state)
        params, opt_state = optim.step(opt, grads, opt_state, params)
        return cost, params, opt_state, (new_state[0] if new_state else None)

    lowered = jax.jit(step).lower(params, opt.init(params), state)
    assert _dots(lowered.as_text()) == [("bf16", "bf16", "f32")] * (3 * net.num_layers - 1)
    outs = step(params, opt.init(params), state)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(outs)
               if jnp.issubdtype(leaf.dtype, jnp.floating))
    plain = fnn.MLP((20, 16, 16, 4), "relu", batch_norm=batch_norm)
    plain_step = jax.jit(lambda p, s: fnn.backprop(plain, p, x, y, fnn.losses.softmax_cross_entropy, state=s))
    assert all(lhs == rhs == out == "f32" for lhs, rhs, out in _dots(plain_step.lower(params, state).as_text()))


@pytest.mark.parametrize("hidden, output, loss", [
    ("relu", "identity", fnn.losses.softmax_cross_entropy),
    pytest.param("tanh", "sigmoid", fnn.losses.mse, marks=pytest.mark.slow),
])
def test_mixed_precision_backprop_matches_jax_grad_of_the_mixed_forward(hidden, output, loss):
    """jax.grad differentiates the same bf16-operand forward but rounds in its own places in the
    backward pass (it keeps δ in float32 and rounds each product instead), so the two agree to a few
    bfloat16 spacings per layer. (The float32 network's gradient is not a reference: it is the
    gradient of another function, and leaves that are sums of cancelling terms differ by more.)"""
    net = fnn.MLP((30, 24, 24, 5), hidden, output, compute_dtype="bfloat16")
    params = net.init(jax.random.PRNGKey(3))
    x = jax.random.normal(jax.random.PRNGKey(4), (16, 30), jnp.float32)
    y = jnp.arange(16) % 5 if loss is fnn.losses.softmax_cross_entropy else jax.nn.one_hot(jnp.arange(16) % 5, 5)
    _, manual = fnn.backprop(net, params, x, y, loss)
    _, auto = fnn.autodiff_grads(net, params, x, y, loss)
    _, exact = fnn.backprop(fnn.MLP((30, 24, 24, 5), hidden, output), params, x, y, loss)
    bound = 4 * net.num_layers * BF16
    for m, a in zip(jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(auto)):
        assert rel_err(m, a) <= bound
    # and the rounding is really there: the mixed gradient is not the float32 one
    assert max(rel_err(m, e) for m, e in zip(jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(exact))) \
        > 1e-4


def test_bad_compute_dtype():
    for bad in ("int8", "bf16", 3, "float16", "float32", jnp.float64):  # float16 would need loss scaling
        with pytest.raises(ValueError, match=r"compute_dtype must be None or one of \['bfloat16'\]"):
            fnn.MLP((3, 2), compute_dtype=bad)
    assert fnn.MLP((3, 2), compute_dtype=jnp.bfloat16).compute_dtype == "bfloat16"
    assert fnn.MLP((3, 2), compute_dtype="bfloat16") == fnn.MLP((3, 2), compute_dtype=jnp.bfloat16)


@pytest.mark.slow  # training on real MNIST, twice
def test_mixed_precision_matches_float32_accuracy_on_mnist_10k(mnist_dir):
    """784-256-10, Adam, 10 epochs, the same seeds: bfloat16 matmuls within 0.5 points of float32."""
    ds, _ = fnn.data.zscore_dataset(fnn.data.load_dataset("mnist-10k", mnist_dir))
    x_train, x_test = ds.x_train, ds.x_test
    acc, final = {}, {}
    for compute in (None, "bfloat16"):
        net = fnn.MLP((784, 256, 10), "relu", init="he_normal", compute_dtype=compute)
        result = fnn.fit(net, net.init(jax.random.PRNGKey(0)), optim.adam(learning_rate=1e-3),
                         (x_train, ds.y_train), loss=fnn.losses.softmax_cross_entropy, epochs=10, batch_size=128,
                         key=jax.random.PRNGKey(1), held_out=(x_test, ds.y_test), quiet=True)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves((result.params, result.opt_state))
                   if jnp.issubdtype(leaf.dtype, jnp.floating))
        acc[compute] = result.history[-1]["held_out_accuracy"]
        final[compute] = result.params[0]["W"]
    assert acc[None] >= 0.95 and abs(acc["bfloat16"] - acc[None]) <= 0.005, acc
    assert rel_err(final[None], final["bfloat16"]) > 1e-3  # two different trainings, not one twice


@pytest.mark.slow
def test_gradient_checks_judge_a_mixed_network_in_full_precision():
    net = fnn.MLP((6, 5, 3), "tanh", compute_dtype="bfloat16")
    plain = net.replace(compute_dtype=None)
    assert plain == fnn.MLP((6, 5, 3), "tanh") and net.replace() == net
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6), jnp.float64)
    y = jnp.arange(4) % 3
    loss = fnn.losses.softmax_cross_entropy
    np.testing.assert_array_equal(fnn.check_gradients(net, params, x, y, loss),
                                  fnn.check_gradients(plain, params, x, y, loss))
    assert fnn.gradcheck.gradient_report(net, params, x, y, loss) == fnn.gradcheck.gradient_report(plain, params, x, y,
                                                                                                  loss)
    with pytest.raises(TypeError, match="unknown arguments"):
        net.replace(hidden=3)
