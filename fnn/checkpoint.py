"""Checkpoints: params, optimizer state, epoch, PRNG key and normalization statistics in one file.

The file is a NumPy ``.npz`` archive of plain arrays (read with ``allow_pickle=False``: no pickled
code) plus a JSON header with the format, the epoch, free-form metadata, each leaf's tree path and
a SHA-256 digest of every array's bytes. It is written to a temporary file in the same directory,
flushed to disk and renamed over the target, so a crash never leaves a half-written checkpoint
under the final name (a killed write leaves a ``.{name}.*.tmp`` file, never taken as a checkpoint and
removed by the next :func:`save` of that name or :func:`prune` of its directory). A truncated or corrupt
file, whatever part of it is damaged, is refused with :class:`CheckpointError`.

In a directory of ``epoch-NNNNNN.npz`` files (:func:`path_for`), :func:`latest` finds the newest intact
one, passing over damaged ones, and :func:`prune` rotates the files of one run (``meta["run"]``),
keeping its newest ones and its best by ``meta["held_out_loss"]``, and never touching other runs' files.
:func:`lock` gives one process at a time the directory (a ``.lock`` file, which no function here takes
for a checkpoint).

Saved with ``net=`` and ``opt=``, a checkpoint describes itself: the header also holds the
:class:`fnn.MLP` configuration (``sizes``, ``activation``, ``output``, ``initializer``,
``batch_norm``, ``bn_momentum``, ``bn_eps``, ``compute_dtype``) and the optimizer's name and
hyper-parameters (:func:`fnn.optim.describe`), as JSON. Then ``load(path)`` needs no templates: it rebuilds the
network, the optimizer, and from them the structure of params, optimizer state and batch-norm
state. Given the expected ``net``/``opt``, ``load`` refuses a checkpoint written by another
configuration and names the difference::

    checkpoint.save(path, params=p, opt_state=s, key=k, epoch=3, net=net, opt=opt)
    ck = checkpoint.load(path)                    # ck.net == net, ck.opt rebuilt, ck.params ...
    checkpoint.load(path, net=other_net)          # CheckpointError: ... checkpoint has sizes
                                                  # (784, 256, 10), expected (784, 128, 10)

Saved with ``posterior=`` (a :class:`fnn.laplace.Posterior` fitted at the params saved), the file also holds
the Laplace posterior: its arrays in the group ``posterior`` (``prior_precision (L,)``, ``log_likelihood ()``
and the curvature in the structure's form: ``"kron"`` per layer ``(a, Q_A, g, Q_G)``; ``"full"`` and
``"last_layer"`` ``H``, ``eigvals``, ``eigvecs``; ``"diag"`` ``h``) and its ``structure``, ``N`` and loss name
in the header, which the digest covers too. :func:`load` rebuilds it with the checkpoint's network and params
(``Checkpoint.posterior``, ``None`` for a file without one)::

    checkpoint.save(path, params=p, opt_state=s, key=k, epoch=3, net=net, opt=opt, posterior=post)
    checkpoint.load(path).posterior               # log_marginal_likelihood, glm_predictive as post's
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from fnn import laplace, optim
from fnn.losses import LOSSES
from fnn.mlp import MLP

FORMAT = "fnn-checkpoint-1"
_NAME = re.compile(r"^epoch-(\d{6})\.npz$")
LOCK = ".lock"  # the lock file of a checkpoint directory, see lock()


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: truncated, corrupt, or not matching the template."""


class Locked(RuntimeError):
    """Another process holds the checkpoint directory (:func:`lock`)."""


class Checkpoint(NamedTuple):
    """What a checkpoint holds. ``normalizer`` is ``(mean, std)`` arrays or ``None``.

    ``net`` and ``opt`` are the network and optimizer: the ones passed to :func:`load`, else
    rebuilt from the file's description, else ``None`` (an optimizer whose learning rate is a
    schedule cannot be rebuilt, see :func:`fnn.optim.describe`). ``posterior`` is the Laplace
    posterior saved with the params (a :class:`fnn.laplace.Posterior` at ``params``), or ``None``.
    """

    params: Any
    opt_state: Any
    key: jax.Array
    epoch: int
    normalizer: tuple[np.ndarray, np.ndarray] | None
    meta: dict
    state: Any = None  # batch-norm running statistics, when the network has them
    net: MLP | None = None
    opt: optim.Optimizer | None = None
    posterior: laplace.Posterior | None = None


