"""Checkpoints: params, optimizer state, epoch, PRNG key and normalization statistics in one file.

The file is a NumPy ``.npz`` archive of plain arrays (read with ``allow_pickle=False``: no pickled
code) plus a JSON header with the format, the epoch, free-form metadata, each leaf's tree path and
a SHA-256 digest of every array's bytes. It is written to a temporary file in the same directory,
flushed to disk and renamed over the target, so a crash never leaves a half-written checkpoint
under the final name. A truncated or corrupt file is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

FORMAT = "fnn-checkpoint-1"
_NAME = re.compile(r"^epoch-(\d{6})\.npz$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: truncated, corrupt, or not matching the template."""


class Checkpoint(NamedTuple):
    """What a checkpoint holds. ``normalizer`` is ``(mean, std)`` arrays or ``None``."""

    params: Any
    opt_state: Any
    key: jax.Array
    epoch: int
    normalizer: tuple[np.ndarray, np.ndarray] | None
    meta: dict
    state: Any = None  # batch-norm running statistics, when the network has them


def _leaves(tree) -> tuple[list[str], list[np.ndarray]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in flat], [np.asarray(v) for _, v in flat]


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(path, *, params, opt_state, key, epoch: int, normalizer=None, meta: dict | None = None,
         state=None) -> Path:
    """Write a checkpoint atomically to ``path`` and return it (``state``: batch-norm statistics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays, paths = {}, {}
    for group, tree in (("params", params), ("opt_state", opt_state), ("state", state)):
        names, values = _leaves(tree)
        paths[group] = names
        for i, v in enumerate(values):
            arrays[f"{group}.{i}"] = v
    arrays["key"] = np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                               else key)
    if normalizer is not None:
        arrays["norm.mean"], arrays["norm.std"] = (np.asarray(a) for a in normalizer)
    header = {"format": FORMAT, "epoch": int(epoch), "paths": paths, "meta": meta or {},
              "sha256": _digest(arrays)}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): {e}") from None
    try:
        header = json.loads(arrays.pop("header").tobytes().decode())
    except (KeyError, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: no valid fnn checkpoint header.") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}.")
    if _digest(arrays) != header.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch, the arrays are corrupt.")
    return header, arrays


def _restore(path, group, template, header, arrays):
    names, values = _leaves(template)
    stored = header["paths"].get(group, [])
    if stored != names:
        raise CheckpointError(
            f"{path}: {group} has leaves {stored} but the template expects {names}; the checkpoint "
            f"was written for a different configuration."
        )
    out = []
    for i, (name, want) in enumerate(zip(names, values)):
        got = arrays[f"{group}.{i}"]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"{path}: {group}{name} is {got.dtype}{list(got.shape)}, template expects "
                f"{want.dtype}{list(want.shape)}."
            )
        out.append(jax.numpy.asarray(got))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), out)


def load(path, *, params, opt_state, state=None) -> Checkpoint:
    """Read a checkpoint, restoring ``params``, ``opt_state`` (and ``state``) into the templates' structure.

    The templates (e.g. ``net.init(key)``, ``opt.init(params)`` and ``net.init_state()``) fix the
    tree structure, shapes and dtypes the file must match; any difference raises
    :class:`CheckpointError` naming the leaf.
    """
    path = Path(path)
    header, arrays = _read(path)
    if state is None and header["paths"].get("state"):
        raise CheckpointError(f"{path} holds batch-norm statistics: pass state=net.init_state() as a template.")
    normalizer = (arrays["norm.mean"], arrays["norm.std"]) if "norm.mean" in arrays else None
    return Checkpoint(
        params=_restore(path, "params", params, header, arrays),
        opt_state=_restore(path, "opt_state", opt_state, header, arrays),
        key=jax.numpy.asarray(arrays["key"]),
        epoch=int(header["epoch"]),
        normalizer=normalizer,
        meta=header["meta"],
        state=None if state is None else _restore(path, "state", state, header, arrays),
    )


def path_for(directory, epoch: int) -> Path:
    """The file name used for ``epoch`` inside a checkpoint directory."""
    return Path(directory) / f"epoch-{epoch:06d}.npz"


def latest(directory) -> Path | None:
    """The checkpoint with the highest epoch in ``directory``, or ``None``."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)))
    return found[-1][1] if found else None


def prune(directory, keep: int = 3) -> None:
    """Delete all but the ``keep`` newest checkpoints in ``directory``."""
    found = sorted(p for p in Path(directory).iterdir() if _NAME.match(p.name))
    for p in found[:-keep] if keep > 0 else found:
        p.unlink()
