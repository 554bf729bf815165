"""``fnn-train`` (also ``python -m fnn``): train an MLP on a dataset from the command line.

On start the manual gradients are checked on the first batch against autodiff and against float64
finite differences (a table, one line per layer and leaf, see :func:`fnn.gradcheck.gradient_report`);
every epoch prints a progress line; at the end the held-out accuracy and throughput are printed.

Failing early: flags, data, model, loss/output pair, optimizer, privacy settings, the checkpoint
directory and the ``--plot``/``--history`` paths (by creating the file, then removing it again) are all
checked before the first step; a mistake ends as ``fnn-train: error: ...`` with exit status 2, and
leaves behind no file or directory the run created. The gradient check then stops the run (exit status 1)
when manual and autodiff gradients differ in some leaf by more than :data:`GRAD_TOLERANCE` (relative,
see :func:`fnn.gradcheck.relative_difference`): ``1e-3`` for float32, ``1e-8`` for float64. Correct
gradients differ by about ``1e-7`` (at most ``1e-6`` seen: digits, every activation, loss and batch
norm) in float32 and ``1e-15`` in float64; a gradient 1 % off differs by ``1e-2``. Mixed precision is
checked in full precision, against the ``--dtype`` tolerance. With ``--grad-source autodiff`` the
manual gradients are not used, and a failed check is only a warning.

Checkpoints: one file per epoch in ``--checkpoint-dir``, describing the network and the optimizer,
written by one run at a time (the run locks the directory, :func:`fnn.checkpoint.lock`; a second is refused),
so that ``--resume`` continues the run (it refuses a checkpoint written with other model or optimizer
flags and names the difference). Every run has an identity, a random id in the checkpoints' metadata
that ``--resume`` carries on. A fresh run refuses a directory that holds checkpoints (``--resume`` them,
or pick another directory, or ``--overwrite``: the old files are deleted once the new run has written
its first checkpoint). Rotation deletes only this run's files: it keeps the newest three and the one
with the best held-out loss, so a run whose loss blows up keeps its best checkpoint. ``--resume``
passes over a damaged newest checkpoint to the newest intact one, and says which file it skipped and
why; temporaries of an interrupted write are removed and never read. A checkpoint that cannot be written
(a full disk) stops the run (exit status 1), the older checkpoints intact. A private run's checkpoints
hold the privacy it has spent (``meta["privacy_spent"]``), which ``--resume`` carries on.

When training stops on a non-finite value (exit status 1), the params of the last epoch whose
training cost was finite are written as that epoch's checkpoint (if this run has none for it yet)
and the message says which epoch was kept and where.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from fnn import checkpoint, data, distributed, losses, optim, privacy, schedules
from fnn.activations import ACTIVATIONS, OUTPUT_ONLY
from fnn.diagnose import replay_step
from fnn.gradcheck import format_report, gradient_report
from fnn.initializers import INITIALIZERS
from fnn.losses import CLASSES, LOSSES
from fnn.mlp import MLP
from fnn.step import GRAD_SOURCES
from fnn.train import LAST_BATCH, fit

OPTIMIZERS = list(optim.OPTIMIZERS)
SCHEDULES = {  # name -> (peak rate, total steps) -> learning rate or schedule
    "constant": lambda lr, total: lr,
    "inverse_sqrt": lambda lr, total: schedules.inverse_sqrt(lr),
    "cosine": lambda lr, total: schedules.cosine_decay(lr, total),
    "exponential": lambda lr, total: schedules.exponential_decay(lr, 0.1, total),
    "step": lambda lr, total: schedules.step_decay(lr, 0.5, max(1, total // 4)),
}
GRAD_TOLERANCE = {"float32": 1e-3, "float64": 1e-8}  # largest relative difference manual vs autodiff per leaf
KEEP = 3  # newest checkpoints of a run kept by rotation (besides its best)


def _number(kind, low, *, strict: bool = False, below=None):
    """An argparse ``type``: a finite ``kind`` (int or float) ``≥ low`` (``> low`` if ``strict``), and ``< below``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not (math.isfinite(value) and (value > low if strict else value >= low)
                and (below is None or value < below)):
            bounds = f"{'>' if strict else '≥'} {low}" + ("" if below is None else f" and < {below}")
            raise argparse.ArgumentTypeError(f"must be a finite {kind.__name__} {bounds}; got {text}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fnn-train",
        description="Train a multilayer perceptron with the hand-written backprop (fnn). The run stops (exit "
                    "status 1) if the start-up gradient check finds manual and autodiff gradients more than "
                    f"{GRAD_TOLERANCE['float32']:g} (float32) or {GRAD_TOLERANCE['float64']:g} (float64) apart, "
                    "relative, in some leaf. Mistakes in flags, data or paths end with exit status 2 before "
                    "training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="digits", choices=sorted(data.DATASETS),
                   help="digits: scikit-learn's 1,797 8x8 images (offline); mnist-10k: the real MNIST test "
                        "set split 8,000/2,000; mnist: the standard 60,000/10,000 files")
    d.add_argument("--data-dir", default=None, help="directory with the IDX files (else $FNN_DATA_DIR, then cache)")
    d.add_argument("--no-normalize", action="store_true", help="skip the z-score fitted on the training split")
    m = p.add_argument_group("model")
    m.add_argument("--hidden", type=int, nargs="*", default=[256], help="hidden layer widths")
    m.add_argument("--activation", default="relu", choices=sorted(set(ACTIVATIONS) - set(OUTPUT_ONLY)),
                   help="activation φ of every hidden layer")
    m.add_argument("--output", default="identity", choices=sorted(ACTIVATIONS), help="output activation")
    m.add_argument("--loss", default=None, choices=sorted(LOSSES),
                   help="the cost, which must suit --output; if not given, softmax_cross_entropy for classes, mse "
                        "for regression")
    m.add_argument("--init", default="he_normal", choices=sorted(INITIALIZERS), help="weight initializer")
    m.add_argument("--batch-norm", action="store_true", help="batch normalization in every hidden layer")
    m.add_argument("--l2", type=_number(float, 0), default=0.0, help="beta ≥ 0 of the L2 term ½β Σ‖W‖²")
    m.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="dtype of data, params and optimizer state")
    m.add_argument("--compute-dtype", default=None, choices=["bfloat16"],
                   help="mixed precision: every matmul of the forward pass and of the manual backprop on "
                        "bfloat16 operands, summed in --dtype; params, optimizer state and loss stay in --dtype")
    o = p.add_argument_group("optimizer (hyper-parameters not given keep the optimizer's defaults)")
    o.add_argument("--optimizer", default="adam", choices=OPTIMIZERS, help="update rule (fnn.optim)")
    o.add_argument("--lr", type=_number(float, 0, strict=True), default=1e-3,
                   help="learning rate (peak value with a schedule)")
    o.add_argument("--schedule", default="constant", choices=list(SCHEDULES), help="learning-rate schedule")
    o.add_argument("--momentum", type=float, default=None, help="momentum coefficient (momentum, nesterov, rmsprop)")
    o.add_argument("--b1", type=float, default=None, help="decay rate of Adam's first moment")
    o.add_argument("--b2", type=float, default=None, help="decay rate of Adam's second moment")
    o.add_argument("--eps", type=float, default=None, help="denominator offset of the adaptive optimizers")
    o.add_argument("--decay", type=float, default=None, help="RMSProp's ρ")
    o.add_argument("--weight-decay", type=float, default=None, help="AdamW's decoupled λ")
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=_number(int, 1), default=128, help="samples per step, at most the training set")
    t.add_argument("--epochs", type=_number(int, 0), default=10,
                   help="epochs in all (with --resume, those already done count)")
    t.add_argument("--seed", type=_number(int, 0), default=0, help="seed of the initial params and the shuffles")
    t.add_argument("--grad-source", default="manual", choices=sorted(GRAD_SOURCES),
                   help="manual: the hand-written backprop (a failed gradient check stops the run); autodiff: jax.grad")
    t.add_argument("--last-batch", default="smaller", choices=LAST_BATCH,
                   help="smaller: the N mod B leftover samples form a last, smaller batch; drop: skip them")
    t.add_argument("--checkpoint-dir", default=None,
                   help="write a checkpoint here after every epoch (the run's newest 3 and its best are kept)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --checkpoint-dir from its newest intact checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --checkpoint-dir that holds checkpoints, deleting them once this run has "
                        "written its first one")
    t.add_argument("--plot", default=None, help="write a figure of the learning curves here (PNG, or by suffix)")
    t.add_argument("--history", default=None, help="write the per-epoch history as JSON here")
    t.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    t.add_argument("--debug-nans", action="store_true",
                   help="if training stops on a non-finite value, replay that batch eagerly and print per-layer "
                        "statistics of z, a and δ")
    dp = p.add_argument_group("differential privacy (DP-SGD; see README)")
    dp.add_argument("--dp-clip", type=_number(float, 0, strict=True), default=None,
                    help="train privately: clip every example's gradient to this norm (needs --dp-lot-size and one "
                         "of --dp-noise, --dp-epsilon)")
    dp.add_argument("--dp-lot-size", type=_number(int, 1), default=None, help="expected Poisson lot size L (q = L/N)")
    dp.add_argument("--dp-noise", type=_number(float, 0, strict=True), default=None, help="noise multiplier σ")
    dp.add_argument("--dp-epsilon", type=_number(float, 0, strict=True), default=None,
                    help="target ε for the whole run (σ is solved for)")
    dp.add_argument("--dp-delta", type=_number(float, 0, strict=True, below=1), default=1e-5,
                    help="δ of the (ε, δ) guarantee, below 1/N for N training samples")
    dp.add_argument("--dp-allow-large-delta", action="store_true",
                    help="accept a --dp-delta ≥ 1/N (a guarantee that allows releasing some example outright)")
    t.add_argument("--data-parallel", action="store_true",
                   help="shard every batch over all devices (the batch size must be divisible by their number)")
    return p


