"""Universal approximation: one hidden layer of tanh units, widening from 1 to 64, fits sin, |x| and a step.

The theorem (Cybenko 1989; Hornik, Stinchcombe & White 1989): one hidden layer of sigmoidal units
approximates any continuous function on a compact set, uniformly, given enough units. Here the
networks ``MLP((1, n, 1), "tanh", "identity")`` are trained by full-batch Adam (manual backprop)
on 200 evenly spaced points of ``[−π, π]``, and their error is measured on 1,001 points of the
same interval: the root mean square error ``√((1/M) Σ (f̂(x) − f(x))²)``, best of a few random
initializations (the theorem is about the best network of each width, which training only
estimates). The step ``H(x) = [x ≥ 0]`` is discontinuous, so no continuous network can get its
uniform error below ½; only its mean square error can shrink.
"""

from __future__ import annotations

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
from xor import descend  # full-batch steps with the manual backprop

import fnn

TARGETS = {
    "sin(x)": jnp.sin,
    "|x|": jnp.abs,
    "step [x ≥ 0]": lambda x: (x >= 0).astype(x.dtype),
}
LOSS = fnn.losses.mse


def fit_width(width: int, x, y, x_eval, y_eval, seeds: int, steps: int):
    """Train ``MLP((1, width, 1))`` on every target from ``seeds`` initializations at once.

    ``x (N, 1)``, ``y (T, N, 1)``: ``T`` targets; ``x_eval (M, 1)``, ``y_eval (T, M, 1)``.
    Adam with a cosine-decayed rate ``0.02 → 0.0002``. Returns ``(rmse (T, seeds), fits (T, seeds, M))``:
    the error on the evaluation points and the fitted curves.
    """
    net = fnn.MLP((1, width, 1), "tanh", "identity")
    opt = fnn.optim.adam(fnn.schedules.cosine_decay(0.02, steps, alpha=0.01))

    def run(key, target, target_eval):
        params, _ = descend(net, opt, net.init(key), x, target, LOSS, steps)
        fit = net.apply(params, x_eval)
        return jnp.sqrt(LOSS(fit, target_eval)), fit[:, 0]

    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(seeds))
    over_seeds = jax.vmap(run, (0, None, None))
    return jax.device_get(jax.jit(jax.vmap(over_seeds, (None, 0, 0)))(keys, y, y_eval))


def main(argv=None) -> dict:
    args = common.parse_args("universal_approximation", __doc__.splitlines()[0], argv)
    widths, seeds, steps = ((1, 8), 2, 1000) if args.quick else ((1, 2, 4, 8, 16, 32, 64), 3, 4000)
    x = jnp.linspace(-np.pi, np.pi, 200, dtype=jnp.float32)[:, None]
    x_eval = jnp.linspace(-np.pi, np.pi, 1001, dtype=jnp.float32)[:, None]
    y = jnp.stack([f(x) for f in TARGETS.values()])
    y_eval = jnp.stack([f(x_eval) for f in TARGETS.values()])

    rmse, best_fit = {}, {}
    for width in widths:
        errors, fits = fit_width(width, x, y, x_eval, y_eval, seeds, steps)
        for t, name in enumerate(TARGETS):
            best = int(np.argmin(errors[t]))
            rmse.setdefault(name, []).append(errors[t])
            best_fit[name, width] = fits[t, best]
    best_rmse = {name: [float(e.min()) for e in rmse[name]] for name in TARGETS}
    sup_error = {name: [float(np.abs(best_fit[name, w] - np.asarray(y_eval[t, :, 0])).max()) for w in widths]
                 for t, name in enumerate(TARGETS)}

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 1 + len(TARGETS), figsize=(17, 4))
    ax = axes[0]
    for name in TARGETS:
        spread = np.array([[e.min(), e.max()] for e in rmse[name]])
        line, = ax.plot(widths, best_rmse[name], "o-", label=name)
        ax.fill_between(widths, spread[:, 0], spread[:, 1], color=line.get_color(), alpha=0.2)
    ax.set(xscale="log", yscale="log", xlabel="hidden units n", ylabel="RMS error on 1,001 points",
           title=f"(a) error vs width (best of {seeds} inits; band: all)")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.legend(fontsize=8)
    shown = sorted({widths[0], widths[len(widths) // 2], widths[-1]})
    for ax, (t, name) in zip(axes[1:], enumerate(TARGETS)):
        ax.plot(np.asarray(x_eval[:, 0]), np.asarray(y_eval[t, :, 0]), "k-", lw=3, alpha=0.3, label="target")
        for width in shown:
            ax.plot(np.asarray(x_eval[:, 0]), best_fit[name, width], lw=1.2, label=f"n = {width}")
        ax.set(xlabel="x", title=f"({'bcd'[t]}) {name}")
        ax.legend(fontsize=8)
    common.save_figure(args, fig)

    results = {"widths": list(widths), "seeds": seeds, "steps": steps, "rmse_best": best_rmse,
               "rmse_all_seeds": {name: np.stack(rmse[name]) for name in TARGETS},
               "sup_error_best": sup_error}
    common.save_json(args, results)
    lines = []
    for name in TARGETS:
        e = best_rmse[name]
        slope = np.polyfit(np.log(widths), np.log(e), 1)[0]
        trend = "falls with width" if e[-1] < 0.5 * e[0] else "barely changes with width"
        lines.append(f"{name}: error {trend}: RMS {e[0]:.4f} at n={widths[0]} -> {min(e):.2e} at best "
                     f"(n={widths[int(np.argmin(e))]}), {e[-1]:.2e} at n={widths[-1]} (log-log slope {slope:.2f}; "
                     f"sup error at n={widths[-1]}: {sup_error[name][-1]:.3f})")
    common.conclude(args, "; ".join(lines) + ".")
    return results


if __name__ == "__main__":
    main()
