"""Initialization and the back-propagated gradients per layer (δ^l, ∂C/∂W^l), and a sigmoid net in training.

After Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural networks",
AISTATS 2010, on real MNIST digits (``mnist-10k``, z-scored; scikit-learn's digits when no MNIST
directory is found). Two measurements:

1. **At initialization** (their Figs. 6–8 and eq. 14): 8 hidden layers of 256 units, softmax
   cross-entropy, one batch of 1,000 images, seeds ``0 … SEEDS − 1``. Per layer ``l``, from one
   :func:`fnn.backprop_trace`: the spread (standard deviation over the batch and the units) of the
   activations ``a^l``, of the back-propagated gradients ``δ^l = ∂C_x/∂z^l`` (BP2:
   ``δ^l = (δ^{l+1} W^{l+1}) ⊙ φ'(z^l)``, per sample) and of the entries of the weight gradient
   ``∂C/∂W^l = (1/N) (δ^l)ᵀ a^{l−1}`` (BP4), and the fraction of saturated units. Summaries are
   ratios between the first and the last hidden layer: ``δ^1/δ^D`` and ``∂C/∂W^1 / ∂C/∂W^D``
   (below 1: smaller next to the input) and ``a^D/a^1`` (below 1: smaller at the top). Eq. 14
   predicts that with the classic init the δ shrink going down while the weight gradients, the
   product of δ^l and a^{l−1}, keep their size for tanh, whose activations shrink going up.
2. **In training** (their Fig. 2, where the top hidden layer of a sigmoid network saturates at 0
   early in training): 4 hidden sigmoid layers of 256, plain SGD (α = 0.1, mini-batches of 10
   drawn at random), classic against Glorot's init, seeds ``0 … TRAIN_SEEDS − 1``; every
   ``PROBE_EVERY`` iterations the mean and spread of every hidden layer's activations on 500
   training images, and the mean mini-batch loss since the previous probe.

Configurations at initialization: sigmoid and tanh each with the classic ``U(±1/√n)`` (weights
and biases) and with Glorot's normalized ``U(±√(6/(n+m)))`` (biases 0); sigmoid with the naive
unit Gaussian ``N(0, 1)`` for weights and biases (early textbook code); ReLU with He's variance
``2/n`` in its uniform form ``U(±√(6/n))``.
The words of the conclusion come from the measured ratios by the bands of :func:`band`, and are
used only where every seed falls in the same band.
"""

from __future__ import annotations

import math

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np

import fnn

CONFIGS = (  # (label, hidden activation, initializer name; "unit_normal" is built here)
    ("sigmoid classic U(±1/√n)", "sigmoid", "classic"),
    ("sigmoid Glorot U(±√(6/(n+m)))", "sigmoid", "xavier_uniform"),
    ("sigmoid naive N(0,1)", "sigmoid", "unit_normal"),
    ("tanh classic U(±1/√n)", "tanh", "classic"),
    ("tanh Glorot U(±√(6/(n+m)))", "tanh", "xavier_uniform"),
    ("relu He U(±√(6/n))", "relu", "he_uniform"),
)
TRAINED = ("sigmoid classic U(±1/√n)", "sigmoid Glorot U(±√(6/(n+m)))")
LOSS = fnn.losses.softmax_cross_entropy
SEEDS = 3
TRAIN_SEEDS = 2
LEARNING_RATE = 0.1
TRAIN_BATCH = 10
PROBE = 500
PROBE_EVERY = 50
SATURATED = 0.05
"""A sigmoid unit counts as saturated when ``a < 0.05`` or ``a > 0.95``; a tanh unit when ``|a| > 0.95``."""
LOW_TOP = 0.1
"""A sigmoid layer whose mean activation is below this sits near the flat end 0 (``σ' < 0.09``)."""


def unit_normal_params(sizes: tuple, seed: int) -> list:
    """``W^l, b^l ~ N(0, 1)`` entrywise, float32, in the layout of ``fnn.MLP.init`` (drawn by NumPy)."""
    rng = np.random.default_rng(seed)
    return [{"W": jnp.asarray(rng.standard_normal((fan_out, fan_in), np.float32)),
             "b": jnp.asarray(rng.standard_normal(fan_out, np.float32))}
            for fan_in, fan_out in zip(sizes[:-1], sizes[1:])]


