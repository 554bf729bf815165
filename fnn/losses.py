"""Cost functions, each paired with its derivative ∂C_x/∂a.

The cost of a batch is the mean of per-sample costs, ``C = (1/N) Σ_x C_x`` (the notes' convention),
so every loss here is ``loss(output, target) -> scalar`` averaged over the batch. The backprop
works per sample with ``grad`` (``∂C_x/∂a``, shape ``(N, K)``) and applies the ``1/N`` once,
in BP3/BP4.

``output`` has shape ``(N, K)``. Targets:

- regression losses (``mse``, ``half_mse``, ``mae``): an array of the output's shape, or ``(N,)``
  when ``K = 1``;
- binary losses: 0/1 (or soft, in [0, 1]) targets of the output's shape, or ``(N,)`` when ``K = 1``;
- categorical losses: integer class labels ``(N,)`` in ``[0, K)`` or one-hot/probability rows
  ``(N, K)``. Labels known at trace time are range-checked (``ValueError``); labels only known
  under jit cannot raise, so a sample with an out-of-range label makes the loss and its gradient
  NaN instead of silently contributing nothing.

Per-sample costs (``p`` probabilities, ``z`` logits, ``y`` target, ``σ`` the logistic sigmoid):

==================================  ===================================================  =================
loss                                C_x                                                  ∂C_x/∂a
==================================  ===================================================  =================
``mse``                             (1/K) Σ_k (a_k − y_k)²                               (2/K)(a − y)
``half_mse``                        ½ ‖a − y‖²  (the classic E)                          a − y
``mae``                             (1/K) Σ_k |a_k − y_k|                                 sign(a − y)/K
``binary_cross_entropy``            −(1/K) Σ_k y_k log p_k + (1−y_k) log(1−p_k)         (p−y)/(p(1−p)K)
``binary_cross_entropy_with_logits``(1/K) Σ_k log(1 + e^{z_k}) − z_k y_k              (σ(z) − y)/K
``categorical_cross_entropy``       −Σ_k y_k log p_k                                     −y/p
``softmax_cross_entropy``           −Σ_k y_k log softmax(z)_k                            (Σy) softmax(z) − y
                                    = (Σ_k y_k) logsumexp(z) − Σ_k y_k z_k, with the
                                    log-sum-exp shifted by max_k z_k
==================================  ===================================================  =================

Probabilities are clipped to ``[eps, 1 − eps]`` (``eps`` the dtype's machine epsilon) inside the
logarithms so that probabilities of exactly 0 or 1 give finite costs and gradients. The hand-written
derivatives are those of the cost as written, clip included: ``0`` where a probability was clipped.

Each loss names the output activations it accepts (:attr:`Loss.outputs`, checked by
:func:`check_output` wherever a network meets a loss): the losses on probabilities need an output in
``[0, 1]`` (sigmoid or softmax; on any other output the clip would flatten the cost and its
gradient), the losses on logits take the identity output, and the regression losses take any.
Soft class targets are rows of non-negative weights; a row summing to ``s`` counts as ``s`` samples'
worth of its normalized distribution (negative entries are refused when the values are known).

Canonical pairs fuse BP1: with the matching output activation (sigmoid or softmax for the losses
on probabilities, identity for the losses on logits), ``δ^L = φ(z^L) − y`` with φ the sigmoid or
softmax (divided by ``K`` for the binary losses, which average over outputs; scaled by ``Σ_k y_k``
for soft class targets), never dividing by a probability.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnn import checks
from fnn.activations import softmax

Array = jax.Array

REGRESSION, BINARY, CLASSES = "regression", "binary", "classes"


class Loss(NamedTuple):
    """A cost function and its derivative.

    Attributes:
      name: registry name.
      targets: ``"regression"``, ``"binary"`` or ``"classes"``: how targets are read.
      per_sample: ``(a (N, K), y (N, K)) -> C_x (N,)``, ``y`` already converted by :meth:`target`.
      grad: ``(a, y) -> ∂C_x/∂a (N, K)``.
      canonical_output: the output activation for which ``fused_delta`` is δ^L, or ``None``.
      fused_delta: ``(z^L, y) -> δ^L (N, K)`` for the canonical pair.
      outputs: the output activations this loss accepts (:func:`check_output`); ``None``: any.
    """

    name: str
    targets: str
    per_sample: Callable[[Array, Array], Array]
    grad: Callable[[Array, Array], Array]
    canonical_output: str | None = None
    fused_delta: Callable[[Array, Array], Array] | None = None
    outputs: frozenset[str] | None = None

    def __call__(self, output: Array, target: Array) -> Array:
        """The batch cost ``(1/N) Σ_x C_x`` (scalar)."""
        y, valid = self.target(output, target)
        return jnp.mean(mark_invalid(self.per_sample(output, y), valid))

    def target(self, output: Array, target: Array) -> tuple[Array, Array | None]:
        """Validate ``target`` against ``output (N, K)`` and return it as ``(N, K)`` floats.

        Returns ``(y, valid)``: ``valid`` is ``None`` when every label is known to be in range,
        else an ``(N,)`` boolean mask (labels traced under jit).
        """
        output = checks.float_array("output", output, ndim=2)
        n, k = output.shape
        if self.targets == CLASSES:
            return _class_targets(target, n, k, output.dtype)
        target = jnp.asarray(target)
        if target.ndim == 1 and k == 1:
            target = target[:, None]
        if target.shape != output.shape:
            raise ValueError(
                f"{self.name}: target shape {target.shape} does not match output shape "
                f"{output.shape}; expected {output.shape}" + (" or (N,)" if k == 1 else "") + "."
            )
        if self.targets == BINARY and checks.is_concrete(target):
            values = np.asarray(target)
            lo, hi = float(values.min()), float(values.max())
            if lo < 0 or hi > 1:
                raise ValueError(
                    f"{self.name}: targets must lie in [0, 1]; got values in [{lo}, {hi}]."
                )
        return target.astype(output.dtype), None


def mark_invalid(values: Array, valid: Array | None) -> Array:
    """``values`` with the rows of invalid samples set to NaN (``valid`` is ``None`` or ``(N,)``)."""
    if valid is None:
        return values
    mask = valid.reshape(valid.shape + (1,) * (values.ndim - 1))
    return jnp.where(mask, values, jnp.nan)


def _class_targets(target, n, k, dtype):
    if not hasattr(target, "dtype"):
        target = jnp.asarray(target)
    if jnp.issubdtype(target.dtype, jnp.integer):
        if target.shape != (n,):
            raise ValueError(
                f"integer class labels must have shape (N,) = ({n},); got {tuple(target.shape)}. "
                f"Pass one-hot targets as a floating (N, K) = ({n}, {k}) array."
            )
        if checks.is_concrete(target) and n:
            values = np.asarray(target)
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= k:
                raise ValueError(
                    f"class labels must lie in [0, {k}) for an output of {k} classes; "
                    f"got labels in [{lo}, {hi}]."
                )
            valid = None
        else:
            valid = (target >= 0) & (target < k)
        return jax.nn.one_hot(target, k, dtype=dtype), valid
    if not jnp.issubdtype(target.dtype, jnp.floating):
        raise TypeError(f"class targets must be integer labels or floating one-hot rows; got {target.dtype}.")
    if target.shape != (n, k):
        raise ValueError(
            f"one-hot targets must have shape (N, K) = ({n}, {k}); got {tuple(target.shape)}. "
            "Integer labels of shape (N,) are accepted too."
        )
    if checks.is_concrete(target) and n:
        lowest = float(np.min(np.asarray(target)))
        if not lowest >= 0:  # NaN included
            raise ValueError(
                f"class target rows are weights of the {k} classes and must be non-negative and finite; got "
                f"a smallest entry of {lowest}. Pass one-hot or probability rows, or integer labels (N,)."
            )
    return target.astype(dtype), None


def _clip(p):
    eps = jnp.finfo(p.dtype).eps
    return jnp.clip(p, eps, 1 - eps)


def _logsumexp(z):
    m = lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    return m[:, 0] + jnp.log(jnp.sum(jnp.exp(z - m), axis=-1))


def _bce_logits(z, y):
    # log(1 + e^z) − z y. logaddexp is stable for |z| = 1e4 and, unlike the max(z, 0) + log1p(e^{−|z|})
    # form, has the right derivative σ(0) at z = 0 under autodiff too (no kinks at 0).
    return jnp.logaddexp(z, 0) - z * y


def _bce(p, y):
    p = _clip(p)
    return -(y * jnp.log(p) + (1 - y) * jnp.log1p(-p))


def _dbce(p, y):
    return _unclipped(p) * (_clip(p) - y) / (_clip(p) * (1 - _clip(p)))


def _unclipped(p):
    # The derivative of clip(p, eps, 1 − eps): 1 inside, 0 where the clip holds p at a bound.
    eps = jnp.finfo(p.dtype).eps
    return ((p > eps) & (p < 1 - eps)).astype(p.dtype)


def _softmax_minus_target(z, y):
    # ∂/∂z of −Σ_k y_k log softmax(z)_k = (Σ_k y_k) softmax(z) − y; = softmax(z) − y for one-hot y.
    return jnp.sum(y, axis=-1, keepdims=True) * softmax(z) - y


def _per_output_mean(f):
    """Per-sample cost ``(1/K) Σ_k f(a_k, y_k)`` from an element-wise rule ``f``."""
    return lambda a, y: jnp.mean(f(a, y), axis=-1)


def _over_k(g):
    """The derivative of a per-output mean: the element-wise derivative ``g`` divided by ``K``."""
    return lambda a, y: g(a, y) / a.shape[-1]


mse = Loss(
    "mse", REGRESSION,
    _per_output_mean(lambda a, y: (a - y) ** 2),
    _over_k(lambda a, y: 2 * (a - y)),
)
half_mse = Loss(
    "half_mse", REGRESSION,
    lambda a, y: 0.5 * jnp.sum((a - y) ** 2, axis=-1),
    lambda a, y: a - y,
)
mae = Loss(
    "mae", REGRESSION,
    _per_output_mean(lambda a, y: jnp.abs(a - y)),
    _over_k(lambda a, y: jnp.sign(a - y)),
)
binary_cross_entropy = Loss(
    "binary_cross_entropy", BINARY,
    _per_output_mean(_bce),
    _over_k(_dbce),
    canonical_output="sigmoid",
    fused_delta=_over_k(lambda z, y: lax.logistic(z) - y),
    outputs=frozenset({"sigmoid", "softmax"}),
)
binary_cross_entropy_with_logits = Loss(
    "binary_cross_entropy_with_logits", BINARY,
    _per_output_mean(_bce_logits),
    _over_k(lambda z, y: lax.logistic(z) - y),
    canonical_output="identity",
    fused_delta=_over_k(lambda z, y: lax.logistic(z) - y),
    outputs=frozenset({"identity"}),
)
categorical_cross_entropy = Loss(
    "categorical_cross_entropy", CLASSES,
    lambda p, y: -jnp.sum(y * jnp.log(_clip(p)), axis=-1),
    lambda p, y: -y * _unclipped(p) / _clip(p),
    canonical_output="softmax",
    fused_delta=_softmax_minus_target,
    outputs=frozenset({"softmax", "sigmoid"}),
)
softmax_cross_entropy = Loss(
    "softmax_cross_entropy", CLASSES,
    lambda z, y: jnp.sum(y, axis=-1) * _logsumexp(z) - jnp.sum(y * z, axis=-1),
    _softmax_minus_target,
    canonical_output="identity",
    fused_delta=_softmax_minus_target,
    outputs=frozenset({"identity"}),
)

LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        mse, half_mse, mae, binary_cross_entropy, binary_cross_entropy_with_logits,
        categorical_cross_entropy, softmax_cross_entropy,
    )
}
"""Every loss by name."""

_INSTEAD = {  # what to use instead, for the pairs a loss refuses
    "binary_cross_entropy": "output='sigmoid', or binary_cross_entropy_with_logits on output='identity'",
    "categorical_cross_entropy": "output='softmax', or softmax_cross_entropy on output='identity' (the logits)",
    "binary_cross_entropy_with_logits": "output='identity', or binary_cross_entropy on output='sigmoid'",
    "softmax_cross_entropy": "output='identity', or categorical_cross_entropy on output='softmax'",
}


def resolve(loss: Loss | str) -> Loss:
    """``loss`` itself, or the loss of that name in :data:`LOSSES`; ``TypeError``/``ValueError`` otherwise."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        return checks.lookup(LOSSES, "loss", loss)
    raise TypeError(
        f"a loss must be an fnn.losses.Loss (a cost paired with its derivative) or one of the names "
        f"{sorted(LOSSES)}; got {type(loss).__name__}. Build a Loss(...) for a cost of your own."
    )


