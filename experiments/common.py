"""What every experiment script shares: its command line, its output folder, its JSON and PNG.

Each script is run as ``python experiments/<name>.py [--out DIR] [--quick] [--seed S]``. ``--quick`` is
the reduced mode the test suite runs (seconds, not minutes); the numbers it prints are then only a
smoke test of the code path, not the result the experiment claims. ``--seed S`` is the base seed: every
random draw of the run (initializations, data, batch orders, probes) comes from seeds ``S, S + 1, …``,
so ``--seed 1000`` repeats the experiment on seeds disjoint from the default ones.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def parse_args(name: str, description: str, argv=None, extra=None) -> argparse.Namespace:
    """``--out`` (default ``out/<name>``), ``--quick``, ``--seed`` and ``--data-dir``; ``extra(parser)`` adds
    more."""
    p = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=description)
    p.add_argument("--out", default=str(ROOT / "out" / name), help="folder for the PNG and JSON")
    p.add_argument("--quick", action="store_true", help="reduced mode for smoke tests")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed: the run's seeds are S, S+1, ... (default 0; e.g. 1000 for a disjoint range)")
    p.add_argument("--data-dir", default=os.environ.get("FNN_DATA_DIR"),
                   help="MNIST directory (default $FNN_DATA_DIR, then ../shared/data/mnist-t10k)")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.seed < 0:
        p.error(f"--seed must be a non-negative integer, got {args.seed}")
    if args.data_dir is None:
        shared = ROOT.parent / "shared" / "data" / "mnist-t10k"
        args.data_dir = str(shared) if shared.is_dir() else None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.name = name
    args.started = time.perf_counter()
    return args


def mnist_10k(args: argparse.Namespace, quick_rows: int):
    """``(x_train (8000, 784), y_train, x_test (2000, 784), y_test, raw)`` of ``mnist-10k``: float32
    jax arrays z-scored with statistics of the training split, and the raw :class:`fnn.data.Dataset`
    (pixels in [0, 1]); with ``--quick`` only the first ``quick_rows`` training rows (a multiple of
    the batch size: no smaller last batch to compile)."""
    import jax.numpy as jnp

    import fnn

    raw = fnn.data.load_dataset("mnist-10k", args.data_dir)
    data, _ = fnn.data.zscore_dataset(raw)
    x_train, x_test = (jnp.asarray(x, jnp.float32) for x in (data.x_train, data.x_test))
    y_train, y_test = jnp.asarray(data.y_train), jnp.asarray(data.y_test)
    if args.quick:
        x_train, y_train = x_train[:quick_rows], y_train[:quick_rows]
    return x_train, y_train, x_test, y_test, raw


def seeds(args: argparse.Namespace, count: int) -> list[int]:
    """The run's ``count`` seeds: ``S, S + 1, …, S + count − 1`` for ``--seed S``."""
    return [args.seed + s for s in range(count)]


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(np.asarray(value).tolist())
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def save_json(args: argparse.Namespace, results: dict) -> Path:
    """Write ``<out>/<name>.json`` with the results plus the mode, the base seed and the run time."""
    results = dict(results, quick=bool(args.quick), base_seed=args.seed,
                   seconds=round(time.perf_counter() - args.started, 2))
    path = Path(args.out) / f"{args.name}.json"
    path.write_text(json.dumps(_plain(results), indent=1) + "\n")
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    from fnn.plots import pyplot as _pyplot

    return _pyplot()


FIGURE_BYTES = 150_000
"""The most a figure may take, so that it can be committed (``experiments/figures/``)."""


def save_figure(args: argparse.Namespace, fig, dpi: int = 110) -> Path:
    """Write ``<out>/<name>.png`` at ``dpi``, or at the highest lower resolution within ``FIGURE_BYTES`` (the
    size of a PNG grows about as the square of the resolution), and close the figure."""
    path = Path(args.out) / f"{args.name}.png"
    fig.tight_layout()
    for _ in range(6):
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=dpi, format="png")
        if buffer.tell() <= FIGURE_BYTES:
            break
        dpi = int(dpi * 0.95 * (FIGURE_BYTES / buffer.tell()) ** 0.5)
    else:
        raise RuntimeError(f"{path.name}: no resolution down to {dpi} dpi fits in {FIGURE_BYTES:,} bytes")
    path.write_bytes(buffer.getvalue())
    pyplot().close(fig)
    return path


def conclude(args: argparse.Namespace, text: str) -> None:
    """Print the experiment's conclusion (and where its files are)."""
    print(f"[{args.name}] {text}")
    seconds = time.perf_counter() - args.started
    print(f"[{args.name}] wrote {Path(args.out) / args.name}.png and .json in {seconds:.1f}s")
