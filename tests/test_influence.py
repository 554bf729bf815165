"""fnn.influence against materialized per-example gradients (jax.vmap(jax.grad)), dense curvature matrices
(jax.jacfwd/jax.hessian, numpy.linalg.solve) and numpy.argsort; float64 unless said otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from test_curvature import _explicit_ggn
from test_no_autodiff import trap_autodiff  # noqa: F401 (a fixture)
from test_second_order import _problem as _random_problem

import fnn
from fnn import checkpoint
from fnn import influence as inf
from fnn.losses import LOSSES

from helpers import rel_err

# every loss the influence functions accept (all but mae), on an output it reads
PAIRS = [("binary_cross_entropy", "sigmoid"), ("binary_cross_entropy", "softmax"),
         ("binary_cross_entropy_with_logits", "identity"), ("categorical_cross_entropy", "softmax"),
         ("categorical_cross_entropy", "sigmoid"), ("half_mse", "identity"), ("mse", "tanh"),
         ("softmax_cross_entropy", "identity")]
N_TRAIN, N_TEST = 9, 4


def _problem(loss_name="softmax_cross_entropy", output="identity", sizes=(3, 4, 2), seed=0, dtype=jnp.float64):
    net, params, x, y, loss = _random_problem(loss_name, sizes, N_TRAIN + N_TEST, seed, "tanh", output)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    x = x.astype(dtype)
    if jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(dtype)
    return net, params, (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:]), loss


def _grads(net, params, data, loss, l2=0.0):
    """Every sample's gradient of ``C_x + ½β Σ‖W‖²``, materialized ``(N, P)`` in ravel_pytree order."""
    flat, unravel = ravel_pytree(params)
    x, y = data

    def cost(theta, xi, yi):
        p = unravel(theta)
        return loss(net.apply(p, xi[None]), yi[None]) + 0.5 * l2 * sum(jnp.sum(layer["W"] ** 2) for layer in p)

    return np.asarray(jax.jit(jax.vmap(jax.grad(cost), (None, 0, 0)))(flat, x, y))


def _hessian(net, params, data, loss, l2):
    flat, unravel = ravel_pytree(params)
    x, y = data
    return np.asarray(jax.jit(jax.hessian(lambda t: fnn.objective(net, unravel(t), x, y, loss, l2)))(flat))


def _ggn(net, params, data, loss, l2):
    """test_curvature's explicit ``(G, J, H)`` (jax.jacfwd, jax.hessian), compiled as one program."""
    return [np.asarray(t) for t in jax.jit(lambda p, x, y: _explicit_ggn(net, p, x, y, loss, l2))(params, *data)]


def _wbar_index(params):
    """Per layer the flat (ravel_pytree) index of every entry of ``W̄ = [W | b]``, row-major."""
    index = ravel_pytree(jax.tree.map(lambda p: jnp.zeros(p.shape), params))[1](
        jnp.arange(sum(p.size for p in jax.tree.leaves(params)), dtype=jnp.float64))
    return [np.concatenate([np.asarray(i["W"], int), np.asarray(i["b"], int)[:, None]], axis=1).ravel()
            for i in index]


def _kron_dense(pre, net, params, train, loss, refit):
    """The block-diagonal ``M`` of "kfac"/"ekfac" formed densely: ``A`` from the activations, ``G^l`` the
    Gauss-Newton block of ``b^l`` of the explicit GGN; ``Q = Q_G ⊗ Q_A`` the preconditioner's eigenvectors,
    checked here to diagonalize those factors; EK-FAC's eigenvalues ``diag(Qᵀ G_W̄ Q)`` of the explicit
    GGN's block of ``W̄``."""
    x, y = train
    n = x.shape[0]
    ggn = _ggn(net, params, train, loss, 0.0)[0]
    acts = net.forward_trace(params, x).acts
    size = ggn.shape[0]
    M = np.zeros((size, size))
    for l, (where, (qg, qa, _)) in enumerate(zip(_wbar_index(params), pre.layers)):
        abar = np.hstack([np.asarray(acts[l]), np.ones((n, 1))])
        A = abar.T @ abar / n
        bias = where.reshape(-1, abar.shape[1])[:, -1]
        G = ggn[np.ix_(bias, bias)]
        qg, qa = np.asarray(qg), np.asarray(qa)
        for q, f in ((qa, A), (qg, G)):
            rot = q.T @ f @ q
            assert np.abs(rot - np.diag(np.diag(rot))).max() <= 1e-12 * max(1, np.abs(f).max())
        Q = np.kron(qg, qa)
        if refit:
            lam = np.diag(Q.T @ ggn[np.ix_(where, where)] @ Q)
        else:
            lam = np.kron(np.clip(np.diag(qg.T @ G @ qg), 0, None), np.clip(np.diag(qa.T @ A @ qa), 0, None))
        M[np.ix_(where, where)] = (Q * (lam + pre.damping + pre.l2)) @ Q.T
    return M


