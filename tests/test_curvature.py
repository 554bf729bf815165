"""fnn.curvature (R-operator Hessian products, Gauss-Newton products, diagonals, Kronecker factors,
sharpness) against autodiff: jax.jvp(jax.grad), explicit jax.jacfwd Jacobians, jax.hessian and
numpy.linalg.eigvalsh, in float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from test_backprop import HIDDEN, PAIRS, quick_jit, rotated, soft_class_targets

import fnn
from fnn import curvature as cv
from fnn.activations import ACTIVATIONS, PIECEWISE_LINEAR
from fnn.losses import CLASSES, LOSSES

from helpers import rel_err

TOL = 1e-10  # relative, float64


def _targets(rng, loss, output, n, k, soft=False):
    """Targets of a form ``loss`` accepts, drawn from ``rng``; ``soft``: soft rows for the class losses
    (rows summing anywhere in [0.2, 3], where ``H_x`` carries the factor ``Σ_k y_k``)."""
    if loss.targets == CLASSES:
        kind = 2 if soft else rng.integers(3)
        labels = rng.integers(0, k, n)
        return labels if kind == 0 else np.eye(k)[labels] if kind == 1 else soft_class_targets(rng, n, k)
    if loss.targets == "binary":
        return rng.integers(0, 2, (n, k)).astype(np.float64) if rng.integers(2) else rng.uniform(0, 1, (n, k))
    if output == "softmax":
        return rng.dirichlet(np.ones(k), n)
    return rng.normal(size=(n, k))


@st.composite
def problems(draw, loss_name, output, batch_norm=False):
    """A small float64 network ending in ``output``, data, targets of every form ``loss_name`` accepts, a
    direction ``v``, L2 on or off.

    The property tests run every accepted pair as a case of its own, with one example each, and the
    example hypothesis tries first is its simplest draw: the first entry of every list. So every list
    starts at a typical choice (width 3), and the lists of depth, hidden activations, batch size and L2
    are rotated by the pair's position in ``PAIRS`` (:func:`test_backprop.rotated`): the pairs' first
    examples together go through every hidden activation, depths 1 to 3 (2 and 3 with batch norm),
    batches of 4 and 1, and L2 on and off. The data's seed mixes in that position too.
    """
    index = PAIRS.index((loss_name, output))
    depth = draw(rotated([2, 3] if batch_norm else [2, 3, 1], index))
    sizes = [draw(st.sampled_from([3, 1])) for _ in range(depth + 1)]
    if LOSSES[loss_name].targets == CLASSES:
        sizes[-1] = max(sizes[-1], 2)
    hidden = [draw(rotated(HIDDEN, index + l)) for l in range(depth - 1)]
    bn = batch_norm and depth > 1
    net = fnn.MLP(sizes, hidden or "tanh", output, batch_norm=bn)
    n = draw(rotated([4, 1], index // 3))
    rng = np.random.default_rng([index, draw(st.integers(0, 2**32 - 1))])
    params = net.init(jax.random.PRNGKey(int(rng.integers(2**31))), jnp.float64)
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.3, p.shape), params)  # biases, γ, β away from 0, 1
    state = None
    if bn:
        state = [{"mean": jnp.asarray(rng.normal(size=m)), "var": jnp.asarray(rng.uniform(0.5, 2, m))} if b else {}
                 for m, b in zip(sizes[1:], net.normalized)]
    x = jnp.asarray(rng.normal(size=(n, sizes[0])))
    loss = LOSSES[loss_name]
    y = jnp.asarray(_targets(rng, loss, output, n, sizes[-1]))
    v = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    l2 = draw(rotated([float(rng.uniform(0.01, 1.0)), 0.0], index // 2))
    return net, params, x, y, loss, v, l2, state


def _split(net, params, x, loss, state=None):
    """The split point ``o(θ)`` (logits for a canonical pair, else the output) as autodiff sees it."""
    at_logits = loss.canonical_output == net.output

    def o(p):
        f = net.forward_trace(p, x, state)
        return f.zs[-1] if at_logits else f.acts[-1]

    def cost_of_o(o_row, y_row):
        a = net.activations[-1].phi(o_row[None]) if at_logits else o_row[None]
        return loss.per_sample(a, y_row[None])[0]

    return o, cost_of_o


def _explicit_ggn(net, params, x, y, loss, l2, state=None):
    """``G = (1/N) Σ_x J_xᵀ H_x J_x + β I_W`` as a matrix over ``ravel_pytree(params)``: ``J`` by
    jax.jacfwd, ``H_x`` by jax.hessian of the per-sample cost at the split point."""
    flat, unravel = ravel_pytree(params)
    o, cost_of_o = _split(net, params, x, loss, state)
    target, _ = loss.target(net.forward_trace(params, x, state).acts[-1], y)
    J = jax.jacfwd(lambda t: o(unravel(t)))(flat)  # (N, K, P)
    H = jax.vmap(jax.hessian(cost_of_o))(o(params), target)  # (N, K, K)
    G = jnp.einsum("nkp,nkj,njq->pq", J, H, J) / x.shape[0]
    weights = ravel_pytree([{k: jnp.full(p[k].shape, float(k == "W")) for k in p} for p in params])[0]
    return G + l2 * jnp.diag(weights), J, H


def _assert_tree_close(got, ref, tol=TOL, what=""):
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    g, r = ravel_pytree(got)[0], ravel_pytree(ref)[0]
    assert rel_err(g, r) <= tol, f"{what}: relative error {rel_err(g, r):.3g}"


class _Static:
    """Hashable holder, so that jit treats the network, the loss and β as static."""

    def __init__(self, *items):
        self.items = items

    def __hash__(self):
        return hash(self.items)

    def __eq__(self, other):
        return self.items == other.items


jax.tree_util.register_static(_Static)


def _products(params, x, y, v, state, static):
    """Each product by fnn.curvature and by autodiff."""
    net, loss, l2 = static.items

    def obj(p):
        return fnn.objective(net, p, x, y, loss, l2) if state is None else fnn.objective(
            net, p, x, y, loss, l2, state, False)[0]

    G, _, _ = _explicit_ggn(net, params, x, y, loss, l2, state)
    got = (cv.hvp(net, params, x, y, loss, v, l2, state), cv.ggn_vp(net, params, x, y, loss, v, l2, state),
           cv.ggn_diag(net, params, x, y, loss, l2, state))
    return got, jax.jvp(jax.grad(obj), (params,), (v,))[1], G


_compiled_products = quick_jit(_products)


def _check_products(net, params, x, y, loss, v, l2, state, compiled=True):
    """The products against autodiff, in one compiled program or (``compiled=False``) eagerly: the
    property tests' small networks share a handful of shapes, for which eager JAX reuses each
    primitive's compilation, so there eager is several times faster than one compilation per example."""
    (hv, gv, diag), ref_hv, G = (_compiled_products if compiled else _products)(
        params, x, y, v, state, _Static(net, loss, l2))
    flat_v, unravel = ravel_pytree(v)
    _assert_tree_close(hv, ref_hv, what="H v")
    _assert_tree_close(gv, unravel(G @ flat_v), what="G v")
    _assert_tree_close(diag, unravel(jnp.diag(G)), what="diag G")


