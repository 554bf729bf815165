"""Mini-batch training: shuffling, compiled epochs, the NaN guard, resume, and real-data accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn import checkpoint, optim
from fnn.backprop import backprop_trace
from fnn.train import fit, make_epoch, shuffled_batches

from helpers import np_softmax

SCE = fnn.losses.softmax_cross_entropy


def _toy(n=203, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


NET = fnn.MLP((5, 16, 3), "tanh", init="xavier_uniform")


@pytest.mark.parametrize("n,b", [(100, 10), (103, 10), (7, 7), (7, 1), (5, 3)])
def test_every_sample_once_per_epoch_and_orders_differ(n, b):
    """Catches a shuffle that repeats or loses samples, or reuses the same order every epoch."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    full, rest = shuffled_batches(k1, n, b)
    assert full.shape == (n // b, b) and rest.shape == (n % b,)
    seen = np.concatenate([np.asarray(full).ravel(), np.asarray(rest)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    if n > 3:
        assert not np.array_equal(seen, np.concatenate([np.asarray(a).ravel() for a in shuffled_batches(k2, n, b)]))
    full_d, rest_d = shuffled_batches(k1, n, b, "drop")
    assert rest_d.shape == (0,) and len(np.unique(np.asarray(full_d))) == (n // b) * b


def _recording_shuffles(monkeypatch) -> list:
    """Make fnn.train's epochs report, each time they run, the sample order they drew (full batches, then the rest)."""
    import fnn.train as train

    orders, real = [], train.shuffled_batches

    def recording(*args, **kwargs):
        full, rest = real(*args, **kwargs)
        jax.debug.callback(lambda f, r: orders.append(np.concatenate([np.ravel(f), r])), full, rest)
        return full, rest

    monkeypatch.setattr(train, "shuffled_batches", recording)
    return orders


def test_fit_draws_a_new_order_every_epoch_and_returns_the_advanced_key(monkeypatch):
    """Two epochs through fit: each uses every sample once, the second in another order, and each hands
    on a new key. Catches an epoch that stops advancing its PRNG key (issue 21, second regression: the
    same permutation every epoch, which the shuffle's own test above cannot see) and a fit that drops
    the key its epoch returns."""
    x, y = _toy(23)
    orders = _recording_shuffles(monkeypatch)
    key = jax.random.PRNGKey(1)
    keys = []
    result = fit(NET, NET.init(jax.random.PRNGKey(0)), optim.sgd(learning_rate=0.1), (x, y), loss=SCE, epochs=2,
                 batch_size=10, key=key, quiet=True, on_epoch_end=lambda r: keys.append(np.asarray(r.key)))
    jax.effects_barrier()  # every recording callback has run
    assert len(orders) == 2 and len(keys) == 2
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(23))
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(result.key, keys[1])
    assert not np.array_equal(keys[0], key) and not np.array_equal(keys[1], keys[0])


def _np_costs(params, x, y):
    """``C_x`` of every sample for NET (tanh hidden layer, identity output) and softmax cross-entropy, in NumPy."""
    (W1, b1), (W2, b2) = ((np.asarray(p["W"], np.float64), np.asarray(p["b"], np.float64)) for p in params)
    z = np.tanh(np.asarray(x, np.float64) @ W1.T + b1) @ W2.T + b2
    return -np.log(np_softmax(z)[np.arange(len(z)), np.asarray(y)])


def test_epoch_loss_is_the_batch_size_weighted_mean_of_the_batch_costs(monkeypatch):
    """N = 23 in batches of 10: batches of 10, 10 and 3 samples. ``train_loss`` is Σ_b n_b C_b / N, the mean
    cost over the epoch's samples, not the mean of the three batch costs. With a learning rate of 0 the
    params stay put, so it is the mean of C_x at the initial params. Catches a train_loss that weights
    every batch alike (issue 21, third regression: moves it by about 1 %)."""
    x, y = _toy(23)
    x = x.astype(jnp.float64)
    params = NET.init(jax.random.PRNGKey(0), jnp.float64)
    orders = _recording_shuffles(monkeypatch)
    result = fit(NET, params, optim.sgd(learning_rate=0.0), (x, y), loss=SCE, epochs=1, batch_size=10,
                 key=jax.random.PRNGKey(1), quiet=True)
    jax.effects_barrier()
    costs = _np_costs(params, x, y)
    batches = np.split(orders[0], [10, 20])
    batch_costs = [costs[b].mean() for b in batches]
    weighted = sum(len(b) * c for b, c in zip(batches, batch_costs)) / 23
    unweighted = np.mean(batch_costs)
    assert abs(unweighted - weighted) > 3e-3 * weighted  # the two differ here, so the check below can tell
    assert result.history[0]["train_loss"] == pytest.approx(weighted, rel=1e-12)
    assert weighted == pytest.approx(costs.mean(), rel=1e-14)


def test_last_smaller_batch_is_a_real_step():
    x, y = _toy(23)
    params = NET.init(jax.random.PRNGKey(0))
    opt = optim.sgd(learning_rate=0.1)
    epoch = jax.jit(make_epoch(NET, SCE, opt, num_samples=23, batch_size=5))
    _, _, _, _, stats = epoch(params, opt.init(params), None, jax.random.PRNGKey(1), x, y)
    np.testing.assert_array_equal(stats.batch_size, [5, 5, 5, 5, 3])
    epoch = jax.jit(make_epoch(NET, SCE, opt, num_samples=23, batch_size=5, last_batch="drop"))
    _, _, _, _, stats = epoch(params, opt.init(params), None, jax.random.PRNGKey(1), x, y)
    np.testing.assert_array_equal(stats.batch_size, [5, 5, 5, 5])


@pytest.mark.parametrize("guard", [pytest.param(True, marks=pytest.mark.slow), False])
def test_epoch_matches_a_python_loop_over_batches(guard):
    """The scan-compiled epoch does exactly: shuffle, then per batch backprop → update."""
    x, y = _toy(23)
    params = NET.init(jax.random.PRNGKey(0))
    opt = optim.momentum(learning_rate=0.05, momentum=0.9)
    key = jax.random.PRNGKey(3)
    epoch = jax.jit(make_epoch(NET, SCE, opt, num_samples=23, batch_size=5, guard=guard))
    got, _, _, _, stats = epoch(params, opt.init(params), None, key, x, y)
    _, shuffle_key = jax.random.split(key)
    full, rest = shuffled_batches(shuffle_key, 23, 5)
    p, s = params, opt.init(params)
    costs, norms = [], []
    for idx in [*np.asarray(full), np.asarray(rest)]:
        c, g = fnn.backprop(NET, p, x[idx], y[idx], SCE)
        costs.append(float(c))
        norms.append(np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in jax.tree_util.tree_leaves(g))))
        u, s = opt.update(g, s, p)  # written out, not through the optim.step the epoch calls
        p = optim.apply_updates(p, u)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(p)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(stats.cost, costs, rtol=2e-5)
    np.testing.assert_allclose(stats.grad_norm, norms, rtol=2e-5)  # ‖∇C‖₂ of each step, before its update


def test_global_norm_of_many_small_and_large_leaves():
    rng = np.random.default_rng(0)
    tree = {"big": rng.normal(size=(70, 80)), "small": [rng.normal(size=(n,)) for n in (1, 5, 300)], "s": 2.0}
    tree = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), tree)
    want = np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in jax.tree_util.tree_leaves(tree)))
    np.testing.assert_allclose(optim.global_norm(tree), want, rtol=1e-6)
    assert float(optim.global_norm([])) == 0.0
    assert float(optim.global_norm([3.0, 4])) == 5.0  # Python numbers are leaves too
    mixed = [jnp.full((5000,), 0.5, jnp.bfloat16), jnp.ones((3,), jnp.float32)]
    np.testing.assert_allclose(optim.global_norm(mixed), np.sqrt(5000 * 0.25 + 3), rtol=1e-6)
    huge = [jnp.full((10,), 3e19, jnp.float32), jnp.full((2,), 4e19, jnp.float32)]
    assert np.isinf(optim.global_norm(huge))  # Σ x² overflows float32 ...
    np.testing.assert_allclose(optim.scaled_global_norm(huge), np.sqrt(10 * 9e38 + 2 * 16e38), rtol=1e-6)  # this not
    assert np.isnan(optim.scaled_global_norm([jnp.asarray([1.0, np.nan])]))