def make_optimizer(args, steps_per_epoch: int):
    """The optimizer named by the flags; hyper-parameters not given keep the optimizer's defaults.

    Raises ``ValueError`` for a hyper-parameter the optimizer does not take or refuses.
    """
    total = max(1, steps_per_epoch * args.epochs)
    lr = SCHEDULES[args.schedule](args.lr, total)
    factory = optim.OPTIMIZERS[args.optimizer]
    given = {"momentum": args.momentum, "b1": args.b1, "b2": args.b2, "eps": args.eps, "decay": args.decay,
             "weight_decay": args.weight_decay}
    accepted = inspect.signature(factory).parameters
    unused = [k for k, v in given.items() if v is not None and k not in accepted]
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise ValueError(f"{args.optimizer} takes no {flags}")
    return factory(learning_rate=lr, **{k: v for k, v in given.items() if v is not None})


def _fail(message: str, status: int = 2) -> NoReturn:
    """Stop in argparse's format (``fnn-train: error: ...``) for a problem with a file, not a flag's syntax."""
    print(f"fnn-train: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def _check_flags(p: argparse.ArgumentParser, args) -> None:
    """Refuse flag combinations that cannot work (``p.error``: usage, message, exit status 2)."""
    if args.resume and not args.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    if args.seed >= 2**63:
        p.error(f"--seed must be below 2**63; got {args.seed}")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --checkpoint-dir, --overwrite replaces it: give one of them")
    given = [f for f, v in (("--dp-lot-size", args.dp_lot_size), ("--dp-noise", args.dp_noise),
                            ("--dp-epsilon", args.dp_epsilon),
                            ("--dp-allow-large-delta", args.dp_allow_large_delta or None)) if v is not None]
    if args.dp_clip is None and given:
        p.error(f"{', '.join(given)} only apply to private training: add --dp-clip")
    if args.dp_clip is not None and args.dp_lot_size is None:
        p.error("--dp-clip needs --dp-lot-size (and --dp-noise or --dp-epsilon)")
    if args.dp_clip is not None and (args.grad_source != "manual" or args.batch_norm or args.data_parallel):
        p.error("--dp-clip needs --grad-source manual, and neither --batch-norm nor --data-parallel")


def _missing(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, innermost first: what creating it would create."""
    return [p for p in (path, *path.parents) if not os.path.lexists(p)]


def _remove_new(paths: list[Path]) -> None:
    """Remove what this run created (``paths`` innermost first) where it is still empty: no junk on failure."""
    for p in paths:
        with contextlib.suppress(OSError):
            p.rmdir() if p.is_dir() else p.unlink()


def _check_writable(flag: str, name: str) -> None:
    """Fail unless the file ``name`` can be created or appended to, found by doing so (``os.access`` says yes
    to root, and to a dangling link); what this creates, directories included, is removed again."""
    path = Path(name)
    new = _missing(path)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _fail(f"{flag} {name}: cannot create its directory: {e}")
        try:
            with open(path, "a"):
                pass
        except IsADirectoryError:
            _fail(f"{flag} {name} is a directory; give a file name.")
        except OSError as e:
            _fail(f"{flag} {name} cannot be written: {e.strerror or e}. Give a file in a directory you can write to.")
    finally:
        _remove_new(new)


def _check_inputs(args) -> None:
    """Fail now on a ``--data-dir`` that is not a directory (a relative one starts from the working directory)."""
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        _fail(f"--data-dir {args.data_dir} is not a directory (looked for {Path(args.data_dir).resolve()}). Give "
              f"the directory holding the data files, or leave --data-dir out to search $FNN_DATA_DIR and the cache.")


def _check_outputs(args) -> None:
    """Fail now, not after training, on a ``--plot`` or ``--history`` that cannot be written."""
    for flag, name in (("--plot", args.plot), ("--history", args.history)):
        if name is not None:
            _check_writable(flag, name)
    if args.plot:
        from fnn.plots import pyplot
        try:
            pyplot()
        except ImportError as e:
            _fail(f"--plot: {e}")
        from matplotlib.backend_bases import FigureCanvasBase
        kinds = FigureCanvasBase.get_supported_filetypes()
        suffix = Path(args.plot).suffix.lstrip(".").lower()
        if suffix and suffix not in kinds:
            _fail(f"--plot {args.plot}: matplotlib writes no .{suffix} files; use one of {', '.join(sorted(kinds))}.")


@contextlib.contextmanager
def _held_checkpoint_dir(args):
    """Hold ``--checkpoint-dir`` for the run: create it, lock it against other runs (:func:`fnn.checkpoint.lock`)
    and refuse another run's checkpoints in it (unless ``--resume`` or ``--overwrite``). On the way out, however
    the run ends, what it created is removed again if it holds no checkpoint."""
    if not args.checkpoint_dir:
        yield
        return
    directory = Path(args.checkpoint_dir)
    new = _missing(directory)
    with contextlib.ExitStack() as stack:
        stack.callback(_remove_new, new)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _fail(f"--checkpoint-dir {directory} cannot be created: {e}")
        try:
            stack.enter_context(checkpoint.lock(directory))
        except checkpoint.Locked:
            _fail(f"--checkpoint-dir {directory} is in use: another run holds its lock ({directory / checkpoint.LOCK})."
                  f" Wait for that run to end, or give this one another --checkpoint-dir.")
        except OSError as e:
            _fail(f"--checkpoint-dir {directory} is not writable: cannot create its lock file: {e}")
        existing = checkpoint.checkpoints(directory)
        if existing and not (args.resume or args.overwrite):
            _fail(f"--checkpoint-dir {directory} holds {len(existing)} checkpoint(s) (newest "
                  f"{existing[-1].name}) of another run. Use --resume to continue that run, another "
                  f"--checkpoint-dir, or --overwrite to replace them.")
        yield


def _cannot_save(path: Path, error: OSError, resumable: bool) -> NoReturn:
    """Stop (exit status 1) on a checkpoint that could not be written (a full disk), saying what is left."""
    older = checkpoint.checkpoints(path.parent)
    kept = (f"The {len(older)} older checkpoint(s) there are intact (newest {older[-1].name})" if older
            else "No checkpoint is there")
    _fail(f"cannot write the checkpoint {path} in --checkpoint-dir {path.parent}: {error}. {kept}; this run's "
          f"training since its last checkpoint is lost. Free space there (or give another --checkpoint-dir) and run "
          "again" + (" with --resume (without --overwrite) to continue." if resumable else "."), status=1)


def _check_gradients(args, report) -> None:
    """Stop (exit status 1) when manual and autodiff gradients differ beyond the dtype's tolerance."""
    tolerance = GRAD_TOLERANCE[args.dtype]
    worst = max(report, key=lambda r: math.inf if math.isnan(r.manual_vs_autodiff) else r.manual_vs_autodiff)
    if worst.manual_vs_autodiff <= tolerance:
        return
    problem = (f"gradient check failed: the manual and autodiff gradients of layer {worst.layer} {worst.leaf} "
               f"differ by {worst.manual_vs_autodiff:.1e} (relative), above the {args.dtype} tolerance {tolerance:g}")
    if args.grad_source != "manual":
        print(f"fnn-train: warning: {problem}; training goes on with {args.grad_source} gradients.", file=sys.stderr)
        return
    _fail(f"{problem}. The hand-written backprop is wrong for this configuration; --grad-source autodiff "
          f"trains with jax.grad instead.", status=1)


def _accounted(settings) -> dict | None:
    """The privacy settings that ``ε`` depends on, from a :class:`fnn.privacy.Privacy` or a checkpoint's
    ``meta["privacy"]``: without ``chunk`` (memory), ``spent`` (the run's progress) and ``allow_large_delta``."""
    if settings is None:
        return None
    settings = settings if isinstance(settings, dict) else settings._asdict()
    return {k: settings.get(k) for k in ("clip", "lot_size", "noise_multiplier", "target_epsilon", "delta")}


def _spent(meta: dict, private: privacy.Privacy, sigma: float, n: int, epoch: int) -> privacy.Spent:
    """The privacy spent by the run a checkpoint belongs to: ``meta["privacy_spent"]``, or for a checkpoint written
    before that was stored, ``epoch`` epochs of ``round(N/L)`` steps at ``q = L/N`` and the run's ``σ``."""
    spent = meta.get("privacy_spent")
    if spent is not None:
        return privacy.Spent(spent["steps"], tuple(spent["rdp"]))
    q = private.lot_size / n
    return privacy.account(q, sigma, epoch * max(1, round(n / private.lot_size)))


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    _check_flags(p, args)
    _check_inputs(args)
    _check_outputs(args)
    with _held_checkpoint_dir(args):
        return _train(p, args, argv)


def _train(p: argparse.ArgumentParser, args, argv) -> int:
    """The run, from the data on, once the flags and paths are checked and the checkpoint directory is held."""
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    try:
        ds = data.load_dataset(args.dataset, args.data_dir)
    except (ImportError, OSError, ValueError) as e:
        _fail(f"cannot load --dataset {args.dataset}: {e}")
    x_train, x_test = np.asarray(ds.x_train, dtype), np.asarray(ds.x_test, dtype)
    normalizer = None
    if not args.no_normalize:
        normalizer = data.fit_zscore(x_train)  # statistics of the training split only
        x_train, x_test = (np.asarray(data.zscore(normalizer, a), dtype) for a in (x_train, x_test))
    classes = ds.num_classes is not None
    loss = LOSSES[args.loss or ("softmax_cross_entropy" if classes else "mse")]
    y_train, y_test = ds.y_train, ds.y_test
    if classes and loss.targets != CLASSES:  # class labels as one-hot rows for binary/regression losses
        y_train, y_test = (np.eye(ds.num_classes, dtype=dtype)[y] for y in (y_train, y_test))
    out_width = ds.num_classes if classes else np.shape(ds.y_train)[1]
    n = len(x_train)
    try:
        net = MLP((x_train.shape[1], *args.hidden, out_width), args.activation, args.output, init=args.init,
                  batch_norm=args.batch_norm, compute_dtype=args.compute_dtype)
    except (TypeError, ValueError) as e:
        p.error(f"invalid model: {e}")
    try:
        losses.check_output(loss, net.output)
    except (TypeError, ValueError) as e:
        p.error(f"--loss {loss.name} with --output {net.output}: {e}")
    for flag, size in (("--batch-size", args.batch_size), ("--dp-lot-size", args.dp_lot_size)):
        if size is not None and size > n:
            p.error(f"{flag} {size} is larger than the {n} training samples of {ds.name}")
    if args.dp_clip is not None and args.dp_delta >= 1 / n and not args.dp_allow_large_delta:
        p.error(f"--dp-delta {args.dp_delta:g} is not below 1/N = 1/{n} = {1 / n:.3g} for the {n} training samples of "
                f"{ds.name}: a δ that large allows releasing some example outright. Give a --dp-delta below "
                f"{1 / n:.3g} (1/N² or less is usual), or add --dp-allow-large-delta to accept it.")
    rest = n % args.batch_size if args.last_batch == "smaller" else 0
    if net.has_state and rest == 1:
        p.error(f"with --batch-norm, the last batch of {n} samples in batches of {args.batch_size} would hold 1 "
                f"sample, which has no batch variance; use --last-batch drop or another --batch-size")
    mesh = distributed.data_mesh() if args.data_parallel else None
    if mesh is not None:
        try:
            distributed.check_divisible(mesh, args.batch_size, rest)
        except ValueError as e:
            p.error(f"--data-parallel: {e}")
    key = jax.random.PRNGKey(args.seed)
    init_key, key = jax.random.split(key)
    params = net.init(init_key, dtype)
    try:
        opt = make_optimizer(args, -(-n // args.batch_size))
    except (TypeError, ValueError) as e:
        p.error(str(e))

    print(f"fnn-train: {ds.name}: {n} train / {len(x_test)} held out, network {net.sizes} "
          f"{args.activation}->{args.output}, {loss.name}, {args.optimizer} lr={args.lr}, batch {args.batch_size}, "
          f"gradients: {args.grad_source}, "
          + (f"{args.compute_dtype} matmuls, " if args.compute_dtype else "")
          + f"on {jax.devices()[0].platform}")
    private, sigma = None, None
    if args.dp_clip is not None:
        try:
            private = privacy.Privacy(clip=args.dp_clip, lot_size=args.dp_lot_size, noise_multiplier=args.dp_noise,
                                      target_epsilon=args.dp_epsilon, delta=args.dp_delta,
                                      allow_large_delta=args.dp_allow_large_delta)
            sigma = privacy.plan(private, n, args.epochs).noise_multiplier
        except (TypeError, ValueError) as e:
            p.error(str(e))
        print(f"DP-SGD: clip {args.dp_clip}, lot size {args.dp_lot_size} of {n}, σ = {sigma:.4g}, "
              f"δ = {args.dp_delta:g}; the training loss printed below is not private, and tuning on the private "
              f"data is not accounted")

    bn_state = net.init_state(dtype) if net.has_state else None
    opt_state, start_epoch, run, resumed = None, 0, uuid.uuid4().hex[:12], None
    if args.resume:
        skipped = []
        resumed = checkpoint.latest(args.checkpoint_dir, skipped)
        for why in skipped:
            print(f"fnn-train: --resume skips a damaged checkpoint: {why}", file=sys.stderr)
        if resumed is None and skipped:
            _fail(f"cannot --resume: no intact checkpoint in {args.checkpoint_dir}. Restore one, or start afresh "
                  f"with --overwrite (without --resume) or in another --checkpoint-dir.")
        if resumed is None:
            print(f"no checkpoint in {args.checkpoint_dir}; starting from scratch")
        else:
            try:
                ck = checkpoint.load(resumed, params=params, opt_state=opt.init(params), state=bn_state, net=net,
                                     opt=opt)
            except checkpoint.CheckpointError as e:
                _fail(f"cannot --resume: {e} Resume with the flags of that run, or start afresh in another "
                      f"--checkpoint-dir.")
            stored = ck.meta.get("privacy")
            if _accounted(stored) != _accounted(private):
                _fail(f"cannot --resume: the checkpoint was written with privacy settings {stored}, "
                      f"this run has {private}; ε would be accounted wrongly.")
            if private is not None:
                resolved = stored.get("resolved_noise_multiplier", sigma)
                # chunk is memory only: the run's own is kept, whatever the default now
                private = private._replace(chunk=stored.get("chunk", private.chunk),
                                           spent=_spent(ck.meta, private, resolved, n, ck.epoch))
                if resolved != sigma:  # keep the σ of the steps already taken
                    print(f"resuming with the run's σ = {resolved:.4g} (solved for its first --epochs); ε grows past "
                          f"a target when training goes on longer")
                    sigma = resolved
            params, opt_state, key, start_epoch, bn_state = ck.params, ck.opt_state, ck.key, ck.epoch, ck.state
            run = ck.meta.get("run")  # None for a checkpoint written before runs had an identity
            print(f"resumed from {resumed} (epoch {start_epoch})"
                  + (", the newest intact checkpoint" if skipped else ""))

    b = min(args.batch_size, n)
    # gradient_report checks a mixed-precision network in full precision (see its docstring).
    report = gradient_report(net, params, jnp.asarray(x_train[:b]), jnp.asarray(y_train[:b]), loss, args.l2,
                             bn_state)
    print(f"gradient check on the first batch{' (matmuls in ' + args.dtype + ')' if args.compute_dtype else ''}, "
          "relative differences per leaf:\n"
          + textwrap.indent(format_report(report), "  "))
    rel = [max(r.manual_vs_autodiff for r in report if r.layer == l) for l in range(1, net.num_layers + 1)]
    print("gradient check on the first batch, max relative difference manual vs autodiff per layer: "
          + " ".join(f"{r:.1e}" for r in rel) + f" (max {max(rel):.1e}); manual vs finite differences: "
          + f"max {max(r.manual_vs_fd for r in report):.1e}")
    _check_gradients(args, report)

    meta = {"argv": sys.argv[1:] if argv is None else list(argv), "sizes": list(net.sizes), "run": run,
            "privacy": None if private is None else {**{k: v for k, v in private._asdict().items() if k != "spent"},
                                                     "resolved_noise_multiplier": sigma}}
    if private is not None:  # train with the σ resolved above (and stored), not solve for it again
        private = private._replace(noise_multiplier=sigma, target_epsilon=None)
    written = set() if resumed is None else {resumed}  # this run's checkpoints
    replaced = checkpoint.checkpoints(args.checkpoint_dir) if args.overwrite else []  # once this run has one

    def save(state) -> None:
        path = checkpoint.path_for(args.checkpoint_dir, state.epoch)
        held_out_loss = next((r.get("held_out_loss") for r in state.history if r["epoch"] == state.epoch), None)
        spent = None if state.privacy_spent is None else state.privacy_spent._asdict()
        about = {"held_out_loss": held_out_loss, "privacy_spent": spent}
        try:
            checkpoint.save(path, params=state.params, opt_state=state.opt_state, key=state.key, epoch=state.epoch,
                            normalizer=normalizer, meta={**meta, **about}, state=state.state, net=net, opt=opt)
        except OSError as e:
            _cannot_save(path, e, resumable=bool(written))
        written.add(path)
        for old in replaced:
            if old not in written:
                old.unlink(missing_ok=True)
        replaced.clear()
        checkpoint.prune(args.checkpoint_dir, keep=KEEP, run=run)

    start = time.perf_counter()
    result = fit(net, params, opt, (x_train, y_train), loss=loss, epochs=max(0, args.epochs - start_epoch),
                 batch_size=args.batch_size, key=key, held_out=(x_test, y_test), l2=args.l2,
                 grad_source=args.grad_source, last_batch=args.last_batch, opt_state=opt_state, state=bn_state,
                 start_epoch=start_epoch, on_epoch_end=save if args.checkpoint_dir else None, quiet=args.quiet,
                 mesh=mesh, privacy=private)
    wall = time.perf_counter() - start
    if result.history:
        last = result.history[-1]
        rate = np.median([r["samples_per_s"] for r in result.history])
        acc = last.get("held_out_accuracy")
        print(f"done: {result.epoch} epochs, held-out loss {last['held_out_loss']:.4f}"
              + (f", held-out accuracy {100 * acc:.2f}%" if acc is not None else "")
              + f", median {rate:,.0f} samples/s, {wall:.1f}s in total")
    try:
        if args.history:
            Path(args.history).parent.mkdir(parents=True, exist_ok=True)
            Path(args.history).write_text(json.dumps(result.history, indent=1))
        if args.plot and result.history:
            from fnn.plots import plot_history
            print(f"learning curves: {plot_history(result.history, args.plot, title=f'{ds.name} {net.sizes}')}")
    except OSError as e:
        _fail(f"cannot write {e.filename} after training: {e.strerror or e}."
              + (f" The trained params are in --checkpoint-dir {args.checkpoint_dir}." if args.checkpoint_dir else ""),
              status=1)
    if result.stopped:
        print(f"stopped: {result.stopped}", file=sys.stderr)
        epoch = ((result.nan_report or {}).get("kept") or {}).get("epoch", result.epoch)
        where = "not saved (no --checkpoint-dir)"
        if args.checkpoint_dir:
            path = checkpoint.path_for(args.checkpoint_dir, result.epoch)
            if private is not None or not (path in written and path.exists()):
                save(result)  # a private run's anyway: its privacy_spent counts the failed epoch's steps too
            where = f"in {path}"
        print(f"kept the params of epoch {epoch}, {where}", file=sys.stderr)
        if args.debug_nans and result.nan_report:
            before = getattr(result, "before_failure", None) or (result.params, result.opt_state, result.state)
            print(replay_step(net, before[0], opt, before[1], x_train, y_train, loss, result.nan_report["batch"],
                              args.l2, before[2]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
