"""DP-SGD: the Rényi accountant against Google's dp-accounting and Abadi et al., and the private step."""

import functools
import math

import dp_accounting  # the reference accountant, a test dependency (pip install -e '.[test]')
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import rdp as dp_rdp

import fnn
from fnn import privacy


def _reference_epsilon(q, sigma, steps, delta, orders=None):
    accountant = dp_rdp.RdpAccountant() if orders is None else dp_rdp.RdpAccountant(orders=list(orders))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def slow(*values):
    """A parameter set that only the full suite runs (``pytest -m "not slow"`` leaves it out)."""
    return pytest.param(*values, marks=pytest.mark.slow)


GRID = [(q, sigma, steps, delta) for q in (1e-3, 0.01, 0.075, 0.3) for sigma in (0.7, 1.0, 2.0, 4.0)
        for steps in (1, 100, 10_000) for delta in (1e-5, 1e-7)]
INTEGER_ORDERS = tuple(a for a in privacy.ORDERS if a == int(a))
# The fast tier keeps every (q, σ) at 100 steps and δ = 1e-5; the rest of the grid is a slow sweep.
INTEGER_GRID = [g if g[2] == 100 and g[3] == 1e-5 else slow(*g) for g in GRID]


@pytest.mark.parametrize("q, sigma, steps, delta", INTEGER_GRID)
def test_epsilon_equals_dp_accounting_on_integer_orders(q, sigma, steps, delta):
    """Integer orders (the finite sum of Mironov et al.) and the same RDP-to-(ε, δ) conversion:
    the two accountants agree to rounding."""
    ours = privacy.privacy_spent(q, sigma, steps, delta, INTEGER_ORDERS)
    assert ours == pytest.approx(_reference_epsilon(q, sigma, steps, delta, INTEGER_ORDERS), rel=1e-9, abs=1e-12)


def _renyi_by_quadrature(q, sigma, alpha):
    """``log A_α = log ∫ μ(z)^α μ₀(z)^{1−α} dz`` with ``μ₀ = 𝒩(0, σ²)`` and ``μ = (1−q) μ₀ + q 𝒩(1, σ²)``:
    the definition, integrated on a fine grid (NumPy, float64), independent of any series."""
    z = np.linspace(-40 * sigma, 40 * sigma + 1, 2_000_001)
    log0, log1 = -z**2 / (2 * sigma**2), -(z - 1) ** 2 / (2 * sigma**2)
    log_mu = np.logaddexp(np.log1p(-q) + log0, np.log(q) + log1)
    f = alpha * log_mu + (1 - alpha) * log0
    top = f.max()
    # divided by the same grid's integral of the unnormalized μ₀, which cancels the grid's own error
    return top + np.log(np.sum(np.exp(f - top))) - np.log(np.sum(np.exp(log0)))


@pytest.mark.parametrize("q, sigma", [(0.01, 1.0), (0.3, 1.0), slow(0.075, 0.7), slow(0.001, 4.0)])
def test_fractional_orders_equal_the_definition_by_quadrature(q, sigma):
    """The fractional-order series against the Rényi divergence integrated numerically. (Here
    dp-accounting's own series stops early or gives up at small orders for q = 0.3; fnn's does not.)"""
    orders = (1.25, 1.5, 2.25, 3.75, 7.25)
    ours = privacy.rdp(q, sigma, 1, orders) * (np.asarray(orders) - 1)  # log A_α
    reference = [_renyi_by_quadrature(q, sigma, a) for a in orders]
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-13)
    integer = privacy.rdp(q, sigma, 1, (2, 5)) * np.array([1, 4])  # and the finite sum, too
    np.testing.assert_allclose(integer, [_renyi_by_quadrature(q, sigma, a) for a in (2, 5)], rtol=1e-6, atol=1e-13)


@pytest.mark.slow  # a sweep; the integer-order test keeps a fast subset
@pytest.mark.parametrize("q, sigma, steps, delta", [g for g in GRID if g[1] >= 1.0 and g[3] == 1e-5])
def test_epsilon_against_dp_accounting_with_its_own_grid(q, sigma, steps, delta):
    """With each package's default grid of orders: fnn's ε is never more than 1 % above
    dp-accounting's, and within 1 % of it wherever ε is in the usual range [0.2, 20]. (Outside it
    fnn's can be lower: its grid reaches orders 768 and 1024 for tiny ε, and its fractional series
    converges at orders near 1 that dp-accounting excludes for large ε.)"""
    ours = privacy.privacy_spent(q, sigma, steps, delta)
    reference = _reference_epsilon(q, sigma, steps, delta)
    assert ours <= reference * 1.01
    if 0.2 <= reference <= 20:
        assert ours == pytest.approx(reference, rel=0.01)


