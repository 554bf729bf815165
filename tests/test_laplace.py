"""fnn.laplace against closed forms (Bayesian linear regression), dense matrices from jax.jacfwd/jax.hessian,
numpy.linalg.slogdet and Monte-Carlo; float64 throughout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from test_curvature import _explicit_ggn
from test_second_order import _problem as _random_problem

import fnn
from fnn import laplace
from fnn.losses import LOSSES

from helpers import rel_err

# every loss the Laplace approximation accepts (all but mae), on an output it reads
PAIRS = [("binary_cross_entropy", "sigmoid"), ("binary_cross_entropy", "softmax"),
         ("binary_cross_entropy_with_logits", "identity"), ("categorical_cross_entropy", "softmax"),
         ("categorical_cross_entropy", "sigmoid"), ("half_mse", "identity"), ("mse", "tanh"),
         ("softmax_cross_entropy", "identity")]


def test_every_accepted_loss_is_covered():
    assert sorted({name for name, _ in PAIRS}) == sorted(set(LOSSES) - {"mae"})
    assert all(output in (LOSSES[name].outputs or {output}) for name, output in PAIRS)
    with pytest.raises(ValueError, match="mae has no curvature"):
        laplace.fit_laplace(fnn.MLP((2, 3)), fnn.MLP((2, 3)).init(jax.random.PRNGKey(0)),
                            (np.ones((4, 2)), np.ones((4, 3))), "mae", prior_precision=1.0)


def _problem(loss_name, output, sizes=(3, 4, 2), n=9, seed=0):
    return _random_problem(loss_name, sizes, n, seed, "tanh", output)


def _layer_of(params):
    return np.concatenate([np.full(sum(v.size for v in layer.values()), l) for l, layer in enumerate(params)])


def _nll(net, params, x, y, loss):
    """−log p(D | θ) as the module docstring reads each loss, computed here from the per-sample costs."""
    out = net.apply(params, x)
    k = out.shape[-1]
    const = {"half_mse": 0.5 * k * math.log(2 * math.pi), "mse": 0.5 * k * math.log(math.pi * k)}.get(loss.name, 0.0)
    return float(x.shape[0] * loss(out, y)) + x.shape[0] * const


def _dense_evidence(prec, params, nll, delta_per_param):
    theta = np.asarray(ravel_pytree(params)[0])
    _, logdet = np.linalg.slogdet(prec)
    return (-nll - 0.5 * np.sum(delta_per_param * theta ** 2) + 0.5 * np.sum(np.log(delta_per_param))
            - 0.5 * logdet)


def test_bayesian_linear_regression_is_exact():
    """No hidden layer, identity output, half-MSE: the likelihood is N(y | W x + b, I), the prior N(0, δ⁻¹ I),
    and at the exact posterior mean the Laplace posterior and evidence are the exact ones, for "full",
    "kron" (for one layer with H = I the Kronecker factorization is exact) and "last_layer": the precision
    X̄ᵀX̄ ⊗ I + δI and log p(D) = Σ_k log N(y_k | 0, I + X̄X̄ᵀ/δ), both in closed form here."""
    rng = np.random.default_rng(5)
    n, d, k, delta = 30, 4, 2, 0.7
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, k))
    xb = np.hstack([x, np.ones((n, 1))])
    prec_bar = xb.T @ xb + delta * np.eye(d + 1)
    wbar = np.linalg.solve(prec_bar, xb.T @ y).T  # (k, d+1): the posterior mean
    net = fnn.MLP((d, k), (), "identity")
    params = [{"W": jnp.asarray(wbar[:, :-1]), "b": jnp.asarray(wbar[:, -1])}]
    cov = np.eye(n) + xb @ xb.T / delta
    exact = sum(-0.5 * (y[:, j] @ np.linalg.solve(cov, y[:, j]) + np.linalg.slogdet(2 * np.pi * cov)[1])
                for j in range(k))
    # the precision over ravel_pytree order (W row-major, then b)
    order = [i * (d + 1) + j for i in range(k) for j in range(d)] + [i * (d + 1) + d for i in range(k)]
    dense = np.kron(np.eye(k), prec_bar)[np.ix_(order, order)]
    for structure in ("full", "kron", "last_layer"):
        post = laplace.fit_laplace(net, params, (x, y), "half_mse", structure=structure, prior_precision=delta,
                                   batch_size=7)
        assert abs(float(laplace.log_marginal_likelihood(post)) - exact) <= 1e-10 * abs(exact), structure
        xt = rng.normal(size=(5, d))
        f, var = laplace.glm_predictive(post, xt)
        xtb = np.hstack([xt, np.ones((5, 1))])
        expect = np.einsum("ni,ij,nj->n", xtb, np.linalg.inv(prec_bar), xtb)
        assert rel_err(np.asarray(var), expect[:, None, None] * np.eye(k)) <= 1e-10, structure
        assert rel_err(np.asarray(f), xtb @ wbar.T) <= 1e-12
        if structure == "full":
            assert rel_err(np.asarray(post.curvature["H"]) + delta * np.eye(dense.shape[0]), dense) <= 1e-10


@pytest.mark.parametrize("loss_name, output", PAIRS)
@pytest.mark.parametrize("per_layer", [False, True], ids=["one-delta", "delta-per-layer"])
def test_full_structure_against_the_dense_ggn(loss_name, output, per_layer):
    """"full": N·G from jax.jacfwd/jax.hessian plus diag(δ) (δ per layer, or one), its slogdet in the
    evidence, and the GLM predictive variance J Σ Jᵀ with J = jax.jacfwd of the split point."""
    net, params, x, y, loss = _problem(loss_name, output)
    delta = np.array([0.4, 1.3]) if per_layer else 0.8
    post = laplace.fit_laplace(net, params, (x, y), loss, structure="full", prior_precision=delta, batch_size=4)
    G, _, _ = _explicit_ggn(net, params, x, y, loss, 0.0)
    per = np.broadcast_to(delta, (2,))[_layer_of(params)]
    prec = x.shape[0] * np.asarray(G) + np.diag(per)
    expect = _dense_evidence(prec, params, _nll(net, params, x, y, loss), per)
    assert abs(float(laplace.log_marginal_likelihood(post)) - expect) <= 1e-9 * abs(expect)
    xt = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3)))
    f, cov = laplace.glm_predictive(post, xt)
    at_logits = fnn.losses.output_curvature(loss, net.output).at_logits
    flat, unravel = ravel_pytree(params)

    def split(theta):
        trace = net.forward_trace(unravel(theta), xt)
        return trace.zs[-1] if at_logits else trace.acts[-1]

    J = np.asarray(jax.jacfwd(split)(flat))  # (M, K, P)
    assert rel_err(np.asarray(f), np.asarray(split(flat))) <= 1e-12
    assert rel_err(np.asarray(cov), np.einsum("nkp,pq,nlq->nkl", J, np.linalg.inv(prec), J)) <= 1e-9


def _kron_dense(net, params, x, y, loss, delta):
    """The "kron" precision formed densely from the factors' definitions (A from the activations, G^l the
    Gauss-Newton block of b^l in the explicit GGN), over ravel_pytree order."""
    n = x.shape[0]
    G_full = np.asarray(_explicit_ggn(net, params, x, y, loss, 0.0)[0])
    acts = net.forward_trace(params, x).acts
    index = ravel_pytree(jax.tree.map(lambda p: jnp.zeros(p.shape), params))[1](
        jnp.arange(sum(p.size for p in jax.tree.leaves(params)), dtype=jnp.float64))
    size = G_full.shape[0]
    prec = np.zeros((size, size))
    for l in range(net.num_layers):
        abar = np.hstack([np.asarray(acts[l]), np.ones((n, 1))])
        A = abar.T @ abar / n
        b = np.asarray(index[l]["b"], int)
        G = G_full[np.ix_(b, b)]
        rows, cols = np.asarray(index[l]["W"], int), b
        # W̄ (row-major) position (i, j) -> flat index
        where = np.concatenate([rows, cols[:, None]], axis=1).ravel()
        d = np.broadcast_to(delta, (net.num_layers,))[l]
        prec[np.ix_(where, where)] = n * np.kron(G, A) + d * np.eye(where.size)
    return prec


@pytest.mark.parametrize("loss_name, output", PAIRS)
def test_kron_and_diag_against_dense_forms_of_the_same_approximation(loss_name, output):
    """"kron": the block-diagonal N·(G^l ⊗ A^l) + δ_l I formed densely (slogdet, inverse); "diag": the
    explicit GGN's diagonal; both in the evidence and the GLM predictive variance, with J from jax.jacfwd;
    the evidence's derivative in log δ against a central finite difference of the evidence."""
    net, params, x, y, loss = _problem(loss_name, output, seed=2)
    delta = np.array([0.5, 2.0])
    per = delta[_layer_of(params)]
    G = np.asarray(_explicit_ggn(net, params, x, y, loss, 0.0)[0])
    nll = _nll(net, params, x, y, loss)
    dense = {"kron": _kron_dense(net, params, x, y, loss, delta), "diag": np.diag(x.shape[0] * np.diag(G) + per)}
    xt = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3)))
    at_logits = fnn.losses.output_curvature(loss, net.output).at_logits
    flat, unravel = ravel_pytree(params)

    def split(theta):
        trace = net.forward_trace(unravel(theta), xt)
        return trace.zs[-1] if at_logits else trace.acts[-1]

    J = np.asarray(jax.jacfwd(split)(flat))
    for structure, prec in dense.items():
        post = laplace.fit_laplace(net, params, (x, y), loss, structure=structure, prior_precision=delta,
                                   batch_size=5)
        expect = _dense_evidence(prec, params, nll, per)
        assert abs(float(laplace.log_marginal_likelihood(post)) - expect) <= 1e-9 * abs(expect), structure
        _, cov = laplace.glm_predictive(post, xt)
        assert rel_err(np.asarray(cov), np.einsum("nkp,pq,nlq->nkl", J, np.linalg.inv(prec), J)) <= 1e-9, structure
        grad = np.asarray(laplace.evidence_gradient(post))
        h = 1e-5
        for l in range(2):
            up, down = delta.copy(), delta.copy()
            up[l] *= math.exp(h)
            down[l] *= math.exp(-h)
            fd = (float(laplace.log_marginal_likelihood(post, up))
                  - float(laplace.log_marginal_likelihood(post, down))) / (2 * h)
            assert abs(grad[l] - fd) <= 1e-6 * max(1.0, abs(fd)), (structure, l)