def initial_params(sizes: tuple, init: str, seed: int) -> list:
    """The parameters of ``init`` for layer sizes ``sizes``, drawn with the key (or NumPy seed) ``seed``.

    The key is of JAX's ``"rbg"`` implementation (XLA's RngBitGenerator): its random ops compile
    several times faster than the default threefry's, whose compilation would otherwise be the
    larger part of the quick mode's run time.
    """
    if init == "unit_normal":
        return unit_normal_params(sizes, seed)
    return fnn.MLP(sizes, "identity", "identity", init=init).init(jax.random.key(seed, impl="rbg"))


def saturation(activation: str, a: jax.Array) -> jax.Array:
    """Fraction of the entries of ``a`` in the flat ends of ``φ`` (see :data:`SATURATED`); for ReLU the zeros."""
    if activation == "sigmoid":
        return jnp.mean((a < SATURATED) | (a > 1 - SATURATED))
    if activation == "tanh":
        return jnp.mean(jnp.abs(a) > 1 - SATURATED)
    return jnp.mean(a == 0)


def make_measure(net: fnn.MLP):
    """A jitted ``(params, x, y) -> dict`` of per-layer spreads at these params (one backprop)."""
    activation = net.activation[0]

    def measure(params, x, y):
        _, grads, _, trace = fnn.backprop_trace(net, params, x, y, LOSS)
        hidden = trace.acts[1:-1]  # a^1 … a^D
        return {"act_std": jnp.stack([a.std() for a in hidden]),  # (D,)
                "delta_std": jnp.stack([d.std() for d in trace.deltas]),  # (L,) δ^1 … δ^L
                "grad_W_std": jnp.stack([g["W"].std() for g in grads]),  # (L,)
                "saturated": jnp.stack([saturation(activation, a) for a in hidden])}  # (D,)

    return jax.jit(measure)


def make_training(net: fnn.MLP, x: jax.Array, y: jax.Array, probe: jax.Array):
    """A jitted ``(params, batches (P, PROBE_EVERY, TRAIN_BATCH)) -> (mean (P, D), std (P, D), loss (P,))``.

    ``P`` rounds of ``PROBE_EVERY`` SGD steps on the mini-batches ``batches`` (sample indices); after
    each round the mean and standard deviation of every hidden layer's activations on ``probe`` and
    the mean mini-batch loss of the round.
    """
    opt = fnn.optim.sgd(LEARNING_RATE)

    def run(params, batches):
        def round_(carry, idx):
            def step(c, i):
                r = fnn.train_step(net, opt, c[0], c[1], x[i], y[i], LOSS)
                return (r.params, r.opt_state), r.cost

            carry, costs = jax.lax.scan(step, carry, idx)
            _, acts = net.forward(carry[0], probe)
            hidden = acts[1:-1]
            return carry, (jnp.stack([a.mean() for a in hidden]), jnp.stack([a.std() for a in hidden]),
                           costs.mean())

        return jax.lax.scan(round_, (params, opt.init(params)), batches)[1]

    return jax.jit(run)


def load(args):
    """``(x (n, d) float32 z-scored, y (n,) int32, name)``: the training split of mnist-10k, or digits."""
    try:
        data = fnn.data.load_dataset("mnist-10k", args.data_dir)
    except fnn.data.DataError:
        data = fnn.data.load_dataset("digits")
    normalizer = fnn.data.fit_zscore(data.x_train)
    x = fnn.data.zscore(normalizer, data.x_train).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(data.y_train), data.name


def spread(values) -> dict:
    """``{"mean", "min", "max"}`` of ``values`` (over seeds, or over seeds and layers)."""
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def band(ratio: float) -> str:
    """The words for a first-over-last (or last-over-first) ratio of spreads."""
    if ratio < 0.1:
        return "shrinks more than 10-fold"
    if ratio < 0.5:
        return "shrinks 2- to 10-fold"
    if ratio <= 2:
        return "stays within a factor 2"
    return "grows more than 2-fold"