def test_abadi_et_al_moments_accountant_value():
    """Abadi et al. 2016, §3.1: q = 0.01, σ = 4, δ = 10⁻⁵, T = 10,000 give ε ≈ 1.26 with the moments
    accountant, whose conversion is ε = min_α (ε_α − log δ / (α − 1)). The same RDP curve with that
    conversion gives 1.26; the tighter conversion fnn uses gives less."""
    curve = privacy.rdp(0.01, 4.0, 10_000)
    a = np.asarray(privacy.ORDERS, np.float64)
    classic = float(np.min(curve - math.log(1e-5) / (a - 1)))
    assert round(classic, 2) == 1.26
    assert privacy.privacy_spent(0.01, 4.0, 10_000, 1e-5) < classic


def test_full_batch_is_the_gaussian_mechanism():
    """q = 1: ε_α = α / (2σ²) for every order (Mironov 2017, Prop. 7), composed by addition."""
    np.testing.assert_allclose(privacy.rdp(1.0, 2.0, 3, (2, 10, 100)), [3 * a / 8 for a in (2, 10, 100)], rtol=1e-15)
    assert not privacy.rdp(0.0, 1.0, 100).any()


def test_noise_multiplier_for_a_target_epsilon_inverts_the_accountant():
    for target, q, steps in ((0.5, 600 / 8000, 1000), (2.0, 0.01, 5000), (8.0, 256 / 60000, 10_000)):
        sigma = privacy.noise_multiplier_for(target, q, steps, 1e-5)
        assert privacy.privacy_spent(q, sigma, steps, 1e-5) <= target
        assert privacy.privacy_spent(q, sigma * (1 - 2e-3), steps, 1e-5) > target  # the smallest, to 0.1 %


def test_bad_arguments():
    with pytest.raises(ValueError, match="sampling rate"):
        privacy.rdp(1.5, 1.0)
    with pytest.raises(ValueError, match="noise multiplier"):
        privacy.rdp(0.1, 0.0)
    with pytest.raises(ValueError, match="orders must be finite numbers > 1"):
        privacy.rdp(0.1, 1.0, orders=(1.0, 2))
    with pytest.raises(ValueError, match=r"δ must be a finite number in \(0, 1\)"):
        privacy.epsilon(privacy.rdp(0.1, 1.0), 0.0)
    with pytest.raises(ValueError, match="target ε"):
        privacy.noise_multiplier_for(0.0, 0.1, 10, 1e-5)


# ---------------------------------------------------------------------------------------------
# The mechanism.


def _problem(n=50, dtype=jnp.float64):
    net = fnn.MLP((6, 9, 4), "tanh")
    params = net.init(jax.random.PRNGKey(0), dtype)
    x = jax.random.normal(jax.random.PRNGKey(1), (n, 6), dtype)
    return net, params, x, jnp.arange(n) % 4