def check_output(loss: Loss | str, output: str) -> Loss:
    """The resolved ``loss`` after checking it accepts the output activation ``output``.

    Raises ``ValueError`` naming the loss to use instead: the losses on probabilities on an output
    that can leave ``[0, 1]`` (their clip would flatten cost and gradient), or the losses on logits on
    anything but the identity output.
    """
    loss = resolve(loss)
    if loss.outputs is not None and output not in loss.outputs:
        reads = "logits" if loss.outputs == {"identity"} else "probabilities in [0, 1]"
        raise ValueError(
            f"{loss.name} reads {reads}, which output activation {output!r} does not give; it accepts "
            f"{sorted(loss.outputs)}. Use " + _INSTEAD.get(loss.name, f"one of {sorted(loss.outputs)}") + "."
        )
    return loss


def check_l2(beta):
    """``β`` as given (so a Python ``0`` stays one) after checking it is a finite real ``≥ 0``; a traced
    value under ``jit`` cannot be checked."""
    checks.real_in("l2", beta, 0.0)
    return beta


def l2_active(beta) -> bool:
    """False only for a Python ``0`` (the L2 terms are then left out of the graph); a traced β counts."""
    return not (isinstance(beta, (int, float)) and beta == 0)


def l2_penalty(params, beta: float) -> Array:
    """The L2 term ``½ β Σ_l ‖W^l‖²`` over the weights only (biases are not penalised)."""
    if not l2_active(beta):
        return jnp.zeros((), jnp.result_type(params[0]["W"]))  # keep the squares out of the graph
    return 0.5 * beta * sum(jnp.sum(layer["W"] ** 2) for layer in params)