# Every accepted pair is a case of its own, so that none depends on a lucky draw; hypothesis draws the
# rest (depth, widths, hidden activations, batch, targets, L2), one example per pair (see problems()).
@pytest.mark.parametrize("loss_name, output", PAIRS)
@settings(max_examples=1)
@given(data=st.data())
def test_products_and_diagonal_equal_autodiff(loss_name, output, data):
    """H v = jvp(grad C), G v = Jᵀ H J v and diag G, from explicit jacfwd/hessian matrices, to 1e-10."""
    _check_products(*data.draw(problems(loss_name, output)), compiled=False)


@pytest.mark.parametrize("loss_name, output", PAIRS)
@settings(max_examples=1)
@given(data=st.data())
def test_batch_norm_in_eval_mode(loss_name, output, data):
    """The same with batch-normalized hidden layers in eval mode (γ and β get their own rows)."""
    _check_products(*data.draw(problems(loss_name, output, batch_norm=True)), compiled=False)


def _factors_and_blocks(params, x, y, static):
    """KFLR's factors and the explicit Gauss-Newton matrix, for the batch and for its first sample alone
    (eagerly, as the property tests' products: see :func:`_check_products`)."""
    net, loss = static.items
    return [(cv.kronecker_factors(net, params, xs, ys, loss), _explicit_ggn(net, params, xs, ys, loss, 0.0)[0])
            for xs, ys in ((x, y), (x[:1], y[:1]))]


