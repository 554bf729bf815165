"""Universal approximation: one hidden layer of tanh units, widening from 1 to 64, fits sin, |x| and a step.

The theorem (Cybenko 1989; Hornik, Stinchcombe & White 1989): one hidden layer of sigmoidal units
approximates any continuous function on a compact set, uniformly, given enough units. Here the
networks ``MLP((1, n, 1), "tanh", "identity")`` are trained by full-batch Adam (manual backprop)
on 200 evenly spaced points of ``[−π, π]``, and their error is measured on 1,001 points of the
same interval: the root mean square error ``√((1/M) Σ (f̂(x) − f(x))²)`` of the best network
found (the theorem is about the best network of each width, which training only estimates): of
all the checkpoints so far of a few random initializations, the one with the lowest training
loss. The step ``H(x) = [x ≥ 0]`` is discontinuous, so no continuous network can get its
uniform error below ½; only its mean square error can shrink.

Width and training length are separated: the rate ``0.02 · 2^(−t/4000)`` does not depend on
how long a run is, so the state after ``t`` steps is the same in every run that gets that far. The
error is recorded every ``CHUNK`` steps up to the cap, and the width curve is given at the budgets
``cap/16``, ``cap/4`` and ``cap``, with its log-log slope fitted at each. Whether training has
converged is judged by the training loss ``L``: a width is reported as still improving at the cap
where the lowest ``L`` found fell by ``TOL`` (relative) or more over the last ``WINDOW`` steps.
The widths up to ``PAD`` train together in one compiled program (:func:`embed`), which saves their
compilations; the run records that the extra units never moved.

A reference for every target: the RMS error of the piecewise-linear interpolant of the 200
training points. For the step, the two training points next to the jump lie ``2π/199`` apart
and the data say nothing about the fit between them; the share of a fit's squared error that
falls on the evaluation points in that gap is reported.
"""

from __future__ import annotations

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np

import fnn

TARGETS = {
    "sin(x)": jnp.sin,
    "|x|": jnp.abs,
    "step [x ≥ 0]": lambda x: (x >= 0).astype(x.dtype),
}
LOSS = fnn.losses.mse
RATE, HALF_LIFE = 0.02, 4000
"""Adam's rate ``RATE · 2^(−t/HALF_LIFE)`` at step ``t``."""
CHUNK, CAP = 1000, 16_000
"""Steps between checkpoints, and the steps of every run."""
TOL, WINDOW = 0.01, 2000
"""Still improving at the cap: the lowest training loss so far fell by ``TOL`` or more over ``WINDOW`` steps."""
PAD = 16
"""Widths up to ``PAD`` train in one compiled program, each embedded in a ``PAD``-unit network."""


def _extra(p):
    p.add_argument("--cap", type=int, default=CAP, help=f"steps per network, a multiple of {4 * CHUNK} "
                                                         f"(default {CAP})")


def embed(params: list, pad: int) -> list:
    """A ``(1, n, 1)`` network's params as a ``(1, pad, 1)`` network's, the extra units all zero.

    The extra units compute ``a = tanh(0) = 0`` and feed the output through zero weights, so the
    function is the same; their gradients (BP4: ``δ² a`` with ``a = 0``, and ``δ¹ = δ² W² ⊙ φ' = 0``)
    are exactly zero, so Adam (``m = v = 0``) never moves them: training is that of the ``n``-unit
    network, up to the rounding of sums with extra zero terms.
    """
    (first, out), n = params, params[0]["b"].shape[0]
    return [{"W": jnp.zeros((pad, 1), first["W"].dtype).at[:n].set(first["W"]),
             "b": jnp.zeros((pad,), first["b"].dtype).at[:n].set(first["b"])},
            {"W": jnp.zeros((1, pad), out["W"].dtype).at[:, :n].set(out["W"]), "b": out["b"]}]


