"""Per-example quantities from the δ's against vmap(jax.grad) of each sample's own cost, and by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backprop import PAIRS, TOL, configurations, quick_jit

import fnn
from fnn import per_example as pe
from fnn.train import make_epoch, shuffled_batches

from helpers import gradient_errors, rel_err


def per_sample_grads(net, params, x, y, loss, l2, state=None):
    """The oracle: ``vmap`` over samples of ``jax.grad`` of ``C_x + ½β‖W‖²`` (batch of one)."""

    def one(p, xi, yi):
        if state is None:
            return fnn.objective(net, p, xi[None], yi[None], loss, l2)
        return fnn.objective(net, p, xi[None], yi[None], loss, l2, state, False)[0]

    return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)


def oracle(g, weights, max_norm):
    """Every quantity from the materialized per-sample gradients ``g`` (leaves ``(N, ...)``), and for
    those computed as sums with cancellation, the scale their rounding error is proportional to."""
    n = jax.tree.leaves(g)[0].shape[0]
    sq = jax.tree.map(lambda t: jnp.sum(t.reshape(n, -1) ** 2, axis=1), g)
    norms = jnp.sqrt(sum(jax.tree.leaves(sq)))
    clip = jnp.minimum(1, max_norm / norms)
    flat = jnp.concatenate([t.reshape(n, -1) for t in jax.tree.leaves(g)], axis=1)
    mean = flat.mean(0)
    trace_cov = jnp.sum((flat - mean) ** 2) / (n - 1) if n > 1 else jnp.nan
    grad_sq = jnp.sum(mean ** 2) - trace_cov / n
    second = jax.tree.map(lambda t: jnp.sum(t * t, axis=0), g)
    return {
        "batch_grad": g,
        "batch_l2": sq,
        "grad_norms": norms,
        "sum_grad_squared": second,
        "variance": jax.tree.map(lambda t: jnp.var(t, axis=0), g),
        "weighted_sum": jax.tree.map(lambda t: jnp.tensordot(weights, t, 1), g),
        "clipped_sum": jax.tree.map(lambda t: jnp.tensordot(clip, t, 1), g),
        "noise_scale": (trace_cov, grad_sq),
    }, {
        # (1/N)Σg² − ḡ⊙ḡ: rounding of the second moment it subtracts from
        "variance": jax.tree.map(lambda s: s / n, second),
        # Σ_x w_x g_x: rounding of the terms, Σ_x |w_x g_x|, however much they cancel
        "weighted_sum": jax.tree.map(lambda t: jnp.tensordot(jnp.abs(weights), jnp.abs(t), 1), g),
        "clipped_sum": jax.tree.map(lambda t: jnp.tensordot(clip, jnp.abs(t), 1), g),
        "noise_scale": (jnp.sum(flat ** 2) / max(n - 1, 1), jnp.sum(mean ** 2) + trace_cov / n),
    }


def by_delta(net, params, x, y, loss, l2, weights, max_norm, state=None):
    """Every quantity from one trace of the hand-written backprop."""
    _, _, _, trace = fnn.backprop_trace(net, params, x, y, loss, l2, state, False)
    n = x.shape[0]
    ns = pe.noise_scale(net, params, trace, l2) if n > 1 else pe.NoiseScale(jnp.nan, jnp.nan, jnp.nan)
    return {
        "batch_grad": pe.batch_grad(net, params, trace, l2),
        "batch_l2": pe.batch_l2(net, params, trace, l2),
        "grad_norms": pe.grad_norms(net, params, trace, l2),
        "sum_grad_squared": pe.sum_grad_squared(net, params, trace, l2),
        "variance": pe.variance(net, params, trace, l2),
        "weighted_sum": pe.weighted_sum(net, params, trace, weights, l2),
        "clipped_sum": pe.clipped_sum(net, params, trace, max_norm, l2)[0],
        "noise_scale": (ns.trace_cov, ns.grad_sq),
    }


def _up(t):
    return t.astype(jnp.float64) if jnp.issubdtype(t.dtype, jnp.floating) else t


@quick_jit
def _compute(params, x, y, l2, weights, max_norm, static):
    net, loss = static
    refs = [oracle(per_sample_grads(net, params, x, y, loss, l2), weights, max_norm)]
    if x.dtype == jnp.float32:  # float32 may match autodiff in float32 or in float64 (see test_backprop)
        up = jax.tree.map(_up, (params, x, y, weights))
        refs.append(oracle(per_sample_grads(net, up[0], up[1], up[2], loss, l2), up[3], max_norm))
    return by_delta(net, params, x, y, loss, l2, weights, max_norm), refs


class _Static:
    """Hashable holder so that jit treats the network and the loss as static."""

    def __init__(self, net, loss):
        self.pair = (net, loss)

    def __iter__(self):
        return iter(self.pair)

    def __hash__(self):
        return hash(self.pair)

    def __eq__(self, other):
        return self.pair == other.pair


jax.tree_util.register_static(_Static)


def assert_quantities_match(got, refs, dtype, n):
    """Each quantity against the oracle(s), leaf by leaf. Plain quantities are judged by
    ``helpers.gradient_errors`` (relative to the leaf, or in ulps of the largest entry); sums in which
    terms can cancel are judged on the scale their rounding error is proportional to (see
    :func:`oracle`): ``max |got − ref| ≤ tol · max(scale)``. A float32 leaf may match the float32 or
    the float64 oracle (see tests/test_backprop.py)."""
    for name in got:
        if name == "noise_scale" and n < 2:
            continue
        if name in refs[0][1]:
            worst = []
            for ref, scales in refs:
                leaves = zip(jax.tree.leaves(got[name]), jax.tree.leaves(ref[name]), jax.tree.leaves(scales[name]))
                worst.append([float(np.max(np.abs(np.asarray(v, np.float64) - np.asarray(r, np.float64))))
                              / (TOL[dtype] * float(np.max(np.asarray(sc, np.float64))) or 1.0)
                              for v, r, sc in leaves])
            for i, errors in enumerate(zip(*worst)):
                assert min(errors) <= 1, f"{name} leaf {i}: error {min(errors):.3g} × the tolerance on its scale"
            continue
        per_ref = [gradient_errors(got[name], ref[name], TOL[dtype]) for ref, _ in refs]
        for leaves in zip(*per_ref):
            err = min(e for _, e in leaves)
            assert err <= 1, f"{name}{leaves[0][0]}: error {err:.3g} × the tolerance"


# One example for each of the 33 pairs (15 drawn at random before, when most pairs went undrawn); the
# first example of each case takes the rotated lists' first entries (test_backprop.rotated).
@pytest.mark.parametrize("loss_name, output", PAIRS)
@settings(max_examples=1, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_every_quantity_equals_vmap_of_jax_grad(loss_name, output, data, seed):
    cfg = data.draw(configurations((loss_name, output), widths=(3, 8, 1, 17), batch=(7, 16, 2, 1), depths=(2, 3, 1)))
    net, params, x, y, loss, l2, dtype = cfg
    n = x.shape[0]
    rng = np.random.default_rng([PAIRS.index((loss_name, output)), seed])
    weights = jnp.asarray(rng.uniform(-1, 2, n), dtype)
    got, refs = _compute(params, x, y, l2, weights, dtype(rng.uniform(0.05, 2.0)), _Static(net, loss))
    assert_quantities_match(got, refs, dtype, n)
    # leaves have params' structure with a leading N axis, in the params' dtype
    g = got["batch_grad"]
    assert jax.tree.structure(g) == jax.tree.structure(params)
    leaves = zip(jax.tree.leaves(g), jax.tree.leaves(params))
    assert all(a.shape == (n, *p.shape) and a.dtype == dtype for a, p in leaves)


def test_every_quantity_on_one_fixed_batch():
    """The property test's check on one fixed network and batch, with nothing left to a draw (a fast-tier
    test): two layers, a batch of 6, L2 on, and a clip norm between the smallest and the largest
    per-example norm, so that clipping shrinks some gradients and leaves others. Catches the mutants
    pe-sum-grad-squared-without-n, pe-variance-unbiased, pe-clip-scales-up, pe-trace-cov-biased and
    pe-grad-sq-biased, which the property test's one example per pair can miss (a batch of 1 or 2)."""
    rng = np.random.default_rng(3)
    net = fnn.MLP((3, 5, 2), "tanh", "identity")
    params = net.init(jax.random.PRNGKey(3), jnp.float64)
    x, y = jnp.asarray(rng.normal(size=(6, 3))), jnp.asarray(rng.normal(size=(6, 2)))
    weights = jnp.asarray(rng.uniform(-1, 2, 6))
    loss, l2 = fnn.losses.half_mse, 0.1
    norms = np.asarray(oracle(per_sample_grads(net, params, x, y, loss, l2), weights, 1.0)[0]["grad_norms"])
    clip = float(np.median(norms))
    assert norms.min() < clip < norms.max()
    got, refs = _compute(params, x, y, l2, weights, clip, _Static(net, loss))
    assert_quantities_match(got, refs, jnp.float64, 6)


