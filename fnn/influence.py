"""Training-data attribution read off the δ's: gradient inner products, TracIn and influence functions.

Which training examples made the network predict what it does on a test point? Every answer here is
an inner product between per-example gradients, taken layer by layer from the rows of the
δ-recursion's trace (:class:`fnn.backprop.Trace`) without building any per-example gradient, and
under a metric: the identity (gradient similarity, TracIn) or an inverse curvature (influence
functions). The scaling is :mod:`fnn.per_example`'s: ``g_x = ∂/∂θ [C_x + ½β Σ_l ‖W^l‖²]`` for one
sample ``x``, not divided by ``N``. Per layer, with ``W̄ = [W | b]``, ``ā_x = [a^{l−1}_x; 1]``,
``δ_x = δ^l_x`` and ``h_x = W a^{l−1}_x``, the gradient is the rank-one ``g_x^W̄ = δ_x ā_xᵀ + β[W | 0]``.
Plain layers only: a batch-normalized network in train mode has no per-sample gradient, and these
functions refuse batch norm altogether (fold the running statistics into ``W`` and ``b`` first).

**Inner products** (:func:`gradient_inner_products`). ``⟨δ_i ā_iᵀ, δ_j ā_jᵀ⟩ = (δ_i·δ_j)(ā_i·ā_j)`` and
``⟨δ_i ā_iᵀ, [W | 0]⟩ = δ_iᵀ W a_i = δ_i·h_i``, so

    ``⟨g_i, g_j⟩ = Σ_l [(δ_i·δ_j)(ā_i·ā_j) + β δ_i·h_i + β δ_j·h_j + β² ‖W^l‖²]``,

two ``(B_i, n) @ (n, B_j)`` matmuls per layer for a block of pairs; ``i = j`` gives
:func:`fnn.per_example.batch_l2` summed over the leaves.

**TracIn** (Pruthi, Liu, Kale & Sundararajan, "Estimating training data influence by tracing gradient
descent", NeurIPS 2020, eq. 3, TracInCP): with checkpoints ``θ_t`` and ``η_t`` the learning rate of the
updates that led to ``θ_t``, ``TracIn(z, z') = Σ_t η_t ⟨∇ℓ(z'; θ_t), ∇ℓ(z; θ_t)⟩`` (:func:`tracin`) and the
self-influence ``Σ_t η_t ‖∇ℓ(z; θ_t)‖²`` (:func:`tracin_self`). ``ℓ`` is the loss without the L2 term, as
in the paper (``l2=β`` includes it). Positive: a gradient step on ``z`` lowers the test loss (a
*proponent*); negative: it raises it (an *opponent*). :func:`checkpoint_trajectory` reads the ``θ_t``
and ``η_t`` of a checkpoint directory.

**Influence functions** (Koh & Liang, "Understanding black-box predictions via influence functions",
ICML 2017, eq. 2): ``I(z, z_test) = −∇ℓ(z_test)ᵀ M⁻¹ ∇ℓ(z)`` with ``ℓ`` the loss without the L2 term
and ``M = G + βI_W + λI``, ``G = (1/N) Σ_x J_xᵀ H_x J_x`` the mean Gauss-Newton matrix of the training
set (:mod:`fnn.curvature`; or the Hessian), ``λ > 0`` the damping. The sign is the paper's
``I_up,loss``: upweighting ``z`` by ``ε`` in the training cost changes the test loss by ``ε I``, so
**positive = harmful** (training more on ``z`` raises the test loss) and **negative = helpful**;
removing ``z`` changes it by about ``−I/N``. (TracIn's sign is the opposite: positive there is helpful.)
The metric ``M⁻¹`` comes in three forms (:func:`preconditioner`):

- ``"cg"``: conjugate gradient on ``v ↦ M v`` by the hand-written product
  (:func:`fnn.curvature.product_operator`, ``matrix="ggn"`` or ``"hessian"``), one solve ``s_t = M⁻¹ g_t``
  per test point, then ``⟨s_t, g_z⟩ = Σ_l δ_zᵀ S_t^l ā_z`` per training example (``S_t^l`` the layer's
  ``W̄``-shaped block of ``s_t``): no training gradient is formed. The Hessian can be indefinite: take
  ``λ`` above its most negative eigenvalue, or CG's result means nothing.
- ``"kfac"``: per layer ``M_l = G_l ⊗ A_l + (β + λ) I`` over ``W̄.ravel()`` (the Kronecker factors of
  :func:`fnn.curvature.kronecker_factors`, exact columns with ``key=None`` (KFLR) or sampled ones with a
  key (KFAC); the L2 term is added to the damping, biases included), kept as ``A = Q_A diag(a) Q_Aᵀ``,
  ``G = Q_G diag(g) Q_Gᵀ`` (George et al., Martens & Grosse). Since
  ``(q_{G,i} ⊗ q_{A,j})ᵀ (δ ⊗ ā) = (q_{G,i}·δ)(q_{A,j}·ā)``, with ``u = Q_Gᵀ δ`` and ``v = Q_Aᵀ ā``,

      ``⟨g_t, M_l⁻¹ g_z⟩ = Σ_{i,j} u_{t,i} v_{t,j} u_{z,i} v_{z,j} / Λ̃_ij``, ``Λ̃_ij = g_i a_j + β + λ``.

- ``"ekfac"`` (George, Laurent, Bouthillier, Ballas & Vincent, "Fast approximate natural gradient
  descent in a Kronecker-factored eigenbasis", NeurIPS 2018; Grosse et al., "Studying large language
  model generalization with influence functions", 2023): the same eigenbasis with the eigenvalues
  re-fitted to the curvature itself. The Gauss-Newton block of layer ``l`` is
  ``G^l = (s/N) Σ_x Σ_c (Δ_{x,c} ⊗ ā_x)(Δ_{x,c} ⊗ ā_x)ᵀ``, the Gram matrix of the back-propagated columns
  ``Δ_{x,c}`` of ``H_x = S_x S_xᵀ`` (:func:`fnn.curvature.split_columns`; ``s`` their scale: 1 for the
  ``K`` exact columns, ``1/M`` for ``M`` sampled ones). Its diagonal in the Kronecker eigenbasis, the
  ``Λ`` that minimizes ``‖G^l − Q diag(Λ) Qᵀ‖_F`` for ``Q = Q_G ⊗ Q_A`` (George et al., §3), is

      ``Λ_ij = (s/N) Σ_x Σ_c ((Q_Gᵀ Δ_{x,c})_i)² ((Q_Aᵀ ā_x)_j)²``,

  one ``(n_l, N·C) @ (N·C, n_{l−1}+1)`` matmul; ``Λ̃ = Λ + β + λ``. The columns are the GGN's (as in
  Grosse et al., who sample the model's outputs), not the loss gradients of the empirical Fisher of
  George et al.: then ``M`` approximates the same ``G`` that ``"cg"`` solves with, and with exact columns
  ``diag(Qᵀ G^l Q)`` is matched exactly.

For every method the self-influence ``⟨g_z, M⁻¹ g_z⟩ ≥ 0`` (:func:`self_influence`; it is ``−I(z, z)``):
for ``"kfac"``/``"ekfac"`` ``Σ_{i,j} u_i² v_j² / Λ̃_ij`` per example, about a gradient's cost; for ``"cg"``
one solve per example.

Memory is bounded by the block size: the per-example rows (``δ``, ``ā``, the width of the network per
example) are computed for ``block`` examples at a time and contracted block by block; the
``(N_test, N_train)`` result is the only thing of that size, assembled on the host (a NumPy array), or,
with ``top=k``, never formed: a running top-``k`` (:func:`top_k`) over the training blocks.
A ``"cg"`` or ``"kfac"``/``"ekfac"`` score costs ``P`` multiply-adds per (test, training) pair, as a dot
product of materialized gradients would, but memory ``B·n`` instead of ``B·P``.

Usage::

    sims = fnn.influence.gradient_inner_products(net, params, (x_test, y_test), (x, y), loss, cosine=True)
    rows = fnn.influence.gradient_rows(net, params, x, y, loss)             # δ^l, ā^l per example: jit-able
    gram = fnn.influence.rows_inner_products(rows, rows, params)            # (N, N), one block
    pre = fnn.influence.preconditioner(net, params, (x, y), loss, method="ekfac", damping=1e-3)
    scores = fnn.influence.influence(pre, (x_test, y_test))                    # (N_test, N), Koh & Liang's sign
    ranks = fnn.influence.influence(pre, (x_test, y_test), top=10)             # .helpful, .harmful (N_test, 10)
    run = fnn.influence.checkpoint_trajectory("runs/ckpt")                     # θ_t and η_t
    tr = fnn.influence.tracin(run.net, run.params, run.learning_rates, (x, y), (x_test, y_test), loss)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from fnn import checkpoint, checks, curvature, optim
from fnn.backprop import backprop_trace
from fnn.checks import positive_int, prng_key, real_in
from fnn.losses import Loss, check_output, output_curvature, resolve
from fnn.mlp import MLP, Params
from fnn.second_order import cg

METHODS = ("cg", "kfac", "ekfac")


class Ranking(NamedTuple):
    """The ``k`` most helpful and ``k`` most harmful training examples of every test point: indices into the
    training set ``(N_test, k)`` (int64) and their scores ``(N_test, k)``, the most extreme first."""

    helpful: np.ndarray
    helpful_scores: np.ndarray
    harmful: np.ndarray
    harmful_scores: np.ndarray


class Trajectory(NamedTuple):
    """:func:`checkpoint_trajectory`'s result: the network, the params ``θ_t`` of every checkpoint (oldest
    first), their learning rates ``η_t`` ``(T,)`` and epochs."""

    net: MLP
    params: list
    learning_rates: np.ndarray
    epochs: list


class Preconditioner(NamedTuple):
    """``M⁻¹`` of :func:`preconditioner` (module docstring) at ``params`` for ``net`` and ``loss``.

    ``layers``: for ``"kfac"``/``"ekfac"`` per layer ``(Q_G (n_l, n_l), Q_A (m, m), Λ̃ (n_l, m))``,
    ``m = n_{l−1} + 1``, the damped eigenvalues of ``M_l`` over ``W̄``; empty for ``"cg"``. ``train``: the
    training set ``(x, y)`` (``"cg"`` runs its products on it; the others use it as the default set to score).
    """

    method: str
    net: MLP
    loss: Loss
    params: Params
    damping: float
    l2: float
    layers: list
    train: tuple
    matrix: str
    cg_iters: int


# ---------------------------------------------------------------------------------------------
# Checks and the per-example rows


def _check_net(net: MLP, loss, what: str) -> Loss:
    if not isinstance(net, MLP):
        raise TypeError(f"{what} needs the network (an fnn.MLP); got {type(net).__name__}.")
    if any(net.normalized):
        raise ValueError(f"{what} is defined here for plain layers z = W a + b; this network has batch norm, whose "
                         "samples share the batch statistics in training. Use a network without batch norm, or "
                         "fold the running statistics into W and b first.")
    return check_output(resolve(loss), net.output)


def _data(name: str, net: MLP, params: Params, loss: Loss, data) -> tuple[jax.Array, jax.Array]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"the {name} set must be the pair (x, y) of inputs (N, {net.sizes[0]}) and targets; got "
                        f"{type(data).__name__}{f' of length {len(data)}' if isinstance(data, (tuple, list)) else ''}.")
    x, y, _ = checks.data_set(name, net, params, loss, *data, finite=True)
    return x, y


def _finite(net: MLP, params: Params, what: str = "params") -> None:
    """Refuse params with NaN or inf: every score would be NaN (or, through a ReLU, silently finite)."""
    net.check_params(params, what)
    if not bool(checks.all_finite(params)):
        bad = [f"layer {l} {k}" for l, layer in enumerate(params, 1) for k, v in layer.items()
               if not bool(jnp.all(jnp.isfinite(v)))]
        raise ValueError(f"{what}: non-finite values in {', '.join(bad)}; attribution needs the trained, "
                         "finite params: check that training converged, or pass an earlier checkpoint.")


def _block(block) -> int:
    return positive_int("block (examples per block)", block)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class Rows(NamedTuple):
    """The factors of a block of ``B`` per-example gradients (:func:`gradient_rows`): per layer
    ``layers[l] = (δ (B, n_l), ā (B, n_{l−1}+1))``, example ``x``'s gradient for ``W̄ = [W | b]`` being
    ``δ_x ā_xᵀ`` (plus ``β[W | 0]`` with L2), and ``cross = Σ_l δ·h`` ``(B,)``, the L2 cross term."""

    layers: list
    cross: jax.Array


def gradient_rows(net: MLP, params: Params, x, y, loss: Loss | str) -> Rows:
    """:class:`Rows` of the examples ``(x, y)`` from one backprop (no per-example gradient is formed):
    ``B·Σ_l (n_l + n_{l−1} + 1)`` numbers instead of ``B·P``. Jit-compatible: the network, loss, params and
    shapes are checked (batch norm, an empty ``x``, a sample count ``y`` does not share are refused), the
    values are not (:func:`gradient_inner_products` checks them)."""
    loss = _check_net(net, loss, "gradient_rows")
    x = net.check_input(params, x)
    if x.shape[0] == 0:
        raise ValueError("x is empty: gradient_rows needs at least one example, shape (B, n_0) with B ≥ 1.")
    if jnp.ndim(y) == 0 or jnp.shape(y)[0] != x.shape[0]:
        raise ValueError(f"y must hold one target per row of x ({x.shape[0]}); got shape {tuple(jnp.shape(y))}.")
    return _rows(net, loss, params, x, y)


def rows_inner_products(rows_a: Rows, rows_b: Rows, params: Params, l2: float = 0.0) -> jax.Array:
    """``⟨g_i, g_j⟩`` ``(B_a, B_b)`` of two blocks of :func:`gradient_rows` at ``params`` (module docstring:
    two ``(B_a, n) @ (n, B_b)`` matmuls per layer); ``l2 = β ≥ 0`` includes ``βW`` in every gradient. Both
    blocks must come from the network of ``params`` (their widths are checked)."""
    for name, rows in (("rows_a", rows_a), ("rows_b", rows_b)):
        if not isinstance(rows, Rows):
            raise TypeError(f"{name} must be the Rows of gradient_rows; got {type(rows).__name__}.")
        widths = [(d.shape[-1], a.shape[-1]) for d, a in rows.layers]
        want = [(layer["W"].shape[0], layer["W"].shape[1] + 1) for layer in params]
        if widths != want:
            raise ValueError(f"{name} has layers of widths (δ, ā) {widths}, but params are of a network with "
                             f"{want}: take both blocks and params from the same network.")
    if checks.is_concrete(l2):
        l2 = real_in("l2", l2, 0.0)
    return _gram(rows_a, rows_b, l2, _weight_sq(params))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _rows(net: MLP, loss: Loss, params: Params, x, y) -> Rows:
    _, _, _, trace = backprop_trace(net, params, x, y, loss)
    f = trace.forward
    ones = jnp.ones((x.shape[0], 1), x.dtype)
    layers = [(d, jnp.concatenate([a, ones], axis=1)) for d, a in zip(trace.weight_deltas, f.acts[:-1])]
    return Rows(layers, sum(jnp.sum(d * h, axis=1) for d, h in zip(trace.weight_deltas, f.hs)))


def _weight_sq(params: Params) -> jax.Array:
    return sum(jnp.sum(layer["W"] ** 2) for layer in params)


@jax.jit
def _gram(rows_a: Rows, rows_b: Rows, l2, wsq):
    (la, ca), (lb, cb) = rows_a, rows_b
    k = sum((da @ db.T) * (aa @ ab.T) for (da, aa), (db, ab) in zip(la, lb))
    return k + l2 * (ca[:, None] + cb[None, :]) + l2 * l2 * wsq


@jax.jit
def _sq_norms(rows, l2, wsq):
    """``‖g_x‖²`` ``(B,)``, the diagonal of :func:`rows_inner_products`."""
    layers, c = rows
    return sum(jnp.sum(d * d, axis=1) * jnp.sum(a * a, axis=1) for d, a in layers) + 2 * l2 * c + l2 * l2 * wsq


def _set_rows(net, loss, params, x, y, block) -> list:
    return [_rows(net, loss, params, x[lo:hi], y[lo:hi]) for lo, hi in _chunks(x.shape[0], block)]


# ---------------------------------------------------------------------------------------------
# Ranking


def top_k(scores, k: int, *, helpful: str = "high") -> Ranking:
    """The ``k`` highest and ``k`` lowest scores of every row, with their training indices.

    Args:
      scores: an ``(N_test, N_train)`` array, or an iterable of blocks ``(N_test, B_i)`` of it in training
        order (a generator: only one block and the running top-``k`` are held at a time).
      k: how many of each, at most ``N_train``.
      helpful: which end is helpful: ``"high"`` for inner products and TracIn, ``"low"`` for
        :func:`influence` (Koh & Liang's sign: negative lowers the test loss).

    Returns:
      :class:`Ranking`, the most extreme first (ties by the lower index).
    """
    k = positive_int("k", k)
    if helpful not in ("high", "low"):
        raise ValueError(f"helpful must be 'high' (inner products, TracIn) or 'low' (influence); got {helpful!r}.")
    blocks = [scores] if hasattr(scores, "shape") else scores
    high = low = None
    seen = 0
    for b in blocks:
        b = np.asarray(b)
        if b.ndim != 2 or (high is not None and b.shape[0] != high[0].shape[0]):
            want = "(N_test, B)" if high is None else f"({high[0].shape[0]}, B)"
            raise ValueError(f"scores must be a 2-d array (N_test, N_train) or blocks {want}; got shape {b.shape}.")
        index = np.broadcast_to(np.arange(seen, seen + b.shape[1]), b.shape)
        high = _keep(high, b, index, k, -1)
        low = _keep(low, b, index, k, 1)
        seen += b.shape[1]
    if high is None or seen < k:
        raise ValueError(f"k={k} but the scores cover {seen} training examples; pass k ≤ N_train.")
    (hv, hi), (lv, li) = high, low
    if helpful == "high":
        return Ranking(hi, hv, li, lv)
    return Ranking(li, lv, hi, hv)


def _keep(best, values, index, k: int, sign: int):
    """The running ``k`` most extreme ``(values, indices)``: ascending in ``sign · value``, then index."""
    if best is not None:
        values = np.concatenate([best[0], values], axis=1)
        index = np.concatenate([best[1], index], axis=1)
    order = np.lexsort((index, sign * values), axis=1)[:, :k] if values.shape[1] else index[:, :0]
    return np.take_along_axis(values, order, 1), np.take_along_axis(index, order, 1)


def _collect(blocks: Iterable, n_test: int, n_train: int, top: int | None, helpful: str):
    """The blocks ``(lo, hi, scores (N_test, hi − lo))`` as one ``(N_test, N_train)`` array, or their ranking."""
    if top is not None:
        positive_int("top", top)
        return top_k((s for _, _, s in blocks), top, helpful=helpful)
    out = None
    for lo, hi, s in blocks:
        s = np.asarray(s)
        if out is None:
            out = np.empty((n_test, n_train), s.dtype)
        out[:, lo:hi] = s
    return out


# ---------------------------------------------------------------------------------------------
# Gradient inner products and TracIn


def gradient_inner_products(net: MLP, params: Params, a_data, b_data, loss: Loss | str, *, l2: float = 0.0,
                            block: int = 1024, cosine: bool = False, top: int | None = None):
    """``⟨g_i, g_j⟩`` for every ``i`` of ``a_data`` and ``j`` of ``b_data`` (module docstring), or the cosines.

    Args:
      a_data, b_data: ``(x, y)`` pairs, ``N_a`` and ``N_b`` examples.
      l2: ``β``: ``g_x`` includes ``βW`` (:mod:`fnn.per_example`'s convention); 0 for the loss gradients.
      block: examples per block on either side (memory ``block²`` plus ``block`` rows of the network).
      cosine: ``⟨g_i, g_j⟩ / (‖g_i‖ ‖g_j‖)``, 0 where either gradient is exactly 0.
      top: return the :func:`top_k` ranking (``helpful="high"``) of every ``a`` example over ``b`` instead.

    Returns:
      ``(N_a, N_b)`` NumPy array in the params' dtype (or a :class:`Ranking`).
    """
    loss = _check_net(net, loss, "gradient_inner_products")
    _finite(net, params)
    xa, ya = _data("a", net, params, loss, a_data)
    xb, yb = _data("b", net, params, loss, b_data)
    l2, block = real_in("l2", l2, 0.0), _block(block)
    if not isinstance(cosine, bool):
        raise TypeError(f"cosine must be True or False; got {cosine!r}.")
    wsq = _weight_sq(params)
    rows_a = _set_rows(net, loss, params, xa, ya, block)
    norms_a = [jnp.sqrt(_sq_norms(r, l2, wsq)) for r in rows_a]

    def blocks():
        for lo, hi in _chunks(xb.shape[0], block):
            rb = _rows(net, loss, params, xb[lo:hi], yb[lo:hi])
            parts = [_gram(ra, rb, l2, wsq) for ra in rows_a]
            if cosine:
                nb = jnp.sqrt(_sq_norms(rb, l2, wsq))
                parts = [_cosine(p, na, nb) for p, na in zip(parts, norms_a)]
            yield lo, hi, np.concatenate([np.asarray(p) for p in parts], axis=0)

    return _collect(blocks(), xa.shape[0], xb.shape[0], top, "high")


@jax.jit
def _cosine(gram, na, nb):
    scale = na[:, None] * nb[None, :]
    return jnp.where(scale > 0, gram / jnp.where(scale > 0, scale, 1), 0)


def _trajectory(net: MLP, params_list, learning_rates) -> tuple[list, np.ndarray]:
    if not isinstance(params_list, (list, tuple)) or not params_list:
        raise ValueError("params_list must be a non-empty list of the checkpoints' params (θ_1, ..., θ_T); got "
                         f"{type(params_list).__name__}{' (empty)' if isinstance(params_list, (list, tuple)) else ''}.")
    for t, p in enumerate(params_list):
        _finite(net, p, f"params_list[{t}]")
    rates = np.asarray(learning_rates, np.float64)
    if rates.shape != (len(params_list),):
        raise ValueError(f"learning_rates must give one rate per checkpoint, shape ({len(params_list)},); got "
                         f"shape {rates.shape}.")
    if not np.all(np.isfinite(rates)) or np.any(rates < 0):
        raise ValueError(f"learning_rates must be finite and ≥ 0; got {rates.tolist()}.")
    return list(params_list), rates


def tracin(net: MLP, params_list: Sequence[Params], learning_rates, train, test, loss: Loss | str, *,
           l2: float = 0.0, block: int = 1024, top: int | None = None):
    """TracInCP ``Σ_t η_t ⟨∇ℓ(z_test; θ_t), ∇ℓ(z; θ_t)⟩`` (module docstring): ``(N_test, N_train)``.

    Args:
      params_list: the checkpoints ``θ_t`` (``T`` params of ``net``); learning_rates: ``η_t`` ``(T,)``.
      train, test: ``(x, y)`` pairs.
      l2: 0 (the loss gradient, Pruthi et al.), or ``β`` for gradients of ``C_x + ½β Σ‖W‖²``.
      block, top: as :func:`gradient_inner_products` (``top``: the proponents are ``helpful``).

    Returns:
      ``(N_test, N_train)`` NumPy array (or a :class:`Ranking`).
    """
    loss = _check_net(net, loss, "tracin")
    params_list, rates = _trajectory(net, params_list, learning_rates)
    xtr, ytr = _data("training", net, params_list[0], loss, train)
    xte, yte = _data("test", net, params_list[0], loss, test)
    l2, block = real_in("l2", l2, 0.0), _block(block)
    wsq = [_weight_sq(p) for p in params_list]
    tests = [_set_rows(net, loss, p, xte, yte, block) for p in params_list]

    def blocks():
        for lo, hi in _chunks(xtr.shape[0], block):
            total = 0.0
            for p, rate, rows_t, w in zip(params_list, rates, tests, wsq):
                rz = _rows(net, loss, p, xtr[lo:hi], ytr[lo:hi])
                total = total + rate * np.concatenate([np.asarray(_gram(r, rz, l2, w)) for r in rows_t], axis=0)
            yield lo, hi, total.astype(xtr.dtype)

    return _collect(blocks(), xte.shape[0], xtr.shape[0], top, "high")


def tracin_self(net: MLP, params_list: Sequence[Params], learning_rates, train, loss: Loss | str, *,
                l2: float = 0.0, block: int = 1024) -> np.ndarray:
    """TracIn self-influence ``Σ_t η_t ‖∇ℓ(z; θ_t)‖²`` of every training example: ``(N_train,)`` NumPy array.
    High values flag examples the training fought with (mislabelled, atypical). Arguments as :func:`tracin`."""
    loss = _check_net(net, loss, "tracin_self")
    params_list, rates = _trajectory(net, params_list, learning_rates)
    x, y = _data("training", net, params_list[0], loss, train)
    l2, block = real_in("l2", l2, 0.0), _block(block)
    total = 0.0
    for p, rate in zip(params_list, rates):
        w = _weight_sq(p)
        total = total + rate * np.concatenate([np.asarray(_sq_norms(r, l2, w))
                                               for r in _set_rows(net, loss, p, x, y, block)])
    return total.astype(x.dtype)


def checkpoint_trajectory(directory, *, opt: optim.Optimizer | None = None, learning_rates=None) -> Trajectory:
    """The params and learning rates of every checkpoint in ``directory`` (``epoch-NNNNNN.npz``, as
    ``fnn-train --checkpoint-dir`` writes them; :func:`fnn.checkpoint.checkpoints`), oldest first, for
    :func:`tracin`.

    ``η_t`` is the rate of the last update before checkpoint ``t`` (Pruthi et al.: the step size between
    checkpoints ``t − 1`` and ``t``), read with :func:`fnn.optim.scheduled_learning_rate` from the stored
    optimizer and its step counter. A constant rate is stored with the optimizer; a schedule is not
    (:func:`fnn.optim.describe`): pass ``opt``, the optimizer built with the same schedule, or the rates
    themselves as ``learning_rates`` ``(T,)``. The checkpoints must describe their network
    (saved with ``net=``) and all the same one.
    """
    paths = checkpoint.checkpoints(directory)
    if not paths:
        raise ValueError(f"no checkpoints (epoch-NNNNNN.npz) in {directory}; pass the directory fnn-train "
                         "--checkpoint-dir wrote.")
    if learning_rates is not None and np.shape(learning_rates) != (len(paths),):
        raise ValueError(f"learning_rates must give one rate per checkpoint: {directory} has {len(paths)}, got "
                         f"shape {np.shape(learning_rates)}.")
    net, params, rates, epochs = None, [], [], []
    for path in paths:
        try:
            ck = checkpoint.load(path, net=net, opt=opt)
        except checkpoint.CheckpointError as e:
            if "cannot rebuild the optimizer" not in str(e):
                raise
            raise ValueError(f"{e} The learning rate of a schedule is not stored: pass opt= (the optimizer built "
                             "with the same schedule), and learning_rates= to give the rates yourself.") from None
        if ck.net is None:
            raise ValueError(f"{path} does not describe its network (saved without net=); TracIn needs it.")
        net = ck.net
        params.append(ck.params)
        epochs.append(ck.epoch)
        if learning_rates is None:
            rates.append(_rate_of(path, ck))
    rates = np.asarray(learning_rates if learning_rates is not None else rates, np.float64)
    return Trajectory(net, params, _trajectory(net, params, rates)[1], epochs)


def _rate_of(path, ck) -> float:
    rate = optim.scheduled_learning_rate(ck.opt, ck.opt_state, -1) if ck.opt is not None else None
    if rate is None and ck.opt is not None:  # a second-order optimizer keeps its own counter
        rate = getattr(ck.opt, "hyperparams", {}).get("learning_rate")
        rate = rate if isinstance(rate, (int, float)) and not isinstance(rate, bool) else None
    if rate is None:
        raise ValueError(f"{path}: the learning rate cannot be read from the checkpoint (no optimizer stored, or "
                         "one without a step counter); pass learning_rates= (one per checkpoint).")
    return float(rate)


# ---------------------------------------------------------------------------------------------
# Influence functions


def preconditioner(net: MLP, params: Params, train, loss: Loss | str, *, method: str = "ekfac", damping: float,
                   l2: float = 0.0, key: jax.Array | int | None = None, samples: int = 1, matrix: str = "ggn",
                   cg_iters: int = 100, block: int = 1024) -> Preconditioner:
    """``M⁻¹``, ``M = G + βI + λI`` of the training set ``train = (x, y)`` (module docstring), for
    :func:`influence` and :func:`self_influence`.

    Args:
      method: one of :data:`METHODS`.
      damping: ``λ > 0``.
      l2: ``β`` of training: in ``"cg"`` on the weights exactly (``βI_W``), in the Kronecker forms added to
        the damping.
      key, samples: ``"kfac"``/``"ekfac"``: ``samples`` sampled columns per example (a PRNG key or an int
        seed) instead of the ``K`` exact ones (``key=None``).
      matrix: ``"cg"`` only: ``"ggn"`` (``G``) or ``"hessian"`` (``H``, which needs ``λ`` above ``−λ_min(H)``).
      cg_iters: ``"cg"`` only: conjugate-gradient iterations per solve (a fixed count; ``P`` make it exact in
        exact arithmetic).
      block: examples per pass of the Kronecker forms, to bound memory. ``"cg"`` runs its products on the
        whole training set at once (memory about that of a gradient of it).
    """
    loss = _check_net(net, loss, "influence")
    _finite(net, params)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    output_curvature(loss, net.output)  # refuses a loss without a known second derivative
    if loss.name == "mae":
        raise ValueError("influence functions need curvature, and mae has none (its second derivative is 0 wherever "
                         "it exists). Use mse or half_mse, or tracin / gradient_inner_products for mae.")
    x, y = _data("training", net, params, loss, train)
    damping = real_in("damping", damping, 0.0, low_open=True)
    l2, block = real_in("l2", l2, 0.0), _block(block)
    if matrix not in ("ggn", "hessian"):
        raise ValueError(f"matrix must be 'ggn' or 'hessian'; got {matrix!r}.")
    if method != "cg" and matrix != "ggn":
        raise ValueError(f"matrix='hessian' is for method='cg'; {method!r} approximates the Gauss-Newton matrix.")
    cg_iters = positive_int("cg_iters", cg_iters)
    layers = [] if method == "cg" else _kronecker(net, loss, params, x, y, method == "ekfac", key,
                                                   positive_int("samples", samples), block, damping + l2)
    return Preconditioner(method, net, loss, params, damping, l2, layers, (x, y), matrix, cg_iters)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _factor_sums(net, loss, samples, block, params, x, y, keys):
    """``(N·A^l, N·G^l)`` per layer, over the blocks of ``block`` rows in one program (``keys=None``: exact
    columns)."""
    def part(x, y, key):
        factors = curvature.kronecker_factors(net, params, x, y, loss, key=key, samples=samples)
        return [(x.shape[0] * f.A, x.shape[0] * f.G) for f in factors]

    return curvature.sum_over_chunks(part, block, x, y, keys)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _eigen_sums(net, loss, samples, block, params, x, y, keys, bases):
    """``N·Λ``: ``s Σ_x Σ_c (Q_Gᵀ Δ_{x,c})² ⊗ (Q_Aᵀ ā_x)²`` per layer (module docstring), over the blocks of
    ``block`` rows in one program."""
    def part(x, y, key):
        cols = curvature.split_columns(net, params, x, y, loss, key=key, samples=samples)
        out = []
        for (qg, qa), d, a in zip(bases, cols.deltas, cols.inputs):
            u = (d @ qg) ** 2  # (C, B, n_l)
            out.append(cols.scale * jnp.einsum("cbi,bj->ij", u, (a @ qa) ** 2))
        return out

    return curvature.sum_over_chunks(part, block, x, y, keys)


@functools.partial(jax.jit, static_argnums=(1,))
def _eigenbases(sums, n: int) -> tuple[list, list]:
    """Per layer ``(Q_G, Q_A)`` of the factors ``A = (N·A)/N``, ``G = (N·G)/N``, and ``g_i a_j`` ``(n_l, m)``."""
    bases, eigs = [], []
    for A, G in sums:
        a, qa = jnp.linalg.eigh((A + A.T) / (2 * n))
        g, qg = jnp.linalg.eigh((G + G.T) / (2 * n))
        bases.append((qg, qa))
        eigs.append(jnp.outer(jnp.maximum(g, 0), jnp.maximum(a, 0)))
    return bases, eigs


def _kronecker(net, loss, params, x, y, refit: bool, key, samples: int, block: int, shift: float) -> list:
    """Per layer ``(Q_G, Q_A, Λ̃)``, two passes over the data for EK-FAC (factors, then eigenvalues)."""
    n = x.shape[0]
    keys = None if key is None else jax.random.split(prng_key("key", key), len(_chunks(n, block)))
    bases, eigs = _eigenbases(_factor_sums(net, loss, samples, block, params, x, y, keys), n)
    if refit:
        eigs = [e / n for e in _eigen_sums(net, loss, samples, block, params, x, y, keys, bases)]
    return [(qg, qa, lam + shift) for (qg, qa), lam in zip(bases, eigs)]


def _bases(pre: Preconditioner) -> list:
    """Per layer ``(Q_G, Q_A)``; identities (``None``) for ``"cg"``."""
    return [(qg, qa) for qg, qa, _ in pre.layers] if pre.layers else [None] * pre.net.num_layers


@jax.jit
def _rotated(rows, bases) -> list:
    """Per layer ``(u, v) = (δ Q_G, ā Q_A)``."""
    return [(d, a) if b is None else (d @ b[0], a @ b[1]) for (d, a), b in zip(rows[0], bases)]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _solve(net, loss, l2, matrix, iters, params, x, y, damping, rows):
    """``S_t = M⁻¹ g_t`` per test row, per layer ``W̄``-shaped ``(B, n_l, m)``: CG on the hand-written product,
    one test point at a time (``lax.map``: a ``vmap`` of the batched softmax curvature miscompiles in float32
    on XLA's CPU backend beyond 2¹⁵ elements)."""
    op = curvature.product_operator(net, params, x, y, loss, l2, matrix=matrix)
    unravel = ravel_pytree(params)[1]

    def one(row):
        g = ravel_pytree([{k: d[:, None] * a[None, :-1] if k == "W" else d for k in layer}
                          for layer, (d, a) in zip(params, row)])[0]
        # CG starts from 0·g, not a literal zero: XLA:CPU (jaxlib 0.10) compiles a batch sum of a product with a
        # constant zero matrix, e.g. jnp.sum(x @ jnp.zeros((784, 32)), 0) for 128 or more rows, to NaN, and the
        # first product M·0 then poisons every iterate (tests/test_influence.py, the 512-row regression test).
        s = unravel(cg(lambda v: ravel_pytree(op(unravel(v)))[0] + damping * v, g, 0 * g, iters))
        return [jnp.concatenate([t["W"], t["b"][:, None]], axis=1) for t in s]

    return lax.map(one, rows[0])


@jax.jit
def _kron_pairs(test, train, eigs):
    """``Σ_l u_zᵀ S_t v_z`` ``(B_t, B_z)`` with ``S_t = (u_t v_tᵀ) / Λ̃ = M_l⁻¹ g_t`` in the eigenbasis, formed for
    one test row at a time (memory ``P + B_z·m``)."""
    def one(t):
        return sum(jnp.sum((u @ (ut[:, None] * vt[None, :] / lam)) * v, axis=1)
                   for (ut, vt), (u, v), lam in zip(t, train, eigs))

    return lax.map(one, test)


@jax.jit
def _pair_scores(directions, rows):
    """``Σ_l δ_zᵀ S_t ā_z`` ``(B_t, B_z)`` for the solved ``S_t`` ``(B_t, n_l, m)``, one test row at a time."""
    def one(s):
        return sum(jnp.sum((d @ st) * a, axis=1) for st, (d, a) in zip(s, rows))

    return lax.map(one, directions)


def _solved(pre: Preconditioner, rows) -> list:
    x, y = pre.train
    return _solve(pre.net, pre.loss, pre.l2, pre.matrix, pre.cg_iters, pre.params, x, y, pre.damping, rows)


def _scored_set(pre: Preconditioner, data, name: str):
    if not isinstance(pre, Preconditioner):
        raise TypeError(f"pre must be a Preconditioner (from fnn.influence.preconditioner); got {type(pre).__name__}.")
    return _data(name, pre.net, pre.params, pre.loss, pre.train if data is None else data)


def influence(pre: Preconditioner, test, train=None, *, block: int = 1024, top: int | None = None):
    """Koh & Liang's ``I(z, z_test) = −∇ℓ(z_test)ᵀ M⁻¹ ∇ℓ(z)`` for every test point and training example
    (module docstring): positive = harmful, negative = helpful.

    Args:
      pre: :func:`preconditioner` (the curvature of the training set).
      test: ``(x, y)``, ``N_test`` points. ``"kfac"``/``"ekfac"`` form ``M⁻¹ g_t`` for one test point at a time
        inside the contraction; ``"cg"`` solves once per test point (about ``2·cg_iters`` gradients of the
        training set each) and holds the ``N_test`` solutions, ``N_test · P`` numbers: score many test
        points in several calls.
      train: the examples to score, ``(x, y)``; default the preconditioner's training set.
      block: examples per block; top: return the :func:`top_k` ranking (``helpful="low"``) instead.

    Returns:
      ``(N_test, N_train)`` NumPy array (or a :class:`Ranking`).
    """
    xte, yte = _scored_set(pre, test, "test")
    xtr, ytr = _scored_set(pre, train, "training")
    block = _block(block)
    net, loss, params, bases = pre.net, pre.loss, pre.params, _bases(pre)
    tests = [_rows(net, loss, params, xte[lo:hi], yte[lo:hi]) for lo, hi in _chunks(xte.shape[0], block)]
    if pre.method == "cg":
        tests = [_solved(pre, rows) for rows in tests]  # N_test · P numbers: one solve per test point, once
        pairs = _pair_scores
    else:
        tests = [_rotated(rows, bases) for rows in tests]
        pairs = functools.partial(_kron_pairs, eigs=[lam for _, _, lam in pre.layers])

    def blocks():
        for lo, hi in _chunks(xtr.shape[0], block):
            rz = _rotated(_rows(net, loss, params, xtr[lo:hi], ytr[lo:hi]), bases)
            yield lo, hi, -np.concatenate([np.asarray(pairs(t, rz)) for t in tests], axis=0)

    return _collect(blocks(), xte.shape[0], xtr.shape[0], top, "low")


@jax.jit
def _kron_self(rotated, eigs):
    """``Σ_l Σ_{i,j} u_i² v_j² / Λ̃_ij`` ``(B,)`` of a block's rotated rows. A program of its own: compiled
    together with the rows and the rotation, XLA:CPU fused the squares into the rotation's matmul and ran
    the self-influence of 784-1024-1024-10 5× slower."""
    return sum(jnp.einsum("bi,ij,bj->b", u * u, 1 / lam, v * v) for (u, v), lam in zip(rotated, eigs))


@jax.jit
def _cg_self(directions, rows):
    return sum(jnp.einsum("bij,bi,bj->b", s, d, a) for s, (d, a) in zip(directions, rows[0]))


def self_influence(pre: Preconditioner, train=None, *, block: int = 1024) -> np.ndarray:
    """``⟨g_z, M⁻¹ g_z⟩ ≥ 0`` (``= −I(z, z)``) of every example of ``train`` (default: the preconditioner's
    training set): ``(N,)`` NumPy array. ``"kfac"``/``"ekfac"``: ``Σ_l Σ_{i,j} u_i² v_j² / Λ̃_ij``, about one
    gradient per example; ``"cg"``: one solve per example."""
    x, y = _scored_set(pre, train, "training")
    block = _block(block)
    out = []
    for lo, hi in _chunks(x.shape[0], block):
        if pre.method == "cg":
            rows = _rows(pre.net, pre.loss, pre.params, x[lo:hi], y[lo:hi])
            out.append(_cg_self(_solved(pre, rows), rows))
        else:
            rows = _rows(pre.net, pre.loss, pre.params, x[lo:hi], y[lo:hi])
            out.append(_kron_self(_rotated(rows, _bases(pre)), [lam for _, _, lam in pre.layers]))
    return np.concatenate([np.asarray(o) for o in out])
