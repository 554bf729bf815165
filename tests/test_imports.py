"""The package's modules import one another without a cycle, and the optimizer registry is filled by
the modules that define optimizers (``fnn.optim`` never imports ``fnn.second_order``).

The imports are read from the sources with :mod:`ast`, at every level (a function's lazy import is a
cycle too, only a later one). ``fnn/__init__.py`` imports every module, so it is left out of the graph.
"""

import ast
from pathlib import Path

import pytest

import fnn
from fnn import optim

PACKAGE = Path(fnn.__file__).resolve().parent


def _imported(source: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` (``"fnn.optim"``, ...) that ``source``, a module of fnn, imports anywhere:
    ``import fnn.x [as y]``, ``from fnn import x [as y]``, ``from fnn.x import y`` and their relative forms."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the package fnn, whose modules are one level deep
                base = f"fnn.{base}".rstrip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # from fnn import x: x may be a module
    return found & modules


def _graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module name -> the modules it imports, for ``sources`` (module name -> text)."""
    return {name: _imported(text, set(sources)) - {name} for name, text in sources.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (a depth-first search)."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for other in sorted(graph[name]):
            if found := visit(other):
                return found
        path.pop()
        done.add(name)
        return None

    return next((found for name in sorted(graph) if (found := visit(name))), None)


def _package_sources() -> dict[str, str]:
    return {f"fnn.{p.stem}": p.read_text(encoding="utf-8") for p in sorted(PACKAGE.glob("*.py"))
            if p.name != "__init__.py"}


def test_the_package_has_no_import_cycle():
    graph = _graph(_package_sources())
    assert {"fnn.optim", "fnn.second_order", "fnn.cli"} <= set(graph)
    assert "fnn.optim" in graph["fnn.second_order"]  # the reader sees the edges, not an empty graph
    assert "fnn.second_order" not in graph["fnn.optim"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("statement", [
    "import fnn.second_order",
    "import fnn.second_order as so",
    "from fnn import second_order",
    "from fnn import second_order as so",
    "from fnn.second_order import kfac",
    "from . import second_order",
    "from .second_order import kfac",
])
def test_every_form_of_import_is_an_edge_also_inside_a_function(statement):
    sources = {"fnn.optim": f"def _factories():\n    {statement}\n", "fnn.second_order": "from fnn.optim import x\n"}
    graph = _graph(sources)
    assert graph == {"fnn.optim": {"fnn.second_order"}, "fnn.second_order": {"fnn.optim"}}
    assert _cycle(graph) == ["fnn.optim", "fnn.second_order", "fnn.optim"]


def test_imports_of_names_and_of_other_packages_are_no_edges():
    sources = {"fnn.a": "import fnn\nimport jax.numpy as jnp\nfrom fnn import b_value, c\nfrom numpy import a\n",
               "fnn.b": "", "fnn.c": "from fnn.b import a\n"}
    assert _graph(sources) == {"fnn.a": {"fnn.c"}, "fnn.b": set(), "fnn.c": {"fnn.b"}}
    assert _cycle(_graph(sources)) is None


def test_registry_holds_every_optimizer_after_import_fnn_and_is_read_only():
    assert {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "kfac", "hessian_free"} <= set(
        optim.OPTIMIZERS)
    assert optim.OPTIMIZERS["kfac"] is fnn.second_order.kfac
    assert optim.OPTIMIZERS["hessian_free"] is fnn.second_order.hessian_free
    with pytest.raises(TypeError):
        optim.OPTIMIZERS["lion"] = optim.sgd


def test_register_refuses_a_name_taken_by_another_factory():
    def adam(learning_rate):
        return optim.sgd(learning_rate)

    before = dict(optim.OPTIMIZERS)
    with pytest.raises(ValueError, match="an optimizer named 'adam' is registered already .*fnn.optim.adam"):
        optim.register(adam)
    optim.register(optim.adam, fnn.second_order.kfac)  # the same factories again: nothing changes
    assert dict(optim.OPTIMIZERS) == before
