"""Second-order optimizers on the hand-written curvature: K-FAC and Hessian-free.

All three (:func:`kfac`, :func:`kfac_adaptive`, :func:`hessian_free`) are
:class:`fnn.optim.BatchOptimizer`\\ s: pure ``(init, update)`` pairs like the rest of :mod:`fnn.optim`,
except that ``update(grads, state, params, batch)`` also reads the batch ``(x, y)`` the gradient was
computed on, since their curvature comes from it. :func:`fnn.fit`, :func:`fnn.train_step` and
:func:`fnn.optim.step` pass it. Updates are added to the params (``θ ← θ + u``) as everywhere in fnn.
They read the curvature through :mod:`fnn.curvature`; nothing
here calls autodiff.

**K-FAC** (Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
curvature", ICML 2015). Per layer, with ``W̄ = [W | b]`` and its gradient ``∇W̄`` ``(n_l, n_{l−1}+1)``:

- running averages ``A ← ρA + (1−ρ)A_batch``, ``G ← ρG + (1−ρ)G_batch`` of the Kronecker factors
  (:func:`fnn.curvature.kronecker_factors`; sampled columns, or the exact ones with ``exact=True``),
  the first step taking the batch's factors as they are;
- Tikhonov damping ``γ`` split between the factors by the π-correction of §6.3,
  ``π = √((tr A / dim A) / (tr G / dim G))``, ``A + π√γ I`` and ``G + (√γ/π) I``;
- their inverses, refreshed every ``refresh`` steps (``T₃`` of the paper) and kept in the state;
- the update ``u = −α (G + (√γ/π)I)⁻¹ ∇W̄ (A + π√γI)⁻¹``;
- optionally (``rescale=True``) the step length ``α`` chosen by the exact quadratic model of §6.4
  along ``Δ = (G_d)⁻¹ ∇W̄ (A_d)⁻¹``: ``α* = ∇Cᵀ Δ / (Δᵀ G Δ + γ ‖Δ‖²)`` with ``G Δ`` by
  :func:`fnn.curvature.ggn_vp` (its ``G`` includes the L2 term ``β`` on the weights), capped at
  ``learning_rate``.

**K-FAC with momentum and adaptive damping** (:func:`kfac_adaptive`, §6.5–6.6 and §7 of the same
paper): the step ``δ = αΔ + μδ₀`` along the K-FAC proposal and the previous step, ``α, μ`` from the
exact quadratic model, the Levenberg–Marquardt ``λ`` and the factored damping ``γ`` adapted (its
docstring).

**Hessian-free** (Martens, "Deep learning via Hessian-free optimization", ICML 2010): the update is
``d ≈ −(G + λI)⁻¹ ∇C`` by conjugate gradient on the damped Gauss-Newton products
(:func:`fnn.curvature.product_operator`: the forward pass once per step) with Martens' stopping rule
and backtracking over its iterates (:func:`hessian_free`), warm-started from ``decay`` times the
previous solve's last iterate; the damping follows the Levenberg–Marquardt rule on the reduction ratio
``ρ = (C(θ + d) − C(θ)) / (q(d) − q(0))``, ``q(d) = ∇Cᵀd + ½dᵀ(G + λI)d`` (the model CG minimized,
read off CG's residual ``r``: ``q(d) = ½∇Cᵀd − ½rᵀd``, no product more):
``λ ← 3λ/2`` if ``ρ < 1/4``, ``λ ← 2λ/3`` if ``ρ > 3/4``. ``C(θ + d)`` is a forward pass on the batch
per candidate iterate (about ``log₁.₃`` of the iterations). A step that does not lower the cost on the
batch (``C(θ + d) ≥ C(θ)``, or not finite) is rejected, as in Levenberg–Marquardt: the update is 0 and
``λ ← 3λ/2``; an accepted update is ``α d``.

**Data-parallel** (``fnn.fit(..., mesh=...)``, :mod:`fnn.distributed`): the batch the optimizers
read is the step's batch, sharded by sample over the mesh, so every batch sum they take (the
Kronecker factors ``A_batch = āᵀā/B`` and ``G_batch``, each Gauss-Newton product ``G v``, the costs
of the quadratic model and of the backtracking) is a per-device sum that XLA's partitioner
all-reduces. The state (running factors, inverses, λ, CG's warm start) is replicated: the damped
inverses are computed from the all-reduced factors, the same on every device, and so is every step.
K-FAC's sampled columns are the single-device draws (JAX's random values do not depend on the
sharding). A run equals one device's to rounding, the sums being added in another order
(``tests/test_distributed.py``).

All are self-describing (:func:`fnn.optim.describe`, network and loss included), so a checkpoint
saved with ``opt=`` rebuilds them and a resumed run continues bit for bit.

All refuse what their curvature does not cover: batch-normalized networks (K-FAC: no Kronecker
factors for γ, β; Hessian-free: the Gauss-Newton split needs eval mode, which training is not) and
losses without a known second derivative or with none (mae, whose Gauss-Newton matrix is 0). A
:func:`fnn.fit` or :func:`fnn.train_step` with another network, loss or ``l2`` than the optimizer was
built for is refused (:func:`fnn.optim.check_built_for`). The L2 term: pass the ``l2`` that training uses, so that
the curvature (Hessian-free) and the quadratic model (K-FAC's rescaling) include ``βI``; K-FAC's
factors do not, and its damping plays that part.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from fnn import curvature
from fnn.checks import positive_int, real_in
from fnn.losses import Loss, check_output, l2_penalty, output_curvature, resolve
from fnn.mlp import MLP
from fnn.optim import BatchOptimizer, register
from fnn.schedules import Schedule, constant


class KfacState(NamedTuple):
    """``count`` (int32, updates done); per layer the running factors ``A``, ``G`` and the damped
    inverses ``A_inv``, ``G_inv`` from the last refresh; ``key`` for the sampled columns."""

    count: jax.Array
    A: list
    G: list
    A_inv: list
    G_inv: list
    key: jax.Array


class HessianFreeState(NamedTuple):
    """``count`` (int32); ``damping`` λ; ``previous``, the last CG iterate (params' structure);
    ``rho``, the last reduction ratio (NaN before the first step); ``cg_iterations`` (int32), how many
    CG iterations the last step ran."""

    count: jax.Array
    damping: jax.Array
    previous: list
    rho: jax.Array
    cg_iterations: jax.Array


def _count() -> jax.Array:
    return jnp.zeros((), jnp.int32)


def _next(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum (as fnn.optim's counters do)."""
    return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)


