import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
import fnn.gradcheck as gc
from fnn.gradcheck import format_report, gradient_report, relative_difference


def _problem(dtype):
    net = fnn.MLP((6, 8, 8, 4), ("sigmoid", "tanh"), "identity")
    params = net.init(jax.random.PRNGKey(0), dtype)
    x = jax.random.normal(jax.random.PRNGKey(1), (10, 6), dtype)
    y = jnp.arange(10) % 4
    return net, params, x, y


@pytest.mark.slow  # finite differences of every coordinate, in two dtypes
def test_per_layer_report_is_small_for_correct_gradients():
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.float64, 1e-12)):
        net, params, x, y = _problem(dtype)
        report = fnn.check_gradients(net, params, x, y, fnn.losses.softmax_cross_entropy, l2=0.01)
        assert report.shape == (3,)
        assert float(jnp.max(report)) < tol, report


def _break(monkeypatch, name, layer, leaf, factor):
    """Patch ``fnn.gradcheck.<name>`` (``backprop`` or ``autodiff_grads``) to return the gradient of
    ``params[layer][leaf]`` times ``factor``, the rest unchanged."""
    real = getattr(gc, name)

    def broken(*args):
        cost, g, *rest = real(*args)
        g[layer] = {**g[layer], leaf: g[layer][leaf] * factor}
        return (cost, g, *rest)

    monkeypatch.setattr(gc, name, broken)


def test_checker_detects_a_wrong_gradient(monkeypatch):
    """A backprop that forgets φ' in one layer must show up in that layer's entry."""
    net, params, x, y = _problem(jnp.float64)
    _break(monkeypatch, "backprop", 0, "W", 1.01)
    report = fnn.check_gradients(net, params, x, y, fnn.losses.softmax_cross_entropy)
    assert float(report[0]) > 5e-3 and float(jnp.max(report[1:])) < 1e-12


def test_relative_difference():
    a = jnp.array([1.0, -2.0])
    assert float(relative_difference(a, a)) == 0.0
    assert float(relative_difference(jnp.zeros(2), jnp.zeros(2))) == 0.0
    np.testing.assert_allclose(relative_difference(a, jnp.array([1.0, -2.2])), 0.2 / 2.2)


@pytest.mark.slow
def test_check_gradients_under_jit():
    net, params, x, y = _problem(jnp.float32)
    r = jax.jit(fnn.check_gradients, static_argnums=(0, 4))(net, params, x, y, fnn.losses.softmax_cross_entropy)
    assert float(jnp.max(r)) < 1e-5


# ---------------------------------------------------------------------------------------------
# The three-way report: manual vs autodiff vs float64 central differences.

LOSS = fnn.losses.softmax_cross_entropy
ALL = 64  # more coordinates than any leaf of _problem has: the finite differences see every entry


def _rows(report):
    return {(r.layer, r.leaf): r for r in report}


@pytest.mark.parametrize("dtype, batch_norm, auto_tol, fd_tol", [
    pytest.param(jnp.float32, False, 1e-5, 1e-5,  # float32 backprop: both columns at its rounding, ~1e-7
                 marks=pytest.mark.slow),
    (jnp.float64, False, 1e-12, 1e-6),  # float64: autodiff ~1e-16; FD good to ~8 digits (~1e-8 seen)
    pytest.param(jnp.float64, True, 1e-12, 1e-6,  # batch norm in train mode: γ, β leaves instead of b
                 marks=pytest.mark.slow),
])
def test_report_is_small_in_both_columns_for_correct_gradients(dtype, batch_norm, auto_tol, fd_tol):
    """Catches a report that flags correct gradients, and one that forgets leaves or layers."""
    net = fnn.MLP((6, 8, 8, 4), ("sigmoid", "tanh"), "identity", batch_norm=batch_norm)
    params = net.init(jax.random.PRNGKey(0), dtype)
    x = jax.random.normal(jax.random.PRNGKey(1), (10, 6), dtype)
    y = jnp.arange(10) % 4
    state = net.init_state(dtype) if batch_norm else None
    report = gradient_report(net, params, x, y, LOSS, l2=0.01, state=state, num_coords=5)
    leaves = ("W", "beta", "gamma") if batch_norm else ("W", "b")
    assert [(r.layer, r.leaf) for r in report] == [(1, k) for k in leaves] + [(2, k) for k in leaves] + \
        [(3, "W"), (3, "b")]
    assert all(r.fd_coords == min(5, np.size(params[r.layer - 1][r.leaf])) for r in report)
    assert max(r.manual_vs_autodiff for r in report) < auto_tol, format_report(report)
    assert max(r.manual_vs_fd for r in report) < fd_tol, format_report(report)


