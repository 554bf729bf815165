"""fnn.backprop (the hand-written δ-recursion) against jax.grad, closed forms and bad input."""

import math
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fnn
from fnn.activations import ACTIVATIONS
from fnn.losses import CLASSES, LOSSES

from helpers import gradient_errors, rel_err

HIDDEN = sorted(n for n, a in ACTIVATIONS.items() if a.dphi is not None)

# Every pair of loss and output activation that the losses accept (fnn.losses.check_output): the
# property tests below run each of them as a case of its own, so no accepted pair goes unproven.
PAIRS = sorted((name, out) for name, loss in LOSSES.items() for out in ACTIVATIONS
               if loss.outputs is None or out in loss.outputs)
TOL = {np.float32: 1e-4, np.float64: 1e-10}

# Eager JAX compiles each primitive once per shape, so the large property test draws widths and
# batch sizes from a pool (1, non-square, and the extremes of 1..64); a second test draws any
# width and batch in 1..64 under jit, with fewer examples.
POOL_WIDTHS = (1, 3, 8, 64)
POOL_BATCH = (1, 5, 64)
ANY_SIZE = tuple(range(1, 65))


# A property test compiles a program per example and runs it once, so its cost is the compilation, most
# of it XLA's backend (LLVM) optimization: left out, a small network's program compiles 2-3 times faster,
# and its results differ by rounding at most.
quick_jit = partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def rotated(choices, shift):
    """``st.sampled_from(choices)``, the list starting at entry ``shift`` (modulo its length).

    Hypothesis tries the simplest draw first, which takes the first entry of every list; a property test
    parametrized over ``PAIRS`` with few examples per pair rotates its lists by the pair's position, so
    that the pairs' first examples differ from one another instead of all being the smallest problem."""
    choices = list(choices)
    i = shift % len(choices)
    return st.sampled_from(choices[i:] + choices[:i])


def soft_class_targets(rng, n, k):
    """Soft class targets ``(n, k)``: positive rows whose sums lie anywhere in [0.2, 3], as the class losses
    accept them (``−Σ_k y_k log p_k`` for any ``y ≥ 0``), so a δ^L that assumes ``Σ_k y_k = 1`` shows."""
    return rng.dirichlet(np.ones(k), n) * rng.uniform(0.2, 3.0, (n, 1))