def _leaves(tree) -> tuple[list[str], list]:
    """The leaves' tree paths (``"[0]['W']"``) and the leaves (arrays or ``jax.ShapeDtypeStruct``)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in flat], [v if hasattr(v, "dtype") else np.asarray(v) for _, v in flat]


# The model's configuration as JSON: the fields of fnn.MLP; __init__ calls the field ``initializer`` ``init``.
_MLP_FIELDS = tuple(f.name for f in dataclasses.fields(MLP))
_MLP_ARGUMENT = {"initializer": "init"}


def _net_config(net: MLP) -> dict:
    return {name: getattr(net, name) for name in _MLP_FIELDS}


def _net_from_config(path, config) -> MLP:
    if isinstance(config, dict):
        config = {"compute_dtype": None, **config}  # written before mixed precision existed
    if not isinstance(config, dict) or set(config) != set(_MLP_FIELDS):
        raise CheckpointError(f"{path}: the stored model configuration {config!r} does not have the fields "
                              f"{list(_MLP_FIELDS)} of fnn.MLP.")
    try:
        return MLP(**{_MLP_ARGUMENT.get(k, k): tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the stored model configuration is not a valid fnn.MLP: {e}") from None


def _net_differences(stored: MLP, expected: MLP) -> list[str]:
    return [f"{name} {getattr(stored, name)!r}, expected {getattr(expected, name)!r}"
            for name in _MLP_FIELDS if getattr(stored, name) != getattr(expected, name)]


def _opt_differences(stored: dict, expected: dict) -> list[str]:
    if stored["name"] != expected["name"]:
        return [f"optimizer {stored['name']}, expected {expected['name']}"]
    a, b = stored["hyperparams"], expected["hyperparams"]
    return [f"{stored['name']} {k}={_show(a.get(k))}, expected {k}={_show(b.get(k))}"
            for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def _show(value) -> str:
    """A described hyper-parameter as a reader would write it."""
    if isinstance(value, dict):
        return next(iter(value.values()))
    return repr(value)


def _digest(arrays: dict[str, np.ndarray], posterior: dict | None = None) -> str:
    """SHA-256 of every array's name, dtype, shape and bytes, and of the posterior's header entry if any."""
    h = hashlib.sha256()
    if posterior is not None:
        h.update(f"posterior:{json.dumps(posterior, sort_keys=True)};".encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _posterior_shapes(structure: str, net: MLP) -> dict:
    """The arrays of a ``structure`` posterior over ``net`` (``fan_in → fan_out`` per layer, ``P`` parameters):
    ``prior_precision (L,)``, ``log_likelihood ()`` and the curvature, as ``jax.ShapeDtypeStruct`` leaves whose
    dtype is a placeholder (any float dtype is taken)."""
    pairs = list(zip(net.sizes[:-1], net.sizes[1:]))
    if structure == "kron":  # (a, Q_A) over ā = [a; 1], (g, Q_G) over the layer's outputs
        curvature = {"layers": [((i + 1,), (i + 1, i + 1), (o,), (o, o)) for i, o in pairs]}
    elif structure == "diag":
        curvature = {"h": (sum(o * (i + 1) for i, o in pairs),)}
    else:  # full: all P parameters; last_layer: W̄^L's
        m = sum(o * (i + 1) for i, o in (pairs if structure == "full" else pairs[-1:]))
        curvature = {"H": (m, m), "eigvals": (m,), "eigvecs": (m, m)}
    shapes = {"prior_precision": (net.num_layers,), "log_likelihood": (), "curvature": curvature}
    return jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, np.float32), shapes,
                        is_leaf=lambda t: isinstance(t, tuple) and all(isinstance(d, int) for d in t))


def _posterior_parts(post, params, net: MLP | None) -> tuple[MLP, dict, dict]:
    """``post``'s network, arrays and header entry, once it is found to be a posterior of ``net`` at ``params``."""
    if not isinstance(post, laplace.Posterior):
        raise TypeError(f"posterior must be an fnn.laplace.Posterior (what fit_laplace returns); got "
                        f"{type(post).__name__}.")
    if net is not None and post.net != net:
        raise ValueError("posterior is of another network: its " + "; ".join(_net_differences(post.net, net))
                         + ". Save it with the net it was fitted for.")
    ours, theirs = (jax.tree_util.tree_flatten(t) for t in (params, post.params))
    if ours[1] != theirs[1] or not all(np.array_equal(a, b) for a, b in zip(ours[0], theirs[0])):
        raise ValueError("posterior is centred on other params than the params saved; save it with the params it "
                         "was fitted at (posterior.params).")
    if post.structure not in laplace.STRUCTURES or LOSSES.get(getattr(post.loss, "name", None)) != post.loss:
        raise ValueError(f"posterior must have a structure in {laplace.STRUCTURES} and a loss of fnn.losses.LOSSES; "
                         f"got {post.structure!r} and {post.loss!r}.")
    tree = {"prior_precision": post.prior_precision, "log_likelihood": post.log_likelihood,
            "curvature": post.curvature}
    template = _posterior_shapes(post.structure, post.net)
    want, got = ([(name, shape) for name, shape, _ in _specs(t)] for t in (template, tree))
    if want != got:
        raise ValueError(f"posterior's arrays are not those of a {post.structure} posterior of {post.net.sizes}: "
                         f"expected {want}, got {got}.")
    return post.net, tree, {"structure": post.structure, "n": int(post.n), "loss": post.loss.name}