@pytest.mark.slow  # training runs
def test_grad_norm_can_be_left_out():
    x, y = _toy(100)
    params = NET.init(jax.random.PRNGKey(0))
    kw = dict(loss=SCE, epochs=2, batch_size=10, key=jax.random.PRNGKey(1), quiet=True)
    with_norm = fit(NET, params, optim.adam(learning_rate=1e-2), (x, y), **kw)
    without = fit(NET, params, optim.adam(learning_rate=1e-2), (x, y), grad_norm=False, **kw)
    assert all("grad_norm" not in r for r in without.history) and without.stopped is None
    assert all(r["grad_norm"] > 0 for r in with_norm.history)
    for a, b in zip(jax.tree_util.tree_leaves(with_norm.params), jax.tree_util.tree_leaves(without.params)):
        np.testing.assert_array_equal(a, b)  # the norm is only recorded; training is the same


def _count_epoch_traces(monkeypatch) -> list:
    """Make fnn.train's epoch functions append to the returned list each time they are traced."""
    import fnn.train as train

    traces, real_make = [], train.make_epoch

    def counting_make(*a, **kw):
        epoch = real_make(*a, **kw)
        return lambda *args: (traces.append(1), epoch(*args))[1]

    monkeypatch.setattr(train, "make_epoch", counting_make)
    return traces


