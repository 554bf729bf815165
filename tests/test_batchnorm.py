"""Batch normalization: forward statistics, running averages, and the hand-derived backward pass."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fnn
from fnn import batchnorm
from fnn.activations import ACTIVATIONS
from fnn.losses import CLASSES, LOSSES

from helpers import gradient_errors, rel_err

HIDDEN = sorted(n for n, a in ACTIVATIONS.items() if a.dphi is not None)
PAIRS = [("softmax_cross_entropy", "identity"), ("mse", "identity"), ("categorical_cross_entropy", "softmax"),
         ("binary_cross_entropy", "sigmoid"), ("mae", "tanh")]


@st.composite
def bn_problems(draw):
    depth = draw(st.integers(2, 5))
    sizes = [draw(st.sampled_from([1, 3, 8, 33])) for _ in range(depth + 1)]
    hidden = draw(st.lists(st.sampled_from(HIDDEN), min_size=depth - 1, max_size=depth - 1))
    bn = draw(st.lists(st.booleans(), min_size=depth - 1, max_size=depth - 1).filter(any))
    loss_name, output = draw(st.sampled_from(PAIRS))
    net = fnn.MLP(sizes, hidden, output, batch_norm=bn)
    # A batch of 2 is tested on its own below: there x̂ = ±√(σ²/(σ²+ε)) whatever h is, so every
    # gradient upstream of a batch-normalized layer is of order ε/σ² and made of cancelling terms.
    n = draw(st.sampled_from([3, 5, 64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = net.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), jnp.float64)
    params = [{k: v + (rng.normal(0, 0.3, v.shape) if k in ("gamma", "beta") else 0) for k, v in layer.items()}
              for layer in params]  # γ ≠ 1, β ≠ 0 so that their gradients matter
    state = [{k: jnp.asarray(rng.uniform(0.5, 2, v.shape) if k == "var" else rng.normal(size=v.shape))
              for k, v in s.items()} for s in net.init_state(jnp.float64)]
    x = jnp.asarray(rng.normal(size=(n, sizes[0])))
    loss = LOSSES[loss_name]
    k = sizes[-1]
    y = jnp.asarray(rng.integers(0, k, n)) if loss.targets == CLASSES else jnp.asarray(
        rng.integers(0, 2, (n, k)).astype(float) if loss_name.startswith("binary") else rng.normal(size=(n, k)))
    l2 = draw(st.sampled_from([0.0, 0.3]))
    return net, params, state, x, y, loss, l2


def _assert_equal_to_autodiff(net, params, state, x, y, loss, l2, train):
    c_m, g_m, s_m = fnn.backprop(net, params, x, y, loss, l2, state, train)
    c_a, g_a, s_a = fnn.autodiff_grads(net, params, x, y, loss, l2, state, train)
    chex.assert_trees_all_equal_structs(g_m, params)
    assert rel_err(c_m, c_a) <= 1e-12
    # In train mode Σ_x δ_h = 0 exactly at every normalized layer, so a gradient upstream of one that
    # sums over the batch (a bias, a width-1 layer, inputs nearly constant over the batch) is a sum
    # of cancelling terms: such leaves are judged in ulps of the largest gradient entry (4096 ulps,
    # 9e-13 of it); every leaf of real size is held to the relative 1e-9.
    for leaf, err in gradient_errors(g_m, g_a, 1e-9, ulps=4096 if train else 64):
        assert err <= 1, f"{leaf}: error {err:.3g} × the tolerance"
    chex.assert_trees_all_close(s_m, s_a, rtol=1e-12)


@pytest.mark.slow  # a property sweep (20 networks)
@settings(max_examples=20)
@given(problem=bn_problems())
def test_train_mode_backward_equals_autodiff(problem):
    _assert_equal_to_autodiff(*problem, train=True)


@pytest.mark.slow  # a property sweep (25 networks)
@settings(max_examples=25)
@given(problem=bn_problems())
def test_eval_mode_backward_equals_autodiff(problem):
    _assert_equal_to_autodiff(*problem, train=False)


def test_batch_of_two():
    """With N = 2 the normalized values are ±√(σ²/(σ²+ε)): the gradient into a normalized layer is
    of order ε/σ² and made of cancelling terms. BN's own γ, β and the layers after it are held to
    1e-12; the layers before it to the property test's rule."""
    net = fnn.MLP((3, 4, 4, 2), "tanh", batch_norm=(False, True))
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    state = net.init_state(jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3), jnp.float64)
    y = jnp.array([0, 1])
    loss = fnn.losses.softmax_cross_entropy
    _, g_m, s_m = fnn.backprop(net, params, x, y, loss, 0.0, state)
    _, g_a, s_a = fnn.autodiff_grads(net, params, x, y, loss, 0.0, state)
    for layer, keys in ((1, ("gamma", "beta")), (2, ("W", "b"))):
        for key in keys:
            assert rel_err(g_m[layer][key], g_a[layer][key]) <= 1e-12
    for leaf, err in gradient_errors(g_m, g_a, 1e-9, ulps=4096):
        assert err <= 1, f"{leaf}: error {err:.3g} × the tolerance"
    chex.assert_trees_all_close(s_m, s_a, rtol=1e-12)


