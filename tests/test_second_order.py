"""fnn.second_order (K-FAC, Hessian-free) against explicit matrices, numpy.linalg.solve and least squares."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_curvature import _explicit_ggn

import fnn
from fnn import second_order as so
from fnn.losses import LOSSES

from helpers import rel_err


def _problem(loss_name="mse", sizes=(3, 4, 2), n=12, seed=0, act="tanh", output="identity"):
    rng = np.random.default_rng(seed)
    net = fnn.MLP(sizes, act, output)
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.3, p.shape), net.init(jax.random.PRNGKey(seed), jnp.float64))
    x = jnp.asarray(rng.normal(size=(n, sizes[0])))
    loss = LOSSES[loss_name]
    if loss.targets == "classes":
        y = jnp.asarray(rng.integers(0, sizes[-1], n))
    elif loss.targets == "binary":
        y = jnp.asarray(rng.integers(0, 2, (n, sizes[-1])).astype(np.float64))
    else:
        y = jnp.asarray(rng.normal(size=(n, sizes[-1])))
    return net, params, x, y, loss


def _bar(layer):
    return np.concatenate([np.asarray(layer["W"]), np.asarray(layer["b"])[:, None]], axis=1)


# Every loss the second-order optimizers accept (all but mae, refused: see test_every_accepted_loss_is_covered),
# each on an output it reads; the tests below run each as a case of its own.
KFAC_LOSSES = [("binary_cross_entropy", "sigmoid"), ("binary_cross_entropy_with_logits", "identity"),
               ("categorical_cross_entropy", "softmax"), ("half_mse", "identity"), ("mse", "identity"),
               ("softmax_cross_entropy", "identity")]
HF_LOSSES = [("binary_cross_entropy", "softmax"), ("binary_cross_entropy_with_logits", "identity"),
             ("categorical_cross_entropy", "sigmoid"), ("half_mse", "tanh"), ("mse", "sigmoid"),
             ("softmax_cross_entropy", "identity")]
SINGULAR = {"categorical_cross_entropy", "softmax_cross_entropy"}  # H_x = diag p − p pᵀ: G^L needs damping


def test_every_accepted_loss_is_covered():
    for cases in (KFAC_LOSSES, HF_LOSSES):
        assert sorted(name for name, _ in cases) == sorted(set(LOSSES) - {"mae"})
        assert all(output in (LOSSES[name].outputs or {output}) for name, output in cases)
    net = fnn.MLP((3, 4, 2), "tanh", "identity")
    for make in (so.kfac, so.hessian_free):
        with pytest.raises(ValueError, match="mae has none"):
            make(net, "mae")


def _kfac_direction(net, params, x, grads, G_full, damping):
    """Per layer ``(G_d ⊗ A_d)⁻¹ vec(∇W̄^l)`` (row-major ``[W | b]``) with the damped factors
    ``A + π√γ I``, ``G + (√γ/π) I`` formed here from the factors' definition (``A`` from the activations,
    ``G^l`` the Gauss-Newton block of ``b^l`` in ``G_full``) and solved by numpy: ``[W | b]`` per layer."""
    acts = net.forward_trace(params, x).acts
    index = ravel_pytree(jax.tree.map(lambda p: jnp.zeros(p.shape), params))[1](
        jnp.arange(sum(p.size for p in jax.tree.leaves(params)), dtype=jnp.float64))
    out = []
    for l in range(net.num_layers):
        abar = np.concatenate([np.asarray(acts[l]), np.ones((x.shape[0], 1))], axis=1)
        A = abar.T @ abar / x.shape[0]
        b = np.asarray(index[l]["b"], int)
        G = np.asarray(G_full)[np.ix_(b, b)]  # G^l is the Gauss-Newton block of the bias
        pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
        Ad = A + pi * np.sqrt(damping) * np.eye(A.shape[0])
        Gd = G + np.sqrt(damping) / pi * np.eye(G.shape[0])
        out.append(np.linalg.solve(np.kron(Gd, Ad), _bar(grads[l]).ravel()).reshape(_bar(grads[l]).shape))
    return out


@pytest.mark.parametrize("damping, loss_name, output", [
    (damping, name, output) for damping in (0.0, 0.3) for name, output in KFAC_LOSSES
    if damping > 0 or name not in SINGULAR])
def test_kfac_update_is_the_kronecker_solve(damping, loss_name, output):
    """Exact factors, no averaging: u^l = −α (G_d ⊗ A_d)⁻¹ vec(∇W̄^l) (row-major [W | b]) with the damped
    factors A + π√γ I, G + (√γ/π) I formed here from the factors' definition, and solved by numpy."""
    net, params, x, y, loss = _problem(loss_name, output=output)
    opt = so.kfac(net, loss, learning_rate=0.5, damping=damping, decay=0.0, refresh=1, exact=True)
    _, grads = fnn.backprop(net, params, x, y, loss)
    updates, _ = opt.update(grads, opt.init(params), params, (x, y))
    G_full, _, _ = _explicit_ggn(net, params, x, y, loss, 0.0)
    for l, direction in enumerate(_kfac_direction(net, params, x, grads, G_full, damping)):
        assert rel_err(_bar(updates[l]), -0.5 * direction) <= 1e-9, f"layer {l}"