def save(path, *, params, opt_state, key, epoch: int, normalizer=None, meta: dict | None = None,
         state=None, net: MLP | None = None, opt: optim.Optimizer | None = None,
         posterior: laplace.Posterior | None = None) -> Path:
    """Write a checkpoint atomically to ``path`` and return it.

    Args:
      params, opt_state: pytrees of arrays; state: batch-norm statistics (or ``None``).
      key: the PRNG key to continue with; epoch: epochs done; normalizer: ``(mean, std)`` or ``None``.
      meta: free-form JSON-able metadata.
      net: the :class:`fnn.MLP` the params belong to; its configuration is stored (the params and
        state are checked against it first: ``ValueError``).
      opt: the optimizer ``opt_state`` belongs to, one of :data:`fnn.optim.OPTIMIZERS` or of
        :mod:`fnn.second_order` (whose network and loss are stored with it); its name
        and hyper-parameters are stored (``TypeError`` for other transformations; ``ValueError``
        when ``opt_state`` is not shaped like ``opt.init(params)``).
      posterior: a Laplace posterior (:func:`fnn.laplace.fit_laplace`) centred on ``params``, of ``net``
        (``net`` defaults to the posterior's, so the file describes the network it is rebuilt with);
        ``ValueError`` for one fitted at other params, of another network, or not shaped as its
        structure's (see the module docstring).
    """
    header = {"format": FORMAT, "epoch": int(epoch)}
    groups = {"params": params, "opt_state": opt_state, "state": state}
    if posterior is not None:
        net, groups["posterior"], header["posterior"] = _posterior_parts(posterior, params, net)
    if net is not None:
        net.check_params(params)
        net.check_state(state)
        header["net"] = _net_config(net)
    if opt is not None:
        header["optimizer"] = optim.describe(opt)
        want, got = (_specs(t) for t in (jax.eval_shape(opt.init, params), opt_state))
        if want != got:
            raise ValueError(f"opt_state does not match opt.init(params): expected leaves {want}, got {got}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(path.parent, glob.escape(path.name))
    arrays, paths = {}, {}
    for group, tree in groups.items():
        names, values = _leaves(tree)
        paths[group] = names
        for i, v in enumerate(values):
            arrays[f"{group}.{i}"] = v
    arrays["key"] = np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                               else key)
    if normalizer is not None:
        arrays["norm.mean"], arrays["norm.std"] = (np.asarray(a) for a in normalizer)
    header.update(paths=paths, meta=meta or {}, sha256=_digest(arrays, header.get("posterior")))
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
    except Exception as e:  # damage anywhere raises almost anything: BadZipFile, zlib.error, NotImplementedError...
        why = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): {why}") from None
    try:
        header = json.loads(arrays.pop("header").tobytes().decode())
        format_ = header.get("format")
    except Exception:
        raise CheckpointError(f"{path}: no valid fnn checkpoint header.") from None
    if format_ != FORMAT:
        raise CheckpointError(f"{path}: format {format_!r}, expected {FORMAT!r}.")
    if _digest(arrays, header.get("posterior")) != header.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch, the arrays are corrupt.")
    return header, arrays