def fit_widths(widths, pad: int, x, y, x_eval, y_eval, seeds: int, chunk: int, checkpoints: int,
               first: int = 0):
    """Train ``MLP((1, n, 1))`` for every ``n`` in ``widths`` (each ``≤ pad``) on every target from
    ``seeds`` initializations (``MLP((1, n, 1)).init(PRNGKey(first + s))``), all at once, embedded in
    ``pad``-unit networks (:func:`embed`).

    ``x (N, 1)``, ``y (T, N, 1)``: ``T`` targets; ``x_eval (M, 1)``, ``y_eval (T, M, 1)``. Full-batch
    Adam at the rate ``RATE · 2^(−t/HALF_LIFE)``, ``checkpoints · chunk`` steps. Returns, after every
    ``chunk`` steps, ``(train_mse, rmse, fits, params)``: ``train_mse (W, T, seeds, K)`` the loss on
    the training points, ``rmse (W, T, seeds, K)`` the error on the evaluation points, ``fits (W, T,
    seeds, K, M)`` the fitted curves (``W = len(widths)``, ``K = checkpoints``), and the final params
    with leading axes ``(W, T, seeds)``.
    """
    net = fnn.MLP((1, pad, 1), "tanh", "identity")
    opt = fnn.optim.adam(fnn.schedules.exponential_decay(RATE, 0.5, HALF_LIFE))
    starts = [[embed(fnn.MLP((1, n, 1), "tanh", "identity").init(jax.random.PRNGKey(first + s)), pad)
               for s in range(seeds)] for n in widths]
    starts = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[jax.tree_util.tree_map(lambda *a: jnp.stack(a), *row)
                                                               for row in starts])  # leaves (W, seeds, ...)

    def run(params, target, target_eval):
        def step(carry, _):
            r = fnn.train_step(net, opt, *carry, x, target, LOSS)  # BP1–BP4 by hand, then Adam
            return (r.params, r.opt_state), None

        def checkpoint(carry, _):
            carry, _ = jax.lax.scan(step, carry, None, length=chunk)
            fit = net.apply(carry[0], x_eval)
            return carry, (LOSS(net.apply(carry[0], x), target), jnp.sqrt(LOSS(fit, target_eval)), fit[:, 0])

        (params, _), out = jax.lax.scan(checkpoint, (params, opt.init(params)), None, length=checkpoints)
        return (*out, params)

    over_targets = jax.vmap(jax.vmap(run, (0, None, None)), (None, 0, 0))  # (T, seeds)
    return jax.device_get(jax.jit(jax.vmap(over_targets, (0, None, None)))(starts, y, y_eval))


def extra_units(params: list, widths) -> float:
    """The largest ``|value|`` among the weights and biases of the extra units of :func:`embed`, in
    ``params`` with leading axes ``(W, T, seeds)`` for the ``W`` networks of ``widths``."""
    (first, out), values = params, [0.0]
    for i, n in enumerate(widths):
        values += [np.abs(first["W"][i, ..., n:, :]).max(initial=0), np.abs(first["b"][i, ..., n:]).max(initial=0),
                   np.abs(out["W"][i, ..., :, n:]).max(initial=0)]
    return float(max(values))


