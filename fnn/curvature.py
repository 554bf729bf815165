"""Curvature by hand: Hessian and Gauss-Newton products, GGN diagonals, Kronecker factors, sharpness.

Every quantity here extends the δ-recursion of :mod:`fnn.backprop` to second order and reads the
first-order pass through its public :class:`fnn.backprop.Trace`; nothing on these paths calls
autodiff. ``C(θ) = (1/N) Σ_x C_x(θ) + ½β Σ_l ‖W^l‖²`` as everywhere in fnn; a direction ``v`` has the
structure of ``params`` (``V^l``, ``v_b^l``).

**Hessian-vector products** by Pearlmutter's R-operator (Pearlmutter, "Fast exact multiplication by
the Hessian", Neural Computation 1994), ``R{f} = ∂f(θ + r v)/∂r`` at ``r = 0``:

- forward: ``R{a^0} = 0``, ``R{z^l} = V^l a^{l−1} + W^l R{a^{l−1}} + v_b^l``, ``R{a^l} = φ'(z^l) R{z^l}``;
- output: ``R{δ^L} = H_x R{o}`` at the logits for a canonical pair; else, with ``g = ∂C_x/∂a^L``,
  ``R{δ^L} = φ_L'ᵀ (H_x R{a^L}) + ∂_z[gᵀ φ_L'] R{z^L}`` (:attr:`fnn.activations.Activation.backward_r`);
- backward: ``R{δ^l} = (R{δ^{l+1}} W^{l+1} + δ^{l+1} V^{l+1}) ⊙ φ'(z^l) + (δ^{l+1} W^{l+1}) ⊙ φ''(z^l) ⊙ R{z^l}``;
- ``R{∂C/∂W^l} = (1/N)(R{δ^l}ᵀ a^{l−1} + (δ^l)ᵀ R{a^{l−1}}) + β V^l``, ``R{∂C/∂b^l} = (1/N) Σ_x R{δ^l}``.

**Gauss-Newton products** ``G v = (1/N) Σ_x J_xᵀ H_x J_x v + β v_W`` (Schraudolph, "Fast curvature
matrix-vector products for second-order gradient descent", Neural Computation 2002). ``J_x`` is the
Jacobian of the split point ``o`` for sample ``x`` and ``H_x = ∂²C_x/∂o²``
(:func:`fnn.losses.output_curvature`): the logits ``z^L`` for a canonical pair (softmax or sigmoid
cross-entropy: the softmax belongs to the loss), the output ``a^L`` otherwise. The forward pass is the
R-pass above (``J v``); the backward pass is the δ-recursion run on ``H_x J_x v`` alone, without the
terms in ``V``, ``φ''`` and ``R{a}`` that make the Hessian. Every ``H_x`` is positive semi-definite,
so ``G`` is; the L2 term is its own Gauss-Newton matrix ``βI`` on the weights.

**Diagonals and Kronecker factors.** Factor ``H_x = S_x S_xᵀ`` (``K`` columns) and back-propagate each
column ``s`` as a δ: ``Δ^L = s`` (or ``φ_L'ᵀ s`` at ``a^L``), ``Δ^l = (Δ^{l+1} W^{l+1}) ⊙ φ'(z^l)``. Then
``diag G = (1/N) Σ_x Σ_c (Δ^l_{x,c})² ⊗ (a^{l−1}_x)²`` (+ β on the weights), one contraction as in
:mod:`fnn.per_example` (Dangel, Kunstner & Hennig, "BackPACK", ICLR 2020). The Monte-Carlo variant
back-propagates ``M`` random columns with ``E[s sᵀ] = H_x`` per sample instead of ``K``. The
Kronecker factors of layer ``l`` (Martens & Grosse, "Optimizing neural networks with
Kronecker-factored approximate curvature", ICML 2015), with the bias folded in as a constant input
``ā = [a^{l−1}; 1]``, are ``A^l = (1/N) Σ_x ā_x ā_xᵀ`` and ``G^l = (1/N) Σ_x Σ_c Δ^l_{x,c} Δ^{l ᵀ}_{x,c}``
from the exact columns (KFLR) or the sampled ones (KFAC).

**Sharpness**: the largest eigenvalue of ``H`` or ``G`` by power iteration on these products.

Costs, for a network whose gradient costs one forward and one backward pass: ``H v`` and ``G v``
about two gradients (a forward R-pass and a backward R-pass beside the trace); the exact diagonal and
KFLR ``K + 1`` gradients' worth of matmuls (``K`` columns); the MC diagonal and KFAC with ``M``
samples ``M + 1``; sharpness one product per iteration.

Batch norm: supported in eval mode (``state`` given, ``train=False``: the layer is the fixed affine
map ``γ ⊙ (h − m)/√(v + ε) + β``; its ``γ``, ``β`` get R-derivatives and diagonals, the Kronecker
factors are refused). In train mode every sample's output depends on the whole batch, so ``C_x`` has
no per-sample Gauss-Newton split; these functions refuse it (``ValueError``).

Usage::

    hv = fnn.curvature.hvp(net, params, x, y, loss, v, l2)
    gv = fnn.curvature.ggn_vp(net, params, x, y, loss, v, l2)
    diag = fnn.curvature.ggn_diag(net, params, x, y, loss, l2)
    factors = fnn.curvature.kronecker_factors(net, params, x, y, loss)       # KFLR; key= for KFAC
    cols = fnn.curvature.split_columns(net, params, x, y, loss)              # the columns of H_x as δ's
    o, jac = fnn.curvature.output_jacobian(net, params, x, loss)             # ∂o_k/∂z^l per sample
    top = fnn.curvature.sharpness(net, params, x, y, loss, key=key)          # top.value, top.converged
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from fnn.activations import PIECEWISE_LINEAR
from fnn.backprop import Trace, backprop_trace
from fnn.checks import is_concrete, positive_int, prng_key, real_in
from fnn.losses import Curvature, Loss, check_output, l2_active, mark_invalid, output_curvature
from fnn.mlp import MLP, Params, State


class Kronecker(NamedTuple):
    """The Kronecker factors of one layer: ``A (n_{l−1}+1, n_{l−1}+1)`` and ``G (n_l, n_l)``.

    ``A ⊗ G`` approximates the layer's Gauss-Newton block for ``vec(W̄)``, ``W̄ = [W^l | b^l]``
    stacked column by column (column-major ``vec``); for the row-major flattening ``W̄.ravel()`` the
    block is ``G ⊗ A``. For a single sample the approximation is exact.
    """

    A: jax.Array
    G: jax.Array


class Sharpness(NamedTuple):
    """Result of :func:`sharpness`: the eigenvalue ``value``, its unit ``vector`` (``params``'
    structure), the products used (``iterations``), whether the residual test passed (``converged``),
    and the relative residual ``‖M v − λ v‖ / |λ|`` at the end (``residual``)."""

    value: jax.Array
    vector: Params
    iterations: jax.Array
    converged: jax.Array
    residual: jax.Array


def _prepare(net: MLP, params: Params, x, y, loss: Loss | str, l2, state: State | None, train: bool, what: str):
    """The first-order pass and everything the second-order passes need, with the checks they share."""
    loss = check_output(loss, net.output)
    curv = output_curvature(loss, net.output)
    if state is not None and train and any(net.normalized):
        raise ValueError(
            f"{what} is not defined for batch normalization in train mode: every sample's output depends "
            "on the whole batch through its mean and variance, so the cost has no per-sample split. Pass "
            "train=False to use the running statistics (eval mode)."
        )
    for act in net.activations:
        if act.backward_r is None:
            raise ValueError(f"{what} needs φ'' of every activation; {act.name!r} has none (see fnn.activations).")
    _, _, _, trace = backprop_trace(net, params, x, y, loss, l2, state, train=False)
    target, valid = loss.target(trace.acts[-1], y)
    return loss, curv, trace, target, valid


def _r_forward(net: MLP, params: Params, trace: Trace, v: Params):
    """``(R{h^l}, R{z^l}, R{a^l})`` of every layer: the forward R-pass, i.e. ``J v`` layer by layer."""
    f = trace.forward
    rhs, rzs, ras = [], [], []
    ra = None  # R{a^0} = 0
    for l, (layer, dv, act, bn) in enumerate(zip(params, v, net.activations, f.bn)):
        rh = net.matmul(f.acts[l], dv["W"].T)
        if ra is not None:
            rh = rh + net.matmul(ra, layer["W"].T)
        if bn is None:
            rz = rh + dv["b"]
        else:  # eval mode: z = γ ⊙ x̂ + β with x̂ = (h − m) inv_std
            rz = dv["gamma"] * bn.xhat + layer["gamma"] * bn.inv_std * rh + dv["beta"]
        ra = act.backward(f.zs[l], f.acts[l + 1], rz)  # symmetric Jacobian: J_φ rz
        rhs.append(rh)
        rzs.append(rz)
        ras.append(ra)
    return rhs, rzs, ras


def _top_r_delta(net, loss, curv: Curvature, trace: Trace, target, rz, ra, hessian: bool):
    """``R{δ^L}``: the loss's curvature applied to ``J v`` at the split point, plus (Hessian only)
    the output activation's second-order term."""
    z, a = trace.zs[-1], trace.acts[-1]
    if curv.at_logits:
        return curv.hvp(z, target, rz)
    out = net.activations[-1]
    rdelta = out.backward(z, a, curv.hvp(a, target, ra))
    if hessian and out.name not in PIECEWISE_LINEAR:
        rdelta = rdelta + out.backward_r(z, a, loss.grad(a, target), rz)
    return rdelta


