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
            "per-example", "privacy", "curvature", "second-order"} <= areas
    files = {m.file for m in mutation.MUTANTS}
    assert {"fnn/curvature.py", "fnn/second_order.py", "fnn/per_example.py", "fnn/noise.py"} <= files


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


class _Exited:
    """A stand-in for ``subprocess.Popen``: every pytest run exits at once with ``status``."""

    def __init__(self, status, output):
        self.status, self.output, self.commands = status, output, []

    def __call__(self, cmd, **kwargs):
        self.commands.append(cmd)
        self.pid, self.returncode = 0, self.status
        return self

    def communicate(self, timeout=None):
        return self.output, None


def test_a_mutant_whose_tests_the_marker_deselects_survives_with_no_fast_test(monkeypatch, capsys):
    """``--marker EXPR`` passes ``-m EXPR`` to pytest; exit status 5 (every test deselected) is a survivor
    reported as "no fast test" for a mutant, and a pass for the baseline. No real pytest run: Popen is
    a stand-in and nothing is copied."""
    fake = _Exited(5, "3 deselected in 0.01s\n")
    monkeypatch.setattr(mutation.subprocess, "Popen", fake)
    monkeypatch.setattr(mutation, "_copy", lambda root, into: into)
    monkeypatch.setattr(mutation, "_apply", lambda copy, mutant: None)
    m = next(m for m in mutation.MUTANTS if m.name == "checkpoint-key-not-restored")
    out = mutation.run_tests(ROOT, m.tests, 60, m, marker="not slow")
    assert out.status == "survived" and out.detail.startswith("no fast test")
    cmd = fake.commands[-1]
    assert cmd[2] == "pytest" and cmd[cmd.index("not slow") - 1] == "-m" and cmd[-len(m.tests):] == list(m.tests)
    assert mutation.run_tests(ROOT, m.tests, 60, marker="not slow").status == "passed"  # the baseline
    # without a marker, "no tests ran" means node ids that name nothing: an error, never a verdict
    assert mutation.run_tests(ROOT, m.tests, 60, m).status == "error"
    assert "-m" not in fake.commands[-1][3:]
    # the whole script: the survivor is listed as having no fast test, and the score counts it
    monkeypatch.setattr(mutation, "check_list", lambda *args, **kwargs: None)
    assert mutation.main(["--only", m.name, "--marker", "not slow"]) == 0
    printed = capsys.readouterr().out
    assert "baseline: passed" in printed
    assert f"{m.name} [{m.file}]: {m.bug}\n    no fast test (-m 'not slow')" in printed
    assert "score: 0/1 mutants caught by the tests of -m 'not slow' = 0.0 %" in printed
