"""The gradient noise scale over training, and the critical batch size it should predict, from the δ's.

Claims checked (McCandlish, Kaplan, Amodei et al., "An empirical model of large-batch training",
2018): (1) the simple noise scale ``B_simple = tr(Σ)/‖G‖²`` grows as training proceeds, because the
true gradient ``‖G‖²`` shrinks faster than the per-example noise ``tr(Σ)`` (section 3, fig. 7); (2)
the steps ``S`` and examples ``E = B·S`` that SGD with batch ``B`` needs to reach a target loss lie on
the hyperbola ``(S/S_min − 1)(E/E_min − 1) = 1`` (eq. 2.11, fig. 4), i.e. ``S = S_min (1 + B_crit/B)``,
whose critical batch size ``B_crit = E_min/S_min`` the noise scale ``B_simple`` at that loss predicts.

Over training: 784-256-10 relu on mnist-10k (8,000 training images, z-scored), SGD α = 0.3,
batch 128, ``--epochs`` epochs, ``--seeds`` seeds (initialization and batch order). Each step computes
the unbiased estimates of ``tr(Σ)`` and ``‖G‖²`` from the per-example gradients of its batch, read off
the backprop's δ's (:func:`fnn.per_example.noise_scale`, with the estimators for batches drawn without
replacement), and every epoch records the ratio of their epoch means, as the paper recommends, with the
quantiles of the per-example gradient norms.

Critical batch size: the same network and data, plain SGD (:func:`fnn.optim.sgd`, the gradient of
:func:`fnn.train_step`), batches ``B`` = 16, 32, …, 2,048 drawn without replacement (a fresh permutation
per epoch, the last ``M mod B`` images of each left out), ``--ladder-seeds`` seeds. ``S(B)`` is the
first step at which the loss on a fixed probe (the first 1,024 training images) is at most the target
``--target`` (0.1): the loss is checked after every step up to step 25 and then every 4 % of the steps
so far, and ``S`` is where the straight line through the last two checks in (step, log loss) crosses
the target, rounded up. The learning rate is tuned per batch size, as in the paper, on a grid √2 apart
(0.0125 … 1.6): starting from the previous batch size's rate, it moves to a neighbour while the
geometric mean of ``S`` over the seeds falls, and stops at a rate both of whose neighbours are worse
(or at an end of the grid, which the output says); a run that diverges (probe loss above 10 times its
start, or not finite) or takes more than 3 times the fewest steps seen at its batch size counts as
not reaching the target. ``S_min`` and ``B_crit`` are fitted to ``S(B)`` at the chosen rates by least
squares in ``log S``, per seed and for the geometric means over the seeds. ``B_simple`` at the target
is measured exactly, on all 8,000 images (population ``tr(Σ)`` and ``‖G‖²``, the per-example gradients
from the δ's), at the parameters where each of these runs first reached the target.

Departures from the paper: much smaller models and data; a finite training set that the network nearly
memorizes (the paper's data are effectively unbounded), so ``E`` counts examples drawn, repeats
included; ``B_simple`` from one batch (over training) or the whole set (at the target) instead of two
batch sizes; one target loss instead of several; and "training proceeds" spans 20 epochs (1,260 steps).
"""

import math

import common  # first: puts the repository on sys.path
from common import conclude, mnist_10k, parse_args, pyplot, save_figure, save_json

# isort: split
import jax
import numpy as np

import fnn

LOSS = fnn.losses.softmax_cross_entropy
BATCH = 128
RATE = 0.3
QUANTILES = ("norm_p10", "norm_median", "norm_p90", "norm_max")
LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048)
QUICK_LADDER = (16, 64, 256)
RATES = tuple(round(0.1 * 2 ** (k / 2), 4) for k in range(-6, 9))  # 0.0125 … 1.6, √2 apart
FIRST_RATE = 0.1  # where the smallest batch's search starts
PROBE, QUICK_PROBE = 1024, 256  # training images whose loss is watched
EVERY_STEP = 25  # the loss is checked after every step up to here, then every SPACING of the steps so far
SPACING = 0.04
BLOWN_UP = 10  # a run whose probe loss exceeds BLOWN_UP × its start has diverged
CAP = 3  # a run stops at CAP × the fewest steps to the target seen at its batch size
MAX_STEPS = 20_000