@st.composite
def configurations(draw, pair, widths=POOL_WIDTHS, batch=POOL_BATCH, depths=range(1, 7)):
    """A network ending in ``pair``'s output, its params, data and targets of every form ``pair``'s loss
    accepts, L2 on or off, float32 or float64: ``depths`` layers, widths from ``widths``, the batch size
    from ``batch``. Every list is rotated by the pair's position in ``PAIRS`` (:func:`rotated`)."""
    loss_name, output = pair
    index = PAIRS.index(pair)
    depth = draw(rotated(depths, index))
    sizes = [draw(rotated(widths, 7 * index + 3 * l)) for l in range(depth + 1)]
    if loss_name in ("categorical_cross_entropy", "softmax_cross_entropy") and draw(st.sampled_from([True, False])):
        sizes[-1] = max(sizes[-1], 2)  # mostly real multi-class problems; K = 1 stays possible
    per_layer = st.tuples(*(rotated(HIDDEN, index + l) for l in range(depth - 1))).map(list)
    hidden = draw(st.one_of(per_layer, rotated(HIDDEN, index)))
    net = fnn.MLP(sizes, hidden, output)
    dtype = draw(rotated([np.float32, np.float64], index))
    n = draw(rotated(batch, 5 * index))
    rng = np.random.default_rng([index, draw(st.integers(0, 2**32 - 1))])
    params = [
        {"W": rng.normal(0, 1 / math.sqrt(fi), (fo, fi)).astype(dtype), "b": rng.normal(0, 0.5, fo).astype(dtype)}
        for fi, fo in zip(sizes[:-1], sizes[1:])
    ]
    x = rng.normal(size=(n, sizes[0])).astype(dtype)
    loss = LOSSES[loss_name]
    k = sizes[-1]
    # Targets of every form the loss accepts: class labels, one-hot rows or soft rows of any positive
    # sum; binary 0/1 or soft in [0, 1]. (Soft class rows catch a fused δ^L without its Σ_k y_k factor,
    # issue 21's first regression, which labels and one-hot rows cannot see.)
    if loss.targets == CLASSES:
        kind = draw(rotated(["labels", "one-hot", "soft"], index))
        labels = rng.integers(0, k, n)
        if kind == "labels":
            y = labels
        elif kind == "one-hot":
            y = np.eye(k, dtype=dtype)[labels]
        else:
            y = soft_class_targets(rng, n, k).astype(dtype)
    elif loss_name.startswith("binary"):
        y = (rng.integers(0, 2, (n, k)) if draw(st.booleans()) else rng.uniform(0, 1, (n, k))).astype(dtype)
    elif output == "softmax" and loss_name == "mae":
        # Probability rows, as a softmax output is compared with: p − y then has both signs in every row
        # (unless p = y). Against targets outside [0, 1], sign(a − y)/K is the same for all classes and
        # the softmax Jacobian maps it to exactly 0; both sides would hold only rounding noise.
        y = rng.dirichlet(np.ones(k), n).astype(dtype)
    else:
        y = rng.normal(size=(n, k)).astype(dtype)
    l2 = draw(rotated([0.0, float(rng.uniform(0.01, 1.0))], index // 2))
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return net, params, jnp.asarray(x), jnp.asarray(y), loss, l2, dtype


def _up(t):
    return t.astype(jnp.float64) if jnp.issubdtype(t.dtype, jnp.floating) else t


def references(net, params, x, y, loss, l2=0.0):
    """``jax.grad`` in the dtype under test, and (for float32) also in float64 on the same inputs.

    A float32 leaf passes when it matches either: comparing two float32 computations adds
    autodiff's rounding error to the manual one, and in ill-conditioned cases (a softmax whose
    upstream gradient is nearly constant) autodiff's float32 error is the larger one; the float64
    evaluation then shows the manual value is the accurate one. Where the float32 and float64
    functions differ on purpose (probabilities clipped at the dtype's epsilon), the float32
    autodiff comparison is the one that holds.
    """
    same = fnn.autodiff_grads(net, params, x, y, loss, l2)
    if x.dtype == jnp.float64:
        return [same]
    return [same, fnn.autodiff_grads(net, jax.tree_util.tree_map(_up, params), _up(x), _up(y), loss, l2)]


def assert_matches_autodiff(manual, refs, dtype):
    c_m, g_m = manual
    for _, g_r in refs:
        chex.assert_trees_all_equal_structs(g_m, g_r)
        chex.assert_trees_all_equal_shapes(g_m, g_r)
    assert all(leaf.dtype == dtype for leaf in jax.tree_util.tree_leaves(g_m))
    assert min(rel_err(c_m, c_r) for c_r, _ in refs) <= TOL[dtype]
    errors = [gradient_errors(g_m, g_r, TOL[dtype]) for _, g_r in refs]
    for per_ref in zip(*errors):
        leaf, err = per_ref[0][0], min(e for _, e in per_ref)
        assert err <= 1, f"{leaf}: error {err:.3g} × the tolerance"


# 2 examples for each of the 33 pairs, run op by op (eager): every op compiles anew for each drawn shape,
# which made 5 per pair the suite's largest cost. Widths and batches are drawn under jit by the test
# below, and TestVariants holds the eager and the jitted gradients equal.
@pytest.mark.parametrize("loss_name, output", PAIRS)
@settings(max_examples=2)
@given(data=st.data())
def test_backprop_equals_autodiff(loss_name, output, data):
    net, params, x, y, loss, l2, dtype = data.draw(configurations((loss_name, output)))
    manual = fnn.backprop(net, params, x, y, loss, l2)
    assert_matches_autodiff(manual, references(net, params, x, y, loss, l2), dtype)
    assert jax.tree_util.tree_structure(manual[1]) == jax.tree_util.tree_structure(params)
    assert all(leaf.dtype == dtype for leaf in jax.tree_util.tree_leaves(manual[1]))


_both = quick_jit(lambda params, x, y, l2, net, loss: (
    fnn.backprop(net, params, x, y, loss, l2), references(net, params, x, y, loss, l2)
), static_argnums=(4, 5))


# One example per pair, its widths and batch anywhere in 1..64 (the lists rotated per pair and layer).
@pytest.mark.parametrize("loss_name, output", PAIRS)
@settings(max_examples=1)
@given(data=st.data())
def test_backprop_equals_autodiff_any_width_under_jit(loss_name, output, data):
    net, params, x, y, loss, l2, dtype = data.draw(
        configurations((loss_name, output), widths=ANY_SIZE, batch=ANY_SIZE))
    manual, refs = _both(params, x, y, l2, net, loss)
    assert_matches_autodiff(manual, refs, dtype)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_manual_equals_autodiff_with_and_without_jit(self):
        net = fnn.MLP((5, 7, 4, 3), ("tanh", "relu"), "identity")
        params = net.init(jax.random.PRNGKey(0), jnp.float64)
        x = jax.random.normal(jax.random.PRNGKey(1), (6, 5), jnp.float64)
        y = jnp.array([0, 2, 1, 1, 0, 2])
        loss = fnn.losses.softmax_cross_entropy
        manual = self.variant(lambda p, x, y: fnn.backprop(net, p, x, y, loss, 0.1))(params, x, y)
        auto = fnn.autodiff_grads(net, params, x, y, loss, 0.1)
        chex.assert_trees_all_close(manual, auto, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_name, output", [("mse", "tanh"), ("half_mse", "softmax"),
                                               ("binary_cross_entropy", "softmax"),
                                               ("categorical_cross_entropy", "sigmoid")])
def test_an_output_that_is_not_the_canonical_one_of_its_loss(loss_name, output):
    """BP1 on an output that is not the loss's canonical one, ``δ^L = φ_L'(z)ᵀ ∂C_x/∂a``, never the fused
    ``φ(z) − y``: one fixed float64 network against jax.grad, nothing left to a draw (the property tests
    cover every pair). Catches the mutants bp1-without-output-derivative and bp1-fused-for-any-output."""
    rng = np.random.default_rng(5)
    net = fnn.MLP((3, 5, 4), "tanh", output)
    params = jax.tree_util.tree_map(lambda p: p + rng.normal(0, 0.3, p.shape),
                                    net.init(jax.random.PRNGKey(2), jnp.float64))
    x = jnp.asarray(rng.normal(size=(6, 3)))
    loss = LOSSES[loss_name]
    if loss.targets == CLASSES:
        y = soft_class_targets(rng, 6, 4)
    elif loss.targets == "binary":
        y = rng.uniform(0, 1, (6, 4))
    else:
        y = rng.dirichlet(np.ones(4), 6) if output == "softmax" else rng.normal(size=(6, 4))
    y = jnp.asarray(y)
    assert_matches_autodiff(fnn.backprop(net, params, x, y, loss, 0.1), references(net, params, x, y, loss, 0.1),
                            np.float64)


def test_closed_form_2_2_1():
    """The nine partial derivatives of the 2-2-1 sigmoid network, E = ½(Y − y)², by hand."""
    x1, x2, target = 0.35, 0.9, 0.5
    w = [[0.1, 0.8], [0.4, 0.6]]  # w[j][i]: input i -> hidden j
    b = [0.2, -0.3]
    v, c = [0.3, 0.9], 0.05  # hidden j -> output, output bias

    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    h = [sig(w[j][0] * x1 + w[j][1] * x2 + b[j]) for j in range(2)]
    out = v[0] * h[0] + v[1] * h[1] + c
    e = out - target  # ∂E/∂y
    dE_dc = e
    dE_dv = [e * h[j] for j in range(2)]
    dE_db = [e * v[j] * h[j] * (1 - h[j]) for j in range(2)]
    dE_dw = [[dE_db[j] * xi for xi in (x1, x2)] for j in range(2)]

    net = fnn.MLP((2, 2, 1), "sigmoid", "identity")
    params = [
        {"W": jnp.array(w, jnp.float64), "b": jnp.array(b, jnp.float64)},
        {"W": jnp.array([v], jnp.float64), "b": jnp.array([c], jnp.float64)},
    ]
    cost, g = fnn.backprop(net, params, jnp.array([[x1, x2]]), jnp.array([[target]]), fnn.losses.half_mse)
    assert float(cost) == pytest.approx(0.5 * e * e, rel=1e-14)
    np.testing.assert_allclose(g[0]["W"], dE_dw, rtol=1e-13)
    np.testing.assert_allclose(g[0]["b"], dE_db, rtol=1e-13)
    np.testing.assert_allclose(g[1]["W"], [dE_dv], rtol=1e-13)
    np.testing.assert_allclose(g[1]["b"], [dE_dc], rtol=1e-13)


def test_batch_gradient_is_the_mean_of_per_sample_gradients():
    """Catches a misplaced 1/N: the batch gradient is (1/N) Σ_x of the one-sample gradients."""
    net = fnn.MLP((3, 4, 2), "tanh", "identity")
    params = net.init(jax.random.PRNGKey(3), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(4), (7, 3), jnp.float64)
    y = jax.random.normal(jax.random.PRNGKey(5), (7, 2), jnp.float64)
    _, batch = fnn.backprop(net, params, x, y, fnn.losses.half_mse)
    singles = [fnn.backprop(net, params, x[i:i + 1], y[i:i + 1], fnn.losses.half_mse)[1] for i in range(7)]
    mean = jax.tree_util.tree_map(lambda *g: sum(g) / 7, *singles)
    chex.assert_trees_all_close(batch, mean, rtol=1e-12)


def test_l2_adds_beta_w_to_weights_only():
    net = fnn.MLP((3, 4, 2), "relu", "identity")
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64)
    y = jnp.array([0, 1, 1, 0, 1])
    loss = fnn.losses.softmax_cross_entropy
    c0, g0 = fnn.backprop(net, params, x, y, loss)
    c1, g1 = fnn.backprop(net, params, x, y, loss, l2=0.3)
    sq = sum(float(jnp.sum(p["W"] ** 2)) for p in params)
    assert float(c1 - c0) == pytest.approx(0.15 * sq, rel=1e-12)
    for a, b, p in zip(g0, g1, params):
        np.testing.assert_allclose(b["W"] - a["W"], 0.3 * p["W"], rtol=1e-10, atol=1e-15)
        np.testing.assert_array_equal(b["b"], a["b"])


