"""Second-order optimizers on the deep autoencoder: K-FAC and Hessian-free against SGD and Adam.

Martens ("Deep learning via Hessian-free optimization", ICML 2010) and Martens & Grosse ("Optimizing
neural networks with Kronecker-factored approximate curvature", ICML 2015) train the deep
autoencoder of Hinton & Salakhutdinov ("Reducing the dimensionality of data with neural networks",
Science 2006) and report that their second-order methods reach a given training error in far fewer
iterations than SGD with momentum. This experiment puts fnn's :func:`fnn.second_order.kfac` and
:func:`fnn.second_order.hessian_free`, whose curvature is the hand-written δ-recursion of
:mod:`fnn.curvature`, beside momentum and Adam on the same wall-clock budget of this machine.

Setup: ``784-1000-500-250-30-250-500-1000-784`` with logistic hidden units and a linear 30-unit code
layer, logistic outputs, the cross-entropy reconstruction error on pixel intensities in ``[0, 1]``
(``binary_cross_entropy_with_logits``: a mean over the 784 pixels, so the sum of the papers is 784
times it), on the 8,000 training images of ``mnist-10k``, Glorot (Xavier) normal initialization,
the same initial parameters for every method. Mini-batches are drawn by a fresh permutation per
epoch (the base seed ``--seed``, default 0, which also draws the initialization), of ``BATCH`` images
for momentum, Adam and K-FAC and ``HF_BATCH`` for Hessian-free (whose gradient and curvature both come
from its batch; Martens used a larger gradient batch still).

- **Learning-rate pilot** (part of every run): each method trains ``PILOT_SECONDS`` at every value of
  its grid in :data:`METHODS` (for K-FAC its damping γ; for Hessian-free the initial
  Levenberg–Marquardt damping), and the value with the lowest training
  error at the end is kept; a value at an end of its grid is reported as such.
- **Measured**: each method with its chosen value trains for ``SECONDS`` of wall-clock time (compile
  time excluded and reported apart; each step is waited for, so the clock holds the step's real
  cost). About ``SNAPSHOTS`` parameter snapshots, evenly spaced in time, are evaluated afterwards
  (outside the clock) on a fixed 2,000-image subset of the training images: the cross-entropy and
  the squared reconstruction error summed over the pixels (the error the papers plot).
- **Compared**: the iterations and seconds each method took to reach momentum's error at the end of
  its budget (the papers' claim: far fewer iterations for the second-order methods), every method's
  training error at the largest iteration count all of them reached, and at the end of the budget.
  The conclusion states whether the papers' ordering holds here, and the cost per step, from those
  numbers.

Departures from the papers: 8,000 images from the 10,000-image test file instead of the 60,000
training images; no pre-training (Hinton & Salakhutdinov) and no sparse initialization (Martens);
minutes on two CPU cores instead of hours; K-FAC without the momentum, adaptive damping and growing
batches of Martens & Grosse (fixed damping, step length from the exact quadratic model capped at
``KFAC_CAP``, inverses refreshed every ``KFAC_REFRESH`` steps); Hessian-free with ``HF_CG`` CG iterations,
without backtracking over CG iterates and with gradient and curvature on the same batch.

Output: ``second_order.png`` (training error against iterations and against seconds) and
``second_order.json``.
"""

from __future__ import annotations

import time

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np

import fnn

SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
QUICK_SIZES = (784, 64, 32, 8, 32, 64, 784)
BATCH, HF_BATCH, EVAL_ROWS = 256, 1000, 2000
SECONDS, PILOT_SECONDS, SNAPSHOTS = 120.0, 8.0, 30
QUICK_SECONDS, QUICK_PILOT_SECONDS, QUICK_ROWS = 1.0, 0.5, 1000
KFAC_CAP, KFAC_REFRESH, HF_CG = 1.0, 10, 10


def _momentum(rate):
    return fnn.optim.momentum(rate, 0.9)


def _adam(rate):
    return fnn.optim.adam(rate)


def _kfac(net, loss):
    return lambda damping: fnn.second_order.kfac(net, loss, learning_rate=KFAC_CAP, damping=damping,
                                                  refresh=KFAC_REFRESH, rescale=True)


def _hf(net, loss):
    return lambda damping: fnn.second_order.hessian_free(net, loss, damping=damping, cg_iters=HF_CG)


# name: (grid, batch, what the grid sets); the factories need the network and come from methods()
METHODS = {
    "momentum": ((0.3, 1.0, 3.0), BATCH, "learning rate"),
    "Adam": ((3e-4, 1e-3, 3e-3), BATCH, "learning rate"),
    "K-FAC": ((1e-4, 1e-3, 1e-2), BATCH, "damping"),
    "Hessian-free": ((0.01, 0.1, 1.0), HF_BATCH, "initial damping"),
}