@pytest.mark.parametrize("loss_name, output", PAIRS)
@settings(max_examples=1)
@given(data=st.data())
def test_kronecker_factors(loss_name, output, data):
    """``A^l = mean ā āᵀ``; ``G^l`` = the Gauss-Newton block of ``b^l`` (``∂z^l/∂b^l = I``, so the bias
    block is exactly ``(1/N) Σ_x J_{z^l}ᵀ H_x J_{z^l}`` for any N), from the exact columns (KFLR); and for
    N = 1, ``G^l ⊗ A^l`` (row-major ``[W | b]``) is the exact Gauss-Newton block of layer l."""
    net, params, x, y, loss, _, _, _ = data.draw(problems(loss_name, output))
    index = _layer_index(params)
    acts = net.forward_trace(params, x).acts
    (factors, G), (factors_1, G_1) = _factors_and_blocks(params, x, y, _Static(net, loss))
    for l, f in enumerate(factors):
        abar = np.concatenate([np.asarray(acts[l]), np.ones((x.shape[0], 1))], axis=1)
        assert rel_err(f.A, abar.T @ abar / x.shape[0]) <= TOL
        b = index[l]["b"]
        assert rel_err(f.G, G[np.ix_(b, b)]) <= TOL, f"layer {l}"
        assert f.A.shape == (net.sizes[l] + 1,) * 2 and f.G.shape == (net.sizes[l + 1],) * 2
    for l, (f, idx) in enumerate(zip(factors_1, index)):
        order = np.concatenate([idx["W"], idx["b"][:, None]], axis=1).ravel()
        assert rel_err(jnp.kron(f.G, f.A), G_1[np.ix_(order, order)]) <= TOL, f"layer {l}, N = 1"


CURVED_HIDDEN = tuple(n for n in HIDDEN if n not in PIECEWISE_LINEAR)  # φ'' ≠ 0


@pytest.mark.parametrize("loss_name, output, batch_norm", [
    ("softmax_cross_entropy", "identity", False),  # split at the logits, H_x = (Σy)(diag p − p pᵀ)
    ("mse", "softmax", False),  # split at a^L: the softmax's own second-order term in H v
    ("categorical_cross_entropy", "sigmoid", True),  # split at a^L, batch norm in eval mode
], ids=["softmax_cross_entropy-identity", "mse-softmax", "categorical_cross_entropy-sigmoid-batch_norm"])
def test_products_of_a_deep_network_through_every_curved_activation(loss_name, output, batch_norm):
    """The property test's check on one fixed network, with nothing left to a draw: five hidden layers, one
    for each activation with φ'' ≠ 0 (elu, sigmoid, silu, softplus, tanh), three outputs, a batch of 5,
    soft targets and L2 on; H v, G v and diag G against jvp(grad C) and the explicit jacfwd/hessian G.
    Catches, with no draw involved, the mutants of the R-passes and of the exact diagonal:
    hvp-without-the-output-second-derivative, hvp-without-the-hidden-second-derivatives,
    r-forward-not-propagated, r-backward-batch-norm-gamma-path, ggn-diag-columns-summed-before-squaring."""
    rng = np.random.default_rng(12)
    loss = LOSSES[loss_name]
    sizes = (3, 4, 4, 4, 4, 4, 3)
    net = fnn.MLP(sizes, CURVED_HIDDEN, output, batch_norm=batch_norm)
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.3, p.shape), net.init(jax.random.PRNGKey(12), jnp.float64))
    state = None
    if batch_norm:
        state = [{"mean": jnp.asarray(rng.normal(size=m)), "var": jnp.asarray(rng.uniform(0.5, 2, m))} if b else {}
                 for m, b in zip(sizes[1:], net.normalized)]
    x = jnp.asarray(rng.normal(size=(5, 3)))
    y = jnp.asarray(_targets(rng, loss, output, 5, 3, soft=True))
    v = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    _check_products(net, params, x, y, loss, v, 0.05, state)


