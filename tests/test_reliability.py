"""Bad input, privacy bookkeeping and silent wrong results of the per-example, curvature, privacy,
second-order and noise functions: one test per finding of an outside review (its number in the name).

Each case was a plausible wrong number, a hang, or an unclear crash; each test checks the clear error
or the right number now (references: ``jax.grad``/``jax.hessian``, NumPy float64, dp-accounting).
The command-line and checkpoint cases are in ``test_reliability_cli.py``.
"""

import inspect
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import rdp as dp_rdp
from jax.flatten_util import ravel_pytree

import fnn
from fnn import curvature as cv
from fnn import per_example as pe
from fnn import privacy, second_order

LOSS = fnn.losses.softmax_cross_entropy


def _problem(n=12, sizes=(4, 5, 3), act="tanh", dtype=jnp.float64, seed=0):
    net = fnn.MLP(sizes, act)
    params = net.init(jax.random.PRNGKey(seed), dtype)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (n, sizes[0]), dtype)
    return net, params, x, jnp.arange(n) % sizes[-1]


def _private_fit(net, params, data, settings, key, epochs, opt=None, **kw):
    return fnn.fit(net, params, opt or fnn.optim.sgd(0.1), data, loss=LOSS, epochs=epochs, batch_size=1, key=key,
                   privacy=settings, quiet=True, **kw)


def _dp_accounting(events, orders):
    """dp-accounting's RDP accountant over ``orders`` with ``[(q, σ, steps), ...]`` composed."""
    accountant = dp_rdp.RdpAccountant(orders=list(orders))
    for q, sigma, steps in events:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant


# ---------------------------------------------------------------------------------------------
# Privacy guarantee.


@pytest.mark.slow  # four private training runs
def test_finding_01_resume_with_a_target_accounts_the_earlier_steps_at_their_sigma():
    """A resumed run with ``target_epsilon`` solves σ for what is left of the budget; ε never falls
    across the resume and equals dp-accounting's composition of both σ's actually used."""
    net, params, x, y = _problem(n=200, sizes=(4, 3))
    settings = privacy.Privacy(clip=1.0, lot_size=10, target_epsilon=2.0, delta=1e-3)
    first = _private_fit(net, params, (x, y), settings, 0, 2)
    with pytest.raises(ValueError, match="spent=result.privacy_spent"):
        _private_fit(net, first.params, (x, y), settings, 0, 2, start_epoch=2, opt_state=first.opt_state)
    second = _private_fit(net, first.params, (x, y), settings._replace(spent=first.privacy_spent), first.key, 2,
                          start_epoch=2, opt_state=first.opt_state)
    eps = [r["epsilon"] for r in first.history + second.history]
    assert all(b > a for a, b in zip(eps, eps[1:])), eps
    sigmas = first.history[0]["noise_multiplier"], second.history[0]["noise_multiplier"]
    assert sigmas[1] > sigmas[0]  # the second half has less budget per step
    steps = 20 * 2  # round(200 / 10) steps per epoch, 2 epochs each
    assert second.privacy_spent.steps == 2 * steps
    events = [(0.05, sigmas[0], steps), (0.05, sigmas[1], steps)]
    # Integer orders (the finite sum): the same RDP and ε to rounding. Every order: the fractional ones
    # come from each package's own series, which differ a little (dp-accounting's stops earlier).
    integer = [i for i, a in enumerate(privacy.ORDERS) if a == int(a)]
    reference = _dp_accounting(events, [privacy.ORDERS[i] for i in integer])
    np.testing.assert_allclose(np.asarray(second.privacy_spent.rdp)[integer], reference._rdp, rtol=1e-9)
    assert privacy.epsilon(np.asarray(second.privacy_spent.rdp)[integer], 1e-3, reference._orders)[0] == \
        pytest.approx(reference.get_epsilon(1e-3), rel=1e-9)
    assert eps[-1] == pytest.approx(_dp_accounting(events, privacy.ORDERS).get_epsilon(1e-3), rel=1e-3)
    assert eps[-1] <= 2.0