@pytest.mark.parametrize("chunk", [slow(4), 7, slow(64)])  # each compiles the private step, ~10–25 s
def test_without_noise_the_step_is_the_clipped_sum_of_vmap_grad(chunk):
    """σ = 0: ``Σ_{x ∈ lot} g_x min(1, c/‖g_x‖) / (qN) + βW`` with ``g_x`` from ``vmap(jax.grad)`` over
    the lot that :func:`poisson_lot` draws from the same key; float64, 1e-10. Lots of 0..50
    examples in chunks that do and do not divide them."""
    net, params, x, y = _problem()
    loss, q, clip, l2 = fnn.losses.softmax_cross_entropy, 0.3, 1.8, 0.05  # clip ≈ the median norm
    step = jax.jit(lambda p, key: privacy.private_gradient(net, p, x, y, loss, key, clip=clip, noise_multiplier=0.0,
                                                           q=q, chunk=chunk, l2=l2))
    per_sample = jax.vmap(jax.grad(lambda p, xi, yi: fnn.objective(net, p, xi[None], yi[None], loss)),
                          in_axes=(None, 0, 0))
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        grads, stats = step(params, key)
        lot_key, _ = jax.random.split(key)
        order, count = privacy.poisson_lot(lot_key, 50, q)
        lot = np.asarray(order)[: int(count)]
        assert int(stats.lot_size) == len(lot) and np.all(np.diff(lot) > 0)
        g = per_sample(params, x[lot], y[lot])
        norms = np.sqrt(sum(np.sum(np.asarray(t).reshape(len(lot), -1) ** 2, axis=1) for t in jax.tree.leaves(g)))
        scale = np.minimum(1, clip / norms)
        assert 0 < stats.clipped_fraction < 1 and stats.clipped_fraction == pytest.approx(np.mean(norms > clip))
        for (path, got), want, p in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(g),
                                        jax.tree.leaves(params)):
            expected = np.tensordot(scale, np.asarray(want), 1) / (q * 50)
            if path[-1].key == "W":
                expected = expected + l2 * np.asarray(p)
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.slow  # compiles the private step twice, ~20 s
def test_the_noise_is_gaussian_with_standard_deviation_sigma_c_over_qn():
    """The noised step minus the noiseless one, over all P entries: mean 0 and standard deviation
    σc/(qN) (z-tests at about 4 standard errors), and a fresh draw for another key."""
    net = fnn.MLP((30, 40, 10), "relu")
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 30), jnp.float64)
    y = jnp.arange(64) % 10
    kw = dict(clip=1.5, q=0.25, chunk=16)

    @functools.partial(jax.jit, static_argnums=1)
    def noise(key, sigma):
        g, _ = privacy.private_gradient(net, params, x, y, fnn.losses.softmax_cross_entropy, key,
                                        noise_multiplier=sigma, **kw)
        return g

    diff = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(noise(jax.random.PRNGKey(5), 2.0)),
                                                          jax.tree.leaves(noise(jax.random.PRNGKey(5), 0.0)))])
    expected = 2.0 * 1.5 / (0.25 * 64)
    p = diff.size  # 30·40 + 40 + 40·10 + 10 = 1,650
    assert abs(diff.mean()) < 4 * expected / np.sqrt(p)
    assert diff.std() == pytest.approx(expected, rel=4 * np.sqrt(2 / p))  # the sample std's standard error
    other = np.concatenate([np.ravel(a) for a in jax.tree.leaves(noise(jax.random.PRNGKey(6), 2.0))])
    assert not np.allclose(other, diff)


@pytest.mark.slow  # compiles a 784-256-10 step on 2,048 samples
def test_the_private_step_builds_no_per_example_gradients():
    """XLA's memory analysis of the compiled step: its temporaries stay far below one per-example
    gradient array ``chunk × P`` (let alone ``N × P``)."""
    net = fnn.MLP((784, 256, 10), "relu")
    params = net.init(jax.random.PRNGKey(0))
    x = jnp.zeros((2048, 784), jnp.float32)
    y = jnp.zeros(2048, jnp.int32)
    step = jax.jit(lambda p, key: privacy.private_gradient(net, p, x, y, fnn.losses.softmax_cross_entropy, key,
                                                           clip=1.0, noise_multiplier=1.0, q=0.1, chunk=128))
    temp = step.lower(params, jax.random.PRNGKey(0)).compile().memory_analysis().temp_size_in_bytes
    per_example_bytes = 128 * sum(p.size for p in jax.tree.leaves(params)) * 4
    assert temp < per_example_bytes / 20, (temp, per_example_bytes)


def test_batch_norm_and_bad_settings_are_refused():
    net, params, x, y = _problem()
    bn = fnn.MLP((6, 9, 4), "tanh", batch_norm=True)
    loss = fnn.losses.softmax_cross_entropy
    with pytest.raises(ValueError, match="batch normalization"):
        privacy.private_gradient(bn, bn.init(jax.random.PRNGKey(0)), x, y, loss, jax.random.PRNGKey(0), clip=1.0,
                                 noise_multiplier=1.0, q=0.1)
    with pytest.raises(ValueError, match="block must be"):
        privacy.poisson_lot(jax.random.PRNGKey(0), 50, 0.1, block=0)
    with pytest.raises(ValueError, match=r"chunk=6 rows cannot split into shards=4 equal parts; use a chunk divisible"):
        privacy.lot_sum(jax.random.PRNGKey(0), 50, 0.1, lambda rows: rows.sum(), jnp.int32(0), chunk=6, shards=4)
    with pytest.raises(ValueError, match=r"clip must be a finite number in \(0, inf\)"):
        privacy.private_gradient(net, params, x, y, loss, jax.random.PRNGKey(0), clip=0.0, noise_multiplier=1.0, q=0.1)