@pytest.mark.parametrize("name", sorted(n for n, a in ACTIVATIONS.items() if a.backward_r is not None))
def test_backward_r_is_the_derivative_of_backward(name):
    """``backward_r(z, a, g, r)``, the second-order term of the R-backward, is the derivative of
    ``backward(z, φ(z), g)`` in ``z`` along ``r`` with ``g`` held fixed: against jax.jvp, in float64, with
    every |z| ≥ 0.1 (away from the kinks of the piecewise-linear activations, whose term is 0). Catches the
    mutant softmax-second-derivative-sign, which the products' tests see only through a softmax output
    that is not the loss's canonical one."""
    act = ACTIVATIONS[name]
    rng = np.random.default_rng(4)
    z = rng.normal(size=(5, 4))
    z = jnp.asarray(z + 0.1 * np.sign(z))
    g, r = jnp.asarray(rng.normal(size=(5, 4))), jnp.asarray(rng.normal(size=(5, 4)))
    _, ref = jax.jvp(lambda t: act.backward(t, act.phi(t), g), (z,), (r,))
    got = act.backward_r(z, act.phi(z), g, r)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= TOL


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_product_operator_is_the_product_with_one_forward_pass(matrix):
    """``product_operator(...)(v)`` equals :func:`hvp` / :func:`ggn_vp` for several directions (L2 on),
    and in a loop of products the operator leaves the forward pass outside the loop body: the body has
    at least ``L`` matmuls fewer than a loop of ``hvp`` / ``ggn_vp`` calls."""
    net, params, x, y, loss = fnn.MLP((4, 6, 5, 3), "tanh", "identity"), None, None, None, LOSSES["mse"]
    rng = np.random.default_rng(8)
    params = net.init(jax.random.PRNGKey(8), jnp.float64)
    x, y = jnp.asarray(rng.normal(size=(7, 4))), jnp.asarray(rng.normal(size=(7, 3)))
    op = cv.product_operator(net, params, x, y, loss, 0.05, matrix=matrix)
    direct = cv.hvp if matrix == "hessian" else cv.ggn_vp
    for seed in range(3):
        v = net.init(jax.random.PRNGKey(20 + seed), jnp.float64)
        _assert_tree_close(op(v), direct(net, params, x, y, loss, v, 0.05), 1e-13, f"direction {seed}")
    with pytest.raises(ValueError, match="matrix"):
        cv.product_operator(net, params, x, y, loss, matrix="fisher")

    def once(p, v):
        op = cv.product_operator(net, p, x, y, loss, matrix=matrix)
        return jax.lax.fori_loop(0, 8, lambda _, u: op(u), v)

    def every(p, v):
        return jax.lax.fori_loop(0, 8, lambda _, u: direct(net, p, x, y, loss, u), v)

    def subjaxprs(e):
        for value in e.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns"):
                    yield getattr(v, "jaxpr", v)

    def eqns(jaxpr):  # every equation, nested calls included
        for e in jaxpr.eqns:
            yield e
            for sub in subjaxprs(e):
                yield from eqns(sub)

    def dots_in_loop(f):  # fori_loop with static bounds is a scan
        (loop,) = [e for e in eqns(jax.make_jaxpr(f)(params, params).jaxpr) if e.primitive.name == "scan"]
        return sum(e.primitive.name == "dot_general" for b in subjaxprs(loop) for e in eqns(b))

    assert dots_in_loop(every) - dots_in_loop(once) >= net.num_layers  # at least the forward pass's matmuls


@pytest.mark.parametrize("loss_name, output", [("softmax_cross_entropy", "identity"), ("mse", "tanh")])
def test_kronecker_factors_of_wide_layers(loss_name, output):
    """Layers of benchmark widths (hundreds of units, where XLA tiles its matmuls), beyond the small
    networks of :func:`test_kronecker_factors`: ``A^l`` against numpy and ``G^l`` against the bias's
    Gauss-Newton block ``(1/N) Σ_x J_xᵀ H_x J_x`` with ``J_x = ∂o_x/∂b^l`` by jax.jacfwd and ``H_x`` by
    jax.hessian."""
    rng = np.random.default_rng(5)
    net = fnn.MLP((530, 770, 3), "tanh", output)
    loss = LOSSES[loss_name]
    params = net.init(jax.random.PRNGKey(5), jnp.float64)
    x = jnp.asarray(rng.normal(size=(6, 530)))
    y = jnp.asarray(rng.integers(0, 3, 6)) if loss.targets == "classes" else jnp.asarray(rng.normal(size=(6, 3)))
    factors = cv.kronecker_factors(net, params, x, y, loss)
    o, cost_of_o = _split(net, params, x, loss)
    target, _ = loss.target(net.apply(params, x), y)
    H = jax.vmap(jax.hessian(cost_of_o))(o(params), target)  # (N, K, K)
    acts = net.forward_trace(params, x).acts
    for l, f in enumerate(factors):
        abar = np.concatenate([np.asarray(acts[l]), np.ones((6, 1))], axis=1)
        assert rel_err(f.A, abar.T @ abar / 6) <= TOL, f"layer {l}"
        with_b = lambda b, l=l: o([{**p, "b": b} if i == l else p for i, p in enumerate(params)])  # noqa: E731
        J = jax.jacfwd(with_b)(params[l]["b"])  # (N, K, n_l)
        assert rel_err(f.G, jnp.einsum("nkp,nkj,njq->pq", J, H, J) / 6) <= TOL, f"layer {l}"