# -- numerical stability -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("loss_name,output", [
    ("softmax_cross_entropy", "identity"),
    ("binary_cross_entropy_with_logits", "identity"),
    ("categorical_cross_entropy", "softmax"),
    ("binary_cross_entropy", "sigmoid"),
    ("mse", "softmax"),
])
def test_extreme_logits_give_finite_loss_and_gradients(dtype, loss_name, output):
    """Output pre-activations of ±1e4 saturate softmax/sigmoid to exact 0 and 1."""
    net = fnn.MLP((2, 3), (), output)
    params = [{"W": jnp.array([[1e4, 0], [-1e4, 0], [0, 1e4]], dtype), "b": jnp.zeros(3, dtype)}]
    x = jnp.array([[1.0, 0.0], [0.0, -1.0], [-1.0, 1.0]], dtype)
    loss = LOSSES[loss_name]
    y = jnp.array([1, 0, 2]) if loss.targets == CLASSES else jnp.array([[0, 1, 1], [1, 0, 0], [1, 1, 0]], dtype)
    cost, grads = fnn.backprop(net, params, x, y, loss)
    assert bool(jnp.isfinite(cost)), cost
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    if net.output == loss.canonical_output:
        # a confidently wrong prediction must still push back hard, not vanish in saturation
        assert float(jnp.max(jnp.abs(grads[0]["W"]))) > 0.1
    if loss.canonical_output == "identity":  # on logits nothing is clipped: the cost is ~1e4
        assert float(cost) > 1e3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_probabilities_of_exactly_zero_and_one(dtype):
    p = jnp.array([[0.0, 1.0], [1.0, 0.0]], dtype)
    for loss, y in ((fnn.losses.binary_cross_entropy, jnp.array([[1.0, 0.0], [1.0, 0.0]], dtype)),
                    (fnn.losses.categorical_cross_entropy, jnp.array([0, 0]))):
        assert bool(jnp.isfinite(loss(p, y)))
        t, _ = loss.target(p, y)
        assert bool(jnp.all(jnp.isfinite(loss.grad(p, t))))


