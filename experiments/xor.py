"""XOR: no single linear unit separates it; a 2-2-1 network trained by the manual backprop does.

Compared on the four XOR points:

- Rosenblatt's perceptron rule (:mod:`fnn.perceptron`): it never reaches a mistake-free epoch;
- a single sigmoid unit, ``MLP((2, 1))``, trained by gradient descent with :func:`fnn.backprop`:
  a line classifies at most 3 of the 4 points, and the unit's cross-entropy on XOR is smallest,
  ``ln 2``, at the output ½ everywhere;
- a 2-2-1 network with sigmoid hidden units and a logistic output (cross-entropy on the logit),
  full-batch gradient descent with the manual δ-backprop, from several random initializations.
  Not every seed solves XOR; the script counts them.

Where a seed stalls, is it at a local minimum? Gradient descent has no state, so every 2-2-1 seed
is continued to ``LONG`` steps, and every ``EVERY`` steps the cost, the gradient norm ``‖∇C‖`` and
the weight norm ``‖θ‖`` are recorded; at the end the 9×9 Hessian is built column by column from
Hessian-vector products by the R-operator (:func:`fnn.curvature.hvp`). A stalled seed is called

- a *saddle* if the Hessian has an eigenvalue below ``−NEGATIVE · λ_max`` (a direction of descent);
- a *minimum* only if, besides, ``‖∇C‖ ≤ GRAD_TOL`` and ``‖θ‖`` grew by at most ``GROWTH_TOL``
  (relative) over the second half of the run: a point where the gradient vanishes, reached;
- a *plateau* otherwise: the cost levels off while the gradient has not vanished and the
  weights are still moving.
"""

from __future__ import annotations

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import fnn
from fnn import perceptron

LOSS = fnn.losses.binary_cross_entropy_with_logits
LEARNING_RATE = 2.0
LONG, EVERY = 100_000, 5000
"""The 2-2-1 seeds are continued to ``LONG`` steps, measured every ``EVERY``."""
GRAD_TOL, GROWTH_TOL, NEGATIVE = 1e-7, 1e-3, 1e-4
"""The thresholds of the verdict on a stalled seed (module docstring)."""


def descend(net: fnn.MLP, opt, params, x, y, loss, steps: int):
    """``steps`` full-batch steps ``θ ← θ + u`` of the optimizer ``opt``, gradients by the manual backprop.

    ``x (N, n_0)`` and ``y`` as ``loss`` reads them; jit- and vmap-able. Returns ``(params, costs
    (steps,))``, ``costs[t]`` being the cost before step ``t``.
    """

    def step(carry, _):
        params, state = carry
        r = fnn.train_step(net, opt, params, state, x, y, loss)  # BP1–BP4 by hand, then the update
        return (r.params, r.opt_state), r.cost

    (params, _), costs = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params, costs


def train_seeds(net: fnn.MLP, x, y, seeds: int, steps: int, first: int = 0):
    """Full-batch gradient descent ``θ ← θ − η ∇C`` from ``seeds`` initializations at once, from
    ``PRNGKey(first)``, ``PRNGKey(first + 1)``, ….

    ``x (N, 2)`` float32, ``y (N,)`` 0/1 float32. Returns ``(params, costs, logits, final)``, each
    with a leading ``(seeds,)`` axis: the trained params, ``costs (seeds, steps)`` the cost before
    each step, ``logits (seeds, N)`` the trained network's outputs on ``x`` and ``final (seeds,)``
    its cost.
    """

    def run(key):
        params, costs = descend(net, fnn.optim.sgd(LEARNING_RATE), net.init(key), x, y, LOSS, steps)
        logits = net.apply(params, x)
        return params, costs, logits[:, 0], LOSS(logits, y)

    keys = jax.vmap(jax.random.PRNGKey)(first + jnp.arange(seeds))
    return jax.jit(jax.vmap(run))(keys)