@pytest.mark.parametrize("learning_rate", [100.0, 1e-3], ids=["model", "cap"])
def test_kfac_rescaled_step_minimizes_the_damped_quadratic_model(learning_rate):
    """``rescale=True``: the update is ``−α Δ`` along K-FAC's direction ``Δ`` (the Kronecker solve of
    :func:`_kfac_direction`), ``α = min(learning rate, α*)`` with ``α* = ∇Cᵀ Δ / (Δᵀ G Δ + γ‖Δ‖²)`` the
    minimizer of the damped quadratic model (Martens & Grosse §6.4), ``G`` the explicit Gauss-Newton matrix
    with the L2 term ``βI`` on the weights. With a learning rate of 100 the model sets the step, with 1e-3
    the cap does. Catches the mutants kfac-model-without-damping (the model's γ‖Δ‖² left out) and
    kfac-step-length-not-capped (the cap taken as a floor)."""
    damping, l2 = 0.3, 0.01
    net, params, x, y, loss = _problem("softmax_cross_entropy", output="identity")
    opt = so.kfac(net, loss, learning_rate=learning_rate, damping=damping, decay=0.0, refresh=1, exact=True,
                  rescale=True, l2=l2)
    _, grads = fnn.backprop(net, params, x, y, loss, l2)
    updates, _ = opt.update(grads, opt.init(params), params, (x, y))
    G_data, _, _ = _explicit_ggn(net, params, x, y, loss, 0.0)  # the factors leave the L2 term out
    bars = _kfac_direction(net, params, x, grads, G_data, damping)
    delta = np.asarray(ravel_pytree([{"W": d[:, :-1], "b": d[:, -1]} for d in bars])[0])
    G, _, _ = _explicit_ggn(net, params, x, y, loss, l2)
    g = np.asarray(ravel_pytree(grads)[0])
    best = (g @ delta) / (delta @ np.asarray(G) @ delta + damping * delta @ delta)
    assert (best < learning_rate) == (learning_rate == 100.0)  # the regime each case is about
    expect = -min(learning_rate, best) * delta
    assert rel_err(ravel_pytree(updates)[0], expect) <= 1e-9


def test_kfac_draws_new_columns_at_every_step():
    """KFAC (``exact=False``) samples ``G^l``'s columns with a key it advances: two steps at the same
    params and batch (decay 0: each step's factors are its own) give the same ``A`` and different ``G``,
    and the state's key moves on at each step. KFLR (``exact=True``) gives the same ``G`` both times.
    Catches the mutants kfac-sampling-key-not-advanced and kflr-sampled."""
    net, params, x, y, loss = _problem("softmax_cross_entropy", output="identity")
    _, grads = fnn.backprop(net, params, x, y, loss)
    for exact in (False, True):
        opt = so.kfac(net, loss, learning_rate=0.1, damping=1e-2, decay=0.0, refresh=1, exact=exact, seed=5)
        states = [opt.init(params)]
        for _ in range(2):
            states.append(opt.update(grads, states[-1], params, (x, y))[1])
        first, second = states[1:]
        assert all(np.array_equal(a, b) for a, b in zip(first.A, second.A))
        assert all(np.array_equal(a, b) for a, b in zip(first.G, second.G)) == exact, f"exact={exact}"
        keys = [np.asarray(s.key) for s in states]
        assert not np.array_equal(keys[0], keys[1]) and not np.array_equal(keys[1], keys[2])


