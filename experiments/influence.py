"""Training-data attribution on MNIST: mislabel detection by self-influence; the linear datamodeling score.

Part 1, mislabel detection (the default; ``influence.json``). Claims checked:

(a) Koh & Liang ("Understanding black-box predictions via influence functions", ICML 2017, §5.4) and
    Pruthi et al. ("Estimating training data influence by tracing gradient descent", NeurIPS 2020, §4):
    with a part of the training labels flipped, inspecting the training examples in decreasing order of
    their self-influence finds the flipped ones faster than inspecting them at random.
(b) Koh & Liang, §5.4: the influence-function ranking finds them faster than the training loss does.
(c) Pruthi et al., §4: TracIn's self-influence finds them faster than influence functions and than the loss.

Setting: the 8,000 training images of ``mnist-10k`` (z-scored by training-split statistics); per seed a
random ``FLIP`` of them (a seeded subset) have their label moved to another class, drawn uniformly among
the nine others. A ``784-128-10`` relu network, softmax cross-entropy on the logits,
``C = (1/N) Σ ℓ + ½β Σ_l ‖W^l‖²`` with ``β = BETA``, Adam at a constant ``α = LR`` for ``EPOCHS`` epochs of
batches of ``BATCH``, trained on the flipped labels. The params after every epoch are the checkpoints
``θ_1 … θ_T``. Four rankings of the training examples, highest first:

- EK-FAC self-influence ``⟨g_z, M⁻¹ g_z⟩`` (:func:`fnn.influence.self_influence`), ``g_z = ∇ℓ(z; θ_T)``
  and ``M = G + βI + λI`` with ``G`` the EK-FAC approximation of the mean Gauss-Newton matrix of the
  training set (exact columns, :func:`fnn.influence.preconditioner`), and ``λ = DAMPING`` times the mean
  of its eigenvalues;
- TracIn self-influence ``Σ_t η_t ‖∇ℓ(z; θ_t)‖²`` over the ``T`` checkpoints
  (:func:`fnn.influence.tracin_self`), ``η_t`` the learning rate of the last update before ``θ_t``;
- the training loss ``ℓ(z; θ_T)`` at the end;
- a random permutation.

For each, the fraction of the flipped labels found against the fraction of the training set inspected
in that order, 0–100 %; summarized by the counts found after inspecting ``AT`` (10, 20, 30 %) of the set
and by the area under the curve (random: ½ in expectation; a perfect ranking: ``1 − FLIP/2``).

Verdicts, computed per seed and then over the seeds: "holds" where the claim holds in every seed, "does
not hold" where in none, else "mixed": (a) per ranking (EK-FAC, TracIn), more flipped labels found than
random inspection finds in expectation (``p`` of them after inspecting ``p`` of the set) at 10 % and at
20 %; (b) EK-FAC's area above the training loss's; (c) TracIn's area above both EK-FAC's and the loss's.

Part 2, the linear datamodeling score (``--lds``; ``influence_lds.json``). Park, Georgiev, Ilyas, Leclerc &
Madry ("TRAK: attributing model behavior at scale", ICML 2023, §2) score an attribution ``τ(z_t, z_i)`` by
how well the linear datamodel ``Σ_{i∈S} τ(z_t, z_i)`` ranks the outcomes of retraining on random subsets
``S``: the LDS of a test point is Spearman's ρ, over the subsets, between that prediction and the test
point's loss after training on ``S`` alone (averaged over retrainings from several inits). Per seed: ``N``
training images of ``mnist-10k`` and ``T`` held-out test points drawn at random (:data:`LDS`); a
``784-32-10`` relu network trained full-batch on ``C_S = (1/|S|) Σ_{i∈S} ℓ_i + ½β Σ_l ‖W^l‖²`` with Adam,
``α = LDS_LR`` cosine-decayed to 0 (:func:`train_on`); ``M`` random halves ``S`` of the training images, each
retrained from ``K`` inits, all ``M·K`` models in one vmapped program (:func:`retrained_losses`). The scores
come from one model trained on all ``N`` (its own init), each oriented as a rise of the test loss when
``z_i`` is kept (removing ``z_i`` from the cost's mean moves the test loss by about ``−I/N``, so the
prediction for ``S`` is ``(1/N)(2 Σ_{i∈S} I − Σ_i I)``, whose ranks over the subsets are those of
``Σ_{i∈S} I``):

- influence functions ``I = −∇ℓ(z_t)ᵀ M⁻¹ ∇ℓ(z_i)`` (:func:`fnn.influence.influence`), ``M = G + βI + λI``
  with ``λ = DAMPING`` times the mean eigenvalue of ``G``, in three forms: EK-FAC and KFAC (exact columns;
  also at the other ``LDS_DAMPINGS``), and CG on the exact ``G`` (``method="cg"``);
- TracIn over the checkpoints of the full run (:func:`fnn.influence.tracin`), and plain gradient dot
  products ``⟨∇ℓ(z_t), ∇ℓ(z_i)⟩`` at the end (:func:`fnn.influence.gradient_inner_products`), both negated.

Verdicts per seed, on the mean LDS over the test points, then over the seeds as above: every method's mean
LDS more than two standard errors above 0; each influence function's, and TracIn's, at least that of the
gradient dot products (the order reported by Deng et al., "dattri", NeurIPS 2024 Datasets and Benchmarks, for
an MNIST MLP: CG and TracIn above Grad-Dot, :data:`LITERATURE`); EK-FAC's at least TracIn's and KFAC's; CG's
(the solve that EK-FAC approximates) at least EK-FAC's.
"""