def test_finding_02_a_resume_with_the_first_key_draws_fresh_lots_and_noise():
    """Epoch e's lots and noise come from ``fold_in(key, e)``: resuming after epoch 1 with the very key
    the run started with continues exactly as the straight run (it does not replay epoch 1's noise)."""
    net, params, x, y = _problem(n=40, sizes=(4, 3))
    settings = privacy.Privacy(clip=1.0, lot_size=8, noise_multiplier=1.0, delta=1e-3)
    key = jax.random.PRNGKey(7)
    straight = _private_fit(net, params, (x, y), settings, key, 2)
    first = _private_fit(net, params, (x, y), settings, key, 1)
    resumed = _private_fit(net, first.params, (x, y), settings._replace(spent=first.privacy_spent), key, 1,
                           start_epoch=1, opt_state=first.opt_state)
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    replayed = _private_fit(net, first.params, (x, y), settings, key, 1, opt_state=first.opt_state)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(replayed.params),
                                                        jax.tree.leaves(resumed.params)))


@pytest.mark.slow  # six private steps per dtype, each compiled anew
@pytest.mark.parametrize("compute_dtype", [None, "bfloat16"])
def test_finding_03_a_clipped_gradient_never_exceeds_the_clip_norm(compute_dtype):
    """A lot of one example, no noise, ``q = 1``: ``g̃`` is that example's clipped gradient, and its
    norm in float64 is at most ``c``, also when the network's matmuls run in bfloat16."""
    net = fnn.MLP((30, 40, 40, 10), "relu", compute_dtype=compute_dtype)
    clip = 0.5
    for seed in range(6):
        params = net.init(jax.random.PRNGKey(seed))
        x = 30.0 * jax.random.normal(jax.random.PRNGKey(100 + seed), (1, 30), jnp.float32)  # norms far above c
        g, stats = privacy.private_gradient(net, params, x, jnp.array([seed % 10]), LOSS, seed, clip=clip,
                                            noise_multiplier=0.0, q=1.0)
        assert int(stats.lot_size) == 1 and float(stats.clipped_fraction) == 1.0
        norm = math.sqrt(sum(np.sum(np.asarray(t, np.float64) ** 2) for t in jax.tree.leaves(g)))
        assert norm <= clip
        assert norm >= clip * (1 - 1e-3)  # clipped to c, not far below it


@pytest.mark.slow  # private training runs
def test_finding_04_delta_of_one_over_n_or_more_is_refused_unless_allowed():
    net, params, x, y = _problem(n=50, sizes=(4, 3))
    for delta in (0.5, 1 / 50):
        with pytest.raises(ValueError, match=r"1/N = 0\.02.*allow_large_delta=True"):
            _private_fit(net, params, (x, y), privacy.Privacy(1.0, 10, 1.0, delta=delta), 0, 1)
    loud = _private_fit(net, params, (x, y), privacy.Privacy(1.0, 10, 1.0, delta=0.5, allow_large_delta=True), 0, 1)
    assert loud.epoch == 1 and "epsilon" in loud.history[-1]  # it trains when asked to


def test_finding_05_a_negative_step_count_is_refused():
    for call in (lambda: privacy.privacy_spent(0.01, 1.0, -5, 1e-5), lambda: privacy.rdp(0.01, 1.0, -5),
                 lambda: privacy.account(0.01, 1.0, -5)):
        with pytest.raises(ValueError, match="steps must be ≥ 0; got -5"):
            call()
    with pytest.raises(TypeError, match="steps must be an int"):
        privacy.privacy_spent(0.01, 1.0, 2.5, 1e-5)


@pytest.mark.parametrize("sigma", [math.inf, math.nan])
def test_finding_06_an_infinite_noise_multiplier_is_refused_at_once(sigma):
    with pytest.raises(ValueError, match="noise multiplier σ must be a finite number"):
        privacy.privacy_spent(0.01, sigma, 100, 1e-5)
    net, params, x, y = _problem(n=50, sizes=(4, 3))
    with pytest.raises(ValueError, match="noise multiplier σ must be a finite number"):
        _private_fit(net, params, (x, y), privacy.Privacy(1.0, 10, sigma, delta=1e-3), 0, 1)


def test_finding_07_an_infinite_clip_is_refused():
    net, params, x, y = _problem(n=50, sizes=(4, 3))
    with pytest.raises(ValueError, match=r"Privacy.clip must be a finite number in \(0, inf\); got inf"):
        _private_fit(net, params, (x, y), privacy.Privacy(math.inf, 10, 1.0, delta=1e-3), 0, 1)
    with pytest.raises(ValueError, match="clip must be a finite number"):
        privacy.private_gradient(net, params, x, y, LOSS, 0, clip=math.inf, noise_multiplier=1.0, q=0.2)