def _r_backward(net: MLP, params: Params, trace: Trace, v: Params, rdelta, rhs, rzs, ras, l2, hessian: bool):
    """The backward R-pass from ``R{δ^L}``: ``R{∂C/∂θ}`` with ``params``' structure."""
    f = trace.forward
    n = f.acts[0].shape[0]
    out = [None] * net.num_layers
    for l in reversed(range(net.num_layers)):
        layer, dv, bn = params[l], v[l], f.bn[l]
        delta, d_h = trace.deltas[l], trace.weight_deltas[l]
        g = {}
        if bn is None:
            rd_h = rdelta
            g["b"] = jnp.sum(rdelta, axis=0) / n
        else:
            rd_h = layer["gamma"] * bn.inv_std * rdelta
            rgam = rdelta * bn.xhat
            if hessian:
                rd_h = rd_h + dv["gamma"] * bn.inv_std * delta
                rgam = rgam + delta * bn.inv_std * rhs[l]  # R{x̂} = inv_std R{h}
            g["gamma"], g["beta"] = jnp.sum(rgam, axis=0) / n, jnp.sum(rdelta, axis=0) / n
        rW = net.matmul(rd_h.T, f.acts[l])
        if hessian and l > 0:
            rW = rW + net.matmul(d_h.T, ras[l - 1])
        g["W"] = rW / n
        if l2_active(l2):
            g["W"] = g["W"] + l2 * dv["W"]
        out[l] = {k: g[k] for k in layer}
        if l > 0:
            act = net.activations[l - 1]
            back = net.matmul(rd_h, layer["W"])
            if hessian:
                back = back + net.matmul(d_h, dv["W"])
            rdelta = act.backward(f.zs[l - 1], f.acts[l], back)
            if hessian and act.name not in PIECEWISE_LINEAR:  # φ'' = 0: no term (and no extra matmul)
                rdelta = rdelta + act.backward_r(f.zs[l - 1], f.acts[l], net.matmul(d_h, layer["W"]), rzs[l - 1])
    return out