def test_last_layer_against_the_dense_block():
    """"last_layer": the output layer's block of the explicit GGN (times N, plus δ_L I) is its precision;
    the evidence counts that layer's prior alone; the predictive uses the output layer's Jacobian only."""
    net, params, x, y, loss = _problem("softmax_cross_entropy", "identity", sizes=(3, 5, 3), seed=4)
    delta = np.array([9.0, 0.6])  # the first is unused
    post = laplace.fit_laplace(net, params, (x, y), loss, structure="last_layer", prior_precision=delta)
    G = np.asarray(_explicit_ggn(net, params, x, y, loss, 0.0)[0])
    last = _layer_of(params) == 1
    prec = x.shape[0] * G[np.ix_(last, last)] + 0.6 * np.eye(last.sum())
    theta = np.asarray(ravel_pytree(params)[0])[last]
    expect = (-_nll(net, params, x, y, loss) - 0.3 * theta @ theta + 0.5 * last.sum() * math.log(0.6)
              - 0.5 * np.linalg.slogdet(prec)[1])
    assert abs(float(laplace.log_marginal_likelihood(post)) - expect) <= 1e-9 * abs(expect)
    # sampled columns: each carries the weight 1/samples, so many draws approach the exact block (checked
    # against the dense one by the evidence above; here in its own order, W̄^L row by row)
    sampled = laplace.fit_laplace(net, params, (x, y), loss, structure="last_layer", prior_precision=delta,
                                  key=0, samples=4000)
    assert rel_err(np.asarray(sampled.curvature["H"]), np.asarray(post.curvature["H"])) <= 0.05
    flat, unravel = ravel_pytree(params)
    xt = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3)))
    J = np.asarray(jax.jacfwd(lambda t: net.forward_trace(unravel(t), xt).zs[-1])(flat))[:, :, last]
    _, cov = laplace.glm_predictive(post, xt)
    assert rel_err(np.asarray(cov), np.einsum("nkp,pq,nlq->nkl", J, np.linalg.inv(prec), J)) <= 1e-9