def test_kfac_running_averages_and_refresh_period():
    net, params, x, y, loss = _problem("softmax_cross_entropy", output="identity")
    opt = so.kfac(net, loss, learning_rate=0.1, damping=1e-2, decay=0.8, refresh=3, exact=True)
    state = opt.init(params)
    history = []
    for _ in range(4):
        _, grads = fnn.backprop(net, params, x, y, loss)
        history.append(fnn.curvature.kronecker_factors(net, params, x, y, loss))
        before = state
        params, state = fnn.optim.step(opt, grads, state, params, (x, y))
        refreshed = int(before.count) % 3 == 0
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.A_inv), jax.tree.leaves(state.A_inv)))
        assert same != refreshed or int(before.count) == 0
    # A and G after 4 steps: A₁ then A ← 0.8 A + 0.2 A_t, the same for G (G's catches the mutant
    # kfac-g-running-average-swapped)
    for l in range(net.num_layers):
        for name in ("A", "G"):
            expect = np.asarray(getattr(history[0][l], name))
            for f in history[1:]:
                expect = 0.8 * expect + 0.2 * np.asarray(getattr(f[l], name))
            assert rel_err(getattr(state, name)[l], expect) <= 1e-12, f"{name} of layer {l}"
    assert int(state.count) == 4


def test_conjugate_gradient_against_numpy_solve():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(12, 12))
    spd = m @ m.T + 0.1 * np.eye(12)
    b = rng.normal(size=12)
    x = so.cg(lambda v: jnp.asarray(spd) @ v, jnp.asarray(b), jnp.zeros(12), 60)
    assert rel_err(x, np.linalg.solve(spd, b)) <= 1e-9
    # warm start at the solution stays there
    x2 = so.cg(lambda v: jnp.asarray(spd) @ v, jnp.asarray(b), x, 5)
    assert rel_err(x2, x) <= 1e-9


@pytest.mark.parametrize("loss_name, output", HF_LOSSES)
def test_hessian_free_solves_the_damped_gauss_newton_system(loss_name, output):
    """The CG step against numpy.linalg.solve on the explicit damped GGN (jacfwd/hessian), with L2; the
    damping then follows the Levenberg–Marquardt rule on the reduction ratio computed here."""
    net, params, x, y, loss = _problem(loss_name, output=output)
    opt = so.hessian_free(net, loss, damping=0.5, cg_iters=200, decay=0.0, l2=0.01)
    _, grads = fnn.backprop(net, params, x, y, loss, 0.01)
    updates, state = opt.update(grads, opt.init(params), params, (x, y))
    G, _, _ = _explicit_ggn(net, params, x, y, loss, 0.01)
    g = np.asarray(ravel_pytree(grads)[0])
    M = np.asarray(G) + 0.5 * np.eye(g.size)
    d = -np.linalg.solve(M, g)
    assert rel_err(ravel_pytree(updates)[0], d) <= 1e-9
    unravel = ravel_pytree(params)[1]
    moved = jax.tree.map(lambda p, s: p + s, params, unravel(jnp.asarray(d)))
    change = float(fnn.objective(net, moved, x, y, loss, 0.01) - fnn.objective(net, params, x, y, loss, 0.01))
    rho = change / (g @ d + 0.5 * d @ M @ d)
    assert float(state.rho) == pytest.approx(rho, rel=1e-8)
    expect = 0.75 if rho < 0.25 else (1 / 3 if rho > 0.75 else 0.5)
    assert float(state.damping) == pytest.approx(expect, rel=1e-12)


def _np_cg(M, b, x0, iters):
    """``iters`` iterations of conjugate gradient on ``M x = b`` from ``x0`` (Hestenes & Stiefel 1952),
    in numpy float64: the reference for a solve that stops far from the solution."""
    x = np.array(x0, np.float64)
    r = b - M @ x
    p, rr = r.copy(), r @ r
    for _ in range(iters):
        mp = M @ p
        a = rr / (p @ mp)
        x, r = x + a * p, r - a * mp
        rr, old = r @ r, rr
        p = r + (rr / old) * p
    return x