def test_a_linear_layer_by_hand():
    """One layer, ``C_x = ½‖Wx + b − y‖²``: ``g_x^W = r_x x_xᵀ + βW``, ``g_x^b = r_x`` with ``r_x = Wx+b−y``."""
    W = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]])
    b = np.array([0.5, -1.0])
    x = np.array([[1.0, 2.0, -1.0], [0.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
    y = np.array([[0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]])
    beta = 0.1
    r = x @ W.T + b - y
    np.testing.assert_allclose(r, [[-3.0, -3.0], [-2.0, 2.0], [4.0, 0.0]])  # worked out by hand
    g_W = np.stack([np.outer(r[i], x[i]) + beta * W for i in range(3)])
    norms2 = [np.sum(g_W[i] ** 2) + np.sum(r[i] ** 2) for i in range(3)]
    net = fnn.MLP((3, 2), output="identity")
    params = [{"W": jnp.asarray(W), "b": jnp.asarray(b)}]
    _, _, _, trace = fnn.backprop_trace(net, params, jnp.asarray(x), jnp.asarray(y), fnn.losses.half_mse, beta)
    g = pe.batch_grad(net, params, trace, beta)
    np.testing.assert_allclose(g[0]["W"], g_W, rtol=1e-14)
    np.testing.assert_allclose(g[0]["b"], r, rtol=1e-14)
    np.testing.assert_allclose(pe.grad_norms(net, params, trace, beta) ** 2, norms2, rtol=1e-13)
    # clipped to norm 3: each sample's gradient scaled by min(1, 3/‖g_x‖)
    total, norms = pe.clipped_sum(net, params, trace, 3.0, beta)
    scale = np.minimum(1, 3 / np.sqrt(norms2))
    np.testing.assert_allclose(total[0]["W"], np.tensordot(scale, g_W, 1), rtol=1e-13)
    np.testing.assert_allclose(total[0]["b"], scale @ r, rtol=1e-13)
    # the mean of the per-example gradients is backprop's gradient
    mean = pe.weighted_sum(net, params, trace, jnp.full(3, 1 / 3), beta)
    np.testing.assert_allclose(mean[0]["W"], fnn.backprop(net, params, x, y, fnn.losses.half_mse, beta)[1][0]["W"],
                               rtol=1e-14)


def test_batch_norm_in_eval_mode_and_refused_in_train_mode():
    net = fnn.MLP((4, 6, 5, 3), ("tanh", "relu"), batch_norm=(True, False))
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (11, 4), jnp.float64)
    y = jnp.arange(11) % 3
    loss = fnn.losses.softmax_cross_entropy
    _, state = net.apply_train(params, x * 2 + 1, net.init_state(jnp.float64))  # non-trivial statistics
    w = jnp.linspace(-1.0, 1.0, 11)
    got, ref = jax.jit(lambda params, state: (by_delta(net, params, x, y, loss, 0.3, w, 0.5, state),
                                              oracle(per_sample_grads(net, params, x, y, loss, 0.3, state), w, 0.5))
                       )(params, state)
    assert_quantities_match(got, [ref], np.float64, 11)
    assert set(got["batch_grad"][0]) == {"W", "gamma", "beta"}
    _, _, _, trace = fnn.backprop_trace(net, params, x, y, loss, 0.0, state, True)
    with pytest.raises(ValueError, match="train mode.*eval mode"):
        pe.grad_norms(net, params, trace)


def test_mixed_precision_is_computed_from_the_rounded_pass():
    """bf16 matmuls: per-example norms match vmap(jax.grad) of the same rounded forward within the
    rounding (4·L·2⁻⁸, as for the mean gradient), and weights 1/N give backprop's gradient."""
    net = fnn.MLP((12, 16, 16, 4), "tanh", compute_dtype="bfloat16")
    params = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (9, 12), jnp.float32)
    y = jnp.arange(9) % 4
    loss = fnn.losses.softmax_cross_entropy

    @jax.jit
    def both(params):
        _, grads, _, trace = fnn.backprop_trace(net, params, x, y, loss)
        ref = oracle(per_sample_grads(net, params, x, y, loss, 0.0), jnp.ones(9), 1.0)[0]
        mean = pe.weighted_sum(net, params, trace, jnp.full(9, 1 / 9, jnp.float32))
        return pe.grad_norms(net, params, trace), ref["grad_norms"], mean, grads

    norms, ref_norms, mean, grads = both(params)
    assert rel_err(norms, ref_norms) <= 4 * 3 * 2**-8
    for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(grads)):
        assert rel_err(a, b) <= 2**-7  # (w ⊙ δ) is rounded to bfloat16, not δ: one rounding apart


