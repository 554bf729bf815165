"""fnn.second_order (K-FAC, Hessian-free) against explicit matrices, numpy.linalg.solve and least squares."""

import importlib
import math

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
    for make in (so.kfac, so.kfac_adaptive, so.hessian_free):
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


def _np_adaptive_step(g, G, lam, gamma, prev, grid, direction, omega2):
    """One step of Martens & Grosse's K-FAC in numpy from the explicit matrices: for each γ tried (the grid
    ``{ω₂γ, γ, γ/ω₂}`` or ``γ`` alone), the proposal ``Δ = −direction(γ)`` and ``δ = B s`` minimizing
    ``½δᵀ(G + λI)δ + gᵀδ`` over the columns ``B = [Δ, δ₀]`` (``[Δ]`` while ``δ₀ = 0``), by numpy.linalg.solve;
    the γ with the lowest minimum is kept. Returns ``(δ, γ)``."""
    best = None
    for t in ([gamma * omega2, gamma, gamma / omega2] if grid else [gamma]):
        D = -direction(t)
        B = D[:, None] if not np.any(prev) else np.stack([D, prev], axis=1)
        Gd = G + lam * np.eye(g.size)
        delta = B @ -np.linalg.solve(B.T @ Gd @ B, B.T @ g)
        value = 0.5 * delta @ Gd @ delta + g @ delta
        if best is None or value < best[0]:
            best = (value, delta, t)
    return best[1], best[2]


# a problem per loss on which a step with almost no damping has ρ < 1/4, so that λ rises
RISES = {"binary_cross_entropy": 32, "binary_cross_entropy_with_logits": 32, "categorical_cross_entropy": 30,
         "half_mse": 31, "mse": 31, "softmax_cross_entropy": 30}


@pytest.mark.parametrize("lam0", [0.5, 1e-6], ids=["lambda-falls", "lambda-rises"])
@pytest.mark.parametrize("loss_name, output", KFAC_LOSSES)
def test_kfac_adaptive_against_dense_steps(loss_name, output, lam0):
    """Four steps of :func:`fnn.second_order.kfac_adaptive` along its own trajectory (exact factors, no
    averaging, inverses every step, λ adapted and γ chosen every second step, L2 on) against
    :func:`_np_adaptive_step` on the explicit Gauss-Newton matrix at each step's params: the update
    (momentum's 2 × 2 solve from the second step on), the γ chosen from the grid, and λ from the
    reduction ratio ``ρ`` computed here against the undamped model ``½δᵀGδ + ∇Cᵀδ`` (``λ`` times or over
    ``ω₁ = (19/20)²``)."""
    net, params, x, y, loss = _problem(loss_name, output=output, seed=0 if lam0 == 0.5 else RISES[loss_name])
    lam, l2 = lam0, 0.01
    opt = so.kfac_adaptive(net, loss, damping=lam, decay=0.0, refresh=1, adapt_every=2, gamma_every=2,
                           exact=True, l2=l2)
    unravel = ravel_pytree(params)[1]
    state, prev, gamma, moved_gamma, factors = opt.init(params), None, np.sqrt(lam + l2), False, []
    assert float(state.gamma) == pytest.approx(gamma, rel=1e-12)
    for step in range(4):
        _, grads = fnn.backprop(net, params, x, y, loss, l2)
        g = np.asarray(ravel_pytree(grads)[0])
        G_data = np.asarray(_explicit_ggn(net, params, x, y, loss, 0.0)[0])  # the factors leave L2 out
        G = np.asarray(_explicit_ggn(net, params, x, y, loss, l2)[0])

        def direction(gamma):  # (G_d ⊗ A_d)⁻¹ ∇C with the factored damping γ (√ of the helper's damping)
            bars = _kfac_direction(net, params, x, grads, G_data, gamma ** 2)  # noqa: B023
            return np.asarray(ravel_pytree([{"W": d[:, :-1], "b": d[:, -1]} for d in bars])[0])

        prev = np.zeros_like(g) if prev is None else prev
        delta, new_gamma = _np_adaptive_step(g, G, lam, gamma, prev, step % 2 == 0, direction, 0.95)
        moved_gamma |= new_gamma != gamma
        updates, state = opt.update(grads, state, params, (x, y))
        assert rel_err(ravel_pytree(updates)[0], delta) <= 1e-8, f"step {step}"
        assert float(state.gamma) == pytest.approx(new_gamma, rel=1e-12), f"step {step}"
        moved = jax.tree.map(lambda p, s: p + s, params, unravel(jnp.asarray(delta)))
        if step % 2 == 0:
            change = float(fnn.objective(net, moved, x, y, loss, l2) - fnn.objective(net, params, x, y, loss, l2))
            rho = change / (0.5 * delta @ G @ delta + g @ delta)
            assert float(state.rho) == pytest.approx(rho, rel=1e-7), f"step {step}"
            factors.append(0.95 ** 2 if rho > 0.75 else 1 if rho >= 0.25 else 1 / 0.95 ** 2)
            lam = lam * factors[-1]
        assert float(state.damping) == pytest.approx(lam, rel=1e-12), f"step {step}"
        params, prev, gamma = moved, delta, new_gamma
    assert moved_gamma  # the case this test is about: the grid moved γ at least once
    assert any(f < 1 if lam0 == 0.5 else f > 1 for f in factors)  # and λ fell, or rose, at least once


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
    opt = so.hessian_free(net, loss, damping=0.5, cg_iters=200, decay=0.0, l2=0.01, cg_tol=0.0, backtrack=False)
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