def test_hessian_free_after_a_few_cg_iterations_and_its_warm_start():
    """Three CG iterations, far from the solution: the step is ``α d`` with ``d`` the third CG iterate on
    ``(G + λI) d = −∇C`` started from ``decay ·`` the previous ``d`` (numpy CG on the explicit GGN with
    L2); ``ρ`` is the cost's change over ``q(d) = ∇Cᵀd + ½dᵀ(G + λI)d``, computed here from ``d`` (the
    optimizer reads it off CG's residual, which is not 0 here); ``λ`` follows ``ρ``; and the second step,
    at the same point, starts CG from ``decay ·`` the first step's ``d`` with the new ``λ``. Catches the
    mutants hf-model-sign, hf-warm-start-not-decayed, hf-warm-start-not-kept and hf-learning-rate-ignored,
    which CG run to convergence with decay 0 and α = 1 cannot see."""
    net, params, x, y, loss = _problem("softmax_cross_entropy", output="identity")
    alpha, decay, lam, l2, iters = 0.5, 0.5, 0.5, 0.01, 3
    opt = so.hessian_free(net, loss, learning_rate=alpha, damping=lam, cg_iters=iters, decay=decay, l2=l2)
    _, grads = fnn.backprop(net, params, x, y, loss, l2)
    g = np.asarray(ravel_pytree(grads)[0])
    G = np.asarray(_explicit_ggn(net, params, x, y, loss, l2)[0])
    unravel = ravel_pytree(params)[1]
    state, previous = opt.init(params), np.zeros_like(g)
    for step in range(2):
        M = G + lam * np.eye(g.size)
        d = _np_cg(M, -g, decay * previous, iters)
        assert np.linalg.norm(M @ d + g) > 1e-3 * np.linalg.norm(g)  # far from the solution: r is not 0
        updates, state = opt.update(grads, state, params, (x, y))
        moved = jax.tree.map(lambda p, s: p + s, params, unravel(jnp.asarray(d)))
        change = float(fnn.objective(net, moved, x, y, loss, l2) - fnn.objective(net, params, x, y, loss, l2))
        assert change < 0, f"step {step}"  # accepted: the case this test is about
        rho = change / (g @ d + 0.5 * d @ M @ d)
        assert float(state.rho) == pytest.approx(rho, rel=1e-8), f"step {step}"
        assert rel_err(ravel_pytree(updates)[0], alpha * d) <= 1e-9, f"step {step}"
        assert rel_err(ravel_pytree(state.previous)[0], d) <= 1e-9, f"step {step}"
        lam = lam * (1.5 if rho < 0.25 else 2 / 3 if rho > 0.75 else 1.0)
        assert float(state.damping) == pytest.approx(lam, rel=1e-12), f"step {step}"
        previous = d


def test_hessian_free_rejects_a_step_that_raises_the_cost():
    """With almost no damping the Gauss-Newton step of this problem overshoots: C(θ + d) > C(θ) for
    d = −(G + λI)⁻¹∇C solved by numpy on the explicit GGN. The step must be rejected (update 0, params
    kept) and λ raised by 3/2; a second step from the raised damping is still computed from the same θ."""
    net, params, x, y, loss = _problem("softmax_cross_entropy", seed=38)
    opt = so.hessian_free(net, loss, damping=1e-6, cg_iters=200, decay=0.0)
    _, grads = fnn.backprop(net, params, x, y, loss)
    G, _, _ = _explicit_ggn(net, params, x, y, loss, 0.0)
    g = np.asarray(ravel_pytree(grads)[0])
    d = -np.linalg.solve(np.asarray(G) + 1e-6 * np.eye(g.size), g)
    moved = jax.tree.map(lambda p, s: p + s, params, ravel_pytree(params)[1](jnp.asarray(d)))
    assert fnn.objective(net, moved, x, y, loss) > fnn.objective(net, params, x, y, loss)  # the step overshoots
    updates, state = opt.update(grads, opt.init(params), params, (x, y))
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert float(state.damping) == pytest.approx(1.5e-6, rel=1e-12) and float(state.rho) < 0
    new_params, _ = fnn.optim.step(opt, grads, opt.init(params), params, (x, y))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)))


@pytest.mark.parametrize("make", [
    lambda net, loss: so.kfac(net, loss, learning_rate=1.0, damping=0.0, decay=0.0, refresh=1, exact=True),
    lambda net, loss: so.hessian_free(net, loss, damping=1e-9, cg_iters=30),
])
def test_a_convex_quadratic_is_solved_in_one_step(make):
    """A linear model with ½‖·‖²: the Gauss-Newton matrix is the Hessian and, for one layer, exactly A ⊗ G,
    so one step reaches the least-squares solution (numpy.linalg.lstsq)."""
    rng = np.random.default_rng(2)
    net = fnn.MLP((3, 2), "tanh", "identity")
    params = net.init(jax.random.PRNGKey(1), jnp.float64)
    x, y = jnp.asarray(rng.normal(size=(20, 3))), jnp.asarray(rng.normal(size=(20, 2)))
    loss = fnn.losses.half_mse
    opt = make(net, loss)
    _, grads = fnn.backprop(net, params, x, y, loss)
    params, _ = fnn.optim.step(opt, grads, opt.init(params), params, (x, y))
    X = np.hstack([np.asarray(x), np.ones((20, 1))])
    theta = np.linalg.lstsq(X, np.asarray(y), rcond=None)[0]  # (4, 2)
    assert rel_err(_bar(params[0]), theta.T) <= 1e-7


