"""Edge of stability: full-batch gradient descent drives the sharpness up to 2/η and holds it there.

A descent step ``θ ← θ − η∇C`` is stable on the local quadratic model only while the sharpness
``λ_max(∇²C) < 2/η`` (the learning-rate lesson: along the top eigenvector the error is multiplied by
``1 − ηλ_max``). Cohen, Kaur, Li, Kolter & Talwalkar ("Gradient descent on neural networks typically
occurs at the edge of stability", ICLR 2021) found that full-batch gradient descent on neural networks
does not stay where this is comfortable: the sharpness rises during training ("progressive
sharpening") until it reaches ``2/η``, then hovers just above it while the cost keeps falling, no
longer monotonically.

Setup: the first ``SUBSET`` training images of ``mnist-10k`` (z-scored), a 784-32-32-10 tanh network,
``mse`` on one-hot targets (Cohen et al. show the effect most cleanly with the squared loss), ``STEPS``
full-batch steps with :func:`fnn.backprop` at every ``η`` in ``ETAS``, from ``--seeds`` initializations
(seeds ``S, S + 1, …`` for ``--seed S``; within a seed every ``η`` starts from the same parameters).
Every ``EVERY`` steps the sharpness is measured by :func:`lanczos_top`: ``LANCZOS`` steps of Lanczos
with full reorthogonalization on the hand-written Hessian-vector product (Pearlmutter's R-operator),
started from the previous top Ritz vector plus a random direction; its Ritz residual bounds the
distance to an eigenvalue and is reported.

Verdicts, per ``η`` and seed, from the measurements (``edge = 2/η``):

- *rises to 2/η*: the sharpness at initialization is below ``LOW × edge`` and a measurement reaches
  ``LOW × edge`` (progressive sharpening up to the limit); *rises short of 2/η*: it grows by more than
  20 % but stays below; *starts at or above 2/η*: at initialization it is already ``≥ LOW × edge`` (no
  room to sharpen);
- *hovers at 2/η*: after it first reaches ``LOW × edge``, at least ``HOVER`` of the measurements lie
  within ``[LOW, HIGH] × edge`` and there are at least ``MIN_AFTER`` of them.

Departures from the paper: a 1,000-image subset of the 10k-image test set (theirs: 5,000 CIFAR-10
images, several architectures), a small tanh MLP, 2,500 steps, ``LANCZOS``-step Lanczos every
``EVERY`` steps (theirs: Lanczos to convergence).

Output: ``edge_of_stability.png`` (sharpness and cost against steps) and ``edge_of_stability.json``.
"""

from __future__ import annotations

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import fnn

SIZES = (784, 32, 32, 10)
ETAS = (0.6, 0.8, 1.0, 1.4)
SEEDS = 3
SUBSET, STEPS, EVERY, LANCZOS = 1000, 2500, 50, 15
QUICK_SUBSET, QUICK_STEPS = 200, 200
LOW, HIGH = 0.9, 1.15
"""The band around 2/η that counts as *at the edge*."""
COST_EVERY = 10
"""The JSON keeps the cost of every ``COST_EVERY``-th step (the figure and the statistics use every step)."""
HOVER, MIN_AFTER = 0.8, 10
"""*Hovers*: at least this share of at least this many measurements after reaching the band lie in it."""


def lanczos_top(product, start, steps: int):
    """The largest eigenvalue of the symmetric operator ``product`` (on flat vectors) by ``steps`` of Lanczos
    with full reorthogonalization from ``start``. Returns ``(θ, y, residual)``: the top Ritz value, its unit
    Ritz vector and ``‖M y − θ y‖ = β_k |s_k|`` (some eigenvalue of ``M`` lies within it of ``θ``; Golub &
    Van Loan, *Matrix Computations*, §10.1). Jit-able; ``steps`` is static."""
    q0 = start / jnp.linalg.norm(start)
    basis = jnp.zeros((steps, q0.size), q0.dtype)
    tiny = jnp.finfo(q0.dtype).tiny

    def body(i, carry):
        basis, alpha, beta, q = carry
        basis = basis.at[i].set(q)
        w = product(q)
        a = jnp.vdot(q, w)
        for _ in range(2):  # twice is enough (Giraud et al. 2005): rows not yet filled are zero
            w = w - basis.T @ (basis @ w)
        b = jnp.linalg.norm(w)
        return basis, alpha.at[i].set(a), beta.at[i].set(b), jnp.where(b > tiny, w / jnp.maximum(b, tiny), 0 * w)

    zeros = jnp.zeros(steps, q0.dtype)
    basis, alpha, beta, _ = jax.lax.fori_loop(0, steps, body, (basis, zeros, zeros, q0))
    tri = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    values, vectors = jnp.linalg.eigh(tri)
    top = vectors[:, -1]
    y = basis.T @ top
    return values[-1], y / jnp.linalg.norm(y), jnp.abs(beta[-1] * top[-1])