def test_every_accepted_loss_is_covered():
    assert sorted({name for name, _ in PAIRS}) == sorted(set(LOSSES) - {"mae"})
    assert all(output in (LOSSES[name].outputs or {output}) for name, output in PAIRS)


@pytest.mark.parametrize("loss_name, output", PAIRS + [("mae", "identity")])
def test_inner_products_and_tracin_equal_materialized_gradients(loss_name, output):
    """⟨g_i, g_j⟩ with the L2 term, the cosines, TracIn (without it) and its self-influence (with), against
    gradients from jax.vmap(jax.grad) of the per-sample cost, to 1e-10."""
    net, params, train, test, loss = _problem(loss_name, output)
    l2 = 0.3
    g_te, g_tr = _grads(net, params, test, loss, l2), _grads(net, params, train, loss, l2)
    dots = g_te @ g_tr.T
    got = inf.gradient_inner_products(net, params, test, train, loss, l2=l2)
    assert got.shape == (N_TEST, N_TRAIN) and rel_err(got, dots) <= 1e-10
    rows = [jax.jit(inf.gradient_rows, static_argnums=(0, 4))(net, params, *d, loss) for d in (test, train)]
    plain = _grads(net, params, train, loss)  # without L2, the gradient of W̄ = [W | b] is δ_x ā_xᵀ
    for where, (d, a) in zip(_wbar_index(params), rows[1].layers):
        assert rel_err(np.einsum("bi,bj->bij", d, a).reshape(len(d), -1), plain[:, where]) <= 1e-10
    assert rel_err(inf.rows_inner_products(*rows, params, l2), dots) <= 1e-10  # the building blocks, public
    cos = dots / np.outer(np.linalg.norm(g_te, axis=1), np.linalg.norm(g_tr, axis=1))
    assert rel_err(inf.gradient_inner_products(net, params, test, train, loss, l2=l2, cosine=True), cos) <= 1e-10
    other = jax.tree.map(lambda p: 0.8 * p, params)
    rates = [0.1, 0.03]
    expect = sum(r * _grads(net, p, test, loss) @ _grads(net, p, train, loss).T for r, p in zip(rates, [params, other]))
    assert rel_err(inf.tracin(net, [params, other], rates, train, test, loss), expect) <= 1e-10
    expect = sum(r * np.sum(_grads(net, p, train, loss, 0.2) ** 2, axis=1) for r, p in zip(rates, [params, other]))
    assert rel_err(inf.tracin_self(net, [params, other], rates, train, loss, l2=0.2), expect) <= 1e-10


@settings(max_examples=3)
@given(data=st.data())
def test_inner_products_on_random_networks(data):
    """Depth, widths, hidden activations, sizes of the two sets, β and the block drawn at random (from a few
    shapes each: every new shape is a compilation)."""
    sizes = data.draw(st.sampled_from([(2, 1), (3, 4, 2), (2, 3, 1, 2)]), label="sizes")
    act = data.draw(st.sampled_from(["relu", "sigmoid"]), label="hidden")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    l2 = data.draw(st.sampled_from([0.0, 0.7]), label="l2")
    na, nb = (data.draw(st.integers(1, 4), label=k) for k in ("N_a", "N_b"))
    block = data.draw(st.sampled_from([2, 4]), label="block")
    net, params, x, y, loss = _random_problem("half_mse", sizes, na + nb, seed, act, "identity")
    a, b = (x[:na], y[:na]), (x[na:], y[na:])
    expect = _grads(net, params, a, loss, l2) @ _grads(net, params, b, loss, l2).T
    assert rel_err(inf.gradient_inner_products(net, params, a, b, loss, l2=l2, block=block), expect) <= 1e-10


