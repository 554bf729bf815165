"""The Laplace approximation on MNIST: does the evidence choose β, and does the posterior calibrate?

Claims checked:

(a) MacKay ("A practical Bayesian framework for backpropagation networks", Neural Computation 1992)
    and Immer et al. ("Scalable marginal likelihood estimation for model selection in deep learning",
    ICML 2021): the Laplace evidence ``log p(D | β)`` chooses the L2 coefficient without a held-out
    set; its argmax over β lands near the β whose MAP predicts held-out data best.
(b) Daxberger et al. ("Laplace Redux — effortless Bayesian deep learning", NeurIPS 2021): a post-hoc
    Laplace posterior, with the prior precision chosen by the evidence and the probit approximation of
    the linearized predictive, keeps the MAP's accuracy, and lowers its confidence where it should:
    on inputs unlike the training data more than on held-out digits.

Setting: ``mnist-10k`` (8,000 training images, the last 2,000 held out; z-scored by training-split
statistics), a ``784-128-10`` relu network, softmax cross-entropy on the logits,
``C = (1/N) Σ ℓ + ½β Σ_l ‖W^l‖²``, Adam (``α = 10⁻³`` cosine-decayed to 0 over ``EPOCHS`` epochs,
``B = 128``), so that training ends near a mode. Every seed initializes once and trains at every β from
the same parameters and batch order.

(a) For every β of ``BETAS`` (half-decades): the MAP ``θ*_β``; its evidence under the ``"kron"``
posterior (exact KFLR factors) and the ``"diag"`` posterior (exact GGN diagonal) with ``δ = Nβ``
(:func:`fnn.laplace.log_marginal_likelihood`, per training image); the held-out log-likelihood per
image and accuracy of the MAP. Per seed: the grid's argmax of the evidence against the argmax of the
held-out log-likelihood, their distance in grid steps, and the held-out log-likelihood given up by
choosing β by the evidence.

(b) For the MAP at ``CALIBRATION_BETA``: the posteriors ``"last_layer"``, ``"kron"`` and ``"diag"``,
each with its prior precision re-optimized by the evidence (:func:`fnn.laplace.optimize_prior_precision`,
MacKay's fixed point, one δ), and the probit predictive (:func:`fnn.laplace.predict`). On the held-out
digits, the same digits rotated by 30°, 60° and 90° (bilinear, about the centre; labels kept) and
pixel-permuted (one fixed permutation of the 784 pixels; no label means anything): NLL, ECE
(``BINS`` equal-width bins, :func:`fnn.metrics.calibration`), accuracy, mean confidence; and the AUROC
of the confidence separating held-out from permuted digits (Mann–Whitney). Laplace Redux's MNIST
figures, for the comparison of direction and size, are in ``LAPLACE_REDUX``.

Verdicts, computed: (a) "holds" where the evidence's argmax is within one grid step of the held-out
argmax in every seed, "does not hold" where it is two or more steps away in every seed, "undecided"
where an argmax lies at an end of the grid (it may lie beyond), else "mixed"; (b) per structure,
whether accuracy moves by less than ``ACCURACY_SLACK`` in every seed, and
whether the confidence falls on permuted digits by more than on held-out ones in every seed.
"""

from __future__ import annotations

import common  # first: puts the repository on sys.path
from common import conclude, parse_args, pyplot, save_figure, save_json

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

import fnn
from fnn import laplace, metrics

SIZES = (784, 128, 10)
BETAS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
CALIBRATION_BETA = 1e-4
EPOCHS, BATCH, LR = 30, 128, 1e-3
BINS = 15
ANGLES = (30, 60, 90)
STRUCTURES = ("last_layer", "kron", "diag")
ACCURACY_SLACK = 0.005
QUICK = {"rows": 1024, "epochs": 2, "betas": (1e-4, 1e-3), "held_out": 256}
LAPLACE_REDUX = {"source": "Daxberger et al. 2021, Table 1 (MNIST; OOD sets EMNIST, FashionMNIST, KMNIST)",
                 "confidence": {"MAP": 75.0, "LA": 67.5, "LA*": 56.1},
                 "auroc": {"MAP": 96.5, "LA": 96.2, "LA*": 96.4}}
"""Laplace Redux's MNIST out-of-distribution figures (%, mean over its OOD sets): LA is the last layer with
KFAC factors of the GGN, LA* the last layer with the full empirical Fisher, both with the prior precision
from the evidence and the probit predictive, on a LeNet."""


def _extra(p):
    p.add_argument("--seeds", type=int, default=3)


