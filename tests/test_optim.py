"""fnn.optim against independent NumPy float64 implementations of the published update rules.

The NumPy references below work on the parameters flattened into one float64 vector (every rule
except clipping and Newton acts element by element, so one vector holds every leaf), written from
the papers' formulas, never calling fnn.
"""

import inspect
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnn import optim, schedules

from helpers import rel_err

SHAPES = [{"W": (3, 4), "b": (3,)}, {"W": (2, 3), "b": (2,)}]
KEYS = ("W", "b")  # the leaf order of a dict in a pytree: sorted keys
N = sum(math.prod(layer[k]) for layer in SHAPES for k in KEYS)  # 23 parameters
STEPS = 60

_rng = np.random.default_rng(20240611)
_Q, _ = np.linalg.qr(_rng.normal(size=(N, N)))
A = _Q @ np.diag(np.linspace(0.5, 2.0, N)) @ _Q.T  # a dense SPD Hessian, eigenvalues in [0.5, 2]
C = _rng.normal(size=N)  # the quadratic's minimiser
X0 = C + _rng.normal(size=N)  # the starting point
NOISE = 0.1 * _rng.normal(size=(STEPS, N))  # deterministic "stochastic" gradient noise, one row per step
MASK = np.concatenate([np.full(math.prod(layer[k]), k == "W") for layer in SHAPES for k in KEYS])  # weights only


def _tree(vector, dtype=jnp.float64):
    """A flat vector as params ``[{"W": (3, 4), "b": (3,)}, {"W": (2, 3), "b": (2,)}]``."""
    out, i = [], 0
    for layer in SHAPES:
        leaves = {}
        for k in KEYS:
            n = math.prod(layer[k])
            leaves[k] = jnp.reshape(jnp.asarray(vector[i : i + n], dtype), layer[k])
            i += n
        out.append(leaves)
    return out


def _vector(tree):
    return np.concatenate([np.ravel(np.asarray(layer[k], np.float64)) for layer in tree for k in KEYS])


def _grad(x, t):
    """The gradient of ``½(x − c)ᵀA(x − c)`` at ``x`` plus the noise of step ``t``: depends on the params."""
    return A @ (x - C) + NOISE[t]


def _quadratic(params, center=C):
    """``½(x − center)ᵀA(x − center)`` with ``x`` the flattened params (jnp, for jit and autodiff)."""
    d = jnp.concatenate([jnp.ravel(layer[k]) for layer in params for k in KEYS]) - center
    return 0.5 * d @ A @ d


# ---------------------------------------------------------------------------------------------
# NumPy references: step(x, g, s, t) -> new x, with t = 0, 1, ... and s a dict of state.


def np_sgd(lr):
    def step(x, g, s, t):
        return x - lr(t) * g

    return step


def np_momentum(lr, rho, nesterov=False):
    def step(x, g, s, t):
        s["v"] = rho * s.get("v", 0.0) + g
        return x - lr(t) * ((g + rho * s["v"]) if nesterov else s["v"])

    return step


def np_adagrad(lr, delta):
    def step(x, g, s, t):
        s["r"] = s.get("r", 0.0) + g * g
        return x - lr(t) * g / (delta + np.sqrt(s["r"]))

    return step


def np_rmsprop(lr, rho, eps, centered=False, mu=0.0):
    def step(x, g, s, t):
        s["r"] = rho * s.get("r", 0.0) + (1 - rho) * g * g
        if centered:
            s["m"] = rho * s.get("m", 0.0) + (1 - rho) * g
            scaled = g / (np.sqrt(s["r"] - s["m"] ** 2) + eps)
        else:
            scaled = g / (np.sqrt(s["r"]) + eps)
        if mu:
            s["b"] = mu * s.get("b", 0.0) + scaled
            return x - lr(t) * s["b"]
        return x - lr(t) * scaled

    return step


def np_adam(lr, b1, b2, eps, weight_decay=0.0, mask=MASK):
    def step(x, g, s, t):
        k = t + 1  # Kingma & Ba count steps from 1
        s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
        s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
        m_hat, v_hat = s["m"] / (1 - b1**k), s["v"] / (1 - b2**k)
        return x - lr(t) * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * mask * x)

    return step


def np_l2_sgd(lr, weight_decay):
    def step(x, g, s, t):
        return x - lr(t) * (g + weight_decay * MASK * x)

    return step


def np_clip_sgd(lr, max_norm):
    def step(x, g, s, t):
        norm = np.sqrt(np.sum(g * g))
        s.setdefault("clipped", []).append(norm > max_norm)
        return x - lr(t) * g * min(1.0, max_norm / norm)

    return step


def np_newton(lr, damping):
    def step(x, g, s, t):
        return x - lr(t) * np.linalg.solve(A + damping * np.eye(N), g)  # the quadratic's Hessian is A

    return step


def const(value):
    return lambda t: value