def test_an_epoch_is_one_compiled_call_and_later_epochs_do_not_recompile(monkeypatch):
    import fnn.train as train

    x, y = _toy(600)
    grad_calls, real_grads = [], train.GRAD_SOURCES["manual"]

    def counting_grads(*a):
        grad_calls.append(1)
        return real_grads(*a)

    traces = _count_epoch_traces(monkeypatch)
    monkeypatch.setitem(train.GRAD_SOURCES, "manual", counting_grads)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
    after_first = []
    params = NET.init(jax.random.PRNGKey(0))
    result = fit(NET, params, optim.adam(learning_rate=1e-2), (x, y), loss=SCE, epochs=4, batch_size=32,
                 key=jax.random.PRNGKey(1), quiet=True, on_epoch_end=lambda s: after_first.append(len(compiles)))
    assert result.epoch == 4
    assert len(traces) == 1  # the epoch function is traced (and compiled) once for all 4 epochs
    assert len(grad_calls) == 2  # scan body + the smaller last batch; not 19 per epoch
    assert after_first[0] == after_first[-1]  # no compilation at all after the first epoch


@pytest.mark.slow  # two training runs
def test_manual_and_autodiff_training_agree():
    x, y = _toy(300)
    params = NET.init(jax.random.PRNGKey(0))
    runs = {
        src: fit(NET, params, optim.adam(learning_rate=1e-2), (x, y), loss=SCE, epochs=2, batch_size=32,
                 key=jax.random.PRNGKey(1), grad_source=src, quiet=True).params
        for src in ("manual", "autodiff")
    }
    for a, b in zip(jax.tree_util.tree_leaves(runs["manual"]), jax.tree_util.tree_leaves(runs["autodiff"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_same_seed_same_params_and_the_callers_arrays_stay_valid():
    x, y = _toy(300)
    params = NET.init(jax.random.PRNGKey(0))
    a = fit(NET, params, optim.adam(learning_rate=1e-2), (x, y), loss=SCE, epochs=2, batch_size=32,
            key=jax.random.PRNGKey(1), quiet=True)
    b = fit(NET, params, optim.adam(learning_rate=1e-2), (x, y), loss=SCE, epochs=2, batch_size=32,
            key=jax.random.PRNGKey(1), quiet=True)
    for u, v in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(u, v)
    c = fit(NET, params, optim.adam(learning_rate=1e-2), (x, y), loss=SCE, epochs=2, batch_size=32,
            key=jax.random.PRNGKey(2), quiet=True)
    assert not np.array_equal(c.params[0]["W"], a.params[0]["W"])  # the seed drives the shuffle


def test_interrupt_and_resume_is_bit_identical(tmp_path):
    x, y = _toy(300)
    params = NET.init(jax.random.PRNGKey(0))
    opt = optim.adam(learning_rate=1e-2)
    kw = dict(loss=SCE, batch_size=32, quiet=True)
    straight = fit(NET, params, opt, (x, y), epochs=5, key=jax.random.PRNGKey(1), **kw)

    def save(state):
        checkpoint.save(checkpoint.path_for(tmp_path, state.epoch), params=state.params,
                        opt_state=state.opt_state, key=state.key, epoch=state.epoch)

    fit(NET, params, opt, (x, y), epochs=2, key=jax.random.PRNGKey(1), on_epoch_end=save, **kw)  # "crash" after 2
    ck = checkpoint.load(checkpoint.latest(tmp_path), params=params, opt_state=opt.init(params))
    assert ck.epoch == 2
    resumed = fit(NET, ck.params, opt, (x, y), epochs=3, key=ck.key, opt_state=ck.opt_state, start_epoch=ck.epoch,
                  **kw)
    assert resumed.epoch == 5
    for u, v in zip(jax.tree_util.tree_leaves((straight.params, straight.opt_state)),
                    jax.tree_util.tree_leaves((resumed.params, resumed.opt_state))):
        np.testing.assert_array_equal(u, v)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history[2:]]


def _np_forward(params, x):
    """A ReLU MLP with identity output, in NumPy float64 (independent of fnn.MLP)."""
    a = x
    for l, layer in enumerate(params):
        z = a @ np.asarray(layer["W"], np.float64).T + np.asarray(layer["b"], np.float64)
        a = z if l == len(params) - 1 else np.maximum(z, 0)
    return a


def test_nan_guard_stops_and_keeps_the_last_finite_params():
    x, _ = _toy(300)
    y = jnp.sum(x, axis=1, keepdims=True)
    net = fnn.MLP((5, 16, 1), "relu", "identity")  # regression with mse: too large a step diverges
    params = net.init(jax.random.PRNGKey(0))
    opt = optim.sgd(learning_rate=3.0)
    mse = fnn.losses.mse
    kw = dict(loss=mse, batch_size=10, key=jax.random.PRNGKey(1))
    lines = []
    result = fit(net, params, opt, (x, y), epochs=50, print_fn=lines.append, **kw)
    assert result.stopped is not None and "non-finite" in result.stopped
    epoch = result.history[-1]["epoch"]
    assert f"epoch {epoch}," in result.stopped and epoch < 50
    assert result.nan_report["epoch"] == epoch and len(result.nan_report["batch"]) == 10
    assert any("non-finite" in line for line in lines)
    # Kept: an epoch boundary whose training cost is finite, with its state, so that it resumes exactly.
    # (Before: the params from just before the failing step, whose training cost was already inf.)
    kept = result.nan_report["kept"]
    assert result.epoch == kept["epoch"] < epoch and f"end of epoch {kept['epoch']}" in result.stopped
    again = fit(net, params, opt, (x, y), epochs=kept["epoch"], quiet=True, **kw)
    for a, b in zip(jax.tree_util.tree_leaves((again.params, again.opt_state, again.key)),
                    jax.tree_util.tree_leaves((result.params, result.opt_state, result.key))):
        np.testing.assert_array_equal(a, b)
    np_cost = np.mean((_np_forward(result.params, np.asarray(x, np.float64)) - np.asarray(y, np.float64)) ** 2)
    assert np.isfinite(kept["train_loss"]) and abs(kept["train_loss"] - np_cost) <= 1e-5 * max(1.0, np_cost)
    bad_cost = float(mse(net.apply(result.before_failure[0], x), y))
    assert not np.isfinite(bad_cost) or bad_cost > 1e6 * np_cost  # what the guard used to keep
    # Replay: before_failure holds exactly the params before the failing step, and that step fails.
    step = result.nan_report["step"]
    before = fit(net, params, opt, (x, y), epochs=epoch - 1, quiet=True, **kw)
    _, shuffle_key = jax.random.split(before.key)
    batches, _ = shuffled_batches(shuffle_key, 300, 10)
    p, s = before.params, before.opt_state
    for idx in np.asarray(batches)[:step]:
        _, g = fnn.backprop(net, p, x[idx], y[idx], mse)
        u, s = opt.update(g, s, p)
        p = optim.apply_updates(p, u)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(result.before_failure[0])):
        np.testing.assert_allclose(a, b, rtol=1e-4)
    idx = np.asarray(batches)[step]
    np.testing.assert_array_equal(result.nan_report["batch"], idx)
    # Replay that step eagerly and find, independently of the scan's bookkeeping, the first place
    # (in the order of computation) holding a non-finite value: the report must name the same.
    cost, g, _, trace = backprop_trace(net, p, x[idx], y[idx], mse)
    new = optim.apply_updates(p, opt.update(g, s, p)[0])
    L = net.num_layers
    places = [(f"{k}^{l}", v) for l in range(1, L + 1) for k, v in (("z", trace.zs[l - 1]), ("a", trace.acts[l]))]
    places += [("cost", cost)] + [(f"δ^{l}", trace.deltas[l - 1]) for l in range(L, 0, -1)]
    places += [("gradient", g), ("update", new)]
    finite = lambda t: all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(t))  # noqa: E731
    first = next(name for name, value in places if not finite(value))
    assert result.nan_report["site"] == first, (result.nan_report, first)
    assert first in result.stopped