# ---------------------------------------------------------------------------------------------
# Second derivatives, for fnn.curvature.


class Curvature(NamedTuple):
    """The second derivative of ``C_x`` at the point ``o`` where the network meets the loss.

    The split (Schraudolph 2002) lies at the logits ``o = z^L`` for a canonical pair (the fused δ^L
    of :mod:`fnn.backprop`: softmax or sigmoid inside the loss) and at the output ``o = a^L``
    otherwise. Rows are samples; ``y`` is the target as :meth:`Loss.target` returns it, ``(N, K)``.

    Attributes:
      at_logits: ``True`` for ``o = z^L``, ``False`` for ``o = a^L``.
      hvp: ``(o, y, u) -> H_x u`` per row, ``H_x = ∂²C_x/∂o²`` (``(N, K)``).
      sqrt: ``(o, y) -> S (N, K, K)`` with ``S_x S_xᵀ = H_x`` (the columns the exact diagonal and
        Kronecker factors back-propagate).
      sample: ``(key, o, y) -> s (N, K)``, one random column per row with ``E[s sᵀ] = H_x``.
    """

    at_logits: bool
    hvp: Callable[[Array, Array, Array], Array]
    sqrt: Callable[[Array, Array], Array]
    sample: Callable[[jax.Array, Array, Array], Array]


