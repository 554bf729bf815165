"""XOR: no single linear unit separates it; a 2-2-1 network trained by the manual backprop does.

Compared on the four XOR points:

- Rosenblatt's perceptron rule (:mod:`fnn.perceptron`): it never reaches a mistake-free epoch;
- a single sigmoid unit, ``MLP((2, 1))``, trained by gradient descent with :func:`fnn.backprop`:
  a line classifies at most 3 of the 4 points, and the unit's cross-entropy on XOR is smallest,
  ``ln 2``, at the output ½ everywhere;
- a 2-2-1 network with sigmoid hidden units and a logistic output (cross-entropy on the logit),
  full-batch gradient descent with the manual δ-backprop, from several random initializations.
  The 2-2-1 net has local minima, so not every seed solves XOR; the script counts them.
"""

from __future__ import annotations

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np

import fnn
from fnn import perceptron

LOSS = fnn.losses.binary_cross_entropy_with_logits
LEARNING_RATE = 2.0


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


def train_seeds(net: fnn.MLP, x, y, seeds: int, steps: int):
    """Full-batch gradient descent ``θ ← θ − η ∇C`` from ``seeds`` initializations at once.

    ``x (N, 2)`` float32, ``y (N,)`` 0/1 float32. Returns ``(params, costs, logits, final)``, each
    with a leading ``(seeds,)`` axis: the trained params, ``costs (seeds, steps)`` the cost before
    each step, ``logits (seeds, N)`` the trained network's outputs on ``x`` and ``final (seeds,)``
    its cost.
    """

    def run(key):
        params, costs = descend(net, fnn.optim.sgd(LEARNING_RATE), net.init(key), x, y, LOSS, steps)
        logits = net.apply(params, x)
        return params, costs, logits[:, 0], LOSS(logits, y)

    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(seeds))
    return jax.jit(jax.vmap(run))(keys)


def main(argv=None) -> dict:
    args = common.parse_args("xor", __doc__.splitlines()[0], argv)
    seeds, steps, max_epochs = (4, 2000, 100) if args.quick else (10, 5000, 1000)
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
        params, costs, logits, final = jax.device_get(train_seeds(net, x, y, seeds, steps))
        correct = (logits > 0) == truth
        fitted[name] = (params, costs)
        results[name] = {"accuracy": correct.mean(axis=1), "solved": correct.all(axis=1),
                         "n_solved": int(correct.all(axis=1).sum()), "final_loss": final,
                         "max_distance_from_half": np.abs(1 / (1 + np.exp(-logits)) - 0.5).max(axis=1)}
    solved = results["mlp_2_2_1"]["solved"]
    stuck_losses = results["mlp_2_2_1"]["final_loss"][~solved]
    single_loss = results["single_unit"]["final_loss"]

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
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
                label=("2-2-1 solved" if ok else "2-2-1 stuck") if s == int(np.argmax(solved == ok)) else None)
    ax.plot(fitted["single_unit"][1].T, color="grey", lw=1, alpha=0.6)
    ax.plot([], [], color="grey", label="single unit")
    ax.set(yscale="log", xlabel="gradient-descent step", ylabel="cross-entropy",
           title=f"(d) {int(solved.sum())}/{seeds} seeds solve XOR (η={LEARNING_RATE})")
    ax.legend(fontsize=8)
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
        + stuck + ".",
    )
    return results


if __name__ == "__main__":
    main()