def continue_seeds(net: fnn.MLP, params, x, y, steps: int, every: int):
    """Continue full-batch gradient descent from ``params`` (leading ``(seeds,)`` axis) for ``steps``
    more steps. Returns ``(params, cost, grad_norm, weight_norm)``, the last three ``(seeds, steps //
    every)``: ``C``, ``‖∇C‖`` (manual backprop) and ``‖θ‖`` (all weights and biases) after every
    ``every`` steps."""

    def run(start):
        def measure(params, _):
            params, _ = descend(net, fnn.optim.sgd(LEARNING_RATE), params, x, y, LOSS, every)
            cost, grads = fnn.backprop(net, params, x, y, LOSS)[:2]
            return params, (cost, ravel_pytree(grads)[0], ravel_pytree(params)[0])

        params, (cost, grads, theta) = jax.lax.scan(measure, start, None, length=steps // every)
        return params, cost, jnp.linalg.norm(grads, axis=1), jnp.linalg.norm(theta, axis=1)

    return jax.jit(jax.vmap(run))(params)


def hessian_eigenvalues(net: fnn.MLP, params, x, y) -> np.ndarray:
    """The eigenvalues ``(seeds, P)``, ascending, of the Hessian of ``C`` at each of ``params`` (leading
    ``(seeds,)`` axis): column ``i`` is ``H e_i`` by the R-operator (:func:`fnn.curvature.hvp`);
    symmetrized, in float64."""

    def hessian(params):
        flat, unravel = ravel_pytree(params)
        basis = jnp.eye(flat.size, dtype=flat.dtype)
        return jax.vmap(lambda e: ravel_pytree(fnn.curvature.hvp(net, params, x, y, LOSS, unravel(e)))[0])(basis)

    h = np.asarray(jax.jit(jax.vmap(hessian))(params), np.float64)
    return np.linalg.eigvalsh(0.5 * (h + np.swapaxes(h, 1, 2)))


def verdict(grad_norm: float, growth: float, eigenvalues: np.ndarray) -> str:
    """``"saddle"``, ``"minimum"`` or ``"plateau"`` by the rules of the module docstring."""
    if eigenvalues[0] < -NEGATIVE * eigenvalues[-1]:
        return "saddle"
    if grad_norm <= GRAD_TOL and growth <= GROWTH_TOL:
        return "minimum"
    return "plateau"


def main(argv=None) -> dict:
    args = common.parse_args("xor", __doc__.splitlines()[0], argv)
    seeds, steps, max_epochs, long, every = (4, 2000, 100, 20_000, 2000) if args.quick else (
        10, 5000, 1000, LONG, EVERY)
    data = fnn.data.xor()
    x = jnp.asarray(data.x_train, jnp.float32)
    y = jnp.asarray(data.y_train, jnp.float32)
    truth = np.asarray(data.y_train) == 1

    rule = perceptron.train(x, data.y_train, max_epochs)
    rule_acc = float(np.mean((np.asarray(perceptron.predict(rule.w, x)) == 1) == truth))

    single = fnn.MLP((2, 1), output="identity")
    mlp = fnn.MLP((2, 2, 1), "sigmoid", "identity")
    results = {"perceptron": {"converged": bool(rule.converged), "epochs": int(rule.epochs),
                              "updates": int(rule.updates), "accuracy": rule_acc},
               "learning_rate": LEARNING_RATE, "steps": steps, "seeds": seeds}
    fitted = {}
    for name, net in (("single_unit", single), ("mlp_2_2_1", mlp)):
        params, costs, logits, final = jax.device_get(train_seeds(net, x, y, seeds, steps, args.seed))
        correct = (logits > 0) == truth
        fitted[name] = (params, costs)
        results[name] = {"accuracy": correct.mean(axis=1), "solved": correct.all(axis=1),
                         "n_solved": int(correct.all(axis=1).sum()), "final_loss": final,
                         "max_distance_from_half": np.abs(1 / (1 + np.exp(-logits)) - 0.5).max(axis=1)}
    solved = results["mlp_2_2_1"]["solved"]
    stuck_losses = results["mlp_2_2_1"]["final_loss"][~solved]
    single_loss = results["single_unit"]["final_loss"]

    end, cost, grad_norm, weight_norm = jax.device_get(continue_seeds(mlp, fitted["mlp_2_2_1"][0], x, y,
                                                                      long - steps, every))
    marks = steps + every * np.arange(1, cost.shape[1] + 1)
    half = int(np.searchsorted(marks, marks[-1] // 2))  # the first checkpoint at or after the middle
    eigen = hessian_eigenvalues(mlp, end, x, y)
    growth = weight_norm[:, -1] / weight_norm[:, half] - 1
    rate = np.log(grad_norm[:, -1] / grad_norm[:, half]) / np.log(marks[-1] / marks[half])
    late = np.all((np.asarray(jax.vmap(mlp.apply, (0, None))(end, x))[..., 0] > 0) == truth, axis=1)
    results["long_run"] = {
        "steps": marks, "cost": cost, "grad_norm": grad_norm, "weight_norm": weight_norm,
        "half": int(marks[half]), "weight_growth_second_half": growth, "grad_norm_exponent_second_half": rate,
        "hessian_eigenvalues": eigen, "final_params": jax.vmap(lambda p: ravel_pytree(p)[0])(end),
        "solved": late, "excess_over_half_ln2": cost[:, -1] - np.log(2) / 2,
        "verdict": [None if ok else "escaped" if escaped else verdict(g, d, e)
                    for ok, escaped, g, d, e in zip(solved, late, grad_norm[:, -1], growth, eigen)],
        "thresholds": {"grad_tol": GRAD_TOL, "growth_tol": GROWTH_TOL, "negative": NEGATIVE},
    }

    plt = common.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    axes = axes.ravel()
    grid = np.linspace(-0.5, 1.5, 201, dtype=np.float32)
    gx, gy = np.meshgrid(grid, grid)
    plane = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], 1))

    def points(ax, pts):
        for label, marker in ((False, "o"), (True, "s")):
            ax.scatter(pts[truth == label, 0], pts[truth == label, 1], s=110, marker=marker,
                       edgecolor="k", zorder=3, label=f"XOR = {int(label)}")

    ax = axes[0]
    best = int(np.argmin(results["single_unit"]["final_loss"]))
    single_params = jax.tree_util.tree_map(lambda a: a[best], fitted["single_unit"][0])
    prob = jax.nn.sigmoid(single.apply(single_params, plane)).reshape(gx.shape)
    filled = ax.contourf(gx, gy, np.asarray(prob), levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.8)
    fig.colorbar(filled, ax=ax, label="σ(output)")
    points(ax, np.asarray(x))
    ax.set(title=f"(a) one sigmoid unit (GD): loss {results['single_unit']['final_loss'][best]:.3f} = ln 2;\n"
                 f"perceptron rule: converged={bool(rule.converged)} after {int(rule.epochs)} epochs",
           xlabel="x₁", ylabel="x₂")
    ax.legend(fontsize=8, loc="center")

    show = int(np.argmax(solved)) if solved.any() else 0
    params = jax.tree_util.tree_map(lambda a: a[show], fitted["mlp_2_2_1"][0])
    ax = axes[1]
    prob = jax.nn.sigmoid(mlp.apply(params, plane)).reshape(gx.shape)
    filled = ax.contourf(gx, gy, np.asarray(prob), levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.8)
    ax.contour(gx, gy, np.asarray(prob), levels=[0.5], colors="k")
    fig.colorbar(filled, ax=ax, label="σ(output)")
    points(ax, np.asarray(x))
    ax.set(title=f"(b) 2-2-1 MLP, seed {show}: decision boundary", xlabel="x₁", ylabel="x₂")

    ax = axes[2]
    _, acts = mlp.forward(params, x)
    hidden = np.asarray(acts[1])
    points(ax, hidden)
    w, b = np.asarray(params[1]["W"][0]), float(params[1]["b"][0])
    h1 = np.linspace(0, 1, 2)
    if abs(w[1]) > 1e-9:
        ax.plot(h1, -(w[0] * h1 + b) / w[1], "k-", label="output unit's line")
    ax.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05), xlabel="hidden a₁", ylabel="hidden a₂",
           title="(c) the same 4 points in hidden space:\nnow linearly separable")
    ax.legend(fontsize=8)

    ax = axes[3]
    for s in range(seeds):
        ok = bool(solved[s])
        ax.plot(fitted["mlp_2_2_1"][1][s], color="C2" if ok else "C3", lw=1,
                label=("2-2-1 solved" if ok else "2-2-1 stalled") if s == int(np.argmax(solved == ok)) else None)
    ax.plot(fitted["single_unit"][1].T, color="grey", lw=1, alpha=0.6)
    ax.plot([], [], color="grey", label="single unit")
    ax.set(yscale="log", xlabel="gradient-descent step", ylabel="cross-entropy",
           title=f"(d) {int(solved.sum())}/{seeds} seeds solve XOR (η={LEARNING_RATE})")
    ax.legend(fontsize=8)

    stalled = [s for s in range(seeds) if not solved[s]]
    for ax, values, what in ((axes[4], grad_norm, "‖∇C‖"), (axes[5], weight_norm, "‖θ‖")):
        for s in range(seeds):
            ok = bool(solved[s])
            ax.plot(marks, values[s], color="C2" if ok else "C3", lw=1,
                    label=f"{'solved' if ok else 'stalled'} at step {steps:,}" if s == int(np.argmax(solved == ok))
                    else None)
        ax.set(xscale="log", yscale="log" if what == "‖∇C‖" else "linear", xlabel="gradient-descent step",
               ylabel=what)
        ax.legend(fontsize=8)
    axes[4].set_title(f"(e) ‖∇C‖, continued to {marks[-1]:,} steps"
                      + (f";\nstalled seeds ∝ steps^p, p = {rate[stalled].min():.2f} to {rate[stalled].max():.2f} "
                         "(second half)" if stalled else ""))
    axes[5].set_title("(f) ‖θ‖" + (f"; stalled seeds' change over the second half:\n"
                                   f"{100 * growth[stalled].min():+.1f} to {100 * growth[stalled].max():+.1f} %"
                                   if stalled else ""))
    common.save_figure(args, fig)

    common.save_json(args, results)
    stuck = (f"; the other {len(stuck_losses)} stall at loss {np.median(stuck_losses):.3f} (median; ½ ln 2 = "
             f"{np.log(2) / 2:.3f} is two points right and two left at σ = 0.5)" if len(stuck_losses) else "")
    common.conclude(
        args,
        f"perceptron rule on XOR: converged={bool(rule.converged)} after {int(rule.epochs)} epochs "
        f"({int(rule.updates)} updates, accuracy {100 * rule_acc:.0f}%); single sigmoid unit by gradient "
        f"descent: lowest loss over {seeds} seeds {single_loss.min():.4f} (ln 2 = {np.log(2):.4f}: it outputs "
        f"σ = 0.5 ± {results['single_unit']['max_distance_from_half'].max():.1e} on every point, chance level); "
        f"2-2-1 MLP, manual backprop, "
        f"η={LEARNING_RATE}, {steps} full-batch steps: {int(solved.sum())}/{seeds} seeds classify all four "
        f"points" + (f" (final loss ≤ {results['mlp_2_2_1']['final_loss'][solved].max():.4f})" if solved.any() else "")
        + stuck + ". " + describe_long(results["long_run"], solved),
    )
    return results