def test_gamma_away_from_one():
    """One small case of the property tests above, for the fast tier (compiled, train mode): at the
    initial γ = 1 a backward pass that leaves out the factor γ is still right, here it is not."""
    net = fnn.MLP((3, 4, 2), "tanh", batch_norm=True)
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    params[0]["gamma"] = jnp.array([0.5, 1.5, 2.0, -1.0])
    params[0]["beta"] = jnp.array([0.1, -0.2, 0.3, 0.0])
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64)
    y = jnp.arange(5) % 2
    loss = fnn.losses.softmax_cross_entropy
    both = jax.jit(lambda p, s: (fnn.backprop(net, p, x, y, loss, 0.0, s),
                                 fnn.autodiff_grads(net, p, x, y, loss, 0.0, s)))
    (c_m, g_m, s_m), (c_a, g_a, s_a) = both(params, net.init_state(jnp.float64))
    assert rel_err(c_m, c_a) <= 1e-12
    for leaf, err in gradient_errors(g_m, g_a, 1e-9, ulps=4096):
        assert err <= 1, f"{leaf}: error {err:.3g} × the tolerance"
    chex.assert_trees_all_close(s_m, s_a, rtol=1e-12)


@pytest.mark.slow  # test_batch_of_two catches the same bugs, faster
def test_dropping_the_mean_and_variance_paths_is_caught(monkeypatch):
    """The classroom backward δ_h = γ/σ ⊙ G (no terms through μ and σ²) must fail the check."""
    net = fnn.MLP((4, 6, 3), "tanh", batch_norm=True)
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    state = net.init_state(jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 4), jnp.float64)
    y = jnp.arange(8) % 3
    assert float(jnp.max(fnn.check_gradients(net, params, x, y, fnn.losses.softmax_cross_entropy,
                                             state=state))) < 1e-12
    real = batchnorm.backward
    monkeypatch.setattr(batchnorm, "backward", lambda G, gamma, cache, train: real(G, gamma, cache, train=False))
    report = fnn.check_gradients(net, params, x, y, fnn.losses.softmax_cross_entropy, state=state)
    assert float(report[0]) > 1e-3


