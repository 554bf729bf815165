"""Batch, stochastic and mini-batch gradient descent: progress per epoch, per second, and the noise.

One model, a 64-64-10 tanh network with softmax cross-entropy on scikit-learn's 8×8 digits
(``N = 1,437`` training images, z-scored), trained by plain SGD ``θ ← θ − η ∇C_B`` with the same
``η = 0.1`` and, within a seed, the same initial parameters for

- ``B = N``: batch gradient descent, one step per epoch on the exact gradient;
- ``B = 1``: stochastic gradient descent, ``N`` steps per epoch on one sample each;
- ``B = 32`` and ``B = 128``: mini-batches,

each reshuffled every epoch (the leftover ``N mod B`` samples form one smaller last batch). The
epoch is the compiled function :func:`fnn.fit` runs (:func:`fnn.train.make_epoch`, one
``lax.scan`` over the batches). Seed ``s`` draws the initial parameters and the batch order from
``PRNGKey(s)``; seeds ``S … S + SEEDS − 1`` are run for ``--seed S`` (default 0). The full training-set
cost is measured after every epoch.

Time, all of it measured with ``time.perf_counter``:

- *compile*: tracing, lowering and compiling the epoch function, once per batch size (every seed
  reuses it), before any epoch runs; then one *first call* of the compiled epoch on the first seed's
  start, whose result is dropped (a one-time warm-up of the executable, several epochs' worth);
- *epoch*: from the call of the compiled epoch until its outputs are ready
  (``jax.block_until_ready``), for every epoch of every seed. The cost evaluations between epochs
  are not timed.

The time axis of a run is the running sum of its epoch times ("training time"); the same with
the compile and first-call time added is given too (one measurement per batch size). A cost level
``c`` is reached in epoch ``e``, the first whose cost is ``≤ c``; as the cost is measured once per
epoch, the time to reach ``c`` is known only to lie in ``(T_{e−1}, T_e]``, ``T_e`` the training
time after ``e`` epochs. The claim "mini-batches win in wall-clock time" is checked at every level
of ``LADDER`` (from easy to hard): a batch size is *first* at a level only where, in every seed,
its upper bound ``T_e`` lies below the lower bound ``T_{e−1}`` of every other batch size in every
seed (a run that never gets there has the lower bound of its whole training time); otherwise the
level is *not resolved* between the batch sizes that no other beats so.

Noise: the per-step batch costs of the first epoch of the first seed (``EpochStats.cost``) for ``B = 1``
and ``B = 128``, which start from the same parameters, and the mean squared distance of a
mini-batch gradient from the full gradient against the sampling-without-replacement formula

    E‖∇C_B − ∇C‖² = (σ²/B) · (N − B)/(N − 1),   σ² = (1/N) Σ_i ‖∇C_i − ∇C‖²,

with the per-sample gradients ``∇C_i`` from :func:`fnn.backprop` on single samples.

Output: ``batch_sizes.png`` (six panels) and ``batch_sizes.json``.
"""

from __future__ import annotations

import time

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import fnn

ETA = 0.1
SIZES = (64, 64, 10)
NOISE_BATCHES = (1, 4, 16, 64, 256)
SEEDS = 3
FLOOR = 1e-4
"""Where panel (c) starts the bars of levels reached in the first epoch (lower bound 0 s), on its log axis."""
LADDER = tuple(float(10 ** (-k / 2)) for k in range(9))
"""The cost levels the claim is checked at: 1, 10^−½, …, 10⁻⁴, those below the initial cost that some
batch size reaches in every seed."""


def flat_grad(net, params, x, y, loss) -> jax.Array:
    """``∇C`` on the batch ``x (B, 64)``, ``y (B,)`` as one flat vector ``(P,)`` (manual backprop)."""
    return ravel_pytree(fnn.backprop(net, params, x, y, loss)[1])[0]