@pytest.mark.parametrize("which", ["kfac", "hessian_free"])
def test_fit_trains_with_them_compiles_once_and_keeps_dtypes(which):
    rng = np.random.default_rng(3)
    net = fnn.MLP((4, 8, 3), "tanh", "identity")
    x = rng.normal(size=(96, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)
    loss = fnn.losses.softmax_cross_entropy
    opt = so.kfac(net, loss, learning_rate=0.1, damping=1e-2) if which == "kfac" else \
        so.hessian_free(net, loss, damping=1.0, cg_iters=5)
    params = net.init(jax.random.PRNGKey(0))
    before = jax.tree.map(lambda t: t.dtype, opt.init(params))
    result = fnn.fit(net, params, opt, (x, y), loss=loss, epochs=4, batch_size=32, key=jax.random.PRNGKey(1))
    costs = np.asarray([h["train_loss"] for h in result.history])
    assert np.all(np.isfinite(costs)) and costs[-1] < costs[0]
    assert jax.tree.map(lambda t: t.dtype, result.opt_state) == before
    assert int(result.opt_state.count) == 4 * 3
    traces = []
    step = jax.jit(lambda p, s, x, y: (traces.append(1), fnn.train_step(net, opt, p, s, x, y, loss))[1][:2])
    p, s = params, opt.init(params)
    for i in range(3):
        p, s = step(p, s, x[32 * i: 32 * i + 32], y[32 * i: 32 * i + 32])
    assert len(traces) == 1


def test_bad_input():
    net, params, x, y, loss = _problem()
    opt = so.kfac(net, loss)
    _, grads = fnn.backprop(net, params, x, y, loss)
    with pytest.raises(ValueError, match="reads the batch"):
        fnn.optim.step(opt, grads, opt.init(params), params)
    bn = fnn.MLP((3, 4, 2), "tanh", "identity", batch_norm=True)
    for make in (so.kfac, so.hessian_free):
        with pytest.raises(ValueError, match="batch-normalized"):
            make(bn, loss)
    own = fnn.Loss("my_mse", "regression", lambda a, t: jnp.sum((a - t) ** 2, -1), lambda a, t: 2 * (a - t))
    with pytest.raises(ValueError, match="second derivative"):
        so.hessian_free(net, own)
    with pytest.raises(ValueError, match="refresh"):
        so.kfac(net, loss, refresh=0)
    with pytest.raises(ValueError, match="cg_iters"):
        so.hessian_free(net, loss, cg_iters=0)
    with pytest.raises(ValueError, match="damping"):
        so.hessian_free(net, loss, damping=0.0)
    plan = fnn.privacy.plan(fnn.privacy.Privacy(clip=1.0, lot_size=4, noise_multiplier=1.0), 12, 1)
    with pytest.raises(ValueError, match="privacy"):
        fnn.train.make_epoch(net, loss, opt, num_samples=12, batch_size=4, privacy=plan)


@pytest.mark.parametrize("which", ["kfac", "hessian_free"])
def test_checkpoint_describes_them_and_resume_is_bit_identical(tmp_path, which):
    """Five epochs straight against two, a self-describing checkpoint loaded with no templates, and three
    more: params, the whole optimizer state (running factors, inverses, key; damping, CG solution) and
    the history must agree bit for bit. Catches a state field left out of the checkpoint, an optimizer
    rebuilt with another hyper-parameter (network, loss, ints turned floats), and a refresh counted anew."""
    rng = np.random.default_rng(4)
    net = fnn.MLP((4, 6, 3), ("tanh",), "identity")
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)
    loss = fnn.losses.softmax_cross_entropy
    opt = so.kfac(net, loss, learning_rate=0.05, damping=1e-2, refresh=4, seed=3) if which == "kfac" else \
        so.hessian_free(net, loss, damping=0.5, cg_iters=3, l2=1e-3)
    params = net.init(jax.random.PRNGKey(0))
    kw = dict(loss=loss, batch_size=20, quiet=True, l2=opt.hyperparams["l2"])
    straight = fnn.fit(net, params, opt, (x, y), epochs=5, key=jax.random.PRNGKey(1), **kw)

    def save(state):
        fnn.checkpoint.save(fnn.checkpoint.path_for(tmp_path, state.epoch), params=state.params,
                            opt_state=state.opt_state, key=state.key, epoch=state.epoch, net=net, opt=opt)

    fnn.fit(net, params, opt, (x, y), epochs=2, key=jax.random.PRNGKey(1), on_epoch_end=save, **kw)
    ck = fnn.checkpoint.load(fnn.checkpoint.latest(tmp_path))
    assert ck.epoch == 2 and ck.net == net and ck.opt.name == which
    assert ck.opt.hyperparams == opt.hyperparams
    resumed = fnn.fit(ck.net, ck.params, ck.opt, (x, y), epochs=3, key=ck.key, opt_state=ck.opt_state,
                      start_epoch=ck.epoch, **kw)
    assert int(resumed.opt_state.count) == 15
    leaves = jax.tree_util.tree_leaves
    for u, v in zip(leaves((straight.params, straight.opt_state)), leaves((resumed.params, resumed.opt_state)),
                    strict=True):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(u, v)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history[2:]]
    with pytest.raises(fnn.checkpoint.CheckpointError, match="loss"):
        fnn.checkpoint.load(fnn.checkpoint.latest(tmp_path), opt=type(opt)(
            opt.init, opt.update, name=which, hyperparams={**opt.hyperparams, "loss": fnn.losses.mse}))