def _product(net, params, v, loss, curv, trace, target, valid, l2, hessian: bool) -> Params:
    net.check_params(v, "v")
    rhs, rzs, ras = _r_forward(net, params, trace, v)
    rdelta = mark_invalid(_top_r_delta(net, loss, curv, trace, target, rzs[-1], ras[-1], hessian), valid)
    return _r_backward(net, params, trace, v, rdelta, rhs, rzs, ras, l2, hessian)


def hvp(net: MLP, params: Params, x, y, loss: Loss | str, v: Params, l2: float = 0.0,
        state: State | None = None, train: bool = False) -> Params:
    """The Hessian-vector product ``H v = ∇²C(θ) v`` by the R-operator (module docstring).

    ``v`` has ``params``' structure and dtype; so has the result. Exact for every activation and
    every accepted loss/output pair (at a kink of relu, leaky_relu or mae the second derivative is
    taken as 0, as ``jax.grad`` does). Cost about two gradients. With batch norm, ``state`` and
    ``train=False`` (eval mode) are required.
    """
    loss, curv, trace, target, valid = _prepare(net, params, x, y, loss, l2, state, train, "the Hessian product")
    return _product(net, params, v, loss, curv, trace, target, valid, l2, hessian=True)


def ggn_vp(net: MLP, params: Params, x, y, loss: Loss | str, v: Params, l2: float = 0.0,
           state: State | None = None, train: bool = False) -> Params:
    """The generalized Gauss-Newton product ``G v = (1/N) Σ_x J_xᵀ H_x J_x v + β v_W`` (module docstring).

    Split at the logits for a canonical pair, at ``a^L`` otherwise (:func:`fnn.losses.output_curvature`).
    Same arguments and cost as :func:`hvp`.
    """
    loss, curv, trace, target, valid = _prepare(net, params, x, y, loss, l2, state, train, "the Gauss-Newton product")
    return _product(net, params, v, loss, curv, trace, target, valid, l2, hessian=False)