def test_probit_is_within_its_known_error_of_monte_carlo():
    """The probit approximation against 10⁵ Monte-Carlo draws of the logits: within a few hundredths for
    the sigmoid (Spiegelhalter & Lauritzen's bound, MacKay 1992), and the MC estimate itself within
    its standard error of 10⁶ draws computed here with numpy."""
    net, params, x, y, loss = _problem("binary_cross_entropy_with_logits", "identity", seed=6)
    post = laplace.fit_laplace(net, params, (x, y), loss, structure="full", prior_precision=0.3)
    xt = jnp.asarray(np.random.default_rng(7).normal(size=(6, 3)))
    probit = np.asarray(laplace.predict(post, xt))
    mc = np.asarray(laplace.predict(post, xt, method="mc", samples=100_000, key=0))
    f, cov = (np.asarray(t) for t in laplace.glm_predictive(post, xt))
    rng = np.random.default_rng(8)
    ref = np.array([[np.mean(1 / (1 + np.exp(-(f[i, k] + math.sqrt(cov[i, k, k]) * rng.normal(size=1_000_000)))))
                     for k in range(f.shape[1])] for i in range(f.shape[0])])
    assert np.max(np.abs(mc - ref)) <= 5 * 0.5 / math.sqrt(100_000)
    assert np.max(np.abs(probit - ref)) <= 0.02
    assert np.max(np.sqrt(np.diagonal(cov, axis1=1, axis2=2))) > 0.5  # a spread the approximation must handle