def test_broken_backprop_is_flagged_in_both_columns_for_the_broken_leaf_only(monkeypatch):
    """A backprop off by 5 % in ∂C/∂b² must stand out in both columns of that row and no other.

    Catches a report that compares the wrong leaves (rows mixed up), or whose finite-difference
    column is computed from the manual gradients themselves.
    """
    net, params, x, y = _problem(jnp.float64)
    _break(monkeypatch, "backprop", 1, "b", 1.05)
    rows = _rows(gradient_report(net, params, x, y, LOSS, num_coords=ALL))
    assert rows[2, "b"].manual_vs_autodiff > 0.04 and rows[2, "b"].manual_vs_fd > 0.04
    for where, r in rows.items():
        if where != (2, "b"):
            assert r.manual_vs_autodiff < 1e-12 and r.manual_vs_fd < 1e-6, (where, r)


def test_a_broken_autodiff_reference_cannot_fool_the_finite_differences(monkeypatch):
    """If the reference itself is wrong (here ∂C/∂W¹ off by 5 %), the autodiff column accuses the
    correct manual gradient, but the finite differences, which only evaluate the cost, clear it.

    Catches a finite-difference column that reuses the autodiff gradients (or ``jax.grad``).
    """
    net, params, x, y = _problem(jnp.float64)
    _break(monkeypatch, "autodiff_grads", 0, "W", 1.05)
    rows = _rows(gradient_report(net, params, x, y, LOSS, num_coords=ALL))
    assert rows[1, "W"].manual_vs_autodiff > 0.04
    assert max(r.manual_vs_fd for r in rows.values()) < 1e-6


def test_finite_differences_are_float64_even_when_x64_is_off():
    """With JAX's 64-bit mode off, float32 params still get float64 finite differences, and the
    mode is off again afterwards.

    Catches finite differences taken in float32 (their rounding error ε·C/h ≈ 6e-8/1e-6 would give
    ~1e-1 here) and a report that switches 64-bit mode on for good.
    """
    net, params, x, y = _problem(jnp.float32)
    with jax.enable_x64(False):
        report = gradient_report(net, params, x, y.astype(jnp.int32), LOSS)
        assert max(r.manual_vs_fd for r in report) < 1e-5, format_report(report)
        assert jnp.asarray(1.0).dtype == jnp.float32


def test_format_report_has_one_line_per_leaf():
    net, params, x, y = _problem(jnp.float32)
    report = gradient_report(net, params, x, y, LOSS, num_coords=3)
    lines = format_report(report).splitlines()
    assert len(lines) == 1 + len(report) == 7
    assert "autodiff" in lines[0] and "FD" in lines[0]
    assert lines[1].split() == ["1", "W", f"{report[0].manual_vs_autodiff:.1e}", f"{report[0].manual_vs_fd:.1e}", "3"]


@pytest.mark.parametrize("kwargs, match", [({"num_coords": 0}, "num_coords"), ({"eps": 0.1}, "eps")])
def test_bad_report_arguments_raise(kwargs, match):
    net, params, x, y = _problem(jnp.float32)
    with pytest.raises(ValueError, match=match):
        gradient_report(net, params, x, y, LOSS, **kwargs)