# name: (fnn optimizer factory, NumPy reference step, the learning rate as given to fnn)
CASES = {
    "sgd": (lambda: optim.sgd(0.1), np_sgd(const(0.1))),
    "sgd_inverse_sqrt": (
        lambda: optim.sgd(schedules.inverse_sqrt(0.3)),
        np_sgd(lambda t: 0.3 / math.sqrt(t + 1)),
    ),
    "momentum": (lambda: optim.momentum(0.05, momentum=0.8), np_momentum(const(0.05), 0.8)),
    "momentum_warmup": (
        lambda: optim.momentum(schedules.linear_warmup(0.05, 10), momentum=0.9),
        np_momentum(lambda t: 0.05 * min(t, 10) / 10, 0.9),
    ),
    "nesterov": (lambda: optim.nesterov(0.05, momentum=0.85), np_momentum(const(0.05), 0.85, nesterov=True)),
    "adagrad": (lambda: optim.adagrad(0.3), np_adagrad(const(0.3), 1e-7)),
    "rmsprop": (lambda: optim.rmsprop(0.01, decay=0.9), np_rmsprop(const(0.01), 0.9, 1e-8)),
    "rmsprop_centered": (
        lambda: optim.rmsprop(0.01, decay=0.95, eps=1e-6, centered=True),
        np_rmsprop(const(0.01), 0.95, 1e-6, centered=True),
    ),
    "rmsprop_momentum": (  # a schedule pins the order: α_t multiplies b, it is not accumulated into b
        lambda: optim.rmsprop(schedules.inverse_sqrt(0.01), decay=0.9, momentum=0.7),
        np_rmsprop(lambda t: 0.01 / math.sqrt(t + 1), 0.9, 1e-8, mu=0.7),
    ),
    "rmsprop_centered_momentum": (
        lambda: optim.rmsprop(0.005, decay=0.8, centered=True, momentum=0.5),
        np_rmsprop(const(0.005), 0.8, 1e-8, centered=True, mu=0.5),
    ),
    "adam": (lambda: optim.adam(0.05, b1=0.8, b2=0.99), np_adam(const(0.05), 0.8, 0.99, 1e-8)),
    "adam_cosine": (
        lambda: optim.adam(schedules.cosine_decay(0.05, 40, alpha=0.1)),
        np_adam(lambda t: 0.05 * (0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 40) / 40)) + 0.1), 0.9, 0.999, 1e-8),
    ),
    "adamw": (
        lambda: optim.adamw(0.05, b1=0.9, b2=0.99, eps=1e-7, weight_decay=0.1),
        np_adam(const(0.05), 0.9, 0.99, 1e-7, weight_decay=0.1),
    ),
    "add_decayed_weights_sgd": (
        lambda: optim.chain(optim.add_decayed_weights(0.2), optim.sgd(0.1)),
        np_l2_sgd(const(0.1), 0.2),
    ),
    "clip_by_global_norm_sgd": (
        lambda: optim.chain(optim.clip_by_global_norm(0.6), optim.sgd(0.2)),
        np_clip_sgd(const(0.2), 0.6),
    ),
    "newton_damped": (lambda: optim.newton(_quadratic, damping=0.5, learning_rate=0.7), np_newton(const(0.7), 0.5)),
    "skip_nonfinite_adam": (lambda: optim.skip_nonfinite(optim.adam(0.02)), np_adam(const(0.02), 0.9, 0.999, 1e-8)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_matches_numpy_reference(name):
    make, reference = CASES[name]
    opt = make()
    update = jax.jit(opt.update)
    params, state = _tree(X0), opt.init(_tree(X0))
    x, s = X0.copy(), {}
    for t in range(STEPS):
        grads = _tree(_grad(_vector(params), t))
        updates, state = update(grads, state, params)
        params = optim.apply_updates(params, updates)
        x = reference(x, _grad(x, t), s, t)
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(_tree(x))):
            assert rel_err(got, want) <= 1e-10, (name, t, rel_err(got, want))
    assert update._cache_size() == 1
    assert np.abs(x - X0).max() > 0.1  # the trajectory went somewhere
    if "clipped" in s:  # both branches of the clipping were taken
        assert any(s["clipped"]) and not all(s["clipped"])