@pytest.mark.parametrize("structure", laplace.STRUCTURES)
def test_the_prior_precision_optimized_both_ways_agrees_and_zeroes_the_gradient(structure):
    """MacKay's fixed point and gradient ascent on log δ reach the same δ, where the evidence's derivative
    is 0 and the evidence is not below its value at nearby δ."""
    net, params, x, y, loss = _problem("softmax_cross_entropy", "identity", sizes=(3, 6, 3), n=40, seed=9)
    post = laplace.fit_laplace(net, params, (x, y), loss, structure=structure, prior_precision=1.0)
    fixed = laplace.optimize_prior_precision(post, method="fixed_point", tol=1e-12, iters=500)
    grad = laplace.optimize_prior_precision(post, method="gradient", tol=1e-12, iters=5000, learning_rate=1.0)
    assert fixed.converged and grad.converged and fixed.iterations < grad.iterations
    d = np.asarray(fixed.posterior.prior_precision)
    assert rel_err(d, np.asarray(grad.posterior.prior_precision)) <= 1e-6
    assert abs(float(np.sum(laplace.evidence_gradient(fixed.posterior)))) <= 1e-8 * post.n
    best = float(laplace.log_marginal_likelihood(fixed.posterior))
    for factor in (0.9, 1.1):
        assert float(laplace.log_marginal_likelihood(post, d * factor)) < best
    per = laplace.optimize_prior_precision(post, per_layer=True, tol=1e-12, iters=500)
    assert per.converged and float(laplace.log_marginal_likelihood(per.posterior)) >= best - 1e-9
    grads = np.asarray(laplace.evidence_gradient(per.posterior))
    assert np.all(np.abs(grads) <= 1e-6 * post.n)


