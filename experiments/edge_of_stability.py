"""Edge of stability: full-batch gradient descent drives the sharpness up to 2/η and holds it there.

A descent step ``θ ← θ − η∇C`` is stable on the local quadratic model only while the sharpness
``λ_max(∇²C) < 2/η`` (the learning-rate lesson: along the top eigenvector the error is multiplied by
``1 − ηλ_max``). Cohen, Kaur, Li, Kolter & Talwalkar ("Gradient descent on neural networks typically
occurs at the edge of stability", ICLR 2021) found that full-batch gradient descent on neural networks
does not stay where this is comfortable: the sharpness rises during training ("progressive
sharpening") until it reaches ``2/η``, then hovers just above it while the cost keeps falling, no
longer monotonically.

Setup: the first ``SUBSET`` training images of ``mnist-10k`` (z-scored), a 784-32-32-10 tanh network,
``mse`` on one-hot targets (Cohen et al. show the effect most cleanly with the squared loss), the same
initial parameters for every ``η`` in ``ETAS``, ``STEPS`` full-batch steps with :func:`fnn.backprop`.
Every ``EVERY`` steps the sharpness is measured with :func:`fnn.curvature.sharpness`: power iteration on
the hand-written Hessian-vector product (Pearlmutter's R-operator), warm-started from the previous
eigenvector, at most ``POWER_ITERS`` products, residual tolerance ``1e-3``. A Rayleigh quotient is never
above ``λ_max``, so a measurement that stops before the residual test passes is a lower bound; the
fraction that passed is reported.

Departures from the paper: a 1,000-image subset of the 10k-image test set (theirs: 5,000 CIFAR-10
images), a small tanh MLP, 2,000 steps; the sharpness from at most 10 warm-started power iterations
rather than Lanczos to convergence.

Output: ``edge_of_stability.png`` (sharpness and cost against steps) and ``edge_of_stability.json``.
"""

from __future__ import annotations

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np

import fnn

SIZES = (784, 32, 32, 10)
ETAS = (0.5, 1.0, 2.0)
SUBSET, STEPS, EVERY, POWER_ITERS = 1000, 2000, 20, 10
QUICK_SUBSET, QUICK_STEPS = 200, 160
EDGE = (0.9, 1.15)  # the sharpness is "at the edge" when its median over the last half lies in EDGE × 2/η