def product_operator(net: MLP, params: Params, x, y, loss: Loss | str, l2: float = 0.0, *, matrix: str = "ggn",
                     state: State | None = None, train: bool = False) -> Callable[[Params], Params]:
    """``v ↦ G v`` (``matrix="ggn"``, :func:`ggn_vp`) or ``v ↦ H v`` (``"hessian"``, :func:`hvp`) at one
    point, with the forward pass and the first-order backward pass done once, in this call.

    For many products at the same ``params`` and batch (conjugate gradient, power iteration): each
    product then costs the R-passes only, about 4 matmuls per layer against a gradient's 3, where
    :func:`ggn_vp` and :func:`hvp` redo the forward pass every time (under ``jit`` XLA does not hoist
    it out of a loop). Arguments as :func:`hvp`.
    """
    if matrix not in ("hessian", "ggn"):
        raise ValueError(f"matrix must be 'hessian' or 'ggn'; got {matrix!r}.")
    what = "the Hessian product" if matrix == "hessian" else "the Gauss-Newton product"
    loss, curv, trace, target, valid = _prepare(net, params, x, y, loss, l2, state, train, what)
    return lambda v: _product(net, params, v, loss, curv, trace, target, valid, l2, hessian=matrix == "hessian")


def _columns(net: MLP, params: Params, trace: Trace, curv: Curvature, top):
    """Back-propagate the columns ``top (C, N, K)`` at the split point: per layer ``(Δ (C, N, n_l), Δ_h)``,
    ``Δ`` at ``z^l`` and ``Δ_h`` the rows that meet ``a^{l−1}`` (``γ ⊙ inv_std ⊙ Δ`` with batch norm)."""
    f = trace.forward
    c, n = top.shape[:2]
    delta = top if curv.at_logits else net.activations[-1].backward(f.zs[-1], f.acts[-1], top)
    out = [None] * net.num_layers
    for l in reversed(range(net.num_layers)):
        layer, bn = params[l], f.bn[l]
        d_h = delta if bn is None else layer["gamma"] * bn.inv_std * delta
        out[l] = (delta, d_h)
        if l > 0:
            back = net.matmul(d_h.reshape(c * n, -1), layer["W"]).reshape(c, n, -1)
            delta = net.activations[l - 1].backward(f.zs[l - 1], f.acts[l], back)
    return out


class Columns(NamedTuple):
    """Columns back-propagated as δ's through one forward pass (:func:`split_columns`,
    :func:`output_jacobian`).

    - ``inputs[l]``: ``ā^{l−1} = [a^{l−1}; 1]`` of layer ``l``, ``(N, n_{l−1}+1)``;
    - ``deltas[l]``: ``Δ^l``, ``(C, N, n_l)``: column ``c`` of sample ``x`` back-propagated to ``z^l``;
    - ``scale``: the weight of a column (1 for exact columns, ``1/M`` for ``M`` sampled ones).

    The per-sample gradient of column ``c`` for layer ``l``'s ``W̄ = [W | b]`` is the outer product
    ``Δ^l_{x,c} ā_xᵀ`` (``(n_l, n_{l−1}+1)``, row-major ``W̄.ravel()`` = ``Δ ⊗ ā``).
    """

    inputs: list
    deltas: list
    scale: float


def _plain_only(net: MLP, what: str) -> None:
    if any(net.normalized):
        raise ValueError(f"{what} is defined for plain layers z = W a + b; this network has batch norm. Use a "
                         "network without batch norm.")