def _schedule(learning_rate) -> Schedule:
    return learning_rate if callable(learning_rate) else constant(real_in("learning_rate", learning_rate, 0.0))


def _check_network(net: MLP, loss, what: str) -> Loss:
    if not isinstance(net, MLP):
        raise TypeError(f"{what} needs the network (an fnn.MLP); got {type(net).__name__}.")
    if any(net.normalized):
        raise ValueError(
            f"{what} is not defined for batch-normalized networks: in training every sample depends on the "
            "whole batch, so the cost has no per-sample Gauss-Newton split (and γ, β have no Kronecker "
            "factors). Use a network without batch norm.")
    loss = check_output(resolve(loss), net.output)
    output_curvature(loss, net.output)  # refuses a loss without a known second derivative
    if loss.name == "mae":
        raise ValueError(f"{what} needs curvature, and mae has none: its second derivative is 0 wherever it "
                         "exists, so its Gauss-Newton matrix is 0 and the step would be the gradient over the "
                         "damping alone. Use mse or half_mse, or a first-order optimizer for mae.")
    return loss


def _bar(layer_grads) -> jax.Array:
    """``[∇W | ∇b]``, ``(n_l, n_{l−1}+1)``."""
    return jnp.concatenate([layer_grads["W"], layer_grads["b"][:, None]], axis=1)


def _unbar(layer, bar) -> dict:
    return {k: (bar[:, :-1] if k == "W" else bar[:, -1]) for k in layer}