def _layer_index(params):
    """Per layer, the positions of each leaf in ``ravel_pytree(params)``."""
    flat_index = ravel_pytree(jax.tree.map(lambda p: jnp.zeros(p.shape), params))[1]
    count = sum(p.size for p in jax.tree.leaves(params))
    return jax.tree.map(lambda t: np.asarray(t, np.int64), flat_index(jnp.arange(count, dtype=jnp.float64)))


MC_CASES = [("softmax_cross_entropy", "identity"), ("binary_cross_entropy", "sigmoid"), ("mse", "tanh"),
            ("categorical_cross_entropy", "sigmoid"), ("binary_cross_entropy", "softmax"), ("half_mse", "softmax")]


@pytest.mark.parametrize("loss_name,output", MC_CASES)
def test_monte_carlo_diagonal_and_factors_converge_to_the_exact_ones(loss_name, output):
    """The MC diagonal and KFAC's ``G^l`` are unbiased: over 400 independent estimates (20 columns
    each) their mean lies within 5 standard errors of the exact diagonal / KFLR factor, entry by entry,
    and the spread shrinks as 1/√M."""
    rng = np.random.default_rng(7)
    loss = LOSSES[loss_name]
    net = fnn.MLP((3, 4, 3), "tanh", output)
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.3, p.shape), net.init(jax.random.PRNGKey(1), jnp.float64))
    x = jnp.asarray(rng.normal(size=(4, 3)))
    y = jnp.asarray(_targets(rng, loss, output, 4, 3))
    keys = jax.random.split(jax.random.PRNGKey(11), 400)

    def diag(k, m):
        return ravel_pytree(cv.ggn_diag_mc(net, params, x, y, loss, 0.1, key=k, samples=m))[0]

    def kfac(k):
        return jnp.concatenate([f.G.ravel() for f in cv.kronecker_factors(net, params, x, y, loss, key=k, samples=20)])

    @jax.jit
    def estimates(keys):
        return jax.vmap(lambda k: diag(k, 20))(keys), jax.vmap(kfac)(keys), jax.vmap(lambda k: diag(k, 1))(keys)

    mc, kf, single = estimates(keys)
    _assert_unbiased(mc, ravel_pytree(cv.ggn_diag(net, params, x, y, loss, 0.1))[0])
    _assert_unbiased(kf, jnp.concatenate([f.G.ravel() for f in cv.kronecker_factors(net, params, x, y, loss)]))
    # one column per example: the spread is about √20 times larger
    big = np.asarray(mc.std(0)) > 1e-6
    ratio = np.median(np.asarray(single.std(0))[big] / np.asarray(mc.std(0))[big])
    assert math.sqrt(20) / 1.5 < ratio < math.sqrt(20) * 1.5


def _assert_unbiased(estimates, exact):
    mean, se = np.asarray(estimates.mean(0)), np.asarray(estimates.std(0)) / math.sqrt(estimates.shape[0])
    exact = np.asarray(exact)
    z = np.abs(mean - exact) / (se + 1e-300)
    assert np.all(np.abs(mean - exact) <= 5 * se + 1e-12 * np.abs(exact).max()), f"{z.max():.2f} standard errors"
    assert np.abs(mean - exact).max() <= 0.05 * np.abs(exact).max()  # and close in absolute terms


