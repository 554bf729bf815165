"""experiments/results.py: the README's results blocks against the committed JSON and figures.

Every block with a committed ``experiments/results/KEY.json`` must render to exactly its text, and a
changed number in a committed JSON, a missing JSON or a missing figure must each make ``--check`` fail.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))
results = importlib.import_module("results")
common = importlib.import_module("common")

COMMITTED = sorted(results.RESULTS.glob("*.json"))


def _numbers(value, path=()):
    """``(path, number)`` for every int or float (not bool) in a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, (*path, i))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def _set(value, path, new):
    for k in path[:-1]:
        value = value[k]
    value[path[-1]] = new


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_a_committed_json_renders_to_its_block_and_has_its_figure(path):
    text = results.README.read_text()
    blocks = results.blocks(text)
    assert path.stem in blocks, f"{path.name} is committed but experiments/README.md has no block {path.stem}"
    run = json.loads(path.read_text())
    assert run["quick"] is False and results.key_of(run, path.stem.split("@")[0]) == path.stem
    assert results.RENDER[path.stem.split("@")[0]](run) == blocks[path.stem], \
        "stale block: python experiments/results.py"
    figure = results.FIGURES / f"{path.stem}.png"
    assert figure.exists() and figure.stat().st_size <= results.FIGURE_LIMIT
    assert f"](figures/{path.stem}.png)" in text, f"experiments/README.md does not show figures/{path.stem}.png"


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_the_check_fails_when_a_quoted_number_of_a_committed_json_changes(path, tmp_path):
    text = results.README.read_text()
    key = path.stem
    run = json.loads(path.read_text())
    name = key.split("@")[0]
    quoted = results.RENDER[name](run)
    # find a number whose change shows in the block: the check must then fail
    for where, value in _numbers(run):
        if where[0] in ("seconds", "base_seed", "quick"):
            continue
        changed = json.loads(path.read_text())
        _set(changed, where, value * 3 + 7)
        try:
            if results.RENDER[name](changed) == quoted:
                continue
        except Exception:  # a number the renderer reads as an index or a count: try the next one
            continue
        folder = tmp_path / "results"
        folder.mkdir()
        for other in COMMITTED:
            shutil.copy(other, folder / other.name)
        (folder / path.name).write_text(json.dumps(changed))
        problems = results.check(text, results=folder)
        assert any(p.startswith(f"block {key}:") and "differs" in p for p in problems), problems
        return
    pytest.fail(f"no number of {path.name} shows in its block")


def test_the_check_names_a_block_without_committed_json_and_a_missing_figure(tmp_path):
    text = ("<!-- results newton -->\nold\n<!-- /results -->\n"
            "![the figure](figures/never-committed.png)\n")
    problems = results.check(text, results=tmp_path)
    assert any(p.startswith("block newton: no committed results/newton.json") for p in problems), problems
    assert "figure figures/never-committed.png: referenced, not committed" in problems


def test_take_refuses_a_quick_run_and_a_missing_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(results, "FIGURES", tmp_path / "figures")
    out = tmp_path / "out"
    out.mkdir()
    (out / "newton.json").write_text(json.dumps({"quick": True}))
    with pytest.raises(SystemExit, match="--quick run"):
        results.take(out)
    (out / "newton.json").write_text(json.dumps({"quick": False, "base_seed": 1000}))
    with pytest.raises(SystemExit, match="newton.png is missing"):
        results.take(out)
    (out / "newton.png").write_bytes(b"\x89PNG" + b"\0" * (results.FIGURE_LIMIT + 1))
    with pytest.raises(SystemExit, match="more than the 150,000"):
        results.take(out)
    (out / "newton.png").write_bytes(b"\x89PNG")
    assert results.take(out) == "newton@1000"
    assert (tmp_path / "results" / "newton@1000.json").exists() and (tmp_path / "figures" / "newton@1000.png").exists()


def test_save_figure_lowers_the_resolution_until_the_png_fits(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import numpy as np

    monkeypatch.setattr(common, "FIGURE_BYTES", 40_000)
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(12, 8))
    ax.scatter(*np.random.default_rng(0).normal(size=(2, 4000)), s=2)  # busy: large at 110 dpi
    args = type("Args", (), {"out": str(tmp_path), "name": "busy"})()
    path = common.save_figure(args, fig)
    assert 0 < path.stat().st_size <= 40_000
    fig, ax = plt.subplots(figsize=(12, 8))
    ax.scatter(*np.random.default_rng(0).normal(size=(2, 4000)), s=2)
    fig.savefig(tmp_path / "full.png", dpi=110)
    assert (tmp_path / "full.png").stat().st_size > 40_000  # so the first test lowered the resolution


def test_the_check_passes_on_the_committed_results():
    # what `python experiments/results.py --check` reports on this checkout: every block has its committed
    # JSON and renders to exactly its text, and every figure the README references is committed
    assert results.check(results.README.read_text()) == []
    assert results.main(["--check"]) == 0


@pytest.mark.parametrize("seed", ["-1", "1.5", "x"])
def test_a_seed_that_is_not_a_non_negative_integer_is_refused(seed, tmp_path, capsys):
    with pytest.raises(SystemExit):
        common.parse_args("newton", "", ["--seed", seed, "--out", str(tmp_path)])
    assert "--seed" in capsys.readouterr().err


def test_the_seeds_of_a_run_start_at_its_base_seed(tmp_path):
    args = common.parse_args("newton", "", ["--seed", "1000", "--out", str(tmp_path)])
    assert args.seed == 1000 and common.seeds(args, 3) == [1000, 1001, 1002]
