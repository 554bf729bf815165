"""README.md stays true: its example runs, and CI runs exactly its test command."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_examples_run():
    examples = [e for e in _blocks("python") if not e.startswith("opt = fnn.second_order")]
    for fragment in set(_blocks("python")) - set(examples):  # fragments (no data defined): valid Python at least
        compile(fragment, "README.md", "exec")
    assert len(examples) == 3  # the first steps, the per-example quantities, curvature
    for example in examples:
        # a fresh interpreter with JAX's defaults, as a reader would run it
        done = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr


def test_ci_runs_the_readme_test_command():
    commands = [line for block in _blocks("bash") for line in block.splitlines() if "pytest" in line]
    assert len(commands) == 1, commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci, f"{commands[0]!r} is not a line of .ci/run"