def make_tracker(net, x, y, loss, steps: int):
    """A jitted ``(params, start, key, eta) -> (costs (steps,), sharpness, residual)``: full-batch descent
    at ``eta`` with the Lanczos sharpness every ``EVERY`` steps (``steps // EVERY`` measurements)."""
    flat0, unravel = ravel_pytree(net.init(jax.random.PRNGKey(0)))

    def measure(p, start, key):
        def product(u):
            return ravel_pytree(fnn.curvature.hvp(net, p, x, y, loss, unravel(u)))[0]

        noise = jax.random.normal(key, flat0.shape, flat0.dtype)
        begin = start / jnp.linalg.norm(start) + 0.1 * noise / jnp.linalg.norm(noise)
        return lanczos_top(product, begin, LANCZOS)

    @jax.jit
    def track(params, start, key, eta):
        def chunk(carry, k):
            p, v = carry

            def step(p, _):
                cost, grads = fnn.backprop(net, p, x, y, loss)
                return jax.tree.map(lambda w, g: w - eta * g, p, grads), cost

            p, costs = jax.lax.scan(step, p, None, length=EVERY)
            lam, v, res = measure(p, v, k)
            return (p, v), (costs, lam, res)

        keys = jax.random.split(key, steps // EVERY)
        _, (costs, lam, res) = jax.lax.scan(chunk, (params, start), keys)
        return costs.reshape(-1), lam, res

    return track, measure


def verdicts(sharp: np.ndarray, eta: float, initial: float) -> dict:
    """The verdicts of one run from its measurements ``sharp`` and the sharpness at initialization
    (see the module's docstring)."""
    edge = 2 / eta
    reached = np.flatnonzero(sharp >= LOW * edge)
    first = int(reached[0]) if reached.size else None
    if initial >= LOW * edge:
        rise = "starts at or above 2/η"
    elif first is not None:
        rise = "rises to 2/η"
    elif sharp.max() > 1.2 * initial:
        rise = "rises short of 2/η"
    else:
        rise = "does not rise"
    after = sharp[first:] if first is not None else sharp[:0]
    share = float(np.mean((after >= LOW * edge) & (after <= HIGH * edge))) if after.size else 0.0
    hovers = after.size >= MIN_AFTER and share >= HOVER
    return {"rise": rise, "first_at_edge": first, "share_in_band_after": share, "measurements_after": int(after.size),
            "hovers": bool(hovers)}


def main(argv=None) -> dict:
    args = common.parse_args("edge_of_stability", __doc__.splitlines()[0], argv, lambda p: p.add_argument(
        "--seeds", type=int, default=SEEDS, help=f"initializations S … S+N−1 for --seed S (default {SEEDS})"))
    x_train, y_train, *_ = common.mnist_10k(args, QUICK_SUBSET)
    n, steps, seeds = (QUICK_SUBSET, QUICK_STEPS, 2) if args.quick else (SUBSET, STEPS, args.seeds)
    x, y = x_train[:n], jax.nn.one_hot(y_train[:n], SIZES[-1], dtype=jnp.float32)
    net, loss = fnn.MLP(SIZES, "tanh", "identity"), fnn.losses.mse
    track, measure = make_tracker(net, x, y, loss, steps)
    measure = jax.jit(measure)
    at = (np.arange(steps // EVERY) + 1) * EVERY
    per_seed = []
    for seed in common.seeds(args, seeds):
        init_key, probe_key, run_key = jax.random.split(jax.random.PRNGKey(seed), 3)
        params = net.init(init_key)
        start = jax.random.normal(probe_key, ravel_pytree(params)[0].shape)
        lam0, v0, res0 = measure(params, start, probe_key)
        runs = []
        for eta in ETAS:
            costs, sharp, res = jax.device_get(track(params, v0, run_key, eta))
            costs, sharp = np.asarray(costs, np.float64), np.asarray(sharp, np.float64)
            half = len(costs) // 2
            runs.append({"eta": eta, "two_over_eta": 2 / eta, "costs": costs, "sharpness": sharp,
                         "relative_residual": np.asarray(res) / np.abs(sharp),
                         "final_cost": float(costs[-1]), "mid_cost": float(costs[half]),
                         "max_sharpness": float(sharp.max()),
                         "rose_on": float(np.mean(np.diff(costs[half:]) > 0)), **verdicts(sharp, eta, float(lam0))})
        per_seed.append({"seed": seed, "initial_sharpness": float(lam0),
                         "initial_relative_residual": float(res0 / abs(lam0)), "runs": runs})

    summary = []
    for i, eta in enumerate(ETAS):
        rs = [s["runs"][i] for s in per_seed]
        summary.append({"eta": eta, "two_over_eta": 2 / eta,
                        "rises_to_edge": sum(r["rise"] == "rises to 2/η" for r in rs),
                        "starts_at_edge": sum(r["rise"] == "starts at or above 2/η" for r in rs),
                        "hovers": sum(r["hovers"] for r in rs), "seeds": len(rs),
                        "cost_fell": sum(r["final_cost"] < r["mid_cost"] for r in rs)})

    plt = common.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (eta, c) in enumerate(zip(ETAS, colors)):
        for k, s in enumerate(per_seed):
            r = s["runs"][i]
            label = f"η = {eta:g}" if k == 0 else None
            a.plot(at, r["sharpness"], color=c, lw=0.9, alpha=1 if k == 0 else 0.5, label=label)
            b.plot(np.arange(1, steps + 1), r["costs"], color=c, lw=0.7, alpha=1 if k == 0 else 0.5, label=label)
        a.axhline(2 / eta, color=c, ls="--", lw=0.8)
    a.set(xlabel="step", ylabel="sharpness λ_max(∇²C) (Lanczos)",
          title=f"(a) sharpness (solid, {seeds} seeds) and 2/η (dashed)")
    b.set(xlabel="step", ylabel="training cost (mse)", yscale="log", title="(b) training cost")
    a.legend()
    b.legend()
    common.save_figure(args, fig)

    for s in per_seed:
        for r in s["runs"]:
            r["costs"] = r["costs"][::COST_EVERY]  # steps 1, 1 + COST_EVERY, …
    results = {"subset": n, "steps": steps, "every": EVERY, "cost_every": COST_EVERY, "lanczos_steps": LANCZOS,
               "sizes": SIZES,
               "etas": list(ETAS), "band": [LOW, HIGH], "hover": HOVER, "min_after": MIN_AFTER,
               "per_seed": per_seed, "summary": summary}
    common.save_json(args, results)
    common.conclude(args, describe(results))
    return results


def describe(r: dict) -> str:
    """The conclusion, per η, from the verdicts' counts."""
    lines = ["initial sharpness (Lanczos) " + ", ".join(f"{s['initial_sharpness']:.3f} (seed {s['seed']})"
                                                      for s in r["per_seed"])]
    for s in r["summary"]:
        n = s["seeds"]
        lines.append(f"η = {s['eta']:g} (2/η = {s['two_over_eta']:.2f}): rises to 2/η in {s['rises_to_edge']} of {n} "
                     f"seeds, starts at or above it in {s['starts_at_edge']}; hovers at 2/η in {s['hovers']} of {n}; "
                     f"the cost fell over the second half in {s['cost_fell']} of {n}")
    both = [f"{s['eta']:g}" for s in r["summary"] if s["rises_to_edge"] == s["hovers"] == s["seeds"]]
    lines.append("the claim (rises to 2/η, then hovers there) holds in every seed at η = "
                 + (", ".join(both) or "none"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
