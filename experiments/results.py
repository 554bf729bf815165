"""The results blocks of experiments/README.md, generated from the experiments' JSON.

A block is the text between ``<!-- results NAME -->`` and ``<!-- /results -->``; it quotes only the
deterministic fields of ``NAME.json`` (counts, not timings), rendered by ``RENDER[NAME]``, so a quoted
number cannot drift from what the script prints: ``tests/test_experiments_b.py`` renders a fresh
run's JSON and compares it with the block. After changing an experiment, regenerate with

    python experiments/<name>.py && python experiments/results.py

which rewrites every block whose ``out/<name>/<name>.json`` exists (``--check`` only compares).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "experiments" / "README.md"
BLOCK = re.compile(r"(<!-- results (\w+) -->\n)(.*?)(<!-- /results -->)", re.S)


def _more(counts: dict, other: dict, top: int = 5) -> str:
    """The primitives ``counts`` has more of than ``other``, largest surplus first."""
    surplus = {k: v - other.get(k, 0) for k, v in counts.items() if v > other.get(k, 0)}
    ranked = sorted(surplus.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return ", ".join(f"`{k}` (+{v})" for k, v in ranked)


def render_autodiff_graphs(r: dict) -> str:
    ops, dots, depth = r["total_operations"], r["dot_general"], r["depth"]
    layers = len(r["small_sizes"]) - 1
    manual, auto = r["backward_only_counts"]["manual"], r["backward_only_counts"]["autodiff"]
    return (
        f"- graphs (nested calls inlined): forward {ops['forward']} operations ({dots['forward']} matmuls, depth "
        f"{depth['forward']}), manual backprop {ops['manual']} ({dots['manual']} matmuls, depth {depth['manual']}), "
        f"`jax.grad` {ops['autodiff']} ({dots['autodiff']} matmuls, depth {depth['autodiff']}): both add "
        f"{dots['manual'] - dots['forward']} = `2L − 1` = {2 * layers - 1} matmuls. Beyond the forward pass "
        f"`jax.grad` has more {_more(auto, manual)}; the manual graph more {_more(manual, auto)}.\n"
    )


RENDER = {"autodiff_graphs": render_autodiff_graphs}


def blocks(text: str) -> dict[str, str]:
    """``{name: body}`` of every results block in ``text``."""
    return {m.group(2): m.group(3) for m in BLOCK.finditer(text)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="experiments/results.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "out"), help="folder holding <name>/<name>.json (default out/)")
    p.add_argument("--check", action="store_true", help="compare only; exit status 1 on a difference")
    args = p.parse_args(argv)
    text = README.read_text()
    stale = []

    def replace(m):
        name = m.group(2)
        path = Path(args.out) / name / f"{name}.json"
        if name not in RENDER or not path.exists():
            return m.group(0)
        body = RENDER[name](json.loads(path.read_text()))
        if body != m.group(3):
            stale.append(name)
        return m.group(1) + body + m.group(4)

    new = BLOCK.sub(replace, text)
    if args.check:
        print("stale: " + ", ".join(stale) if stale else "every block matches its JSON")
        return 1 if stale else 0
    README.write_text(new)
    print(f"rewrote {', '.join(stale) or 'nothing (every block matched)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
