"""``fnn-train`` (also ``python -m fnn``): train an MLP on a dataset from the command line.

On start the manual gradients are checked on the first batch against autodiff and against float64
finite differences (a table, one line per layer and leaf, see :func:`fnn.gradcheck.gradient_report`);
every epoch prints a progress line; at the end the held-out accuracy and throughput are printed.
Checkpoints (one file per epoch, the newest three kept) describe the network and the optimizer and
make a run resumable with ``--resume``, which refuses a checkpoint written with other model or
optimizer flags and names the difference.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fnn import checkpoint, data, optim, privacy, schedules
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fnn-train",
        description="Train a multilayer perceptron with the hand-written backprop (fnn).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="digits", choices=sorted(data.DATASETS),
                   help="digits: scikit-learn's 1,797 8x8 images (offline); mnist-10k: the real MNIST test "
                        "set split 8,000/2,000; mnist: the standard 60,000/10,000 files")
    d.add_argument("--data-dir", default=None, help="directory with the IDX files (else $FNN_DATA_DIR, then cache)")
    d.add_argument("--no-normalize", action="store_true", help="skip the z-score fitted on the training split")
    m = p.add_argument_group("model")
    m.add_argument("--hidden", type=int, nargs="*", default=[256], help="hidden layer widths")
    m.add_argument("--activation", default="relu", choices=sorted(set(ACTIVATIONS) - set(OUTPUT_ONLY)))
    m.add_argument("--output", default="identity", choices=sorted(ACTIVATIONS), help="output activation")
    m.add_argument("--loss", default=None, choices=sorted(LOSSES),
                   help="default: softmax_cross_entropy for classes, mse for regression")
    m.add_argument("--init", default="he_normal", choices=sorted(INITIALIZERS))
    m.add_argument("--batch-norm", action="store_true", help="batch normalization in every hidden layer")
    m.add_argument("--l2", type=float, default=0.0, help="beta of the L2 term ½β Σ‖W‖²")
    m.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    m.add_argument("--compute-dtype", default=None, choices=["bfloat16"],
                   help="mixed precision: every matmul of the forward pass and of the manual backprop on "
                        "bfloat16 operands, summed in --dtype; params, optimizer state and loss stay in --dtype")
    o = p.add_argument_group("optimizer")
    o.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    o.add_argument("--lr", type=float, default=1e-3, help="learning rate (peak value with a schedule)")
    o.add_argument("--schedule", default="constant", choices=list(SCHEDULES))
    o.add_argument("--momentum", type=float, default=None)
    o.add_argument("--b1", type=float, default=None)
    o.add_argument("--b2", type=float, default=None)
    o.add_argument("--eps", type=float, default=None)
    o.add_argument("--decay", type=float, default=None, help="RMSProp's ρ")
    o.add_argument("--weight-decay", type=float, default=None, help="AdamW's decoupled λ")
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--grad-source", default="manual", choices=sorted(GRAD_SOURCES))
    t.add_argument("--last-batch", default="smaller", choices=LAST_BATCH,
                   help="smaller: the N mod B leftover samples form a last, smaller batch; drop: skip them")
    t.add_argument("--checkpoint-dir", default=None, help="write a checkpoint here after every epoch")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    t.add_argument("--plot", default=None, help="write a PNG of the learning curves here")
    t.add_argument("--history", default=None, help="write the per-epoch history as JSON here")
    t.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    t.add_argument("--debug-nans", action="store_true",
                   help="if training stops on a non-finite value, replay that batch eagerly and print per-layer "
                        "statistics of z, a and δ")
    dp = p.add_argument_group("differential privacy (DP-SGD; see README)")
    dp.add_argument("--dp-clip", type=float, default=None,
                    help="train privately: clip every example's gradient to this norm (needs --dp-lot-size and one "
                         "of --dp-noise, --dp-epsilon)")
    dp.add_argument("--dp-lot-size", type=int, default=None, help="expected Poisson lot size L (q = L/N)")
    dp.add_argument("--dp-noise", type=float, default=None, help="noise multiplier σ")
    dp.add_argument("--dp-epsilon", type=float, default=None, help="target ε for the whole run (σ is solved for)")
    dp.add_argument("--dp-delta", type=float, default=1e-5, help="δ of the (ε, δ) guarantee")
    t.add_argument("--data-parallel", action="store_true",
                   help="shard every batch over all devices (the batch size must be divisible by their number)")
    return p


def make_optimizer(args, steps_per_epoch: int):
    """The optimizer named by the flags; hyper-parameters not given keep the optimizer's defaults."""
    total = max(1, steps_per_epoch * args.epochs)
    lr = SCHEDULES[args.schedule](args.lr, total)
    factory = optim.OPTIMIZERS[args.optimizer]
    given = {"momentum": args.momentum, "b1": args.b1, "b2": args.b2, "eps": args.eps, "decay": args.decay,
             "weight_decay": args.weight_decay}
    accepted = inspect.signature(factory).parameters
    unused = [k for k, v in given.items() if v is not None and k not in accepted]
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise SystemExit(f"fnn-train: {args.optimizer} takes no {flags}")
    return factory(learning_rate=lr, **{k: v for k, v in given.items() if v is not None})


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.resume and not args.checkpoint_dir:
        raise SystemExit("fnn-train: --resume needs --checkpoint-dir")
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    ds = data.load_dataset(args.dataset, args.data_dir)
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
    net = MLP((x_train.shape[1], *args.hidden, out_width), args.activation, args.output, init=args.init,
              batch_norm=args.batch_norm, compute_dtype=args.compute_dtype)
    key = jax.random.PRNGKey(args.seed)
    init_key, key = jax.random.split(key)
    params = net.init(init_key, dtype)
    steps = -(-len(x_train) // args.batch_size)
    opt = make_optimizer(args, steps)
    print(f"fnn-train: {ds.name}: {len(x_train)} train / {len(x_test)} held out, network {net.sizes} "
          f"{args.activation}->{args.output}, {loss.name}, {args.optimizer} lr={args.lr}, batch {args.batch_size}, "
          f"gradients: {args.grad_source}, "
          + (f"{args.compute_dtype} matmuls, " if args.compute_dtype else "")
          + f"on {jax.devices()[0].platform}")

    b = min(args.batch_size, len(x_train))
    bn_state = net.init_state(dtype) if net.has_state else None
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

    private, sigma = None, None
    if args.dp_clip is not None:
        if args.dp_lot_size is None:
            raise SystemExit("fnn-train: --dp-clip needs --dp-lot-size (and --dp-noise or --dp-epsilon)")
        private = privacy.Privacy(clip=args.dp_clip, lot_size=args.dp_lot_size, noise_multiplier=args.dp_noise,
                                  target_epsilon=args.dp_epsilon, delta=args.dp_delta)
        try:
            sigma = privacy.plan(private, len(x_train), args.epochs).noise_multiplier
        except (TypeError, ValueError) as e:
            raise SystemExit(f"fnn-train: {e}") from None
        print(f"DP-SGD: clip {args.dp_clip}, lot size {args.dp_lot_size} of {len(x_train)}, σ = {sigma:.4g}, "
              f"δ = {args.dp_delta:g}; the training loss printed below is not private, and tuning on the private "
              f"data is not accounted")
    opt_state, start_epoch = None, 0
    if args.resume:
        path = checkpoint.latest(args.checkpoint_dir)
        if path is None:
            print(f"no checkpoint in {args.checkpoint_dir}; starting from scratch")
        else:
            try:
                ck = checkpoint.load(path, params=params, opt_state=opt.init(params), state=bn_state, net=net,
                                     opt=opt)
            except checkpoint.CheckpointError as e:
                raise SystemExit(f"fnn-train: cannot --resume: {e} Resume with the flags of that run, or start "
                                 f"afresh in another --checkpoint-dir.") from None
            stored = dict(ck.meta.get("privacy") or {})
            resolved = stored.pop("resolved_noise_multiplier", None)
            if stored != ({} if private is None else private._asdict()):
                raise SystemExit(f"fnn-train: cannot --resume: the checkpoint was written with privacy settings "
                                 f"{ck.meta.get('privacy')}, this run has {private}; ε would be accounted wrongly.")
            if private is not None and resolved != sigma:  # keep the σ of the steps already taken
                print(f"resuming with the run's σ = {resolved:.4g} (solved for its first --epochs); ε grows past a "
                      f"target when training goes on longer")
                private, sigma = private._replace(noise_multiplier=resolved, target_epsilon=None), resolved
            params, opt_state, key, start_epoch, bn_state = ck.params, ck.opt_state, ck.key, ck.epoch, ck.state
            print(f"resumed from {path} (epoch {start_epoch})")

    meta = {"argv": sys.argv[1:] if argv is None else list(argv), "sizes": list(net.sizes),
            "privacy": None if private is None else {**private._asdict(), "resolved_noise_multiplier": sigma}}

    def save(state):
        if args.checkpoint_dir:
            checkpoint.save(checkpoint.path_for(args.checkpoint_dir, state.epoch), params=state.params,
                            opt_state=state.opt_state, key=state.key, epoch=state.epoch,
                            normalizer=normalizer, meta=meta, state=state.state, net=net, opt=opt)
            checkpoint.prune(args.checkpoint_dir, keep=3)

    start = time.perf_counter()
    result = fit(net, params, opt, (x_train, y_train), loss=loss, epochs=max(0, args.epochs - start_epoch),
                 batch_size=args.batch_size, key=key, held_out=(x_test, y_test), l2=args.l2,
                 grad_source=args.grad_source, last_batch=args.last_batch, opt_state=opt_state, state=bn_state,
                 start_epoch=start_epoch, on_epoch_end=save, quiet=args.quiet, data_parallel=args.data_parallel,
                 privacy=private)
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
        if args.debug_nans and result.nan_report:
            print(replay_step(net, result.params, opt, result.opt_state, x_train, y_train, loss,
                              result.nan_report["batch"], args.l2, result.state))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