def test_deep_autoencoder_experiment(tmp_path, mnist_dir):
    """experiments/second_order.py --quick: every method lowers the training error from the shared start;
    the snapshots are ordered in iterations and seconds within the budget; the per-iteration and per-second
    comparisons are those the curves give; the first snapshot's error is recomputed here with jax.nn."""
    from test_experiments_b import run

    r = run("second_order", tmp_path, "--data-dir", str(mnist_dir))
    assert set(r["runs"]) == {"momentum", "Adam", "K-FAC", "Hessian-free"}
    raw = fnn.data.load_dataset("mnist-10k", str(mnist_dir))
    x = jnp.asarray(raw.x_train[: r["eval_rows"]], jnp.float32)
    hidden = len(r["sizes"]) - 2
    assert r["activation"] == ["identity" if l == hidden // 2 else "sigmoid" for l in range(hidden)]
    net = fnn.MLP(tuple(r["sizes"]), tuple(r["activation"]), "identity", init="xavier_normal")
    z = net.apply(net.init(jax.random.PRNGKey(0)), x)
    ce = jnp.mean(jnp.maximum(z, 0) - z * x + jnp.log1p(jnp.exp(-jnp.abs(z))))
    assert abs(r["initial_cross_entropy"] - float(ce)) <= 1e-5 * float(ce)
    for name, run_ in r["runs"].items():
        its, clock, ce = (np.asarray(run_[k], float) for k in ("iterations", "clock", "cross_entropy"))
        assert its[0] == 0 and ce[0] == r["initial_cross_entropy"] and its[-1] == run_["steps"] >= 1
        assert np.all(np.diff(its) > 0) and np.all(np.diff(clock) > 0) and clock[-1] >= r["budget_s"]
        assert np.all(np.isfinite(ce)) and ce[-1] < ce[0], name
        assert r["per_second"][name] == ce[-1]
        assert r["per_iteration"][name] == pytest.approx(np.interp(r["common_iteration"], its, ce), rel=1e-12)
        assert r["common_iteration"] <= run_["steps"]
    assert r["common_iteration"] == min(run_["steps"] for run_ in r["runs"].values())
    assert r["target"] == r["runs"]["momentum"]["cross_entropy"][-1]
    for name, run_ in r["runs"].items():  # the first snapshot at or below momentum's final error
        hits = [i for i, c in enumerate(run_["cross_entropy"]) if c <= r["target"]]
        expect = {"iteration": run_["iterations"][hits[0]], "seconds": run_["clock"][hits[0]]} if hits else None
        assert r["reach"][name] == expect, name
    assert r["reach"]["momentum"] is not None