def test_mixed_precision_variance_and_noise_scale_subtract_a_full_precision_mean():
    """Near-identical samples: tr(Σ) ≈ 3e-4 against ‖ḡ‖² ≈ 10, so the variance is a small difference of
    large terms. The per-sample rows carry their own bfloat16 rounding (they differ from vmap(jax.grad)
    of the same rounded forward by ~2⁻⁸ each, which moves tr(Σ) by about 20 % here); a mean rounded
    to bfloat16 as well would put tr(Σ) and the total variance 40–50× off (measured when this test
    was written)."""
    net = fnn.MLP((12, 32, 4), "tanh", compute_dtype="bfloat16")
    params = net.init(jax.random.PRNGKey(0))
    x = 1 + 0.005 * jax.random.normal(jax.random.PRNGKey(1), (64, 12), jnp.float32)
    y = jnp.zeros(64, jnp.int32)
    loss = fnn.losses.softmax_cross_entropy

    @jax.jit
    def both(params):
        _, _, _, trace = fnn.backprop_trace(net, params, x, y, loss)
        ref = oracle(per_sample_grads(net, params, x, y, loss, 0.0), jnp.ones(64), 1.0)[0]
        return pe.variance(net, params, trace), pe.noise_scale(net, params, trace), ref

    variance, ns, ref = both(params)
    trace_cov, grad_sq = (float(v) for v in ref["noise_scale"])
    assert grad_sq > 1e4 * trace_cov > 0  # the regime the test is about
    assert float(ns.trace_cov) == pytest.approx(trace_cov, rel=0.3)
    total = sum(float(jnp.sum(v)) for v in jax.tree.leaves(variance))
    assert total == pytest.approx(sum(float(jnp.sum(r)) for r in jax.tree.leaves(ref["variance"])), rel=0.3)