# ---------------------------------------------------------------------------------------------
# Training.


def _fit_problem():
    net = fnn.MLP((8, 16, 3), "tanh")
    x = jax.random.normal(jax.random.PRNGKey(1), (400, 8), jnp.float32)
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0)
    return net, net.init(jax.random.PRNGKey(0)), x, y


KW = dict(loss=fnn.losses.softmax_cross_entropy, batch_size=50, quiet=True)


@pytest.mark.slow  # three private training runs
def test_private_training_records_epsilon_and_resumes_bit_for_bit():
    net, params, x, y = _fit_problem()
    settings = privacy.Privacy(clip=1.0, lot_size=40, noise_multiplier=1.2, delta=1e-5)
    opt = fnn.optim.momentum(0.2)
    whole = fnn.fit(net, params, opt, (x, y), epochs=4, key=jax.random.PRNGKey(3), privacy=settings, **KW)
    assert whole.stopped is None and whole.history[-1]["train_loss"] < whole.history[0]["train_loss"]
    for record in whole.history:  # ε of epoch × round(N/L) = 10 steps at q = 0.1
        assert record["epsilon"] == pytest.approx(privacy.privacy_spent(0.1, 1.2, 10 * record["epoch"], 1e-5))
        assert record["noise_multiplier"] == 1.2
    half = fnn.fit(net, params, opt, (x, y), epochs=2, key=jax.random.PRNGKey(3), privacy=settings, **KW)
    rest = fnn.fit(net, half.params, opt, (x, y), epochs=2, key=half.key, opt_state=half.opt_state, start_epoch=2,
                   privacy=settings._replace(spent=half.privacy_spent), **KW)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(rest.params)):
        np.testing.assert_array_equal(a, b)
    assert [r["epsilon"] for r in rest.history] == [r["epsilon"] for r in whole.history[2:]]


def test_a_resumed_plan_adds_this_calls_steps_to_what_was_spent_before():
    """The accounting of the resume above without the training (for the fast tier): after a resume at
    epoch 2, what the run has spent covers all 40 steps, not only the 20 of this call."""
    settings = privacy.Privacy(clip=1.0, lot_size=40, noise_multiplier=1.2, delta=1e-5)
    before = privacy.plan(settings, 400, epochs=4).spent_after(20)
    after = privacy.plan(settings._replace(spent=before), 400, epochs=4, start_epoch=2).spent_after(20)
    assert after.steps == 40
    np.testing.assert_allclose(after.rdp, privacy.account(0.1, 1.2, 40).rdp, rtol=1e-12)
    assert after.epsilon(1e-5) == pytest.approx(privacy.privacy_spent(0.1, 1.2, 40, 1e-5), rel=1e-12)


@pytest.mark.slow  # a private training run
def test_a_target_epsilon_sets_the_noise_for_the_whole_run():
    net, params, x, y = _fit_problem()
    settings = privacy.Privacy(clip=1.0, lot_size=40, target_epsilon=3.0, delta=1e-5)
    r = fnn.fit(net, params, fnn.optim.sgd(0.2), (x, y), epochs=3, key=jax.random.PRNGKey(3), privacy=settings,
                **KW)
    assert 3.0 * 0.99 < r.history[-1]["epsilon"] <= 3.0
    assert r.history[-1]["noise_multiplier"] == pytest.approx(privacy.noise_multiplier_for(3.0, 0.1, 30, 1e-5))


def test_private_training_refuses_what_the_analysis_does_not_cover():
    net, params, x, y = _fit_problem()
    good = privacy.Privacy(clip=1.0, lot_size=40, noise_multiplier=1.0)
    kw = dict(epochs=1, key=jax.random.PRNGKey(0), **KW)
    bn = fnn.MLP((8, 16, 3), "tanh", batch_norm=True)
    with pytest.raises(ValueError, match="no batch norm"):
        fnn.fit(bn, bn.init(jax.random.PRNGKey(0)), fnn.optim.sgd(0.1), (x, y), privacy=good, **kw)
    with pytest.raises(ValueError, match="grad_source='manual'"):
        fnn.fit(net, params, fnn.optim.sgd(0.1), (x, y), privacy=good, grad_source="autodiff", **kw)
    with pytest.raises(ValueError, match="exactly one of"):
        fnn.fit(net, params, fnn.optim.sgd(0.1), (x, y), privacy=privacy.Privacy(clip=1.0, lot_size=40), **kw)
    with pytest.raises(ValueError, match="lot_size"):
        fnn.fit(net, params, fnn.optim.sgd(0.1), (x, y), privacy=good._replace(lot_size=401), **kw)
    with pytest.raises(TypeError, match="Privacy"):
        fnn.fit(net, params, fnn.optim.sgd(0.1), (x, y), privacy={"clip": 1.0}, **kw)