@pytest.mark.parametrize("loss_name, output", PAIRS)
def test_the_exact_columns_factor_the_output_hessian(loss_name, output):
    """``S_x S_xᵀ = H_x``, ``hvp`` is ``H_x u`` and the MC columns' second moment is ``H_x``, for every
    accepted pair, against jax.hessian of the per-sample cost at the split point (soft class targets,
    whose rows' sums scale ``H_x``)."""
    rng = np.random.default_rng([3, PAIRS.index((loss_name, output))])
    loss = LOSSES[loss_name]
    curv = fnn.losses.output_curvature(loss, output)
    k, n = 3, 4
    net = fnn.MLP((2, k), "tanh", output)
    o = jnp.asarray(rng.normal(size=(n, k)))
    if not curv.at_logits and output in ("sigmoid", "softmax"):
        o = net.activations[-1].phi(o)  # a^L of that output
    y, _ = loss.target(o, jnp.asarray(_targets(rng, loss, output, n, k, soft=True)))
    _, cost_of_o = _split(net, None, None, loss)
    H = jax.vmap(jax.hessian(cost_of_o))(o, y)
    S = curv.sqrt(o, y)
    assert rel_err(jnp.einsum("nkc,njc->nkj", S, S), H) <= TOL
    u = jnp.asarray(rng.normal(size=(n, k)))
    assert rel_err(curv.hvp(o, y, u), jnp.einsum("nkj,nj->nk", H, u)) <= TOL
    cols = jax.vmap(lambda key: curv.sample(key, o, y))(jax.random.split(jax.random.PRNGKey(0), 5000))
    second = jnp.einsum("mnk,mnj->nkj", cols, cols) / cols.shape[0]
    scale = max(np.abs(np.asarray(H)).max(), 1e-3)
    assert np.abs(np.asarray(second - H)).max() <= 0.05 * scale


def test_sampled_columns_of_a_single_output_are_exact():
    """With one output and columns sampled as ``√h ⊙ ε``, ``ε = ±1`` (categorical cross-entropy on a
    sigmoid), every sampled column has ``s sᵀ = H_x`` exactly: so the MC diagonal is the exact diagonal
    and KFAC's factors are KFLR's, for any key and any number M of columns. Catches a sum over the M
    columns that is not divided by M (the mutants ggn-diag-mc-not-averaged and kfac-factor-not-averaged),
    with no statistics involved: the Monte-Carlo test above needs hundreds of estimates for it."""
    rng = np.random.default_rng(9)
    net = fnn.MLP((3, 5, 4, 1), ("tanh", "softplus"), "sigmoid")
    loss = LOSSES["categorical_cross_entropy"]
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.3, p.shape), net.init(jax.random.PRNGKey(9), jnp.float64))
    x = jnp.asarray(rng.normal(size=(6, 3)))
    y = jnp.asarray(rng.uniform(0.2, 3.0, (6, 1)))  # soft weights of the one class
    draws = ((0, 1), (1, 3), (2, 8))  # (key, M)

    @quick_jit
    def everything(params):
        p = net.apply(params, x)
        _, cost_of_o = _split(net, params, x, loss)
        H = jax.vmap(jax.hessian(cost_of_o))(p, y)[:, 0, 0]
        column = fnn.losses.output_curvature(loss, "sigmoid").sample(jax.random.PRNGKey(1), p, y)[:, 0]
        sampled = [(cv.ggn_diag_mc(net, params, x, y, loss, 0.1, key=key, samples=m),
                    cv.kronecker_factors(net, params, x, y, loss, key=key, samples=m)) for key, m in draws]
        return H, column, cv.ggn_diag(net, params, x, y, loss, 0.1), cv.kronecker_factors(net, params, x, y, loss), \
            sampled

    H, column, exact, kflr, sampled = everything(params)
    assert rel_err(column ** 2, H) <= TOL  # the premise: s sᵀ = H_x for every column
    for (_, m), (mc, kfac) in zip(draws, sampled):
        assert rel_err(ravel_pytree(mc)[0], ravel_pytree(exact)[0]) <= TOL, f"M = {m}"
        for l, (f, e) in enumerate(zip(kfac, kflr)):
            assert rel_err(f.A, e.A) <= TOL and rel_err(f.G, e.G) <= TOL, f"layer {l}, M = {m}"