def kfac(net: MLP, loss: Loss | str, learning_rate=1e-3, damping: float = 1e-3, decay: float = 0.95,
         refresh: int = 10, exact: bool = False, rescale: bool = False, l2: float = 0.0,
         seed: int = 0) -> BatchOptimizer:
    """K-FAC (module docstring) for ``net`` trained on ``loss``.

    Args:
      learning_rate: ``α`` or a schedule (with ``rescale``, the cap on the step length).
      damping: ``γ ≥ 0`` (0 only where the factors are invertible); decay: ``ρ ∈ [0, 1)`` of the
        running factors; refresh: steps between inverses (``T₃``); exact: ``G`` from the exact
        columns (KFLR) instead of one sampled column per example (KFAC); rescale: the step length
        from the exact quadratic model; l2: the ``β`` of training, for that model; seed: of the
        sampled columns.
    """
    loss = _check_network(net, loss, "K-FAC")
    schedule = _schedule(learning_rate)
    gamma = real_in("damping", damping, 0.0)
    rho = real_in("decay", decay, 0.0, 1.0, high_open=True)
    refresh = positive_int("refresh", refresh)
    l2 = real_in("l2", l2, 0.0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int (of the sampled columns' key); got {seed!r}.")

    def init(params):
        A, G = _identity_factors(net, params)
        return KfacState(_count(), A, G, A, G, jax.random.PRNGKey(seed))

    def update(grads, state, params, batch):
        x, y = batch
        key, A, G = _running_factors(net, params, batch, loss, exact, rho, state)
        root = jnp.sqrt(jnp.asarray(gamma, A[0].dtype))
        A_inv, G_inv = lax.cond(state.count % refresh == 0, lambda _: _damped_inverses(A, G, root),
                                lambda _: (state.A_inv, state.G_inv), None)
        delta = _kronecker_solve(params, grads, A_inv, G_inv)
        rate = jnp.asarray(schedule(state.count), grads[0]["W"].dtype)
        if rescale:
            gd = curvature.ggn_vp(net, params, x, y, loss, delta, l2)
            flat_d, flat_g, flat_gd = (ravel_pytree(t)[0] for t in (delta, grads, gd))
            curv = jnp.vdot(flat_d, flat_gd) + gamma * jnp.vdot(flat_d, flat_d)
            rate = jnp.minimum(rate, jnp.vdot(flat_g, flat_d) / jnp.maximum(curv, jnp.finfo(curv.dtype).tiny))
        updates = jax.tree.map(lambda d: (-rate * d).astype(d.dtype), delta)
        return updates, KfacState(_next(state.count), A, G, A_inv, G_inv, key)

    return BatchOptimizer(init, update, name="kfac", hyperparams=dict(
        net=net, loss=loss, learning_rate=learning_rate, damping=damping, decay=decay, refresh=refresh,
        exact=exact, rescale=rescale, l2=l2, seed=seed))


class KfacAdaptiveState(NamedTuple):
    """:class:`KfacState`'s fields, and ``damping`` λ (Levenberg–Marquardt, §6.5), ``gamma`` γ (the
    factored damping, §6.6), ``previous`` (the last update δ₀, params' structure) and ``rho`` (the last
    reduction ratio, NaN until one is computed)."""

    count: jax.Array
    A: list
    G: list
    A_inv: list
    G_inv: list
    key: jax.Array
    damping: jax.Array
    gamma: jax.Array
    previous: list
    rho: jax.Array


def kfac_adaptive(net: MLP, loss: Loss | str, damping: float = 150.0, decay: float = 0.95, refresh: int = 20,
                  adapt_every: int = 5, gamma_every: int = 20, exact: bool = False, l2: float = 0.0,
                  seed: int = 0) -> BatchOptimizer:
    """K-FAC with the momentum and the adaptive damping of Martens & Grosse (2015, §6.5–6.6 and §7).

    Per step, with the running factors and the damped inverses of :func:`kfac` (the factored damping
    ``γ`` in place of ``√γ``) and ``M̂(δ) = ½δᵀ(G + λI)δ + ∇Cᵀδ`` the damped quadratic model on the
    batch (``G`` the exact Gauss-Newton matrix with the L2 term ``βI``, by :func:`fnn.curvature.product_operator`):

    - the proposal ``Δ = −(G_d ⊗ A_d)⁻¹ ∇C`` (per layer ``−G_d⁻¹ ∇W̄ A_d⁻¹``);
    - **momentum (§7)**: ``δ = αΔ + μδ₀``, ``δ₀`` the previous update, with ``(α, μ)`` minimizing ``M̂`` over
      that plane: the 2 × 2 system ``[[ΔᵀĜΔ, ΔᵀĜδ₀], [δ₀ᵀĜΔ, δ₀ᵀĜδ₀]] [α, μ]ᵀ = −[∇CᵀΔ, ∇Cᵀδ₀]ᵀ``,
      ``Ĝ = G + λI`` (two Gauss-Newton products per step; at the first step, or whenever the system is
      singular, ``μ = 0`` and ``α = −∇CᵀΔ / ΔᵀĜΔ``, the rescaling of §6.4);
    - **λ (§6.5)**, every ``adapt_every`` steps (``T₁``): the reduction ratio
      ``ρ = (C(θ + δ) − C(θ)) / M(δ)`` against the undamped model ``M(δ) = ½δᵀGδ + ∇Cᵀδ`` (two forward
      passes more), and ``λ ← ω₁λ`` if ``ρ > 3/4``, ``λ ← λ/ω₁`` if ``ρ < 1/4`` or ``ρ`` is not a number,
      ``ω₁ = (19/20)^T₁``;
    - **γ (§6.6)**, every ``gamma_every`` steps (``T₂``): the inverses are formed for ``γ ∈ {ω₂γ, γ, γ/ω₂}``,
      ``ω₂ = (19/20)^(T₂/2)``, and the ``γ`` whose step ``δ`` gives the lowest ``M̂(δ)`` is kept with its
      inverses; between those steps the inverses are refreshed every ``refresh`` steps (``T₃``) at the
      current ``γ``. ``γ`` starts at ``√(λ + β)``, as in the paper.

    The update is ``δ`` (``θ ← θ + δ``); a step whose ``δ`` is not finite (a batch with a NaN) is 0 and
    raises λ, and the next momentum starts from 0. Departures from the paper: no growing batch; the
    exponential averages start at the first batch's factors instead of ``min(1 − 1/k, ρ)``.

    Args:
      damping: the initial λ > 0 (150 in the paper's experiments); decay: ``ρ ∈ [0, 1)`` of the running
        factors; refresh, adapt_every, gamma_every: ``T₃``, ``T₁``, ``T₂`` (20, 5, 20 in the paper);
        exact: ``G`` factors from the exact columns (KFLR); l2: the ``β`` of training; seed: of the
        sampled columns.
    """
    loss = _check_network(net, loss, "K-FAC")
    lam0 = real_in("damping", damping, 0.0, low_open=True)
    rho_f = real_in("decay", decay, 0.0, 1.0, high_open=True)
    refresh, t1, t2 = (positive_int(n, v) for n, v in (("refresh", refresh), ("adapt_every", adapt_every),
                                                       ("gamma_every", gamma_every)))
    l2 = real_in("l2", l2, 0.0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int (of the sampled columns' key); got {seed!r}.")
    omega1, omega2 = (19 / 20) ** t1, (19 / 20) ** (t2 / 2)

    def init(params):
        A, G = _identity_factors(net, params)
        dt = A[0].dtype
        return KfacAdaptiveState(_count(), A, G, A, G, jax.random.PRNGKey(seed), jnp.asarray(lam0, dt),
                                 jnp.sqrt(jnp.asarray(lam0 + l2, dt)), jax.tree.map(jnp.zeros_like, params),
                                 jnp.asarray(jnp.nan, dt))

    def update(grads, state, params, batch):
        x, y = batch
        key, A, G = _running_factors(net, params, batch, loss, exact, rho_f, state)
        lam = state.damping
        flat_g, unravel = ravel_pytree(grads)
        prev = ravel_pytree(state.previous)[0]
        ggn = curvature.product_operator(net, params, x, y, loss, l2)
        g_prev = ravel_pytree(ggn(state.previous))[0]  # G δ₀, the same for every γ

        def proposal(A_inv, G_inv):
            """``(δ, M̂(δ), M(δ))`` for these inverses."""
            d = -ravel_pytree(_kronecker_solve(params, grads, A_inv, G_inv))[0]
            g_d = ravel_pytree(ggn(unravel(d)))[0]
            k11, k12, k22 = jnp.vdot(d, g_d), jnp.vdot(d, g_prev), jnp.vdot(prev, g_prev)
            n11, n12, n22 = jnp.vdot(d, d), jnp.vdot(d, prev), jnp.vdot(prev, prev)
            h11, h12, h22 = k11 + lam * n11, k12 + lam * n12, k22 + lam * n22
            b1, b2 = jnp.vdot(flat_g, d), jnp.vdot(flat_g, prev)
            det = h11 * h22 - h12 ** 2
            plane = (h22 > 0) & (det > 1e-12 * h11 * h22)  # δ₀ = 0, or parallel to Δ: the line alone
            safe = jnp.where(plane, det, 1)
            alpha = jnp.where(plane, (h12 * b2 - h22 * b1) / safe, -b1 / jnp.where(h11 > 0, h11, 1))
            mu = jnp.where(plane, (h12 * b1 - h11 * b2) / safe, 0)
            step = alpha * d + mu * prev
            quad = alpha ** 2 * k11 + 2 * alpha * mu * k12 + mu ** 2 * k22  # δᵀGδ
            norm = alpha ** 2 * n11 + 2 * alpha * mu * n12 + mu ** 2 * n22  # ‖δ‖²
            model = 0.5 * quad + alpha * b1 + mu * b2
            return step, model + 0.5 * lam * norm, model

        def choose_gamma(_):
            tries = [state.gamma * omega2, state.gamma, state.gamma / omega2]
            inv = [_damped_inverses(A, G, t) for t in tries]
            props = [proposal(*i) for i in inv]
            damped = jnp.asarray([p[1] for p in props])
            best = jnp.argmin(jnp.where(jnp.isfinite(damped), damped, jnp.inf))
            pick = lambda *xs: jnp.stack(xs)[best]  # noqa: E731
            return (jnp.stack(tries)[best], *jax.tree.map(pick, *[(*i, *p) for i, p in zip(inv, props)]))

        def keep_gamma(_):
            A_inv, G_inv = lax.cond(state.count % refresh == 0,
                                    lambda _: _damped_inverses(A, G, state.gamma),
                                    lambda _: (state.A_inv, state.G_inv), None)
            return (state.gamma, A_inv, G_inv, *proposal(A_inv, G_inv))

        gamma, A_inv, G_inv, step, _, model = lax.cond(state.count % t2 == 0, choose_gamma, keep_gamma, None)
        finite = jnp.all(jnp.isfinite(step))
        step = jnp.where(finite, step, 0)

        def reduction(_):
            moved = jax.tree.map(lambda p, s: p + s.astype(p.dtype), params, unravel(step))
            before = loss(net.apply(params, x), y) + l2_penalty(params, l2)
            after = loss(net.apply(moved, x), y) + l2_penalty(moved, l2)
            return (after - before) / jnp.where(model < 0, model, jnp.nan)

        rho = lax.cond(finite & (state.count % t1 == 0), reduction, lambda _: jnp.asarray(jnp.nan, model.dtype),
                       None)
        adapt = (state.count % t1 == 0) | ~finite
        lam = jnp.where(~adapt, lam, jnp.where(rho > 0.75, lam * omega1,
                                               jnp.where(rho >= 0.25, lam, lam / omega1)))
        updates = unravel(step)
        updates = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)
        return updates, KfacAdaptiveState(_next(state.count), A, G, A_inv, G_inv, key,
                                          lam.astype(state.damping.dtype), gamma.astype(state.gamma.dtype),
                                          updates, jnp.where(adapt, rho, state.rho).astype(state.rho.dtype))

    return BatchOptimizer(init, update, name="kfac_adaptive", hyperparams=dict(
        net=net, loss=loss, damping=damping, decay=decay, refresh=refresh, adapt_every=adapt_every,
        gamma_every=gamma_every, exact=exact, l2=l2, seed=seed))


def _identity_factors(net: MLP, params) -> tuple[list, list]:
    """Identity factors ``A^l``, ``G^l`` of every layer (the state before the first batch)."""
    net.check_params(params)
    dt = params[0]["W"].dtype
    return ([jnp.eye(p["W"].shape[1] + 1, dtype=dt) for p in params],
            [jnp.eye(p["W"].shape[0], dtype=dt) for p in params])


def _running_factors(net, params, batch, loss, exact, rho, state):
    """The state's key advanced, and the running factors ``A ← ρA + (1−ρ)A_batch`` (the batch's own at the
    first step), ``G`` likewise; a batch with a non-finite value leaves them as they were."""
    x, y = batch
    key, sub = jax.random.split(state.key)
    factors = curvature.kronecker_factors(net, params, x, y, loss, key=None if exact else sub)
    first = state.count == 0
    A = [jnp.where(first, f.A, rho * a + (1 - rho) * f.A) for a, f in zip(state.A, factors)]
    G = [jnp.where(first, f.G, rho * g + (1 - rho) * f.G) for g, f in zip(state.G, factors)]
    # A batch with a non-finite value must not poison the running factors of every later step.
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(t)) for t in A + G]))
    return (key, [jnp.where(finite, new, old) for new, old in zip(A, state.A)],
            [jnp.where(finite, new, old) for new, old in zip(G, state.G)])


