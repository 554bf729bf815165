"""Batch, stochastic and mini-batch gradient descent: progress per epoch, per second, and the noise.

One model, a 64-64-10 tanh network with softmax cross-entropy on scikit-learn's 8×8 digits
(``N = 1,437`` training images, z-scored), trained by plain SGD ``θ ← θ − η ∇C_B`` with the same
``η = 0.1`` and the same initial parameters for

- ``B = N``: batch gradient descent, one step per epoch on the exact gradient;
- ``B = 1``: stochastic gradient descent, ``N`` steps per epoch on one sample each;
- ``B = 32`` and ``B = 128``: mini-batches,

each reshuffled every epoch by :func:`fnn.fit` (the leftover ``N mod B`` samples form one smaller
last batch). The full training-set cost is measured after every epoch (``on_epoch_end``).

Timing: :func:`fnn.fit` compiles the epoch function before the first epoch, and its history's
per-epoch ``seconds`` run from the dispatch of the compiled epoch until its statistics are on the
host, so they exclude compilation and the after-epoch evaluations. The first epoch still carries a
one-time warm-up of the compiled executable (reported as ``first_epoch_seconds``), so the time axis
is ``epochs × median epoch seconds``, the steady-state cost of training. The compile-and-overhead
time, ``fit``'s wall time minus the sum of the epoch seconds, is reported separately.

Noise: the per-step batch costs of one epoch (``EpochStats.cost`` of :func:`fnn.train.make_epoch`)
for ``B = 1`` and ``B = 128`` from the same start, and the mean squared distance of a mini-batch
gradient from the full gradient against the sampling-without-replacement formula

    E‖∇C_B − ∇C‖² = (σ²/B) · (N − B)/(N − 1),   σ² = (1/N) Σ_i ‖∇C_i − ∇C‖²,

with the per-sample gradients ``∇C_i`` from :func:`fnn.backprop` on single samples.

Output: ``batch_sizes.png`` (four panels) and ``batch_sizes.json``.
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


def main(argv=None) -> dict:
    """Run the experiment (``argv``: the command line); returns the results written to the JSON."""
    args = common.parse_args("batch_sizes", __doc__.splitlines()[0], argv)
    data = fnn.data.load_dataset("digits")
    norm = fnn.data.fit_zscore(data.x_train)
    x = jnp.asarray(fnn.data.zscore(norm, data.x_train), jnp.float32)  # (1437, 64)
    x_test = jnp.asarray(fnn.data.zscore(norm, data.x_test), jnp.float32)  # (360, 64)
    y, y_test = jnp.asarray(data.y_train), jnp.asarray(data.y_test)
    epochs, draws = (3, 32) if args.quick else (40, 400)
    noise_batches = (1, 16) if args.quick else NOISE_BATCHES
    if args.quick:  # a multiple of every batch size: no smaller last batch to compile
        x, y = x[:256], y[:256]
    n = x.shape[0]
    net, loss = fnn.MLP(SIZES, "tanh", "identity"), fnn.losses.softmax_cross_entropy
    params = net.init(jax.random.PRNGKey(0), jnp.float32)
    cost_of = jax.jit(lambda p: fnn.objective(net, p, x, y, loss))
    initial_cost = float(cost_of(params))

    runs = {}
    for b in (n, 128, 32, 1):
        name = "B = N" if b == n else f"B = {b}"
        full_costs = []
        t0 = time.perf_counter()
        result = fnn.fit(net, params, fnn.optim.sgd(ETA), (x, y), loss=loss, epochs=epochs, batch_size=b,
                         key=jax.random.PRNGKey(1), held_out=(x_test, y_test), quiet=True,
                         on_epoch_end=lambda r: full_costs.append(float(cost_of(r.params))))
        wall = time.perf_counter() - t0
        seconds = np.asarray([r["seconds"] for r in result.history])
        epoch_seconds = float(np.median(seconds))
        runs[name] = {
            "batch_size": b,
            "steps_per_epoch": -(-n // b),
            "full_train_cost": [initial_cost] + full_costs,  # before training, then after each epoch
            "epoch_seconds": seconds,
            "median_epoch_seconds": epoch_seconds,
            "first_epoch_seconds": float(seconds[0]),
            "train_seconds": epoch_seconds * np.arange(epochs + 1),
            "held_out_accuracy": [r["held_out_accuracy"] for r in result.history],
            "samples_per_s": n / epoch_seconds,
            "compile_and_overhead_seconds": wall - float(seconds.sum()),
            "stopped": result.stopped,
        }

    # One epoch's per-step batch costs from the same start, B = 1 against B = 128.
    steps = {}
    for b in (1, 128):
        epoch = jax.jit(fnn.train.make_epoch(net, loss, fnn.optim.sgd(ETA), num_samples=n, batch_size=b))
        opt = fnn.optim.sgd(ETA)
        *_, stats = epoch(params, opt.init(params), None, jax.random.PRNGKey(5), x, y)  # no batch-norm state
        steps[f"B = {b}"] = np.asarray(stats.cost, np.float64)
    noise = gradient_noise(net, params, x, y, loss, [b for b in noise_batches if b < n], draws, seed=7)

    plt = common.pyplot()
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    for i, (name, run) in enumerate(runs.items()):
        label = f"{name} ({run['steps_per_epoch']} step{'s' if run['steps_per_epoch'] > 1 else ''}/epoch)"
        ax[0, 0].semilogy(range(epochs + 1), run["full_train_cost"], "o-", ms=3, color=f"C{i}", label=label)
        ax[0, 1].loglog(run["train_seconds"][1:], run["full_train_cost"][1:], "o-", ms=3, color=f"C{i}",
                        label=f"{name}: {run['samples_per_s']:,.0f} samples/s")
    ax[0, 0].set(xlabel="epoch", ylabel="training-set cost C(θ)", title=f"(a) per epoch, SGD η = {ETA}, N = {n}")
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].set(xlabel="training time (s): epochs × median epoch time", ylabel="training-set cost C(θ)",
                 title="(b) per second of training")
    ax[0, 1].legend(fontsize=8)
    a = ax[1, 0]
    for (name, c), color in zip(steps.items(), ("C3", "C1")):
        t = (np.arange(c.size) + 1) / c.size
        if c.size > 50:
            a.plot(t, c, "-", lw=0.4, alpha=0.5, color=color, label=f"{name}: cost of each batch ({c.size} steps)")
            w = c.size // 20
            a.plot(t[w - 1:], np.convolve(c, np.ones(w) / w, "valid"), "-", lw=2, color="darkred",
                   label=f"{name}: running mean of {w} steps")
        else:
            a.plot(t, c, "o-", ms=4, color=color, label=f"{name}: cost of each batch ({c.size} steps)")
    a.axhline(initial_cost, color="k", lw=0.7, ls=":", label="C(θ₀) on the training set")
    a.set(xlabel="fraction of the first epoch", ylabel="batch cost C_B(θ_t)", yscale="log",
          title="(c) one epoch from the same θ₀: the noise of the stochastic path")
    a.legend(fontsize=8, loc="lower left")
    a = ax[1, 1]
    a.loglog(noise["batch_sizes"], noise["measured"], "o", ms=6, label=f"measured ({draws} batches each)")
    a.loglog(noise["batch_sizes"], noise["predicted"], "-", color="0.4", label="(σ²/B)(N−B)/(N−1)")
    a.axhline(noise["full_grad_norm2"], color="C2", ls=":", label="‖∇C‖² (the signal)")
    a.set(xlabel="batch size B", ylabel="E‖∇C_B − ∇C‖²", title="(d) gradient noise at θ₀ falls as 1/B")
    a.legend(fontsize=8)
    common.save_figure(args, fig)

    results = {"n": n, "eta": ETA, "epochs": epochs, "runs": runs, "step_costs": steps, "gradient_noise": noise}
    common.save_json(args, results)

    final = {name: run["full_train_cost"][-1] for name, run in runs.items()}
    by_epoch = sorted(final, key=final.get)
    target = final["B = N"]  # time for each run to first reach the full-batch run's final cost
    reach = {}
    for name, run in runs.items():
        hit = np.flatnonzero(np.asarray(run["full_train_cost"][1:]) <= target)
        reach[name] = float(run["train_seconds"][1:][hit[0]]) if hit.size else None
    fastest = min((k for k in reach if reach[k] is not None), key=reach.get)
    ratio = np.asarray(noise["measured"]) / np.asarray(noise["predicted"])
    spread = {name: float(np.std(c) / np.mean(c)) for name, c in steps.items()}
    common.conclude(args, "\n".join([
        f"after {epochs} epochs at η = {ETA} the training-set cost is "
        + ", ".join(f"{k}: {final[k]:.4f}" for k in by_epoch)
        + f" (smaller batches make more progress per epoch: {len(runs[by_epoch[0]]['held_out_accuracy'])} "
        f"epochs give {100 * runs[by_epoch[0]]['held_out_accuracy'][-1]:.1f} % held-out accuracy with "
        f"{by_epoch[0]} against {100 * runs['B = N']['held_out_accuracy'][-1]:.1f} % with B = N).",
        "throughput (median epoch, compilation excluded): "
        + ", ".join(f"{k}: {r['samples_per_s']:,.0f} samples/s" for k, r in runs.items())
        + "; to reach the full-batch run's final cost "
        + ", ".join(f"{k} needed {v:.3f} s" if v is not None else f"{k} never got there" for k, v in reach.items())
        + f", so {fastest} was the fastest in wall-clock time. Not counted: compilation and overhead outside "
        "the epochs ("
        + ", ".join(f"{k} {r['compile_and_overhead_seconds']:.2f} s" for k, r in runs.items())
        + ") and the first epoch's warm-up ("
        + ", ".join(f"{k} {1000 * r['first_epoch_seconds']:.1f} ms" for k, r in runs.items())
        + " against a median epoch of "
        + ", ".join(f"{1000 * r['median_epoch_seconds']:.1f} ms" for r in runs.values()) + ").",
        f"noise: within one epoch the batch costs vary with coefficient of variation {spread['B = 1']:.2f} for "
        f"B = 1 against {spread['B = 128']:.2f} for B = 128; the measured E‖∇C_B − ∇C‖² is "
        f"{ratio.min():.2f}–{ratio.max():.2f}× the formula (σ²/B)(N−B)/(N−1) over B = "
        f"{', '.join(map(str, noise['batch_sizes']))}.",
    ]))
    return results


if __name__ == "__main__":
    main()