def agreed(ratios: list) -> str:
    """:func:`band` of the ratios when every seed falls in the same band, else ``"varies over seeds"``."""
    words = {band(r) for r in ratios}
    return words.pop() if len(words) == 1 else "varies over seeds"


def at_init(x, y, depth: int, width: int, seeds: int, first: int = 0) -> dict:
    """Per configuration: the per-layer spreads (mean over the seeds ``first … first + seeds − 1``), the
    ratios per seed as ``spread`` and their :func:`agreed` bands, for ``depth`` hidden layers of ``width``
    on ``(x, y)``."""
    sizes = (x.shape[1],) + (width,) * depth + (10,)
    measures, out = {}, {}
    for label, activation, init in CONFIGS:
        if activation not in measures:
            measures[activation] = make_measure(fnn.MLP(sizes, activation, "identity"))
        per_seed = [jax.device_get(measures[activation](initial_params(sizes, init, s), x, y))
                    for s in range(first, first + seeds)]
        per_layer = {k: np.mean([m[k] for m in per_seed], axis=0) for k in per_seed[0]}
        ratios = {"delta": [m["delta_std"][0] / m["delta_std"][depth - 1] for m in per_seed],
                  "grad_W": [m["grad_W_std"][0] / m["grad_W_std"][depth - 1] for m in per_seed],
                  "act": [m["act_std"][-1] / m["act_std"][0] for m in per_seed]}
        out[label] = {"activation": activation, "init": init, **per_layer,
                      "ratios": {k: spread(v) for k, v in ratios.items()},
                      "bands": {k: agreed(v) for k, v in ratios.items()}}
    return out


def in_training(x, y, depth: int, width: int, iterations: int, seeds: int, first: int = 0) -> dict:
    """The :data:`TRAINED` sigmoid nets trained by SGD on ``(x, y)`` from seeds ``first … first + seeds − 1``
    (initialization and batch draws): per run the probe's per-layer
    mean and std of the activations and the loss, ``(seeds, rounds[, depth])``, and their summaries."""
    net = fnn.MLP((x.shape[1],) + (width,) * depth + (10,), "sigmoid", "identity")
    train = make_training(net, x, y, x[:PROBE])
    rounds = iterations // PROBE_EVERY
    lanes = [(label, init, s) for label, _, init in CONFIGS if label in TRAINED for s in range(first, first + seeds)]
    per_run = [train(initial_params(net.sizes, init, s),
                     jnp.asarray(np.random.RandomState(s).randint(0, x.shape[0], (rounds, PROBE_EVERY, TRAIN_BATCH))))
               for _, init, s in lanes]
    mean, std, loss = (np.stack([np.asarray(r[k]) for r in per_run]) for k in range(3))  # (runs, rounds[, D])
    out = {}
    for label in TRAINED:
        rows = [i for i, lane in enumerate(lanes) if lane[0] == label]
        top = mean[rows, :, -1]  # (seeds, rounds)
        out[label] = {"mean": mean[rows], "std": std[rows], "loss": loss[rows],
                      "top_first": spread(top[:, 0]), "top_min": spread(top.min(1)), "top_last": spread(top[:, -1]),
                      "lower_last": spread(mean[rows][:, -1, :-1]), "loss_last": spread(loss[rows][:, -1])}
    return {"sizes": list(net.sizes), "iterations": rounds * PROBE_EVERY, "seeds": seeds, "first_seed": first,
            "probe": PROBE,
            "probe_every": PROBE_EVERY, "learning_rate": LEARNING_RATE, "batch": TRAIN_BATCH, "runs": out}


def _r(s: dict) -> str:
    return f"{s['mean']:.2g} [{s['min']:.2g}–{s['max']:.2g}]"


def _a(s: dict) -> str:
    return f"{s['mean']:.2f} [{s['min']:.2f}–{s['max']:.2f}]"


def _seeds(n: int, first: int = 0) -> str:
    return f"seed {first}" if n == 1 else f"seeds {first}–{first + n - 1}"