@pytest.mark.slow  # four training runs
def test_unguarded_epoch_checks_once_at_the_end_and_the_guarded_one_finds_the_step():
    x, y = _toy(100)
    x = x.at[37, 2].set(jnp.inf)
    params = NET.init(jax.random.PRNGKey(0))
    opt = optim.sgd(learning_rate=0.1)
    args = (params, opt.init(params), None, jax.random.PRNGKey(1), x, y)
    outs = {g: jax.jit(make_epoch(NET, SCE, opt, num_samples=100, batch_size=10, guard=g))(*args)
            for g in (True, False)}
    fast, slow = outs[False][-1], outs[True][-1]
    assert int(fast.first_bad_step) == 10 and int(fast.first_bad_site) == -1  # "somewhere in this epoch"
    assert np.all(np.asarray(fast.bad_batch) == -1)
    step = int(slow.first_bad_step)
    assert 0 <= step < 10 and 37 in np.asarray(slow.bad_batch)
    assert not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(outs[False][0]))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(outs[True][0]))
    # Up to the failing step both epochs computed the same costs.
    np.testing.assert_array_equal(np.asarray(fast.cost)[:step], np.asarray(slow.cost)[:step])
    clean = (params, opt.init(params), None, jax.random.PRNGKey(1), x.at[37, 2].set(0.0), y)
    for g in (True, False):
        stats = jax.jit(make_epoch(NET, SCE, opt, num_samples=100, batch_size=10, guard=g))(*clean)[-1]
        assert int(stats.first_bad_step) == -1