def methods(net, loss) -> dict:
    """``name -> (factory(value) -> optimizer, grid, batch, what)``."""
    factories = {"momentum": _momentum, "Adam": _adam, "K-FAC": _kfac(net, loss), "Hessian-free": _hf(net, loss)}
    return {name: (factories[name], *spec) for name, spec in METHODS.items()}


def train(net, loss, opt, params, x, batch: int, seconds: float, snapshots: int, seed: int = 0) -> dict:
    """Train ``seconds`` of wall-clock time (each step waited for; compilation before the clock) and keep
    about ``snapshots`` params, evenly spaced in time, with the step count and seconds at each."""
    step = jax.jit(lambda p, s, xb: fnn.train_step(net, opt, p, s, xb, xb, loss)[:2])
    state = opt.init(params)
    started = time.perf_counter()
    step = step.lower(params, state, x[:batch]).compile()
    compile_s = time.perf_counter() - started
    rng = np.random.default_rng(seed)
    order, at = rng.permutation(x.shape[0]), 0
    kept, steps, clock, every = [(0, 0.0, params)], 0, 0.0, seconds / snapshots
    while clock < seconds:
        if at + batch > x.shape[0]:
            order, at = rng.permutation(x.shape[0]), 0
        xb = x[order[at: at + batch]]
        at += batch
        t = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state, xb))
        clock += time.perf_counter() - t
        steps += 1
        if clock >= every * len(kept) or clock >= seconds:
            kept.append((steps, clock, params))
    return {"compile_s": compile_s, "steps": steps, "seconds": clock, "kept": kept}


def evaluate(net, loss, kept, x_eval) -> dict:
    """Training error of each snapshot on ``x_eval``: cross-entropy (per pixel) and squared error (per image)."""
    @jax.jit
    def errors(p):
        logits = net.apply(p, x_eval)
        return loss(logits, x_eval), jnp.mean(jnp.sum((jax.nn.sigmoid(logits) - x_eval) ** 2, axis=1))

    out = [errors(p) for _, _, p in kept]
    return {"iterations": [k[0] for k in kept], "clock": [k[1] for k in kept],
            "cross_entropy": [float(c) for c, _ in out], "squared_error": [float(s) for _, s in out]}


def at_iteration(curve: dict, iteration: int) -> float:
    """The cross-entropy at ``iteration``, interpolated linearly between snapshots."""
    return float(np.interp(iteration, curve["iterations"], curve["cross_entropy"]))


def first_reach(curve: dict, level: float) -> dict | None:
    """The first snapshot whose cross-entropy is at most ``level``: its iteration and seconds (upper
    bounds, as the snapshots are spaced in time), or ``None``."""
    i = next((i for i, c in enumerate(curve["cross_entropy"]) if c <= level), None)
    return None if i is None else {"iteration": curve["iterations"][i], "seconds": curve["clock"][i]}