def _list(names: list) -> str:
    return "none" if not names else names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


SHRINKS = ("shrinks more than 10-fold", "shrinks 2- to 10-fold")


def findings(init: dict, train: dict) -> dict:
    """What the ratios support, by the bands of :func:`band` (only where every seed agrees)."""
    bands = {label: r["bands"] for label, r in init.items()}
    glorot = {activation: init[f"{activation} Glorot U(±√(6/(n+m)))"]["ratios"]["delta"]["mean"]
              / init[f"{activation} classic U(±1/√n)"]["ratios"]["delta"]["mean"] for activation in ("sigmoid", "tanh")}
    chance = math.log(10)
    return {
        "delta_shrinks": [n for n, b in bands.items() if b["delta"] in SHRINKS],
        "grad_W_shrinks": [n for n, b in bands.items() if b["grad_W"] in SHRINKS],
        "delta_shrinks_grad_W_not": [n for n, b in bands.items()
                                     if b["delta"] in SHRINKS and b["grad_W"] == "stays within a factor 2"],
        "delta_within_2": [n for n, b in bands.items() if b["delta"] == "stays within a factor 2"],
        "glorot_over_classic_delta": glorot,
        "low_top": LOW_TOP,
        "top_near_zero": [n for n, r in train["runs"].items() if r["top_last"]["max"] < LOW_TOP],
        "at_chance": [n for n, r in train["runs"].items() if r["loss_last"]["min"] > 0.95 * chance],
        "below_chance": [n for n, r in train["runs"].items() if r["loss_last"]["max"] < 0.95 * chance],
    }


def conclusion(dataset: str, init: dict, train: dict, found: dict, depth: int, width: int, batch: int,
               seeds: int, first: int = 0) -> str:
    parts = []
    for label, r in init.items():
        what = "zeros" if r["activation"] == "relu" else "saturated"
        parts.append(f"{label}: δ¹/δᴰ {_r(r['ratios']['delta'])} ({r['bands']['delta']}), ∂C/∂W¹ / ∂C/∂Wᴰ "
                     f"{_r(r['ratios']['grad_W'])} ({r['bands']['grad_W']}), aᴰ/a¹ {_r(r['ratios']['act'])}, "
                     f"{what} in layer {depth} {100 * r['saturated'][-1]:.0f}%")
    g = found["glorot_over_classic_delta"]
    text = (f"At initialization ({dataset}, {depth} hidden layers of {width}, batch {batch}, {_seeds(seeds, first)}; "
            f"first over last hidden layer, mean [min–max]): " + "; ".join(parts) + ". "
            f"The back-propagated δ shrink going down in every seed for {_list(found['delta_shrinks'])}; the "
            f"weight gradients ∂C/∂W for {_list(found['grad_W_shrinks'])}; δ shrink while ∂C/∂W stay within a "
            f"factor 2 (eq. 14) for {_list(found['delta_shrinks_grad_W_not'])}; δ stay within a factor 2 for "
            f"{_list(found['delta_within_2'])}. Glorot's init instead of the classic one makes δ¹/δᴰ "
            f"{g['tanh']:.0f} times larger for tanh and {g['sigmoid']:.0f} times for sigmoid.")
    runs = []
    for label, r in train["runs"].items():
        runs.append(f"{label}: top hidden layer's mean activation {_a(r['top_first'])} after {train['probe_every']} "
                    f"iterations, lowest {_a(r['top_min'])}, at the end {_a(r['top_last'])}; the lower layers' "
                    f"means at the end {r['lower_last']['min']:.2f}–{r['lower_last']['max']:.2f}; loss over the "
                    f"last {train['probe_every']} iterations {_a(r['loss_last'])}")
    return (text + f" In training (sigmoid {'-'.join(map(str, train['sizes']))}, SGD α = {train['learning_rate']}, "
            f"batch {train['batch']}, {train['iterations']} iterations, "
            f"{_seeds(train['seeds'], train['first_seed'])}): "
            + "; ".join(runs) + f". Top hidden layer below {LOW_TOP} at the end (near the flat end 0) in every seed: "
            f"{_list(found['top_near_zero'])}; loss still at the chance level ln 10 = 2.30 (within 5 %) in every "
            f"seed: {_list(found['at_chance'])}; below it in every seed: {_list(found['below_chance'])}.")


