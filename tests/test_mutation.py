"""experiments/mutation.py: its mutant list still matches the sources, and one mutant runs end to end.

The full list runs by hand (minutes); here only the list is checked against the code and one cheap
mutant goes through the whole machinery: the copy, the baseline, the edit, the verdict.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("_experiment_mutation", ROOT / "experiments" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


mutation = _load_script()


def test_every_mutant_still_applies_to_the_sources():
    """Fails when the code under a mutant changed and the list was not updated (the list cannot rot)."""
    mutation.check_list()
    assert len(mutation.MUTANTS) >= 30
    areas = {m.area for m in mutation.MUTANTS}
    assert {"δ-recursion", "losses", "optimizers", "shuffle and epoch", "checkpoint", "batch norm",
            "per-example", "privacy"} <= areas


def test_a_mutant_that_no_longer_matches_is_refused():
    stale = mutation.Mutant("stale", "losses", "fnn/losses.py", "text that is not there", "x",
                            ("tests/test_losses.py",), "")
    twice = mutation.Mutant("twice", "losses", "fnn/losses.py", "return", "yield", ("tests/test_losses.py",), "")
    with pytest.raises(SystemExit, match=r"stale: the original text occurs 0 times(.|\n)*twice: .* times"):
        mutation.check_list([stale, twice])


def test_one_mutant_is_caught_in_a_copy_and_the_checkout_is_untouched(capsys):
    m = next(m for m in mutation.MUTANTS if m.name == "checkpoint-key-not-restored")
    before = (ROOT / m.file).read_text(encoding="utf-8")
    assert mutation.main(["--only", m.name, "--timeout", "300"]) == 0
    assert (ROOT / m.file).read_text(encoding="utf-8") == before
    out = capsys.readouterr().out
    assert "baseline: passed" in out
    assert "score: 1/1 mutants caught = 100.0 %" in out
    assert "FAILED test_checkpoint.py::test_round_trip_is_exact" in out


def test_the_tests_refuse_to_run_against_any_fnn_but_the_copy(monkeypatch):
    """Without fnn/ in the copy, the tests would import the checkout's (installed) fnn and pass: the
    plugin stops that run, and the verdict is an error, never 'survived'."""
    monkeypatch.setattr(mutation, "COPIED", ("tests", "pyproject.toml"))
    out = mutation.run_tests(ROOT, ("tests/test_losses.py::test_l2_penalty_counts_weights_only",), 300)
    assert out.status == "error"
    assert "not from the mutated copy" in out.detail