@pytest.mark.parametrize("n, q, block", [slow(1000, 0.004, None), slow(20, 0.95, None), (40, 1.0, None),
                                         slow(1000, 0.004, 2), (20, 0.6, 3)])
def test_poisson_lots_have_binomial_sizes_and_uniform_membership(n, q, block):
    """Over 20,000 lots: the size has mean qN and variance qN(1−q), every example joins with
    frequency q (bounds at about 5 standard errors), members come first in increasing order. With
    blocks of 2 or 3 gaps the lots take several blocks (the default block almost never does)."""
    order, count = jax.jit(jax.vmap(lambda k: privacy.poisson_lot(k, n, q, block)))(
        jax.random.split(jax.random.PRNGKey(0), 20_000))
    order, count = np.asarray(order), np.asarray(count)
    assert count.mean() == pytest.approx(n * q, abs=5 * np.sqrt(n * q * (1 - q) / 20_000) + 1e-12)
    assert count.var() == pytest.approx(n * q * (1 - q), rel=0.06, abs=1e-12)
    joined = np.zeros(n + 1)
    np.add.at(joined, order.ravel(), 1)
    assert np.all(np.abs(joined[:n] / 20_000 - q) <= 5 * np.sqrt(q * (1 - q) / 20_000) + 1e-12)
    for o, c in zip(order[:500], count[:500]):
        assert np.all(np.diff(o[:c]) > 0) and np.all(o[c:] == n)


def test_lot_sum_covers_every_member_at_every_padded_size():
    """:func:`lot_sum` over lots that land in every compiled size and beyond the largest (drawn from
    keys found by search: a lot above qN + 4s is rare): every member exactly once, no padding row,
    pieces of at most ``chunk`` rows (3, and 64: one piece), and the sum starts from ``start``. With
    ``shards`` (a mesh's devices) every piece holds a multiple of them, still at most ``chunk``."""
    n, q = 400, 0.01  # qN = 4: sizes 2, 4, …, 12, and beyond
    sizes = privacy.lot_sizes(n, q)
    lot = jax.jit(lambda k: privacy.poisson_lot(k, n, q))
    keys = jax.random.split(jax.random.PRNGKey(0), 40_000)
    counts = np.asarray(jax.jit(jax.vmap(lambda k: lot(k)[1]))(keys))
    assert counts.max() > sizes[-1] and n > sizes[-1]  # the search found a lot beyond the largest size
    picks = [int(np.flatnonzero(counts == c)[0]) for c in sorted(set(counts.tolist()))]
    start = (jnp.int32(7), jnp.int32(0), jnp.int32(0))
    for chunk, shards in ((3, 1), (64, 1), (8, 4)):
        def rows_sum(rows, chunk=chunk, shards=shards):
            assert rows.shape[0] <= chunk and rows.shape[0] % shards == 0  # static: checked while tracing every branch
            real = rows < n
            return (jnp.sum(real, dtype=jnp.int32), jnp.sum(jnp.where(real, rows, 0), dtype=jnp.int32),
                    jnp.sum(jnp.where(real, rows * rows, 0), dtype=jnp.int32))

        run = jax.jit(lambda key, rows_sum=rows_sum, chunk=chunk, shards=shards: privacy.lot_sum(
            key, n, q, rows_sum, start, chunk=chunk, shards=shards))
        for i in picks:
            order, count = lot(keys[i])
            members = np.asarray(order)[: int(count)]
            (got_count, got_sum, got_squares), got_lot = run(keys[i])
            assert int(got_lot) == len(members) == counts[i]
            assert (int(got_count), int(got_sum), int(got_squares)) == (7 + len(members), members.sum(),
                                                                        (members ** 2).sum())