def describe_long(r: dict, solved: np.ndarray) -> str:
    """The continued run of the stalled seeds, in words, from ``results["long_run"]``."""
    stalled = np.flatnonzero(~np.asarray(solved))
    if not stalled.size:
        return "No seed stalled."
    end = r["steps"][-1]

    def span(values, fmt):
        lo, hi = np.asarray(values)[stalled].min(), np.asarray(values)[stalled].max()
        return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}} to {hi:{fmt}}"

    counts = {v: r["verdict"].count(v) for v in ("plateau", "saddle", "minimum", "escaped") if v in r["verdict"]}
    eigen = np.asarray(r["hessian_eigenvalues"])[stalled]
    return (f"Continued to {end:,} steps, the {stalled.size} stalled seeds are at cost ½ ln 2 + "
            f"{span(r['excess_over_half_ln2'], '.1e')}, with ‖∇C‖ {span(np.asarray(r['grad_norm'])[:, -1], '.1e')} "
            f"(falling as steps^{span(r['grad_norm_exponent_second_half'], '.2f')} over steps {r['half']:,}–{end:,}) "
            f"and ‖θ‖ changing by {span(100 * np.asarray(r['weight_growth_second_half']), '+.1f')} % over "
            f"that stretch; Hessian eigenvalues from {eigen[:, 0].min():.1e} to {eigen[:, -1].max():.2g}. Verdict: "
            + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".")


if __name__ == "__main__":
    main()