def test_finding_08_newton_on_the_training_data_is_refused_under_privacy():
    net, params, x, y = _problem(n=50, sizes=(4, 3))
    newton = fnn.optim.newton(lambda p: fnn.objective(net, p, x, y, LOSS), damping=1.0)
    for opt in (newton, fnn.optim.skip_nonfinite(newton)):
        with pytest.raises(ValueError, match="Newton's step reads the Hessian of its objective"):
            fnn.fit(net, params, opt, (x, y), loss=LOSS, epochs=1, batch_size=1, key=0, quiet=True,
                    privacy=privacy.Privacy(1.0, 10, 1.0, delta=1e-3))


# ---------------------------------------------------------------------------------------------
# Silently wrong results.


@pytest.mark.slow
def test_finding_09_params_of_another_network_than_the_trace_are_refused():
    net, params, x, y = _problem()
    _, _, _, trace = fnn.backprop_trace(net, params, x, y, LOSS)
    deeper = fnn.MLP((4, 5, 5, 3), "tanh")
    deep_params = deeper.init(jax.random.PRNGKey(0), jnp.float64)
    with pytest.raises(ValueError, match=r"trace is of a network with sizes \(4, 5, 3\).*\(4, 5, 5, 3\)"):
        pe.batch_grad(deeper, deep_params, trace)
    with pytest.raises(ValueError, match="params must be a list of 2 layers"):
        pe.batch_grad(net, deep_params, trace)


@pytest.mark.parametrize("max_norm", [-1.0, 0.0, math.inf, math.nan])
def test_finding_10_clipping_needs_a_positive_finite_norm(max_norm):
    net, params, x, y = _problem()
    _, _, _, trace = fnn.backprop_trace(net, params, x, y, LOSS)
    with pytest.raises(ValueError, match=r"max_norm must be a finite number in \(0, inf\)"):
        pe.clipped_sum(net, params, trace, max_norm)


@pytest.mark.parametrize("l2", [-1.0, math.inf, math.nan])
def test_finding_11_a_negative_or_non_finite_l2_is_refused(l2):
    net, params, x, y = _problem()
    v = jax.tree.map(jnp.ones_like, params)
    for call in (lambda: cv.sharpness(net, params, x, y, LOSS, l2), lambda: cv.hvp(net, params, x, y, LOSS, v, l2),
                 lambda: cv.ggn_diag(net, params, x, y, LOSS, l2), lambda: fnn.backprop(net, params, x, y, LOSS, l2)):
        with pytest.raises(ValueError, match=r"l2 must be a finite number in \[0, inf\)"):
            call()


def test_finding_12_an_empty_batch_is_refused_by_every_function():
    net, params, _, _ = _problem()
    x0, y0 = jnp.zeros((0, 4), jnp.float64), jnp.zeros((0,), jnp.int32)
    v = jax.tree.map(jnp.ones_like, params)
    kfac = second_order.kfac(net, LOSS)
    calls = {
        "backprop": lambda: fnn.backprop(net, params, x0, y0, LOSS),
        "hvp": lambda: cv.hvp(net, params, x0, y0, LOSS, v),
        "ggn_diag": lambda: cv.ggn_diag(net, params, x0, y0, LOSS),
        "kronecker_factors": lambda: cv.kronecker_factors(net, params, x0, y0, LOSS),
        "kfac": lambda: kfac.update(params, kfac.init(params), params, (x0, y0)),
        "private_gradient": lambda: privacy.private_gradient(net, params, x0, y0, LOSS, 0, clip=1.0,
                                                             noise_multiplier=1.0, q=0.5),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match="has 0 samples"):
            call()


@pytest.mark.slow  # power iteration against a full Hessian
def test_finding_13_sharpness_started_on_the_second_eigenvector_finds_the_first():
    net, params, x, y = _problem(n=8, sizes=(3, 4, 2))
    flat, unravel = ravel_pytree(params)
    hessian = jax.hessian(lambda f: fnn.objective(net, unravel(f), x, y, LOSS))(flat)
    values, vectors = np.linalg.eigh(np.asarray(hessian))
    assert values[-1] > 0 and values[-1] > abs(values[0])  # λ_max is also the largest in magnitude
    second = unravel(jnp.asarray(vectors[:, -2]))
    top = cv.sharpness(net, params, x, y, LOSS, start=second, max_iter=1000)
    assert bool(top.converged)
    assert float(top.value) == pytest.approx(values[-1], rel=1e-3)