@pytest.mark.parametrize("loss_name, output", PAIRS)
def test_influence_against_dense_matrices(loss_name, output):
    """"cg" against numpy.linalg.solve with the explicit damped GGN (G + βI_W + λI); "kfac" and "ekfac"
    against their block-diagonal matrices formed densely (:func:`_kron_dense`); self-influence as the
    diagonal ⟨g_z, M⁻¹ g_z⟩; the loss gradients (no L2 term) on both sides."""
    net, params, train, test, loss = _problem(loss_name, output)
    g_te, g_tr = _grads(net, params, test, loss), _grads(net, params, train, loss)
    lam, l2 = 0.3, 0.05
    pre = inf.preconditioner(net, params, train, loss, method="cg", damping=lam, l2=l2, cg_iters=80)
    G = _ggn(net, params, train, loss, l2)[0]
    M = G + lam * np.eye(G.shape[0])
    assert rel_err(inf.influence(pre, test), -g_te @ np.linalg.solve(M, g_tr.T)) <= 1e-9
    assert rel_err(inf.self_influence(pre), np.einsum("np,np->n", g_tr, np.linalg.solve(M, g_tr.T).T)) <= 1e-9
    for method in ("kfac", "ekfac"):
        pre = inf.preconditioner(net, params, train, loss, method=method, damping=lam, l2=l2)
        M = _kron_dense(pre, net, params, train, loss, method == "ekfac")
        assert rel_err(inf.influence(pre, test), -g_te @ np.linalg.solve(M, g_tr.T)) <= 1e-10, method
        expect = np.einsum("np,np->n", g_tr, np.linalg.solve(M, g_tr.T).T)
        assert rel_err(inf.self_influence(pre), expect) <= 1e-10, method


def test_cg_influence_on_hundreds_of_rows_against_a_dense_solve():
    """A float32 regression case where XLA:CPU (jaxlib 0.10) compiled CG's first product with a
    literal zero start to NaN (every score NaN from a few hundred rows on): the scores against
    numpy.linalg.solve with G = Σ_x J_xᵀ H_x J_x / N in float64 (J from jax.jacrev, H_x = diag(p) − ppᵀ)."""
    net = fnn.MLP((64, 32, 10), "tanh", "identity")
    params = net.init(jax.random.PRNGKey(3), jnp.float32)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(512, 64)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 512))
    lam = 1.0
    pre = inf.preconditioner(net, params, (x, y), "softmax_cross_entropy", method="cg", damping=lam, cg_iters=60)
    got = inf.influence(pre, (x[:3], y[:3]))
    p64 = jax.tree.map(lambda t: t.astype(jnp.float64), params)
    flat, unravel = ravel_pytree(p64)
    x64 = x.astype(jnp.float64)
    J = np.asarray(jax.vmap(jax.jacrev(lambda f, xi: net.apply(unravel(f), xi[None])[0]), (None, 0))(flat, x64))
    prob = np.asarray(jax.nn.softmax(net.apply(p64, x64)))
    HJ = prob[:, :, None] * J - prob[:, :, None] * np.einsum("nk,nkp->np", prob, J)[:, None, :]
    G = J.reshape(-1, J.shape[-1]).T @ HJ.reshape(-1, J.shape[-1]) / x.shape[0]
    g = np.asarray(_grads(net, p64, (x64, y), fnn.losses.softmax_cross_entropy))
    want = -g[:3] @ np.linalg.solve(G + lam * np.eye(G.shape[0]), g.T)
    assert np.all(np.isfinite(got)) and rel_err(got, want) <= 1e-5


def test_cg_with_the_hessian():
    """matrix="hessian": −g_testᵀ (H + λI)⁻¹ g_z with H = jax.hessian of the training cost (L2 included)."""
    net, params, train, test, loss = _problem("categorical_cross_entropy", "softmax")
    l2 = 0.1
    H = _hessian(net, params, train, loss, l2)
    lam = max(0.0, -np.linalg.eigvalsh(H).min()) + 0.5
    pre = inf.preconditioner(net, params, train, loss, method="cg", damping=lam, l2=l2, matrix="hessian", cg_iters=80)
    g_te, g_tr = _grads(net, params, test, loss), _grads(net, params, train, loss)
    expect = -g_te @ np.linalg.solve(H + lam * np.eye(H.shape[0]), g_tr.T)
    assert rel_err(inf.influence(pre, test, train), expect) <= 1e-9