def test_an_out_of_range_label_under_jit_gives_nan_for_that_sample_only():
    net = fnn.MLP((3, 4, 2), "relu")
    params = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3), jnp.float32)

    @jax.jit
    def norms(y):
        _, _, _, trace = fnn.backprop_trace(net, params, x, y, fnn.losses.softmax_cross_entropy)
        return pe.grad_norms(net, params, trace)

    out = np.asarray(norms(jnp.array([0, 1, 5, 1])))
    assert np.isnan(out[2]) and np.all(np.isfinite(out[[0, 1, 3]]))


def test_bad_input():
    net = fnn.MLP((3, 4, 2), "relu")
    params = net.init(jax.random.PRNGKey(0))
    x = jnp.ones((1, 3), jnp.float32)
    _, _, _, trace = fnn.backprop_trace(net, params, x, jnp.array([0]), fnn.losses.softmax_cross_entropy)
    with pytest.raises(ValueError, match=r"shape \(N,\) = \(1,\)"):
        pe.weighted_sum(net, params, trace, jnp.ones(3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        pe.noise_scale(net, params, trace)


def test_noise_scale_without_replacement_is_unbiased_over_every_batch():
    """A training set of M = 7 examples and every one of its C(7, 3) = 35 batches of 3, drawn without
    replacement: the mean of ``grad_sq`` over the batches is ``‖G‖²`` exactly, ``G`` the set's mean
    gradient with βW (``vmap(jax.grad)``, float64), and the mean of ``trace_cov`` is
    ``(1/M) Σ_i ‖g_i − G‖²``. The with-replacement formulas (``population=None``) on the same batches
    miss ``‖G‖²`` by ``S²/M`` on average, ``S² = Σ_i ‖g_i − G‖²/(M−1)``."""
    import itertools

    rng = np.random.default_rng(5)
    net = fnn.MLP((3, 4, 2), "tanh", "identity")
    params = net.init(jax.random.PRNGKey(5), jnp.float64)
    x, y = jnp.asarray(rng.normal(size=(7, 3))), jnp.asarray(rng.normal(size=(7, 2)))
    loss, l2, m = fnn.losses.half_mse, 0.05, 7
    g = per_sample_grads(net, params, x, y, loss, l2)
    flat = np.concatenate([np.asarray(t).reshape(m, -1) for t in jax.tree.leaves(g)], axis=1)
    G = flat.mean(0)
    spread = np.sum((flat - G) ** 2)

    @jax.jit
    def both(xb, yb):
        _, _, _, trace = fnn.backprop_trace(net, params, xb, yb, loss, l2)
        return pe.noise_scale(net, params, trace, l2, population=m), pe.noise_scale(net, params, trace, l2)

    batches = [np.array(b) for b in itertools.combinations(range(m), 3)]
    assert len(batches) == 35
    wor, wr = zip(*(both(x[b], y[b]) for b in batches))
    assert np.mean([float(e.grad_sq) for e in wor]) == pytest.approx(G @ G, rel=1e-10)
    assert np.mean([float(e.trace_cov) for e in wor]) == pytest.approx(spread / m, rel=1e-10)
    assert np.mean([float(e.grad_sq) for e in wr]) == pytest.approx(G @ G - spread / (m - 1) / m, rel=1e-10)
    # the whole set as one batch: no sampling noise left, ‖G‖² is the mean gradient's squared norm
    whole = both(x, y)[0]
    assert float(whole.grad_sq) == pytest.approx(G @ G, rel=1e-12)
    _, _, _, trace = fnn.backprop_trace(net, params, x[:3], y[:3], loss, l2)
    for bad in (2, 3.0, True, -1):
        with pytest.raises(ValueError, match="population is the number of examples"):
            pe.noise_scale(net, params, trace, l2, population=bad)


def test_training_records_the_statistics_of_each_step():
    """The epoch's per-step norms and noise-scale parts equal the oracle's on the same batches and
    params; the last, smaller batch is padded with NaN."""
    net = fnn.MLP((6, 8, 3), "tanh")
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (23, 6), jnp.float64)
    y = jnp.arange(23) % 3
    loss = fnn.losses.softmax_cross_entropy
    opt = fnn.optim.sgd(0.5)
    key = jax.random.PRNGKey(2)
    epoch = jax.jit(make_epoch(net, loss, opt, num_samples=23, batch_size=5, l2=0.01,
                               per_example=("noise_scale", "norms")))
    stats = jax.device_get(epoch(params, opt.init(params), None, key, x, y)[-1])
    full, rest = shuffled_batches(jax.random.split(key)[1], 23, 5)
    p = params
    for step, idx in enumerate([*np.asarray(full), np.asarray(rest)]):
        ref = oracle(per_sample_grads(net, p, x[idx], y[idx], loss, 0.01), jnp.ones(len(idx)), 1.0)[0]
        np.testing.assert_allclose(stats.per_example["norms"][step][: len(idx)], ref["grad_norms"], rtol=1e-10)
        assert np.all(np.isnan(stats.per_example["norms"][step][len(idx):]))
        # fit's batches are drawn without replacement from the 23 samples (population=23): the sample
        # trace s² becomes (1 − 1/23) s², and ‖ḡ‖² − s²/n becomes ‖ḡ‖² − (1 − n/23) s²/n
        s2, grad_sq = (float(v) for v in ref["noise_scale"])
        assert stats.per_example["trace_cov"][step] == pytest.approx((1 - 1 / 23) * s2, rel=1e-10)
        assert stats.per_example["grad_sq"][step] == pytest.approx(grad_sq + s2 / 23, rel=1e-9)
        p = fnn.optim.step(opt, fnn.backprop(net, p, x[idx], y[idx], loss, 0.01)[1], opt.init(p), p)[0]
    # the history: the ratio of the averages, and quantiles over every sample of the epoch
    summary = pe.epoch_statistics({k: np.asarray(v) for k, v in stats.per_example.items()})
    cov, sq = np.mean(stats.per_example["trace_cov"]), np.mean(stats.per_example["grad_sq"])
    assert summary["noise_scale"] == pytest.approx(cov / sq, rel=1e-12)
    norms = np.asarray(stats.per_example["norms"]).ravel()
    assert summary["norm_median"] == pytest.approx(np.median(norms[np.isfinite(norms)]), rel=1e-12)
    assert summary["norm_max"] == pytest.approx(np.nanmax(norms), rel=1e-12)


def test_fit_records_them_only_when_asked_and_refuses_what_it_cannot_compute():
    net = fnn.MLP((6, 8, 3), "tanh")
    params = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (40, 6), jnp.float32)
    y = jnp.arange(40) % 3
    kw = dict(loss=fnn.losses.softmax_cross_entropy, epochs=2, batch_size=8, key=jax.random.PRNGKey(2), quiet=True)
    opt = fnn.optim.sgd(0.1)
    plain = fnn.fit(net, params, opt, (x, y), **kw)
    rich = fnn.fit(net, params, opt, (x, y), per_example=("noise_scale", "norms"), **kw)
    assert "noise_scale" not in plain.history[0]
    assert {"noise_scale", "grad_trace_cov", "grad_sq", "norm_p10", "norm_median", "norm_p90", "norm_max"} \
        <= set(rich.history[0])
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(rich.params)):  # same training
        np.testing.assert_array_equal(a, b)
    # the default epoch computes none of it: with SGD and no global norm it takes no square root at all
    args = (params, opt.init(params), None, jax.random.PRNGKey(0), x, y)
    for per_example, roots in (((), 0), (("norms",), 1)):  # 40 = 5 × 8: only the scanned step
        epoch = make_epoch(net, fnn.losses.softmax_cross_entropy, opt, num_samples=40, batch_size=8, guard=False,
                           grad_norm=False, per_example=per_example)
        assert str(jax.make_jaxpr(epoch)(*args)).count(" sqrt ") == roots
    with pytest.raises(ValueError, match="unknown per-example statistics"):
        fnn.fit(net, params, opt, (x, y), per_example=("variance",), **kw)
    with pytest.raises(ValueError, match="grad_source='manual'"):
        fnn.fit(net, params, opt, (x, y), per_example=("norms",), grad_source="autodiff", **kw)
    bn = fnn.MLP((6, 8, 3), "tanh", batch_norm=True)
    with pytest.raises(ValueError, match="batch normalization"):
        fnn.fit(bn, bn.init(jax.random.PRNGKey(0)), opt, (x, y), per_example=("norms",), **kw)