from __future__ import annotations

import argparse
import functools
from typing import NamedTuple

import common  # first: puts the repository on sys.path
from common import conclude, parse_args, pyplot, save_figure, save_json

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import fnn
from fnn import influence

SIZES = (784, 128, 10)
FLIP = 0.1
EPOCHS, BATCH, LR, BETA = 10, 128, 1e-3, 1e-4
DAMPING = 0.1
"""``λ`` over the mean eigenvalue of the EK-FAC Gauss-Newton matrix (chosen, not tuned)."""
DAMPINGS = (0.01, 1.0)
"""Other fractions, for the EK-FAC ranking's sensitivity to ``λ`` (area only)."""
AT = (0.1, 0.2, 0.3)
GRID = 101
"""Points of each stored curve: inspected fractions 0, 1, …, 100 %."""
METHODS = ("EK-FAC", "TracIn", "training loss", "random")
QUICK = {"rows": 1024, "epochs": 2, "seeds": 2}
LOSS = fnn.losses.softmax_cross_entropy


def _extra(p):
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lds", action="store_true",
                   help="part (b), the linear datamodeling score, instead of (a); writes influence_lds.json and .png")


def _part_b(argv) -> bool:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--lds", action="store_true")
    return pre.parse_known_args(argv)[0].lds


def flip_labels(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, flipped)``: ``round(fraction · N)`` labels of a random subset each moved to one of the other
    nine classes, uniformly; ``flipped (N,)`` bool marks them."""
    n = len(y)
    idx = rng.choice(n, round(fraction * n), replace=False)
    out = np.array(y)
    out[idx] = (out[idx] + rng.integers(1, 10, len(idx))) % 10
    flipped = np.zeros(n, bool)
    flipped[idx] = True
    return out, flipped


def detection_curve(scores: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """Flipped labels found after inspecting the first ``k`` examples in decreasing order of ``scores``,
    ``k = 0 … N``: ``(N + 1,)`` counts (ties broken by the lower index)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    return np.concatenate([[0], np.cumsum(flipped[order])])


def summarize(counts: np.ndarray) -> dict:
    """The curve of :func:`detection_curve` as fractions on ``GRID`` inspected fractions, the counts found at
    ``AT``, and the area under the fraction found against the fraction inspected (trapezoids)."""
    n, total = len(counts) - 1, counts[-1]
    frac = counts / total
    at = {f"{p:g}": int(counts[round(p * n)]) for p in AT}
    grid = frac[np.round(np.linspace(0, 1, GRID) * n).astype(int)]
    return {"found": at, "area": float((frac[:-1] + frac[1:]).sum() / (2 * n)), "curve": grid}


def per_example_loss(net, params, x, y) -> np.ndarray:
    """``ℓ(z; θ)`` ``(N,)``: softmax cross-entropy of the logits against the (possibly flipped) label."""
    return np.asarray(_losses(net, params, x, y))


def _losses(net, params, x, y) -> jax.Array:
    logp = jax.nn.log_softmax(net.apply(params, x))
    return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]


def train(net, x, y, seed: int, epochs: int):
    """Adam from the init of ``seed``; returns the checkpoints ``θ_1 … θ_T`` and their learning rates."""
    init_key, batch_key = jax.random.split(jax.random.PRNGKey(seed))
    params = net.init(init_key, jnp.float32)
    checkpoints = []
    result = fnn.fit(net, params, fnn.optim.adam(LR), (x, y), loss=LOSS, epochs=epochs, batch_size=BATCH,
                     key=batch_key, l2=BETA, quiet=True, on_epoch_end=lambda r: checkpoints.append(r.params))
    if result.stopped:
        raise RuntimeError(result.stopped)
    return checkpoints, np.array([h["learning_rate_last"] for h in result.history])