def _extra(p):
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--ladder-seeds", type=int, default=3)
    p.add_argument("--target", type=float, default=0.1, help="probe loss the ladder's runs must reach")


def run(x, y, held_out, epochs: int, seed: int) -> list[dict]:
    """One training run; its history with the noise scale and the norm quantiles of every epoch."""
    net = fnn.MLP((784, 256, 10), "relu", init="he_normal")
    init_key, order_key = jax.random.split(jax.random.PRNGKey(seed))
    result = fnn.fit(net, net.init(init_key), fnn.optim.sgd(RATE), (x, y), loss=LOSS, epochs=epochs,
                     batch_size=BATCH, key=order_key, held_out=held_out, per_example=("noise_scale", "norms"),
                     quiet=True)
    if result.stopped:
        raise RuntimeError(result.stopped)
    return result.history


def sgd_steps(net: fnn.MLP, x, y, batch: int):
    """A jitted ``(params, opt_state, α, key, start, stop) -> (params, opt_state)``: SGD steps ``start … stop − 1``.

    Step ``t`` takes batch ``t mod K`` of epoch ``⌊t/K⌋``, ``K = ⌊M/B⌋``; epoch ``e`` is the permutation
    ``fold_in(key, e)`` of the ``M`` images cut into ``K`` batches of ``B = batch`` (the rest left out). The
    rate ``α`` is an argument, so that every rate and seed of one batch size reuse one compilation.
    """
    m = x.shape[0]
    per_epoch = m // batch

    def steps(params, opt_state, rate, key, start, stop):
        opt = fnn.optim.sgd(lambda count: rate)

        def order(t):
            return jax.random.permutation(jax.random.fold_in(key, t // per_epoch), m)

        def step(t, carry):
            params, opt_state, perm = carry
            perm = jax.lax.cond(t % per_epoch == 0, order, lambda t: perm, t)
            idx = jax.lax.dynamic_slice(perm, ((t % per_epoch) * batch,), (batch,))
            r = fnn.train_step(net, opt, params, opt_state, x[idx], y[idx], LOSS)  # BP1–BP4, then θ ← θ − α∇C
            return r.params, r.opt_state, perm

        params, opt_state, _ = jax.lax.fori_loop(start, stop, step, (params, opt_state, order(start)))
        return params, opt_state

    return jax.jit(steps)


def first_passage(steps, probe_loss, params, rate: float, key, target: float, limit: float):
    """``(S, params)``: the steps SGD at ``rate`` takes until the probe loss is ≤ ``target``, and the params
    at the check that saw it; ``(inf, None)`` if the loss diverges or ``limit`` steps do not reach it.

    Checks after every step up to ``EVERY_STEP``, then every ``SPACING`` of the steps so far; ``S`` is where
    the line through the last two checks in (step, log loss) crosses the target, rounded up.
    """
    opt_state = fnn.optim.sgd(rate).init(params)
    start = loss = float(probe_loss(params))
    t, limit = 0, math.ceil(limit)
    while t < limit:
        nxt = min(limit, max(t + 1, math.ceil(t * (1 + SPACING))))
        params, opt_state = steps(params, opt_state, rate, key, t, nxt)
        before, loss, t_before, t = loss, float(probe_loss(params)), t, nxt
        if not np.isfinite(loss) or loss > BLOWN_UP * start:
            break
        if loss <= target:
            crossed = t_before + (t - t_before) * math.log(before / target) / math.log(before / loss)
            return min(t, math.ceil(crossed - 1e-9)), params
    return math.inf, None


def geometric_mean(values) -> float:
    return float(np.exp(np.mean(np.log(values))))


def tune(measure, start: int) -> tuple[int, dict]:
    """The index of the best rate of ``RATES`` by a walk from ``start``: to a neighbour while
    ``measure(k)`` (steps, lower is better) falls; ``(best, {k: measure(k)})`` of the rates tried."""
    tried = {}

    def at(k):
        if k not in tried:
            tried[k] = measure(k)
        return tried[k]

    best = start
    for direction in (1, -1):
        while 0 <= best + direction < len(RATES) and at(best) > at(best + direction):
            best += direction
    return best, tried


def fit_critical(batch, steps) -> dict:
    """``S(B) = S_min (1 + B_crit/B)`` fitted to ``steps`` by least squares in ``log S``.

    On that curve ``E = B·S = E_min (1 + B/B_crit)`` with ``E_min = S_min B_crit``, so every ``(S, E)`` it
    gives satisfies ``(S/S_min − 1)(E/E_min − 1) = 1`` (the paper's eq. 2.11). For a fixed ``B_crit`` the
    best ``log S_min`` is the mean of ``log S − log(1 + B_crit/B)``; ``B_crit`` is searched on a grid from
    ``B_min/100`` to ``100 B_max`` (``at_bound``: the best is that grid's end), then refined.
    """
    b, log_s = np.asarray(batch, float), np.log(np.asarray(steps, float))

    def best(grid):
        shape = np.log1p(grid[:, None] / b[None, :])
        log_s_min = np.mean(log_s - shape, axis=1)
        sse = np.sum((log_s - log_s_min[:, None] - shape) ** 2, axis=1)
        i = int(np.argmin(sse))
        return i, grid[i], log_s_min[i], sse[i]

    grid = np.geomspace(b.min() / 100, b.max() * 100, 2001)
    i, *_ = best(grid)
    _, b_crit, log_s_min, sse = best(np.geomspace(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], 2001))
    s_min = float(np.exp(log_s_min))
    return {"s_min": s_min, "b_crit": float(b_crit), "e_min": s_min * float(b_crit),
            "rms_log": float(np.sqrt(sse / b.size)), "at_bound": i in (0, len(grid) - 1)}


def ladder(net: fnn.MLP, x, y, seeds: list[int], batch_sizes, target: float, probe_rows: int) -> dict:
    """Steps to ``target`` over the batch-size ladder at the tuned rates, the fits, and ``B_simple`` at the target."""
    m = x.shape[0]
    probe = x[:probe_rows], y[:probe_rows]
    probe_loss = jax.jit(lambda p: LOSS(net.apply(p, probe[0]), probe[1]))

    @jax.jit
    def noise(p):  # tr(Σ) and ‖G‖² of the whole training set, per-example gradients from the δ's
        ns = fnn.per_example.noise_scale(net, p, fnn.backprop_trace(net, p, x, y, LOSS)[3], population=m)
        return ns.trace_cov, ns.grad_sq

    keys = [jax.random.split(jax.random.PRNGKey(s)) for s in seeds]
    inits = [net.init(k[0]) for k in keys]
    rows, start = [], RATES.index(FIRST_RATE)
    for batch in batch_sizes:
        steps = sgd_steps(net, x, y, batch)
        runs = {}  # k -> [(S, params) per seed]

        def measure(k):
            fewest = [min([r[s][0] for r in runs.values()], default=math.inf) for s in range(len(seeds))]
            runs[k] = [first_passage(steps, probe_loss, inits[s], RATES[k], keys[s][1], target,
                                     min(MAX_STEPS, CAP * fewest[s])) for s in range(len(seeds))]
            return geometric_mean([r[0] for r in runs[k]])

        best, tried = tune(measure, start)
        reached = runs[best]
        if not np.isfinite(tried[best]):
            raise RuntimeError(f"batch {batch}: no rate of {RATES} reached the training loss {target} in "
                               f"{MAX_STEPS:,} steps in every seed; choose a higher --target")
        parts = [noise(p) for _, p in reached]
        cov, sq = (np.array([float(v[i]) for v in parts]) for i in (0, 1))
        rows.append({"batch": batch, "rate": RATES[best], "at_edge": best in (0, len(RATES) - 1),
                     "tried": {RATES[k]: tried[k] for k in sorted(tried)},
                     "steps": [r[0] for r in reached], "steps_mean": tried[best],
                     "trace_cov": cov, "grad_sq": sq, "b_simple": cov / sq})
        start = best
    batch = np.array(batch_sizes)
    steps = np.array([row["steps"] for row in rows], float).T  # (seeds, batch sizes)
    b_simple = np.array([row["b_simple"] for row in rows]).T
    fits = [fit_critical(batch, s) for s in steps]
    fit = fit_critical(batch, [row["steps_mean"] for row in rows])
    seed_b_simple = np.median(b_simple, axis=1)
    return {"target": target, "probe": probe_rows, "rates": RATES, "cap": CAP, "blown_up": BLOWN_UP,
            "max_steps": MAX_STEPS, "every_step": EVERY_STEP, "spacing": SPACING, "seeds": len(seeds),
            "batch_sizes": batch, "rows": rows, "steps": steps, "examples": steps * batch,
            "fit": fit, "fit_per_seed": fits, "b_crit_per_seed": [f["b_crit"] for f in fits],
            "b_simple_at_target": b_simple, "b_simple_per_seed": seed_b_simple,
            "b_simple_median": float(np.median(b_simple)),
            "ratio_per_seed": seed_b_simple / np.array([f["b_crit"] for f in fits]),
            "ratio": float(np.median(b_simple)) / fit["b_crit"]}


def verdict(lad: dict) -> str:
    """What the ladder says of ``B_simple`` against ``B_crit``, computed from its numbers."""
    ratios = np.asarray(lad["ratio_per_seed"], float)
    n = ratios.size
    within = np.abs(np.log10(ratios)) <= 1
    above = int(np.sum(ratios > 1))
    where = (f"within an order of magnitude of B_crit in all {n} seeds" if within.all() else
             f"more than an order of magnitude from B_crit in all {n} seeds" if not within.any() else
             f"within an order of magnitude of B_crit in {int(within.sum())} of {n} seeds only")
    side = ("larger" if above == n else "smaller" if above == 0 else
            f"larger in {above} of {n} seeds, smaller in the rest")
    return f"B_simple at the target is {where}, {side} (B_simple/B_crit {ratios.min():.1f}–{ratios.max():.1f})"


def main(argv=None) -> dict:
    args = parse_args("gradient_noise", __doc__, argv, _extra)
    x, y, xt, yt, _ = mnist_10k(args, quick_rows=1024)
    epochs, seeds = (3, 2) if args.quick else (args.epochs, args.seeds)
    histories = [run(x, y, (xt, yt), epochs, s) for s in common.seeds(args, seeds)]
    net = fnn.MLP((784, 256, 10), "relu", init="he_normal")
    lad = ladder(net, x, y, common.seeds(args, 2 if args.quick else args.ladder_seeds),
                 QUICK_LADDER if args.quick else LADDER, 0.3 if args.quick else args.target,
                 QUICK_PROBE if args.quick else PROBE)

    def series(key):  # (seeds, epochs)
        return np.array([[h[key] for h in hist] for hist in histories])

    b = series("noise_scale")
    # An epoch whose mean ‖G‖² estimate is ≤ 0 has a true gradient too small to tell from the noise
    # at this batch size: B_simple is then beyond measure, counted as +∞ (it sorts above every value).
    unresolved = series("grad_sq") <= 0
    b_ranked = np.where(unresolved, np.inf, b)
    tail = min(5, epochs)
    late = np.median(b_ranked[:, -tail:], axis=1)
    growth = late / b_ranked[:, 0]
    results = {
        "epochs": epochs, "seeds": seeds, "batch": BATCH, "rate": RATE,
        "noise_scale": b, "grad_trace_cov": series("grad_trace_cov"), "grad_sq": series("grad_sq"),
        "unresolved_epochs": unresolved, "train_loss": series("train_loss"),
        "held_out_accuracy": series("held_out_accuracy"), **{q: series(q) for q in QUANTILES},
        "late_epochs": tail, "late_median": late, "growth_late_over_first": growth,
        "grows_in_every_seed": bool(np.all(growth > 1)), "ladder": lad, "ladder_verdict": verdict(lad),
    }

    plt = pyplot()
    fig, ((ax1, ax3), (ax2, ax4)) = plt.subplots(2, 2, figsize=(13, 9))
    e = np.arange(1, epochs + 1)
    top = np.nanmax(np.where(unresolved, np.nan, b)) * 3
    for s in range(seeds):
        ax1.plot(e, np.where(unresolved[s], np.nan, b[s]), "o-", ms=3, color="C0", alpha=0.6,
                 label="B_simple, per seed" if s == 0 else None)
    ax1.plot(e[unresolved.any(0)], [top] * int(unresolved.any(0).sum()), "^", color="C0",
             label="‖G‖² estimate ≤ 0 in some seed")
    ax1.axhline(BATCH, color="grey", ls=":", lw=0.8, label=f"batch size {BATCH}")
    ax1.set(xlabel="epoch", ylabel="B_simple = tr(Σ)/‖G‖²", yscale="log",
            title=f"gradient noise scale, SGD α = {RATE} (ratio of epoch means)")
    twin = ax1.twinx()
    twin.plot(e, results["train_loss"].mean(0), color="C3", lw=1, label="train loss (mean of seeds)")
    twin.set(ylabel="train loss", yscale="log")
    ax1.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    for s in range(seeds):  # the paper's reading: the noise scale against the loss reached (their fig. 7)
        keep = ~unresolved[s]
        ax3.plot(results["train_loss"][s][keep], b[s][keep], "o-", ms=3, color="C0", alpha=0.6,
                 label="per seed, one point per epoch" if s == 0 else None)
    ax3.plot(np.full(lad["b_simple_at_target"].size, lad["target"]), lad["b_simple_at_target"].ravel(), "x",
             color="C2", label="ladder runs at the target (whole set)")
    ax3.axhline(BATCH, color="grey", ls=":", lw=0.8, label=f"batch size {BATCH}")
    ax3.set(xlabel="training loss (epoch mean)", ylabel="B_simple", xscale="log", yscale="log",
            title="B_simple against the training loss")
    ax3.invert_xaxis()  # training runs left to right
    ax3.legend(fontsize=8)
    for i, q in enumerate(QUANTILES):
        v = results[q]
        ax2.plot(e, v.mean(0), "o-", ms=3, color=f"C{i}", label=q.replace("norm_", ""))
        ax2.fill_between(e, v.min(0), v.max(0), color=f"C{i}", alpha=0.2)
    ax2.set(xlabel="epoch", ylabel="‖g_x‖ (per-example gradient norm)", yscale="log",
            title="per-example gradient norms (band: seeds' range)")
    ax2.legend(fontsize=8)
    _pareto(ax4, lad)
    save_figure(args, fig)
    save_json(args, results)

    grew = growth > 1
    trend = (f"grows over training in all {seeds} seeds" if grew.all() else
             f"does not grow over training in any of {seeds} seeds" if not grew.any() else
             f"grows over training in {int(grew.sum())} of {seeds} seeds only")
    median = results["norm_median"]
    rises = np.mean(np.diff(b_ranked[:, 1:], axis=1) > 0)  # after epoch 2
    first_step = b_ranked[:, 1] / b_ranked[:, 0]
    fit, crit = lad["fit"], np.asarray(lad["b_crit_per_seed"])
    conclude(args, (
        f"B_simple {trend}: from {b[:, 0].min():.0f}–{b[:, 0].max():.0f} in epoch 1 to a median of "
        f"{np.min(late):.0f}–{np.max(late):.0f} over epochs {epochs - tail + 1}–{epochs} (factor "
        f"{growth.min():.1f}–{growth.max():.1f}; ∞ where ‖G‖² is not resolved). Epoch 2 alone is "
        f"{first_step.min():.1f}–{first_step.max():.1f}× epoch 1; after that B_simple rose in {100 * rises:.0f}% of "
        f"epoch-to-epoch steps, and in {int(unresolved.sum())} of {unresolved.size} seed-epochs the true gradient "
        f"was too small to resolve (‖G‖² estimate ≤ 0). The median per-example gradient norm went from "
        f"{median[:, 0].mean():.3g} to {median[:, -1].mean():.3g} while the ratio max/median went from "
        f"{(results['norm_max'][:, 0] / median[:, 0]).mean():.1f} to "
        f"{(results['norm_max'][:, -1] / median[:, -1]).mean():.1f}; held-out accuracy "
        f"{100 * results['held_out_accuracy'][:, -1].mean():.2f}% at the end."))
    conclude(args, (
        f"Steps to a training loss of {lad['target']} over batches {lad['batch_sizes'][0]}–{lad['batch_sizes'][-1]} "
        f"(SGD, rate tuned per batch size; at an end of its grid for batches "
        f"{[row['batch'] for row in lad['rows'] if row['at_edge']] or 'none'}): S_min = {fit['s_min']:.0f}, "
        f"E_min = {fit['e_min']:,.0f}, B_crit = E_min/S_min = {fit['b_crit']:.0f} (fit of the geometric means; "
        f"{crit.min():.0f}–{crit.max():.0f} per seed; rms {fit['rms_log']:.2f} in log S). B_simple at the target: "
        f"median {lad['b_simple_median']:.0f} over the ladder's runs ({np.min(lad['b_simple_at_target']):.0f}–"
        f"{np.max(lad['b_simple_at_target']):.0f}), {lad['ratio']:.1f}× B_crit. {results['ladder_verdict']}."))
    return results


def _pareto(ax, lad: dict) -> None:
    """The ladder's (E, S) per seed and their geometric means, the fitted hyperbola, B_crit and B_simple on it."""
    batch, fit = np.asarray(lad["batch_sizes"], float), lad["fit"]
    for s, (steps, examples) in enumerate(zip(lad["steps"], lad["examples"])):
        ax.plot(examples, steps, "o", ms=3, color="C0", alpha=0.4, label="per seed" if s == 0 else None)
    mean = np.array([row["steps_mean"] for row in lad["rows"]])
    ax.plot(batch * mean, mean, "o", color="C0", label="geometric mean of the seeds")
    for b_, s_ in zip(batch, mean):
        ax.annotate(f"{b_:.0f}", (b_ * s_, s_), textcoords="offset points", xytext=(4, 4), fontsize=7)
    b_curve = np.geomspace(batch.min() / 2, batch.max() * 2, 200)
    s_min, b_crit = fit["s_min"], fit["b_crit"]
    ax.plot(s_min * (b_curve + b_crit), s_min * (1 + b_crit / b_curve), color="C3", lw=1,
            label="fit (S/S_min − 1)(E/E_min − 1) = 1")
    ax.axhline(s_min, color="C3", ls=":", lw=0.8)
    ax.axvline(fit["e_min"], color="C3", ls=":", lw=0.8)
    ax.plot(2 * fit["e_min"], 2 * s_min, "s", color="C3", label=f"B_crit = E_min/S_min = {b_crit:.0f}")
    b_s = lad["b_simple_median"]
    ax.plot(s_min * (b_s + b_crit), s_min * (1 + b_crit / b_s), "*", ms=10, color="C2",
            label=f"B_simple at the target = {b_s:.0f} (median)")
    ax.set(xlabel="examples E = B·S", ylabel=f"steps S to a training loss of {lad['target']}", xscale="log",
           yscale="log", title="critical batch size: steps against examples (labels: B)")
    ax.legend(fontsize=8)


if __name__ == "__main__":
    main()