def test_train_mode_statistics_and_running_averages():
    net = fnn.MLP((3, 5, 2), "identity", batch_norm=True, bn_momentum=0.8)
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    params[0]["gamma"] = jnp.arange(1.0, 6.0)
    params[0]["beta"] = jnp.arange(5.0) - 2
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 3), jnp.float64) * 3 + 1
    state = net.init_state(jnp.float64)
    _, new = net.apply_train(params, x, state)
    h = np.asarray(x) @ np.asarray(params[0]["W"]).T
    np.testing.assert_allclose(new[0]["mean"], 0.2 * h.mean(0), rtol=1e-12)
    np.testing.assert_allclose(new[0]["var"], 0.8 + 0.2 * h.var(0, ddof=1), rtol=1e-12)
    assert new[1] == {}
    cache = net.forward_trace(params, x, state, train=True)
    u = np.asarray(cache.zs[0])
    np.testing.assert_allclose(u.mean(0), params[0]["beta"], atol=1e-12)
    np.testing.assert_allclose(u.std(0), np.arange(1.0, 6.0) * np.sqrt(h.var(0) / (h.var(0) + 1e-5)), rtol=1e-10)
    # eval mode is the affine map with the running statistics
    ev = net.forward_trace(params, x, new, train=False)
    expected = (h - new[0]["mean"]) / np.sqrt(np.asarray(new[0]["var"]) + 1e-5) * np.arange(1.0, 6.0) + (
        np.arange(5.0) - 2)
    np.testing.assert_allclose(ev.zs[0], expected, rtol=1e-12)


def test_batch_of_one_in_train_mode_is_a_clear_error():
    net = fnn.MLP((3, 4, 2), "relu", batch_norm=True)
    params, state = net.init(jax.random.PRNGKey(0)), net.init_state()
    x = jnp.ones((1, 3), jnp.float32)
    with pytest.raises(ValueError, match="at least 2 samples"):
        net.apply_train(params, x, state)
    with pytest.raises(ValueError, match="at least 2 samples"):
        jax.jit(lambda p, s: fnn.backprop(net, p, x, jnp.array([0]), fnn.losses.softmax_cross_entropy, state=s))(
            params, state)
    assert bool(jnp.all(jnp.isfinite(net.apply(params, x, state))))  # eval mode is fine


