"""Learning rate: too small is slow, too large diverges, and the border is set by the curvature.

The first-order Taylor expansion of the cost around ``θ`` along the gradient step is

    C(θ − η∇C) = C(θ) − η‖∇C‖² + ½η² ∇Cᵀ H ∇C + O(η³),      H = ∇²C(θ),

so the predicted decrease ``η‖∇C‖²`` is the actual one only while ``η`` is small against the
curvature. On a quadratic ``C(θ) = C* + ½(θ − θ*)ᵀH(θ − θ*)`` gradient descent multiplies the error
along the eigenvector of ``λ_i`` by ``1 − ηλ_i`` each step, so it converges if and only if
``η < 2/λ_max``; after ``T`` steps the excess cost is ``½ Σ_i λ_i c_i² (1 − ηλ_i)^{2T}`` with ``c``
the initial error in the eigenbasis.

Three measurements:

1. **Quadratic.** Linear regression (``fnn.MLP((3, 1))``, MSE) on z-scored features
   ``(x, x², x³)`` of the 1-D regression set: ``H = (2/N) X̃ᵀX̃`` with ``X̃ = [X, 1]`` ``(N, 4)``,
   checked against ``jax.hessian`` of :func:`fnn.objective`. Full-batch gradient descent for a sweep
   of ``η``; the measured excess cost after ``T`` steps against the formula above.
2. **MLP.** A 1-32-32-1 tanh network on the same data (MSE), trained by full-batch
   gradient descent through :func:`fnn.fit` at several multiples of ``2/λ_max(θ₀)``, where
   ``λ_max(θ₀)`` (the sharpness at the initial parameters) comes from power iteration on
   Hessian-vector products (forward-mode differentiation of the manual backprop). A divergent run
   is stopped by ``fit``'s NaN guard, which reports the epoch and step.
3. **First step.** Predicted decrease ``η‖∇C‖²`` against the actual ``C(θ₀) − C(θ₀ − η∇C)`` for a
   range of ``η``, on both models.

Output: ``learning_rate.png`` (four panels) and ``learning_rate.json``.
"""

from __future__ import annotations

from typing import NamedTuple

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import fnn

MLP_FACTORS = (0.01, 0.1, 0.5, 1.0, 2.0, 4.0)  # η as multiples of 2/λ_max(θ₀)
CURVE_FACTORS = (0.02, 0.5, 0.95, 1.05)  # the quadratic's loss curves shown in panel (b)


class Problem(NamedTuple):
    """A model and its training data: ``x (N, n_0)``, ``y (N, n_L)``, both float32."""

    net: fnn.MLP
    params: list
    x: jax.Array
    y: jax.Array
    loss: fnn.Loss


def _features(x: np.ndarray) -> np.ndarray:
    """``x (N, 1) -> (N, 3)`` float32 columns ``x, x², x³``."""
    return np.hstack([x, x**2, x**3]).astype(np.float32)


def gd_costs(prob: Problem, etas, steps: int) -> jax.Array:
    """Full-batch gradient descent ``θ ← θ − η∇C`` for every ``η`` in ``etas (E,)``.

    Returns ``(E, steps + 1)``: the cost before each step and after the last one. Gradients come
    from :func:`fnn.backprop`; non-finite values are kept, so a divergent run shows as inf/NaN.
    """
    net, params, x, y, loss = prob

    def run(eta):
        def step(p, _):
            cost, grads = fnn.backprop(net, p, x, y, loss)
            return fnn.optim.apply_updates(p, jax.tree.map(lambda g: -eta * g, grads)), cost

        final, costs = jax.lax.scan(step, params, None, length=steps)
        return jnp.append(costs, fnn.objective(net, final, x, y, loss))

    return jax.jit(jax.vmap(run))(jnp.asarray(etas, x.dtype))