def _damped_inverses(A, G, root) -> tuple[list, list]:
    """Per layer ``(A + π·root·I)⁻¹`` and ``(G + (root/π)·I)⁻¹``, ``π`` the trace-norm correction of §6.3;
    ``root`` is the factored damping (``√γ`` of :func:`kfac`, the ``γ`` of §6.6 in :func:`kfac_adaptive`)."""
    out_a, out_g = [], []
    for a, g in zip(A, G):
        tiny = jnp.finfo(a.dtype).tiny
        pi = jnp.sqrt((jnp.trace(a) / a.shape[0]) / jnp.maximum(jnp.trace(g) / g.shape[0], tiny))
        out_a.append(_spd_inverse(a + pi * root * jnp.eye(a.shape[0], dtype=a.dtype)))
        out_g.append(_spd_inverse(g + root / pi * jnp.eye(g.shape[0], dtype=g.dtype)))
    return out_a, out_g


def _kronecker_solve(params, grads, A_inv, G_inv) -> list:
    """Per layer ``G_d⁻¹ ∇W̄ A_d⁻¹`` in the params' structure."""
    return [_unbar(layer, gi @ _bar(g) @ ai) for layer, g, ai, gi in zip(params, grads, A_inv, G_inv)]


def _spd_inverse(m: jax.Array) -> jax.Array:
    """The inverse of a symmetric positive-definite matrix by its Cholesky factor (symmetric result)."""
    c = jax.scipy.linalg.cho_factor(m, lower=True)
    inv = jax.scipy.linalg.cho_solve(c, jnp.eye(m.shape[0], dtype=m.dtype))
    return (inv + inv.T) / 2