def test_finding_14_an_optimizer_built_for_another_network_or_loss_is_refused():
    net, params, x, y = _problem(n=16, sizes=(4, 5, 3), act="relu")
    other = fnn.MLP((4, 5, 3), "tanh")
    regression = fnn.MLP((4, 5, 3), "tanh")
    yr = jax.random.normal(jax.random.PRNGKey(3), (16, 3), jnp.float64)
    kw = dict(epochs=1, batch_size=8, key=0, quiet=True)
    with pytest.raises(ValueError, match="kfac optimizer was built for the network"):
        fnn.fit(net, params, second_order.kfac(other, LOSS), (x, y), loss=LOSS, **kw)
    with pytest.raises(ValueError, match="hessian_free optimizer was built for the loss 'softmax_cross_entropy' but "
                                         "is used with 'mse'"):
        fnn.fit(regression, regression.init(jax.random.PRNGKey(0), jnp.float64),
                second_order.hessian_free(regression, LOSS), (x, yr), loss="mse", **kw)
    with pytest.raises(ValueError, match="kfac optimizer was built with l2=0.0 but training uses l2=0.1"):
        fnn.fit(net, params, second_order.kfac(net, LOSS), (x, y), loss=LOSS, l2=0.1, **kw)
    with pytest.raises(ValueError, match="network"):
        fnn.train_step(net, second_order.kfac(other, LOSS), params, None, x, y, LOSS)
    for factory in (second_order.kfac, second_order.hessian_free):
        with pytest.raises(ValueError, match="mae has none"):
            factory(regression, "mae")


def test_finding_15_one_non_finite_batch_does_not_stall_hessian_free():
    net, params, x, y = _problem(n=16, sizes=(4, 5, 3))
    opt = second_order.hessian_free(net, LOSS, cg_iters=5)
    step = jax.jit(lambda p, s, xb: fnn.train_step(net, opt, p, s, xb, y, LOSS))
    state = opt.init(params)
    bad = x.at[0, 0].set(jnp.nan)
    r = step(params, state, bad)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(r.params), jax.tree.leaves(params)))
    assert all(np.all(np.isfinite(t)) for t in jax.tree.leaves(r.opt_state.previous))
    moved = step(r.params, r.opt_state, x)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(moved.params), jax.tree.leaves(params))) > 1e-4
    kfac = second_order.kfac(net, LOSS, learning_rate=0.1)
    kstep = jax.jit(lambda p, s, xb: fnn.train_step(net, kfac, p, s, xb, y, LOSS))
    k = kstep(params, kfac.init(params), x)
    k = kstep(k.params, k.opt_state, bad)
    assert all(np.all(np.isfinite(t)) for t in jax.tree.leaves((k.opt_state.A, k.opt_state.G)))


# ---------------------------------------------------------------------------------------------
# Crashes and unclear errors.


def test_finding_16_the_whole_backprop_result_or_another_optimizers_state_gets_a_clear_error():
    net, params, x, y = _problem()
    result = fnn.backprop_trace(net, params, x, y, LOSS)
    with pytest.raises(TypeError, match="backprop_trace's whole result.*last element"):
        pe.grad_norms(net, params, result)
    adam = fnn.optim.adam(1e-3)
    with pytest.raises(ValueError, match="opt_state does not match the state of this optimizer \\(kfac\\)"):
        fnn.fit(net, params, second_order.kfac(net, LOSS), (x, y), loss=LOSS, epochs=1, batch_size=4, key=0,
                opt_state=adam.init(params), quiet=True)


@pytest.mark.slow  # a training run per entry point
def test_finding_17_an_int_seed_is_a_key_wherever_fit_takes_one():
    net, params, x, y = _problem()
    by_seed = cv.ggn_diag_mc(net, params, x, y, LOSS, key=3)
    by_key = cv.ggn_diag_mc(net, params, x, y, LOSS, key=jax.random.PRNGKey(3))
    for a, b in zip(jax.tree.leaves(by_seed), jax.tree.leaves(by_key)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fnn.noise.normal(3, (5,), jnp.float32),
                                  jax.random.normal(jax.random.PRNGKey(3), (5,), jnp.float32))
    k = cv.kronecker_factors(net, params, x, y, LOSS, key=3)
    assert k[0].G.shape == (5, 5)
    with pytest.raises(TypeError, match="key must be a PRNG key .* or an int seed; got str"):
        cv.ggn_diag_mc(net, params, x, y, LOSS, key="3")