def test_a_failure_at_the_first_step_is_reported_with_statistics_on():
    """A run that fails at its first step leaves no finite per-example values: the report names the
    failure and the statistics are NaN (no crash)."""
    net = fnn.MLP((6, 8, 3), "relu")
    params = jax.tree.map(lambda t: t * 1e30, net.init(jax.random.PRNGKey(0)))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 6), jnp.float32)
    r = fnn.fit(net, params, fnn.optim.sgd(0.1), (x, jnp.arange(16) % 3), loss=fnn.losses.softmax_cross_entropy,
                epochs=1, batch_size=8, key=jax.random.PRNGKey(2), per_example=("noise_scale", "norms"), quiet=True)
    assert r.nan_report["step"] == 0 and r.stopped
    assert np.isnan(r.history[0]["norm_median"]) and np.isnan(r.history[0]["noise_scale"])
    # a zero mean gradient gives an infinite or undefined noise scale, never an exception
    zero = pe.epoch_statistics({"trace_cov": np.array([1.0, 1.0]), "grad_sq": np.array([0.0, 0.0])})
    assert zero["noise_scale"] == np.inf
    with pytest.raises(TypeError, match="sequence of names"):
        fnn.fit(net, params, fnn.optim.sgd(0.1), (x, jnp.arange(16) % 3), loss=fnn.losses.softmax_cross_entropy,
                epochs=1, batch_size=8, key=jax.random.PRNGKey(2), per_example="norms")