@pytest.mark.slow  # training runs
def test_a_false_alarm_of_the_unguarded_check_is_cleared_by_the_guarded_rerun(monkeypatch):
    """Finite gradients whose global norm overflows float32 fail the cheap end-of-epoch check; the
    leaf-by-leaf guarded rerun finds every value finite, so training goes on."""
    net = fnn.MLP((1, 512, 1), "relu", "identity", init="he_uniform")
    x = jnp.ones((8, 1), jnp.float32)
    y = jnp.full((8, 1), 1e18, jnp.float32)  # cost ≈ 1e36: finite; ‖∂C/∂W²‖² ≈ 512 · (1e18 · 30)²: not
    first, last = net.init(jax.random.PRNGKey(0))
    params = [{"W": jnp.abs(first["W"]), "b": jnp.full_like(first["b"], 30.0)}, last]  # every a¹ ≥ 30
    traces = _count_epoch_traces(monkeypatch)
    result = fit(net, params, optim.sgd(learning_rate=1e-30), (x, y), loss=fnn.losses.mse, epochs=2,
                 batch_size=4, key=jax.random.PRNGKey(1), quiet=True)
    assert len(traces) == 2  # the unguarded epoch and, once, the guarded rerun
    assert result.stopped is None and result.epoch == 2
    assert all(np.isinf(r["grad_norm"]) and np.isfinite(r["train_loss"]) for r in result.history)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(result.params))


def _overflowing_regression():
    """A 1-512-1 relu regression whose finite gradients are about 1e19 · 30: their squares overflow float32."""
    net = fnn.MLP((1, 512, 1), "relu", "identity", init="he_uniform")
    first, last = net.init(jax.random.PRNGKey(0))
    params = [{"W": jnp.abs(first["W"]), "b": jnp.full_like(first["b"], 30.0)}, last]
    return net, params, (jnp.ones((8, 1), jnp.float32), jnp.full((8, 1), 1e18, jnp.float32))


@pytest.mark.parametrize("grad_norm", [pytest.param(True, marks=pytest.mark.slow), False])
def test_an_overflow_in_the_optimizer_state_stops_training(grad_norm):
    """Adam's ``v += (1 − β₂) g²`` overflows for |g| ≳ 2e19 although g, the cost and the params are
    finite (that coordinate would be frozen for good): a failure at the update."""
    net, params, data = _overflowing_regression()
    result = fit(net, params, optim.adam(learning_rate=1e-3), data, loss=fnn.losses.mse, epochs=2, batch_size=4,
                 key=jax.random.PRNGKey(1), quiet=True, grad_norm=grad_norm)
    assert result.stopped is not None and result.nan_report["site"] == "update"
    assert result.nan_report["step"] == 0 and result.epoch == 0
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(result.opt_state))