def mean_eigenvalue(net, params, x, y, beta: float) -> float:
    """The mean eigenvalue of the EK-FAC approximation of the mean Gauss-Newton matrix of ``(x, y)`` (exact
    columns): the scale that the damping ``λ`` is given in."""
    probe = influence.preconditioner(net, params, (x, y), LOSS, method="ekfac", damping=1e-12, l2=beta)
    return float(np.mean(np.concatenate([np.ravel(lam) for _, _, lam in probe.layers]))) - beta - 1e-12


def ekfac_scores(net, params, x, y, fractions) -> tuple[dict, float]:
    """``{fraction: self-influence (N,)}`` with ``λ = fraction × mean eigenvalue``, and that mean."""
    mean = mean_eigenvalue(net, params, x, y, BETA)
    out = {}
    for f in fractions:
        pre = influence.preconditioner(net, params, (x, y), LOSS, method="ekfac", damping=f * mean, l2=BETA)
        out[f] = influence.self_influence(pre)
    return out, mean


SUBSET = 1000
"""Rows a second EK-FAC preconditioner is fitted on (one sampled column each) before it scores every row."""


def subset_agreement(net, params, x, y, damping: float, full: np.ndarray, flipped: np.ndarray, seed: int) -> dict:
    """The EK-FAC self-influence of every training row from a preconditioner fitted on a random ``SUBSET`` of
    them (one sampled output column per row, the bench's cheap fit), against ``full``, that of the fit on all
    rows with exact columns: Spearman's ρ, the overlap of the two top deciles, and the flipped labels found
    after inspecting 10 % of the set in either order."""
    rows = np.random.default_rng(seed + 1).choice(len(full), min(SUBSET, len(full)), replace=False)
    pre = influence.preconditioner(net, params, (x[rows], y[rows]), LOSS, method="ekfac", damping=damping, l2=BETA,
                                   key=seed)
    part = influence.self_influence(pre, (x, y))
    k = round(AT[0] * len(full))

    def ranks(a):
        return np.argsort(np.argsort(-np.asarray(a, np.float64), kind="stable"))

    return {"rows": int(len(rows)), "spearman": float(np.corrcoef(ranks(part), ranks(full))[0, 1]),
            "top_decile_overlap": len(set(np.argsort(-part)[:k]) & set(np.argsort(-full)[:k])) / k,
            "found": int(detection_curve(part, flipped)[k]), "found_full": int(detection_curve(full, flipped)[k])}


def fitted(net, params, x, y, flipped) -> dict:
    """The share of the flipped and of the clean examples whose prediction is their (training) label."""
    hit = np.asarray(jnp.argmax(net.apply(params, x), -1) == y)
    return {"flipped": float(hit[flipped].mean()), "clean": float(hit[~flipped].mean())}


def per_seed(net, x, y, xt, yt, seed: int, epochs: int) -> dict:
    rng = np.random.default_rng(seed)
    labels, flipped = flip_labels(np.asarray(y), FLIP, rng)
    noisy = jnp.asarray(labels)
    checkpoints, rates = train(net, x, noisy, seed, epochs)
    final = checkpoints[-1]
    ekfac, mean = ekfac_scores(net, final, x, noisy, sorted((DAMPING, *DAMPINGS)))
    scores = {"EK-FAC": ekfac[DAMPING],
              "TracIn": influence.tracin_self(net, checkpoints, rates, (x, noisy), LOSS),
              "training loss": per_example_loss(net, final, x, noisy),
              "random": rng.permutation(len(labels)).astype(np.float64)}
    held = np.asarray(jnp.argmax(net.apply(final, xt), -1) == yt)
    return {"seed": seed, "flipped": int(flipped.sum()), "learning_rates": rates,
            "mean_eigenvalue": mean, "damping": DAMPING * mean,
            "rankings": {k: summarize(detection_curve(s, flipped)) for k, s in scores.items()},
            "damping_areas": {f"{f:g}": summarize(detection_curve(ekfac[f], flipped))["area"] for f in ekfac},
            "fitted": [fitted(net, p, x, noisy, flipped) for p in checkpoints],
            "subset": subset_agreement(net, final, x, noisy, DAMPING * mean, ekfac[DAMPING], flipped, seed),
            "held_out_accuracy": float(held.mean())}


