"""The epoch as a composition (fnn.epoch): parts a user supplies run as fnn's own do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn import optim
from fnn.epoch import GRAD_NORM, BatchGradient, Observer, build_epoch
from fnn.train import fit, shuffled, shuffled_batches

SCE = fnn.losses.softmax_cross_entropy
NET = fnn.MLP((4, 6, 3), "tanh")


def _data(n=23, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    return jnp.asarray(x), jnp.asarray((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5))


def _cost(params, x, y):
    """The mean softmax cross-entropy, written here with jax.nn (independent of fnn.losses)."""
    a = x
    for layer in params[:-1]:
        a = jnp.tanh(a @ layer["W"].T + layer["b"])
    z = a @ params[-1]["W"].T + params[-1]["b"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))


def halved_gradient(params, state, x, y, idx):
    """A gradient of the user's own: jax.grad of _cost on the batch, halved."""
    xb, yb = x[idx], y[idx]
    cost, grads = jax.value_and_grad(_cost)(params, xb, yb)
    return BatchGradient(cost, jax.tree.map(lambda g: g / 2, grads), state, None,
                         jnp.asarray(idx.shape[0], jnp.int32), (xb, yb))


# An observer of the user's own: the squared norm of the first layer's weights before each step.
FIRST_LAYER = Observer("first_layer_sq", lambda s: jnp.sum(s.params[0]["W"] ** 2))


def test_an_epoch_built_from_a_custom_gradient_and_an_observer_equals_the_loop_it_stands_for():
    """Catches build_epoch reading another gradient than the one given, updating with something else
    than optim.step, skipping the smaller last batch or misaligning the observer's values."""
    x, y = _data()
    params = NET.init(jax.random.PRNGKey(0), jnp.float64)
    opt = optim.sgd(0.3)
    epoch = jax.jit(build_epoch(opt, shuffled(23, 5), halved_gradient, (FIRST_LAYER, GRAD_NORM)))
    key = jax.random.PRNGKey(7)
    new_params, _, _, new_key, stats = epoch(params, opt.init(params), None, key, x, y)

    _, draw = jax.random.split(key)
    full, rest = shuffled_batches(draw, 23, 5)
    p, seen, norms, costs = params, [], [], []
    for idx in [*np.asarray(full), np.asarray(rest)]:  # the loop: θ ← θ − η ½∇C on each batch
        seen.append(sum(float(np.sum(np.asarray(layer["W"], np.float64) ** 2)) for layer in p[:1]))
        cost, g = jax.value_and_grad(_cost)(p, x[idx], y[idx])
        costs.append(float(cost))
        norms.append(float(np.sqrt(sum(np.sum(np.asarray(t) ** 2) / 4 for t in jax.tree.leaves(g)))))
        p = jax.tree.map(lambda a, b: a - 0.3 * b / 2, p, g)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.observed["first_layer_sq"], seen, rtol=1e-12)
    np.testing.assert_allclose(stats.grad_norm, norms, rtol=1e-10)
    np.testing.assert_allclose(stats.cost, costs, rtol=1e-12)
    np.testing.assert_array_equal(stats.batch_size, [5, 5, 5, 5, 3])
    assert int(stats.first_bad_step) == -1 and not np.array_equal(new_key, key)


def test_fit_takes_a_custom_gradient_and_observer_and_reports_the_observer_in_the_history():
    """Catches fit dropping a user's gradient or observer: the params follow the loop of the halved
    gradient on fit's batches, and each epoch's history holds the observer's mean over its steps."""
    x, y = _data(40)
    params = NET.init(jax.random.PRNGKey(1), jnp.float64)
    result = fit(NET, params, optim.sgd(0.2), (x, y), loss=SCE, epochs=2, batch_size=8, key=jax.random.PRNGKey(3),
                 quiet=True, gradient=halved_gradient, observers=[FIRST_LAYER])
    key, p = jax.random.PRNGKey(3), params
    for record in result.history:  # the loop fit stands for: a fresh order per epoch, θ ← θ − η ½∇C
        key, draw = jax.random.split(key)
        seen = []
        for idx in np.asarray(shuffled_batches(draw, 40, 8)[0]):
            seen.append(float(np.sum(np.asarray(p[0]["W"]) ** 2)))
            p = jax.tree.map(lambda a, g: a - 0.2 * g / 2, p, jax.grad(_cost)(p, x[idx], y[idx]))
        assert record["first_layer_sq"] == pytest.approx(np.mean(seen), rel=1e-12)
    for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("observers, words", [
    ((Observer("a", lambda s: 0.0), Observer("a", lambda s: 1.0)), "distinct names"),
    ((Observer("a", lambda s: jnp.ones(1, bool), stops=True), Observer("b", lambda s: jnp.ones(1, bool), stops=True)),
     "at most one observer"),
])
def test_build_epoch_refuses_ambiguous_observers(observers, words):
    with pytest.raises(ValueError, match=words):
        build_epoch(optim.sgd(0.1), shuffled(10, 5), halved_gradient, observers)


def test_privacy_refuses_a_custom_gradient():
    x, y = _data(40)
    params = NET.init(jax.random.PRNGKey(1), jnp.float64)
    with pytest.raises(ValueError, match="no gradient of its own"):
        fit(NET, params, optim.sgd(0.1), (x, y), loss=SCE, epochs=1, batch_size=8, key=0, quiet=True,
            gradient=halved_gradient, privacy=fnn.privacy.Privacy(clip=1.0, lot_size=8, noise_multiplier=1.0,
                                                                   delta=1e-3))


def test_the_guard_stops_every_update_from_the_first_failing_step_on():
    """Catches a guarded epoch that goes on updating after the first non-finite step: the params it
    returns are those from just before that step (what fit's before_failure replays)."""
    x, y = _data()
    params = NET.init(jax.random.PRNGKey(0), jnp.float64)

    def poisoned(params, state, x, y, idx):  # the gradient turns NaN on the batch that holds sample 0
        g = halved_gradient(params, state, x, y, idx)
        bad = jnp.any(idx == 0)
        return g._replace(grads=jax.tree.map(lambda t: jnp.where(bad, jnp.nan, t), g.grads))

    opt = optim.sgd(0.3)
    epoch = jax.jit(build_epoch(opt, shuffled(23, 5), poisoned, (fnn.diagnose.guard(NET),)))
    key = jax.random.PRNGKey(4)
    new_params, _, _, _, stats = epoch(params, opt.init(params), None, key, x, y)
    full, rest = shuffled_batches(jax.random.split(key)[1], 23, 5)
    batches = [*np.asarray(full), np.asarray(rest)]
    first = next(i for i, idx in enumerate(batches) if 0 in idx)
    assert first < len(batches) - 1, "the test needs steps after the failing one"
    p = params
    for idx in batches[:first]:
        p = jax.tree.map(lambda a, g: a - 0.3 * g / 2, p, jax.grad(_cost)(p, x[idx], y[idx]))
    assert int(stats.first_bad_step) == first
    assert sorted(stats.bad_batch[stats.bad_batch >= 0]) == sorted(batches[first])
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
