"""Second-order optimizers on the hand-written curvature: K-FAC and Hessian-free.

Both are :class:`fnn.optim.BatchOptimizer`\\ s: pure ``(init, update)`` pairs like the rest of
:mod:`fnn.optim`, except that ``update(grads, state, params, batch)`` also reads the batch
``(x, y)`` the gradient was computed on, since their curvature comes from it. :func:`fnn.fit`,
:func:`fnn.train_step` and :func:`fnn.optim.step` pass it. Updates are added to the params
(``θ ← θ + u``) as everywhere in fnn. Both read the curvature through :mod:`fnn.curvature`; nothing
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

**Hessian-free** (Martens, "Deep learning via Hessian-free optimization", ICML 2010): the update is
``d ≈ −(G + λI)⁻¹ ∇C`` by ``cg_iters`` iterations of conjugate gradient on the damped Gauss-Newton
products (:func:`fnn.curvature.product_operator`: the forward pass once per step), warm-started
from ``decay`` times the previous solution; the damping follows the Levenberg–Marquardt rule on the reduction ratio
``ρ = (C(θ + d) − C(θ)) / (q(d) − q(0))``, ``q(d) = ∇Cᵀd + ½dᵀ(G + λI)d`` (the model CG minimized,
read off CG's residual ``r``: ``q(d) = ½∇Cᵀd − ½rᵀd``, no product more):
``λ ← 3λ/2`` if ``ρ < 1/4``, ``λ ← 2λ/3`` if ``ρ > 3/4``. ``C(θ + d)`` is one more forward pass on the
batch. A step that does not lower the cost on the batch (``C(θ + d) ≥ C(θ)``, or not finite) is
rejected, as in Levenberg–Marquardt: the update is 0 and ``λ ← 3λ/2``. Martens' backtracking over
the CG iterates is left out: an accepted update is ``α d``.

Both are self-describing (:func:`fnn.optim.describe`, network and loss included), so a checkpoint
saved with ``opt=`` rebuilds them and a resumed run continues bit for bit.

Both refuse what their curvature does not cover: batch-normalized networks (K-FAC: no Kronecker
factors for γ, β; Hessian-free: the Gauss-Newton split needs eval mode, which training is not) and
losses without a known second derivative or with none (mae, whose Gauss-Newton matrix is 0). A
:func:`fnn.fit` or :func:`fnn.train_step` with another network, loss or ``l2`` than the optimizer was
built for is refused (:func:`fnn.optim.check_built_for`). The L2 term: pass the ``l2`` that training uses, so that
the curvature (Hessian-free) and the quadratic model (K-FAC's rescaling) include ``βI``; K-FAC's
factors do not, and its damping plays that part.
"""

from __future__ import annotations

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
    """``count`` (int32); ``damping`` λ; ``previous``, the last CG solution (params' structure);
    ``rho``, the last reduction ratio (NaN before the first step)."""

    count: jax.Array
    damping: jax.Array
    previous: list
    rho: jax.Array


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
        net.check_params(params)
        dt = params[0]["W"].dtype
        A = [jnp.eye(p["W"].shape[1] + 1, dtype=dt) for p in params]
        G = [jnp.eye(p["W"].shape[0], dtype=dt) for p in params]
        return KfacState(_count(), A, G, A, G, jax.random.PRNGKey(seed))

    def inverses(A, G):
        out_a, out_g = [], []
        for a, g in zip(A, G):
            tiny = jnp.finfo(a.dtype).tiny
            pi = jnp.sqrt((jnp.trace(a) / a.shape[0]) / jnp.maximum(jnp.trace(g) / g.shape[0], tiny))
            root = jnp.sqrt(jnp.asarray(gamma, a.dtype))
            out_a.append(_spd_inverse(a + pi * root * jnp.eye(a.shape[0], dtype=a.dtype)))
            out_g.append(_spd_inverse(g + root / pi * jnp.eye(g.shape[0], dtype=g.dtype)))
        return out_a, out_g

    def update(grads, state, params, batch):
        x, y = batch
        key, sub = jax.random.split(state.key)
        factors = curvature.kronecker_factors(net, params, x, y, loss, key=None if exact else sub)
        first = state.count == 0
        A = [jnp.where(first, f.A, rho * a + (1 - rho) * f.A) for a, f in zip(state.A, factors)]
        G = [jnp.where(first, f.G, rho * g + (1 - rho) * f.G) for g, f in zip(state.G, factors)]
        # A batch with a non-finite value must not poison the running factors of every later step.
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(t)) for t in A + G]))
        A, G = ([jnp.where(finite, new, old) for new, old in zip(A, state.A)],
                [jnp.where(finite, new, old) for new, old in zip(G, state.G)])
        A_inv, G_inv = lax.cond(state.count % refresh == 0, lambda _: inverses(A, G),
                                lambda _: (state.A_inv, state.G_inv), None)
        delta = [_unbar(layer, gi @ _bar(g) @ ai) for layer, g, ai, gi in zip(params, grads, A_inv, G_inv)]
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