def _word(hits: list) -> str:
    return "holds" if all(hits) else "does not hold" if not any(hits) else "mixed"


def verdicts(runs: list) -> dict:
    """The claims (a)–(c) of the module docstring, per seed and over the seeds."""
    out = {}
    for m in ("EK-FAC", "TracIn"):
        hits = [all(r["rankings"][m]["found"][f"{p:g}"] > p * r["flipped"] for p in AT[:2]) for r in runs]
        out[f"{m} above random"] = {"per_seed": hits, "verdict": _word(hits)}
    area = [{m: r["rankings"][m]["area"] for m in METHODS} for r in runs]
    hits = [a["EK-FAC"] > a["training loss"] for a in area]
    out["EK-FAC above training loss"] = {"per_seed": hits, "verdict": _word(hits)}
    hits = [a["TracIn"] > max(a["EK-FAC"], a["training loss"]) for a in area]
    out["TracIn above EK-FAC and training loss"] = {"per_seed": hits, "verdict": _word(hits)}
    return out


def summary(runs: list) -> dict:
    """Mean, min and max over the seeds of every ranking's counts at ``AT`` and area."""
    out = {}
    for m in METHODS:
        cols = {f"found {k}": [r["rankings"][m]["found"][k] for r in runs] for k in runs[0]["rankings"][m]["found"]}
        cols["area"] = [r["rankings"][m]["area"] for r in runs]
        out[m] = {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                  for k, v in cols.items()}
    return out


def main(argv=None) -> dict:
    if _part_b(argv):
        return main_lds(argv)
    args = parse_args("influence", __doc__.splitlines()[0], argv, _extra)
    x, y, xt, yt, _ = common.mnist_10k(args, QUICK["rows"])
    epochs = QUICK["epochs"] if args.quick else EPOCHS
    seeds = min(args.seeds, QUICK["seeds"]) if args.quick else args.seeds
    net = fnn.MLP(SIZES, "relu", "identity")
    runs = [per_seed(net, x, y, xt, yt, s, epochs) for s in common.seeds(args, seeds)]
    results = {"n": int(x.shape[0]), "flip": FLIP, "sizes": SIZES, "epochs": epochs, "batch": BATCH, "lr": LR,
               "beta": BETA, "damping_fraction": DAMPING, "other_dampings": DAMPINGS, "at": AT, "seeds": seeds,
               "runs": runs, "summary": summary(runs), "verdicts": verdicts(runs)}
    return _finish(args, results, figure, describe)


def _finish(args, results: dict, draw, describe_) -> dict:
    """Draw the figure, write the JSON and print the conclusion of either part."""
    draw(args, results)
    save_json(args, results)
    conclude(args, describe_(results))
    return results