@pytest.mark.slow  # training runs
def test_without_grad_norm_the_failure_report_is_the_same():
    x, y = _toy(100)
    x = x.at[37, 2].set(jnp.inf)
    runs = [fit(NET, NET.init(jax.random.PRNGKey(0)), optim.sgd(learning_rate=0.1), (x, y), loss=SCE, epochs=3,
                batch_size=10, key=jax.random.PRNGKey(1), quiet=True, grad_norm=g) for g in (True, False)]
    assert runs[0].nan_report is not None
    assert str(runs[0].nan_report) == str(runs[1].nan_report)  # (NaN != NaN: compared as text)


def test_nan_report_names_the_layer_where_a_bad_sample_turns_non_finite():
    """A sample with an inf feature makes z^1 non-finite first; the report must say z^1, not later."""
    x, y = _toy(100)
    x = x.at[37, 2].set(jnp.inf)
    result = fit(NET, NET.init(jax.random.PRNGKey(0)), optim.sgd(learning_rate=0.1), (x, y), loss=SCE, epochs=3,
                 batch_size=10, key=jax.random.PRNGKey(1), quiet=True)
    assert result.nan_report["site"] == "z^1" and 37 in result.nan_report["batch"]
    assert result.nan_report["epoch"] == 1 and result.epoch == 0


def test_skip_nonfinite_skips_and_counts_instead_of_stopping():
    x, y = _toy(100)
    x = x.at[37, 2].set(jnp.nan)  # one poisoned sample: its batch's gradient is NaN once per epoch
    opt = optim.skip_nonfinite(optim.sgd(learning_rate=0.1))
    result = fit(NET, NET.init(jax.random.PRNGKey(0)), opt, (x, y), loss=SCE, epochs=3, batch_size=10,
                 key=jax.random.PRNGKey(1), quiet=True)
    assert result.stopped is None and result.epoch == 3
    assert [r["skipped_updates"] for r in result.history] == [1, 2, 3]
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(result.params))


def test_a_skipped_step_leaves_the_batch_norm_statistics_alone(monkeypatch):
    x, y = _toy(100)
    x = x.at[37, 2].set(jnp.nan)  # its batch's mean and variance are NaN once per epoch
    net = fnn.MLP((5, 16, 3), "tanh", batch_norm=True)
    opt = optim.skip_nonfinite(optim.sgd(learning_rate=0.1))
    traces = _count_epoch_traces(monkeypatch)
    result = fit(net, net.init(jax.random.PRNGKey(0)), opt, (x, y), loss=SCE, epochs=3, batch_size=10,
                 key=jax.random.PRNGKey(1), quiet=True, held_out=(x[:36], y[:36]))
    assert result.stopped is None and [r["skipped_updates"] for r in result.history] == [1, 2, 3]
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(result.state))
    assert all(np.isfinite(r["held_out_loss"]) for r in result.history)
    assert len(traces) == 1  # the end-of-epoch check passed: no guarded rerun