def _inputs(f) -> list:
    n = f.acts[0].shape[0]
    return [jnp.concatenate([a, jnp.ones((n, 1), a.dtype)], axis=1) for a in f.acts[:-1]]


def split_columns(net: MLP, params: Params, x, y, loss: Loss | str, *, key: jax.Array | int | None = None,
                  samples: int = 1) -> Columns:
    """The columns of ``H_x = S_x S_xᵀ`` at the split point back-propagated as δ's (module docstring):
    the ``K`` exact ones (``key=None``) or ``samples`` sampled ones per example (``E[s sᵀ] = H_x``).

    The Gauss-Newton matrix is their Gram matrix: ``G = (scale/N) Σ_x Σ_c g_{x,c} g_{x,c}ᵀ`` with
    ``g_{x,c}`` the per-sample gradients of :class:`Columns` (without the L2 term). Plain layers only.
    """
    _plain_only(net, "split_columns")
    _, curv, trace, target, valid = _prepare(net, params, x, y, loss, 0.0, None, False, "the Gauss-Newton columns")
    if key is None:
        top, scale = _exact_top(curv, trace, target, valid), 1.0
    else:
        m = _check_samples(samples)
        top = _sampled_top(curv, trace, target, valid, prng_key("key", key), m)
        scale = 1.0 / m
    return Columns(_inputs(trace.forward), [d for d, _ in _columns(net, params, trace, curv, top)], scale)


def output_jacobian(net: MLP, params: Params, x, loss: Loss | str) -> tuple[jax.Array, Columns]:
    """The split point ``o (N, K)`` of ``loss`` (the logits ``z^L`` for a canonical pair, else ``a^L``)
    and its Jacobian as back-propagated columns: ``deltas[l][k] = ∂o_k/∂z^l`` per sample, so that
    ``∂o_k/∂W̄^l = Δ^l_k ā^{l−1 ᵀ}`` (:class:`Columns`, ``scale`` 1). One forward pass and ``K`` δ-recursions;
    no target is needed. Plain layers only."""
    _plain_only(net, "output_jacobian")
    loss = check_output(loss, net.output)
    curv = output_curvature(loss, net.output)
    if jnp.ndim(x) == 2 and jnp.shape(x)[0] == 0:
        raise ValueError("x is empty (0 rows): the Jacobian needs at least one input, shape (batch, d) with batch ≥ 1.")
    f = net.forward_trace(params, x, None, train=False)
    o = f.zs[-1] if curv.at_logits else f.acts[-1]
    n, k = o.shape
    top = jnp.broadcast_to(jnp.eye(k, dtype=o.dtype)[:, None, :], (k, n, k))
    return o, Columns(_inputs(f), [d for d, _ in _columns(net, params, Trace(f, None, None, None), curv, top)], 1.0)


def _diag_from_columns(net, params, trace, columns, l2, scale: float = 1.0) -> Params:
    f = trace.forward
    n = f.acts[0].shape[0]
    out = []
    for l, (layer, (delta, d_h), bn) in enumerate(zip(params, columns, f.bn)):
        a = f.acts[l]
        sq = jnp.sum(d_h * d_h, axis=0)  # Σ_c Δ_h² (N, n_l)
        d = {"W": net.matmul(sq.T, a * a) * (scale / n)}
        if l2_active(l2):
            d["W"] = d["W"] + l2
        dd = jnp.sum(delta * delta, axis=(0, 1)) * (scale / n)
        if bn is None:
            d["b"] = dd
        else:
            d["gamma"] = jnp.sum(jnp.square(delta * bn.xhat), axis=(0, 1)) * (scale / n)
            d["beta"] = dd
        out.append({k: d[k] for k in layer})
    return out


def _exact_top(curv: Curvature, trace: Trace, target, valid):
    o = trace.zs[-1] if curv.at_logits else trace.acts[-1]
    s = mark_invalid(curv.sqrt(o, target), valid)  # (N, K, C)
    return jnp.moveaxis(s, 2, 0)  # (C, N, K)