def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_eigenbasis():
    """Λ_ij = (1/N) Σ_x Σ_c ((Q_Gᵀ Δ_{x,c})_i)² ((Q_Aᵀ ā_x)_j)², with the columns J_xᵀ s_c materialized
    here from jax.jacfwd and a square root of jax.hessian's H_x (its eigendecomposition), projected into
    Q_G ⊗ Q_A; the sampled-column variant converges to it."""
    net, params, train, test, loss = _problem("categorical_cross_entropy", "softmax")
    pre = inf.preconditioner(net, params, train, loss, method="ekfac", damping=0.5)
    _, J, H = _ggn(net, params, train, loss, 0.0)
    w, v = np.linalg.eigh(np.asarray(H))
    S = v * np.sqrt(np.clip(w, 0, None))[:, None, :]  # H_x = S_x S_xᵀ
    cols = np.einsum("nkp,nkc->ncp", np.asarray(J), S)  # (N, C, P)
    for where, (qg, qa, lam) in zip(_wbar_index(params), pre.layers):
        Q = np.kron(np.asarray(qg), np.asarray(qa))
        expect = np.mean(np.sum((cols[:, :, where] @ Q) ** 2, axis=1), axis=0)
        assert rel_err(np.asarray(lam).ravel() - 0.5, expect) <= 1e-10
    sampled = inf.preconditioner(net, params, train, loss, method="ekfac", damping=0.5, key=3, samples=2000)
    for (_, _, exact), (_, _, mc) in zip(pre.layers, sampled.layers):
        assert rel_err(mc, exact) <= 0.1


def test_block_size_does_not_matter():
    net, params, train, test, loss = _problem()
    for fn in (lambda b: inf.gradient_inner_products(net, params, test, train, loss, l2=0.1, block=b),
               lambda b: inf.influence(inf.preconditioner(net, params, train, loss, method="ekfac", damping=0.1,
                                                          block=b), test, block=b),
               lambda b: inf.tracin_self(net, [params], [0.5], train, loss, block=b)):
        ref = fn(1000)
        for b in (1, 3):
            assert rel_err(fn(b), ref) <= 1e-13


def test_float32_agrees_with_float64_to_rounding():
    """Float32 results within float32 rounding of float64 (CG: of the conditioning it sees, ~κ·ε)."""
    out = {}
    for dtype in (jnp.float64, jnp.float32):
        net, params, train, test, loss = _problem(dtype=dtype)
        res = [inf.gradient_inner_products(net, params, test, train, loss, l2=0.1, cosine=True),
               inf.tracin(net, [params], [0.1], train, test, loss)]
        for method in inf.METHODS:
            pre = inf.preconditioner(net, params, train, loss, method=method, damping=0.3, cg_iters=40)
            res += [inf.influence(pre, test), inf.self_influence(pre)]
        assert all(r.dtype == dtype for r in res)
        out[dtype] = res
    for r32, r64 in zip(out[jnp.float32], out[jnp.float64]):
        assert rel_err(r32, r64) <= 2e-4


def test_top_k_against_argsort():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 40))
    r = inf.top_k(scores, 3)
    order = np.argsort(scores, axis=1)
    np.testing.assert_array_equal(r.helpful, order[:, ::-1][:, :3])
    np.testing.assert_array_equal(r.harmful, order[:, :3])
    np.testing.assert_array_equal(r.helpful_scores, np.take_along_axis(scores, r.helpful, 1))
    streamed = inf.top_k((scores[:, s:s + 7] for s in range(0, 40, 7)), 3)
    for a, b in zip(streamed, r):
        np.testing.assert_array_equal(a, b)
    low = inf.top_k(scores, 40, helpful="low")
    np.testing.assert_array_equal(low.helpful, order)
    net, params, train, test, loss = _problem()
    pre = inf.preconditioner(net, params, train, loss, method="kfac", damping=0.2)
    full = inf.influence(pre, test)
    ranked = inf.influence(pre, test, top=2, block=4)
    np.testing.assert_array_equal(ranked.helpful, np.argsort(full, axis=1)[:, :2])  # negative I: helpful
    np.testing.assert_array_equal(ranked.harmful, np.argsort(full, axis=1)[:, ::-1][:, :2])
    ranked = inf.tracin(net, [params], [1.0], train, test, loss, top=2, block=4)
    np.testing.assert_array_equal(ranked.helpful, np.argsort(-inf.tracin(net, [params], [1.0], train, test, loss),
                                                             axis=1)[:, :2])