def main(argv=None) -> dict:
    args = common.parse_args("second_order", __doc__.splitlines()[0], argv)
    raw = common.mnist_10k(args, QUICK_ROWS)[-1]
    x = jnp.asarray(raw.x_train[: QUICK_ROWS if args.quick else None], jnp.float32)  # pixels in [0, 1]
    x_eval = x[:EVAL_ROWS]
    sizes = QUICK_SIZES if args.quick else SIZES
    seconds, pilot_seconds = (QUICK_SECONDS, QUICK_PILOT_SECONDS) if args.quick else (SECONDS, PILOT_SECONDS)
    hidden = len(sizes) - 2
    activation = tuple("identity" if l == hidden // 2 else "sigmoid" for l in range(hidden))
    net = fnn.MLP(sizes, activation, "identity", init="xavier_normal")
    loss = fnn.losses.binary_cross_entropy_with_logits
    params = net.init(jax.random.PRNGKey(args.seed))
    initial = evaluate(net, loss, [(0, 0.0, params)], x_eval)["cross_entropy"][0]

    runs, pilots = {}, {}
    for name, (make, grid, batch, what) in methods(net, loss).items():
        if args.quick:  # a smoke test of the code path: the middle of each grid, no pilot
            grid = grid[len(grid) // 2: len(grid) // 2 + 1]
        finals = {}
        for value in grid if len(grid) > 1 else ():
            r = train(net, loss, make(value), params, x, batch, pilot_seconds, 1, args.seed)
            finals[value] = evaluate(net, loss, r["kept"][-1:], x_eval)["cross_entropy"][0]
        finite = {v: c for v, c in finals.items() if np.isfinite(c)}
        chosen = min(finite, key=finite.get) if finite else grid[0]
        pilots[name] = {"what": what, "grid": list(grid), "final": [finals.get(v) for v in grid], "chosen": chosen,
                        "at_edge": len(grid) > 1 and chosen in (grid[0], grid[-1])}
        r = train(net, loss, make(chosen), params, x, batch, seconds, SNAPSHOTS, args.seed)
        runs[name] = {"batch": batch, "compile_s": r["compile_s"], "steps": r["steps"], "seconds": r["seconds"],
                      "ms_per_step": 1e3 * r["seconds"] / r["steps"], **evaluate(net, loss, r["kept"], x_eval)}

    common_iteration = min(r["steps"] for r in runs.values())
    per_iteration = {n: at_iteration(r, common_iteration) for n, r in runs.items()}
    per_second = {n: r["cross_entropy"][-1] for n, r in runs.items()}
    target = runs["momentum"]["cross_entropy"][-1]  # the papers' baseline: momentum's error at the end
    reach = {n: first_reach(r, target) for n, r in runs.items()}
    figure(args, runs)
    results = {"sizes": sizes, "activation": activation, "rows": int(x.shape[0]), "eval_rows": int(x_eval.shape[0]),
               "budget_s": seconds, "pilot_seconds": pilot_seconds, "initial_cross_entropy": initial,
               "pilots": pilots, "runs": runs, "common_iteration": common_iteration,
               "per_iteration": per_iteration, "per_second": per_second, "target": target, "reach": reach,
               "kfac_cap": KFAC_CAP, "kfac_refresh": KFAC_REFRESH, "hf_cg_iters": HF_CG}
    common.save_json(args, results)
    common.conclude(args, conclusion(results))
    return results


def conclusion(r: dict) -> str:
    runs, it = r["runs"], r["common_iteration"]
    lines = []
    for name, run in runs.items():
        p = r["pilots"][name]
        edge = " (at an end of its grid)" if p["at_edge"] else ""
        lines.append(f"{name}: {p['what']} {p['chosen']:g}{edge}, batch {run['batch']}, {run['steps']} steps in "
                     f"{run['seconds']:.0f} s ({run['ms_per_step']:.0f} ms/step, compile {run['compile_s']:.1f} s); "
                     f"training cross-entropy {r['initial_cross_entropy']:.4f} -> {run['cross_entropy'][-1]:.4f} per "
                     f"pixel, squared error {run['squared_error'][-1]:.2f} per image")
    by_iter = sorted(r["per_iteration"], key=r["per_iteration"].get)
    by_time = sorted(r["per_second"], key=r["per_second"].get)
    lines.append(f"per iteration (at iteration {it}, the most all reached): "
                 + " < ".join(f"{n} {r['per_iteration'][n]:.4f}" for n in by_iter))
    lines.append(f"per second (at {r['budget_s']:.0f} s): "
                 + " < ".join(f"{n} {r['per_second'][n]:.4f}" for n in by_time))
    reach = r["reach"]
    lines.append(f"to reach momentum's final error {r['target']:.4f} (first snapshot at or below it): " + "; ".join(
        f"{n} at iteration {reach[n]['iteration']} ({reach[n]['seconds']:.0f} s)" if reach[n] else f"{n} never"
        for n in runs))
    second = [n for n in ("K-FAC", "Hessian-free") if n in runs]
    ahead = [n for n in second if reach[n] and reach[n]["iteration"] < reach["momentum"]["iteration"]]
    verdict = ("holds" if len(ahead) == len(second) else "holds for " + ", ".join(ahead) if ahead else "does not hold")
    cost = ", ".join(f"{n} {runs[n]['ms_per_step'] / runs['momentum']['ms_per_step']:.1f}x" for n in second)
    lines.append(f"the papers' ordering (second-order reaching momentum's error in fewer iterations) {verdict} here; "
                 f"a step costs {cost} a momentum step; per second, "
                 + ("a second-order method is best" if by_time[0] in second else f"{by_time[0]} is best"))
    return "\n".join(lines)


def figure(args, runs: dict) -> None:
    plt = common.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        a.plot(np.maximum(run["iterations"], 1), run["cross_entropy"], marker=".", label=name)
        b.plot(run["clock"], run["cross_entropy"], marker=".", label=name)
    a.set(xscale="log", xlabel="iteration", ylabel="training cross-entropy (per pixel)", title="(a) per iteration")
    b.set(xlabel="seconds of training (compile excluded)", ylabel="training cross-entropy (per pixel)",
          title="(b) per second")
    for ax in (a, b):
        ax.legend()
    common.save_figure(args, fig)


if __name__ == "__main__":
    main()