def track(net, params, x, y, loss, eta: float, steps: int, start) -> dict:
    """Full-batch gradient descent at ``eta`` with the sharpness measured every ``EVERY`` steps."""

    @jax.jit
    def chunk(p, v):
        def step(p, _):
            cost, grads = fnn.backprop(net, p, x, y, loss)
            return jax.tree.map(lambda w, g: w - eta * g, p, grads), cost

        p, costs = jax.lax.scan(step, p, None, length=EVERY)
        top = fnn.curvature.sharpness(net, p, x, y, loss, start=v, max_iter=POWER_ITERS, tol=1e-3)
        return p, top.vector, costs, top.value, top.converged

    costs, sharp, converged, v = [], [], [], start
    for _ in range(steps // EVERY):
        params, v, c, lam, ok = chunk(params, v)
        costs.append(np.asarray(c, np.float64))
        sharp.append(float(lam))
        converged.append(bool(ok))
    costs = np.concatenate(costs)
    sharp = np.asarray(sharp)
    half = len(sharp) // 2
    late = np.diff(costs[len(costs) // 2:])
    return {
        "eta": eta, "two_over_eta": 2 / eta, "costs": costs, "sharpness": sharp, "converged": converged,
        "steps_at": (np.arange(len(sharp)) + 1) * EVERY,
        "max_sharpness": float(sharp.max()),
        "late_median_over_edge": float(np.median(sharp[half:]) * eta / 2),
        "late_increases": float(np.mean(late > 0)),  # fraction of steps in the second half that raised C
        "final_cost": float(costs[-1]), "mid_cost": float(costs[len(costs) // 2]),
        "converged_fraction": float(np.mean(converged)),
    }


def verdict(run: dict, initial: float) -> str:
    """``edge``, ``below`` or ``between`` from the measured sharpness against 2/η."""
    r = run["late_median_over_edge"]
    if EDGE[0] <= r <= EDGE[1]:
        return "edge"
    if run["max_sharpness"] < EDGE[0] * run["two_over_eta"]:
        return "below"
    return "above" if r > EDGE[1] else "between"


def main(argv=None) -> dict:
    args = common.parse_args("edge_of_stability", __doc__.splitlines()[0], argv)
    x_train, y_train, *_ = common.mnist_10k(args, QUICK_SUBSET)
    n, steps = (QUICK_SUBSET, QUICK_STEPS) if args.quick else (SUBSET, STEPS)
    x, y = x_train[:n], jax.nn.one_hot(y_train[:n], SIZES[-1], dtype=jnp.float32)
    net, loss = fnn.MLP(SIZES, "tanh", "identity"), fnn.losses.mse
    params = net.init(jax.random.PRNGKey(0))
    initial = fnn.curvature.sharpness(net, params, x, y, loss, key=jax.random.PRNGKey(1), max_iter=500, tol=1e-5)
    runs = [track(net, params, x, y, loss, eta, steps, initial.vector) for eta in ETAS]
    for r in runs:
        r["verdict"] = verdict(r, float(initial.value))

    plt = common.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, c in zip(runs, colors):
        a.plot(r["steps_at"], r["sharpness"], color=c, label=f"η = {r['eta']:g}")
        a.axhline(r["two_over_eta"], color=c, ls="--", lw=0.8)
        b.plot(np.arange(1, len(r["costs"]) + 1), r["costs"], color=c, lw=0.8, label=f"η = {r['eta']:g}")
    a.set(xlabel="step", ylabel="sharpness λ_max(∇²C)",
          title="(a) sharpness (solid) and 2/η (dashed)")
    b.set(xlabel="step", ylabel="training cost (mse)", yscale="log", title="(b) training cost")
    a.legend()
    b.legend()
    common.save_figure(args, fig)

    results = {"subset": n, "steps": steps, "every": EVERY, "power_iters": POWER_ITERS, "sizes": SIZES,
               "initial_sharpness": float(initial.value), "initial_converged": bool(initial.converged),
               "initial_iterations": int(initial.iterations), "runs": runs}
    common.save_json(args, results)
    lines = [f"sharpness at initialization {float(initial.value):.3f} (power iteration, "
             f"{int(initial.iterations)} products, converged {bool(initial.converged)})"]
    for r in runs:
        lines.append(
            f"η = {r['eta']:g}: 2/η = {r['two_over_eta']:.2f}; sharpness rose to {r['max_sharpness']:.2f}; "
            f"median over the second half {r['late_median_over_edge']:.3f} × 2/η -> {r['verdict']}; the cost rose "
            f"on {100 * r['late_increases']:.0f} % of the second half's steps and fell from {r['mid_cost']:.4f} to "
            f"{r['final_cost']:.4f}; {100 * r['converged_fraction']:.0f} % of the sharpness measurements passed "
            "the residual test")
    edge = [r for r in runs if r["verdict"] == "edge"]
    lam0 = float(initial.value)
    room = [r for r in runs if r["two_over_eta"] > lam0]  # stable at the start: room to sharpen
    rose = [r for r in room if r["max_sharpness"] > 1.2 * lam0]
    summary = (f"{len(edge)} of {len(runs)} step sizes ended at the edge of stability (η = "
               + ", ".join(f"{r['eta']:g}" for r in edge) + ")" if edge else "no step size reached the edge")
    summary += (f"; of the {len(room)} step sizes stable at the start (2/η > {lam0:.2f}), the sharpness rose by more "
                f"than 20 % at {len(rose)} (progressive sharpening)")
    unstable = [r for r in runs if r["two_over_eta"] <= lam0]
    if unstable:
        summary += ("; where 2/η lay below the initial sharpness (η = " + ", ".join(f"{r['eta']:g}" for r in unstable)
                    + ") it fell to " + ", ".join(f"{r['late_median_over_edge']:.2f}" for r in unstable) + " × 2/η")
    common.conclude(args, "\n".join(lines + [summary]))
    return results


if __name__ == "__main__":
    main()