def _spd_inverse(m: jax.Array) -> jax.Array:
    """The inverse of a symmetric positive-definite matrix by its Cholesky factor (symmetric result)."""
    c = jax.scipy.linalg.cho_factor(m, lower=True)
    inv = jax.scipy.linalg.cho_solve(c, jnp.eye(m.shape[0], dtype=m.dtype))
    return (inv + inv.T) / 2


def hessian_free(net: MLP, loss: Loss | str, learning_rate: float = 1.0, damping: float = 1.0,
                 cg_iters: int = 20, decay: float = 0.95, l2: float = 0.0) -> BatchOptimizer:
    """Hessian-free optimization (module docstring) for ``net`` trained on ``loss``.

    Args:
      learning_rate: ``α`` applied to the CG solution (1 in the paper); damping: the initial λ > 0;
      cg_iters: CG iterations per step (a fixed budget, so the step compiles once); decay: the warm
        start ``decay · previous``; l2: the ``β`` of training (in the cost, the gradient and ``G``).
    """
    loss = _check_network(net, loss, "Hessian-free optimization")
    lam0 = real_in("damping", damping, 0.0, low_open=True)
    alpha = real_in("learning_rate", learning_rate, 0.0, low_open=True)
    warm = real_in("decay", decay, 0.0, 1.0)
    cg_iters = positive_int("cg_iters", cg_iters)
    l2 = real_in("l2", l2, 0.0)

    def init(params):
        net.check_params(params)
        dt = params[0]["W"].dtype
        return HessianFreeState(_count(), jnp.asarray(lam0, dt), jax.tree.map(jnp.zeros_like, params),
                                jnp.asarray(jnp.nan, dt))

    def update(grads, state, params, batch):
        x, y = batch
        lam = state.damping
        flat_g, unravel = ravel_pytree(grads)
        ggn = curvature.product_operator(net, params, x, y, loss, l2)  # the forward pass once, not per product

        def damped(v):
            return ravel_pytree(ggn(unravel(v)))[0] + lam * v

        d, r = _cg(damped, -flat_g, warm * ravel_pytree(state.previous)[0], cg_iters)
        model = 0.5 * jnp.vdot(flat_g, d) - 0.5 * jnp.vdot(r, d)  # q(d), as (G + λI)d = −∇C − r
        moved = jax.tree.map(lambda p, s: p + s.astype(p.dtype), params, unravel(d))
        before = loss(net.apply(params, x), y) + l2_penalty(params, l2)
        after = loss(net.apply(moved, x), y) + l2_penalty(moved, l2)
        rho = (after - before) / jnp.where(model < 0, model, -jnp.finfo(model.dtype).tiny)
        accept = after < before  # False for a NaN cost too
        lam = jnp.where(~accept | (rho < 0.25), lam * 1.5, jnp.where(rho > 0.75, lam * (2 / 3), lam))
        updates = jax.tree.map(lambda s, p: jnp.where(accept, alpha * s, 0).astype(p.dtype), unravel(d), params)
        # A non-finite solution (a batch with a NaN, say) must not become every later step's warm start.
        d = jnp.where(jnp.all(jnp.isfinite(d)), d, 0)
        return updates, HessianFreeState(_next(state.count), lam.astype(state.damping.dtype),
                                         unravel(d), rho.astype(state.rho.dtype))

    return BatchOptimizer(init, update, name="hessian_free", hyperparams=dict(
        net=net, loss=loss, learning_rate=learning_rate, damping=damping, cg_iters=cg_iters, decay=decay, l2=l2))


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


register(kfac, hessian_free)
