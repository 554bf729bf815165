"""Second-order optimizers on the deep autoencoder: K-FAC and Hessian-free against SGD and Adam.

Martens ("Deep learning via Hessian-free optimization", ICML 2010) and Martens & Grosse ("Optimizing
neural networks with Kronecker-factored approximate curvature", ICML 2015) train the deep
autoencoder of Hinton & Salakhutdinov ("Reducing the dimensionality of data with neural networks",
Science 2006) and report that their second-order methods reach a given training error in far fewer
iterations than SGD with momentum. This experiment puts fnn's :func:`fnn.second_order.kfac_adaptive`
(with the paper's momentum and adaptive damping) and :func:`fnn.second_order.hessian_free` (with
Martens' CG settings), whose curvature is the hand-written δ-recursion of :mod:`fnn.curvature`,
beside momentum and Adam, matched both by iterations and by wall-clock time.

Setup: ``784-1000-500-250-30-250-500-1000-784`` with logistic hidden units and a linear 30-unit code
layer, logistic outputs, the cross-entropy reconstruction error on pixel intensities in ``[0, 1]``
(``binary_cross_entropy_with_logits``: a mean over the 784 pixels, so the sum of the papers is 784
times it), on the 8,000 training images of ``mnist-10k``, Martens' sparse initialization
(``init="sparse"``: 15 non-zero N(0, 1) incoming weights per unit) drawn from the base seed
``--seed``, the same initial parameters for every method. Mini-batches are drawn by a fresh
permutation per epoch (from the same seed), of ``BATCH`` images for momentum, Adam and K-FAC and
``HF_BATCH`` for Hessian-free, whose Gauss-Newton products use the first ``HF_CURVATURE`` of them.

- **Pilot** (part of every run): each method trains ``PILOT_SECONDS`` at every value of its grid in
  :data:`METHODS` (the learning rate; for K-FAC and Hessian-free the initial damping λ), and is scored
  by the mean cross-entropy of ``PILOT_SNAPSHOTS`` snapshots on the 2,000 *held-out* images (the area
  under its held-out curve, which separates runs that end on the same plateau by how fast they got
  there). The value with the lowest score is kept; a value at an end of the grid grows the grid by one
  more value beyond it (at most ``MAX_EXTENSIONS`` times), so a kept value is interior unless reported.
- **Measured**: each method with its chosen value trains for ``SECONDS`` of wall-clock time (compile
  time excluded and reported apart; each step is waited for, so the clock holds the step's real cost);
  momentum and Adam go on until they have run at least ``MIN_STEPS`` iterations. Snapshots, evenly
  spaced in time and at log-spaced iterations, are evaluated afterwards (outside the clock) on a fixed
  2,000-image subset of the training images: the cross-entropy and the squared reconstruction error
  summed over the pixels (the error the papers plot).
- **Compared**, per iteration and per second separately: the target is momentum's training error
  after its (at least ``MIN_STEPS``) iterations. *Per iteration* (the papers' claim), for each
  second-order method: the iteration at which it first reaches the target, against momentum's; if it
  does not reach it within its budget, its error against momentum's at the iterations it did run, and
  the verdict says whether the budget decides the claim. *Per second*: every method's error at
  ``SECONDS`` of training, ranked.

Departures from the papers: 8,000 images from the 10,000-image test file instead of the 60,000
training images; no pre-training; two minutes on two CPU cores instead of hours on a GPU, so the runs
cover the start of the papers' curves; K-FAC without the growing batch of Martens & Grosse (a fixed
``BATCH``), its running factors starting from the first batch's; Hessian-free's gradient on ``HF_BATCH``
images instead of the whole training set, and backtracking over CG iterates by the lowest cost among
the saved ones (Martens walks back from the last while the cost falls).

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
BATCH, HF_BATCH, HF_CURVATURE, EVAL_ROWS = 256, 1000, 250, 2000
SECONDS, PILOT_SECONDS, SNAPSHOTS, PILOT_SNAPSHOTS, MIN_STEPS = 120.0, 12.0, 30, 6, 2000
QUICK_SECONDS, QUICK_PILOT_SECONDS, QUICK_ROWS, QUICK_MIN_STEPS = 1.0, 0.3, 1000, 30
MAX_EXTENSIONS = 3
HF_CG_MAX, HF_CG_TOL = 250, 5e-4  # Martens (2010): at most 250 CG iterations, ε = 5·10⁻⁴
FIRST_ORDER = ("momentum", "Adam")


def _momentum(rate):
    return fnn.optim.momentum(rate, 0.9)


def _adam(rate):
    return fnn.optim.adam(rate)


def _kfac(net, loss):
    return lambda damping: fnn.second_order.kfac_adaptive(net, loss, damping=damping)


def _hf(net, loss):
    return lambda damping: fnn.second_order.hessian_free(net, loss, damping=damping, cg_iters=HF_CG_MAX,
                                                         cg_tol=HF_CG_TOL, curvature_rows=HF_CURVATURE)


# name: (grid, batch, what the grid sets); the factories need the network and come from methods()
METHODS = {
    "momentum": ((3.0, 10.0, 30.0), BATCH, "learning rate"),
    "Adam": ((1e-3, 3e-3, 1e-2), BATCH, "learning rate"),
    "K-FAC": ((1e-3, 1e-2, 1e-1), BATCH, "initial damping λ"),
    "Hessian-free": ((1e-3, 1e-2, 1e-1), HF_BATCH, "initial damping λ"),
}


def methods(net, loss) -> dict:
    """``name -> (factory(value) -> optimizer, grid, batch, what)``."""
    factories = {"momentum": _momentum, "Adam": _adam, "K-FAC": _kfac(net, loss), "Hessian-free": _hf(net, loss)}
    return {name: (factories[name], *spec) for name, spec in METHODS.items()}


ITERATION_MARKS = frozenset(int(i) for i in np.unique(np.round(np.logspace(0, 4, 33))))
"""Iterations at which a snapshot is kept besides the time-spaced ones (log-spaced 1 … 10⁴)."""


def compile_step(net, loss, opt, params, x, batch: int):
    """``opt``'s training step compiled for a batch of ``batch`` rows, and the seconds it took."""
    started = time.perf_counter()
    step = jax.jit(lambda p, s, xb: fnn.train_step(net, opt, p, s, xb, xb, loss)[:2])
    step = step.lower(params, opt.init(params), x[:batch]).compile()
    return step, time.perf_counter() - started


