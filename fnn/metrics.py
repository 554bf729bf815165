"""What training reports: held-out cost and accuracy (in chunks), and each epoch's history entry."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fnn import distributed
from fnn.epoch import summarize
from fnn.losses import BINARY, CLASSES, Loss, check_output
from fnn.mlp import MLP, Params, State


def predictions_accuracy(net: MLP, loss: Loss, output: jax.Array, y: jax.Array) -> jax.Array | None:
    """Fraction of correct predictions, or ``None`` for regression losses.

    Classes: ``argmax`` of the output against the label (or the one-hot row's argmax). Binary: the
    output thresholded at 0 (logits, identity output) or 0.5 (probabilities).
    """
    if loss.targets == CLASSES:
        labels = y if jnp.issubdtype(y.dtype, jnp.integer) else jnp.argmax(y, axis=-1)
        return jnp.mean(jnp.argmax(output, axis=-1) == labels)
    if loss.targets == BINARY:
        threshold = 0.0 if net.output == "identity" else 0.5
        target, _ = loss.target(output, y)
        return jnp.mean((output > threshold) == (target > 0.5))
    return None


def evaluate(net: MLP, params: Params, x: jax.Array, y: jax.Array, loss: Loss, batch_size: int = 4096,
             state: State | None = None) -> dict:
    """Held-out cost and accuracy (``None`` for regression), computed in chunks of ``batch_size``.

    Batch-normalized networks are evaluated in eval mode, with the running statistics ``state``.
    """
    loss = check_output(loss, net.output)
    fn = _evaluate_fn(net, loss)
    totals, count = None, 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        cost, acc = distributed.to_host(fn(params, state, xb, yb))
        weight = xb.shape[0]
        part = (float(cost) * weight, None if acc is None else float(acc) * weight)
        totals = part if totals is None else (totals[0] + part[0], None if acc is None else totals[1] + part[1])
        count += weight
    return {"loss": totals[0] / count, "accuracy": None if totals[1] is None else totals[1] / count}


_EVAL_CACHE: dict = {}


def _evaluate_fn(net, loss):
    if (net, loss) not in _EVAL_CACHE:
        def fn(params, state, x, y):
            out = net.apply(params, x, state)
            return loss(out, y), predictions_accuracy(net, loss, out, y)
        _EVAL_CACHE[(net, loss)] = jax.jit(fn)
    return _EVAL_CACHE[(net, loss)]


def epoch_record(epoch: int, stats, *, seconds: float, samples: int, observers=()) -> dict:
    """The history entry of one epoch from its :class:`fnn.epoch.EpochStats` (on the host): ``train_loss``, the
    mean cost weighted by batch size over the steps before any failure (skipped steps have no cost),
    ``samples_per_s``, ``seconds``, and the ``observers``' entries over those steps
    (:func:`fnn.epoch.summarize`; ``grad_norm``, the mean gradient norm, for :data:`fnn.epoch.GRAD_NORM`)."""
    bad = int(stats.first_bad_step)
    good = slice(None) if bad < 0 else slice(0, bad)
    kept = np.isfinite(stats.cost[good])  # with skip_nonfinite, skipped steps have no cost to average
    sizes = stats.batch_size[good][kept]
    record = {"epoch": epoch, "train_loss": _weighted_mean(stats.cost[good][kept], sizes),
              "samples_per_s": samples / seconds, "seconds": seconds}
    record.update(summarize(observers, jax.tree.map(lambda a: a[good][kept], stats.observed)))
    return record


def _weighted_mean(values, weights) -> float:
    weights = np.asarray(weights, np.float64)
    return float(np.sum(np.asarray(values, np.float64) * weights) / weights.sum()) if weights.size else math.nan


def format_epoch(record: dict, epochs: int) -> str:
    """One progress line: epoch, train loss, held-out loss and accuracy, ε spent (private runs), samples/s,
    elapsed."""
    parts = [f"epoch {record['epoch']:>3}/{epochs}", f"train loss {record['train_loss']:.4f}"]
    if "held_out_loss" in record:
        parts.append(f"held-out loss {record['held_out_loss']:.4f}")
        if record["held_out_accuracy"] is not None:
            parts.append(f"acc {100 * record['held_out_accuracy']:.2f}%")
    if "epsilon" in record:
        parts.append(f"ε {record['epsilon']:.3g}")
    parts += [f"{record['samples_per_s']:,.0f} samples/s", f"{record['elapsed']:.1f}s"]
    return "  ".join(parts)


def calibration(probs, labels, *, bins: int = 15) -> dict:
    """How well predicted probabilities match outcomes, on the host in float64.

    ``probs (M, K)``: class probabilities (rows summing to 1, ``K ≥ 2``), or ``(M, 1)``/``(M,)`` for the
    positive class of a binary task; ``labels (M,)``: integer classes (``0/1`` for a binary task). With
    the confidence ``c_m = max_k p_mk`` and the prediction ``argmax_k p_mk``:

    - ``nll``: ``−(1/M) Σ_m log p_{m, y_m}`` (probabilities clipped at 10⁻³⁰⁰, so a confident mistake
      costs at most ≈ 690);
    - ``ece``: the expected calibration error over ``bins`` equal-width confidence bins
      ``((b−1)/B, b/B]``, ``Σ_b (|S_b|/M) |acc(S_b) − conf(S_b)|`` (Naeini et al., AAAI 2015; Guo et al.,
      "On calibration of modern neural networks", ICML 2017);
    - ``accuracy`` and ``confidence``, the mean of ``c_m``;
    - ``bins``, the bin count the ECE used.
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels)
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must be (M, K) class probabilities with M > 0; got shape {p.shape}.")
    if p.shape[1] == 1:
        p = np.concatenate([1 - p, p], axis=1)
    m, k = p.shape
    if y.shape != (m,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be ({m},) integers, one class per row of probs; got {y.dtype}{list(y.shape)}.")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in 0..{k - 1}; got {y.min()}..{y.max()}.")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or not np.allclose(p.sum(axis=1), 1, atol=1e-4):
        raise ValueError("probs must be finite, ≥ 0 and sum to 1 over each row (pass probabilities, not logits).")
    bins = int(bins)
    if bins < 1:
        raise ValueError(f"bins must be a positive integer; got {bins}.")
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    nll = -np.mean(np.log(np.maximum(p[np.arange(m), y], 1e-300)))
    return {"nll": float(nll), "ece": float(ece), "accuracy": float(correct.mean()),
            "confidence": float(conf.mean()), "bins": bins}
