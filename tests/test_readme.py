"""README.md stays true: every Python example runs on its own, in a fresh interpreter with JAX's
defaults (a block that leans on names from an earlier one fails), what its comments say it prints or
returns holds, and CI runs exactly the README's test command.

The claims are checked in NumPy, float64, on the block's own results: shapes, bounds, and the
formulas in the comments rebuilt from other results of the same block (never figures it printed
copied back as expected values). The results are float32 (on a GPU, from JAX's default TF32
matmuls), so sums are judged within 1e-3 of their scale: a wrong formula is off by far more."""

import inspect
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest

import fnn

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


class Block(NamedTuple):
    lang: str
    heading: str  # the section (## heading) it stands in
    line: int  # README.md line of its first line of code, from 1
    code: str


def _blocks(lang: str) -> list[Block]:
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M):
        headings = re.findall(r"^## (.+)$", README[: m.start()], flags=re.M)
        line = README.count("\n", 0, m.start(2)) + 1
        out.append(Block(m.group(1), headings[-1] if headings else "", line, m.group(2)))
    return [b for b in out if b.lang == lang]


# One block in a fresh interpreter: executed in a namespace of its own with stdout captured, compiled
# under README.md's name and line numbers (a traceback points at the README line); then what it
# printed and the names a check asks for (as NumPy arrays) are pickled to a file.
_RUN = """
import contextlib, io, pickle, sys
import jax, numpy as np
line, code, names, path = pickle.load(sys.stdin.buffer)
printed, namespace = io.StringIO(), {"__name__": "__main__"}
with contextlib.redirect_stdout(printed):
    exec(compile("\\n" * (line - 1) + code, "README.md", "exec"), namespace)
missing = [name for name in names if name not in namespace]
assert not missing, f"the block defines no {missing}"
values = {name: jax.tree.map(np.asarray, namespace[name]) for name in names}
with open(path, "wb") as f:
    pickle.dump((printed.getvalue(), values), f)
"""


def _shapes(tree):
    return jax.tree.structure(tree), [np.shape(a) for a in jax.tree.leaves(tree)]


def _f64(tree):
    return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


def _close(actual, expected, rtol=1e-3):
    """Leaf by leaf, within ``rtol`` of the leaf's largest entry (float32 sums, judged on their scale)."""
    for a, e in zip(_f64(actual), _f64(expected), strict=True):
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=0, atol=rtol * max(np.abs(e).max(), np.finfo(np.float32).tiny))


def check_example(printed, params, out, grads):
    # print(fnn.check_gradients(...)): the first line printed, one entry per layer, each < 1e-5 (float32)
    differences = np.array(printed.splitlines()[0].strip().strip("[]").split(), float)
    assert differences.shape == (2,) and (differences < 1e-5).all(), printed
    assert [{k: v.shape for k, v in layer.items()} for layer in params] == [
        {"W": (256, 784), "b": (256,)}, {"W": (10, 256), "b": (10,)}]
    assert out.shape == (512, 10)
    assert _shapes(grads) == _shapes(params)


def check_per_example(printed, params, x, q):
    n = len(x)
    g = _f64(q["batch_grad"])  # g_x, leaves (N, ...)
    assert [a.shape for a in g] == [(n, *np.shape(p)) for p in jax.tree.leaves(params)]
    norms = np.sqrt(sum(np.sum(a.reshape(n, -1) ** 2, axis=1) for a in g))
    np.testing.assert_allclose(q["norms"], norms, rtol=1e-3)  # ‖g_x‖ (N,)
    assert all(a.shape == (n,) for a in jax.tree.leaves(q["batch_l2"]))  # ‖g_x‖² per leaf, leaves (N,)
    np.testing.assert_allclose(sum(_f64(q["batch_l2"])), norms ** 2, rtol=1e-3)
    _close(q["grads"], [a.mean(axis=0) for a in g])  # the mean of the g_x is the gradient
    squares = [np.sum(a * a, axis=0) for a in g]
    assert _shapes(q["sum_grad_squared"]) == _shapes(params)
    _close(q["sum_grad_squared"], squares)  # Σ_x g_x ⊙ g_x
    variance = [s / n - a.mean(axis=0) ** 2 for s, a in zip(squares, g)]  # (1/N) Σ g_x⊙g_x − ḡ⊙ḡ
    for got, want, s in zip(_f64(q["variance"]), variance, squares):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * (s / n).max())
    weights = np.minimum(1, 1 / norms)  # clip at 1
    _close(q["clipped"], [np.tensordot(weights, a, axes=1) for a in g])  # Σ_x min(1, 1/‖g_x‖) g_x
    noise, mean = q["noise"], [a.mean(axis=0) for a in g]  # B_simple = tr(Σ)/‖G‖², each estimated unbiased
    trace_cov = sum(np.sum((a - m) ** 2) for a, m in zip(g, mean)) / (n - 1)
    np.testing.assert_allclose(noise.trace_cov, trace_cov, rtol=1e-3)
    # ‖ḡ‖² − tr(Σ)/N cancels (with random labels ‖G‖² is about 0): judged on the scale of tr(Σ)/N
    np.testing.assert_allclose(noise.grad_sq, sum(np.sum(m * m) for m in mean) - trace_cov / n, rtol=0,
                               atol=1e-3 * trace_cov / n)
    np.testing.assert_allclose(noise.b_simple, noise.trace_cov / noise.grad_sq, rtol=1e-5)