@pytest.mark.parametrize("structure", laplace.STRUCTURES)
def test_samples_have_the_posterior_covariance(structure):
    """Parameter draws: their mean is θ* and their covariance the inverse precision (dense, formed here
    from the explicit GGN in the structure's form), within the Monte-Carlo error of 20,000 draws."""
    net, params, x, y, loss = _problem("half_mse", "identity", sizes=(2, 3, 2), n=15, seed=11)
    delta = 2.0
    post = laplace.fit_laplace(net, params, (x, y), loss, structure=structure, prior_precision=delta)
    draws = np.asarray(jax.vmap(lambda p: ravel_pytree(p)[0])(laplace.sample(post, 1, 20_000)))
    G = x.shape[0] * np.asarray(_explicit_ggn(net, params, x, y, loss, 0.0)[0])
    size = G.shape[0]
    last = _layer_of(params) == 1
    prec = {"full": G + delta * np.eye(size), "diag": np.diag(np.diag(G) + delta),
            "kron": _kron_dense(net, params, x, y, loss, delta)}.get(structure)
    theta = np.asarray(ravel_pytree(params)[0])
    if structure == "last_layer":
        sigma = np.zeros((size, size))
        sigma[np.ix_(last, last)] = np.linalg.inv(G[np.ix_(last, last)] + delta * np.eye(last.sum()))
    else:
        sigma = np.linalg.inv(prec)
    sd = np.sqrt(np.diag(sigma))
    assert np.all(np.abs(draws.mean(0) - theta) <= 5 * sd / math.sqrt(20_000) + 1e-12)  # + the rounding of a mean
    emp = np.cov(draws.T)
    scale = np.sqrt(np.outer(np.diag(sigma), np.diag(sigma)))
    assert np.max(np.abs(emp - sigma) / np.where(scale > 0, scale, 1)) <= 5 * math.sqrt(2 / 20_000)


def test_bad_input():
    net, params, x, y, loss = _problem("softmax_cross_entropy", "identity")
    data = (x, y)
    with pytest.raises(ValueError, match="structure must be one of"):
        laplace.fit_laplace(net, params, data, loss, structure="kfac", prior_precision=1.0)
    with pytest.raises(ValueError, match="give prior_precision"):
        laplace.fit_laplace(net, params, data, loss)
    with pytest.raises(ValueError, match="finite and > 0"):
        laplace.fit_laplace(net, params, data, loss, prior_precision=0.0)
    with pytest.raises(ValueError, match=r"one per layer \(2\)"):
        laplace.fit_laplace(net, params, data, loss, prior_precision=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="batch norm"):
        bn = fnn.MLP((3, 4, 2), "tanh", "identity", batch_norm=True)
        laplace.fit_laplace(bn, bn.init(jax.random.PRNGKey(0)), data, loss, prior_precision=1.0)
    post = laplace.fit_laplace(net, params, data, loss, l2=0.1)
    assert np.allclose(np.asarray(post.prior_precision), 0.1 * x.shape[0])  # δ = N β
    with pytest.raises(ValueError, match="needs key"):
        laplace.predict(post, x, method="mc")
    with pytest.raises(ValueError, match="method must be"):
        laplace.optimize_prior_precision(post, method="newton")
    with pytest.raises(ValueError, match="data is empty"):
        laplace.fit_laplace(net, params, (x[:0], y[:0]), loss, prior_precision=1.0)
    with pytest.raises(TypeError, match=r"the pair \(x, y\)"):
        laplace.fit_laplace(net, params, x, loss, prior_precision=1.0)
    wider = fnn.MLP((x.shape[1], 7, net.sizes[-1]), net.activation, net.output).init(jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="must have shape"):
        laplace.fit_laplace(net, wider, data, loss, prior_precision=1.0)
    for bad in (x[:, :-1], x[0]):
        with pytest.raises(ValueError, match=r"x must have shape \(N, 3\)"):
            laplace.fit_laplace(net, params, (bad, y), loss, prior_precision=1.0)
    with pytest.raises(ValueError, match="class labels must lie"):
        laplace.fit_laplace(net, params, (x, y + 5), loss, prior_precision=1.0)
    for bad in (jnp.full_like(x, jnp.nan), x.at[0, 0].set(jnp.inf)):
        with pytest.raises(FloatingPointError, match="not finite"):
            laplace.fit_laplace(net, params, (bad, y), loss, prior_precision=1.0)
    with pytest.raises(FloatingPointError, match="not finite"):
        laplace.fit_laplace(net, jax.tree.map(lambda t: t * jnp.nan, params), data, loss, prior_precision=1.0)
    for fn in (lambda: laplace.glm_predictive(post, x[:0]),
               lambda: fnn.curvature.output_jacobian(net, params, x[:0], loss)):
        with pytest.raises(ValueError, match="x is empty"):
            fn()
    with pytest.raises(ValueError, match="features per sample"):
        laplace.predict(post, x[:, :-1])
    prob_net, prob_params, *_ = _problem("categorical_cross_entropy", "sigmoid")
    odd = laplace.fit_laplace(prob_net, prob_params, data, "categorical_cross_entropy", prior_precision=1.0)
    with pytest.raises(ValueError, match="no link to integrate"):
        laplace.predict(odd, x)