# -- bad input -----------------------------------------------------------------------------

NET = fnn.MLP((4, 5, 3), "relu", "identity")
PARAMS = NET.init(jax.random.PRNGKey(0))
X = jnp.ones((6, 4), jnp.float32)
Y = jnp.array([0, 1, 2, 0, 1, 2])
SCE = fnn.losses.softmax_cross_entropy
jitted = jax.jit(fnn.backprop, static_argnums=(0, 4))


@pytest.mark.parametrize("run", [fnn.backprop, jitted], ids=["eager", "jit"])
@pytest.mark.parametrize("x,y,err,words", [
    (jnp.ones((6, 5), jnp.float32), Y, ValueError, ["5 features", "expects 4", "(batch, 4)"]),
    (jnp.ones((6, 4, 1), jnp.float32), Y, ValueError, ["2 dimensions", "(6, 4, 1)"]),
    (jnp.ones((4,), jnp.float32), Y, ValueError, ["2 dimensions", "(4,)"]),
    (X, Y[:5], ValueError, ["(N,) = (6,)", "(5,)"]),
    (X, jnp.ones((5, 3), jnp.float32), ValueError, ["(6, 3)", "(5, 3)"]),
    (jnp.ones((6, 4), jnp.int32), Y, TypeError, ["floating", "int32"]),
    (X.astype(jnp.float64), Y, TypeError, ["float64", "float32"]),
])
def test_bad_input_raises_at_trace_time(run, x, y, err, words):
    with pytest.raises(err) as info:
        run(NET, PARAMS, x, y, SCE)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_labels_out_of_range_raise_when_known():
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[0, 3\]"):
        fnn.backprop(NET, PARAMS, X, jnp.array([0, 1, 2, 0, 1, 3]), SCE)
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        fnn.backprop(NET, PARAMS, X, jnp.array([0, 1, 2, 0, 1, -1]), SCE)


