"""One training step, the public forward and backward traces, and the package's layering."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn import optim

SCE = fnn.losses.softmax_cross_entropy


def _problem(batch_norm=False):
    net = fnn.MLP((5, 7, 6, 3), ("tanh", "relu"), batch_norm=batch_norm)
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (9, 5), jnp.float64)
    return net, params, x, jnp.arange(9) % 3


@pytest.mark.parametrize("grad_source", ["manual", pytest.param("autodiff", marks=pytest.mark.slow)])
def test_train_step_is_the_gradient_then_the_update(grad_source):
    net, params, x, y = _problem()
    opt = optim.adam(1e-2)
    s = opt.init(params)
    r = jax.jit(lambda p, s: fnn.train_step(net, opt, p, s, x, y, SCE, l2=0.1, grad_source=grad_source))(params, s)
    # the other gradient source is the reference: autodiff for the manual step, and the other way round
    reference = fnn.backprop if grad_source == "autodiff" else fnn.autodiff_grads
    cost, grads = reference(net, params, x, y, SCE, 0.1)
    assert float(r.cost) == pytest.approx(float(cost), rel=1e-12)
    for a, b in zip(jax.tree.leaves(r.grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # Adam's first step moves every coordinate by −α sign(g) (up to ε)
    for new, old, g in zip(jax.tree.leaves(r.params), jax.tree.leaves(params), jax.tree.leaves(grads)):
        np.testing.assert_allclose(new - old, -1e-2 * np.sign(g) * (np.abs(g) > 1e-6), atol=1e-5)
    assert (r.trace is None) == (grad_source == "autodiff") and r.state is None


def test_train_step_carries_the_batch_norm_state():
    net, params, x, y = _problem(batch_norm=True)
    opt = optim.sgd(0.1)
    r = fnn.train_step(net, opt, params, opt.init(params), x, y, SCE, state=net.init_state(jnp.float64))
    _, want = net.apply_train(params, x, net.init_state(jnp.float64))
    np.testing.assert_allclose(r.state[0]["mean"], want[0]["mean"], rtol=1e-12)


def test_forward_and_backward_traces_hold_every_layer():
    net, params, x, y = _problem(batch_norm=True)
    state = net.init_state(jnp.float64)
    for train in (True, False):
        fwd = net.forward_trace(params, x, state, train=train)
        assert [h.shape for h in fwd.hs] == [(9, 7), (9, 6), (9, 3)]
        np.testing.assert_allclose(fwd.hs[0], x @ params[0]["W"].T, rtol=1e-12)
        np.testing.assert_allclose(fwd.zs[-1], fwd.hs[-1] + params[-1]["b"], rtol=1e-12)
        assert fwd.bn[0] is not None and fwd.bn[-1] is None
        _, _, _, trace = fnn.backprop_trace(net, params, x, y, SCE, 0.0, state, train)
        assert trace.zs is trace.forward.zs and len(trace.deltas) == net.num_layers
        # BN layers in train mode have no per-sample rows for BP4; in eval mode they do
        assert (trace.weight_deltas[0] is None) == train and trace.weight_deltas[-1] is trace.deltas[-1]
        if not train:
            inv_std = 1 / np.sqrt(np.asarray(state[0]["var"]) + net.bn_eps)
            np.testing.assert_allclose(trace.weight_deltas[0], trace.deltas[0] * params[0]["gamma"] * inv_std,
                                       rtol=1e-12)
    zs, acts = net.replace(batch_norm=False).forward(_problem()[1], x)  # the (zs, acts) pair stays
    assert len(zs) == 3 and len(acts) == 4


def _sources():
    package = pathlib.Path(fnn.__file__).parent
    return {path.stem: ast.parse(path.read_text()) for path in package.glob("*.py")}


NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}  # public despite the underscore


def test_no_module_reaches_into_another_modules_private_names():
    """Modules talk through public names only: no ``from fnn.x import _y``, no ``import fnn._x``, no
    ``module._name`` (a NamedTuple's ``_replace``, ``_asdict``, … are public API)."""
    offences = []
    for name, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fnn"):
                offences += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
                offences += [f"{name}: {node.module}" for part in node.module.split(".") if part.startswith("_")]
            if isinstance(node, ast.Import):
                offences += [f"{name}: {a.name}" for a in node.names
                             if a.name.startswith("fnn") and any(p.startswith("_") for p in a.name.split("."))]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and node.attr not in NAMEDTUPLE_API \
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                offences.append(f"{name}:{node.lineno}: .{node.attr}")
    assert offences == [], offences


def _fnn_imports(tree) -> set[str]:
    """The fnn modules a module imports (``from fnn import x`` counts as fnn.x)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "fnn":
            found |= {f"fnn.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fnn."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fnn.")}
    return found


def test_training_does_not_import_the_gradient_checker_directly_or_indirectly():
    sources = _sources()
    reached, todo = set(), ["fnn.train"]
    while todo:
        module = todo.pop()
        if module in reached or module.split(".")[-1] not in sources:
            continue
        reached.add(module)
        todo += sorted(_fnn_imports(sources[module.split(".")[-1]]))
    assert "fnn.step" in reached and "fnn.backprop" in reached  # the walk follows the imports
    assert "fnn.gradcheck" not in reached