def test_bad_arguments():
    x, y = _toy(50)
    params = NET.init(jax.random.PRNGKey(0))
    opt = optim.sgd(learning_rate=0.1)
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 50\]"):
        fit(NET, params, opt, (x, y), loss=SCE, epochs=1, batch_size=51, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="49 samples but x has 50"):
        fit(NET, params, opt, (x, y[:49]), loss=SCE, epochs=1, batch_size=5, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fit(NET, params, opt, (x, y.at[3].set(7)), loss=SCE, epochs=1, batch_size=5, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="unknown gradient source"):
        fit(NET, params, opt, (x, y), loss=SCE, epochs=1, batch_size=5, key=jax.random.PRNGKey(0), grad_source="fd")


def test_bad_arguments_are_named():
    """Each of these ran into a raw error, the NaN guard or a silent result before (noted per case)."""
    x, y = _toy(50)
    params = NET.init(jax.random.PRNGKey(0))
    opt = optim.sgd(learning_rate=0.1)
    kw = dict(loss=SCE, epochs=1, batch_size=5, key=jax.random.PRNGKey(0), quiet=True)
    cases = [  # (changed arguments, error, words); before: ...
        (dict(loss=fnn.losses.mse.per_sample), TypeError, "fnn.losses.Loss"),  # before: AttributeError
        (dict(loss="softmax_crossentropy"), ValueError, "unknown loss"),  # before: AttributeError on a str
        (dict(key=True), TypeError, "PRNG key"),  # before: an error deep inside jax.random
        (dict(l2=-0.1), ValueError, "l2 must be"),  # before: trained on, with a negative loss
        (dict(l2=float("nan")), ValueError, "l2 must be"),  # before: the NaN guard fired, naming no argument
        (dict(batch_size=True), ValueError, "batch_size"),  # before: accepted as a batch of 1
        (dict(epochs=-1), ValueError, "epochs"),
        (dict(held_out=(x[:, :4], y)), ValueError, "held-out set: x has 4 features"),
        (dict(held_out=(x, y.at[0].set(3))), ValueError, r"held-out targets: class labels must lie in \[0, 3\)"),
        (dict(held_out=(x.at[7, 1].set(jnp.nan), y)), ValueError, "held-out x has non-finite values.*sample 7"),
        (dict(held_out=(x[:0], y[:0])), ValueError, "held-out set is empty"),
    ]
    for changes, error, words in cases:  # before: held-out loss nan and a plausible accuracy, for the last three
        with pytest.raises(error, match=words):
            fit(NET, params, opt, (x, y), **{**kw, **changes})
    with pytest.raises(ValueError, match="training set is empty"):
        fit(NET, params, opt, (x[:0], y[:0]), **kw)
    soft = jax.nn.one_hot(y, 3).at[2, 0].set(-0.5)
    with pytest.raises(ValueError, match="non-negative"):  # before: trained on a "distribution" with a negative mass
        fit(NET, params, opt, (x, soft), **kw)
    with pytest.raises(ValueError, match="softmax_cross_entropy on output='identity'"):  # before: wrong gradients
        fit(NET, params, opt, (x, y), **{**kw, "loss": fnn.losses.categorical_cross_entropy})


def test_a_loss_name_and_an_int_seed_are_accepted():
    x, y = _toy(50)
    params = NET.init(jax.random.PRNGKey(0))
    opt = optim.sgd(learning_rate=0.1)
    by_name = fit(NET, params, opt, (x, y), loss="softmax_cross_entropy", epochs=2, batch_size=5, key=3, quiet=True)
    by_object = fit(NET, params, opt, (x, y), loss=SCE, epochs=2, batch_size=5, key=jax.random.PRNGKey(3), quiet=True)
    for a, b in zip(jax.tree_util.tree_leaves(by_name.params), jax.tree_util.tree_leaves(by_object.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # four training runs
def test_a_second_fit_with_the_same_configuration_does_not_recompile(monkeypatch):
    """Sweeps call fit in a loop. Before, every call traced and compiled its epoch again (~0.9 s)."""
    traces = _count_epoch_traces(monkeypatch)
    x, y = _toy(60)
    net = fnn.MLP((5, 7, 3), "tanh")  # a configuration no other test compiles
    for seed in range(3):  # new params and key, a new (equal) optimizer object every call
        fit(net, net.init(jax.random.PRNGKey(seed)), optim.adam(learning_rate=1e-3), (x, y), loss=SCE, epochs=2,
            batch_size=6, key=jax.random.PRNGKey(seed), quiet=True)
    assert len(traces) == 1
    fit(net, net.init(jax.random.PRNGKey(0)), optim.adam(learning_rate=2e-3), (x, y), loss=SCE, epochs=1,
        batch_size=6, key=jax.random.PRNGKey(0), quiet=True)  # another learning rate is another program
    fit(net, net.init(jax.random.PRNGKey(0)), optim.adam(learning_rate=1e-3), (x[:30], y[:30]), loss=SCE,
        epochs=1, batch_size=6, key=jax.random.PRNGKey(0), quiet=True)  # other shapes too
    assert len(traces) == 3


@pytest.mark.slow  # training on real MNIST
def test_mnist_10k_reaches_95_percent(mnist_dir):
    """784-256-10 on the real MNIST test images, split 8,000 train / 2,000 held out."""
    ds = fnn.data.load_dataset("mnist-10k", mnist_dir)
    norm = fnn.data.fit_zscore(ds.x_train)
    x_train, x_test = fnn.data.zscore(norm, ds.x_train), fnn.data.zscore(norm, ds.x_test)
    net = fnn.MLP((784, 256, 10), "relu", init="he_normal")
    params = net.init(jax.random.PRNGKey(0))
    result = fit(net, params, optim.adam(learning_rate=1e-3), (x_train, ds.y_train), loss=SCE, epochs=10,
                 batch_size=128, key=jax.random.PRNGKey(1), held_out=(x_test, ds.y_test), quiet=True)
    acc = result.history[-1]["held_out_accuracy"]
    assert acc >= 0.95, result.history


@pytest.mark.slow  # 30 epochs of training
def test_digits_reaches_96_percent():
    ds = fnn.data.load_dataset("digits")
    norm = fnn.data.fit_zscore(ds.x_train)
    net = fnn.MLP((64, 256, 10), "relu", init="he_normal")
    params = net.init(jax.random.PRNGKey(0))
    result = fit(net, params, optim.adam(learning_rate=1e-3), (fnn.data.zscore(norm, ds.x_train), ds.y_train),
                 loss=SCE, epochs=30, batch_size=32, key=jax.random.PRNGKey(1),
                 held_out=(fnn.data.zscore(norm, ds.x_test), ds.y_test), quiet=True)
    assert result.history[-1]["held_out_accuracy"] >= 0.96, result.history[-1]


@pytest.mark.slow  # training on real MNIST, once per optimizer
@pytest.mark.parametrize("name,kwargs", [
    ("sgd", dict(learning_rate=0.1)),
    ("sgd", dict(learning_rate=fnn.schedules.inverse_sqrt(0.2))),
    ("momentum", dict(learning_rate=0.01, momentum=0.9)),
    ("nesterov", dict(learning_rate=0.01, momentum=0.9)),
    ("adagrad", dict(learning_rate=0.01)),
    ("rmsprop", dict(learning_rate=1e-3)),
    ("adam", dict(learning_rate=1e-3)),
    ("adamw", dict(learning_rate=1e-3, weight_decay=1e-4)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_optimizer_lowers_the_loss_on_real_mnist(mnist_dir, name, kwargs):
    """A 784-64-10 network on 2,000 real MNIST images: 3 epochs at least halve the cost of the start."""
    ds = fnn.data.load_dataset("mnist-10k", mnist_dir)
    x, y = ds.x_train[:2000], ds.y_train[:2000]
    norm = fnn.data.fit_zscore(x)
    x = fnn.data.zscore(norm, x)
    net = fnn.MLP((784, 64, 10), "relu", init="he_normal")
    params = net.init(jax.random.PRNGKey(0))
    start = fnn.evaluate(net, params, jnp.asarray(x), jnp.asarray(y), SCE)["loss"]
    result = fit(net, params, getattr(optim, name)(**kwargs), (x, y), loss=SCE, epochs=3, batch_size=64,
                 key=jax.random.PRNGKey(1), quiet=True)
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.5 * start and losses[-1] < losses[0], (start, losses)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_epochs_keep_every_dtype_and_trace_once(dtype, monkeypatch):
    """Catches weak-typed scalars or promotions that change a leaf's dtype (and force a retrace)."""
    x, y = _toy(200)
    x = x.astype(dtype)
    params = NET.init(jax.random.PRNGKey(0), dtype)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(learning_rate=fnn.schedules.cosine_decay(1e-2, 50)))
    traces = _count_epoch_traces(monkeypatch)
    result = fit(NET, params, opt, (x, y), loss=SCE, epochs=3, batch_size=32, key=jax.random.PRNGKey(1), quiet=True)
    assert len(traces) == 1 and result.epoch == 3
    before = jax.tree_util.tree_leaves((params, opt.init(params)))
    after = jax.tree_util.tree_leaves((result.params, result.opt_state))
    assert [a.dtype for a in after] == [b.dtype for b in before]
    assert not any(getattr(a, "weak_type", False) for a in after)
    assert all(leaf.dtype == dtype for leaf in jax.tree_util.tree_leaves(result.params))


def test_history_reports_the_learning_rate_actually_used():
    x, y = _toy(100)
    sched = fnn.schedules.inverse_sqrt(0.5)
    result = fit(NET, NET.init(jax.random.PRNGKey(0)), optim.sgd(learning_rate=sched), (x, y), loss=SCE, epochs=3,
                 batch_size=10, key=jax.random.PRNGKey(1), quiet=True)
    for e, r in enumerate(result.history):  # 10 updates per epoch: steps 10e .. 10e + 9
        assert r["learning_rate"] == pytest.approx(0.5 / np.sqrt(10 * e + 1), rel=1e-6)
        assert r["learning_rate_last"] == pytest.approx(0.5 / np.sqrt(10 * e + 10), rel=1e-6)
    assert all(r["grad_norm"] > 0 for r in result.history)
