"""``fnn-train`` (also ``python -m fnn``): train an MLP on a dataset from the command line.

On start the manual gradients are checked on the first batch against autodiff and against float64
finite differences (a table, one line per layer and leaf, see :func:`fnn.gradcheck.gradient_report`);
every epoch prints a progress line; at the end the held-out accuracy and throughput are printed.

Failing early: flags, data, model, loss/output pair, optimizer, privacy settings, the checkpoint
directory and the ``--plot``/``--history`` paths are all checked before the first step; a mistake ends
as ``fnn-train: error: ...`` with exit status 2. The gradient check then stops the run (exit status 1)
when manual and autodiff gradients differ in some leaf by more than :data:`GRAD_TOLERANCE` (relative,
see :func:`fnn.gradcheck.relative_difference`): ``1e-3`` for float32, ``1e-8`` for float64. Correct
gradients differ by about ``1e-7`` (at most ``1e-6`` seen: digits, every activation, loss and batch
norm) in float32 and ``1e-15`` in float64; a gradient 1 % off differs by ``1e-2``. Mixed precision is
checked in full precision, against the ``--dtype`` tolerance. With ``--grad-source autodiff`` the
manual gradients are not used, and a failed check is only a warning.

Checkpoints: one file per epoch in ``--checkpoint-dir``, describing the network and the optimizer,
so that ``--resume`` continues the run (it refuses a checkpoint written with other model or optimizer
flags and names the difference). Every run has an identity, a random id in the checkpoints' metadata
that ``--resume`` carries on. A fresh run refuses a directory that holds checkpoints (``--resume`` them,
or pick another directory, or ``--overwrite``: the old files are deleted once the new run has written
its first checkpoint). Rotation deletes only this run's files: it keeps the newest three and the one
with the best held-out loss, so a run whose loss blows up keeps its best checkpoint. ``--resume``
passes over a damaged newest checkpoint to the newest intact one, and says which file it skipped and
why; temporaries of an interrupted write are removed and never read.

When training stops on a non-finite value (exit status 1), the params of the last epoch whose
training cost was finite are written as that epoch's checkpoint (if this run has none for it yet)
and the message says which epoch was kept and where.
"""

from __future__ import annotations

import argparse
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


def _number(kind, low, *, strict: bool = False):
    """An argparse ``type``: a finite ``kind`` (int or float) ``≥ low`` (``> low`` if ``strict``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise argparse.ArgumentTypeError(f"must be a finite {kind.__name__} {'>' if strict else '≥'} {low}; "
                                             f"got {text}")
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
    dp.add_argument("--dp-noise", type=float, default=None, help="noise multiplier σ")
    dp.add_argument("--dp-epsilon", type=float, default=None, help="target ε for the whole run (σ is solved for)")
    dp.add_argument("--dp-delta", type=float, default=1e-5, help="δ of the (ε, δ) guarantee")
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
                            ("--dp-epsilon", args.dp_epsilon)) if v is not None]
    if args.dp_clip is None and given:
        p.error(f"{', '.join(given)} only apply to private training: add --dp-clip")
    if args.dp_clip is not None and args.dp_lot_size is None:
        p.error("--dp-clip needs --dp-lot-size (and --dp-noise or --dp-epsilon)")
    if args.dp_clip is not None and (args.grad_source != "manual" or args.batch_norm or args.data_parallel):
        p.error("--dp-clip needs --grad-source manual, and neither --batch-norm nor --data-parallel")


def _check_outputs(args) -> None:
    """Fail now, not after training, on an output path that cannot be written; create missing directories."""
    for flag, name in (("--plot", args.plot), ("--history", args.history)):
        if name is None:
            continue
        path = Path(name)
        if path.is_dir():
            _fail(f"{flag} {name} is a directory; give a file name.")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _fail(f"{flag} {name}: cannot create its directory: {e}")
        if not os.access(path.parent, os.W_OK) or path.exists() and not os.access(path, os.W_OK):
            _fail(f"{flag} {name} is not writable.")
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
    if args.checkpoint_dir:
        existing = checkpoint.checkpoints(args.checkpoint_dir)
        if existing and not (args.resume or args.overwrite):
            _fail(f"--checkpoint-dir {args.checkpoint_dir} holds {len(existing)} checkpoint(s) (newest "
                  f"{existing[-1].name}) of another run. Use --resume to continue that run, another "
                  f"--checkpoint-dir, or --overwrite to replace them.")
        try:
            Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _fail(f"--checkpoint-dir {args.checkpoint_dir} cannot be created: {e}")
        if not os.access(args.checkpoint_dir, os.W_OK):
            _fail(f"--checkpoint-dir {args.checkpoint_dir} is not writable.")


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


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    _check_flags(p, args)
    _check_outputs(args)
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
    check_output = getattr(losses, "check_output", None)
    if check_output is not None:
        try:
            check_output(loss, net.output)
        except (TypeError, ValueError) as e:
            p.error(f"--loss {loss.name} with --output {net.output}: {e}")
    if args.batch_size > n:
        p.error(f"--batch-size {args.batch_size} is larger than the {n} training samples of {ds.name}")
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
                                      target_epsilon=args.dp_epsilon, delta=args.dp_delta)
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
            stored = dict(ck.meta.get("privacy") or {})
            resolved = stored.pop("resolved_noise_multiplier", None)
            chunk = stored.pop("chunk", None)  # memory only: the run's own is kept, whatever the default now
            if private is not None and chunk is not None:
                private = private._replace(chunk=chunk)
            if stored != ({} if private is None else {k: v for k, v in private._asdict().items() if k != "chunk"}):
                _fail(f"cannot --resume: the checkpoint was written with privacy settings {ck.meta.get('privacy')}, "
                      f"this run has {private}; ε would be accounted wrongly.")
            if private is not None and resolved != sigma:  # keep the σ of the steps already taken
                print(f"resuming with the run's σ = {resolved:.4g} (solved for its first --epochs); ε grows past a "
                      f"target when training goes on longer")
                private, sigma = private._replace(noise_multiplier=resolved, target_epsilon=None), resolved
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
            "privacy": None if private is None else {**private._asdict(), "resolved_noise_multiplier": sigma}}
    written = set() if resumed is None else {resumed}  # this run's checkpoints
    replaced = checkpoint.checkpoints(args.checkpoint_dir) if args.overwrite else []  # once this run has one

    def save(state) -> None:
        path = checkpoint.path_for(args.checkpoint_dir, state.epoch)
        held_out_loss = next((r.get("held_out_loss") for r in state.history if r["epoch"] == state.epoch), None)
        checkpoint.save(path, params=state.params, opt_state=state.opt_state, key=state.key, epoch=state.epoch,
                        normalizer=normalizer, meta={**meta, "held_out_loss": held_out_loss}, state=state.state,
                        net=net, opt=opt)
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
    if args.history:
        Path(args.history).write_text(json.dumps(result.history, indent=1))
    if args.plot and result.history:
        from fnn.plots import plot_history
        print(f"learning curves: {plot_history(result.history, args.plot, title=f'{ds.name} {net.sizes}')}")
    if result.stopped:
        print(f"stopped: {result.stopped}", file=sys.stderr)
        epoch = ((result.nan_report or {}).get("kept") or {}).get("epoch", result.epoch)
        where = "not saved (no --checkpoint-dir)"
        if args.checkpoint_dir:
            path = checkpoint.path_for(args.checkpoint_dir, result.epoch)
            if not (path in written and path.exists()):
                save(result)
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