@pytest.mark.parametrize(
    "learning_rate, make, formula",
    [
        (schedules.inverse_sqrt(0.3), optim.sgd, lambda t: 0.3 / math.sqrt(t + 1)),
        (schedules.step_decay(0.1, 0.5, 3), optim.adamw, lambda t: 0.1 * 0.5 ** (t // 3)),
        (0.3, lambda lr: optim.skip_nonfinite(optim.momentum(lr)), lambda t: 0.3),
    ],
)
def test_current_learning_rate_follows_the_step_counter(learning_rate, make, formula):
    opt = make(learning_rate)
    params = _tree(X0)
    state = opt.init(params)
    for t in range(8):
        # the rate the next update uses is the schedule at t = the number of updates done
        assert float(optim.current_learning_rate(learning_rate, state)) == pytest.approx(formula(t), rel=1e-15)
        updates, state = opt.update(_tree(_grad(_vector(params), t)), state, params)
        params = optim.apply_updates(params, updates)


# ---------------------------------------------------------------------------------------------
# Convergence.


def _run(opt, steps, grad_fn, params):
    """``steps`` updates of ``opt`` inside one jitted ``fori_loop``; returns the final params."""
    state = opt.init(params)

    def body(_, carry):
        p, s = carry
        updates, s = opt.update(grad_fn(p), s, p)
        return optim.apply_updates(p, updates), s

    return jax.jit(lambda p, s: jax.lax.fori_loop(0, steps, body, (p, s)))(params, state)[0]


C_W0 = np.where(MASK, 0.0, C)  # a minimiser whose weights are 0: a fixed point of AdamW's decoupled decay too

# name: (optimizer, steps, the point it must reach, max |θ − θ*| required; observed in brackets)
QUADRATIC = {
    "sgd": (lambda: optim.sgd(0.5), 150, C, 1e-12),  # [2e-16]
    "sgd_inverse_sqrt": (lambda: optim.sgd(schedules.inverse_sqrt(0.9)), 1500, C, 1e-12),  # [7e-15]
    "momentum": (lambda: optim.momentum(0.1, momentum=0.9), 500, C, 1e-10),  # [5e-12]
    "nesterov": (lambda: optim.nesterov(0.1, momentum=0.9), 300, C, 1e-10),  # [7e-12]
    "adagrad": (lambda: optim.adagrad(0.5), 300, C, 1e-10),  # [3e-12]
    "rmsprop": (lambda: optim.rmsprop(schedules.exponential_decay(0.05, 0.01, 1000)), 3000, C, 1e-6),  # [3e-8]
    "rmsprop_centered": (
        lambda: optim.rmsprop(schedules.exponential_decay(0.01, 0.01, 1000), centered=True), 3000, C, 1e-8,
    ),  # [1e-10]
    "rmsprop_momentum": (
        lambda: optim.rmsprop(schedules.exponential_decay(0.01, 0.01, 1000), momentum=0.9), 3000, C, 1e-10,
    ),  # [8e-14]
    "adam": (lambda: optim.adam(schedules.exponential_decay(0.05, 0.01, 1000)), 3000, C, 1e-5),  # [5e-7]
    "adamw": (
        lambda: optim.adamw(schedules.exponential_decay(0.05, 0.01, 1000), weight_decay=0.1), 3000, C_W0, 1e-4,
    ),  # [6e-6]
    "add_decayed_weights_sgd": (  # the minimiser of C + ½λ‖W‖²: (A + λ diag(mask)) θ* = A c
        lambda: optim.chain(optim.add_decayed_weights(0.1), optim.sgd(0.5)),
        200,
        np.linalg.solve(A + 0.1 * np.diag(MASK), A @ C),
        1e-12,
    ),  # [4e-16]
    "clip_by_global_norm_sgd": (
        lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(0.5)), 200, C, 1e-12,
    ),  # [2e-16]
}


@pytest.mark.slow  # a convergence sweep (up to 3,000 steps each)
@pytest.mark.parametrize("name", sorted(QUADRATIC))
def test_every_optimizer_reaches_the_minimum_of_a_convex_quadratic(name):
    make, steps, minimum, tol = QUADRATIC[name]
    center = C_W0 if minimum is C_W0 else C
    start = _tree(X0)
    final = _vector(_run(make(), steps, lambda p: jax.grad(_quadratic)(p, center), start))
    assert np.abs(X0 - minimum).max() > 0.5  # it starts far away
    assert np.abs(final - minimum).max() <= tol, (name, np.abs(final - minimum).max())


def _rosenbrock_grad(p):
    """∇ of ``f(x, y) = (1 − x)² + 100 (y − x²)²``, minimum 0 at ``(1, 1)``."""
    x, y = p[0], p[1]
    return jnp.stack([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


# name: (optimizer, steps, required max |(x, y) − (1, 1)|; observed in brackets), from (−1.2, 1)
ROSENBROCK = {
    "momentum": (lambda: optim.momentum(2e-3, momentum=0.9), 5000, 1e-8),  # [2e-15]
    "nesterov": (lambda: optim.nesterov(1e-3, momentum=0.9), 5000, 1e-8),  # [7e-10]
    "rmsprop": (lambda: optim.rmsprop(schedules.exponential_decay(1e-2, 0.01, 5000)), 5000, 1e-2),  # [3e-3]
    "adam": (lambda: optim.adam(1e-2), 5000, 1e-3),  # [4e-5]
}


@pytest.mark.parametrize("name", sorted(ROSENBROCK))
def test_rosenbrock(name):
    make, steps, tol = ROSENBROCK[name]
    final = np.asarray(_run(make(), steps, _rosenbrock_grad, jnp.array([-1.2, 1.0])))
    assert np.abs(final - 1).max() <= tol, (name, final)


def test_newton_solves_a_quadratic_in_one_step():
    opt = optim.newton(_quadratic)
    params = _tree(X0)
    updates, _ = jax.jit(opt.update)(jax.grad(_quadratic)(params), opt.init(params), params)
    assert np.abs(_vector(optim.apply_updates(params, updates)) - C).max() <= 1e-10


def test_newton_step_is_first_over_second_derivative():
    def f(theta):  # f' = θ³ − 1, f'' = 3θ²
        return jnp.sum(theta**4 / 4 - theta)

    theta = jnp.array([2.0, -0.5, 3.0])
    opt = optim.newton(f, learning_rate=0.5)
    updates, _ = jax.jit(opt.update)(jax.grad(f)(theta), opt.init(theta), theta)
    t = np.asarray(theta)
    np.testing.assert_allclose(updates, -0.5 * (t**3 - 1) / (3 * t**2), rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# jit, dtypes, state.


@pytest.mark.parametrize(
    "learning_rate, make",
    [
        (schedules.inverse_sqrt(0.1), optim.sgd),
        (schedules.linear_warmup(0.1, 2, schedules.cosine_decay(0.1, 10)), optim.adamw),
        (
            schedules.step_decay(0.1, 0.5, 1),
            lambda lr: optim.skip_nonfinite(optim.rmsprop(lr, centered=True, momentum=0.5)),
        ),
        (0.05, optim.nesterov),
    ],
)
def test_jitted_steps_trace_once_even_when_the_learning_rate_changes(learning_rate, make):
    opt = make(learning_rate)
    traces = []

    def step(params, state):
        traces.append(None)  # runs only while tracing
        updates, state = opt.update(jax.grad(_quadratic)(params), state, params)
        return optim.apply_updates(params, updates), state

    jstep = jax.jit(step, donate_argnums=(0, 1))
    params = _tree(X0)
    state = opt.init(params)
    rates = []
    for _ in range(5):
        rates.append(float(optim.current_learning_rate(learning_rate, state)))
        params, state = jstep(params, state)
    assert len(traces) == 1 and jstep._cache_size() == 1
    assert len(set(rates)) == (5 if callable(learning_rate) else 1)  # a schedule changed the rate every step


def _slow_but(names, *fast):
    """``names`` as parameters, all but ``fast`` marked slow: the fast tier keeps a few representative cases."""
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


MIXED = [{"W": jnp.float32, "b": jnp.float32}, {"W": jnp.float64, "b": jnp.float64}]


@pytest.mark.parametrize("name", _slow_but(sorted(CASES), "adam_cosine", "rmsprop_centered_momentum", "newton_damped"))
def test_state_and_params_keep_their_dtypes_through_jitted_steps(name):
    opt = CASES[name][0]()
    params = [{k: leaf.astype(MIXED[l][k]) for k, leaf in layer.items()} for l, layer in enumerate(_tree(X0))]
    dtype_of_shape = {x.shape: x.dtype for x in jax.tree.leaves(params)}  # the four shapes differ
    state = opt.init(params)
    before = [(x.shape, x.dtype) for x in jax.tree.leaves(state)]

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(_quadratic)(params), state, params)
        return optim.apply_updates(params, updates), state

    for _ in range(4):
        params, state = step(params, state)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == before
    for x in jax.tree.leaves(state):
        assert not x.weak_type
        if jnp.issubdtype(x.dtype, jnp.integer):
            assert x.dtype == jnp.int32 and x.shape == ()  # step counters
        else:
            assert x.dtype == dtype_of_shape[x.shape]  # a moment has its param's dtype
    for layer, dtypes in zip(params, MIXED):
        for k in KEYS:
            assert layer[k].dtype == dtypes[k] and not layer[k].weak_type


def _as_float32(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


@pytest.mark.parametrize("name", _slow_but(sorted(n for n in CASES if not n.startswith("newton")),  # no bfloat16 solver
                                           "adam", "rmsprop_centered_momentum"))
def test_bfloat16_params_keep_their_dtype_and_get_the_float32_update(name):
    """Catches (1) a param or state leaf that leaves bfloat16 (or int32), or turns weakly typed,
    through jitted steps, and (2) arithmetic done in bfloat16 that cannot hold the
    hyper-parameters: there β₂ = 0.999 rounds to 1, Adam's 1 − β₂^t to 0 and its update to 0.

    Each step's bfloat16 update is compared with the float32 update from the same point and state
    (cast up); they agree to bfloat16's rounding (2⁻⁸ ≈ 0.4 %; at most ~1 % seen).
    """
    opt = CASES[name][0]()
    params = [{k: leaf.astype(jnp.bfloat16) for k, leaf in layer.items()} for layer in _tree(X0)]
    state = opt.init(params)
    before = [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
    update = jax.jit(opt.update)
    for _ in range(5):
        grads = jax.grad(_quadratic)(params)
        updates, new_state = update(grads, state, params)
        reference, _ = update(_as_float32(grads), _as_float32(state), _as_float32(params))
        assert rel_err(_vector(updates), _vector(reference)) < 3e-2
        params, state = jax.jit(optim.apply_updates)(params, updates), new_state
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == before
    for x in jax.tree.leaves((params, state)):
        assert x.dtype in (jnp.bfloat16, jnp.int32) and not x.weak_type


LEAF_SHAPES = [(), (3,), (2, 3)]


@st.composite
def _trees(draw):
    """A list of 1–3 dicts of leaves; each leaf a (shape, dtype) from a small pool (few compilations)."""
    layers = draw(st.lists(st.dictionaries(st.sampled_from(["W", "b", "gamma"]), st.tuples(
        st.sampled_from(LEAF_SHAPES), st.sampled_from([np.float32, np.float64])), min_size=1), min_size=1, max_size=3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return [{k: jnp.asarray(rng.normal(size=shape), dtype) for k, (shape, dtype) in layer.items()} for layer in layers]


@pytest.mark.slow  # a property sweep
@settings(max_examples=15)
@given(params=_trees(), updates_dtype=st.sampled_from([np.float32, np.float64]))
def test_apply_updates_and_adamw_keep_shapes_and_dtypes_of_any_tree(params, updates_dtype):
    leaves = jax.tree.leaves(params)
    updates = jax.tree.unflatten(jax.tree.structure(params), [jnp.full(x.shape, 0.5, updates_dtype) for x in leaves])
    new = optim.apply_updates(params, updates)
    for p, n in zip(leaves, jax.tree.leaves(new)):
        assert n.shape == p.shape and n.dtype == p.dtype and not n.weak_type
        np.testing.assert_allclose(n, (np.asarray(p, np.float64) + 0.5).astype(p.dtype), rtol=1e-6)
    # a full optimizer on the same tree, with gradients of the other dtype: its state keeps the params' dtypes
    opt = optim.adamw(0.1, weight_decay=0.5)
    state = opt.init(params)
    for _ in range(2):
        grads, state = opt.update(updates, state, params)
        params = optim.apply_updates(params, grads)
    adam_state = state[0]
    assert adam_state.count.dtype == jnp.int32 and int(adam_state.count) == 2
    for p, m, v in zip(jax.tree.leaves(params), jax.tree.leaves(adam_state.mu), jax.tree.leaves(adam_state.nu)):
        assert p.dtype == m.dtype == v.dtype and p.shape == m.shape == v.shape
    assert jax.tree.structure(optim.weights_only(params)) == jax.tree.structure(params)


def test_chain_state_is_the_tuple_of_inner_states_and_mixes_foreign_transforms():
    double = optim.GradientTransformation(lambda p: (), lambda g, s, p=None: (jax.tree.map(lambda x: 2 * x, g), s))
    opt = optim.chain(optim.scale_by_adam(), double, optim.scale_by_learning_rate(0.1))
    params = _tree(X0)
    state = opt.init(params)
    assert isinstance(state, tuple) and len(state) == 3
    assert isinstance(state[0], optim.AdamState) and state[1] == ()
    assert isinstance(state[2], optim.ScaleByLearningRateState)
    u_chain, _ = opt.update(params, state, params)
    u_adam, _ = optim.adam(0.2).update(params, optim.adam(0.2).init(params), params)
    for a, b in zip(jax.tree.leaves(u_chain), jax.tree.leaves(u_adam)):
        np.testing.assert_allclose(a, b, rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# Adam, weight decay, clipping, skipping.


def test_adam_regression_first_moment_and_per_leaf_state():
    """Catches the two bugs of a widely copied classroom Adam (see each assertion)."""
    params = [{"W": jnp.zeros((2, 2)), "b": jnp.zeros(2)}]
    grads = [{"W": jnp.full((2, 2), -3.0), "b": jnp.array([0.5, -0.25])}]
    opt = optim.adam(0.1, b1=0.9, b2=0.999, eps=1e-12)
    updates, state = opt.update(grads, opt.init(params), params)
    adam_state = state[0]
    # Bug 1, g ⊙ g accumulated into the first moment: m would be (1 − β₁) g² ≥ 0 and the step
    # −α m̂/√v̂ = −α|g| would push θ down for every gradient. The first moment must be
    # (1 − β₁) g, sign included, and the first step −α sign(g) (m̂ = g, v̂ = g² after correction).
    np.testing.assert_allclose(adam_state.mu[0]["W"], 0.1 * -3.0, rtol=1e-15)
    np.testing.assert_allclose(adam_state.nu[0]["W"], 0.001 * 9.0, rtol=1e-15)
    np.testing.assert_allclose(updates[0]["W"], 0.1, rtol=1e-10)  # g < 0 → θ goes up by α
    np.testing.assert_allclose(updates[0]["b"], [-0.1, 0.1], rtol=1e-10)
    # Bug 2, biases updated with the weights' moments (one m, v shared by all leaves): each leaf
    # must own moments of its own shape, and the biases' trajectory must be exactly that of Adam
    # run on the biases alone, however large and varied the weights' gradients are.
    assert adam_state.mu[0]["b"].shape == (2,) and adam_state.nu[0]["b"].shape == (2,)
    both, alone = params, [{"b": params[0]["b"]}]
    s_both, s_alone = opt.init(both), opt.init(alone)
    for t in range(10):
        g_b = jnp.array([0.5, -0.25]) * (1 + 0.1 * t)
        g_both = [{"W": jnp.full((2, 2), 100.0 * (-1) ** t), "b": g_b}]
        u_both, s_both = opt.update(g_both, s_both, both)
        u_alone, s_alone = opt.update([{"b": g_b}], s_alone, alone)
        both, alone = optim.apply_updates(both, u_both), optim.apply_updates(alone, u_alone)
        np.testing.assert_array_equal(both[0]["b"], alone[0]["b"])


def _decay_run(opt, steps=3):
    """``steps`` updates with zero gradients from ``_tree(X0)``: only weight decay moves θ."""
    params = _tree(X0)
    state = opt.init(params)
    zeros = _tree(np.zeros(N))
    for _ in range(steps):
        updates, state = opt.update(zeros, state, params)
        params = optim.apply_updates(params, updates)
    return params


@pytest.mark.parametrize(
    "make",
    [
        lambda mask: optim.adamw(0.1, weight_decay=0.5, mask=mask),
        lambda mask: optim.chain(optim.add_decayed_weights(0.5, mask=mask), optim.sgd(0.1)),
    ],
)
def test_weight_decay_masks(make):
    start = _tree(X0)
    shrink = (1 - 0.1 * 0.5) ** 3  # θ ← θ − αλθ three times (AdamW's m̂ = 0 with zero gradients)
    custom = [{"W": False, "b": True}, {"W": True, "b": False}]
    masks = {
        "default": (optim.weights_only, [{"W": True, "b": False}] * 2),
        "tree": (custom, custom),
        "callable": (lambda params: custom, custom),
    }
    for mask, expected in masks.values():
        final = _decay_run(make(mask))
        for layer0, layer, decayed in zip(start, final, expected):
            for k in KEYS:
                if decayed[k]:
                    np.testing.assert_allclose(layer[k], layer0[k] * shrink, rtol=1e-14)
                else:  # untouched, bit for bit
                    np.testing.assert_array_equal(layer[k], layer0[k])
    # the default of both is "weights only"
    default = _decay_run(optim.adamw(0.1, weight_decay=0.5))
    np.testing.assert_array_equal(default[0]["b"], start[0]["b"])
    np.testing.assert_allclose(default[0]["W"], start[0]["W"] * shrink, rtol=1e-14)
    assert optim.weights_only(start) == [{"W": True, "b": False}] * 2


def test_clip_by_global_norm():
    clip = optim.clip_by_global_norm(1.0)
    small = [{"W": jnp.full((2, 2), 0.1), "b": jnp.array([0.1, 0.2])}]
    out, _ = clip.update(small, clip.init(small))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(small)):
        np.testing.assert_array_equal(a, b)  # shorter than max_norm: unchanged
    big = [{"W": jnp.full((2, 2), 3.0), "b": jnp.array([4.0, -12.0])}]  # norm √(36 + 160) = 14
    out, _ = clip.update(big, clip.init(big))
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])
    np.testing.assert_allclose(np.linalg.norm(flat), 1.0, rtol=1e-14)
    np.testing.assert_allclose(flat, np.concatenate([np.full(4, 3.0), [4.0, -12.0]]) / 14, rtol=1e-14)
    # float32 gradients whose Σ g² overflows (norm 1.4e20): clipped all the same, not zeroed
    huge = [{"W": jnp.full((2, 2), 3e19, jnp.float32), "b": jnp.array([4e19, -12e19], jnp.float32)}]
    out, _ = jax.jit(clip.update)(huge, clip.init(huge))
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])
    np.testing.assert_allclose(flat, np.concatenate([np.full(4, 3.0), [4.0, -12.0]]) / 14, rtol=1e-6)


def test_skip_nonfinite_skips_and_counts():
    inner = optim.adam(0.1)
    opt = optim.skip_nonfinite(inner)
    params = _tree(X0)
    good = _tree(_grad(X0, 0))
    update = jax.jit(opt.update)
    u1, s1 = update(good, opt.init(params), params)
    for bad_value in (np.nan, np.inf):
        bad = _tree(np.where(np.arange(N) == 5, bad_value, _grad(X0, 1)))
        u2, s2 = update(bad, s1, params)
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(u2))  # zero update
        for a, b in zip(jax.tree.leaves(s2.inner), jax.tree.leaves(s1.inner)):  # inner state kept
            np.testing.assert_array_equal(a, b)
        assert s2.skipped.dtype == jnp.int32 and int(s2.skipped) == 1
    # the next finite update is the one the inner optimizer makes, as if the bad step never happened
    u3, s3 = update(good, s2, params)
    _, r1 = inner.update(good, inner.init(params), params)
    want, _ = inner.update(good, r1, params)
    for a, b in zip(jax.tree.leaves(u3), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-14)  # jit and eager may round differently
    assert int(s3.skipped) == 1 and int(s3.inner[0].count) == 2


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: optim.sgd(-0.1), r"learning_rate .*got -0\.1"),
        (lambda: optim.sgd(float("nan")), r"learning_rate .*got nan"),
        (lambda: optim.adam(-1e-3), r"learning_rate .*got -0\.001"),
        (lambda: optim.momentum(0.1, momentum=1.0), r"momentum .*\[0, 1\).*got 1\.0"),
        (lambda: optim.momentum(0.1, momentum=-0.5), r"momentum .*got -0\.5"),
        (lambda: optim.nesterov(0.1, momentum=1.5), r"momentum .*got 1\.5"),
        (lambda: optim.adagrad(0.1, eps=-1e-7), r"eps .*got -1e-07"),
        (lambda: optim.rmsprop(0.1, decay=1.0), r"decay .*\[0, 1\).*got 1\.0"),
        (lambda: optim.rmsprop(0.1, decay=-0.1), r"decay .*got -0\.1"),
        (lambda: optim.rmsprop(0.1, momentum=1.0), r"momentum .*got 1\.0"),
        (lambda: optim.rmsprop(0.1, centered=True, eps=-1.0), r"eps .*got -1\.0"),
        (lambda: optim.adam(0.1, b1=1.0), r"b1 .*\[0, 1\).*got 1\.0"),
        (lambda: optim.adam(0.1, b1=-0.1), r"b1 .*got -0\.1"),
        (lambda: optim.adam(0.1, b2=1.5), r"b2 .*got 1\.5"),
        (lambda: optim.adam(0.1, eps=-1e-8), r"eps .*got -1e-08"),
        (lambda: optim.adamw(0.1, weight_decay=-1e-4), r"weight_decay .*got -0\.0001"),
        (lambda: optim.add_decayed_weights(-0.1), r"weight_decay .*got -0\.1"),
        (lambda: optim.clip_by_global_norm(0.0), r"max_norm .*\(0, inf\).*got 0\.0"),
        (lambda: optim.newton(_quadratic, damping=-1.0), r"damping .*got -1\.0"),
        (lambda: optim.newton(_quadratic, learning_rate=-1.0), r"learning_rate .*got -1\.0"),
    ],
)
def test_bad_hyper_parameters_raise_value_error_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim.sgd("0.1"),
        lambda: optim.sgd(True),
        lambda: optim.newton("not a function"),
        lambda: optim.chain(optim.sgd(0.1), "not a transform"),
        lambda: optim.skip_nonfinite(3),
        lambda: optim.add_decayed_weights(0.1, mask=[{"W": 1.0, "b": 0.0}]),
        lambda: optim.adamw(0.1, mask=None),
        lambda: optim.adam(0.1).init([{"W": jnp.zeros((2, 2), jnp.int32)}]),
    ],
)
def test_wrong_types_raise_type_error(make):
    with pytest.raises(TypeError):
        make()