def _sampled_top(curv: Curvature, trace: Trace, target, valid, key, samples: int):
    o = trace.zs[-1] if curv.at_logits else trace.acts[-1]
    cols = jax.vmap(lambda k: curv.sample(k, o, target))(jax.random.split(key, samples))  # (M, N, K)
    return mark_invalid(cols.swapaxes(0, 1), valid).swapaxes(0, 1)


def _check_samples(samples) -> int:
    return positive_int("samples (columns drawn per example)", samples)


def ggn_diag(net: MLP, params: Params, x, y, loss: Loss | str, l2: float = 0.0,
             state: State | None = None, train: bool = False) -> Params:
    """The exact diagonal of the Gauss-Newton matrix ``G``, with ``params``' structure.

    ``diag G^W = (1/N) Σ_x Σ_c (Δ^l_{x,c} ⊙ Δ^l_{x,c})ᵀ (a_x ⊙ a_x) + β``, ``diag G^b = (1/N) Σ_x Σ_c Δ²``,
    from the ``K`` columns of ``S_x`` (``H_x = S_x S_xᵀ``) back-propagated as δ's. Cost about ``K + 1``
    gradients.
    """
    _, curv, trace, target, valid = _prepare(net, params, x, y, loss, l2, state, train, "the GGN diagonal")
    columns = _columns(net, params, trace, curv, _exact_top(curv, trace, target, valid))
    return _diag_from_columns(net, params, trace, columns, l2)


def ggn_diag_mc(net: MLP, params: Params, x, y, loss: Loss | str, l2: float = 0.0, *, key: jax.Array | int,
                samples: int = 1, state: State | None = None, train: bool = False) -> Params:
    """A Monte-Carlo estimate of :func:`ggn_diag`: ``samples`` random columns per example instead of ``K``.

    Each column has ``E[s sᵀ] = H_x`` (:attr:`fnn.losses.Curvature.sample`: the gradient at a target
    drawn from the model's predictive distribution where the loss is its negative log-likelihood), so
    the estimate is unbiased; its average over draws converges to the exact diagonal. The L2 term ``β``
    is added exactly. Arguments as :func:`ggn_diag`, then keyword-only ``key`` (a PRNG key or an int
    seed) and ``samples``. Cost about ``samples + 1`` gradients.
    """
    m = _check_samples(samples)
    key = prng_key("key", key)
    _, curv, trace, target, valid = _prepare(net, params, x, y, loss, l2, state, train, "the GGN diagonal")
    top = _sampled_top(curv, trace, target, valid, key, m)
    return _diag_from_columns(net, params, trace, _columns(net, params, trace, curv, top), l2, 1.0 / m)


def kronecker_factors(net: MLP, params: Params, x, y, loss: Loss | str, key: jax.Array | None = None,
                      samples: int = 1) -> list[Kronecker]:
    """Per layer the Kronecker factors ``(A^l, G^l)`` of the Gauss-Newton block (module docstring).

    ``key=None``: ``G^l`` from the exact columns of ``S_x`` (KFLR, ``K + 1`` gradients' cost); with a
    ``key`` (a PRNG key or an int seed), from ``samples`` sampled columns per example (KFAC,
    ``samples + 1``). ``A^l`` appends the constant 1 to ``a^{l−1}`` for the bias. The L2 term is not in
    the factors (an optimizer adds it to its damping). Batch-normalized layers have no such factors: refused.
    """
    if any(net.normalized):
        raise ValueError(
            "Kronecker factors are defined for plain layers z = W a + b; this network has batch norm, whose "
            "γ and β have no Kronecker structure. Use a network without batch norm, or ggn_diag."
        )
    _, curv, trace, target, valid = _prepare(net, params, x, y, loss, 0.0, None, False, "the Kronecker factors")
    m = _check_samples(samples)
    if key is None:
        top, scale = _exact_top(curv, trace, target, valid), 1.0
    else:
        top, scale = _sampled_top(curv, trace, target, valid, prng_key("key", key), m), 1.0 / m
    f = trace.forward
    n = f.acts[0].shape[0]
    out = []
    for l, (delta, _) in enumerate(_columns(net, params, trace, curv, top)):
        a = f.acts[l]
        abar = jnp.concatenate([a, jnp.ones((n, 1), a.dtype)], axis=1)
        rows = delta.reshape(-1, delta.shape[-1])
        out.append(Kronecker(gram(net, abar) / n, gram(net, rows) * (scale / n)))
    return out