def _meta(path: Path) -> dict | None:
    """The ``meta`` of a checkpoint's header, read without the arrays; ``None`` if the header is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["header"].tobytes().decode())["meta"]
    except Exception:
        return None
    return meta if isinstance(meta, dict) else None


def _specs(tree) -> list[tuple[str, tuple, str]]:
    """``(path, shape, dtype)`` of every leaf: what a template fixes."""
    names, values = _leaves(tree)
    return [(n, tuple(v.shape), str(v.dtype)) for n, v in zip(names, values)]


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
        if got.shape != tuple(want.shape) or got.dtype != want.dtype:
            raise CheckpointError(
                f"{path}: {group}{name} is {got.dtype}{list(got.shape)}, template expects "
                f"{want.dtype}{list(want.shape)}."
            )
        out.append(jax.numpy.asarray(got))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), out)


def load(path, *, params=None, opt_state=None, state=None, net: MLP | None = None,
         opt: optim.Optimizer | None = None) -> Checkpoint:
    """Read a checkpoint, restoring ``params``, ``opt_state`` (and ``state``) into the templates' structure.

    The templates (e.g. ``net.init(key)``, ``opt.init(params)`` and ``net.init_state()``) fix the
    tree structure, shapes and dtypes the file must match; any difference raises
    :class:`CheckpointError` naming the leaf. A template left out is built from ``net``/``opt``:
    the ones given, else those the checkpoint describes (see :func:`save`), so a self-describing
    checkpoint loads with ``load(path)`` alone.

    Given ``net`` or ``opt``, a checkpoint that describes a different one is refused with
    :class:`CheckpointError` naming every differing field (``checkpoint has sizes (784, 256, 10),
    expected (784, 128, 10)``). A learning-rate schedule is compared by kind only (its arguments
    are not stored), and an optimizer whose schedule is not stored must be passed as ``opt`` to
    rebuild the optimizer state.

    A Laplace posterior saved with the params comes back as ``Checkpoint.posterior``, rebuilt with the
    network and the restored params; its arrays are checked against its structure's shapes for that
    network (:class:`CheckpointError` naming the array), and it is ``None`` for a file without one.
    """
    path = Path(path)
    header, arrays = _read(path)
    net = _checked_net(path, header, net)
    opt = _checked_opt(path, header, opt, needed=opt_state is None)
    dtype = arrays["params.0"].dtype if "params.0" in arrays else np.dtype(np.float32)
    if params is None:
        params = jax.eval_shape(functools.partial(_require(path, net, "model", "params", "net").init, dtype=dtype),
                                jax.random.PRNGKey(0))
    if opt_state is None:
        opt_state = jax.eval_shape(_require(path, opt, "optimizer", "opt_state", "opt").init, params)
    if state is None and net is not None and net.has_state:
        state = jax.eval_shape(functools.partial(net.init_state, dtype))
    if state is None and header["paths"].get("state"):
        raise CheckpointError(f"{path} holds batch-norm statistics: pass state=net.init_state() as a template.")
    normalizer = (arrays["norm.mean"], arrays["norm.std"]) if "norm.mean" in arrays else None
    params = _restore(path, "params", params, header, arrays)
    return Checkpoint(
        params=params,
        opt_state=_restore(path, "opt_state", opt_state, header, arrays),
        key=jax.numpy.asarray(arrays["key"]),
        epoch=int(header["epoch"]),
        normalizer=normalizer,
        meta=header["meta"],
        state=None if state is None else _restore(path, "state", state, header, arrays),
        net=net,
        opt=opt,
        posterior=_posterior(path, header, arrays, net, params),
    )


def _posterior(path, header, arrays, net: MLP | None, params) -> laplace.Posterior | None:
    """The posterior the file holds, rebuilt with ``net`` and ``params``; ``None`` if it holds none."""
    about = header.get("posterior")
    if about is None:
        return None
    if not (isinstance(about, dict) and set(about) == {"structure", "n", "loss"}
            and about["structure"] in laplace.STRUCTURES and about["loss"] in LOSSES
            and isinstance(about["n"], int) and about["n"] > 0):
        raise CheckpointError(f"{path}: the stored posterior description {about!r} is not valid: expected a "
                              f"structure in {laplace.STRUCTURES}, n a positive int and a loss in {sorted(LOSSES)}.")
    if net is None:
        raise CheckpointError(f"{path} holds a Laplace posterior but does not describe its model: pass net=.")
    template = _posterior_shapes(about["structure"], net)
    names, want = _leaves(template)
    stored = header["paths"].get("posterior")
    if stored != names:
        raise CheckpointError(f"{path}: the posterior has leaves {stored} but a {about['structure']} posterior of "
                              f"{net.sizes} has {names}.")
    got = [arrays.get(f"posterior.{i}") for i in range(len(names))]
    for name, w, a in zip(names, want, got):
        if a is None or a.shape != w.shape or not np.issubdtype(a.dtype, np.floating):
            what = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
            raise CheckpointError(f"{path}: posterior{name} is {what}, expected a float array of shape "
                                  f"{list(w.shape)}.")
    tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), [jax.numpy.asarray(a) for a in got])
    return laplace.Posterior(about["structure"], net, LOSSES[about["loss"]], params, about["n"],
                             tree["prior_precision"], tree["log_likelihood"], tree["curvature"])


def _checked_net(path, header, net: MLP | None) -> MLP | None:
    """``net``, or the network the checkpoint describes; refused when the two differ."""
    if net is not None and not isinstance(net, MLP):
        raise TypeError(f"net must be an fnn.MLP; got {type(net).__name__}.")
    stored = _net_from_config(path, header["net"]) if "net" in header else None
    if net is None or stored is None:
        return stored if net is None else net
    _refuse_differences(path, _net_differences(stored, net))
    return net


def _checked_opt(path, header, opt, *, needed: bool):
    """``opt``, or the optimizer the checkpoint describes (``None`` if not rebuildable and not ``needed``).

    An ``opt`` that records nothing (a ``chain``, :func:`fnn.optim.newton`) cannot be compared and
    is trusted; the optimizer-state template built from it still has to match the file.
    """
    stored = header.get("optimizer")
    if stored is None:
        return opt
    if opt is not None:
        if isinstance(opt, optim.Optimizer):
            _refuse_differences(path, _opt_differences(stored, optim.describe(opt)))
        return opt
    try:
        return optim.from_description(stored)
    except (TypeError, ValueError) as e:
        if needed:
            raise CheckpointError(f"{path}: cannot rebuild the optimizer: {e}") from None
        return None


def _refuse_differences(path, differences: list[str]) -> None:
    if differences:
        raise CheckpointError(f"{path}: checkpoint has " + "; ".join(differences) + ".")


def _require(path, thing, what: str, template: str, argument: str):
    if thing is None:
        raise CheckpointError(f"{path} does not describe its {what}: pass {template}= (a template) or {argument}=.")
    return thing


def path_for(directory, epoch: int) -> Path:
    """The file name used for ``epoch`` inside a checkpoint directory."""
    return Path(directory) / f"epoch-{epoch:06d}.npz"


def checkpoints(directory) -> list[Path]:
    """The checkpoint files (``epoch-NNNNNN.npz``) in ``directory``, oldest epoch first; none is opened."""
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name)) if directory.is_dir() else []


def latest(directory, skipped: list[str] | None = None) -> Path | None:
    """The newest checkpoint in ``directory`` that reads back intact (zip CRCs, SHA-256 digest), or ``None``.

    Newer files that do not are passed over (never deleted); their :class:`CheckpointError`
    messages, which name the file and the damage, are appended to ``skipped`` when it is given.
    """
    for path in reversed(checkpoints(directory)):
        try:
            _read(path)
            return path
        except (CheckpointError, FileNotFoundError) as e:
            if skipped is not None:
                skipped.append(str(e))
    return None


def prune(directory, keep: int = 3, *, run: str | None = None) -> None:
    """Rotate one run's checkpoints in ``directory``: delete all but its ``keep`` newest and its best.

    A checkpoint belongs to the run ``meta["run"]`` (``None`` if it was saved without one). The best
    has the lowest finite ``meta["held_out_loss"]``; it is kept so that a run whose loss blows up
    cannot rotate every good checkpoint out. Files of other runs and files whose header cannot be
    read are never deleted; temporaries left by a killed :func:`save` are.
    """
    _remove_temporaries(Path(directory), "epoch-*.npz")
    mine = [(p, meta.get("held_out_loss")) for p in checkpoints(directory)
            if (meta := _meta(p)) is not None and meta.get("run") == run]
    kept = {p for p, _ in mine[max(0, len(mine) - keep):]}
    scored = [(loss, p) for p, loss in mine if isinstance(loss, (int, float)) and math.isfinite(loss)]
    if scored:
        kept.add(min(scored)[1])
    for p, _ in mine:
        if p not in kept:
            p.unlink()


def _remove_temporaries(directory: Path, name: str) -> None:
    """Delete the ``.{name}.*.tmp`` files a :func:`save` killed between writing and renaming leaves behind."""
    for p in directory.glob(f".{name}.*.tmp"):
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def lock(directory):
    """Hold the existing ``directory`` for the ``with`` block, exclusively; :class:`Locked` at once if another holds it.

    The lock is an advisory ``fcntl.flock`` on ``directory/.lock`` (:data:`LOCK`), created on entry and
    removed on exit: it keeps out other holders of this lock (two training runs writing one directory),
    not other writers. The kernel drops it when its process ends, however it ends, so the file a killed
    process leaves behind does not block the next :func:`lock`. POSIX only; flock may be local to one
    machine on network file systems. Yields the lock file's path.
    """
    import fcntl  # POSIX only: imported here so that fnn still imports elsewhere

    path = Path(directory) / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if isinstance(e, BlockingIOError):
                raise Locked(f"{directory} is locked by another process (it holds {path}).") from None
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file between our open and our flock: lock the new one
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # while held: whoever opened it meanwhile finds it gone and tries again
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