@pytest.mark.parametrize("loss_name, output", PAIRS)
def test_split_columns_are_a_square_root_of_the_ggn(loss_name, output):
    """fnn.curvature.split_columns: the Gram matrix of the columns' per-sample gradients Δ ⊗ ā, over ravel
    order, is N·G (the explicit GGN from jax.jacfwd/jax.hessian); output_jacobian's Δ ⊗ ā is jax.jacfwd's J."""
    net, params, x, y, loss = _problem(loss_name, output, seed=12)
    cols = fnn.curvature.split_columns(net, params, x, y, loss)
    g = laplace._flat_jacobian(cols)  # (N, C, P): a column's per-sample gradient, as for the Jacobian
    gram = cols.scale * np.einsum("ncp,ncq->pq", np.asarray(g), np.asarray(g))
    G = np.asarray(_explicit_ggn(net, params, x, y, loss, 0.0)[0])
    assert rel_err(gram, x.shape[0] * G) <= 1e-10
    o, jac = fnn.curvature.output_jacobian(net, params, x, loss)
    flat, unravel = ravel_pytree(params)
    at_logits = fnn.losses.output_curvature(loss, net.output).at_logits

    def split(theta):
        trace = net.forward_trace(unravel(theta), x)
        return trace.zs[-1] if at_logits else trace.acts[-1]

    assert rel_err(np.asarray(laplace._flat_jacobian(jac)), np.asarray(jax.jacfwd(split)(flat))) <= 1e-12
    assert rel_err(np.asarray(o), np.asarray(split(flat))) <= 1e-14


def test_float32_posteriors_agree_with_float64():
    """In float32 every structure's curvature and evidence match float64's to float32 rounding (the full
    GGN's columns are built one product at a time: a batched float32 build hit a miscompiled fusion), and the
    prior precision's default tolerance lets the float32 fixed point converge."""
    net, params, x, y, loss = _problem("softmax_cross_entropy", "identity", sizes=(10, 12, 5), n=300, seed=4)
    p32 = jax.tree.map(lambda t: t.astype(jnp.float32), params)
    for structure in laplace.STRUCTURES:
        post64 = laplace.fit_laplace(net, params, (x, y), loss, structure=structure, prior_precision=1.0)
        post32 = laplace.fit_laplace(net, p32, (x.astype(jnp.float32), y), loss, structure=structure,
                                     prior_precision=1.0)
        for a, b in zip(jax.tree.leaves(post32.curvature), jax.tree.leaves(post64.curvature)):
            if a.ndim == 1:  # eigenvalues, or the diagonal (eigenvectors enter through the evidence below)
                assert np.abs(np.asarray(a, np.float64) - np.asarray(b)).max() <= 1e-5 * (1 + np.abs(b).max())
        if structure in ("full", "last_layer"):
            assert rel_err(np.asarray(post32.curvature["H"], np.float64), np.asarray(post64.curvature["H"])) <= 1e-5
        lml32, lml64 = float(laplace.log_marginal_likelihood(post32)), float(laplace.log_marginal_likelihood(post64))
        assert abs(lml32 - lml64) <= 1e-5 * abs(lml64)
        fit32, fit64 = laplace.optimize_prior_precision(post32), laplace.optimize_prior_precision(post64)
        assert fit32.converged and fit64.converged
        assert rel_err(np.asarray(fit32.posterior.prior_precision, np.float64),
                       np.asarray(fit64.posterior.prior_precision)) <= 1e-4