def test_checkpoint_trajectory(tmp_path):
    """θ_t and η_t from a directory of self-describing checkpoints: a constant rate from the stored optimizer,
    a schedule's rate at the step before each checkpoint from the optimizer passed in."""
    net, params, train, test, loss = _problem()
    key = jax.random.PRNGKey(0)
    for name, opt in (("constant", fnn.optim.sgd(0.05)), ("schedule", fnn.optim.sgd(fnn.schedules.step_decay(
            0.1, 0.5, 2)))):
        state, ps = opt.init(params), []
        for epoch in range(3):
            ps.append(params)
            checkpoint.save(checkpoint.path_for(tmp_path / name, epoch), params=params, opt_state=state, key=key,
                            epoch=epoch, net=net, opt=opt)
            _, grads = fnn.backprop(net, params, *train, loss)
            for _ in range(2):
                updates, state = opt.update(grads, state, params)
                params = jax.tree.map(jnp.add, params, updates)
        if name == "constant":
            run = inf.checkpoint_trajectory(tmp_path / name)
            np.testing.assert_allclose(run.learning_rates, [0.05] * 3)
        else:
            with pytest.raises(ValueError, match="pass opt="):
                inf.checkpoint_trajectory(tmp_path / name)
            run = inf.checkpoint_trajectory(tmp_path / name, opt=opt)
            np.testing.assert_allclose(run.learning_rates, [0.1, 0.1, 0.05])  # α_t at t = max(0, −1), 1, 3
            with pytest.raises(ValueError, match="one rate per checkpoint"):
                inf.checkpoint_trajectory(tmp_path / name, opt=opt, learning_rates=[1.0])
        assert run.net == net and run.epochs == [0, 1, 2]
        for got, want in zip(run.params, ps):
            assert rel_err(ravel_pytree(got)[0], ravel_pytree(want)[0]) == 0
        inf.tracin(run.net, run.params, run.learning_rates, train, test, loss)
    with pytest.raises(ValueError, match="no checkpoints"):
        inf.checkpoint_trajectory(tmp_path / "missing")


def test_bad_inputs_are_refused():
    net, params, train, test, loss = _problem()
    x, y = train
    with pytest.raises(ValueError, match="batch norm"):
        bn = fnn.MLP((3, 4, 2), "tanh", batch_norm=True)
        inf.gradient_inner_products(bn, bn.init(jax.random.PRNGKey(0)), train, train, loss)
    with pytest.raises(ValueError, match="features"):
        inf.gradient_inner_products(net, params, (x[:, :2], y), train, loss)
    with pytest.raises(ValueError, match="empty"):
        inf.gradient_inner_products(net, params, (x[:0], y[:0]), train, loss)
    with pytest.raises(ValueError, match="labels must lie"):
        inf.tracin_self(net, [params], [1.0], (x, y + 5), loss)
    with pytest.raises(ValueError, match="targets have"):
        inf.tracin_self(net, [params], [1.0], (x, y[:3]), loss)
    with pytest.raises(TypeError, match="pair"):
        inf.gradient_inner_products(net, params, x, train, loss)
    with pytest.raises(ValueError, match="layers"):
        inf.gradient_inner_products(net, params[:1], train, train, loss)
    other = fnn.MLP((3, 5, 2)).init(jax.random.PRNGKey(0), jnp.float64)
    with pytest.raises(ValueError):
        inf.tracin(net, [params, other], [1.0, 1.0], train, test, loss)
    with pytest.raises(ValueError, match="one rate per checkpoint"):
        inf.tracin(net, [params], [1.0, 2.0], train, test, loss)
    with pytest.raises(ValueError, match="≥ 0"):
        inf.tracin_self(net, [params], [-1.0], train, loss)
    with pytest.raises(ValueError, match="non-empty"):
        inf.tracin_self(net, [], [], train, loss)
    with pytest.raises(ValueError, match="damping"):
        inf.preconditioner(net, params, train, loss, damping=0.0)
    with pytest.raises(ValueError, match="method"):
        inf.preconditioner(net, params, train, loss, method="lissa", damping=1.0)
    with pytest.raises(ValueError, match="matrix"):
        inf.preconditioner(net, params, train, loss, method="ekfac", damping=1.0, matrix="hessian")
    with pytest.raises(ValueError, match="mae has none"):
        inf.preconditioner(net, params, (x, jax.nn.one_hot(y, 2, dtype=x.dtype)), "mae", damping=1.0)
    with pytest.raises(ValueError, match="block"):
        inf.gradient_inner_products(net, params, train, train, loss, block=0)
    with pytest.raises(TypeError, match="Preconditioner"):
        inf.influence((net, params), test)
    with pytest.raises(ValueError, match="k ≤ N_train"):
        inf.top_k(np.zeros((2, 3)), 4)
    with pytest.raises(ValueError, match="helpful"):
        inf.top_k(np.zeros((2, 3)), 1, helpful="up")
    with pytest.raises(ValueError, match="2-d"):
        inf.top_k(np.zeros(3), 1)