def _small_problem(seed, loss_name="softmax_cross_entropy", output="identity", act="tanh", scale=1.0):
    rng = np.random.default_rng(seed)
    loss = LOSSES[loss_name]
    net = fnn.MLP((3, 4, 3), act, output)
    params = jax.tree.map(lambda p: scale * (p + rng.normal(0, 0.5, p.shape)),
                          net.init(jax.random.PRNGKey(seed), jnp.float64))
    x = jnp.asarray(rng.normal(size=(6, 3)))
    y = jnp.asarray(_targets(rng, loss, output, 6, 3))
    return net, params, x, y, loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sharpness_against_eigvalsh(seed):
    """The top eigenvalue of H and of G by power iteration, against numpy.linalg.eigvalsh of the
    matrices built by jax.hessian and jacfwd; the residual bound holds."""
    net, params, x, y, loss = _small_problem(seed)
    flat, unravel = ravel_pytree(params)
    H = np.asarray(jax.jit(jax.hessian(lambda t: fnn.objective(net, unravel(t), x, y, loss, 0.01)))(flat))
    G = np.asarray(jax.jit(lambda p: _explicit_ggn(net, p, x, y, loss, 0.01)[0])(params))
    run = jax.jit(lambda p, which: cv.sharpness(net, p, x, y, loss, 0.01, matrix=which, tol=1e-9,
                                                max_iter=20000), static_argnums=1)
    for which, M in (("hessian", H), ("ggn", G)):
        ev = np.linalg.eigvalsh(M)
        top = run(params, which)
        assert bool(top.converged) and int(top.iterations) <= 20000
        assert abs(float(top.value) - ev[-1]) <= 1e-7 * np.abs(ev).max(), (which, float(top.value), ev[-1])
        vec = ravel_pytree(top.vector)[0]
        assert abs(float(jnp.linalg.norm(vec)) - 1) <= 1e-9
        assert np.linalg.norm(M @ np.asarray(vec) - ev[-1] * np.asarray(vec)) <= 1e-5 * np.abs(ev).max()
    # warm-started from its own eigenvector (mixed with a tenth of a random direction), the ggn iteration
    # needs fewer products than from a random start, for the same value
    cold = cv.sharpness(net, params, x, y, loss, 0.01, matrix="ggn", tol=1e-6, max_iter=20000)
    again = cv.sharpness(net, params, x, y, loss, 0.01, matrix="ggn", start=top.vector, tol=1e-6, max_iter=20000)
    assert bool(again.converged) and int(again.iterations) < int(cold.iterations)
    assert abs(float(again.value) - ev[-1]) <= 1e-7 * np.abs(ev).max()


def test_sharpness_when_the_most_negative_eigenvalue_dominates():
    """Power iteration alone would return λ_min here (|λ_min| > λ_max); the shifted second run gives λ_max."""
    net, params, x, y, loss = _small_problem(1, "mse", "identity", "tanh", scale=2.0)
    flat, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda t: fnn.objective(net, unravel(t), x, y, loss)))
    ev = np.linalg.eigvalsh(np.asarray(hessian(flat)))
    assert -ev[0] > ev[-1] > 0  # the case this test is about
    top = jax.jit(lambda p: cv.sharpness(net, p, x, y, loss, tol=1e-9, max_iter=50000))(params)
    assert bool(top.converged)
    assert abs(float(top.value) - ev[-1]) <= 1e-6 * np.abs(ev).max()


def test_results_keep_structure_and_dtype_and_jit_compiles_once():
    net, params, x, y, loss = _small_problem(0)
    params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    x32 = x.astype(jnp.float32)
    traces = []

    @jax.jit
    def everything(p, v, key):
        traces.append(1)
        return (cv.hvp(net, p, x32, y, loss, v), cv.ggn_vp(net, p, x32, y, loss, v, 0.1),
                cv.ggn_diag(net, p, x32, y, loss), cv.ggn_diag_mc(net, p, x32, y, loss, key=key, samples=2))

    for i in range(3):
        outs = everything(params32, params32, jax.random.PRNGKey(i))
    assert len(traces) == 1
    for out in outs:
        assert jax.tree.structure(out) == jax.tree.structure(params32)
        pairs = zip(jax.tree.leaves(out), jax.tree.leaves(params32))
        assert all(a.dtype == jnp.float32 and a.shape == p.shape for a, p in pairs)
    assert all(np.all(np.asarray(leaf) >= 0) for leaf in jax.tree.leaves(outs[2]))  # a GGN diagonal is ≥ 0