def test_finding_18_a_malformed_direction_is_called_v_and_dtype_messages_differ():
    net, params, x, y = _problem()
    with pytest.raises(ValueError, match=r"v\[1\]\['W'\] must have shape \(3, 5\)"):
        cv.hvp(net, params, x, y, LOSS, [params[0], {"W": jnp.zeros((5, 3)), "b": jnp.zeros(3)}])
    ints = jax.tree.map(lambda t: t.astype(jnp.int32), params)
    with pytest.raises(TypeError) as error:
        net.apply(ints, x)
    message = str(error.value)
    assert "must be floating" in message and "int32, expected int32" not in message


def test_finding_19_a_zero_start_is_refused():
    net, params, x, y = _problem()
    with pytest.raises(ValueError, match="start must be a finite direction of nonzero length"):
        cv.sharpness(net, params, x, y, LOSS, start=jax.tree.map(jnp.zeros_like, params))


def test_finding_20_numpy_integers_are_ints():
    net, params, x, y = _problem(n=64, sizes=(4, 3))
    settings = privacy.Privacy(clip=np.float32(1.0), lot_size=np.int64(16), noise_multiplier=np.float64(1.0),
                               delta=1e-3, chunk=np.int32(8))
    p = privacy.plan(settings, 64, 1)
    assert (p.q, p.steps, p.chunk) == (0.25, 4, 8)


# ---------------------------------------------------------------------------------------------
# Consistency.


def test_finding_25_the_per_example_quantities_read_l2_from_the_trace():
    net, params, x, y = _problem()
    _, grads, _, trace = fnn.backprop_trace(net, params, x, y, LOSS, 0.3)
    assert trace.l2 == 0.3
    mean = pe.weighted_sum(net, params, trace, jnp.full(12, 1 / 12))
    for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(grads)):  # βW included without being passed
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(pe.grad_norms(net, params, trace), pe.grad_norms(net, params, trace, 0.3))
    with pytest.raises(ValueError, match="l2=0.0 but the trace was taken with l2=0.3"):
        pe.grad_norms(net, params, trace, 0.0)


def test_finding_26_variance_and_sum_grad_squared_are_n_squared_times_backpacks():
    """BackPACK's individual gradients under its default mean reduction are ``g_x/N``; its
    ``SumGradSquared`` is ``Σ (g_x/N)²`` and its ``Variance`` ``(1/N) Σ (g_x/N)² − (mean g_x/N)²``
    (computed here from ``vmap(jax.grad)``): fnn's are ``N²`` times those, as their docstrings say."""
    net, params, x, y = _problem()
    n = x.shape[0]
    per = jax.vmap(jax.grad(lambda p, xi, yi: fnn.objective(net, p, xi[None], yi[None], LOSS)), in_axes=(None, 0, 0))
    backpack = jax.tree.map(lambda g: np.asarray(g) / n, per(params, x, y))
    sgs = jax.tree.map(lambda g: np.sum(g * g, axis=0), backpack)
    var = jax.tree.map(lambda g: np.mean(g * g, axis=0) - np.mean(g, axis=0) ** 2, backpack)
    _, _, _, trace = fnn.backprop_trace(net, params, x, y, LOSS)
    for ours, theirs in ((pe.sum_grad_squared(net, params, trace), sgs), (pe.variance(net, params, trace), var)):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_allclose(a, n * n * b, rtol=1e-9, atol=1e-15)
    for f in (pe.sum_grad_squared, pe.variance):
        assert "``N²`` times BackPACK's" in inspect.getdoc(f)


