"""Optimizer comparison on MNIST over several seeds: SGD, momentum, Nesterov, AdaGrad, RMSProp and Adam.

After Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015, Fig. 2 (multilayer
network on MNIST). Set-up: ``784-256-256-10`` with ReLU hidden units and He initialization,
softmax cross-entropy, gradients from the manual backprop, mini-batches of 128 from the 8,000
training images of ``mnist-10k`` (z-scored), 5 epochs = 310 iterations, no regularization.

- **Seeds.** Seed ``s`` fixes the initial parameters (the key of ``s`` in JAX's ``"rbg"`` PRNG,
  whose random ops compile faster than the default's) and the batch order (``RandomState(s)``);
  within a seed every optimizer starts from the same parameters and sees the same batches. The
  measured seeds are ``S … S + SEEDS − 1`` for ``--seed S`` (default 0).
- **Learning-rate pilot** (part of every run, before the measured seeds). Each optimizer trains
  once per rate of its grid in :data:`GRIDS` (steps of about √10), with the same set-up and length
  on the pilot seed ``S +`` :data:`PILOT_SEED`, which no measured seed uses; the rate with the lowest final
  loss on all training images is kept (runs with a non-finite loss are excluded). A rate at an end
  of its grid is reported as such: the grid may then not contain the best rate. (The grids were
  set on the pilot seed alone: they drop the worst rate of 4-point grids tried there first.)
- **Measured**, per optimizer and seed: the final loss on all training images; the iterations until
  the ``SMOOTH``-iteration moving mean of the mini-batch loss first reaches ``TARGET``; the held-out
  accuracy on the 2,000 other images. The conclusion gives the mean and the min–max over the seeds
  and ranks two optimizers only where their ranges are disjoint (every seed of one is better than
  every seed of the other); otherwise it calls them not distinguishable.

Departures from the paper, which used the 60,000 MNIST training images, ``784-1000-1000-10``,
batch 128, 200 epochs (about 94,000 iterations), dropout in its panel (a) and a deterministic cost
in (b), and a dense hyper-parameter grid: here 8,000 images (from the 10,000-image test file),
hidden layers of 256 (``--hidden 1000`` gives the paper's width at about 8 times the cost), 310
iterations, no dropout, stochastic mini-batch cost, a 3-point rate grid per optimizer with the
other hyper-parameters at their defaults (momentum ρ = 0.9, RMSProp decay 0.9, Adam β = (0.9,
0.999)), SGD and momentum added and AdaDelta left out. So the result is about the first few hundred
iterations of a smaller network, not about the paper's long runs. Without an MNIST directory the
script falls back to scikit-learn's digits.
"""

from __future__ import annotations

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np

import fnn

GRIDS = {  # name -> (optimizer, learning rates α tried by the pilot)
    "SGD": (fnn.optim.sgd, (0.1, 0.3, 1.0)),
    "momentum": (fnn.optim.momentum, (0.03, 0.1, 0.3)),
    "Nesterov": (fnn.optim.nesterov, (0.01, 0.03, 0.1)),
    "AdaGrad": (fnn.optim.adagrad, (0.01, 0.03, 0.1)),
    "RMSProp": (fnn.optim.rmsprop, (3e-4, 1e-3, 3e-3)),
    "Adam": (fnn.optim.adam, (3e-4, 1e-3, 3e-3)),
}
ADAPTIVE = ("AdaGrad", "RMSProp", "Adam")
"""The methods the claim is about, each compared with plain SGD."""
LOSS = fnn.losses.softmax_cross_entropy
BATCH = 128
SEEDS = 5
PILOT_SEED = 100
"""The pilot's seed, after the base seed: ``--seed S`` pilots on ``S + 100`` (so at most 100 measured seeds)."""
SMOOTH = 10
"""Iterations in the moving average drawn over the raw mini-batch losses."""
TARGET = 0.05
"""The speed measure: the first iteration at which the ``SMOOTH``-iteration mean loss is ≤ this."""


def _extra(p):
    p.add_argument("--hidden", type=int, default=256, help="units in each of the 2 hidden layers (paper: 1000)")
    p.add_argument("--seeds", type=int, default=SEEDS, help=f"measured seeds S … S+N−1 for --seed S (default {SEEDS})")