def hessian_free(net: MLP, loss: Loss | str, learning_rate: float = 1.0, damping: float = 1.0,
                 cg_iters: int = 250, decay: float = 0.95, l2: float = 0.0, cg_tol: float = 5e-4,
                 backtrack: bool = True, curvature_rows: int | None = None) -> BatchOptimizer:
    """Hessian-free optimization (module docstring) for ``net`` trained on ``loss``.

    Conjugate gradient as Martens (2010, §4.4–4.6) runs it, on ``φ(d) = ½dᵀ(G + λI)d + ∇Cᵀd``:

    - at most ``cg_iters`` iterations (250 in the paper), stopped at iteration ``i`` by the relative
      progress criterion: ``i > k``, ``φ(d_i) < 0`` and ``(φ(d_i) − φ(d_{i−k})) / φ(d_i) < k·cg_tol``
      with ``k = max(10, ⌊i/10⌋)`` (``cg_tol`` is the paper's ε = 5·10⁻⁴; 0 runs every iteration);
    - ``backtrack``: the iterates ``d_i`` at ``i = ⌈1.3^j⌉`` and the last are candidates, and the one with
      the lowest cost ``C(θ + d_i)`` on the batch is the step (the paper walks back from the last iterate
      while the cost falls; the two agree where the cost along the saved iterates has one minimum);
      ``ρ`` is computed for that step. The next solve starts from ``decay ·`` the *last* iterate, as in
      the paper;
    - ``curvature_rows``: the Gauss-Newton products use the batch's first ``curvature_rows`` rows, the
      gradient and the costs the whole batch (the paper: a smaller batch for the curvature).

    Args:
      learning_rate: ``α`` applied to the chosen solution (1 in the paper); damping: the initial λ > 0;
        cg_iters: the most CG iterations per step; decay: the warm start ``decay · previous``; l2: the
        ``β`` of training (in the cost, the gradient and ``G``); cg_tol, backtrack, curvature_rows: above.
    """
    loss = _check_network(net, loss, "Hessian-free optimization")
    lam0 = real_in("damping", damping, 0.0, low_open=True)
    alpha = real_in("learning_rate", learning_rate, 0.0, low_open=True)
    warm = real_in("decay", decay, 0.0, 1.0)
    cg_iters = positive_int("cg_iters", cg_iters)
    l2 = real_in("l2", l2, 0.0)
    tol = real_in("cg_tol", cg_tol, 0.0)
    if not isinstance(backtrack, bool):
        raise TypeError(f"backtrack must be True or False; got {backtrack!r}.")
    if curvature_rows is not None:
        curvature_rows = positive_int("curvature_rows", curvature_rows)
    saved = _backtrack_points(cg_iters) if backtrack else frozenset()

    def init(params):
        net.check_params(params)
        dt = params[0]["W"].dtype
        return HessianFreeState(_count(), jnp.asarray(lam0, dt), jax.tree.map(jnp.zeros_like, params),
                                jnp.asarray(jnp.nan, dt), jnp.zeros((), jnp.int32))

    def update(grads, state, params, batch):
        x, y = batch
        lam = state.damping
        flat_g, unravel = ravel_pytree(grads)
        xc, yc = x, y
        if curvature_rows is not None:
            if curvature_rows > x.shape[0]:
                raise ValueError(f"curvature_rows={curvature_rows} is more than the batch's {x.shape[0]} rows; "
                                 "pass at most the batch size (or None for the whole batch).")
            xc, yc = x[:curvature_rows], y[:curvature_rows]
        ggn = curvature.product_operator(net, params, xc, yc, loss, l2)  # the forward pass once, not per product

        def damped(v):
            return ravel_pytree(ggn(unravel(v)))[0] + lam * v

        def cost(d):
            moved = jax.tree.map(lambda p, s: p + s.astype(p.dtype), params, unravel(d))
            return loss(net.apply(moved, x), y) + l2_penalty(moved, l2)

        before = loss(net.apply(params, x), y) + l2_penalty(params, l2)
        last, d, after, model, iters = _martens_cg(damped, -flat_g, warm * ravel_pytree(state.previous)[0],
                                                   cg_iters, tol, saved, cost)
        rho = (after - before) / jnp.where(model < 0, model, -jnp.finfo(model.dtype).tiny)
        accept = after < before  # False for a NaN cost too
        lam = jnp.where(~accept | (rho < 0.25), lam * 1.5, jnp.where(rho > 0.75, lam * (2 / 3), lam))
        updates = jax.tree.map(lambda s, p: jnp.where(accept, alpha * s, 0).astype(p.dtype), unravel(d), params)
        # A non-finite solution (a batch with a NaN, say) must not become every later step's warm start.
        last = jnp.where(jnp.all(jnp.isfinite(last)), last, 0)
        return updates, HessianFreeState(_next(state.count), lam.astype(state.damping.dtype),
                                         unravel(last), rho.astype(state.rho.dtype), iters)

    return BatchOptimizer(init, update, name="hessian_free", hyperparams=dict(
        net=net, loss=loss, learning_rate=learning_rate, damping=damping, cg_iters=cg_iters, decay=decay, l2=l2,
        cg_tol=cg_tol, backtrack=backtrack, curvature_rows=curvature_rows))