def test_bad_input():
    net, params, x, y, loss = _small_problem(0)
    with pytest.raises(ValueError, match="reads probabilities"):
        cv.hvp(net, params, x, y, LOSSES["categorical_cross_entropy"], params)
    own = fnn.Loss("my_mse", "regression", lambda a, t: jnp.sum((a - t) ** 2, -1), lambda a, t: 2 * (a - t))
    with pytest.raises(ValueError, match="second derivative.*my_mse"):
        cv.ggn_diag(net, params, x, jnp.zeros((6, 3)), own)
    with pytest.raises(ValueError, match="v must be a list of 2 layers"):
        cv.hvp(net, params, x, y, loss, params[:1])
    with pytest.raises(ValueError, match=r"samples \(columns drawn per example\) must be > 0"):
        cv.ggn_diag_mc(net, params, x, y, loss, key=jax.random.PRNGKey(0), samples=0)
    with pytest.raises(ValueError, match="matrix must be"):
        cv.sharpness(net, params, x, y, loss, matrix="fisher")
    bn = fnn.MLP((3, 4, 3), "tanh", "identity", batch_norm=True)
    p, s = bn.init(jax.random.PRNGKey(0), jnp.float64), bn.init_state(jnp.float64)
    with pytest.raises(ValueError, match="train mode.*train=False"):
        cv.ggn_vp(bn, p, x, y, loss, p, state=s, train=True)
    with pytest.raises(ValueError, match="batch norm"):
        cv.kronecker_factors(bn, p, x, y, loss)


@settings(max_examples=6, deadline=None)
@given(width=st.sampled_from([1, 7, cv.GRAM_BLOCK, cv.GRAM_BLOCK + 1, 2 * cv.GRAM_BLOCK + 17, 3 * cv.GRAM_BLOCK + 2]),
       rows=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_gram_equals_the_dense_product_and_is_symmetric(width, rows, seed):
    """aᵀa from the upper blocks, mirrored, against NumPy's float64 product; exactly symmetric."""
    a = np.random.default_rng(seed).normal(size=(rows, width))
    got = np.asarray(cv.gram(fnn.MLP((2, 2)), jnp.asarray(a)))
    assert got.shape == (width, width) and np.array_equal(got, got.T)
    assert rel_err(got, a.T @ a) <= 1e-12


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 13), size=st.integers(1, 16), keyed=st.booleans())
def test_sum_over_chunks_visits_every_row_once_in_order(n, size, keyed):
    """Σ over the chunks of a per-chunk sum, against NumPy; each chunk gets its own key, in order."""
    x = np.arange(n * 2, dtype=np.float64).reshape(n, 2) ** 1.5
    y = np.arange(n)
    chunks = -(-n // min(size, n))
    keys = jax.random.split(jax.random.PRNGKey(n), chunks) if keyed else None

    def part(xc, yc, key):  # "k": the chunk's key times (its first row + 1), so a key given to another chunk shows
        k = jnp.zeros(()) if key is None else jax.random.uniform(key, dtype=jnp.float64) * (yc[0] + 1)
        return {"x": jnp.sum(xc, axis=0), "rows": jnp.asarray(xc.shape[0]), "y2": jnp.sum(yc ** 2), "k": k}

    got = jax.jit(lambda x, y, k: cv.sum_over_chunks(part, size, x, y, k))(jnp.asarray(x), jnp.asarray(y), keys)
    assert rel_err(got["x"], x.sum(axis=0)) <= 1e-15 and int(got["rows"]) == n and int(got["y2"]) == (y ** 2).sum()
    step = min(size, n)
    want = sum(float(jax.random.uniform(keys[i], dtype=jnp.float64)) * (i * step + 1) for i in range(chunks)) \
        if keyed else 0.0
    assert abs(float(got["k"]) - want) <= 1e-12


def test_gram_and_sum_over_chunks_refuse_bad_input():
    with pytest.raises(ValueError, match="matrix"):
        cv.gram(fnn.MLP((2, 2)), jnp.ones(3))
    x, y = jnp.ones((5, 2)), jnp.arange(5)

    def part(xc, yc, key):
        return jnp.sum(xc)

    for size in (0, -1, 1.5):
        with pytest.raises((ValueError, TypeError), match="size"):
            cv.sum_over_chunks(part, size, x, y)
    with pytest.raises(ValueError, match="same, non-zero number of rows"):
        cv.sum_over_chunks(part, 2, x, y[:4])
    with pytest.raises(ValueError, match="same, non-zero number of rows"):
        cv.sum_over_chunks(part, 2, x[:0], y[:0])
    with pytest.raises(ValueError, match="one key per chunk"):
        cv.sum_over_chunks(part, 2, x, y, jax.random.split(jax.random.PRNGKey(0), 2))
    assert float(cv.sum_over_chunks(part, 2, x, y, jax.random.split(jax.random.PRNGKey(0), 3))) == 10.0