def first_step(prob: Problem, etas) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted, actual)`` first-step decreases, each ``(E,)``: ``η‖g‖²`` and ``C(θ₀) − C(θ₀ − ηg)``."""
    net, params, x, y, loss = prob

    @jax.jit
    def decreases(etas):
        cost, grads = fnn.backprop(net, params, x, y, loss)
        g2 = sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))

        def actual(eta):
            moved = fnn.optim.apply_updates(params, jax.tree.map(lambda g: -eta * g, grads))
            return cost - fnn.objective(net, moved, x, y, loss)

        return etas * g2, jax.vmap(actual)(etas)

    predicted, actual = decreases(jnp.asarray(etas, x.dtype))
    return np.asarray(predicted, np.float64), np.asarray(actual, np.float64)


def sharpness(prob: Problem, iters: int, key: jax.Array) -> float:
    """``λ_max`` of the Hessian of the cost at the problem's params by power iteration on ``v ↦ Hv``.

    ``Hv`` is the directional derivative of the manual gradient (``jax.jvp`` of
    :func:`fnn.backprop`); returns the Rayleigh quotient ``vᵀHv`` of the last unit vector ``v``.
    """
    net, params, x, y, loss = prob

    def grad(p):
        return fnn.backprop(net, p, x, y, loss)[1]

    @jax.jit
    def normalized_hvp(v):
        hv = jax.jvp(grad, (params,), (v,))[1]
        flat_v, _ = ravel_pytree(v)
        flat_hv, unravel = ravel_pytree(hv)
        return unravel(flat_hv / jnp.linalg.norm(flat_hv)), jnp.dot(flat_v, flat_hv)

    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(key, flat.shape, flat.dtype)
    v = unravel(v / jnp.linalg.norm(v))
    for _ in range(iters):
        v, rayleigh = normalized_hvp(v)
    return float(rayleigh)


def quadratic_part(steps: int, num_etas: int, step_factors: np.ndarray, seed: int = 0) -> dict:
    """Linear regression: exact Hessian, the ``η`` sweep against theory, curves and the first step; data and
    initialization from ``seed``."""
    data = fnn.data.regression_1d(seed=seed)
    norm = fnn.data.fit_zscore(_features(data.x_train))
    x = jnp.asarray(fnn.data.zscore(norm, _features(data.x_train)))  # (N, 3) float32
    net = fnn.MLP((3, 1), output="identity")
    prob = Problem(net, net.init(jax.random.PRNGKey(seed)), x, jnp.asarray(data.y_train), fnn.losses.mse)

    # Closed form in float64: C = (1/N)‖X̃θ − y‖², H = (2/N) X̃ᵀX̃; θ is ravelled as (W₁, W₂, W₃, b).
    X = np.hstack([np.asarray(x, np.float64), np.ones((x.shape[0], 1))])
    Y = np.asarray(prob.y, np.float64)[:, 0]
    H = 2 / X.shape[0] * X.T @ X
    theta_star = np.linalg.lstsq(X, Y, rcond=None)[0]
    c_star = float(np.mean((X @ theta_star - Y) ** 2))
    flat, unravel = ravel_pytree(prob.params)
    H_autodiff = np.asarray(jax.jit(jax.hessian(lambda t: fnn.objective(net, unravel(t), x, prob.y, prob.loss)))(flat))
    hessian_error = float(np.max(np.abs(H_autodiff - H)) / np.max(np.abs(H)))
    lam, Q = np.linalg.eigh(H)
    lam_max, lam_min = float(lam[-1]), float(lam[0])
    e0 = Q.T @ (np.asarray(flat, np.float64) - theta_star)  # initial error θ₀ − θ* in the eigenbasis

    factors = np.unique(np.concatenate([np.geomspace(0.02, 1.4, num_etas), CURVE_FACTORS]))
    etas = factors * 2 / lam_max
    costs = np.asarray(gd_costs(prob, etas, steps), np.float64)  # (E, T+1)
    measured = costs[:, -1] - c_star
    theory = 0.5 * np.sum(lam * e0**2 * (1 - etas[:, None] * lam) ** (2 * steps), axis=1)
    initial = 0.5 * float(np.sum(lam * e0**2))
    converged = np.isfinite(measured) & (measured < initial)
    # the formula is checked where the excess is well above float32 rounding of C
    checkable = np.isfinite(measured) & (theory > 1e-4 * c_star) & (theory < 1e30)
    deviation = float(np.max(np.abs(measured[checkable] - theory[checkable]) / theory[checkable]))

    # First step: g = He₀, so actual/predicted = 1 − ½η gᵀHg/‖g‖² = 1 − ½η (e₀ᵀH³e₀)/(e₀ᵀH²e₀).
    predicted, actual = first_step(prob, step_factors * 2 / lam_max)
    gg, gHg = float(np.sum(lam**2 * e0**2)), float(np.sum(lam**3 * e0**2))
    return {
        "lambda_max": lam_max,
        "lambda_min": lam_min,
        "eta_critical": 2 / lam_max,
        "eta_optimal": 2 / (lam_max + lam_min),
        "hessian_rel_error_autodiff_vs_closed_form": hessian_error,
        "steps": steps,
        "cost_min": c_star,
        "factors": factors,
        "excess_measured": measured,
        "excess_theory": theory,
        "excess_initial": initial,
        "converged": converged,
        "theory_max_rel_deviation": deviation,
        "all_below_converge": bool(np.all(converged[factors < 1])),
        "all_above_diverge": bool(not np.any(converged[factors > 1])),
        "curves": {f"{f:g}": costs[np.flatnonzero(np.isclose(factors, f))[0]] - c_star for f in CURVE_FACTORS},
        "first_step_ratio": actual / predicted,
        "first_step_ratio_theory": 1 - 0.5 * step_factors * 2 / lam_max * gHg / gg,
        "first_step_zero_crossing_factor": 2 * gg / gHg / (2 / lam_max),
    }


def mlp_part(epochs: int, factors, power_iters: int, step_factors: np.ndarray, seed: int = 0) -> dict:
    """1-32-32-1 tanh MLP, full-batch gradient descent at multiples of ``2/λ_max(θ₀)`` via :func:`fnn.fit`;
    data, initialization and the power iteration's start from ``seed``."""
    data = fnn.data.regression_1d(seed=seed)
    net = fnn.MLP((1, 32, 32, 1), "tanh", "identity")
    prob = Problem(net, net.init(jax.random.PRNGKey(seed)), jnp.asarray(data.x_train), jnp.asarray(data.y_train),
                   fnn.losses.mse)
    lam_max = sharpness(prob, power_iters, jax.random.PRNGKey(seed + 3))
    cost_of = jax.jit(lambda p: fnn.objective(net, p, prob.x, prob.y, prob.loss))
    runs = {}
    for f in factors:
        eta = f * 2 / lam_max
        result = fnn.fit(net, prob.params, fnn.optim.sgd(eta), (prob.x, prob.y), loss=prob.loss, epochs=epochs,
                         batch_size=prob.x.shape[0], key=jax.random.PRNGKey(seed + 1), quiet=True)
        runs[f"{f:g}"] = {
            "factor": f,
            "eta": eta,
            "train_loss": [r["train_loss"] for r in result.history],
            "final_loss": float(cost_of(result.params)),
            "diverged": result.stopped is not None,
            "stopped": result.stopped,
        }
    predicted, actual = first_step(prob, step_factors * 2 / lam_max)
    return {"lambda_max_init": lam_max, "eta_critical": 2 / lam_max, "epochs": epochs, "runs": runs,
            "first_step_ratio": actual / predicted}