@settings(max_examples=12, deadline=None)
@given(pair=st.sampled_from(PAIRS), structure=st.sampled_from(laplace.STRUCTURES),
       hidden=st.lists(st.integers(1, 4), min_size=0, max_size=2), inputs=st.integers(1, 3),
       outputs=st.integers(1, 3), n=st.integers(1, 7), l2_on=st.booleans(),
       activation=st.sampled_from(["tanh", "sigmoid", "softplus"]), seed=st.integers(0, 2**16))
def test_random_configurations_against_dense_oracles(pair, structure, hidden, inputs, outputs, n, l2_on,
                                                     activation, seed):
    """Any depth, widths, sample count, structure and accepted loss/output pair, with the prior from the
    training L2 (δ = Nβ) or given directly: the evidence against slogdet of the dense precision of the same
    structure, and the GLM variance against J Σ Jᵀ with J from jax.jacfwd."""
    loss_name, output = pair
    if output == "softmax" and outputs == 1:
        outputs = 2  # a softmax over one output is constant
    sizes = (inputs, *hidden, outputs)
    net, params, x, y, loss = _random_problem(loss_name, sizes, n, seed, activation, output)
    layers = net.num_layers
    beta = 0.3
    delta = np.full(layers, n * beta) if l2_on else np.linspace(0.5, 2.0, layers)
    prior = {"l2": beta} if l2_on else {"prior_precision": delta}
    post = laplace.fit_laplace(net, params, (x, y), loss, structure=structure, **prior)
    assert np.allclose(np.asarray(post.prior_precision), delta, rtol=1e-12)
    of = _layer_of(params)
    G = np.asarray(_explicit_ggn(net, params, x, y, loss, 0.0)[0])
    if structure == "full":
        keep, prec = np.ones(G.shape[0], bool), n * G + np.diag(delta[of])
    elif structure == "diag":
        keep, prec = np.ones(G.shape[0], bool), np.diag(n * np.diag(G) + delta[of])
    elif structure == "kron":
        keep, prec = np.ones(G.shape[0], bool), _kron_dense(net, params, x, y, loss, delta)
    else:
        keep = of == layers - 1
        prec = n * G[np.ix_(keep, keep)] + delta[-1] * np.eye(keep.sum())
    theta = np.asarray(ravel_pytree(params)[0])[keep]
    per = delta[of][keep]
    expect = (-_nll(net, params, x, y, loss) - 0.5 * np.sum(per * theta ** 2) + 0.5 * np.sum(np.log(per))
              - 0.5 * np.linalg.slogdet(prec)[1])
    assert abs(float(laplace.log_marginal_likelihood(post)) - expect) <= 1e-8 * max(1.0, abs(expect))
    at_logits = fnn.losses.output_curvature(loss, net.output).at_logits
    flat, unravel = ravel_pytree(params)

    def split(t):
        trace = net.forward_trace(unravel(t), x)
        return trace.zs[-1] if at_logits else trace.acts[-1]

    J = np.asarray(jax.jacfwd(split)(flat))[:, :, keep]
    _, cov = laplace.glm_predictive(post, x)
    want = np.einsum("nkp,pq,nlq->nkl", J, np.linalg.inv(prec), J)
    assert np.abs(np.asarray(cov) - want).max() <= 1e-8 * max(1.0, np.abs(want).max())