def test_labels_out_of_range_under_jit_poison_loss_and_gradients():
    """Traced labels cannot raise; a bad label must not silently drop out of the cost either."""
    cost, grads = jitted(NET, PARAMS, X, jnp.array([0, 1, 2, 0, 1, 3]), SCE)
    assert bool(jnp.isnan(cost))
    assert bool(jnp.all(jnp.isnan(grads[-1]["b"])))
    cost, _ = jitted(NET, PARAMS, X, Y, SCE)
    assert bool(jnp.isfinite(cost))


def test_params_that_do_not_match_the_network():
    wrong = [PARAMS[0], {"W": jnp.ones((3, 4)), "b": jnp.ones(3)}]
    with pytest.raises(ValueError, match=r"params\[1\]\['W'\] must have shape \(3, 5\); got \(3, 4\)"):
        fnn.backprop(NET, wrong, X, Y, SCE)
    with pytest.raises(ValueError, match="list of 2 layers"):
        fnn.backprop(NET, PARAMS[:1], X, Y, SCE)


def test_plain_callable_loss_is_refused():
    with pytest.raises(TypeError, match="fnn.losses.Loss"):
        fnn.backprop(NET, PARAMS, X, Y, lambda a, y: jnp.mean(a))


@pytest.mark.parametrize("hidden", ["relu", "leaky_relu", "elu", "tanh"])
@pytest.mark.parametrize("loss_name", ["binary_cross_entropy_with_logits", "mse", "softmax_cross_entropy"])
def test_pre_activations_of_exactly_zero(hidden, loss_name):
    """A zero input row with zero biases puts every z at exactly 0, where max/abs-based formulas
    have kinks and autodiff picks a different sub-gradient (this caught a bce-with-logits bug)."""
    net = fnn.MLP((2, 4, 2), hidden, "identity", init="xavier_uniform")  # zero biases
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    x = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    loss = LOSSES[loss_name]
    y = jnp.array([0, 1, 1, 0]) if loss.targets == CLASSES else jnp.array([[0.0, 1], [1, 0], [1, 1], [0, 0]])
    assert_matches_autodiff(fnn.backprop(net, params, x, y, loss), references(net, params, x, y, loss),
                            np.float64)