def gradient_noise(net, params, x, y, loss, batch_sizes, draws: int, seed: int) -> dict:
    """Measured and predicted ``E‖∇C_B − ∇C‖²`` for each ``B``, over ``draws`` batches each.

    A batch is ``B`` distinct samples (consecutive rows of a random permutation), as in an epoch.
    """
    n = x.shape[0]

    @jax.jit
    def full_and_spread():
        full = flat_grad(net, params, x, y, loss)  # (P,)
        per_sample = jax.vmap(lambda xi, yi: flat_grad(net, params, xi[None], yi[None], loss))(x, y)  # (N, P)
        return full, jnp.mean(jnp.sum((per_sample - full) ** 2, axis=1))

    @jax.jit
    def spread(rows, full):  # rows (draws, B) -> mean ‖∇C_B − ∇C‖²
        grads = jax.vmap(lambda r: flat_grad(net, params, x[r], y[r], loss))(rows)  # (draws, P)
        return jnp.mean(jnp.sum((grads - full) ** 2, axis=1))

    full, sigma2 = full_and_spread()
    sigma2 = float(sigma2)
    rng = np.random.RandomState(seed)
    measured, predicted = [], []
    for b in batch_sizes:
        rows = np.concatenate([rng.permutation(n)[: n // b * b].reshape(-1, b) for _ in range(-(-draws * b // n))])
        measured.append(float(spread(jnp.asarray(rows[:draws]), full)))
        predicted.append(sigma2 / b * (n - b) / (n - 1))
    return {"batch_sizes": list(batch_sizes), "sigma2": sigma2, "measured": measured, "predicted": predicted,
            "full_grad_norm2": float(jnp.sum(full**2))}


def time_to_levels(costs: np.ndarray, seconds: np.ndarray, levels) -> dict:
    """When one run reaches each of ``levels``: ``costs (E + 1,)`` before training and after each epoch,
    ``seconds (E,)`` the epoch times. Returns ``{"epoch", "lower", "upper"}``, one entry per level:
    the first epoch ``e`` with cost ``≤`` the level and the bracket ``(T_{e−1}, T_e]`` of its time,
    ``T`` the running sum of ``seconds`` (``None``, ``T_E``, ``inf`` where it never gets there)."""
    elapsed = np.concatenate([[0.0], np.cumsum(seconds)])
    out = {"epoch": [], "lower": [], "upper": []}
    for level in levels:
        hit = np.flatnonzero(costs <= level)
        e = int(hit[0]) if hit.size else None
        out["epoch"].append(e)
        out["lower"].append(float(elapsed[max(e - 1, 0)]) if e is not None else float(elapsed[-1]))
        out["upper"].append(float(elapsed[e]) if e is not None else np.inf)
    return out


def leaders(lower: dict, upper: dict) -> list:
    """The batch sizes no other beats, where ``a`` beats ``b`` if ``a``'s largest upper bound over the
    seeds lies below ``b``'s smallest lower bound; ``lower[name]``, ``upper[name]``: ``(seeds,)``.
    A batch size that does not reach the level in every seed is never one (none may be left)."""
    beats = {a: {b for b in lower if b != a and max(upper[a]) < min(lower[b])} for a in lower}
    reached = [a for a in lower if np.isfinite(max(upper[a]))]
    return [a for a in reached if not any(a in beaten for beaten in beats.values())]


def main(argv=None) -> dict:
    """Run the experiment (``argv``: the command line); returns the results written to the JSON."""
    args = common.parse_args("batch_sizes", __doc__.splitlines()[0], argv)
    data = fnn.data.load_dataset("digits")
    norm = fnn.data.fit_zscore(data.x_train)
    x = jnp.asarray(fnn.data.zscore(norm, data.x_train), jnp.float32)  # (1437, 64)
    x_test = jnp.asarray(fnn.data.zscore(norm, data.x_test), jnp.float32)  # (360, 64)
    y, y_test = jnp.asarray(data.y_train), jnp.asarray(data.y_test)
    epochs, draws, seeds = (3, 32, 2) if args.quick else (40, 400, SEEDS)
    noise_batches = (1, 16) if args.quick else NOISE_BATCHES
    if args.quick:  # a multiple of every batch size: no smaller last batch to compile
        x, y = x[:256], y[:256]
    n = x.shape[0]
    net, loss, opt = fnn.MLP(SIZES, "tanh", "identity"), fnn.losses.softmax_cross_entropy, fnn.optim.sgd(ETA)
    cost_of = jax.jit(lambda p: fnn.objective(net, p, x, y, loss))
    starts = [jax.random.split(jax.random.PRNGKey(s)) for s in common.seeds(args, seeds)]  # (init, order) per seed
    starts = [(net.init(init, jnp.float32), order) for init, order in starts]
    initial_cost = [float(cost_of(p)) for p, _ in starts]

    names = {n: "B = N", 128: "B = 128", 32: "B = 32", 1: "B = 1"}
    compiled, runs = {}, {}
    for b, name in names.items():  # compile every epoch function first, timed
        epoch = fnn.train.make_epoch(net, loss, opt, num_samples=n, batch_size=b, guard=False, grad_norm=False)
        t0 = time.perf_counter()
        first = (starts[0][0], opt.init(starts[0][0]), None, starts[0][1], x, y)
        compiled[name] = jax.jit(epoch).lower(*first).compile()
        t1 = time.perf_counter()
        jax.block_until_ready(compiled[name](*first))
        runs[name] = {"batch_size": b, "steps_per_epoch": -(-n // b), "compile_seconds": t1 - t0,
                      "first_call_seconds": time.perf_counter() - t1, "full_train_cost": [], "epoch_seconds": [],
                      "held_out_accuracy": []}
    steps = {}
    for s, (params0, order) in enumerate(starts):  # seeds outermost: a slow spell of the machine hits all sizes
        for name, run in runs.items():
            params, state, key, costs, seconds = params0, opt.init(params0), order, [initial_cost[s]], []
            for e in range(epochs):
                t0 = time.perf_counter()
                params, state, _, key, stats = jax.block_until_ready(compiled[name](params, state, None, key, x, y))
                seconds.append(time.perf_counter() - t0)
                costs.append(float(cost_of(params)))
                if s == 0 and e == 0 and run["batch_size"] in (1, 128):
                    steps[name] = np.asarray(stats.cost, np.float64)  # one epoch's batch costs from the same start
            run["full_train_cost"].append(costs)
            run["epoch_seconds"].append(seconds)
            run["held_out_accuracy"].append(fnn.metrics.evaluate(net, params, x_test, y_test, loss)["accuracy"])
    lowest = min(max(min(c) for c in run["full_train_cost"]) for run in runs.values())  # some size, every seed
    levels = [c for c in LADDER if lowest <= c < min(initial_cost)]
    for run in runs.values():
        seconds = np.asarray(run["epoch_seconds"])  # (seeds, epochs)
        run["training_seconds"] = np.concatenate([np.zeros((seeds, 1)), np.cumsum(seconds, axis=1)], axis=1)
        run["median_epoch_seconds"] = float(np.median(seconds))
        run["samples_per_s"] = n / run["median_epoch_seconds"]
        run["levels"] = [time_to_levels(np.asarray(c), t, levels) for c, t in zip(run["full_train_cost"], seconds)]
    noise = gradient_noise(net, starts[0][0], x, y, loss, [b for b in noise_batches if b < n], draws,
                           seed=args.seed + 7)

    ladder = []
    for i, level in enumerate(levels):
        lower = {name: [r["lower"][i] for r in run["levels"]] for name, run in runs.items()}
        upper = {name: [r["upper"][i] for r in run["levels"]] for name, run in runs.items()}
        shift = {name: run["compile_seconds"] + run["first_call_seconds"] for name, run in runs.items()}
        ladder.append({
            "level": level,
            "epochs": {name: [r["epoch"][i] for r in run["levels"]] for name, run in runs.items()},
            "lower": lower, "upper": upper,
            "leaders": leaders(lower, upper),
            "leaders_with_compile": leaders({k: [v + shift[k] for v in lo] for k, lo in lower.items()},
                                            {k: [v + shift[k] for v in hi] for k, hi in upper.items()}),
        })

    plt = common.pyplot()
    fig, ax = plt.subplots(2, 3, figsize=(18, 9.5))
    for i, (name, run) in enumerate(runs.items()):
        label = f"{name} ({run['steps_per_epoch']} step{'s' if run['steps_per_epoch'] > 1 else ''}/epoch)"
        for s in range(seeds):
            keep = {"label": label} if s == 0 else {}
            ax[0, 0].semilogy(range(epochs + 1), run["full_train_cost"][s], "o-"[s > 0:] if s == 0 else "-", ms=3,
                              lw=1 if s == 0 else 0.6, color=f"C{i}", **keep)
            ax[0, 1].loglog(run["training_seconds"][s][1:], run["full_train_cost"][s][1:], "o-" if s == 0 else "-",
                            ms=3, lw=1 if s == 0 else 0.6, color=f"C{i}",
                            **({"label": f"{name}: {run['samples_per_s']:,.0f} samples/s"} if s == 0 else {}))
    for level in levels:
        ax[0, 1].axhline(level, color="0.8", lw=0.6, ls=":")
    ax[0, 0].set(xlabel="epoch", ylabel="training-set cost C(θ)",
                 title=f"(a) per epoch, SGD η = {ETA}, N = {n}, {seeds} seeds (seed {args.seed} with markers)")
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].set(xlabel="training time (s): running sum of the measured epoch times, compile excluded",
                 ylabel="training-set cost C(θ)", title="(b) per second of training (dotted: the cost ladder)")
    ax[0, 1].legend(fontsize=8)
    for a, compile_too in ((ax[0, 2], False), (ax[1, 2], True)):
        for i, (name, run) in enumerate(runs.items()):
            shift = run["compile_seconds"] + run["first_call_seconds"] if compile_too else 0.0
            for j, step in enumerate(ladder):
                lo, hi = min(step["lower"][name]) + shift, max(step["upper"][name]) + shift
                if np.isfinite(hi):
                    a.plot([j + 0.15 * (i - 1.5)] * 2, [max(lo, FLOOR), hi], "-", color=f"C{i}", lw=4,
                           solid_capstyle="butt", label=name if j == 0 else None)
            a.plot([], [], color=f"C{i}", lw=4)
        key = "leaders_with_compile" if compile_too else "leaders"
        ticks = [f"{c:.2g}\n" + ("/".join(s[key]).replace("B = ", "") if len(s[key]) < 4 else "all")
                 for c, s in zip(levels, ladder)]
        a.set_xticks(range(len(levels)), ticks, fontsize=7)
        a.set(yscale="linear" if compile_too else "log",
              xlabel="cost level; below it, the batch sizes B no other beats",
              ylabel="time to reach it (s)" + (", compile and first call included" if compile_too else
                                               f" (a bar from 0 starts at {FLOOR:g})"),
              title=("(f) the same, compile and first call added" if compile_too else
                     "(c) time to each level (bar: its bounds over the seeds)"))
        a.legend(fontsize=8)
    a = ax[1, 0]
    for (name, c), color in zip(steps.items(), ("C1", "C3")):
        t = (np.arange(c.size) + 1) / c.size
        if c.size > 50:
            a.plot(t, c, "-", lw=0.4, alpha=0.5, color=color, label=f"{name}: cost of each batch ({c.size} steps)")
            w = c.size // 20
            a.plot(t[w - 1:], np.convolve(c, np.ones(w) / w, "valid"), "-", lw=2, color="darkred",
                   label=f"{name}: running mean of {w} steps")
        else:
            a.plot(t, c, "o-", ms=4, color=color, label=f"{name}: cost of each batch ({c.size} steps)")
    a.axhline(initial_cost[0], color="k", lw=0.7, ls=":", label="C(θ₀) on the training set")
    a.set(xlabel="fraction of the first epoch", ylabel="batch cost C_B(θ_t)", yscale="log",
          title=f"(d) one epoch from the same θ₀ (seed {args.seed}): the noise of the stochastic path")
    a.legend(fontsize=8, loc="lower left")
    a = ax[1, 1]
    a.loglog(noise["batch_sizes"], noise["measured"], "o", ms=6, label=f"measured ({draws} batches each)")
    a.loglog(noise["batch_sizes"], noise["predicted"], "-", color="0.4", label="(σ²/B)(N−B)/(N−1)")
    a.axhline(noise["full_grad_norm2"], color="C2", ls=":", label="‖∇C‖² (the signal)")
    a.set(xlabel="batch size B", ylabel="E‖∇C_B − ∇C‖²",
          title=f"(e) gradient noise at θ₀ (seed {args.seed}) falls as 1/B")
    a.legend(fontsize=8)
    common.save_figure(args, fig)

    results = {"n": n, "eta": ETA, "epochs": epochs, "seeds": seeds, "first_seed": args.seed, "levels": levels,
               "runs": runs, "ladder": ladder, "step_costs": steps, "gradient_noise": noise}
    common.save_json(args, results)
    common.conclude(args, describe(results))
    return results


def describe(r: dict) -> str:
    """The conclusion, in words, from the results ``r``."""
    runs, ladder = r["runs"], r["ladder"]
    final = {name: np.asarray(run["full_train_cost"])[:, -1] for name, run in runs.items()}
    by_epoch = sorted(final, key=lambda k: final[k].mean())
    accuracy = {name: 100 * np.asarray(run["held_out_accuracy"]) for name, run in runs.items()}

    def words(step, key):
        who = step[key]
        if not who:
            return "reached by none in every seed"
        return f"{who[0]} first" if len(who) == 1 else f"not resolved between {', '.join(who)}"

    noise = r["gradient_noise"]
    ratio = np.asarray(noise["measured"]) / np.asarray(noise["predicted"])
    spread = {name: float(np.std(c) / np.mean(c)) for name, c in r["step_costs"].items()}
    return "\n".join([
        f"after {r['epochs']} epochs at η = {r['eta']} ({r['seeds']} seeds, min–max) the training-set cost is "
        + ", ".join(f"{k}: {final[k].min():.4f}–{final[k].max():.4f}" for k in by_epoch)
        + f"; held-out accuracy {by_epoch[0]} {accuracy[by_epoch[0]].min():.1f}–{accuracy[by_epoch[0]].max():.1f} % "
        f"against B = N {accuracy['B = N'].min():.1f}–{accuracy['B = N'].max():.1f} %.",
        "measured time: compile " + ", ".join(f"{k} {run['compile_seconds']:.2f} s" for k, run in runs.items())
        + "; first call " + ", ".join(f"{k} {1000 * run['first_call_seconds']:.1f} ms" for k, run in runs.items())
        + "; median epoch " + ", ".join(f"{k} {1000 * run['median_epoch_seconds']:.2f} ms" for k, run in runs.items())
        + " (" + ", ".join(f"{k} {run['samples_per_s']:,.0f}" for k, run in runs.items()) + " samples/s).",
        "time to each cost level, training time (compile excluded): " + "; ".join(
            f"{s['level']:.2g}: {words(s, 'leaders')}" for s in ladder)
        + ". With the compile and first-call time added: " + "; ".join(
            f"{s['level']:.2g}: {words(s, 'leaders_with_compile')}" for s in ladder) + ".",
        f"noise: within one epoch the batch costs vary with coefficient of variation {spread['B = 1']:.2f} for "
        f"B = 1 against {spread['B = 128']:.2f} for B = 128; the measured E‖∇C_B − ∇C‖² is "
        f"{ratio.min():.2f}–{ratio.max():.2f}× the formula (σ²/B)(N−B)/(N−1) over B = "
        f"{', '.join(map(str, noise['batch_sizes']))}.",
    ])


if __name__ == "__main__":
    main()