def train(net, params, x, y, beta: float, seed: int, epochs: int):
    """The MAP at ``β``: Adam, cosine-decayed, from ``params`` with the batch order of ``seed``."""
    steps = epochs * -(-x.shape[0] // BATCH)
    opt = fnn.optim.adam(fnn.schedules.cosine_decay(LR, steps))
    result = fnn.fit(net, params, opt, (x, y), loss=fnn.losses.softmax_cross_entropy, epochs=epochs,
                     batch_size=BATCH, key=jax.random.PRNGKey(seed + 1), l2=beta, quiet=True)
    if result.stopped:
        raise RuntimeError(result.stopped)
    return result.params


def held_out_fit(net, params, x, y) -> dict:
    """The MAP's held-out log-likelihood per image and accuracy."""
    logp = jax.nn.log_softmax(net.apply(params, x))
    return {"log_likelihood": float(jnp.mean(logp[jnp.arange(len(y)), y])),
            "accuracy": float(jnp.mean(jnp.argmax(logp, -1) == y))}


def evidence_row(net, params, x, y, beta: float) -> dict:
    """``log p(D | β) / N`` under the kron and diag posteriors at ``δ = Nβ``."""
    n = x.shape[0]
    out = {}
    for structure in ("kron", "diag"):
        post = laplace.fit_laplace(net, params, (x, y), "softmax_cross_entropy", structure=structure, l2=beta)
        out[structure] = float(laplace.log_marginal_likelihood(post)) / n
    return out


def rotate(raw: np.ndarray, angle: float) -> np.ndarray:
    """Images ``(M, 784)`` in [0, 1] rotated by ``angle`` degrees about their centre (bilinear, zero fill)."""
    img = raw.reshape(-1, 28, 28)
    return ndimage.rotate(img, angle, axes=(2, 1), reshape=False, order=1, mode="constant").reshape(-1, 784)


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(confidence on a held-out digit > confidence on an outside one), ties counted half."""
    scores = np.concatenate([inside, outside])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # ranks before each distinct value
    ranks = (first + (counts + 1) / 2)[inverse]  # mean rank of the tied group, ranks from 1
    m = len(inside)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * len(outside)))


def evaluation_sets(raw, normalizer, held_out: int, seed: int) -> dict:
    """``{name: (x, y or None)}``: held-out digits, rotated ones and pixel-permuted ones."""
    base = np.asarray(raw.x_test[:held_out], np.float32)
    labels = np.asarray(raw.y_test[:held_out])
    perm = np.random.default_rng(seed).permutation(784)
    sets = {"held-out": (base, labels)}
    sets.update({f"rotated {a}°": (rotate(base, a), labels) for a in ANGLES})
    sets["permuted"] = (base[:, perm], None)
    return {k: (jnp.asarray(fnn.data.zscore(normalizer, x), jnp.float32), y) for k, (x, y) in sets.items()}


def calibration_rows(net, params, x, y, sets: dict, beta: float) -> dict:
    """MAP and each structure's Laplace predictive on every evaluation set."""
    probs = {"MAP": {k: jax.nn.softmax(net.apply(params, v[0])) for k, v in sets.items()}}
    chosen = {}
    for structure in STRUCTURES:
        post = laplace.fit_laplace(net, params, (x, y), "softmax_cross_entropy", structure=structure, l2=beta)
        fitted = laplace.optimize_prior_precision(post)
        chosen[structure] = {"prior_precision": float(fitted.posterior.prior_precision[0]),
                             "beta": float(fitted.posterior.prior_precision[0]) / x.shape[0],
                             "iterations": fitted.iterations, "converged": fitted.converged}
        probs[structure] = {k: laplace.predict(fitted.posterior, v[0]) for k, v in sets.items()}
    rows = {}
    for method, by_set in probs.items():
        row = {}
        for name, p in by_set.items():
            labels = sets[name][1]
            p = np.array(p, np.float64)  # a copy: normalized in place below
            p /= p.sum(1, keepdims=True)
            row[name] = (metrics.calibration(p, labels, bins=BINS) if labels is not None
                         else {"confidence": float(p.max(1).mean())})
        conf_in = np.asarray(by_set["held-out"]).max(1)
        row["permuted"]["auroc"] = auroc(conf_in, np.asarray(by_set["permuted"]).max(1))
        rows[method] = row
    return {"rows": rows, "prior": chosen}


def per_seed(net, x, y, xt, yt, sets, seed: int, betas, epochs: int) -> dict:
    init = net.init(jax.random.PRNGKey(seed), jnp.float32)
    grid, maps = [], {}
    for beta in betas:
        params = train(net, init, x, y, beta, seed, epochs)
        maps[beta] = params
        grid.append({"beta": beta, "evidence": evidence_row(net, params, x, y, beta),
                     "held_out": held_out_fit(net, params, xt, yt)})
    ev = [g["evidence"]["kron"] for g in grid]
    ll = [g["held_out"]["log_likelihood"] for g in grid]
    i_ev, i_ll = int(np.argmax(ev)), int(np.argmax(ll))
    calibration_beta = CALIBRATION_BETA if CALIBRATION_BETA in maps else betas[0]
    return {"seed": seed, "grid": grid, "evidence_argmax": betas[i_ev], "held_out_argmax": betas[i_ll],
            "steps_apart": abs(i_ev - i_ll), "log_likelihood_given_up": ll[i_ll] - ll[i_ev],
            "diag_evidence_argmax": betas[int(np.argmax([g["evidence"]["diag"] for g in grid]))],
            "calibration": calibration_rows(net, maps[calibration_beta], x, y, sets, calibration_beta)}


def verdicts(runs: list) -> dict:
    apart = [r["steps_apart"] for r in runs]
    ends = {runs[0]["grid"][0]["beta"], runs[0]["grid"][-1]["beta"]}
    if any(r["evidence_argmax"] in ends or r["held_out_argmax"] in ends for r in runs):
        evidence = "undecided (an argmax at the grid's end)"
    else:
        evidence = "holds" if max(apart) <= 1 else "does not hold" if min(apart) >= 2 else "mixed"
    out = {"evidence": evidence}
    for s in STRUCTURES:
        acc = [r["calibration"]["rows"][s]["held-out"]["accuracy"]
               - r["calibration"]["rows"]["MAP"]["held-out"]["accuracy"] for r in runs]
        drop = [{k: r["calibration"]["rows"]["MAP"][k]["confidence"] - r["calibration"]["rows"][s][k]["confidence"]
                 for k in r["calibration"]["rows"]["MAP"]} for r in runs]
        out[s] = {"accuracy_kept": bool(max(abs(a) for a in acc) < ACCURACY_SLACK),
                  "more_doubt_outside": bool(all(d["permuted"] > d["held-out"] for d in drop)),
                  "nll_lower": bool(all(r["calibration"]["rows"][s]["held-out"]["nll"]
                                        < r["calibration"]["rows"]["MAP"]["held-out"]["nll"] for r in runs)),
                  "ece_lower": bool(all(r["calibration"]["rows"][s]["held-out"]["ece"]
                                        < r["calibration"]["rows"]["MAP"]["held-out"]["ece"] for r in runs))}
    return out


def summary(runs: list) -> dict:
    """Mean and range over the seeds of every (method, set, metric) of (b)."""
    first = runs[0]["calibration"]["rows"]
    out = {}
    for method, by_set in first.items():
        out[method] = {}
        for name, values in by_set.items():
            out[method][name] = {}
            for metric in values:
                if metric == "bins":
                    continue
                v = np.array([r["calibration"]["rows"][method][name][metric] for r in runs])
                out[method][name][metric] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
    return out


def main(argv=None) -> dict:
    args = parse_args("laplace", __doc__.splitlines()[0], argv, _extra)
    raw = fnn.data.load_dataset("mnist-10k", args.data_dir)
    data, normalizer = fnn.data.zscore_dataset(raw)
    x, y = jnp.asarray(data.x_train, jnp.float32), jnp.asarray(data.y_train)
    xt, yt = jnp.asarray(data.x_test, jnp.float32), jnp.asarray(data.y_test)
    betas, epochs, held = BETAS, EPOCHS, len(yt)
    if args.quick:
        x, y = x[:QUICK["rows"]], y[:QUICK["rows"]]
        betas, epochs, held = QUICK["betas"], QUICK["epochs"], QUICK["held_out"]
        xt, yt = xt[:held], yt[:held]
    sets = evaluation_sets(raw, normalizer, held, args.seed)
    net = fnn.MLP(SIZES, "relu", "identity")
    seeds = 1 if args.quick else args.seeds
    runs = [per_seed(net, x, y, xt, yt, sets, s, betas, epochs) for s in common.seeds(args, seeds)]
    results = {"n": int(x.shape[0]), "held_out": held, "sizes": SIZES, "betas": betas, "epochs": epochs,
               "batch": BATCH, "lr": LR, "bins": BINS, "calibration_beta": CALIBRATION_BETA, "seeds": seeds,
               "runs": runs, "summary": summary(runs), "verdicts": verdicts(runs), "paper": LAPLACE_REDUX}
    figure(args, results)
    save_json(args, results)
    conclude(args, describe(results))
    return results


def figure(args, r: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    betas = np.array(r["betas"])
    for key, label, color in (("kron", "evidence / N, kron", "C0"), ("diag", "evidence / N, diag", "C1")):
        v = np.array([[g["evidence"][key] for g in run["grid"]] for run in r["runs"]])
        axes[0].plot(betas, v.mean(0), "o-", color=color, label=label)
        axes[0].fill_between(betas, v.min(0), v.max(0), color=color, alpha=0.2)
    ll = np.array([[g["held_out"]["log_likelihood"] for g in run["grid"]] for run in r["runs"]])
    twin = axes[0].twinx()
    twin.plot(betas, ll.mean(0), "s--", color="C2", label="held-out log-likelihood / image (MAP)")
    twin.fill_between(betas, ll.min(0), ll.max(0), color="C2", alpha=0.2)
    axes[0].set(xscale="log", xlabel="β (L2 of training; δ = Nβ)", ylabel="log evidence per training image",
                title=f"(a) evidence against β, {r['seeds']} seeds (mean, range)")
    twin.set_ylabel("held-out log-likelihood per image")
    lines = axes[0].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axes[0].legend(lines, [h.get_label() for h in lines], fontsize=7, loc="lower center")
    acc = np.array([[g["held_out"]["accuracy"] for g in run["grid"]] for run in r["runs"]])
    axes[1].plot(betas, 100 * acc.mean(0), "o-", color="C3")
    axes[1].fill_between(betas, 100 * acc.min(0), 100 * acc.max(0), color="C3", alpha=0.2)
    for run in r["runs"]:
        axes[1].axvline(run["evidence_argmax"], color="C0", alpha=0.4, ls=":")
    axes[1].set(xscale="log", xlabel="β", ylabel="held-out accuracy of the MAP (%)",
                title="(a) accuracy; dotted: each seed's evidence argmax (kron)")
    s = r["summary"]
    names = list(s["MAP"])
    width = 0.8 / len(s)
    for i, method in enumerate(s):
        conf = [100 * s[method][k]["confidence"]["mean"] for k in names]
        axes[2].bar(np.arange(len(names)) + i * width, conf, width, label=method if method == "MAP" else f"LA {method}")
    axes[2].set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, fontsize=8)
    axes[2].set(ylabel="mean confidence (%)", title=f"(b) confidence, MAP at β = {r['calibration_beta']:g}")
    axes[2].legend(fontsize=7)
    save_figure(args, fig)


def describe(r: dict) -> str:
    v, s = r["verdicts"], r["summary"]
    runs = ", ".join(f"{run['evidence_argmax']:g} vs {run['held_out_argmax']:g} ({run['steps_apart']} steps, "
                     f"{run['log_likelihood_given_up']:.4f} nats/image given up)" for run in r["runs"])
    parts = [f"(a) the evidence's argmax (kron) against the held-out argmax: {runs}: the claim {v['evidence']}"]
    m = s["MAP"]
    for name in STRUCTURES:
        la, doubt = s[name], "more" if v[name]["more_doubt_outside"] else "not more"
        parts.append(
            f"(b) {name}: held-out NLL {m['held-out']['nll']['mean']:.4f} → {la['held-out']['nll']['mean']:.4f}, "
            f"ECE {m['held-out']['ece']['mean']:.4f} → {la['held-out']['ece']['mean']:.4f}, accuracy "
            f"{'kept' if v[name]['accuracy_kept'] else 'not kept'}; confidence on permuted digits "
            f"{m['permuted']['confidence']['mean']:.3f} → {la['permuted']['confidence']['mean']:.3f}, on held-out "
            f"{m['held-out']['confidence']['mean']:.3f} → {la['held-out']['confidence']['mean']:.3f} "
            f"({doubt} doubt outside in every seed)")
    p, out, last = r["paper"], m["permuted"], s["last_layer"]["permuted"]
    parts.append(
        f"Laplace Redux (Table 1): confidence outside {p['confidence']['MAP']:.1f} % → "
        f"{p['confidence']['LA']:.1f} % (LA), {p['confidence']['LA*']:.1f} % (LA*), AUROC {p['auroc']['MAP']:.1f} → "
        f"{p['auroc']['LA']:.1f} ({p['auroc']['LA*']:.1f}); here, last layer on permuted digits: "
        f"{100 * out['confidence']['mean']:.1f} % → {100 * last['confidence']['mean']:.1f} %, AUROC "
        f"{100 * out['auroc']['mean']:.1f} → {100 * last['auroc']['mean']:.1f}")
    return "; ".join(parts) + "."


if __name__ == "__main__":
    main()