REFUSED = sorted((name, out) for name in LOSSES for out in ACTIVATIONS if (name, out) not in PAIRS)


@pytest.mark.parametrize("loss_name,output", REFUSED)
def test_a_loss_on_an_output_it_does_not_read_is_refused_with_the_alternative(loss_name, output):
    """Before, categorical/binary cross-entropy on the identity output was accepted; the cost clips its
    input to [ε, 1 − ε], the derivative ignored the clip, and manual and autodiff differed by 1e6."""
    net = fnn.MLP((3, 4), (), output)
    params = net.init(jax.random.PRNGKey(0))
    x, y = jnp.ones((2, 3)), (jnp.array([0, 1]) if LOSSES[loss_name].targets == CLASSES else jnp.ones((2, 4)) / 2)
    for route in (fnn.backprop, fnn.autodiff_grads):
        with pytest.raises(ValueError, match=f"{loss_name} reads .* Use output="):
            route(net, params, x, y, loss_name)


def test_refusals_follow_from_the_registry():
    assert len(PAIRS) + len(REFUSED) == len(LOSSES) * len(ACTIVATIONS)
    for name in ("binary_cross_entropy", "categorical_cross_entropy"):
        assert (name, "identity") in REFUSED and (name, "relu") in REFUSED
    for name in ("softmax_cross_entropy", "binary_cross_entropy_with_logits"):
        assert (name, "identity") in PAIRS and (name, "sigmoid") in REFUSED


@pytest.mark.parametrize("output", ["sigmoid", "softmax"])
def test_the_derivative_of_a_clipped_probability_is_that_of_the_clipped_cost(output):
    """Probabilities below ε or above 1 − ε are held there by the cost's clip: the cost is then flat in
    them, and the manual gradient must be 0 there as autodiff's is (cce on sigmoid; bce on softmax)."""
    loss = fnn.losses.categorical_cross_entropy if output == "sigmoid" else fnn.losses.binary_cross_entropy
    net = fnn.MLP((2, 3), (), output)
    f32 = jnp.float32  # (float64's ε = 2e-16 would clip nothing here)
    params = [{"W": jnp.array([[40.0, 0.0], [-40.0, 0.0], [0.0, 0.1]], f32), "b": jnp.zeros(3, f32)}]
    # |z| = 20: σ(−20) ≈ 2e-9 is clipped to ε ≈ 1.2e-7 while σ'(−20) ≈ 2e-9 is not 0, so a derivative
    # that ignored the clip would be visibly non-zero (about 0.02 for cce on sigmoid).
    x = jnp.array([[0.5, 1.0], [-0.5, 2.0]], f32)
    y = jnp.array([1, 0]) if loss.targets == CLASSES else jnp.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]], f32)
    manual, auto = fnn.backprop(net, params, x, y, loss), fnn.autodiff_grads(net, params, x, y, loss)
    chex.assert_trees_all_close(manual, auto, rtol=1e-5, atol=1e-7)