def _diagonal(h: Callable[[Array, Array], Array], at_logits: bool, sample=None) -> Curvature:
    """A ``Curvature`` whose ``H_x = diag(h(o, y))``; ``sample`` defaults to ``√h ⊙ ε``, ε Rademacher."""
    def rademacher(key, o, y):
        eps = jax.random.rademacher(key, o.shape, o.dtype)
        return jnp.sqrt(h(o, y)) * eps

    return Curvature(at_logits, lambda o, y, u: h(o, y) * u,
                     lambda o, y: jnp.sqrt(h(o, y))[:, :, None] * jnp.eye(o.shape[-1], dtype=o.dtype),
                     sample or rademacher)


def _constant(c: Callable[[int], float]) -> Curvature:
    """``H_x = c(K) I``: the Gaussian likelihood's, sampled as ``√c ε`` with ε standard normal
    (the gradient at a target drawn from ``N(o, I/c)``, the model's predictive distribution)."""
    def h(o, y):
        return jnp.full_like(o, c(o.shape[-1]))

    def gaussian(key, o, y):
        return jnp.sqrt(h(o, y)) * jax.random.normal(key, o.shape, o.dtype)

    return _diagonal(h, False, gaussian)


def _bernoulli_h(z, y):
    s = lax.logistic(z)
    return s * (1 - s) / z.shape[-1]


def _bernoulli_sample(key, z, y):
    # ŷ ~ Bernoulli(σ(z)) per output: (σ − ŷ)/√K has second moment σ(1 − σ)/K = H.
    s = lax.logistic(z)
    drawn = jax.random.bernoulli(key, s).astype(z.dtype)
    return (s - drawn) / jnp.sqrt(jnp.asarray(z.shape[-1], z.dtype))