def _backtrack_points(iters: int) -> frozenset:
    """The iterations ``⌈1.3^j⌉ ≤ iters`` whose CG iterates are candidates for the step (Martens 2010)."""
    points, j = set(), 0
    while math.ceil(1.3 ** j) <= iters:
        points.add(math.ceil(1.3 ** j))
        j += 1
    return frozenset(points)


def _martens_cg(matvec, b, x0, iters: int, tol: float, saved: frozenset, cost):
    """Conjugate gradient on ``M x = b`` from ``x0`` with Martens' stopping rule and candidate iterates
    (:func:`hessian_free`). Returns ``(last, chosen, cost(chosen), φ(chosen), iterations)``, with
    ``φ(x) = ½xᵀMx − bᵀx = −½xᵀ(b + r)`` read off the residual ``r = b − Mx`` (no product more)."""
    r0 = b - matvec(x0)
    dt = b.dtype
    is_saved = jnp.asarray([i in saved for i in range(iters + 1)])
    phi0 = -0.5 * jnp.vdot(x0, b + r0)
    start = dict(i=jnp.int32(0), x=x0, r=r0, p=r0, rr=jnp.vdot(r0, r0), phis=jnp.zeros(iters + 1, dt).at[0].set(phi0),
                 best=x0, best_cost=jnp.asarray(jnp.inf, dt), best_phi=phi0, done=jnp.bool_(False))

    def body(c):
        mp = matvec(c["p"])
        pmp = jnp.vdot(c["p"], mp)
        a = jnp.where(pmp > 0, c["rr"] / jnp.where(pmp > 0, pmp, 1), 0)
        x, r = c["x"] + a * c["p"], c["r"] - a * mp
        rr = jnp.vdot(r, r)
        beta = jnp.where(c["rr"] > 0, rr / jnp.where(c["rr"] > 0, c["rr"], 1), 0)
        i = c["i"] + 1
        phi = -0.5 * jnp.vdot(x, b + r)
        phis = c["phis"].at[i].set(phi)
        k = jnp.maximum(10, i // 10)
        old = phis[jnp.maximum(i - k, 0)]
        stop = (i > k) & (phi < 0) & ((phi - old) / jnp.where(phi < 0, phi, -1) < k * tol)
        candidate = is_saved[i] & ~(stop | (i == iters))  # the last iterate is weighed after the loop
        here = lax.cond(candidate, cost, lambda _: jnp.asarray(jnp.inf, dt), x)
        better = here < c["best_cost"]
        return dict(i=i, x=x, r=r, p=r + beta * c["p"], rr=rr, phis=phis, best=jnp.where(better, x, c["best"]),
                    best_cost=jnp.where(better, here, c["best_cost"]), best_phi=jnp.where(better, phi, c["best_phi"]),
                    done=stop)

    c = lax.while_loop(lambda c: ~c["done"] & (c["i"] < iters), body, start)
    last_cost = cost(c["x"])
    take_last = ~(c["best_cost"] <= last_cost)  # the last iterate unless an earlier one costs less
    chosen = jnp.where(take_last, c["x"], c["best"])
    return (c["x"], chosen, jnp.where(take_last, last_cost, c["best_cost"]),
            jnp.where(take_last, c["phis"][c["i"]], c["best_phi"]), c["i"])


def cg(matvec, b: jax.Array, x0: jax.Array, iters: int) -> jax.Array:
    """``iters`` iterations of conjugate gradient on ``M x = b`` (``M`` symmetric positive definite, as
    ``v ↦ matvec(v)``) from ``x0``; a fixed trip count (``lax.fori_loop``), stopping early only in
    effect: once the residual is exactly 0 the iterates stay put (Hestenes & Stiefel 1952)."""
    return _cg(matvec, b, x0, iters)[0]


def _cg(matvec, b: jax.Array, x0: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
    """:func:`cg`'s iterate and its residual ``r = b − M x`` (updated as CG does, with no product more)."""
    r = b - matvec(x0)

    def body(_, carry):
        x, r, p, rr = carry
        mp = matvec(p)
        pmp = jnp.vdot(p, mp)
        a = jnp.where(pmp > 0, rr / jnp.where(pmp > 0, pmp, 1), 0)
        x, r = x + a * p, r - a * mp
        rr_new = jnp.vdot(r, r)
        beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1), 0)
        return x, r, r + beta * p, rr_new

    x, r, *_ = lax.fori_loop(0, iters, body, (x0, r, r, jnp.vdot(r, r)))
    return x, r


register(kfac, kfac_adaptive, hessian_free)
