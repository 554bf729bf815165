"""tests/slow.txt, the fast tier's list, names tests that exist: conftest.py refuses a stale line in a full
run; this checks the same without collecting, so that the fast tier sees it too."""

import re
from pathlib import Path

from conftest import _slow_entries

TESTS = Path(__file__).resolve().parent


def missing(entries: list[str]) -> list[str]:
    """The entries whose file has no test function of that name (``name__variant``, as chex.variants
    names its generated tests, counts as ``name``)."""
    out = []
    for entry in entries:
        file, *names = entry.split("[", 1)[0].split("::")
        path = TESTS / file
        defs = set(re.findall(r"^\s*def (\w+)\(", path.read_text(), re.M)) if path.is_file() else set()
        name = names[-1] if names else ""
        if name not in defs and not any(name.startswith(d + "__") for d in defs):
            out.append(entry)
    return out


def test_every_line_of_the_slow_list_names_a_test_function_of_its_file():
    entries = _slow_entries()
    assert entries, "tests/slow.txt lists no test"
    assert not missing(entries), f"tests/slow.txt names tests that do not exist: {missing(entries)[:5]}"


def test_a_renamed_or_removed_test_is_named():
    assert missing(["test_tiers.py::test_a_renamed_or_removed_test_is_named",
                    "test_tiers.py::test_renamed_away[x]", "test_gone.py::test_a", "test_tiers.py"]) == [
        "test_tiers.py::test_renamed_away[x]", "test_gone.py::test_a", "test_tiers.py"]