def test_mismatched_trees_and_missing_params_raise_value_error():
    params = _tree(X0)
    opt = optim.adam(0.1)
    state = opt.init(params)
    with pytest.raises(ValueError, match="tree structures differ"):
        opt.update(params[:1], state, params)
    transposed = [{"W": params[0]["W"].T, "b": params[0]["b"]}, params[1]]
    with pytest.raises(ValueError, match=r"leaf shapes differ at \[0\]\['W'\]: \(4, 3\) and \(3, 4\)"):
        opt.update(transposed, state, params)
    with pytest.raises(ValueError, match="tree structures differ"):
        optim.apply_updates(params, params[0])
    with pytest.raises(ValueError, match="needs the params"):
        optim.adamw(0.1).update(params, optim.adamw(0.1).init(params))
    with pytest.raises(ValueError, match="needs the params"):
        optim.newton(_quadratic).update(params, optim.newton(_quadratic).init(params))
    with pytest.raises(ValueError, match="tuple of 2 states"):
        opt.update(params, state[:1], params)
    with pytest.raises(ValueError, match="floating scalar"):
        optim.sgd(lambda t: jnp.ones(3)).update(params, optim.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="exactly one ScaleByLearningRateState"):
        optim.current_learning_rate(0.1, optim.clip_by_global_norm(1.0).init(params))


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "newton"])
def test_optimizer_docstrings_state_formula_and_reference(name):
    doc = getattr(optim, name).__doc__
    assert "θ ←" in doc and "Reference" in doc