def test_the_public_block_functions_refuse_bad_input():
    net, params, train, test, loss = _problem()
    x, y = train
    with pytest.raises(ValueError, match="batch norm"):
        bn = fnn.MLP((3, 4, 2), "tanh", batch_norm=True)
        inf.gradient_rows(bn, bn.init(jax.random.PRNGKey(0)), x, y, loss)
    with pytest.raises(ValueError, match="empty"):
        inf.gradient_rows(net, params, x[:0], y[:0], loss)
    with pytest.raises(ValueError, match="one target per row"):
        inf.gradient_rows(net, params, x, y[:3], loss)
    with pytest.raises(ValueError, match="features"):
        inf.gradient_rows(net, params, x[:, :2], y, loss)
    other = fnn.MLP((3, 5, 2)).init(jax.random.PRNGKey(0), jnp.float64)
    with pytest.raises(ValueError):
        inf.gradient_rows(net, other, x, y, loss)
    rows = inf.gradient_rows(net, params, x, y, loss)
    with pytest.raises(ValueError, match="same network"):
        inf.rows_inner_products(rows, rows, other)
    with pytest.raises(TypeError, match="Rows of gradient_rows"):
        inf.rows_inner_products(rows, (rows.layers, rows.cross), params)
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="l2"):
            inf.rows_inner_products(rows, rows, params, bad)


@pytest.mark.parametrize("where", ["x", "targets", "params"])
def test_non_finite_inputs_are_refused_by_every_entry_point(where):
    """NaN or inf in the data or the params would give NaN scores (or, through a ReLU, finite wrong ones):
    every entry point refuses them, naming what is not finite and where."""
    net, params, train, test, loss = _problem("mse")  # float targets, which can hold a NaN
    (x, y), good = train, params
    where_first = r"has non-finite values in 1 sample\(s\) \(the first is sample {}\)"
    if where == "x":
        train, match = (x.at[2, 1].set(jnp.nan), y), "x " + where_first.format(2)
    elif where == "targets":
        train, match = (x, y.at[4, 0].set(jnp.nan)), "targets " + where_first.format(4)
    else:
        params = [dict(layer) for layer in params]
        params[-1]["b"] = params[-1]["b"].at[0].set(jnp.inf)
        match = r"params.*: non-finite values in layer 2 b; .*converged"
    calls = [lambda: inf.gradient_inner_products(net, params, test, train, loss),
             lambda: inf.gradient_inner_products(net, params, train, test, loss),
             lambda: inf.tracin(net, [good, params], [1.0, 1.0], train, test, loss),
             lambda: inf.tracin(net, [good, params], [1.0, 1.0], test, train, loss),
             lambda: inf.tracin_self(net, [good, params], [1.0, 1.0], train, loss)]
    calls += [lambda: inf.preconditioner(net, params, train, loss, method=m, damping=1.0) for m in inf.METHODS]
    if where != "params":  # a finite preconditioner, then non-finite points to score
        pre = inf.preconditioner(net, good, (x, y), loss, method="kfac", damping=1.0)
        calls += [lambda: inf.influence(pre, train), lambda: inf.influence(pre, test, train),
                  lambda: inf.self_influence(pre, train)]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


def test_runs_without_autodiff(trap_autodiff):  # noqa: F811 (the fixture)
    """Traced under the trap (shapes no other test uses, so nothing comes from jit's cache)."""
    net, params, x, y, loss = _random_problem("softmax_cross_entropy", (2, 3, 3), 7, 1, "tanh", "identity")
    train, test = (x[:6], y[:6]), (x[6:], y[6:])
    inf.gradient_inner_products(net, params, test, train, loss, l2=0.1, cosine=True)
    inf.tracin_self(net, [params], [1.0], train, loss)
    for method in inf.METHODS:
        pre = inf.preconditioner(net, params, train, loss, method=method, damping=0.3, cg_iters=3)
        inf.influence(pre, test)
        inf.self_influence(pre)