def train(net, loss, opt, params, x, batch: int, seconds: float, snapshots: int, seed: int = 0,
          min_steps: int = 0, compiled=None) -> dict:
    """Train until ``seconds`` of wall-clock time and ``min_steps`` steps have passed (each step waited for;
    compilation before the clock, or ``compiled = (step, seconds)`` from :func:`compile_step`); keep about
    ``snapshots`` params evenly spaced in time, the params at :data:`ITERATION_MARKS` and at the budget,
    with the step count and seconds at each. ``budget_index`` is the snapshot at the end of ``seconds``."""
    step, compile_s = compiled or compile_step(net, loss, opt, params, x, batch)
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    order, at = rng.permutation(x.shape[0]), 0
    kept, steps, clock, every, budget_index = [(0, 0.0, params)], 0, 0.0, seconds / snapshots, None
    cg = []
    while clock < seconds or steps < min_steps:
        if at + batch > x.shape[0]:
            order, at = rng.permutation(x.shape[0]), 0
        xb = x[order[at: at + batch]]
        at += batch
        t = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state, xb))
        clock += time.perf_counter() - t
        steps += 1
        if hasattr(state, "cg_iterations"):
            cg.append(int(state.cg_iterations))
        timed = clock <= seconds and clock >= every * len(kept)
        if budget_index is None and clock >= seconds:
            kept.append((steps, clock, params))
            budget_index = len(kept) - 1
        elif timed or steps in ITERATION_MARKS:
            kept.append((steps, clock, params))
    if kept[-1][0] != steps:
        kept.append((steps, clock, params))
    extra = {"cg_iterations": cg} if cg else {}
    if hasattr(state, "gamma"):
        extra = {"final_damping": float(state.damping), "final_gamma": float(state.gamma)}
    return {"compile_s": compile_s, "steps": steps, "seconds": clock, "kept": kept, "budget_index": budget_index,
            **extra}