def load(args, quick: bool):
    """``(x_train, y_train, x_test, y_test, name)``: z-scored float32 inputs, int32 labels."""
    try:
        data = fnn.data.load_dataset("mnist-10k", args.data_dir)
    except fnn.data.DataError as e:
        print(f"[{args.name}] no MNIST ({e}); using scikit-learn's digits instead")
        data = fnn.data.load_dataset("digits")
    if quick:
        data = data._replace(x_train=data.x_train[:1024], y_train=data.y_train[:1024])
    data, _ = fnn.data.zscore_dataset(data)
    return (*(jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test)), data.name)


def make_train(net: fnn.MLP, make_opt):
    """A jitted ``(params, x, y, batches (T, BATCH), α) -> (params, costs (T,))`` for one optimizer.

    One ``lax.scan`` over the rows of ``batches`` (sample indices): cost and gradients by the manual
    backprop, then the optimizer's update ``θ ← θ + u``. The rate ``α`` is an argument (a constant
    schedule), so every rate and seed reuses one compilation.
    """

    def train(params, x, y, batches, rate):
        opt = make_opt(lambda count: rate)

        def step(carry, idx):
            params, state = carry
            r = fnn.train_step(net, opt, params, state, x[idx], y[idx], LOSS)
            return (r.params, r.opt_state), r.cost

        (params, _), costs = jax.lax.scan(step, (params, opt.init(params)), batches)
        return params, costs

    return jax.jit(train)


