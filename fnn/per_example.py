"""Per-example gradients and their statistics, read off the δ-recursion's trace in one pass.

Autodiff returns the mean gradient; anything per example needs ``vmap(grad)``, which builds an
``N × P`` array. The backprop already holds, per sample ``x`` and layer ``l``, the row ``δ^l_x``
that meets ``a^{l−1}_x`` in BP4 (:class:`fnn.backprop.Trace`), and for a dense layer every
per-example quantity is a small contraction of the two (Dangel, Kunstner & Hennig, "BackPACK:
Packing more into backprop", ICLR 2020; Goodfellow, "Efficient per-example gradient computations",
2015). The names follow BackPACK's.

Convention. ``g_x = ∂/∂θ [C_x + ½β Σ_l ‖W^l‖²]``: the gradient of sample ``x``'s own cost, on the
scale of ``C_x`` (not divided by ``N``), with the L2 term, which is the same for every sample, so
that the mean of the ``g_x`` is exactly the gradient :func:`fnn.backprop` returns. (BackPACK scales
its individual gradients by ``1/N`` under a mean reduction; here that factor is left out.) Per
layer, with ``δ_x = δ^l_x (n_l,)``, ``a_x = a^{l−1}_x (n_{l−1},)`` and ``h_x = W^l a_x``:

==========================  ============================================================
quantity                    formula, per layer
==========================  ============================================================
:func:`batch_grad`          ``g_x^W = δ_x a_xᵀ + βW``, ``g_x^b = δ_x``  → leaves ``(N, …)``
:func:`batch_l2`            ``‖g_x^W‖² = ‖δ_x‖² ‖a_x‖² + 2β δ_x·h_x + β² ‖W‖²``, ``‖g_x^b‖² = ‖δ_x‖²``
:func:`sum_grad_squared`    ``Σ_x g_x^W ⊙ g_x^W = (δ⊙δ)ᵀ(a⊙a) + 2β W ⊙ δᵀa + Nβ² W⊙W``
:func:`variance`            ``(1/N) Σ_x g_x ⊙ g_x − ḡ ⊙ ḡ`` (β cancels)
:func:`weighted_sum`        ``Σ_x w_x g_x^W = (w⊙δ)ᵀ a + (Σ_x w_x) βW``
:func:`clipped_sum`         ``Σ_x min(1, c/‖g_x‖) g_x``, the whole-network norm ``‖g_x‖``
:func:`noise_scale`         ``B_simple = tr(Σ) / ‖G‖²`` (McCandlish et al. 2018)
==========================  ============================================================

Batch norm: in eval mode a normalized layer is a fixed affine map per sample, ``δ_x`` above is
``δ_h = γ/√(v+ε) ⊙ δ^l_x`` and ``g_x^γ = δ^l_x ⊙ x̂_x``, ``g_x^β = δ^l_x``. In train mode every
sample's output depends on the whole batch through μ and σ², so ``C_x`` has no gradient of its
own: these functions refuse such a trace (``ValueError``). Mixed precision: the contractions run in
the params' dtype (float32) on the trace's rows, which came through the network's bfloat16
matmuls; only :func:`weighted_sum` (and so :func:`clipped_sum`) uses :meth:`fnn.MLP.matmul` as BP4
does, so that weights ``1/N`` give the gradient of :func:`fnn.backprop` up to rounding, while
:func:`variance` and :func:`noise_scale`, which subtract the squared mean from a second moment,
take the mean in full precision. Samples with an out-of-range label (NaN rows of the trace) give
NaN, never a silent zero.

Every function checks ``params`` and the trace against ``net`` and reads ``β`` from the trace
(``trace.l2``, the one its cost was taken with); an ``l2=`` given as well must equal it.

Usage, inside or outside ``jit``::

    cost, grads, _, trace = fnn.backprop_trace(net, params, x, y, loss, l2)
    norms = fnn.per_example.grad_norms(net, params, trace)          # (N,), with the trace's β
    total, norms = fnn.per_example.clipped_sum(net, params, trace, 1.0)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn.backprop import Trace
from fnn.checks import is_concrete, real_in
from fnn.epoch import Observer
from fnn.losses import check_l2, l2_active
from fnn.mlp import MLP, Params


def _checked(net: MLP, params: Params, trace: Trace, l2=None):
    """``β`` after checking ``params`` and ``trace`` against ``net``: the trace's own ``β`` when ``l2`` is
    ``None``, else ``l2``, which must equal it (the quantities are those of the trace's cost)."""
    if not isinstance(trace, Trace):
        hint = ""
        if isinstance(trace, tuple) and trace and isinstance(trace[-1], Trace):
            hint = (" This looks like backprop_trace's whole result (cost, grads, state, trace): pass its "
                    "last element, e.g. `_, _, _, trace = fnn.backprop_trace(...)`.")
        raise TypeError(f"trace must be an fnn.Trace (from fnn.backprop_trace); got {type(trace).__name__}.{hint}")
    if not isinstance(net, MLP):
        raise TypeError(f"net must be an fnn.MLP; got {type(net).__name__}.")
    net.check_params(params)
    widths = tuple(jnp.shape(a)[-1] for a in trace.acts)
    if len(trace.deltas) != net.num_layers or widths != net.sizes:
        raise ValueError(f"the trace is of a network with sizes {widths}, but net has sizes {net.sizes}; take the "
                         "trace with the same network and params (fnn.backprop_trace(net, params, ...)).")
    if all(map(is_concrete, jax.tree.leaves((params, trace.forward.acts, trace.forward.hs, trace.forward.zs)))):
        _check_values(net, params, trace)
    if l2 is None:
        return trace.l2
    l2 = check_l2(l2)
    if is_concrete(l2) and is_concrete(trace.l2) and float(l2) != float(trace.l2):
        raise ValueError(f"l2={l2!r} but the trace was taken with l2={float(trace.l2)!r}: the per-example gradients "
                         "are those of the trace's cost. Leave l2 out (the trace's is used), or take the trace "
                         "with this l2.")
    return l2


def _check_values(net: MLP, params: Params, trace: Trace) -> None:
    """Outside ``jit``: refuse a trace taken at other params of the same shapes, by recomputing every
    ``h^l = a^{l−1} (W^l)ᵀ`` (and ``z^l = h^l + b^l``) from the trace's activations (one forward pass)."""
    f = trace.forward
    for l, (layer, bn) in enumerate(zip(params, f.bn)):
        h = net.matmul(f.acts[l], layer["W"].T)
        pairs = [(h, f.hs[l])] + ([] if bn is not None else [(f.hs[l] + layer["b"], f.zs[l])])
        for mine, theirs in pairs:
            scale = float(jnp.max(jnp.abs(theirs))) if theirs.size else 0.0
            if float(jnp.max(jnp.abs(mine - theirs), initial=0.0)) > 1e-4 * scale + 1e-30:
                raise ValueError(f"the trace was taken at other params than these: layer {l + 1}'s pre-activations "
                                 "do not match. Take the trace with these params (fnn.backprop_trace(net, params, "
                                 "...)), or pass the params it was taken with.")


def _layers(trace: Trace):
    """Per layer: ``(δ_x rows (N, n_l) for BP4, δ^l rows, a^{l−1} (N, n_{l−1}), h^l, batch-norm cache)``."""
    if any(d is None for d in trace.weight_deltas):
        raise ValueError(
            "per-example quantities are not defined for batch normalization in train mode: every sample's "
            "output depends on the whole batch through its mean and variance, so no sample has a gradient "
            "of its own. Take the trace in eval mode (backprop_trace(..., state=state, train=False)) or "
            "use a network without batch norm."
        )
    f = trace.forward
    return zip(trace.weight_deltas, trace.deltas, f.acts[:-1], f.hs, f.bn)


def _sq_rows(t: jax.Array) -> jax.Array:
    """``‖t_x‖²`` per row: ``(N, n) -> (N,)``."""
    return jnp.sum(t * t, axis=1)


def batch_grad(net: MLP, params: Params, trace: Trace, l2: float | None = None) -> Params:
    """Every sample's gradient ``g_x``, materialized: ``params``' structure with a leading ``N`` axis.

    ``W^l``: ``(N, n_l, n_{l−1})`` = ``δ_x a_xᵀ + βW``; ``b^l``: ``(N, n_l)`` = ``δ_x``; batch-norm
    ``γ``: ``δ^l_x ⊙ x̂_x``, ``β``: ``δ^l_x``. Memory ``N × P``: for small networks and for checking;
    the other functions here never build it.
    """
    l2 = _checked(net, params, trace, l2)
    out = []
    for layer, (d, dz, a, _, bn) in zip(params, _layers(trace)):
        g = {"W": jnp.einsum("ni,nj->nij", d, a)}
        if l2_active(l2):
            g["W"] = g["W"] + l2 * layer["W"]
        if bn is None:
            g["b"] = d
        else:
            g["gamma"], g["beta"] = dz * bn.xhat, dz
        out.append({k: g[k] for k in layer})
    return out


def batch_l2(net: MLP, params: Params, trace: Trace, l2: float | None = None) -> Params:
    """``‖g_x‖²`` of every leaf and sample without building ``g_x``: ``params``' structure, leaves ``(N,)``.

    ``‖δ_x a_xᵀ + βW‖² = ‖δ_x‖² ‖a_x‖² + 2β δ_x·(W a_x) + β²‖W‖²`` (``W a_x = h_x`` from the trace).
    """
    return _batch_l2(params, trace, _checked(net, params, trace, l2))


def _batch_l2(params: Params, trace: Trace, l2) -> Params:
    out = []
    for layer, (d, dz, a, h, bn) in zip(params, _layers(trace)):
        dd = _sq_rows(d)
        s = {"W": dd * _sq_rows(a)}
        if l2_active(l2):
            s["W"] = s["W"] + 2 * l2 * jnp.sum(d * h, axis=1) + l2 ** 2 * jnp.sum(layer["W"] ** 2)
        if bn is None:
            s["b"] = dd
        else:
            s["gamma"], s["beta"] = _sq_rows(dz * bn.xhat), _sq_rows(dz)
        out.append({k: s[k] for k in layer})
    return out


def grad_norms(net: MLP, params: Params, trace: Trace, l2: float | None = None) -> jax.Array:
    """``‖g_x‖₂`` over the whole network, per sample: ``(N,)``, from :func:`batch_l2`."""
    return _grad_norms(params, trace, _checked(net, params, trace, l2))


def _grad_norms(params: Params, trace: Trace, l2) -> jax.Array:
    return jnp.sqrt(sum(jax.tree.leaves(_batch_l2(params, trace, l2))))


def sum_grad_squared(net: MLP, params: Params, trace: Trace, l2: float | None = None) -> Params:
    """``Σ_x g_x ⊙ g_x`` element-wise, ``params``' structure: ``(δ⊙δ)ᵀ(a⊙a) + 2βW⊙(δᵀa) + Nβ²W⊙W`` for ``W``.

    BackPACK's ``SumGradSquared`` sums the squares of *its* individual gradients, which under the
    default mean reduction are ``g_x/N``: this is ``N²`` times BackPACK's there (and equal to it under
    a sum reduction, where BackPACK's are ``g_x``).
    """
    return _sum_grad_squared(params, trace, _checked(net, params, trace, l2))


def _sum_grad_squared(params: Params, trace: Trace, l2) -> Params:
    n = trace.acts[0].shape[0]
    out = []
    for layer, (d, dz, a, _, bn) in zip(params, _layers(trace)):
        s = {"W": (d * d).T @ (a * a)}
        if l2_active(l2):
            W = layer["W"]
            s["W"] = s["W"] + 2 * l2 * W * (d.T @ a) + n * l2 ** 2 * W * W
        if bn is None:
            s["b"] = jnp.sum(d * d, axis=0)
        else:
            s["gamma"], s["beta"] = jnp.sum((dz * bn.xhat) ** 2, axis=0), jnp.sum(dz * dz, axis=0)
        out.append({k: s[k] for k in layer})
    return out


def variance(net: MLP, params: Params, trace: Trace, l2: float | None = None) -> Params:
    """The element-wise variance of the per-example gradients, ``(1/N) Σ_x g_x⊙g_x − ḡ⊙ḡ`` (the biased,
    ``1/N`` form; multiply by ``N/(N−1)`` for the unbiased estimate), ``params``' structure.

    Against BackPACK's ``Variance``: BackPACK computes the same ``(1/N) Σ_x ĝ_x⊙ĝ_x − (mean ĝ)⊙(mean ĝ)``
    of *its* individual gradients ``ĝ_x``, which under the default mean reduction are ``g_x/N``, so
    this is ``N²`` times BackPACK's there (and equal to it under a sum reduction).
    The L2 term shifts every ``g_x`` by the same ``βW`` and cancels, so ``β`` does not matter.
    Accuracy: the difference is exact up to the rounding of the second moment ``(1/N) Σ_x g_x⊙g_x``
    (about ``ε`` times it, absolutely); an entry whose variance is far below its squared mean holds
    only that rounding, and one that comes out below 0 is clamped at 0.
    """
    _checked(net, params, trace, l2)
    n = trace.acts[0].shape[0]
    squares = _sum_grad_squared(params, trace, 0.0)
    means = _weighted(params, trace, jnp.full((n,), 1 / n, trace.acts[0].dtype), 0.0, jnp.matmul)
    return jax.tree.map(lambda s, m: jnp.maximum(s / n - m * m, 0), squares, means)


def weighted_sum(net: MLP, params: Params, trace: Trace, weights: jax.Array, l2: float | None = None, *,
                 full_precision: bool = False) -> Params:
    """``Σ_x w_x g_x`` for per-sample weights ``w (N,)``: ``(w⊙δ)ᵀ a + (Σ_x w_x) βW`` for ``W``.

    With ``w_x = 1/N`` it is the mean gradient (that of :func:`fnn.backprop`, up to rounding); with
    ``w_x = min(1, c/‖g_x‖)`` the clipped sum of DP-SGD (:func:`clipped_sum`). The contraction runs
    as BP4 does (:meth:`fnn.MLP.matmul`, in bfloat16 for a mixed-precision network), or with
    ``full_precision`` in the params' dtype, on the same rows whose norms :func:`grad_norms` takes.
    """
    l2 = _checked(net, params, trace, l2)
    n = trace.acts[0].shape[0]
    if jnp.shape(weights) != (n,):
        raise ValueError(f"weights must have shape (N,) = ({n},), one per sample; got {jnp.shape(weights)}.")
    matmul = jnp.matmul if full_precision else net.matmul
    return _weighted(params, trace, jnp.asarray(weights, trace.acts[0].dtype), l2, matmul)


def _weighted(params: Params, trace: Trace, weights: jax.Array, l2, matmul) -> Params:
    """:func:`weighted_sum` with the BP4 matmul ``matmul`` (the network's, or a full-precision one)."""
    w = weights[:, None]
    out = []
    for layer, (d, dz, a, _, bn) in zip(params, _layers(trace)):
        s = {"W": matmul((w * d).T, a)}  # BP4 with weighted rows
        if l2_active(l2):
            s["W"] = s["W"] + jnp.sum(w) * l2 * layer["W"]
        if bn is None:
            s["b"] = jnp.sum(w * d, axis=0)
        else:
            s["gamma"], s["beta"] = jnp.sum(w * dz * bn.xhat, axis=0), jnp.sum(w * dz, axis=0)
        out.append({k: s[k] for k in layer})
    return out


def clipped_sum(net: MLP, params: Params, trace: Trace, max_norm: float,
                l2: float | None = None) -> tuple[Params, jax.Array]:
    """``(Σ_x min(1, c/‖g_x‖) g_x, ‖g_x‖ (N,))``: every sample's gradient clipped to norm ``c = max_norm``.

    The norm is the whole network's (all layers and leaves). A sample whose gradient is exactly 0
    keeps weight 1. For DP-SGD (Abadi et al., 2016) pass ``l2=0`` and add the data-independent
    ``βW`` after clipping, so that ``c`` bounds what one sample contributes.
    """
    l2 = _checked(net, params, trace, l2)
    real_in("max_norm", max_norm, 0.0, low_open=True)
    norms = _grad_norms(params, trace, l2)
    scale = jnp.minimum(1, max_norm / jnp.where(norms > 0, norms, 1))
    weights = jnp.where(norms > 0, scale, 1).astype(trace.acts[0].dtype)
    return _weighted(params, trace, weights, l2, net.matmul), norms


class NoiseScale(NamedTuple):
    """The gradient noise scale of one batch and its two parts (all scalars).

    ``trace_cov``: unbiased ``tr(Σ)``, the trace of the per-example gradients' covariance;
    ``grad_sq``: unbiased ``‖G‖²`` (it can come out negative for a very noisy batch);
    ``b_simple = trace_cov / grad_sq``. See :func:`noise_scale` for the estimators.
    """

    trace_cov: jax.Array
    grad_sq: jax.Array
    b_simple: jax.Array


def noise_scale(net: MLP, params: Params, trace: Trace, l2: float | None = None,
                population: int | None = None) -> NoiseScale:
    """``B_simple = tr(Σ)/‖G‖²``: the batch size above which larger batches stop paying off.

    ``Σ`` is the covariance of one example's gradient and ``G`` the true gradient (McCandlish,
    Kaplan, Amodei et al., "An empirical model of large-batch training", 2018, eq. 2.5 and app. A).
    Both are estimated without bias from one batch of ``N ≥ 2`` with the sample trace
    ``s² = (Σ_x ‖g_x‖² − N‖ḡ‖²)/(N−1)`` of the data gradients (β cancels) and ``ḡ_β``, the mean
    gradient including ``βW``:

    - ``population=None``: the batch is ``N`` independent draws (the paper's model, or a data set
      much larger than the batch): ``tr(Σ) = s²`` and ``‖G‖² = ‖ḡ_β‖² − s²/N``.
    - ``population=M``: the batch is drawn *without replacement* from a finite training set of
      ``M ≥ N`` examples, as :func:`fnn.fit`'s shuffled batches are, and ``G`` is that set's mean
      gradient. With ``S² = Σ_i ‖g_i − G‖²/(M−1)`` over the set, simple random sampling gives
      ``E[s²] = S²`` and ``E‖ḡ_β‖² = ‖G‖² + (1 − N/M) S²/N`` (Cochran, *Sampling Techniques*, 1977,
      thm. 2.2 and 2.4), so ``‖G‖² = ‖ḡ_β‖² − (1 − N/M) s²/N`` and, for ``Σ`` the covariance of one
      example drawn uniformly from the set (divisor ``M``), ``tr(Σ) = (1 − 1/M) s²``. The
      with-replacement formula on such batches under-estimates ``‖G‖²`` by ``s²/M`` on average and
      so over-estimates ``B_simple``; a batch of the whole set (``N = M``) gives ``‖G‖² = ‖ḡ_β‖²``.

    Over many batches, average ``trace_cov`` and ``grad_sq`` separately and take the ratio of the
    averages, as the paper recommends; the ratio of one batch is noisy.
    """
    l2 = _checked(net, params, trace, l2)
    n = trace.acts[0].shape[0]
    if n < 2:
        raise ValueError(f"the gradient noise scale needs a batch of at least 2 samples; got {n}.")
    if population is not None and (isinstance(population, bool) or not isinstance(population, (int, np.integer))
                                   or population < n):
        raise ValueError(f"population is the number of examples the batch was drawn from without replacement, "
                         f"an integer at least the batch size {n}; got {population!r}. Pass None for batches "
                         "of independent draws.")
    sum_sq = jnp.sum(_grad_norms(params, trace, 0.0) ** 2)
    mean = _weighted(params, trace, jnp.full((n,), 1 / n, trace.acts[0].dtype), 0.0, jnp.matmul)
    mean_sq = sum(jnp.sum(m * m) for m in jax.tree.leaves(mean))
    sample_cov = (sum_sq - n * mean_sq) / (n - 1)
    if l2_active(l2):  # ‖ḡ_β‖²: the mean gradient with βW
        mean = [{**m, "W": m["W"] + l2 * layer["W"]} for m, layer in zip(mean, params)]
        mean_sq = sum(jnp.sum(m * m) for m in jax.tree.leaves(mean))
    if population is None:
        trace_cov, grad_sq = sample_cov, mean_sq - sample_cov / n
    else:
        trace_cov = (1 - 1 / population) * sample_cov
        grad_sq = mean_sq - (1 - n / population) * sample_cov / n
    return NoiseScale(trace_cov, grad_sq, trace_cov / grad_sq)


# ---------------------------------------------------------------------------------------------
# Statistics recorded by training (fnn.fit(..., per_example=...)).

STATISTICS = ("noise_scale", "norms")
"""What :func:`fnn.fit` can record per epoch: the gradient noise scale, and the spread of the
per-example gradient norms."""


def check_statistics(net: MLP, names, grad_source: str) -> tuple[str, ...]:
    """``names`` as a tuple after checking that the training run can compute them."""
    if isinstance(names, str):
        raise TypeError(f"per_example takes a sequence of names, e.g. ({names!r},); got the string {names!r}.")
    names = tuple(names)
    unknown = [n for n in names if n not in STATISTICS]
    if unknown:
        raise ValueError(f"unknown per-example statistics {unknown}; expected some of {list(STATISTICS)}.")
    if names and grad_source != "manual":
        raise ValueError(f"per-example statistics are read off the manual backprop's trace; got "
                         f"grad_source={grad_source!r}. Use grad_source='manual'.")
    if names and net.has_state:
        raise ValueError("per-example statistics are not defined for batch normalization in train mode (every "
                         "sample's output depends on the whole batch); train without per_example=... .")
    return names


def step_statistics(net: MLP, params: Params, trace: Trace, l2, names: tuple[str, ...], width: int,
                    population: int | None = None) -> dict:
    """One training step's statistics: ``trace_cov`` and ``grad_sq`` of :func:`noise_scale` (NaN for a
    batch of one; ``population`` as there) and the per-example ``norms`` padded with NaN to ``width``
    entries."""
    out = {}
    if "noise_scale" in names:
        n = trace.acts[0].shape[0]
        ns = (noise_scale(net, params, trace, l2, population) if n > 1
              else NoiseScale(*[jnp.full((), jnp.nan)] * 3))
        out["trace_cov"], out["grad_sq"] = ns.trace_cov, ns.grad_sq
    if "norms" in names:
        norms = grad_norms(net, params, trace, l2)
        out["norms"] = jnp.pad(norms, (0, width - norms.shape[0]), constant_values=jnp.nan)
    return out


def epoch_statistics(steps: dict) -> dict:
    """The history entries from an epoch's :func:`step_statistics` (host arrays, one row per step).

    ``noise_scale``: ``mean(trace_cov) / mean(grad_sq)`` over the epoch's steps (the ratio of the
    averages, as McCandlish et al. recommend), with ``grad_trace_cov`` and ``grad_sq`` the two
    averages; ``norm_p10``, ``norm_median``, ``norm_p90``, ``norm_max``: quantiles of the
    per-example gradient norms of every sample the epoch used. NaN where no step of the epoch has
    finite values (a failure at its first step, or every step skipped).
    """
    out = {}
    if "trace_cov" in steps:
        ok = np.isfinite(steps["trace_cov"]) & np.isfinite(steps["grad_sq"])
        cov, sq = (np.mean(np.asarray(steps[k], np.float64)[ok]) if ok.any() else np.nan
                   for k in ("trace_cov", "grad_sq"))
        with np.errstate(divide="ignore", invalid="ignore"):
            out.update(noise_scale=float(cov / sq), grad_trace_cov=float(cov), grad_sq=float(sq))
    if "norms" in steps:
        norms = np.asarray(steps["norms"], np.float64).ravel()
        norms = norms[np.isfinite(norms)]
        for key, q in (("norm_p10", 10), ("norm_median", 50), ("norm_p90", 90), ("norm_max", 100)):
            out[key] = float(np.percentile(norms, q)) if norms.size else float("nan")
    return out


def observer(net: MLP, names, l2, width: int, population: int | None = None) -> Observer:
    """The training observer (:mod:`fnn.epoch`) of the statistics ``names`` (some of
    :data:`STATISTICS`) of every step, from the step's trace: :func:`step_statistics` per step,
    :func:`epoch_statistics` in the history. ``width``: the largest batch; ``population``: the size of
    the training set the batches are drawn from without replacement (:func:`noise_scale`). With a mesh
    (``fit(..., per_example=..., mesh=...)``) the step's trace is sharded by sample: each device takes
    the norms of its rows and the noise scale's sums are all-reduced, equal to one device's to rounding."""
    names = tuple(names)
    return Observer("per_example",
                    lambda s: step_statistics(net, s.params, s.gradient.trace, l2, names, width, population),
                    summary=epoch_statistics)