def test_finding_27_the_ggn_diagonals_take_their_arguments_in_one_order():
    exact = list(inspect.signature(cv.ggn_diag).parameters)
    sampled = inspect.signature(cv.ggn_diag_mc).parameters
    assert list(sampled)[:6] == exact[:6] == ["net", "params", "x", "y", "loss", "l2"]
    assert sampled["key"].kind is inspect.Parameter.KEYWORD_ONLY
    net, params, x, y = _problem()
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'key'"):  # the former order
        cv.ggn_diag_mc(net, params, x, y, LOSS, jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------------------------
# A second look from outside, after the fixes above: the cases it found.


@pytest.mark.slow  # several private training runs
def test_a_resume_after_a_failed_epoch_draws_fresh_noise():
    """After a NaN stop the run keeps the last good epoch, but the failed epoch's noisy steps were
    computed (and counted); the resumed epoch must not draw the same noise again, or the two releases'
    difference would be noise-free. With σ = 1000 the updates are almost all noise: the resumed epoch's
    first steps and the failed epoch's are uncorrelated (they were identical up to the learning rate)."""
    net, params, x, y = _problem(n=40, sizes=(4, 3), dtype=jnp.float32)
    settings = privacy.Privacy(clip=1.0, lot_size=10, noise_multiplier=1000.0, delta=1e-3)
    blow_up = fnn.optim.sgd(lambda t: jnp.where(t >= 6, 1e38, 1e-3))  # epoch 2's third step overflows
    r = _private_fit(net, params, (x, y), settings, 7, 3, opt=blow_up)
    assert r.epoch == 1 and r.privacy_spent.steps == 8 and r.before_failure is not None
    two_steps = fnn.optim.sgd(lambda t: jnp.where(t >= 2, 0.0, 1e-3))
    resumed = _private_fit(net, r.params, (x, y), settings._replace(spent=r.privacy_spent), r.key, 1,
                           start_epoch=r.epoch, opt=two_steps)
    failed = ravel_pytree(r.before_failure[0])[0] - ravel_pytree(r.params)[0]
    again = ravel_pytree(resumed.params)[0] - ravel_pytree(r.params)[0]
    assert abs(float(np.corrcoef(failed, again)[0, 1])) < 0.9


@pytest.mark.slow  # a private training run
def test_poisson_lots_at_a_tiny_rate_stay_inside_the_data():
    """Gaps of about 1/q overflowed int32 and wrapped to negative indices, which counted as members."""
    for seed in range(10):
        order, count = privacy.poisson_lot(jax.random.PRNGKey(seed), 10, 1e-9)
        assert int(count) == 0 and np.all(np.asarray(order) == 10)


def test_epsilon_refuses_nan_rdp_and_orders_at_or_below_one():
    with pytest.raises(ValueError, match="1 NaN"):
        privacy.epsilon([0.009, 0.03, math.nan], 1e-5, [1.5, 2, 8])
    for orders in ([1.5, 2, 8, 1], [1.5, 2, 8, 0.5], [2, math.inf]):
        with pytest.raises(ValueError, match="orders must be finite numbers > 1"):
            privacy.epsilon([0.1] * len(orders), 1e-5, orders)
    with pytest.raises(TypeError, match="orders must be a sequence"):
        privacy.rdp(0.1, 1.0, 1, 5)
    nan = privacy.Spent(5, (math.nan,) * len(privacy.ORDERS))
    with pytest.raises(ValueError, match="NaN"):
        privacy.plan(privacy.Privacy(1.0, 10, 1.0, delta=1e-3, spent=nan), 40, 2, start_epoch=1)
    fractional = privacy.account(0.25, 1.0, 4)._replace(steps=5.5)
    with pytest.raises(TypeError, match="Privacy.spent.steps must be an int"):
        privacy.plan(privacy.Privacy(1.0, 10, 1.0, delta=1e-3, spent=fractional), 40, 2, start_epoch=1)


def test_float64_noise_without_x64_is_jax_random_normals_float32():
    with jax.enable_x64(False), pytest.warns(UserWarning, match="float64 is not available"):
        ours, theirs = (f(jax.random.PRNGKey(0), (5,), jnp.float64) for f in (fnn.noise.normal, jax.random.normal))
    assert np.all(np.isfinite(ours))
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_a_trace_taken_at_other_params_of_the_same_shapes_is_refused():
    net, params, x, y = _problem()
    _, _, _, trace = fnn.backprop_trace(net, params, x, y, LOSS, 0.1)
    other = net.init(jax.random.PRNGKey(9), jnp.float64)
    for f in (pe.batch_grad, pe.grad_norms, pe.sum_grad_squared):
        with pytest.raises(ValueError, match="trace was taken at other params"):
            f(net, other, trace)
    shifted = [{**layer, "b": layer["b"] + 1.0} for layer in params]  # the bias alone differs
    with pytest.raises(ValueError, match="layer 1's pre-activations"):
        pe.batch_grad(net, shifted, trace)


@pytest.mark.slow
def test_numpy_ints_and_keys_and_sample_counts():
    net, params, x, y = _problem()
    by_numpy = cv.ggn_diag_mc(net, params, x, y, LOSS, key=np.asarray(jax.random.PRNGKey(3)), samples=np.int64(2))
    by_jax = cv.ggn_diag_mc(net, params, x, y, LOSS, key=jax.random.PRNGKey(3), samples=2)
    for a, b in zip(jax.tree.leaves(by_numpy), jax.tree.leaves(by_jax)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"samples \(columns drawn per example\) must be > 0; got 0"):
        cv.kronecker_factors(net, params, x, y, LOSS, samples=0)  # checked with key=None too
