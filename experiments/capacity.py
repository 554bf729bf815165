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

Every claim is read off the spread over the draws: the mean and the range (min–max) per width.
A difference between two widths is called resolved only where their ranges are disjoint (every
draw of one below every draw of the other); the held-out minimum is resolved only where its range
lies below the ranges of both neighbouring widths. As the draws are shared by all widths, the
count of draws in which one width beats another is given too.
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


def train_and_score(width: int, x, ys, held_out, x_plot, steps: int, first: int = 0):
    """Train ``MLP((1, width, 1))`` on each training set ``(x (N, 1), ys[r] (N, 1))``, init seed
    ``first + r``.

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

    keys = jax.vmap(jax.random.PRNGKey)(first + jnp.arange(ys.shape[0]))
    return jax.device_get(jax.jit(jax.vmap(run))(keys, ys))


def spread(values: np.ndarray) -> dict:
    """``{"mean", "min", "max"}`` of ``values (repeats,)``."""
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


def findings(widths, mse: np.ndarray) -> dict:
    """What the draws ``mse (widths, repeats)`` support: the width of the lowest mean and whether its
    range lies below each neighbour's, the widths whose ranges lie above it, the stretches over
    which the mean falls or rises, and ``wins[i][j]``, the draws in which width ``i`` is below ``j``."""
    mean = mse.mean(axis=1)
    k = int(np.argmin(mean))
    below = [bool(mse[k].max() < mse[j].min()) for j in range(len(widths))]  # k's range below j's
    neighbours = [j for j in (k - 1, k + 1) if 0 <= j < len(widths)]
    return {
        "spread": [spread(v) for v in mse],
        "lowest_index": k, "lowest_width": widths[k],
        "resolved_from_neighbours": {widths[j]: below[j] for j in neighbours},
        "resolved": all(below[j] for j in neighbours),
        "ranges_above_lowest": [w for w, b in zip(widths, below) if b],
        "mean_falls_to_lowest": bool(np.all(np.diff(mean[: k + 1]) < 0)),
        "mean_rises_after_lowest": bool(np.all(np.diff(mean[k:]) > 0)),
        "last_over_lowest": float(mean[-1] / mean[k]),
        "wins": (mse[:, None, :] < mse[None, :, :]).sum(axis=2),
    }


def main(argv=None) -> dict:
    args = common.parse_args("capacity", __doc__.splitlines()[0], argv)
    widths, repeats, steps = ((1, 4, 64), 2, 2000) if args.quick else ((1, 2, 4, 8, 16, 32, 64, 128, 256), 5, 10_000)
    x, ys = training_sets(20, repeats, args.seed)
    fresh = fnn.data.regression_1d(n=2500, noise=NOISE, seed=args.seed + 1, fn=target)  # its 2,000 "train" points
    held_out = (jnp.asarray(fresh.x_train), jnp.asarray(fresh.y_train))
    x_plot = jnp.linspace(-np.pi, np.pi, 400, dtype=jnp.float32)[:, None]

    train_mse, held_mse, curves = [], [], {}
    for width in widths:
        tr, te, fits = train_and_score(width, jnp.asarray(x), jnp.asarray(ys), held_out, x_plot, steps, args.seed)
        train_mse.append(tr)
        held_mse.append(te)
        curves[width] = fits[0]  # the fits to the first training set, drawn in panel (b)
    train_mse, held_mse = np.array(train_mse), np.array(held_mse)  # (widths, repeats)
    train_mean, held_mean = train_mse.mean(axis=1), held_mse.mean(axis=1)
    train, held = findings(widths, train_mse), findings(widths, held_mse)
    best = held["lowest_index"]
    smaller, larger = widths[:best], widths[best + 1:]
    verdict = {"under_fitting_resolved": any(w in held["ranges_above_lowest"] for w in smaller),
               "over_fitting_resolved": any(w in held["ranges_above_lowest"] for w in larger),
               "minimum_resolved": held["resolved"]}

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for values, mean, name, color, shift in ((train_mse, train_mean, "training", "C0", 0.97),
                                             (held_mse, held_mean, "held out", "C1", 1.03)):
        at = np.asarray(widths) * shift  # side by side, so that the bars do not hide each other
        ax.errorbar(at, mean, yerr=[mean - values.min(1), values.max(1) - mean], fmt="o-", color=color,
                    capsize=3, label=f"{name}: mean of {repeats} draws, bar min–max")
    ax.axhline(NOISE**2, color="grey", ls="--", label=f"noise variance {NOISE**2:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="hidden units n (capacity)", ylabel="mean squared error",
           title=f"(a) {len(x)} training points: lowest training mean at n = {train['lowest_width']}, "
                 f"held-out at n = {widths[best]}")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.errorbar(widths, held_mean, yerr=[held_mean - held_mse.min(1), held_mse.max(1) - held_mean], fmt="o-",
                color="C1", capsize=3, label="held out: mean, bar min–max")
    ax.scatter(np.repeat(widths, repeats), held_mse.ravel(), s=8, color="C1", alpha=0.4, label="one draw")
    ax.axhspan(held_mse[best].min(), held_mse[best].max(), color="k", alpha=0.08,
               label=f"range at n = {widths[best]} ({'resolved' if held['resolved'] else 'not resolved'} "
                     "from its neighbours)")
    ax.set(xscale="log", xlabel="hidden units n (capacity)", ylabel="held-out mean squared error",
           title="(b) held-out error, linear scale")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(np.asarray(x_plot[:, 0]), target(np.asarray(x_plot[:, 0])), "k-", lw=3, alpha=0.3, label="f(x)")
    for width in sorted({widths[0], widths[best], widths[-1]}):
        ax.plot(np.asarray(x_plot[:, 0]), curves[width], lw=1.3, label=f"n = {width}")
    ax.scatter(x[:, 0], ys[0, :, 0], color="k", s=18, zorder=3, label="training points (set 1)")
    ax.set(xlabel="x", ylabel="y", ylim=(-3, 3), title="(c) fits to training set 1: smallest, lowest held-out, "
                                                       "largest n")
    ax.legend(fontsize=8)
    common.save_figure(args, fig)

    results = {"widths": list(widths), "repeats": repeats, "steps": steps, "n_train": len(x),
               "n_held_out": len(fresh.x_train), "noise_variance": NOISE**2,
               "train_mse": train_mse, "held_out_mse": held_mse, "train_mse_mean": train_mean,
               "held_out_mse_mean": held_mean, "train": train, "held_out": held, "best_width": widths[best],
               **verdict}
    common.save_json(args, results)
    common.conclude(args, describe(results))
    return results


def _range(s: dict, digits: str = ".3g") -> str:
    return f"{s['mean']:{digits}} [{s['min']:{digits}}–{s['max']:{digits}}]"


def describe(r: dict) -> str:
    """The conclusion, in words, from the results ``r``."""
    widths, t, h = r["widths"], r["train"], r["held_out"]
    k, j = t["lowest_index"], h["lowest_index"]
    last = len(widths) - 1
    text = (f"training MSE, mean [min–max] over {r['repeats']} draws: {_range(t['spread'][0])} at n={widths[0]}, "
            f"lowest mean {_range(t['spread'][k])} at n={widths[k]} ("
            + ("falling all the way" if t["mean_falls_to_lowest"] else "not falling at every step") + ")")
    if k < last:
        text += (f", then {_range(t['spread'][last])} at n={widths[last]}, {t['last_over_lowest']:.3g} times the "
                 "lowest mean, its range " + ("above" if widths[last] in t["ranges_above_lowest"] else "overlapping")
                 + f" that of n={widths[k]}, higher in {t['wins'][k][last]} of {r['repeats']} draws")
    others = "; ".join(f"n={w}: {'ranges disjoint' if ok else 'ranges overlap'}, n={widths[j]} lower in "
                       f"{h['wins'][j][widths.index(int(w))]} of {r['repeats']} draws"
                       for w, ok in h["resolved_from_neighbours"].items())
    text += (f". Held-out MSE: {_range(h['spread'][0])} at n={widths[0]}, lowest mean {_range(h['spread'][j])} at "
             f"n={widths[j]} (against its neighbours: {others}; minimum "
             + ("resolved" if h["resolved"] else "not resolved") + "), "
             f"{_range(h['spread'][last])} at n={widths[last]}; ranges above the lowest's: "
             f"{', '.join(f'n={w}' for w in h['ranges_above_lowest']) or 'none'} "
             f"(noise floor {r['noise_variance']:.2f}). "
             f"Under-fitting (a smaller width's range above the lowest's): "
             f"{'resolved' if r['under_fitting_resolved'] else 'not resolved'}; over-fitting (a larger width's): "
             f"{'resolved' if r['over_fitting_resolved'] else 'not resolved'}.")
    return text


if __name__ == "__main__":
    main()