def figure(args, r: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    x = np.linspace(0, 100, GRID)
    for i, m in enumerate(METHODS):
        v = 100 * np.array([run["rankings"][m]["curve"] for run in r["runs"]])
        for ax in axes[:2]:
            ax.plot(x, v.mean(0), color=f"C{i}", label=m)
            ax.fill_between(x, v.min(0), v.max(0), color=f"C{i}", alpha=0.25)
    for ax, top in zip(axes[:2], (100, 100 * max(AT))):
        ax.plot([0, 100], [0, 100], "k:", lw=0.8, label="random, expected")
        ax.plot([0, 100 * r["flip"], 100], [0, 100, 100], "k--", lw=0.6, label="perfect")
        ax.set(xlim=(0, top), ylim=(0, 101), xlabel="training data inspected (%)",
               ylabel="flipped labels found (%)")
    axes[0].set_title(f"(a) {100 * r['flip']:g} % of the labels flipped; {r['seeds']} seeds (mean, range)")
    axes[1].set_title(f"(b) the first {100 * max(AT):g} % inspected")
    axes[0].legend(fontsize=8, loc="lower right")
    epochs = np.arange(1, r["epochs"] + 1)
    for key, label, color in (("flipped", "flipped examples", "C3"), ("clean", "clean examples", "C2")):
        v = 100 * np.array([[f[key] for f in run["fitted"]] for run in r["runs"]])
        axes[2].plot(epochs, v.mean(0), "o-", color=color, label=label)
        axes[2].fill_between(epochs, v.min(0), v.max(0), color=color, alpha=0.25)
    axes[2].set_xticks(epochs)
    axes[2].set(xlabel="epoch (the TracIn checkpoints)", ylabel="predicted as their training label (%)",
                title="(c) how far training fits the flipped labels", ylim=(0, 101))
    axes[2].legend(fontsize=8)
    save_figure(args, fig)


def describe(r: dict) -> str:
    s, v = r["summary"], r["verdicts"]
    parts = []
    for m in METHODS:
        found = ", ".join(f"{100 * s[m]['found ' + f'{p:g}']['mean'] / r['runs'][0]['flipped']:.1f} %"
                          for p in AT)
        parts.append(f"{m}: {found} found after {', '.join(f'{100 * p:g}' for p in AT)} % inspected, "
                     f"area {s[m]['area']['mean']:.3f}")
    claims = "; ".join(f"{k}: {w['verdict']} ({sum(w['per_seed'])} of {len(w['per_seed'])} seeds)"
                       for k, w in v.items())
    return "; ".join(parts) + f" (means over {r['seeds']} seeds). Claims: {claims}."


# ---------------------------------------------------------------------------------------------
# Part 2: the linear datamodeling score


class Setting(NamedTuple):
    """The sizes of part 2: ``N`` training images, ``T`` test points, ``M`` half-subsets, ``K`` retrainings
    per subset, full-batch Adam steps, TracIn checkpoints and CG iterations per solve."""

    train: int
    test: int
    subsets: int
    retrains: int
    steps: int
    checkpoints: int
    cg_iters: int


LDS = Setting(train=2000, test=100, subsets=50, retrains=3, steps=200, checkpoints=10, cg_iters=50)
LDS_QUICK = Setting(train=256, test=16, subsets=12, retrains=2, steps=40, checkpoints=4, cg_iters=10)
LDS_SIZES = (784, 32, 10)
LDS_LR, LDS_BETA = 1e-2, 1e-3
LDS_DAMPINGS = (0.01, 0.1, 1.0)
"""``λ`` over the mean eigenvalue for EK-FAC and KFAC (the sensitivity); CG and the verdicts use ``DAMPING``."""
LDS_METHODS = ("EK-FAC", "KFAC", "CG", "TracIn", "gradient dot products")
LITERATURE = {
    "source": "Deng et al., 'dattri: a library for efficient data attribution', NeurIPS 2024 Datasets and "
              "Benchmarks: the benchmark figure of its repository (TRAIS-Lab/dattri, "
              "assets/images/benchmark-result-mnist.png), bar heights measured against the axis ticks, to ±0.01; "
              "MNIST-10, 5,000 training and 500 test images, a 784-128-64-10 relu MLP (and a logistic regression, LR)",
    "MLP": {"CG": 0.26, "LiSSA": 0.14, "Arnoldi": 0.09, "TracIn": 0.15, "Grad-Dot": 0.10, "Grad-Cos": 0.12,
            "RPS-L2": 0.09, "TRAK-1": 0.11, "TRAK-10": 0.33, "TRAK-50": 0.45},
    "LR": {"explicit": 0.80, "CG": 0.80, "TracIn": 0.33, "Grad-Dot": 0.33},
}
"""The LDS that the literature reports for the closest setting found (see the README for what was not found)."""


def lds_schedule(steps: int):
    """Adam's rate: ``LDS_LR`` cosine-decayed to 0 over the ``steps`` (full-batch steps converge near the optimum
    that the influence functions linearize around)."""
    return fnn.schedules.cosine_decay(LDS_LR, steps)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def train_on(net, steps: int, every: int, x, y, idx, key):
    """Full-batch Adam on the rows ``idx`` of ``(x, y)`` alone, from the init of ``key``: ``steps`` steps on
    ``C_S = (1/|S|) Σ_{i∈S} ℓ_i + ½β Σ_l ‖W^l‖²``, ``β = LDS_BETA``. Returns the params after every ``every``
    steps, each leaf stacked on a leading axis ``(steps // every, …)``."""
    opt = fnn.optim.adam(lds_schedule(steps))
    xs, ys = x[idx], y[idx]
    params = net.init(key, x.dtype)

    def step(carry, _):
        params, state = carry
        _, grads = fnn.backprop(net, params, xs, ys, LOSS, LDS_BETA)
        return fnn.optim.step(opt, grads, state, params), None

    def segment(carry, _):
        carry, _ = lax.scan(step, carry, None, length=every)
        return carry, carry[0]

    return lax.scan(segment, (params, opt.init(params)), None, length=steps // every)[1]


def _at(stacked, i: int):
    return jax.tree.map(lambda leaf: leaf[i], stacked)


@functools.partial(jax.jit, static_argnums=(0, 1))
def retrained_losses(net, steps: int, x, y, xt, yt, subsets, keys) -> jax.Array:
    """``ℓ(z_t; θ_{S,k})`` ``(M, K, T)``: the test losses of the models trained (:func:`train_on`) on each subset
    ``S``, a row of ``subsets (M, |S|)``, from each init key ``k`` of ``keys (K, 2)``, all in one program: a
    ``vmap`` over the subsets of a ``vmap`` over the keys."""
    def one(idx, key):
        return _losses(net, _at(train_on(net, steps, steps, x, y, idx, key), 0), xt, yt)

    return jax.vmap(lambda idx: jax.vmap(lambda key: one(idx, key))(keys))(subsets)


def spearman(predicted, actual) -> np.ndarray:
    """Spearman's ρ between the columns of two ``(M, T)`` arrays: ``(T,)`` (ranks ``0 … M−1``, ties broken by
    position; continuous values have none)."""
    def centred_ranks(a):
        r = np.argsort(np.argsort(np.asarray(a, np.float64), axis=0, kind="stable"), axis=0).astype(np.float64)
        return r - r.mean(0)

    p, a = centred_ranks(predicted), centred_ranks(actual)
    return (p * a).sum(0) / np.sqrt((p * p).sum(0) * (a * a).sum(0))


def linear_datamodel(scores, subsets, n: int) -> np.ndarray:
    """The predictions ``Σ_{i∈S} τ(t, i)`` ``(M, T)`` of the scores ``τ (T, N)`` for every subset, a row of
    ``subsets (M, |S|)`` (TRAK's linear datamodel, Park et al. 2023, §2)."""
    masks = np.zeros((len(subsets), n))
    np.put_along_axis(masks, np.asarray(subsets), 1.0, axis=1)
    return masks @ np.asarray(scores, np.float64).T


def attribution_scores(net, trajectory: list, rates, train, test, setting: Setting, mean: float) -> dict:
    """``{name: τ (T, N)}``, every score oriented as a rise of the test loss when the training example is kept:
    influence (Koh & Liang's sign) as it is, TracIn and gradient dot products (positive = helpful) negated.
    EK-FAC and KFAC at every ``LDS_DAMPINGS`` fraction (keys ``(name, fraction)``), CG at ``DAMPING``."""
    final = trajectory[-1]
    out = {}
    for method, name in (("ekfac", "EK-FAC"), ("kfac", "KFAC")):
        for f in LDS_DAMPINGS:
            pre = influence.preconditioner(net, final, train, LOSS, method=method, damping=f * mean, l2=LDS_BETA)
            out[name, f] = influence.influence(pre, test)
    pre = influence.preconditioner(net, final, train, LOSS, method="cg", damping=DAMPING * mean, l2=LDS_BETA,
                                   cg_iters=setting.cg_iters)
    out["CG"] = influence.influence(pre, test)
    out["TracIn"] = -influence.tracin(net, trajectory, rates, train, test, LOSS)
    out["gradient dot products"] = -influence.gradient_inner_products(net, final, test, train, LOSS)
    return out


def lds_per_seed(net, x_pool, y_pool, xt_pool, yt_pool, seed: int, setting: Setting) -> dict:
    """One seed: draw the images and the subsets, train on all of them (the scores) and on every subset from every
    init (the outcomes), and the LDS of every method per test point."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(y_pool), setting.train, replace=False))
    cols = np.sort(rng.choice(len(yt_pool), setting.test, replace=False))
    x, y, xt, yt = x_pool[rows], y_pool[rows], xt_pool[cols], yt_pool[cols]
    subsets = np.stack([np.sort(rng.choice(setting.train, setting.train // 2, replace=False))
                        for _ in range(setting.subsets)])
    full_key, *keys = jax.random.split(jax.random.PRNGKey(seed), setting.retrains + 1)
    every = setting.steps // setting.checkpoints
    stacked = train_on(net, setting.steps, every, x, y, jnp.arange(setting.train), full_key)
    trajectory = [_at(stacked, t) for t in range(setting.checkpoints)]
    final = trajectory[-1]
    rates = np.asarray(lds_schedule(setting.steps)(every * np.arange(1, setting.checkpoints + 1) - 1), np.float64)
    mean = mean_eigenvalue(net, final, x, y, LDS_BETA)
    scores = attribution_scores(net, trajectory, rates, (x, y), (xt, yt), setting, mean)
    losses = np.asarray(retrained_losses(net, setting.steps, x, y, xt, yt, jnp.asarray(subsets), jnp.stack(keys)))
    actual = losses.mean(1)
    lds = {k: spearman(linear_datamodel(s, subsets, setting.train), actual) for k, s in scores.items()}
    pairs = [(a, b) for a in range(setting.retrains) for b in range(a + 1, setting.retrains)]
    cost, grads = fnn.backprop(net, final, x, y, LOSS, LDS_BETA)
    held = np.asarray(jnp.argmax(net.apply(final, xt_pool), -1) == yt_pool)
    example = int(np.argsort(lds["EK-FAC", DAMPING])[setting.test // 2])  # the test point of median EK-FAC LDS
    return {"seed": seed, "mean_eigenvalue": mean, "damping": DAMPING * mean, "learning_rates": rates,
            "final_cost": float(cost), "gradient_norm": float(fnn.optim.global_norm(grads)),
            "held_out_accuracy": float(held.mean()), "subset_test_loss": float(actual.mean()),
            "full_test_loss": float(np.mean(per_example_loss(net, final, xt, yt))),
            "lds": {m: lds[(m, DAMPING) if (m, DAMPING) in lds else m] for m in LDS_METHODS},
            "damping_lds": {m: {f"{f:g}": float(np.mean(lds[m, f])) for f in LDS_DAMPINGS} for m in ("EK-FAC", "KFAC")},
            "retrain_agreement": np.mean([spearman(losses[:, a], losses[:, b]) for a, b in pairs], axis=0),
            "example": {"test_point": int(cols[example]), "actual": actual[:, example],
                        "predicted": linear_datamodel(scores["EK-FAC", DAMPING][example:example + 1], subsets,
                                                      setting.train)[:, 0]}}


def spread(values) -> dict:
    """Mean, standard error of the mean, and quartiles of per-test-point values."""
    v = np.asarray(values, np.float64)
    q25, median, q75 = np.percentile(v, [25, 50, 75])
    return {"mean": float(v.mean()), "sem": float(v.std(ddof=1) / np.sqrt(len(v))), "q25": float(q25),
            "median": float(median), "q75": float(q75)}


def lds_verdicts(runs: list) -> dict:
    """Per seed, from the mean LDS over the test points: every method's more than two standard errors above 0;
    each influence function's, and TracIn's, at least the gradient dot products'; EK-FAC's at least TracIn's and
    at least KFAC's; CG's at least EK-FAC's. Then over the seeds, as :func:`verdicts`."""
    stats = [{m: spread(r["lds"][m]) for m in LDS_METHODS} for r in runs]
    out = {}
    for m in LDS_METHODS:
        hits = [s[m]["mean"] > 2 * s[m]["sem"] for s in stats]
        out[f"{m} above 0"] = {"per_seed": hits, "verdict": _word(hits)}
    for first, second in (("EK-FAC", "gradient dot products"), ("KFAC", "gradient dot products"),
                          ("CG", "gradient dot products"), ("TracIn", "gradient dot products"),
                          ("EK-FAC", "TracIn"), ("EK-FAC", "KFAC"), ("CG", "EK-FAC")):
        hits = [s[first]["mean"] >= s[second]["mean"] for s in stats]
        out[f"{first} at least {second}"] = {"per_seed": hits, "verdict": _word(hits)}
    return out


def lds_summary(runs: list) -> dict:
    """Per method: each seed's :func:`spread` over the test points, and the mean, min and max of the seeds' means."""
    out = {}
    for m in LDS_METHODS:
        per_seed = [spread(r["lds"][m]) for r in runs]
        means = [s["mean"] for s in per_seed]
        out[m] = {"per_seed": per_seed, "mean": float(np.mean(means)), "min": float(np.min(means)),
                  "max": float(np.max(means))}
    agreement = [float(np.mean(r["retrain_agreement"])) for r in runs]
    out["retrain agreement"] = {"mean": float(np.mean(agreement)), "min": min(agreement), "max": max(agreement)}
    return out


def main_lds(argv=None) -> dict:
    """Part 2 (``--lds``): the LDS of every method, per seed, and the verdicts."""
    args = parse_args("influence_lds", __doc__.splitlines()[0], argv, _extra)
    x, y, xt, yt, _ = common.mnist_10k(args, 8000)
    setting = LDS_QUICK if args.quick else LDS
    seeds = min(args.seeds, QUICK["seeds"]) if args.quick else args.seeds
    net = fnn.MLP(LDS_SIZES, "relu", "identity")
    runs = [lds_per_seed(net, x, y, xt, yt, s, setting) for s in common.seeds(args, seeds)]
    results = {"setting": setting._asdict(), "sizes": LDS_SIZES, "lr": LDS_LR, "beta": LDS_BETA,
               "damping_fraction": DAMPING, "dampings": LDS_DAMPINGS, "methods": LDS_METHODS, "seeds": seeds,
               "runs": runs, "summary": lds_summary(runs), "verdicts": lds_verdicts(runs), "literature": LITERATURE}
    return _finish(args, results, lds_figure, lds_describe)


def lds_figure(args, r: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    runs, seeds = r["runs"], len(r["runs"])
    width = 0.8 / seeds
    for j, run in enumerate(runs):
        pos = np.arange(len(LDS_METHODS)) - 0.4 + width * (j + 0.5)
        axes[0].boxplot([run["lds"][m] for m in LDS_METHODS], positions=pos, widths=width * 0.9, whis=(5, 95),
                        showfliers=False, patch_artist=True, boxprops={"facecolor": f"C{j}", "alpha": 0.5},
                        medianprops={"color": "k"})
        axes[0].plot(pos, [np.mean(run["lds"][m]) for m in LDS_METHODS], "o", color=f"C{j}", ms=4,
                     label=f"seed {run['seed']} (mean: dot)")
    lit = r["literature"]["MLP"]
    for i, name in ((2, "CG"), (3, "TracIn"), (4, "Grad-Dot")):
        axes[0].plot([i - 0.45, i + 0.45], [lit[name]] * 2, "k--", lw=1,
                     label="dattri, MNIST MLP (Deng et al. 2024)" if i == 2 else None)
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set_xticks(range(len(LDS_METHODS)), [m.replace(" products", "\nproducts") for m in LDS_METHODS])
    axes[0].set_ylabel("LDS: Spearman ρ over the subsets")
    axes[0].set_title(f"(a) the LDS of each of the {r['setting']['test']} test points, per seed (box: quartiles, "
                      "whiskers: 5–95 %)", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper right")
    ex = runs[0]["example"]
    axes[1].scatter(ex["predicted"], ex["actual"], s=12)
    rho = spearman(np.asarray(ex["predicted"])[:, None], np.asarray(ex["actual"])[:, None])[0]
    axes[1].set_yscale("log")
    axes[1].set(xlabel="EK-FAC's prediction Σ_{i∈S} I(z_t, z_i), one dot per subset S",
                ylabel="test loss after training on S (mean of the retrainings)")
    axes[1].set_title(f"(b) held-out image {ex['test_point']}, seed {runs[0]['seed']} (median EK-FAC LDS): "
                      f"ρ = {rho:.2f}", fontsize=9)
    fractions = [float(f) for f in runs[0]["damping_lds"]["EK-FAC"]]
    for i, m in enumerate(("EK-FAC", "KFAC")):
        v = np.array([[run["damping_lds"][m][f"{f:g}"] for f in fractions] for run in runs])
        axes[2].plot(fractions, v.mean(0), "o-", color=f"C{i + 3}", label=m)
        axes[2].fill_between(fractions, v.min(0), v.max(0), color=f"C{i + 3}", alpha=0.25)
    cg = [np.mean(run["lds"]["CG"]) for run in runs]
    axes[2].errorbar([r["damping_fraction"]], [np.mean(cg)], yerr=[[np.mean(cg) - min(cg)], [max(cg) - np.mean(cg)]],
                     fmt="s", color="C5", label="CG")
    axes[2].set_xscale("log")
    axes[2].set(xlabel="λ / mean eigenvalue of the Gauss-Newton matrix", ylabel="mean LDS over the test points")
    axes[2].set_title(f"(c) the damping ({seeds} seeds: mean and range)", fontsize=9)
    axes[2].legend(fontsize=8)
    save_figure(args, fig)


def lds_describe(r: dict) -> str:
    s, v = r["summary"], r["verdicts"]
    parts = [f"{m}: {s[m]['mean']:.3f} [{s[m]['min']:.3f}–{s[m]['max']:.3f}]" for m in LDS_METHODS]
    claims = "; ".join(f"{k}: {w['verdict']} ({sum(w['per_seed'])} of {len(w['per_seed'])} seeds)"
                       for k, w in v.items())
    return (f"mean LDS over the test points, mean [min–max] over {r['seeds']} seeds: " + "; ".join(parts)
            + f". Two retrainings agree to ρ = {s['retrain agreement']['mean']:.3f}. Claims: {claims}.")


if __name__ == "__main__":
    main()