def _softmax_hvp(z, y, u):
    # H = (Σ_k y_k)(diag p − p pᵀ), p = softmax(z)
    p = softmax(z)
    return jnp.sum(y, axis=-1, keepdims=True) * p * (u - jnp.sum(p * u, axis=-1, keepdims=True))


def _softmax_sqrt(z, y):
    # S = √(Σy) (diag √p − p √pᵀ): S Sᵀ = diag p − 2 p pᵀ + p (Σ_k p_k) pᵀ = diag p − p pᵀ.
    p = softmax(z)
    r = jnp.sqrt(p)
    s = jnp.sqrt(jnp.sum(y, axis=-1))[:, None, None]
    return s * (r[:, :, None] * jnp.eye(z.shape[-1], dtype=z.dtype) - p[:, :, None] * r[:, None, :])


def _softmax_sample(key, z, y):
    # ŷ ~ Categorical(p): √(Σy)(p − e_ŷ) has second moment (Σy)(diag p − p pᵀ) = H.
    p = softmax(z)
    drawn = jax.nn.one_hot(jax.random.categorical(key, z), z.shape[-1], dtype=z.dtype)
    return jnp.sqrt(jnp.sum(y, axis=-1, keepdims=True)) * (p - drawn)


def _bce_h(p, y):
    # ∂²/∂p² of −(y log p̃ + (1 − y) log(1 − p̃))/K, p̃ = clip(p): 0 where the clip holds p
    q = _clip(p)
    return _unclipped(p) * (y / (q * q) + (1 - y) / ((1 - q) * (1 - q))) / p.shape[-1]


def _cce_h(p, y):
    q = _clip(p)
    return _unclipped(p) * y / (q * q)


_CATEGORICAL = Curvature(True, _softmax_hvp, _softmax_sqrt, _softmax_sample)
_BERNOULLI = _diagonal(_bernoulli_h, True, _bernoulli_sample)
_CURVATURES = {  # (loss, split at the logits?) -> Curvature
    ("mse", False): _constant(lambda k: 2.0 / k),
    ("half_mse", False): _constant(lambda k: 1.0),
    ("mae", False): _diagonal(lambda o, y: jnp.zeros_like(o), False),  # piecewise linear: H = 0
    ("binary_cross_entropy", True): _BERNOULLI,
    ("binary_cross_entropy", False): _diagonal(_bce_h, False),
    ("binary_cross_entropy_with_logits", True): _BERNOULLI,
    ("categorical_cross_entropy", True): _CATEGORICAL,
    ("categorical_cross_entropy", False): _diagonal(_cce_h, False),
    ("softmax_cross_entropy", True): _CATEGORICAL,
}


def output_curvature(loss: Loss | str, output: str) -> Curvature:
    """The :class:`Curvature` of ``loss`` on a network whose output activation is ``output``.

    Canonical pairs (``loss.canonical_output == output``) split at the logits, where ``H_x`` is the
    softmax's ``(Σ_k y_k)(diag p − p pᵀ)`` or the sigmoid's ``diag(σ(1 − σ))/K``; every other pair at
    ``a^L``: ``(2/K) I`` (mse), ``I`` (half_mse), ``0`` (mae), and for the losses on probabilities
    on the other output ``diag(y/p² + (1 − y)/(1 − p)²)/K`` (bce) or ``diag(y/p²)`` (cce), zero where
    the clip holds ``p``. Each ``H_x`` is positive semi-definite, so the Gauss-Newton matrix is.
    MC columns: the gradient at a target drawn from the model's predictive distribution (categorical,
    Bernoulli, Gaussian) where the loss is that distribution's negative log-likelihood, and ``√h ⊙ ε``
    with ε Rademacher for the two non-canonical probability pairs and mae (``E[s sᵀ] = H_x`` either
    way). ``ValueError`` for a pair the loss refuses, or a :class:`Loss` of your own (its second
    derivative is not known).
    """
    loss = check_output(loss, output)
    if LOSSES.get(loss.name) != loss:
        raise ValueError(
            f"curvature needs the loss's second derivative, known for the losses {sorted(LOSSES)}; got a "
            f"Loss of your own named {loss.name!r}. Use one of those, or add its Curvature to "
            "fnn.losses._CURVATURES."
        )
    return _CURVATURES[(loss.name, loss.canonical_output == output)]