def best_so_far(train_mse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(seed, checkpoint)``, each ``(K,)``: for every checkpoint ``k``, where the lowest training
    loss of ``train_mse (seeds, K)`` up to ``k`` was found."""
    seed, point = np.zeros(train_mse.shape[1], int), np.zeros(train_mse.shape[1], int)
    for k in range(train_mse.shape[1]):
        s = int(np.argmin(train_mse[:, k]))
        if k == 0 or train_mse[s, k] < train_mse[seed[k - 1], point[k - 1]]:
            seed[k], point[k] = s, k
        else:
            seed[k], point[k] = seed[k - 1], point[k - 1]
    return seed, point


def still_improving(train_mse: np.ndarray, window: int) -> bool:
    """Whether the lowest of the losses ``train_mse (seeds, K)`` found up to a checkpoint fell by ``TOL``
    (relative) or more over the last ``window`` checkpoints."""
    best = np.minimum.accumulate(train_mse.min(axis=0))
    return bool(best[-1 - window] - best[-1] >= TOL * best[-1 - window])


def slope(widths, errors) -> float:
    """The least-squares slope of ``log error`` against ``log width``."""
    return float(np.polyfit(np.log(widths), np.log(errors), 1)[0])


def interpolant_rmse(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray) -> float:
    """The RMS error on ``x_eval (M,)`` of the piecewise-linear interpolant of ``(x_train, y_train) (N,)``."""
    return float(np.sqrt(np.mean((np.interp(x_eval, x_train, y_train) - y_eval) ** 2)))


def gap_share(fit: np.ndarray, truth: np.ndarray, x_train: np.ndarray, x_eval: np.ndarray) -> float:
    """The share of ``Σ (fit − truth)²`` over ``x_eval`` that falls strictly between the two training
    points around 0 (the step's jump)."""
    lo, hi = x_train[x_train < 0].max(), x_train[x_train >= 0].min()
    sq = (fit - truth) ** 2
    return float(sq[(x_eval > lo) & (x_eval < hi)].sum() / sq.sum())


def main(argv=None) -> dict:
    args = common.parse_args("universal_approximation", __doc__.splitlines()[0], argv, _extra)
    if args.quick:
        widths, seeds, chunk, cap = (1, 8), 2, 250, 2000
    else:
        widths, seeds, chunk, cap = (1, 2, 4, 8, 16, 32, 64), 3, CHUNK, args.cap
    if cap % (4 * chunk):
        raise SystemExit(f"--cap must be a multiple of {4 * chunk}; got {cap}")
    window, checkpoints = max(1, WINDOW * cap // (CAP * chunk)), cap // chunk
    steps = [chunk * (k + 1) for k in range(checkpoints)]
    budgets = [b for b in (cap // 16, cap // 4, cap) if b in steps]
    x = jnp.linspace(-np.pi, np.pi, 200, dtype=jnp.float32)[:, None]
    x_eval = jnp.linspace(-np.pi, np.pi, 1001, dtype=jnp.float32)[:, None]
    y = jnp.stack([f(x) for f in TARGETS.values()])
    y_eval = jnp.stack([f(x_eval) for f in TARGETS.values()])
    truth = np.asarray(y_eval[:, :, 0])
    xs, xe = np.asarray(x[:, 0]), np.asarray(x_eval[:, 0])
    reference = {name: interpolant_rmse(xs, np.asarray(y[t, :, 0]), xe, truth[t]) for t, name in enumerate(TARGETS)}

    small = [n for n in widths if n <= PAD]
    groups = ([(small, max(small))] if small else []) + [([n], n) for n in widths if n > PAD]
    parts = [fit_widths(g, pad, x, y, x_eval, y_eval, seeds, chunk, checkpoints, args.seed)
             for g, pad in groups]
    train_mse, rmse, fits = (np.concatenate([p[i] for p in parts]) for i in range(3))  # (W, T, seeds, K[, M])
    padding = max(extra_units(p[3], g) for (g, _), p in zip(groups, parts))  # 0: they never moved

    found = [[best_so_far(train_mse[i, t]) for t in range(len(TARGETS))] for i in range(len(widths))]
    curve = np.array([[rmse[i, t, s, k] for t, (s, k) in enumerate(row)] for i, row in enumerate(found)])  # (W, T, K)
    at_cap, budget_best, summary = {}, {}, {}
    for t, name in enumerate(TARGETS):
        per_width = []
        for i in range(len(widths)):
            s, k = (int(a[-1]) for a in found[i][t])
            fit = fits[i, t, s, k]
            per_width.append({"rmse": float(curve[i, t, -1]), "seed": s, "found_at": steps[k],
                              "still_improving": still_improving(train_mse[i, t], window),
                              "sup_error": float(np.abs(fit - truth[t]).max()),
                              "gap_share": gap_share(fit, truth[t], xs, xe)})
        at_cap[name] = per_width
        budget_best[name] = {b: [float(curve[i, t, steps.index(b)]) for i in range(len(widths))] for b in budgets}
        summary[name] = {
            "slope_at_budget": {b: slope(widths, e) for b, e in budget_best[name].items()},
            "lowest_at_budget": {b: widths[int(np.argmin(e))] for b, e in budget_best[name].items()},
            "not_below_previous_width": {b: [w for w, lo, hi in zip(widths[1:], e, e[1:]) if hi >= lo]
                                         for b, e in budget_best[name].items()},
            "cap_over_quarter": [e1 / e0 for e0, e1 in zip(budget_best[name][cap // 4], budget_best[name][cap])],
        }

    plt = common.pyplot()
    fig, axes = plt.subplots(3, len(TARGETS), figsize=(17, 12.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(widths)))
    for t, name in enumerate(TARGETS):
        ax = axes[0, t]
        for i, (width, c) in enumerate(zip(widths, colors)):
            w = at_cap[name][i]
            ax.plot(steps, curve[i, t], "-", color=c, lw=1.2, label=f"n = {width}")
            ax.plot([cap], [w["rmse"]], "x" if w["still_improving"] else "o", color=c, ms=7)
        ax.axhline(reference[name], color="k", ls=":", lw=1, label=f"linear interpolant {reference[name]:.2g}")
        ax.set(xscale="log", yscale="log", xlabel="Adam steps", ylabel="RMS error on 1,001 points",
               title=f"({'abc'[t]}) {name}: error of the best network found vs steps\n(at the cap: × loss "
                     "still improving, ● not)")
        ax.legend(fontsize=7, ncol=2)
        ax = axes[1, t]
        for b, style in zip(budgets, ("s:", "s--", "o-")):
            ax.plot(widths, budget_best[name][b], style, ms=4, lw=1.3,
                    label=f"after {b:,} steps (slope {summary[name]['slope_at_budget'][b]:.2f})")
        ax.set(xscale="log", yscale="log", xlabel="hidden units n", ylabel="RMS error (best network found)",
               title=f"({'def'[t]}) {name}: error vs width")
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.legend(fontsize=8)
        ax = axes[2, t]
        ax.plot(xe, truth[t], "k-", lw=3, alpha=0.3, label="target")
        for width in sorted({widths[0], widths[len(widths) // 2], widths[-1]}):
            i = widths.index(width)
            w = at_cap[name][i]
            ax.plot(xe, fits[i, t, w["seed"], steps.index(w["found_at"])], lw=1.2, label=f"n = {width}")
        ax.set(xlabel="x", title=f"({'ghi'[t]}) {name}: fits after {cap:,} steps")
        ax.legend(fontsize=8)
    common.save_figure(args, fig)

    results = {"widths": list(widths), "seeds": seeds, "chunk": chunk, "cap": cap, "steps": steps,
               "rate": RATE, "half_life": HALF_LIFE, "tol": TOL, "window": window * chunk, "budgets": budgets,
               "train_mse_all": {n: train_mse[:, t] for t, n in enumerate(TARGETS)},
               "rmse_all": {n: rmse[:, t] for t, n in enumerate(TARGETS)},
               "at_cap": at_cap, "rmse_best": {n: [w["rmse"] for w in at_cap[n]] for n in TARGETS},
               "rmse_best_at_budget": budget_best, "summary": summary, "interpolant_rmse": reference,
               "padded_units_max_abs_weight": padding}
    common.save_json(args, results)
    lines = []
    for name in TARGETS:
        s, e = summary[name], budget_best[name]
        lines.append(
            f"{name}: RMS of the best network found ({seeds} inits) by width after " + "; ".join(
                f"{b:,} steps " + ", ".join(f"{v:.2g}" for v in e[b]) + f" (slope {s['slope_at_budget'][b]:.2f}, "
                f"lowest at n={s['lowest_at_budget'][b]})" for b in budgets)
            + f"; {cap // 4:,} → {cap:,} steps multiplies the error by {min(s['cap_over_quarter']):.2g}–"
            f"{max(s['cap_over_quarter']):.2g}; loss still improving at the cap for n = "
            + (", ".join(str(n) for n, w in zip(widths, at_cap[name]) if w["still_improving"]) or "none"))
    step = at_cap["step [x ≥ 0]"]
    common.conclude(args, ". ".join(lines) + ". The piecewise-linear interpolant of the training points: " + ", ".join(
        f"{n} {v:.2g}" for n, v in reference.items()) + "; share of the step's squared error in the gap around "
        f"its jump: {min(w['gap_share'] for w in step):.0%}–{max(w['gap_share'] for w in step):.0%}.")
    return results


if __name__ == "__main__":
    main()