def _np_martens_cg(M, b, x0, iters, tol, backtrack, cost):
    """Martens' (2010) CG in numpy float64: at most ``iters`` iterations on ``M x = b`` from ``x0``, stopped
    at ``i > k = max(10, ⌊i/10⌋)`` once ``φ(x_i) < 0`` and ``(φ(x_i) − φ(x_{i−k}))/φ(x_i) < k·tol``
    (``φ(x) = ½xᵀMx − bᵀx``, computed here from ``M``); the candidates are the iterates at
    ``i = ⌈1.3^j⌉`` and the last (only the last without ``backtrack``), and the chosen one has the lowest
    ``cost`` (the earliest on a tie). Returns ``(last, chosen, iterations, chosen's index)``."""
    saved = {math.ceil(1.3 ** j) for j in range(60)} if backtrack else set()
    x = np.array(x0, np.float64)
    r = b - M @ x
    p, rr = r.copy(), r @ r
    phis, candidates, i = [0.5 * x @ M @ x - b @ x], {}, 0
    while i < iters:
        mp = M @ p
        a = rr / (p @ mp)
        x, r = x + a * p, r - a * mp
        rr, old = r @ r, rr
        p = r + (rr / old) * p
        i += 1
        phis.append(0.5 * x @ M @ x - b @ x)
        k = max(10, i // 10)
        if i > k and phis[i] < 0 and (phis[i] - phis[i - k]) / phis[i] < k * tol:
            break
        if i in saved:
            candidates[i] = x.copy()
    candidates[i] = x
    best = min(candidates, key=lambda j: (cost(candidates[j]), j))
    return x, candidates[best], i, best


@pytest.mark.parametrize("iters, tol, backtrack, damping, seed", [
    (3, 0.0, False, 0.5, 0),  # far from the solution: the residual is not 0
    (3, 5e-4, True, 0.5, 0),
    (100, 5e-4, True, 0.5, 0),  # the relative-progress rule stops CG
    (100, 5e-4, True, 1e-2, 38),  # an overshooting last iterate: backtracking picks an earlier one
], ids=["3-iterations", "3-backtrack", "stopping-rule", "backtracking"])
def test_hessian_free_cg_as_martens_runs_it(iters, tol, backtrack, damping, seed):
    """Two steps at the same point against numpy (:func:`_np_martens_cg` on the explicit GGN with L2 and
    λ): the step is ``α d`` with ``d`` the chosen CG iterate on ``(G + λI) d = −∇C`` started from ``decay ·``
    the previous *last* iterate; the CG iterations run are the reference's; ``ρ`` is the cost's change over
    ``q(d) = ∇Cᵀd + ½dᵀ(G + λI)d`` computed here from ``d`` (the optimizer reads it off CG's residual);
    ``λ`` follows ``ρ``, or rises by 3/2 when the step is rejected. Catches the mutants hf-model-sign,
    hf-warm-start-not-decayed, hf-warm-start-not-kept and hf-learning-rate-ignored."""
    net, params, x, y, loss = _problem("softmax_cross_entropy", output="identity", seed=seed)
    alpha, decay, lam, l2 = 0.5, 0.5, damping, 0.01
    opt = so.hessian_free(net, loss, learning_rate=alpha, damping=lam, cg_iters=iters, decay=decay, l2=l2,
                          cg_tol=tol, backtrack=backtrack)
    _, grads = fnn.backprop(net, params, x, y, loss, l2)
    g = np.asarray(ravel_pytree(grads)[0])
    G = np.asarray(_explicit_ggn(net, params, x, y, loss, l2)[0])
    unravel = ravel_pytree(params)[1]
    before = float(fnn.objective(net, params, x, y, loss, l2))

    def cost(d):
        return float(fnn.objective(net, jax.tree.map(lambda p, s: p + s, params, unravel(jnp.asarray(d))),
                                   x, y, loss, l2))

    # Past a few iterations, CG's rounding grows with the iterations and the condition number of G + λI
    # (10⁻⁸ here after 20 of them): iterates are compared to 10⁻⁶, far below the distance between two of them.
    tol_d = 1e-9 if iters == 3 else 1e-6
    state, previous, picked = opt.init(params), np.zeros_like(g), []
    for step in range(2):
        M = G + lam * np.eye(g.size)
        last, d, n, best = _np_martens_cg(M, -g, decay * previous, iters, tol, backtrack, cost)
        picked.append((best, n))
        updates, state = opt.update(grads, state, params, (x, y))
        assert int(state.cg_iterations) == n, f"step {step}"
        change = cost(d) - before
        rho = change / (g @ d + 0.5 * d @ M @ d)
        assert float(state.rho) == pytest.approx(rho, rel=1e-7), f"step {step}"
        expect = alpha * d if change < 0 else np.zeros_like(d)
        assert rel_err(ravel_pytree(updates)[0], expect) <= tol_d, f"step {step}"
        assert rel_err(ravel_pytree(state.previous)[0], last) <= tol_d, f"step {step}"
        lam = lam * (1.5 if change >= 0 or rho < 0.25 else 2 / 3 if rho > 0.75 else 1.0)
        assert float(state.damping) == pytest.approx(lam, rel=1e-12), f"step {step}"
        previous = last
    # the regime each case is about
    if iters == 3 and tol == 0:
        assert np.linalg.norm(G @ d + lam * d + g) > 1e-3 * np.linalg.norm(g)
    if iters == 100:
        assert all(n < iters for _, n in picked)  # stopped by the rule, not by the limit
    if damping == 1e-2:
        assert any(best < n for best, n in picked)  # an earlier iterate was chosen


def test_hessian_free_rejects_a_step_that_raises_the_cost():
    """With almost no damping the Gauss-Newton step of this problem overshoots: C(θ + d) > C(θ) for
    d = −(G + λI)⁻¹∇C solved by numpy on the explicit GGN. The step must be rejected (update 0, params
    kept) and λ raised by 3/2; a second step from the raised damping is still computed from the same θ."""
    net, params, x, y, loss = _problem("softmax_cross_entropy", seed=38)
    opt = so.hessian_free(net, loss, damping=1e-6, cg_iters=200, decay=0.0, cg_tol=0.0, backtrack=False)
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
    lambda net, loss: so.hessian_free(net, loss, damping=1e-9, cg_iters=30, cg_tol=0.0, backtrack=False),
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


@pytest.mark.parametrize("which", ["kfac", "kfac_adaptive", "hessian_free"])
def test_fit_trains_with_them_compiles_once_and_keeps_dtypes(which):
    rng = np.random.default_rng(3)
    net = fnn.MLP((4, 8, 3), "tanh", "identity")
    x = rng.normal(size=(96, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)
    loss = fnn.losses.softmax_cross_entropy
    opt = {"kfac": lambda: so.kfac(net, loss, learning_rate=0.1, damping=1e-2),
           "kfac_adaptive": lambda: so.kfac_adaptive(net, loss, damping=1.0, refresh=2, adapt_every=2, gamma_every=3),
           "hessian_free": lambda: so.hessian_free(net, loss, damping=1.0, cg_iters=5, curvature_rows=16)}[which]()
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
    for name in ("damping", "refresh", "adapt_every", "gamma_every"):
        with pytest.raises(ValueError, match=name):
            so.kfac_adaptive(net, loss, **{name: 0})
    with pytest.raises(ValueError, match="decay"):
        so.kfac_adaptive(net, loss, decay=1.0)
    with pytest.raises(ValueError, match="cg_tol"):
        so.hessian_free(net, loss, cg_tol=-1e-3)
    with pytest.raises(TypeError, match="backtrack"):
        so.hessian_free(net, loss, backtrack=1)
    with pytest.raises(ValueError, match="curvature_rows"):
        so.hessian_free(net, loss, curvature_rows=0)
    big = so.hessian_free(net, loss, curvature_rows=x.shape[0] + 1)
    with pytest.raises(ValueError, match=r"curvature_rows=13 is more than the batch's 12 rows"):
        big.update(grads, big.init(params), params, (x, y))
    plan = fnn.privacy.plan(fnn.privacy.Privacy(clip=1.0, lot_size=4, noise_multiplier=1.0), 12, 1)
    with pytest.raises(ValueError, match="privacy"):
        fnn.train.make_epoch(net, loss, opt, num_samples=12, batch_size=4, privacy=plan)


@pytest.mark.parametrize("which", ["kfac", "kfac_adaptive", "hessian_free"])
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
    opt = {"kfac": lambda: so.kfac(net, loss, learning_rate=0.05, damping=1e-2, refresh=4, seed=3),
           "kfac_adaptive": lambda: so.kfac_adaptive(net, loss, damping=1.0, refresh=2, adapt_every=2, gamma_every=4,
                                                     l2=1e-3, seed=3),
           "hessian_free": lambda: so.hessian_free(net, loss, damping=0.5, cg_iters=12, l2=1e-3, curvature_rows=10)
           }[which]()
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


@pytest.mark.parametrize("seed", [0, 1000])  # the verdicts are computed the same way in both seed ranges
def test_deep_autoencoder_experiment(tmp_path, mnist_dir, seed):
    """experiments/second_order.py --quick: every method lowers the training error from the shared start
    (recomputed here with jax.nn from the sparse initialization); the snapshots are ordered in iterations and
    seconds, with one at the budget and momentum and Adam past their least iteration count; the target, the
    iterations to it, the per-second order and the per-iteration verdicts are those the curves give
    (recomputed here); and the README's blocks have the form of a fresh render."""
    from test_experiments_b import REGENERATE, quoted_block, run, skeleton

    r = run("second_order", tmp_path, "--data-dir", str(mnist_dir), "--seed", str(seed))
    runs = r["runs"]
    assert list(runs) == ["momentum", "Adam", "K-FAC", "Hessian-free"] and r["base_seed"] == seed
    raw = fnn.data.load_dataset("mnist-10k", str(mnist_dir))
    x = jnp.asarray(raw.x_train[: r["eval_rows"]], jnp.float32)
    hidden = len(r["sizes"]) - 2
    assert r["activation"] == ["identity" if l == hidden // 2 else "sigmoid" for l in range(hidden)]
    net = fnn.MLP(tuple(r["sizes"]), tuple(r["activation"]), "identity", init="sparse")
    z = net.apply(net.init(jax.random.PRNGKey(seed)), x)
    ce = jnp.mean(jnp.maximum(z, 0) - z * x + jnp.log1p(jnp.exp(-jnp.abs(z))))
    assert abs(r["initial_cross_entropy"] - float(ce)) <= 1e-5 * float(ce)
    for name, run_ in runs.items():
        its, clock, ce = (np.asarray(run_[k], float) for k in ("iterations", "clock", "cross_entropy"))
        assert its[0] == 0 and ce[0] == r["initial_cross_entropy"] and its[-1] == run_["steps"] >= 1
        assert np.all(np.diff(its) > 0) and np.all(np.diff(clock) > 0)
        b = run_["budget_index"]
        assert clock[b] >= r["budget_s"] and (b == 0 or clock[b - 1] < r["budget_s"])
        assert run_["steps"] >= (r["min_steps"] if name in ("momentum", "Adam") else 1)
        assert np.all(np.isfinite(ce)) and ce[-1] < ce[0], name
        assert r["per_second"][name] == ce[b]
    assert r["target"] == runs["momentum"]["cross_entropy"][-1]
    first = {}
    for name, run_ in runs.items():  # the first snapshot at or below momentum's final error
        hits = [i for i, c in enumerate(run_["cross_entropy"]) if c <= r["target"]]
        first[name] = run_["iterations"][hits[0]] if hits else None
        expect = {"iteration": run_["iterations"][hits[0]], "seconds": run_["clock"][hits[0]]} if hits else None
        assert r["reach"][name] == expect, name
    assert first["momentum"] is not None
    assert set(r["per_iteration"]) == {"K-FAC", "Hessian-free"}
    for name, v in r["per_iteration"].items():
        n = runs[name]["steps"]
        mine = np.interp(n, runs[name]["iterations"], runs[name]["cross_entropy"])
        theirs = np.interp(n, runs["momentum"]["iterations"], runs["momentum"]["cross_entropy"])
        assert v["error_at_last"] == pytest.approx(mine, rel=1e-12) and v["ahead_at_last"] == (mine < theirs)
        if first[name] is not None:
            assert v["verdict"] == ("holds" if first[name] < first["momentum"] else "does not hold")
        else:
            assert v["verdict"] == ("does not hold" if n >= first["momentum"] else "undecided")
    # the README's block (default run) has the form of a fresh render: the same table header, a row per
    # method, the same kinds of lines (a quick run has one value per grid and other verdicts, so only the
    # form is compared; tests/test_results.py checks the block against its committed JSON)
    results = importlib.import_module("results")
    block = quoted_block("second_order" if seed == 0 else f"second_order@{seed}")
    fresh = results.render_second_order({**r, "quick": False})

    def form(text):
        lines = text.splitlines()
        header = [skeleton(line) for line in lines if line.startswith("| method")]
        rows = [line.split(" | ")[0] for line in lines if line.startswith("| ") and not line.startswith("| ---")]
        kinds = [line[:7] for line in lines if line.startswith("- ")]
        return header, rows, kinds

    assert form(block) == form(fresh), REGENERATE


def test_the_pilot_keeps_an_interior_value():
    """experiments/second_order.pilot: an interior minimum is kept as it is; a minimum at an end grows the
    grid beyond that end by its ratio until the minimum is interior, at most ``extensions`` times (and says
    so when it is still at an end); a score that is not finite counts as worst."""
    import sys

    from test_experiments_b import EXPERIMENTS
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    pilot = importlib.import_module("second_order").pilot
    asked = []

    def scorer(best):
        return lambda v: (asked.append(v), abs(math.log10(v) - math.log10(best)))[1]

    p = pilot((0.1, 1.0, 10.0), scorer(1.0), 2)
    assert (p["grid"], p["chosen"], p["at_edge"], asked) == ([0.1, 1.0, 10.0], 1.0, False, [0.1, 1.0, 10.0])
    asked.clear()
    p = pilot((0.1, 1.0, 10.0), scorer(100.0), 2)  # one step beyond the top: interior after one extension
    assert (p["grid"], p["chosen"], p["at_edge"], asked) == ([0.1, 1.0, 10.0, 100.0, 1000.0], 100.0, False,
                                                             [0.1, 1.0, 10.0, 100.0, 1000.0])
    p = pilot((0.3, 1.0, 3.0), scorer(1e-3), 2)  # far below the bottom: two extensions (ratio 10/3), still at an end
    assert (p["grid"], p["chosen"], p["at_edge"]) == ([0.027, 0.09, 0.3, 1.0, 3.0], 0.027, True)
    p = pilot((0.1, 1.0, 10.0), lambda v: float("nan") if v == 1.0 else v, 1)
    assert p["chosen"] == 0.01 and p["score"][p["grid"].index(1.0)] != p["score"][p["grid"].index(1.0)]
