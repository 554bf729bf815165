"""Under- and over-fitting: training versus held-out error as a network's capacity grows.

A small noisy regression set: 20 training points at evenly spaced ``x`` in ``[−π, π]``,
``y = f(x) + ε`` with ``f(x) = sin x + ½ cos 2x`` and ``ε ~ N(0, 0.3²)``; 2,000 held-out points
with ``x ~ U[−π, π]`` from the same model. Capacity is the width ``n`` of one tanh hidden layer,
``MLP((1, n, 1))``, from 1 to 256; every net is trained to (near) convergence by full-batch Adam
with the manual backprop. Each width is fitted five times, each time to a fresh noise draw with a
fresh initialization, and the errors are averaged (the theory speaks of the expected error over
training sets). The theory expects the training error to fall with capacity and the held-out
error to fall (under-fitting) and then rise (over-fitting): a U. The held-out error cannot go
below the noise variance ``0.3² = 0.09``.
"""

from __future__ import annotations

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
from xor import descend  # full-batch steps with the manual backprop

import fnn

NOISE = 0.3
LOSS = fnn.losses.mse


def target(x: np.ndarray) -> np.ndarray:
    """``f(x) = sin x + ½ cos 2x``, elementwise."""
    return np.sin(x) + 0.5 * np.cos(2 * x)


def training_sets(n: int, repeats: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``x (n, 1)``: the midpoints of ``n`` equal cells of ``[−π, π]``; ``y (repeats, n, 1)``: ``f(x) + ε``.

    One independent noise draw ``ε ~ N(0, NOISE²)`` per repetition; float32.
    """
    x = (-np.pi + (np.arange(n) + 0.5) * 2 * np.pi / n)[:, None]
    noise = NOISE * np.random.RandomState(seed).standard_normal((repeats, n, 1))
    return x.astype(np.float32), (target(x)[None] + noise).astype(np.float32)


def train_and_score(width: int, x, ys, held_out, x_plot, steps: int):
    """Train ``MLP((1, width, 1))`` on each training set ``(x (N, 1), ys[r] (N, 1))``, init seed ``r``.

    Full-batch Adam, rate cosine-decayed ``0.01 → 0.0001`` over ``steps`` steps. Returns
    ``(train_mse (R,), held_out_mse (R,), curves (R, P))`` for the ``R = len(ys)`` repetitions: the
    final errors and the fitted function on ``x_plot (P, 1)``.
    """
    net = fnn.MLP((1, width, 1), "tanh", "identity")
    opt = fnn.optim.adam(fnn.schedules.cosine_decay(0.01, steps, alpha=0.01))

    def run(key, y):
        params, _ = descend(net, opt, net.init(key), x, y, LOSS, steps)
        held_out_mse = LOSS(net.apply(params, held_out[0]), held_out[1])
        return LOSS(net.apply(params, x), y), held_out_mse, net.apply(params, x_plot)[:, 0]

    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(ys.shape[0]))
    return jax.device_get(jax.jit(jax.vmap(run))(keys, ys))


def main(argv=None) -> dict:
    args = common.parse_args("capacity", __doc__.splitlines()[0], argv)
    widths, repeats, steps = ((1, 4, 64), 2, 2000) if args.quick else ((1, 2, 4, 8, 16, 32, 64, 128, 256), 5, 10_000)
    x, ys = training_sets(20, repeats)
    fresh = fnn.data.regression_1d(n=2500, noise=NOISE, seed=1, fn=target)  # its 2,000 "train" points
    held_out = (jnp.asarray(fresh.x_train), jnp.asarray(fresh.y_train))
    x_plot = jnp.linspace(-np.pi, np.pi, 400, dtype=jnp.float32)[:, None]

    train_mse, held_mse, curves = [], [], {}
    for width in widths:
        tr, te, fits = train_and_score(width, jnp.asarray(x), jnp.asarray(ys), held_out, x_plot, steps)
        train_mse.append(tr)
        held_mse.append(te)
        curves[width] = fits[0]  # the fits to the first training set, drawn in panel (b)
    train_mse, held_mse = np.array(train_mse), np.array(held_mse)  # (widths, repeats)
    train_mean, held_mean = train_mse.mean(axis=1), held_mse.mean(axis=1)
    best = int(np.argmin(held_mean))
    rise = held_mean[best:].max() / held_mean[best] - 1  # how far the held-out error climbs after its minimum
    u_shaped = bool(0 < best < len(widths) - 1 and held_mean[0] > 1.1 * held_mean[best] and rise > 0.1)

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    ax = axes[0]
    for values, mean, name, color in ((train_mse, train_mean, "training", "C0"),
                                      (held_mse, held_mean, "held out", "C1")):
        ax.plot(widths, mean, "o-", color=color, label=f"{name} (mean of {repeats})")
        ax.scatter(np.repeat(widths, repeats), values.ravel(), s=8, color=color, alpha=0.5)
    ax.axhline(NOISE**2, color="grey", ls="--", label=f"noise variance {NOISE**2:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="hidden units n (capacity)", ylabel="mean squared error",
           title=f"(a) {len(x)} training points: best held-out at n = {widths[best]}")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(widths, held_mean, "o-", color="C1", label="held out (mean)")
    ax.scatter(np.repeat(widths, repeats), held_mse.ravel(), s=8, color="C1", alpha=0.5)
    ax.plot(widths[best], held_mean[best], "k*", ms=14, label=f"minimum {held_mean[best]:.3f}")
    ax.set(xscale="log", xlabel="hidden units n (capacity)", ylabel="held-out mean squared error",
           title="(b) held-out error, linear scale")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(np.asarray(x_plot[:, 0]), target(np.asarray(x_plot[:, 0])), "k-", lw=3, alpha=0.3, label="f(x)")
    for width in sorted({widths[0], widths[best], widths[-1]}):
        ax.plot(np.asarray(x_plot[:, 0]), curves[width], lw=1.3, label=f"n = {width}")
    ax.scatter(x[:, 0], ys[0, :, 0], color="k", s=18, zorder=3, label="training points (set 1)")
    ax.set(xlabel="x", ylabel="y", ylim=(-3, 3), title="(c) fits to training set 1: smallest, best, largest n")
    ax.legend(fontsize=8)
    common.save_figure(args, fig)

    results = {"widths": list(widths), "repeats": repeats, "steps": steps, "n_train": len(x),
               "n_held_out": len(fresh.x_train), "noise_variance": NOISE**2,
               "train_mse": train_mse, "held_out_mse": held_mse, "train_mse_mean": train_mean,
               "held_out_mse_mean": held_mean, "best_width": widths[best], "rise_after_best": rise,
               "u_shaped": u_shaped}
    common.save_json(args, results)
    common.conclude(
        args,
        f"training MSE falls from {train_mean[0]:.3f} (n={widths[0]}) to {train_mean[-1]:.4f} (n={widths[-1]}); "
        f"held-out MSE is {held_mean[0]:.3f} at n={widths[0]}, lowest {held_mean[best]:.3f} at n={widths[best]}, "
        f"{held_mean[-1]:.3f} at n={widths[-1]}, at most {100 * rise:.0f}% above its minimum after it "
        f"(noise floor {NOISE**2:.2f}; means of {repeats} training sets); "
        + ("U-shaped as the theory expects" if u_shaped else "NOT the expected U shape")
        + f" (held-out by width: {', '.join(f'{w}: {m:.3f}' for w, m in zip(widths, held_mean))}).",
    )
    return results


if __name__ == "__main__":
    main()