# ---------------------------------------------------------------------------------------------
# Self-description: name and hyper-parameters as JSON data, and back.


RECORDED = {  # every public optimizer that records itself, with hyper-parameters other than the defaults
    "sgd": lambda: optim.sgd(0.1),
    "momentum": lambda: optim.momentum(0.05, momentum=0.8),
    "nesterov": lambda: optim.nesterov(0.05, 0.85),
    "adagrad": lambda: optim.adagrad(learning_rate=0.3, eps=1e-6),
    "rmsprop": lambda: optim.rmsprop(0.005, decay=0.8, centered=True, momentum=0.5),
    "adam": lambda: optim.adam(0.05, b1=0.8, b2=np.float32(0.99)),
    "adamw": lambda: optim.adamw(0.05, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_optimizer_describes_itself_and_is_rebuilt_bit_for_bit(name):
    """Catches a recorded optimizer that no longer unpacks as ``(init, update)``, a description that
    is not JSON or loses a hyper-parameter (a default, a positional argument), and a rebuild that
    differs in any bit over a few updates."""
    opt = RECORDED[name]()
    init, update = opt
    assert isinstance(opt, optim.GradientTransformation) and len(opt) == 2 and opt.name == name
    description = optim.describe(opt)
    assert json.loads(json.dumps(description)) == description
    assert description["name"] == name
    assert list(description["hyperparams"]) == list(inspect.signature(getattr(optim, name)).parameters)
    rebuilt = optim.from_description(json.loads(json.dumps(description)))
    assert optim.describe(rebuilt) == description
    params = _tree(X0, jnp.float32)
    s1, s2 = init(params), rebuilt.init(params)
    for t in range(3):
        g = _tree(_grad(_vector(params), t), jnp.float32)
        (u1, s1), (u2, s2) = update(g, s1, params), rebuilt.update(g, s2, params)
        for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        params = optim.apply_updates(params, u1)


def test_described_values():
    """Numbers are floats; the default mask is a function of fnn.optim, stored by name; a schedule
    is marked as not stored, and such an optimizer is not rebuilt from its description."""
    assert optim.describe(optim.adamw(1))["hyperparams"] == {
        "learning_rate": 1.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-4,
        "mask": {"function": "weights_only"}}
    assert optim.describe(optim.rmsprop(0.1))["hyperparams"]["centered"] is False
    scheduled = optim.describe(optim.sgd(schedules.cosine_decay(0.1, 10)))
    assert scheduled["hyperparams"]["learning_rate"] == {"not_stored": "fnn.schedules.cosine_decay.<locals>.schedule"}
    with pytest.raises(ValueError, match="learning_rate is fnn.schedules.cosine_decay"):
        optim.from_description(scheduled)


@pytest.mark.parametrize("description, match", [
    ({"name": "lion", "hyperparams": {}}, "unknown optimizer 'lion'"),
    ({"name": "sgd", "hyperparams": {"learning_rate": 0.1, "b1": 0.9}}, "sgd takes no hyper-parameter b1"),
    ({"name": "adamw", "hyperparams": {"learning_rate": 0.1, "mask": {"function": "print"}}}, "names no function"),
    ({"hyperparams": {}}, "an optimizer description is"),
])
def test_bad_descriptions_raise_value_error(description, match):
    with pytest.raises(ValueError, match=match):
        optim.from_description(description)


def test_transforms_that_record_nothing_cannot_be_described_and_optimizers_are_immutable():
    for opt in (optim.chain(optim.trace(0.9), optim.sgd(0.1)), optim.newton(_quadratic)):
        with pytest.raises(TypeError, match="record how they were built"):
            optim.describe(opt)
    with pytest.raises(AttributeError, match="immutable"):
        optim.adam(0.1).name = "sgd"


def test_step_counters_saturate_instead_of_wrapping():
    params = _tree(X0)
    top = jnp.asarray(2**31 - 1, jnp.int32)
    opt = optim.adam(schedules.inverse_sqrt(0.1))
    state = opt.init(params)
    state = (state[0]._replace(count=top), state[1]._replace(count=top))
    updates, state = opt.update(params, state, params)
    assert int(state[0].count) == int(state[1].count) == 2**31 - 1  # not −2³¹: the step stays valid
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_step_is_update_then_add_and_keeps_dtypes():
    params = [{"W": jnp.ones((2, 3), jnp.float32), "b": jnp.arange(2.0, dtype=jnp.bfloat16)}]
    grads = [{"W": jnp.full((2, 3), 0.5, jnp.float32), "b": jnp.ones(2, jnp.bfloat16)}]
    opt = optim.momentum(0.1, 0.9)
    new, state = optim.step(opt, grads, opt.init(params), params)
    np.testing.assert_allclose(new[0]["W"], np.ones((2, 3)) - 0.1 * 0.5, rtol=1e-7)  # first step: v = g
    np.testing.assert_allclose(np.asarray(new[0]["b"], np.float32), np.arange(2.0) - 0.1, rtol=1e-2)
    assert [leaf.dtype for leaf in jax.tree.leaves(new)] == [jnp.float32, jnp.bfloat16]  # W, b
    np.testing.assert_allclose(state[0].velocity[0]["W"], np.full((2, 3), 0.5))


def test_scheduled_learning_rate_of_the_next_and_the_last_update():
    opt = optim.adam(schedules.step_decay(0.1, 0.5, 2))
    params = _tree(X0)
    state = opt.init(params)
    assert float(optim.scheduled_learning_rate(opt, state, -1)) == pytest.approx(0.1)  # clamped at step 0
    for t in range(5):
        assert float(optim.scheduled_learning_rate(opt, state)) == pytest.approx(0.1 * 0.5 ** (t // 2))
        params, state = optim.step(opt, _tree(_grad(_vector(params), t)), state, params)
        assert float(optim.scheduled_learning_rate(opt, state, -1)) == pytest.approx(0.1 * 0.5 ** (t // 2))
    # a chain records no learning rate, and neither does a foreign wrapper
    chained = optim.chain(optim.scale_by_adam(), optim.scale_by_learning_rate(0.1))
    assert optim.scheduled_learning_rate(chained, chained.init(params)) is None
    wrapped = optim.skip_nonfinite(optim.sgd(0.1))
    assert optim.scheduled_learning_rate(wrapped, wrapped.init(params)) is None
    assert optim.skipped_updates(wrapped.init(params)) == 0 and optim.skipped_updates(state) is None
