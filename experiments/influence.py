"""Mislabel detection on MNIST: does self-influence find flipped labels faster than random, and than the loss?

Claims checked:

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
"""

from __future__ import annotations

import common  # first: puts the repository on sys.path
from common import conclude, parse_args, pyplot, save_figure, save_json

# isort: split
import jax
import jax.numpy as jnp
import numpy as np

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
    logp = jax.nn.log_softmax(net.apply(params, x))
    return np.asarray(-logp[jnp.arange(len(y)), y])


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


def ekfac_scores(net, params, x, y, fractions) -> tuple[dict, float]:
    """``{fraction: self-influence (N,)}`` with ``λ = fraction × mean eigenvalue``, and that mean."""
    probe = influence.preconditioner(net, params, (x, y), LOSS, method="ekfac", damping=1e-12, l2=BETA)
    mean = float(np.mean(np.concatenate([np.ravel(lam) for _, _, lam in probe.layers]))) - BETA - 1e-12
    out = {}
    for f in fractions:
        pre = influence.preconditioner(net, params, (x, y), LOSS, method="ekfac", damping=f * mean, l2=BETA)
        out[f] = influence.self_influence(pre)
    return out, mean


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
    args = parse_args("influence", __doc__.splitlines()[0], argv, _extra)
    x, y, xt, yt, _ = common.mnist_10k(args, QUICK["rows"])
    epochs = QUICK["epochs"] if args.quick else EPOCHS
    seeds = min(args.seeds, QUICK["seeds"]) if args.quick else args.seeds
    net = fnn.MLP(SIZES, "relu", "identity")
    runs = [per_seed(net, x, y, xt, yt, s, epochs) for s in common.seeds(args, seeds)]
    results = {"n": int(x.shape[0]), "flip": FLIP, "sizes": SIZES, "epochs": epochs, "batch": BATCH, "lr": LR,
               "beta": BETA, "damping_fraction": DAMPING, "other_dampings": DAMPINGS, "at": AT, "seeds": seeds,
               "runs": runs, "summary": summary(runs), "verdicts": verdicts(runs)}
    figure(args, results)
    save_json(args, results)
    conclude(args, describe(results))
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


if __name__ == "__main__":
    main()