def test_configuration_and_parameter_layout():
    net = fnn.MLP((4, 6, 5, 3), "relu", batch_norm=(True, False))
    params = net.init(jax.random.PRNGKey(0))
    assert sorted(params[0]) == ["W", "beta", "gamma"] and sorted(params[1]) == ["W", "b"]
    assert [sorted(s) for s in net.init_state()] == [["mean", "var"], [], []]
    assert net.has_state and not fnn.MLP((4, 6, 3)).has_state
    with pytest.raises(ValueError, match="pass its state"):
        net.apply(params, jnp.ones((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="batch_norm has 1 entries"):
        fnn.MLP((4, 6, 5, 3), "relu", batch_norm=(True,))
    with pytest.raises(ValueError, match="bn_momentum"):
        fnn.MLP((4, 6, 3), batch_norm=True, bn_momentum=1.0)


def test_l2_does_not_touch_gamma_and_beta():
    net = fnn.MLP((4, 6, 3), "tanh", batch_norm=True)
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    state = net.init_state(jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 4), jnp.float64)
    y = jnp.arange(8) % 3
    _, g0, _ = fnn.backprop(net, params, x, y, fnn.losses.softmax_cross_entropy, 0.0, state)
    _, g1, _ = fnn.backprop(net, params, x, y, fnn.losses.softmax_cross_entropy, 0.5, state)
    for key in ("gamma", "beta"):
        np.testing.assert_array_equal(g0[0][key], g1[0][key])
    np.testing.assert_allclose(g1[0]["W"] - g0[0]["W"], 0.5 * params[0]["W"], rtol=1e-10, atol=1e-15)
    assert math.isfinite(float(jnp.sum(g1[0]["W"])))


@pytest.mark.slow  # a training run and a checkpoint round trip
def test_fit_trains_the_running_statistics_and_checkpoints_them(tmp_path):
    from fnn import checkpoint

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3, 2, (200, 5)).astype(np.float32))
    y = jnp.asarray((x[:, 0] > 3).astype(np.int32) + (x[:, 1] > 3).astype(np.int32))
    net = fnn.MLP((5, 16, 16, 3), "sigmoid", batch_norm=(True, False))
    params = net.init(jax.random.PRNGKey(0))
    opt = fnn.optim.adam(learning_rate=1e-2)
    kw = dict(loss=fnn.losses.softmax_cross_entropy, batch_size=20, quiet=True, held_out=(x, y))
    result = fnn.fit(net, params, opt, (x, y), epochs=15, key=jax.random.PRNGKey(1), **kw)
    assert result.state is not None and result.history[-1]["held_out_accuracy"] > 0.8
    # the running mean tracks the batch means of h = W a: the inputs have mean 3, so it moved from 0
    h_mean = np.asarray(x @ result.params[0]["W"].T).mean(0)
    np.testing.assert_allclose(result.state[0]["mean"], h_mean, rtol=0.2, atol=0.2)
    assert float(jnp.max(jnp.abs(result.state[0]["mean"]))) > 0.5
    # held-out evaluation is in eval mode (running statistics): the same as apply with the state
    ev = fnn.evaluate(net, result.params, x, y, fnn.losses.softmax_cross_entropy, state=result.state)
    assert ev["accuracy"] == result.history[-1]["held_out_accuracy"]

    def save(s):
        checkpoint.save(checkpoint.path_for(tmp_path, s.epoch), params=s.params, opt_state=s.opt_state, key=s.key,
                        epoch=s.epoch, state=s.state)

    fit_all = fnn.fit(net, params, opt, (x, y), epochs=4, key=jax.random.PRNGKey(1), **kw)
    fnn.fit(net, params, opt, (x, y), epochs=2, key=jax.random.PRNGKey(1), on_epoch_end=save, **kw)
    ck = checkpoint.load(checkpoint.latest(tmp_path), params=params, opt_state=opt.init(params),
                         state=net.init_state())
    with pytest.raises(checkpoint.CheckpointError, match="batch-norm statistics"):
        checkpoint.load(checkpoint.latest(tmp_path), params=params, opt_state=opt.init(params))
    resumed = fnn.fit(net, ck.params, opt, (x, y), epochs=2, key=ck.key, opt_state=ck.opt_state, state=ck.state,
                      start_epoch=2, **kw)
    for a, b in zip(jax.tree_util.tree_leaves((fit_all.params, fit_all.state)),
                    jax.tree_util.tree_leaves((resumed.params, resumed.state))):
        np.testing.assert_array_equal(a, b)


def test_fit_refuses_a_last_batch_of_one():
    net = fnn.MLP((2, 4, 2), "relu", batch_norm=True)
    x = jnp.ones((21, 2), jnp.float32)
    with pytest.raises(ValueError, match="would hold 1 sample"):
        fnn.fit(net, net.init(jax.random.PRNGKey(0)), fnn.optim.sgd(learning_rate=0.1), (x, jnp.zeros(21, jnp.int32)),
                loss=fnn.losses.softmax_cross_entropy, epochs=1, batch_size=10, key=jax.random.PRNGKey(0))


@pytest.mark.slow  # an experiment's quick run on real MNIST
def test_batchnorm_experiment_quick(tmp_path, mnist_dir):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import batchnorm as experiment

    results = experiment.main(["--quick", "--out", str(tmp_path), "--data-dir", str(mnist_dir)])
    assert (tmp_path / "batchnorm.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "batchnorm.json").read_text())
    assert saved["quick"] is True and set(saved["accuracy"]) == {"with BN", "without BN"}
    # even two short epochs show the sigmoid network with BN learning faster, in every seed
    with_bn, without = (np.asarray(results["per_seed"][k]["mean_last_epochs"]) for k in ("with BN", "without BN"))
    assert with_bn.shape == without.shape == (len(results["seeds"]),)
    assert np.all(with_bn > without + 0.1), (with_bn, without)