def main(argv=None) -> dict:
    """Run the experiment (``argv``: the command line); returns the results written to the JSON."""
    args = common.parse_args("learning_rate", __doc__.splitlines()[0], argv)
    steps, num_etas = (40, 10) if args.quick else (100, 28)
    epochs, factors = (60, (0.01, 0.5, 4.0)) if args.quick else (300, MLP_FACTORS)
    step_factors = np.geomspace(0.01, 2.5, 8 if args.quick else 30)  # first step: η = f · 2/λ_max
    quad = quadratic_part(steps, num_etas, step_factors, args.seed)
    mlp = mlp_part(epochs, factors, 30 if args.quick else 100, step_factors, args.seed)
    curves = quad.pop("curves")

    plt = common.pyplot()
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    a = ax[0, 0]
    f, top = quad["factors"], 1e4
    measured = quad["excess_measured"]
    off_scale = ~np.isfinite(measured) | (measured > top)
    a.loglog(f, np.clip(quad["excess_theory"], 1e-12, top), "-", color="0.5",
             label="theory ½Σλᵢcᵢ²(1−ηλᵢ)^{2T}")
    a.loglog(f[~off_scale], measured[~off_scale], "o", ms=4, label=f"measured after T = {steps} steps")
    a.loglog(f[off_scale], np.full(off_scale.sum(), top / 3), "^", color="C3", ms=6, label="diverged (off scale)")
    a.axvline(1, color="C3", ls="--", label="η = 2/λ_max")
    a.axvline(quad["eta_optimal"] / quad["eta_critical"], color="C2", ls=":", label="η = 2/(λ_min+λ_max)")
    a.axhline(quad["excess_initial"], color="k", lw=0.6, label="initial excess")
    a.set(xlabel="η / (2/λ_max)", ylabel="C(θ_T) − C*", ylim=(1e-9, top),
          title=f"(a) linear regression: λ_max = {quad['lambda_max']:.3f}, "
                f"κ = {quad['lambda_max'] / quad['lambda_min']:.1f}")
    a.legend(fontsize=7, loc="lower left")
    a = ax[0, 1]
    for label, curve in curves.items():
        a.semilogy(np.where(np.isfinite(curve), curve, np.nan), label=f"η = {label} · 2/λ_max")
    a.set(xlabel="step", ylabel="C(θ_t) − C*", title="(b) linear regression: too small, good, too large")
    a.legend(fontsize=8)
    a = ax[1, 0]
    ceiling = 10 * max(run["train_loss"][0] for run in mlp["runs"].values())
    for i, run in enumerate(mlp["runs"].values()):
        curve = np.asarray(run["train_loss"])
        label = f"η = {run['factor']:g} · 2/λ₀ = {run['eta']:.3g}" + (" (NaN guard)" if run["diverged"] else "")
        a.semilogy(range(1, len(curve) + 1), np.minimum(curve, ceiling), color=f"C{i}", label=label)
        if run["diverged"]:
            a.plot(len(curve), ceiling, "x", color=f"C{i}", ms=10, mew=2)
    a.set(xlabel="epoch (one full-batch step)", ylabel="train loss (MSE), clipped at the top",
          ylim=(None, 1.5 * ceiling), title=f"(c) 1-32-32-1 tanh MLP, λ₀ = λ_max(θ₀) = {mlp['lambda_max_init']:.2f}")
    a.legend(fontsize=7)
    a = ax[1, 1]
    a.semilogx(step_factors, quad["first_step_ratio"], "o", ms=4, label="linear regression, measured")
    a.semilogx(step_factors, quad["first_step_ratio_theory"], "-", color="0.5",
               label="linear regression, 1 − ½η gᵀHg/‖g‖²")
    a.semilogx(step_factors, mlp["first_step_ratio"], "s", ms=4, label="MLP, measured")
    a.axhline(1, color="k", lw=0.6)
    a.axhline(0, color="k", lw=0.6)
    a.axvline(1, color="C3", ls="--", label="η = 2/λ_max")
    a.set(xlabel="η / (2/λ_max)", ylabel="actual / predicted decrease", ylim=(-2, 1.2),
          title="(d) first step: [C(θ₀) − C(θ₀ − ηg)] / η‖g‖²")
    a.legend(fontsize=7)
    common.save_figure(args, fig)

    results = {"quadratic": quad, "mlp": mlp, "first_step_factors": step_factors}
    common.save_json(args, results)

    runs = mlp["runs"]
    diverged = [k for k, r in runs.items() if r["diverged"]]
    survived_above = [k for k, r in runs.items() if not r["diverged"] and r["factor"] > 1]
    finite = {k: r["final_loss"] for k, r in runs.items() if not r["diverged"]}
    best = min(finite, key=finite.get)
    small = min(runs, key=lambda k: runs[k]["factor"])
    mlp_line = (
        f"MLP: λ_max(θ₀) = {mlp['lambda_max_init']:.3f}, 2/λ_max = {mlp['eta_critical']:.4f}; after {epochs} "
        f"full-batch epochs the smallest η ({small}×) is at loss {runs[small]['final_loss']:.4f}, the best "
        f"({best}×) at {runs[best]['final_loss']:.4f}; "
    )
    if diverged:
        stops = [f"{k}× at epoch {len(runs[k]['train_loss'])}" for k in diverged]
        mlp_line += f"stopped by the NaN guard: {', '.join(stops)}"
    else:
        mlp_line += "no run diverged"
    if survived_above:
        mlp_line += (f"; {', '.join(k + '×' for k in survived_above)} above 2/λ_max(θ₀) did not diverge "
                     f"(the sharpness changes as the network trains: 2/λ_max is exact only for a quadratic)")
    q_ok = quad["all_below_converge"] and quad["all_above_diverge"]
    common.conclude(args, "\n".join([
        f"quadratic: λ_max = {quad['lambda_max']:.4f} (closed-form H = jax.hessian to "
        f"{quad['hessian_rel_error_autodiff_vs_closed_form']:.1e}), 2/λ_max = {quad['eta_critical']:.4f}; "
        + ("every η below 2/λ_max converged and every η above diverged"
           if q_ok else "the border at 2/λ_max was NOT reproduced exactly")
        + f"; the excess after {steps} steps matches ½Σλc²(1−ηλ)^(2T) within "
        f"{100 * quad['theory_max_rel_deviation']:.2g} %.",
        mlp_line + ".",
        f"first step: actual/predicted decrease = {quad['first_step_ratio'][0]:.4f} (quadratic) and "
        f"{mlp['first_step_ratio'][0]:.4f} (MLP) at η = {step_factors[0]:g}·2/λ_max, where first-order Taylor "
        f"holds; {quad['first_step_ratio'][-1]:.2f} and {mlp['first_step_ratio'][-1]:.2f} at "
        f"{step_factors[-1]:g}·2/λ_max; on the quadratic the first step stops decreasing C at "
        f"η = 2‖g‖²/gᵀHg = {quad['first_step_zero_crossing_factor']:.2f}·2/λ_max.",
    ]))
    return results


if __name__ == "__main__":
    main()
