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