def check_curvature(printed, params, v, l2, c):
    for name in ("hv", "gv", "gv_again", "diag", "diag_mc"):  # shaped like params
        assert _shapes(c[name]) == _shapes(params), name
    _close(c["gv_again"], c["gv"])
    vs = _f64(v)
    v_w = sum(np.sum(layer["W"].astype(np.float64) ** 2) for layer in v)
    # G is positive semi-definite, and its L2 term adds β v_W: vᵀ G v ≥ β ‖v_W‖²
    assert sum(np.vdot(a, b) for a, b in zip(vs, _f64(c["gv"]))) >= (1 - 1e-4) * l2 * v_w
    for name in ("diag", "diag_mc"):  # diagonals of G: β on the weights plus a sum of squares
        for layer in c[name]:
            assert (layer["W"] >= (1 - 1e-4) * l2).all() and (layer["b"] >= 0).all(), name
    sizes = [np.shape(layer["W"]) for layer in params]  # (n_l, n_{l-1})
    assert [(k.A.shape, k.G.shape) for k in c["kflr"]] == [((m + 1, m + 1), (n, n)) for n, m in sizes]
    top = c["sharpness"]  # λ_max of H: no Rayleigh quotient exceeds it
    assert _shapes(top.vector) == _shapes(params)
    np.testing.assert_allclose(np.sqrt(sum(np.sum(a * a) for a in _f64(top.vector))), 1, rtol=1e-3)
    rayleigh = sum(np.vdot(a, b) for a, b in zip(vs, _f64(c["hv"]))) / sum(np.sum(a * a) for a in vs)
    assert rayleigh <= top.value + 1e-3 * abs(top.value)


def check_laplace(printed, probs, evidence_before, evidence_after):
    p = np.asarray(probs, np.float64)
    assert p.shape == (5, 3) and (p > 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)  # rows sum to 1
    assert evidence_after >= evidence_before - 1e-3 * abs(evidence_before)  # at least evidence_before


def check_influence(printed, x, y, test, params, scores, helpful, helpful_scores, similar):
    n = len(x)
    s = np.asarray(scores, np.float64)
    assert s.shape == (1, n)
    np.testing.assert_array_equal(helpful, np.argsort(s[0], kind="stable")[:5])  # the streamed top-5 is the row's
    np.testing.assert_allclose(helpful_scores, s[0, helpful], rtol=1e-5)
    assert (np.diff(helpful_scores) >= 0).all() and helpful_scores[0] < 0  # most helpful (most negative) first
    # the cosines against per-example gradients materialized by vmap(jax.grad), float64
    net = fnn.MLP((64, 32, 10), "relu", "identity")
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)  # tests run with float64 enabled

    def grad(xi, yi):
        g = jax.grad(lambda p: fnn.losses.softmax_cross_entropy(net.apply(p, xi[None]), yi[None]))(p64)
        return np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])

    gt = grad(np.asarray(test[0][0], np.float64), np.asarray(test[1][0]))
    gx = np.stack([grad(np.asarray(x[i], np.float64), np.asarray(y[i])) for i in range(0, n, 97)])
    cos = gx @ gt / (np.linalg.norm(gx, axis=1) * np.linalg.norm(gt))
    np.testing.assert_allclose(np.asarray(similar, np.float64)[0, ::97], cos, rtol=0, atol=1e-3)  # float32 sums


CHECKS = {"Example": check_example, "Per-example quantities": check_per_example, "Curvature": check_curvature,
          "The Laplace approximation and the evidence": check_laplace,
          "Training-data attribution: which training images made this prediction": check_influence}
PYTHON = _blocks("python")


def _id(index: int, block: Block) -> str:
    return f"{index}-{re.sub(r'[^a-z0-9]+', '-', block.heading.lower()).strip('-')}"


def test_every_check_has_its_block():
    headings = [b.heading for b in PYTHON]
    assert len(set(headings)) == len(headings), f"one Python block per section, so a check names it: {headings}"
    assert set(CHECKS) <= set(headings), f"checks without a README block: {set(CHECKS) - set(headings)}"


@pytest.mark.slow  # each block runs in a fresh Python process
@pytest.mark.parametrize("block", PYTHON, ids=[_id(i, b) for i, b in enumerate(PYTHON)])
def test_readme_example_runs_alone(block, tmp_path):
    check = CHECKS.get(block.heading)
    names = list(inspect.signature(check).parameters)[1:] if check else []
    path = tmp_path / "result.pickle"
    done = subprocess.run([sys.executable, "-c", _RUN], input=pickle.dumps((block.line, block.code, names, path)),
                          cwd=ROOT, capture_output=True, timeout=300)
    assert done.returncode == 0, f"README.md line {block.line} ({block.heading}):\n{done.stderr.decode()}"
    if check:
        printed, values = pickle.loads(path.read_bytes())
        check(printed, **values)


def test_ci_runs_the_readme_test_command():
    commands = [line for block in _blocks("bash") for line in block.code.splitlines() if "pytest" in line]
    assert len(commands) == 1, commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci, f"{commands[0]!r} is not a line of .ci/run"