def main(argv=None) -> dict:
    args = common.parse_args("initialization", __doc__.splitlines()[0], argv)
    depth, width, batch, seeds = (5, 64, 200, 2) if args.quick else (8, 256, 1000, SEEDS)
    train_depth, train_width, iterations, train_seeds = (3, 64, 300, 1) if args.quick else (4, 256, 2000, TRAIN_SEEDS)
    x, y, dataset = load(args)
    init = at_init(x[:batch], y[:batch], depth, width, seeds, args.seed)
    train = in_training(x, y, train_depth, train_width, iterations, train_seeds, args.seed)

    plt = common.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(19, 10))
    hidden, layers = np.arange(1, depth + 1), np.arange(1, depth + 2)
    for ax, key, xs, ylabel, title in (
            (axes[0, 0], "act_std", hidden, "std of aˡ", "(a) activations (Glorot & Bengio Fig. 6)"),
            (axes[0, 1], "delta_std", layers, "std of δˡ = ∂C_x/∂zˡ", "(b) back-propagated gradients (Fig. 7)"),
            (axes[0, 2], "grad_W_std", layers, "std of the entries of ∂C/∂Wˡ", "(c) weight gradients (Fig. 8)"),
            (axes[1, 0], "saturated", hidden, "fraction saturated (ReLU: zeros)", "(d) saturated units")):
        for label, r in init.items():
            ax.plot(xs, r[key], "o-", label=label)
        ax.set(yscale="linear" if key == "saturated" else "log", xlabel="layer l (1 = next to the input)",
               ylabel=ylabel, title=f"{title} at initialization, mean of {seeds} seeds")
        ax.set_xticks(xs)
    axes[0, 0].legend(fontsize=8)
    rounds = np.arange(1, train["iterations"] // PROBE_EVERY + 1) * PROBE_EVERY
    ax = axes[1, 1]
    for i, (label, r) in enumerate(train["runs"].items()):
        for l in range(train_depth):
            top = l == train_depth - 1
            ax.plot(rounds, r["mean"][0, :, l], color=f"C{i}", lw=2.5 if top else 0.8, alpha=1 if top else 0.5,
                    label=f"{label}, top layer" if top else (f"{label}, lower layers" if l == 0 else None))
        ax.fill_between(rounds, r["mean"][0, :, -1] - r["std"][0, :, -1], r["mean"][0, :, -1] + r["std"][0, :, -1],
                        color=f"C{i}", alpha=0.15, lw=0)
    ax.set(ylim=(0, 1), xlabel="SGD iteration", ylabel="mean activation on 500 images (band: ± std, top layer)",
           title=f"(e) sigmoid {'-'.join(map(str, train['sizes']))} in training, seed {args.seed} "
                 "(Glorot & Bengio Fig. 2)")
    ax.legend(fontsize=8)
    ax = axes[1, 2]
    for i, (label, r) in enumerate(train["runs"].items()):
        for s in range(train["seeds"]):
            ax.plot(rounds, r["loss"][s], color=f"C{i}", lw=1, label=label if s == 0 else None)
    ax.axhline(math.log(10), color="k", ls=":", lw=1, label="chance level ln 10")
    ax.set(xlabel="SGD iteration", ylabel=f"mean mini-batch loss over {PROBE_EVERY} iterations",
           title=f"(f) training loss, {train['seeds']} seeds")
    ax.legend(fontsize=8)
    common.save_figure(args, fig)

    found = findings(init, train)
    results = {"dataset": dataset, "batch": batch, "depth": depth, "width": width, "seeds": seeds,
               "configs": init, "training": train, "findings": found}
    common.save_json(args, results)
    common.conclude(args, conclusion(dataset, init, train, found, depth, width, batch, seeds, args.seed))
    return results


if __name__ == "__main__":
    main()