def evaluate(net, loss, kept, x_eval) -> dict:
    """Error of each snapshot on ``x_eval``: cross-entropy (per pixel) and squared error (per image)."""
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
    bounds, as the snapshots are spaced), or ``None``."""
    i = next((i for i, c in enumerate(curve["cross_entropy"]) if c <= level), None)
    return None if i is None else {"iteration": curve["iterations"][i], "seconds": curve["clock"][i]}


def pilot(grid: tuple, score, extensions: int) -> dict:
    """Score every value of ``grid`` (``score(value) -> float``, lower is better; not finite counts as
    worst) and keep the best; while it sits at an end, add the next value beyond it (the grid's ratio),
    at most ``extensions`` times. Returns the values tried in order, their scores, the chosen value and
    whether it is still at an end."""
    values = sorted(grid)
    ratio = values[1] / values[0] if len(values) > 1 else 1.0
    scores = {v: score(v) for v in values}

    def best():
        finite = {v: c for v, c in scores.items() if np.isfinite(c)}
        return min(finite, key=finite.get) if finite else values[0]

    for _ in range(extensions):
        chosen = best()
        if len(values) == 1 or chosen not in (values[0], values[-1]):
            break
        new = values[0] / ratio if chosen == values[0] else values[-1] * ratio
        new = float(f"{new:.3g}")
        values = sorted([*values, new])
        scores[new] = score(new)
    chosen = best()
    return {"grid": values, "score": [scores[v] for v in values], "chosen": chosen,
            "at_edge": len(values) > 1 and chosen in (values[0], values[-1])}


def per_iteration_verdict(runs: dict, name: str, target: float) -> dict:
    """The papers' claim for the second-order method ``name``: it reaches ``target`` (momentum's final
    error) in fewer iterations than momentum. ``holds`` or ``does not hold`` where the runs decide it;
    ``undecided`` where ``name`` did not reach the target in fewer iterations than momentum needed, so
    its budget cannot tell; then ``ahead`` says whether it was below momentum at its last iteration."""
    mom, run = runs["momentum"], runs[name]
    mine, theirs = first_reach(run, target), first_reach(mom, target)
    n = run["steps"]
    ahead = at_iteration(run, n) < at_iteration(mom, n)
    if mine is not None:
        verdict = "holds" if mine["iteration"] < theirs["iteration"] else "does not hold"
    else:
        verdict = "does not hold" if n >= theirs["iteration"] else "undecided"
    return {"verdict": verdict, "iterations_run": n, "momentum_iterations_to_target": theirs["iteration"],
            "iterations_to_target": None if mine is None else mine["iteration"], "ahead_at_last": bool(ahead),
            "error_at_last": at_iteration(run, n), "momentum_error_there": at_iteration(mom, n)}


def main(argv=None) -> dict:
    args = common.parse_args("second_order", __doc__.splitlines()[0], argv)
    raw = common.mnist_10k(args, QUICK_ROWS)[-1]
    x = jnp.asarray(raw.x_train[: QUICK_ROWS if args.quick else None], jnp.float32)  # pixels in [0, 1]
    x_eval, x_held = x[:EVAL_ROWS], jnp.asarray(raw.x_test, jnp.float32)
    sizes = QUICK_SIZES if args.quick else SIZES
    seconds, pilot_seconds, min_steps = ((QUICK_SECONDS, QUICK_PILOT_SECONDS, QUICK_MIN_STEPS) if args.quick
                                         else (SECONDS, PILOT_SECONDS, MIN_STEPS))
    hidden = len(sizes) - 2
    activation = tuple("identity" if l == hidden // 2 else "sigmoid" for l in range(hidden))
    net = fnn.MLP(sizes, activation, "identity", init="sparse")
    loss = fnn.losses.binary_cross_entropy_with_logits
    params = net.init(jax.random.PRNGKey(args.seed))
    initial = evaluate(net, loss, [(0, 0.0, params)], x_eval)["cross_entropy"][0]

    runs, pilots = {}, {}
    for name, (make, grid, batch, what) in methods(net, loss).items():
        # K-FAC's and Hessian-free's grid value is the initial damping, a field of the state that their
        # update reads, so one compiled step serves every value; a learning rate is compiled into the step.
        shared = None if name in FIRST_ORDER else compile_step(net, loss, make(grid[0]), params, x, batch)
        if args.quick:  # a smoke test of the code path: the middle of each grid, no pilot (pilot() has its test)
            grid = grid[len(grid) // 2: len(grid) // 2 + 1]

        def score(value):
            r = train(net, loss, make(value), params, x, batch, pilot_seconds, PILOT_SNAPSHOTS, args.seed,
                      compiled=shared)  # noqa: B023
            held = evaluate(net, loss, r["kept"][1:], x_held)["cross_entropy"]
            return float(np.mean(held)) if np.all(np.isfinite(held)) else float("inf")

        pilots[name] = {"what": what, **pilot(grid, score if len(grid) > 1 else lambda v: float("nan"),
                                              MAX_EXTENSIONS)}
        r = train(net, loss, make(pilots[name]["chosen"]), params, x, batch, seconds, SNAPSHOTS, args.seed,
                  min_steps if name in FIRST_ORDER else 0, compiled=shared)
        runs[name] = {"batch": batch, "compile_s": r["compile_s"], "steps": r["steps"], "seconds": r["seconds"],
                      "ms_per_step": 1e3 * r["seconds"] / r["steps"], "budget_index": r["budget_index"],
                      **{k: v for k, v in r.items() if k in ("cg_iterations", "final_damping", "final_gamma")},
                      **evaluate(net, loss, r["kept"], x_eval)}

    target = runs["momentum"]["cross_entropy"][-1]  # the papers' baseline: momentum's error at the end
    reach = {n: first_reach(r, target) for n, r in runs.items()}
    per_second = {n: r["cross_entropy"][r["budget_index"]] for n, r in runs.items()}
    iteration = {n: per_iteration_verdict(runs, n, target) for n in runs if n not in FIRST_ORDER}
    figure(args, runs, target)
    results = {"sizes": sizes, "activation": activation, "rows": int(x.shape[0]), "eval_rows": int(x_eval.shape[0]),
               "held_out_rows": int(x_held.shape[0]), "budget_s": seconds, "min_steps": min_steps,
               "pilot_seconds": pilot_seconds, "initial_cross_entropy": initial, "pilots": pilots, "runs": runs,
               "target": target, "reach": reach, "per_second": per_second, "per_iteration": iteration,
               "hf_batch": HF_BATCH, "hf_curvature_rows": HF_CURVATURE, "hf_cg_max": HF_CG_MAX,
               "hf_cg_tol": HF_CG_TOL}
    common.save_json(args, results)
    common.conclude(args, conclusion(results))
    return results


def conclusion(r: dict) -> str:
    runs = r["runs"]
    lines = []
    for name, run in runs.items():
        p = r["pilots"][name]
        edge = " (at an end of its grid)" if p["at_edge"] else ""
        lines.append(f"{name}: {p['what']} {p['chosen']:g}{edge} of {', '.join(f'{v:g}' for v in p['grid'])}, "
                     f"batch {run['batch']}, {run['steps']} steps in {run['seconds']:.0f} s "
                     f"({run['ms_per_step']:.0f} ms/step, compile {run['compile_s']:.1f} s); training cross-entropy "
                     f"{r['initial_cross_entropy']:.4f} -> {run['cross_entropy'][-1]:.4f} per pixel, squared error "
                     f"{run['squared_error'][-1]:.2f} per image")
    reach = r["reach"]
    lines.append(f"target: momentum's final error {r['target']:.4f} (after {runs['momentum']['steps']} iterations); "
                 "first snapshot at or below it: " + "; ".join(
                     f"{n} at iteration {reach[n]['iteration']} ({reach[n]['seconds']:.0f} s)" if reach[n]
                     else f"{n} never" for n in runs))
    for name, v in r["per_iteration"].items():
        where = (f"reached in {v['iterations_to_target']} iterations against momentum's "
                 f"{v['momentum_iterations_to_target']}" if v["iterations_to_target"] is not None else
                 f"not reached in its {v['iterations_run']} iterations (momentum needed "
                 f"{v['momentum_iterations_to_target']}); at iteration {v['iterations_run']} it is "
                 f"{v['error_at_last']:.4f} against momentum's {v['momentum_error_there']:.4f}")
        lines.append(f"per iteration, {name}: the papers' claim {v['verdict']} here: {where}")
    by_time = sorted(r["per_second"], key=r["per_second"].get)
    lines.append(f"per second (at {r['budget_s']:.0f} s): "
                 + " < ".join(f"{n} {r['per_second'][n]:.4f}" for n in by_time) + "; a step costs " + ", ".join(
                     f"{n} {runs[n]['ms_per_step'] / runs['momentum']['ms_per_step']:.1f}x" for n in r["per_iteration"])
                 + " a momentum step")
    return "\n".join(lines)


def figure(args, runs: dict, target: float) -> None:
    plt = common.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        a.plot(np.maximum(run["iterations"], 1), run["cross_entropy"], marker=".", label=name)
        b.plot(run["clock"], run["cross_entropy"], marker=".", label=name)
    for ax in (a, b):
        ax.axhline(target, color="grey", ls=":", lw=0.8, label="momentum's final error")
    a.set(xscale="log", xlabel="iteration", ylabel="training cross-entropy (per pixel)", title="(a) per iteration")
    b.set(xlabel="seconds of training (compile excluded)", ylabel="training cross-entropy (per pixel)",
          title="(b) per second")
    for ax in (a, b):
        ax.legend()
    common.save_figure(args, fig)


if __name__ == "__main__":
    main()