def batch_order(seed: int, n: int, epochs: int) -> jax.Array:
    """``(epochs · ⌊n/BATCH⌋, BATCH)`` sample indices: a fresh permutation of ``range(n)`` per epoch."""
    rng = np.random.RandomState(seed)
    per_epoch = n // BATCH
    return jnp.asarray(np.concatenate([rng.permutation(n)[: per_epoch * BATCH].reshape(per_epoch, BATCH)
                                       for _ in range(epochs)]))


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each ``window`` consecutive values (``len(values) − window + 1`` of them)."""
    return np.convolve(values, np.ones(window) / window, mode="valid")


def iterations_to_target(costs: np.ndarray) -> int | None:
    """The first iteration ``t`` (1-based) whose ``SMOOTH`` last mini-batch losses average ≤ ``TARGET``."""
    below = np.flatnonzero(moving_average(costs, SMOOTH) <= TARGET)
    return int(below[0] + SMOOTH) if below.size else None


def spread(values: list) -> dict:
    """``{"mean", "min", "max"}`` over seeds; ``None`` (never reached, or diverged) counts as ``inf``."""
    v = np.array([np.inf if x is None else x for x in values], float)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def separated(a: dict, b: dict) -> str:
    """``"<"`` if every seed of ``a`` is below every seed of ``b``, ``">"`` for the reverse, else ``"~"``."""
    if a["max"] < b["min"]:
        return "<"
    if b["max"] < a["min"]:
        return ">"
    return "~"


def make_evaluate(net: fnn.MLP, x, y, x_test, y_test):
    """A jitted ``params -> (loss on all of x, accuracy on x_test)``, shared by every optimizer."""

    def evaluate(params):
        accuracy = fnn.metrics.predictions_accuracy(net, LOSS, net.apply(params, x_test), y_test)
        return LOSS(net.apply(params, x), y), accuracy

    return jax.jit(evaluate)


def run_one(train, evaluate, x, y, start: tuple, rate: float) -> dict:
    """Train at rate ``rate`` from ``start = (initial params, batches)`` of one seed on ``(x, y)``."""
    initial, batches = start
    params, costs = train(initial, x, y, batches, jnp.float32(rate))
    costs, (loss, accuracy) = np.asarray(costs), jax.device_get(evaluate(params))
    finite = bool(np.all(np.isfinite(costs)) and np.isfinite(loss))
    return {
        "costs": costs, "diverged": not finite, "final_train_loss": float(loss) if finite else None,
        "iterations_to_target": iterations_to_target(costs) if finite else None,
        "held_out_accuracy": float(accuracy),
    }


def _fmt(s: dict, digits: str) -> str:
    if not np.isfinite(s["max"]):
        return "never" if not np.isfinite(s["min"]) else f"[{s['min']:{digits}}–never]"
    return f"{s['mean']:{digits}} [{s['min']:{digits}}–{s['max']:{digits}}]"


def compare(summary: dict, key: str) -> dict:
    """What the seeds support on ``key``: the order of the means, the lowest, the optimizers not
    distinguishable from it, and every pair as :func:`separated` (``pairs[a][b]``)."""
    order = sorted(summary, key=lambda n: (summary[n][key]["mean"], summary[n][key]["max"]))
    pairs = {a: {b: separated(summary[a][key], summary[b][key]) for b in summary if b != a} for a in summary}
    return {"order": order, "lowest": order[0], "tied_with_lowest": [n for n in order[1:] if pairs[order[0]][n] == "~"],
            "pairs": pairs}


def describe(summary: dict, found: dict, key: str, digits: str, what: str) -> str:
    """One sentence: every optimizer's mean [min–max], the lowest, what its range separates, and Adam's pairs."""
    c = found[key]
    best, ties = c["lowest"], c["tied_with_lowest"]
    behind = [n for n in c["order"][1:] if n not in ties]
    text = f"{what}: " + ", ".join(f"{n} {_fmt(summary[n][key], digits)}" for n in c["order"])
    if not np.isfinite(summary[best][key]["mean"]):
        return text + "; no optimizer has a value in every seed (never reached, or diverged)"
    text += (f"; lowest mean {best}, " + (f"its range overlapping those of {', '.join(ties)}" if ties
                                            else "its range below every other"))
    if ties and behind:
        text += f", below those of {', '.join(behind)}"
    adam = c["pairs"]["Adam"]
    groups = {sym: [n for n, v in adam.items() if v == sym] for sym in "<>~"}
    return text + "; Adam's range " + ", ".join(f"{word} {', '.join(groups[sym])}" for sym, word in (
        ("<", "lies below those of"), (">", "lies above those of"), ("~", "overlaps those of")) if groups[sym])


def verdict(found: dict, key: str) -> str:
    """Each adaptive method against SGD on ``key``: lower, higher or not distinguishable."""
    words = {"<": "lower (range below SGD's)", ">": "higher (range above SGD's)",
             "~": "not distinguishable (ranges overlap)"}
    return ", ".join(f"{n} {words[found[key]['pairs'][n]['SGD']]}" for n in ADAPTIVE)


def main(argv=None) -> dict:
    args = common.parse_args("optimizers", __doc__.splitlines()[0], argv, _extra)
    hidden, epochs, seeds = ((64, 64), 2, 2) if args.quick else ((args.hidden,) * 2, 5, args.seeds)
    x, y, x_test, y_test, dataset = load(args, args.quick)
    net = fnn.MLP((x.shape[1], *hidden, 10), "relu", "identity", init="he_normal")
    iterations = epochs * (x.shape[0] // BATCH)
    evaluate = make_evaluate(net, x, y, x_test, y_test)
    if seeds > PILOT_SEED:
        raise SystemExit(f"--seeds must be at most {PILOT_SEED} (the pilot's seed is --seed + {PILOT_SEED}); "
                         f"got {seeds}")
    measured, pilot_seed = common.seeds(args, seeds), args.seed + PILOT_SEED
    starts = {s: (net.init(jax.random.key(s, impl="rbg")), batch_order(s, x.shape[0], epochs))
              for s in (pilot_seed, *measured)}  # seed -> (initial params, batch order)

    pilot, runs, rates = {}, {}, {}
    for name, (make_opt, grid) in GRIDS.items():
        train = make_train(net, make_opt)
        tried = [run_one(train, evaluate, x, y, starts[pilot_seed], rate) for rate in grid]
        losses = [np.inf if t["diverged"] else t["final_train_loss"] for t in tried]
        rates[name] = grid[int(np.argmin(losses))]
        pilot[name] = {"grid": list(grid), "final_train_loss": [None if not np.isfinite(v) else v for v in losses],
                       "chosen": rates[name], "at_edge": rates[name] in (grid[0], grid[-1])}
        runs[name] = [run_one(train, evaluate, x, y, starts[s], rates[name]) for s in measured]
        print(f"[{args.name}] {name:9s} pilot " + ", ".join(
            f"α={a:g}: {'diverged' if not np.isfinite(v) else f'{v:.4f}'}" for a, v in zip(grid, losses))
            + f" → α={rates[name]:g}{' (end of the grid)' if pilot[name]['at_edge'] else ''}")

    summary = {n: {"learning_rate": rates[n],
                   "final_train_loss": spread([r["final_train_loss"] for r in rs]),
                   "iterations_to_target": spread([r["iterations_to_target"] for r in rs]),
                   "held_out_accuracy": spread([r["held_out_accuracy"] for r in rs]),
                   "diverged_seeds": sum(r["diverged"] for r in rs)}
               for n, rs in runs.items()}

    plt = common.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    ax = axes[0, 0]
    t = np.arange(SMOOTH, iterations + 1)
    for i, (name, rs) in enumerate(runs.items()):
        curves = np.array([moving_average(r["costs"], SMOOTH) for r in rs])
        ax.fill_between(t, curves.min(0), curves.max(0), color=f"C{i}", alpha=0.2, lw=0)
        ax.plot(t, curves.mean(0), color=f"C{i}", lw=1.5, label=f"{name} (α={rates[name]:g})")
    ax.axhline(TARGET, color="k", ls=":", lw=1)
    ax.set(yscale="log", xlabel=f"iteration (mini-batch of {BATCH})",
           ylabel=f"{SMOOTH}-iteration mean of the mini-batch loss",
           title=f"(a) {dataset}, {'-'.join(map(str, net.sizes))} ReLU: mean over {seeds} seeds (band: min–max)")
    ax.legend(fontsize=9)
    names = list(runs)
    for ax, key, label in ((axes[0, 1], "final_train_loss", f"loss on all {x.shape[0]} training images"),
                           (axes[1, 0], "iterations_to_target", f"iterations until the mean loss ≤ {TARGET}")):
        for i, n in enumerate(names):
            values = [r[key] for r in runs[n] if r[key] is not None]
            ax.plot(np.full(len(values), i) + np.linspace(-0.15, 0.15, len(values)), values, "o", color=f"C{i}")
            ax.plot([i - 0.3, i + 0.3], [np.mean(values)] * 2 if values else [np.nan] * 2, color="k", lw=1)
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set(ylabel=label)
    axes[0, 1].set_title(f"(b) after {iterations} iterations, one dot per seed (line: mean)")
    axes[1, 0].set_title(f"(c) speed: one dot per seed (line: mean; a seed that never reaches {TARGET} has no dot)")
    ax = axes[1, 1]
    for i, (name, p) in enumerate(pilot.items()):
        ax.plot(p["grid"], [np.nan if v is None else v for v in p["final_train_loss"]], "o-", color=f"C{i}",
                label=name)
        ax.plot([p["chosen"]], [p["final_train_loss"][p["grid"].index(p["chosen"])]], "*", ms=14, color=f"C{i}")
    ax.set(xscale="log", yscale="log", xlabel="learning rate α", ylabel="final training loss",
           title=f"(d) pilot on seed {pilot_seed} (star: the rate kept; missing point: diverged)")
    ax.legend(fontsize=9)
    common.save_figure(args, fig)

    found = {key: compare(summary, key) for key in ("final_train_loss", "iterations_to_target")}
    results = {"dataset": dataset, "sizes": list(net.sizes), "batch_size": BATCH, "epochs": epochs,
               "iterations": iterations, "seeds": measured, "pilot_seed": pilot_seed,
               "target": TARGET, "smooth": SMOOTH, "pilot": pilot, "runs": runs, "summary": summary,
               "findings": found}
    common.save_json(args, results)
    common.conclude(
        args,
        f"{dataset}, {'-'.join(map(str, net.sizes))}, {iterations} iterations, seeds {measured[0]}–{measured[-1]}, "
        "mean [min–max]. "
        + describe(summary, found, "final_train_loss", ".4f", "Final training loss") + ". "
        + describe(summary, found, "iterations_to_target", ".0f", f"Iterations until the mean loss ≤ {TARGET}")
        + f". Against SGD, final loss: {verdict(found, 'final_train_loss')}; iterations to {TARGET}: "
        + f"{verdict(found, 'iterations_to_target')}. Held-out accuracy: "
        + ", ".join(f"{n} {_fmt({k: 100 * v for k, v in s['held_out_accuracy'].items()}, '.1f')}%"
                    for n, s in summary.items()) + ".",
    )
    return results


if __name__ == "__main__":
    main()