def sum_over_chunks(part: Callable, size: int, x: jax.Array, y: jax.Array, keys: jax.Array | None = None):
    """``Σ_c part(x_c, y_c, k_c)`` over the chunks of ``size`` rows of ``(x, y)``, in order, for use inside a
    jitted caller: a loop over the whole chunks (one compiled body), then the last, shorter chunk.

    ``part`` returns a pytree of sums over its rows (curvature sums, log-likelihoods); ``keys`` holds one
    PRNG key per chunk (``⌈N / size⌉``), or is ``None`` (``part`` gets ``None``). The result equals a Python
    loop over the same chunks to rounding, at the memory of one chunk.
    """
    size = positive_int("size (rows per chunk)", size)
    n = x.shape[0]
    if n == 0 or jnp.shape(y)[:1] != (n,):
        raise ValueError(f"x and y must hold the same, non-zero number of rows; got {n} and {jnp.shape(y)[:1]}.")
    size = min(size, n)
    whole = n // size
    if keys is not None and keys.shape[0] != -(-n // size):
        raise ValueError(f"keys must hold one key per chunk, ⌈{n}/{size}⌉ = {-(-n // size)}; got {keys.shape[0]}.")

    def key(i):
        return None if keys is None else keys[i]

    def body(i, acc):
        rows = (lax.dynamic_slice_in_dim(x, i * size, size), lax.dynamic_slice_in_dim(y, i * size, size))
        return jax.tree.map(jnp.add, acc, part(*rows, key(i)))

    acc = part(x[:size], y[:size], key(0))
    if whole > 1:  # a loop that never runs would still be compiled
        acc = lax.fori_loop(1, whole, body, acc)
    if n % size:
        acc = jax.tree.map(jnp.add, acc, part(x[whole * size:], y[whole * size:], key(whole)))
    return acc


GRAM_BLOCK = 384  # columns per block of a wide Gram matrix


def gram(net: MLP, a: jax.Array) -> jax.Array:
    """``aᵀ a`` ``(n, n)`` for ``a`` ``(M, n)``, exactly symmetric, in ``net``'s matmul precision.

    Up to ``GRAM_BLOCK`` columns: one matmul. Wider: the columns in ``b = ⌈n / GRAM_BLOCK⌉`` equal blocks,
    the ``b (b + 1) / 2`` upper blocks ``a_iᵀ a_j`` (``i ≤ j``) multiplied and the lower ones mirrored,
    ``(b + 1) / (2b)`` of the multiply-adds (5/8 … 3/4 for the input factor of a 784-input network).
    """
    if jnp.ndim(a) != 2:
        raise ValueError(f"gram takes a matrix (M, n) of M rows; got shape {tuple(jnp.shape(a))}.")
    n = a.shape[1]
    if n <= GRAM_BLOCK:
        return net.matmul(a.T, a)
    width = -(-n // -(-n // GRAM_BLOCK))
    parts = [a[:, i:i + width] for i in range(0, n, width)]
    upper = {(i, j): net.matmul(parts[i].T, parts[j]) for i in range(len(parts)) for j in range(i, len(parts))}
    return jnp.block([[upper[i, j] if i <= j else upper[j, i].T for j in range(len(parts))]
                      for i in range(len(parts))])


def sharpness(net: MLP, params: Params, x, y, loss: Loss | str, l2: float = 0.0, *, matrix: str = "hessian",
              key: jax.Array | None = None, start: Params | None = None, tol: float = 1e-4,
              max_iter: int = 100, state: State | None = None, train: bool = False) -> Sharpness:
    """The largest eigenvalue of the Hessian (``matrix="hessian"``) or the Gauss-Newton matrix
    (``"ggn"``) by power iteration on :func:`hvp` / :func:`ggn_vp`, under ``jit`` if you like.

    Power iteration ``v ← M v / ‖M v‖`` from ``start`` (say the previous result's ``vector``, when
    tracking the sharpness along training) or a random unit ``v`` (``key``, a PRNG key or an int seed;
    default 0). A given ``start`` is mixed with a random unit direction of length 0.1 (from ``key``):
    started exactly on an eigenvector of a smaller eigenvalue, power iteration would otherwise stay on
    it and report it as converged. ``converged`` certifies that ``value`` is *an* eigenvalue to ``tol``;
    it is the largest unless the start's component along the top eigenvector is so small (about
    ``tol``; a random direction of ``P`` entries has about ``1/√P``) that the test passes first. With
    ``λ = vᵀ M v``; it stops when the residual ``‖M v − λ v‖ ≤ tol · |λ|`` (then some eigenvalue of the
    symmetric ``M`` lies within ``tol · |λ|`` of ``λ``, and the Rayleigh quotient's own error is of
    order ``tol² |λ|`` relative to the spectral gap) or after ``max_iter`` products. Power iteration finds
    the eigenvalue of largest magnitude; for the Hessian, when that is negative, a second run on
    ``M − λ₁ I`` (whose top eigenvalue is ``λ_max − λ₁ ≥ 0``) gives ``λ_max``, at up to twice the cost.
    Cost: one product (about two gradients) per iteration; it converges like ``(λ₂/λ₁)^k``, so a small
    gap between the two largest eigenvalues needs many; ``converged`` says whether the test passed.
    """
    if matrix not in ("hessian", "ggn"):
        raise ValueError(f"matrix must be 'hessian' or 'ggn'; got {matrix!r}.")
    max_iter = positive_int("max_iter", max_iter)
    tol = real_in("tol", tol, 0.0, low_open=True)
    what = "the Hessian's sharpness" if matrix == "hessian" else "the GGN's sharpness"
    loss, curv, trace, target, valid = _prepare(net, params, x, y, loss, l2, state, train, what)
    flat, unravel = ravel_pytree(params)

    def product(u):
        out = _product(net, params, unravel(u), loss, curv, trace, target, valid, l2, hessian=matrix == "hessian")
        return ravel_pytree(out)[0]

    noise = jax.random.normal(prng_key("key", 0 if key is None else key), flat.shape, flat.dtype)
    noise = noise / jnp.linalg.norm(noise)
    if start is None:
        start = noise
    else:
        net.check_params(start, "start")
        start = ravel_pytree(start)[0].astype(flat.dtype)
        norm = jnp.linalg.norm(start)
        if is_concrete(norm) and not (math.isfinite(float(norm)) and float(norm) > 0):
            raise ValueError(f"start must be a finite direction of nonzero length; its norm is {float(norm)}. Pass "
                             "start=None for a random one (from key), or a previous result's vector.")
        # An eigenvector of a smaller eigenvalue would hold the iteration for good (it has no component
        # along the top one to grow): a tenth of a random direction is mixed in.
        start = jnp.where(norm > 0, start / jnp.where(norm > 0, norm, 1), 0) + _MIX * noise
        start = start / jnp.linalg.norm(start)
    first = _power(product, start, 0.0, tol, max_iter)
    if matrix == "hessian":
        def shifted(_):
            lam1 = first[0]
            second = _power(lambda u: product(u) - lam1 * u, start, lam1, tol, max_iter)
            return second[0] + lam1, second[1], first[2] + second[2], second[3], second[4]

        result = lax.cond(first[0] < 0, shifted, lambda _: first, None)
    else:
        result = first
    value, vec, its, ok, res = result
    return Sharpness(value, unravel(vec), its, ok, res)


_MIX = 0.1  # the length of the random direction mixed into a given start


def _power(product, start, shift, tol, max_iter):
    """Power iteration on ``product``; ``(λ, v, iterations, converged, relative residual)``. ``shift`` is
    added back only to judge the residual against the unshifted eigenvalue's size."""
    tiny = jnp.finfo(start.dtype).tiny

    def body(carry):
        v, _, its, _, _ = carry
        w = product(v)
        lam = jnp.vdot(v, w)
        res = jnp.linalg.norm(w - lam * v) / jnp.maximum(jnp.abs(lam + shift), tiny)
        norm = jnp.linalg.norm(w)
        v_next = jnp.where(norm > 0, w / jnp.maximum(norm, tiny), v)
        return v_next, lam, its + 1, res <= tol, res

    def cond(carry):
        _, _, its, ok, _ = carry
        return (its < max_iter) & ~ok

    zero = jnp.zeros((), start.dtype)
    v, lam, its, ok, res = lax.while_loop(cond, body, (start, zero, jnp.int32(0), jnp.bool_(False), zero + jnp.inf))
    return lam, v, its, ok, res
