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

The Laplace approximation (``--laplace full|kron|diag|last_layer``, :mod:`fnn.laplace`): after training, a Gaussian
posterior over the weights at the trained params ``θ*``, fitted on the training split as training read it (normalized),
with the precision ``Λ = N·G + δ I`` in that structure (``G`` the mean Gauss-Newton matrix). The prior precision starts
at ``δ = N·β`` from ``--l2`` when ``β > 0``, else at ``δ = 1``, and is then set by the evidence: MacKay's fixed point,
one ``δ`` for every layer (:func:`fnn.laplace.optimize_prior_precision`). The run prints ``N``, ``P``, the log evidence
at the start and at ``δ*``, the evidence-optimal ``β* = δ*/N`` (a prior on the biases too, which ``--l2`` leaves free)
and the fit's time; then, on the held-out split (in chunks of :data:`HELD_OUT_CHUNK` rows), a calibration table of the
network at ``θ*`` (MAP) and of the probit GLM predictive (Laplace): NLL, ECE over :data:`CALIBRATION_BINS` bins,
accuracy and mean confidence (:func:`fnn.metrics.calibration`), for the canonical classification pairs; for ``mse``
and ``half_mse``, the Gaussian predictive NLL of MAP (the likelihood's noise ``σ² I``) and Laplace (``σ² I + J Σ Jᵀ``);
for a non-canonical pair the evidence only. With ``--checkpoint-dir`` the posterior at ``δ*`` goes into the run's last
checkpoint (:func:`fnn.checkpoint.save`); ``--resume`` reads such a checkpoint, and trains on without the posterior.
Refused before training: with ``--batch-norm``, ``--loss mae`` (no curvature), ``--dp-clip`` (the posterior reads
every training example's curvature outside the privacy accounting), and ``full``/``last_layer`` where the ``P × P``
matrix they form has ``P`` above :data:`LAPLACE_LIMIT`. After ``--data-parallel`` the fit runs on the replicated
params, unsharded.

Optimizers: every one of :data:`fnn.optim.OPTIMIZERS`, the second-order ``kfac`` and ``hessian_free``
included (built for the run's network, loss, ``--l2`` and ``--seed``). Each hyper-parameter of theirs with
a number or bool default is a flag (``--damping``, ``--cg-iters``, ...); one the chosen optimizer does not
take is refused, naming those it takes. ``--lr`` not given is the optimizer's own default where it has one.

As a library: a :class:`RunConfig` is a run, one field per flag (``RunConfig()`` is the run without flags);
:func:`config_from_args` builds it from the parsed flags, :func:`check` validates it, and :func:`run` runs
it and returns the exit status.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from fnn import checkpoint, data, distributed, laplace, losses, metrics, optim, privacy, schedules
from fnn.activations import ACTIVATIONS, OUTPUT_ONLY
from fnn.diagnose import replay_step
from fnn.gradcheck import format_report, gradient_report
from fnn.initializers import INITIALIZERS
from fnn.losses import CLASSES, LOSSES, Loss
from fnn.mlp import MLP
from fnn.step import GRAD_SOURCES
from fnn.train import LAST_BATCH, FitResult, fit

SCHEDULES = {  # name -> (peak rate, total steps) -> learning rate or schedule
    "constant": lambda lr, total: lr,
    "inverse_sqrt": lambda lr, total: schedules.inverse_sqrt(lr),
    "cosine": lambda lr, total: schedules.cosine_decay(lr, total),
    "exponential": lambda lr, total: schedules.exponential_decay(lr, 0.1, total),
    "step": lambda lr, total: schedules.step_decay(lr, 0.5, max(1, total // 4)),
}
GRAD_TOLERANCE = {"float32": 1e-3, "float64": 1e-8}  # largest relative difference manual vs autodiff per leaf
KEEP = 3  # newest checkpoints of a run kept by rotation (besides its best)
DEFAULT_LR = 1e-3  # --lr of an optimizer without a default learning rate of its own
FROM_THE_RUN = ("learning_rate", "net", "loss", "l2", "seed")  # factory arguments the run gives, not a flag
LAPLACE_LIMIT = 5_000  # most parameters P of the P × P matrix --laplace full (or last_layer) forms
CALIBRATION_BINS = 15  # equal-width confidence bins of the held-out ECE after --laplace
HELD_OUT_CHUNK = 512  # held-out rows per predictive pass after --laplace (J Σ Jᵀ is (rows, K, K); full forms J)


class RunConfig(NamedTuple):
    """A run of ``fnn-train``: one field per flag, named as its flag (``--batch-size`` is ``batch_size``),
    with its default, so ``RunConfig()`` is the run without flags. ``hidden`` is a tuple of widths;
    ``hyperparams`` holds the optimizer's hyper-parameters given (``--damping 0.01`` is
    ``(("damping", 0.01),)``; :func:`check` also takes a mapping, and returns a sorted tuple); ``lr=None``
    is the optimizer's own default learning rate, or :data:`DEFAULT_LR`. Immutable and hashable."""

    dataset: str = "digits"
    data_dir: str | None = None
    no_normalize: bool = False
    hidden: tuple[int, ...] = (256,)
    activation: str = "relu"
    output: str = "identity"
    loss: str | None = None
    init: str = "he_normal"
    batch_norm: bool = False
    l2: float = 0.0
    dtype: str = "float32"
    compute_dtype: str | None = None
    optimizer: str = "adam"
    lr: float | None = None
    schedule: str = "constant"
    hyperparams: tuple[tuple[str, float | int | bool], ...] = ()
    batch_size: int = 128
    epochs: int = 10
    seed: int = 0
    grad_source: str = "manual"
    last_batch: str = "smaller"
    checkpoint_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    plot: str | None = None
    history: str | None = None
    quiet: bool = False
    debug_nans: bool = False
    dp_clip: float | None = None
    dp_lot_size: int | None = None
    dp_noise: float | None = None
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_allow_large_delta: bool = False
    data_parallel: bool = False
    laplace: str | None = None


class ConfigError(ValueError):
    """Settings that cannot work together; :func:`main` reports it as a mistake in the flags (argparse's
    usage line, ``fnn-train: error: <message>``, exit status 2)."""


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


_BOUNDS = {  # field -> its parser and check: the numbers that have a range
    "l2": _number(float, 0), "lr": _number(float, 0, strict=True), "batch_size": _number(int, 1),
    "epochs": _number(int, 0), "seed": _number(int, 0), "dp_clip": _number(float, 0, strict=True),
    "dp_lot_size": _number(int, 1), "dp_noise": _number(float, 0, strict=True),
    "dp_epsilon": _number(float, 0, strict=True), "dp_delta": _number(float, 0, strict=True, below=1),
}


def _choices() -> dict[str, list[str]]:
    """Field -> the names it may take; the optimizers as :data:`fnn.optim.OPTIMIZERS` holds them now."""
    return {"dataset": sorted(data.DATASETS), "activation": sorted(set(ACTIVATIONS) - set(OUTPUT_ONLY)),
            "output": sorted(ACTIVATIONS), "loss": sorted(LOSSES), "init": sorted(INITIALIZERS),
            "dtype": ["float32", "float64"], "compute_dtype": ["bfloat16"], "optimizer": list(optim.OPTIMIZERS),
            "schedule": list(SCHEDULES), "grad_source": sorted(GRAD_SOURCES), "last_batch": list(LAST_BATCH),
            "laplace": list(laplace.STRUCTURES)}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _settable(factory: Callable) -> list[inspect.Parameter]:
    """The parameters of an optimizer factory that flags set: those with a number or bool default that the
    run does not give (:data:`FROM_THE_RUN`)."""
    return [p for p in inspect.signature(factory).parameters.values()
            if p.name not in FROM_THE_RUN and isinstance(p.default, (bool, int, float))]


def _hyperparameters() -> dict[str, dict[str, float | int | bool]]:
    """Every hyper-parameter a flag sets, over :data:`fnn.optim.OPTIMIZERS`: name -> {optimizer: default}."""
    table: dict[str, dict[str, float | int | bool]] = {}
    for name, factory in optim.OPTIMIZERS.items():
        for p in _settable(factory):
            table.setdefault(p.name, {})[name] = p.default
    return table


def _takes_rate(optimizer: str) -> bool:
    """Whether ``optimizer``'s factory takes a learning rate (K-FAC with adaptive damping does not)."""
    return "learning_rate" in inspect.signature(optim.OPTIMIZERS[optimizer]).parameters


def _own_rate(optimizer: str) -> float | None:
    """The default learning rate of ``optimizer``'s factory, if it has one."""
    p = inspect.signature(optim.OPTIMIZERS[optimizer]).parameters.get("learning_rate")
    return p.default if p is not None and isinstance(p.default, (int, float)) else None


def _learning_rate(config: RunConfig) -> float:
    """``--lr``, or the optimizer's own default learning rate, or :data:`DEFAULT_LR` for one without."""
    own = _own_rate(config.optimizer)
    return config.lr if config.lr is not None else DEFAULT_LR if own is None else own


def parser() -> argparse.ArgumentParser:
    """The flags of ``fnn-train``; their defaults are :class:`RunConfig`'s, their choices :func:`choices`."""
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
    defaults, names = RunConfig(), _choices()
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=defaults.dataset, choices=names["dataset"],
                   help="digits: scikit-learn's 1,797 8x8 images (offline); mnist-10k: the real MNIST test "
                        "set split 8,000/2,000; mnist: the standard 60,000/10,000 files")
    d.add_argument("--data-dir", default=defaults.data_dir,
                   help="directory with the IDX files (else $FNN_DATA_DIR, then cache)")
    d.add_argument("--no-normalize", action="store_true", help="skip the z-score fitted on the training split")
    m = p.add_argument_group("model")
    m.add_argument("--hidden", type=int, nargs="*", default=list(defaults.hidden), help="hidden layer widths")
    m.add_argument("--activation", default=defaults.activation, choices=names["activation"],
                   help="activation φ of every hidden layer")
    m.add_argument("--output", default=defaults.output, choices=names["output"], help="output activation")
    m.add_argument("--loss", default=defaults.loss, choices=names["loss"],
                   help="the cost, which must suit --output; if not given, softmax_cross_entropy for classes, mse "
                        "for regression")
    m.add_argument("--init", default=defaults.init, choices=names["init"], help="weight initializer")
    m.add_argument("--batch-norm", action="store_true", help="batch normalization in every hidden layer")
    m.add_argument("--l2", type=_BOUNDS["l2"], default=defaults.l2, help="beta ≥ 0 of the L2 term ½β Σ‖W‖²")
    m.add_argument("--dtype", default=defaults.dtype, choices=names["dtype"],
                   help="dtype of data, params and optimizer state")
    m.add_argument("--compute-dtype", default=defaults.compute_dtype, choices=names["compute_dtype"],
                   help="mixed precision: every matmul of the forward pass and of the manual backprop on "
                        "bfloat16 operands, summed in --dtype; params, optimizer state and loss stay in --dtype")
    o = p.add_argument_group("optimizer (hyper-parameters not given keep the optimizer's defaults; see its "
                             "docstring in fnn.optim or fnn.second_order)")
    o.add_argument("--optimizer", default=defaults.optimizer, choices=names["optimizer"],
                   help="update rule (fnn.optim.OPTIMIZERS); kfac and hessian_free are built for the run's network, "
                        "loss, --l2 and --seed")
    own = ", ".join(f"{name} {_own_rate(name):g}" for name in optim.OPTIMIZERS if _own_rate(name) is not None)
    o.add_argument("--lr", type=_BOUNDS["lr"], default=defaults.lr,
                   help=f"learning rate (peak value with a schedule); if not given, the optimizer's own default "
                        f"({own}), else {DEFAULT_LR:g}")
    o.add_argument("--schedule", default=defaults.schedule, choices=names["schedule"],
                   help="learning-rate schedule (for an optimizer that takes one)")
    for name, theirs in _hyperparameters().items():
        kinds = {type(v) for v in theirs.values()}
        about = "if not given, the optimizer's default: " + ", ".join(f"{opt} {v}" for opt, v in theirs.items())
        if kinds == {bool} and any(theirs.values()):  # on by default somewhere: --name / --no-name
            o.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, help=about)
        elif kinds == {bool}:
            o.add_argument(_flag(name), action="store_true", default=None, help=f"switch on; {about}")
        else:
            o.add_argument(_flag(name), type=int if kinds == {int} else float, default=None, help=about)
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=_BOUNDS["batch_size"], default=defaults.batch_size,
                   help="samples per step, at most the training set")
    t.add_argument("--epochs", type=_BOUNDS["epochs"], default=defaults.epochs,
                   help="epochs in all (with --resume, those already done count)")
    t.add_argument("--seed", type=_BOUNDS["seed"], default=defaults.seed,
                   help="seed of the initial params and the shuffles (and of kfac's sampled columns)")
    t.add_argument("--grad-source", default=defaults.grad_source, choices=names["grad_source"],
                   help="manual: the hand-written backprop (a failed gradient check stops the run); autodiff: jax.grad")
    t.add_argument("--last-batch", default=defaults.last_batch, choices=names["last_batch"],
                   help="smaller: the N mod B leftover samples form a last, smaller batch; drop: skip them")
    t.add_argument("--checkpoint-dir", default=defaults.checkpoint_dir,
                   help=f"write a checkpoint here after every epoch (the run's newest {KEEP} and its best are kept)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --checkpoint-dir from its newest intact checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --checkpoint-dir that holds checkpoints, deleting them once this run has "
                        "written its first one")
    t.add_argument("--plot", default=defaults.plot,
                   help="write a figure of the learning curves here (PNG, or by suffix)")
    t.add_argument("--history", default=defaults.history, help="write the per-epoch history as JSON here")
    t.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    t.add_argument("--debug-nans", action="store_true",
                   help="if training stops on a non-finite value, replay that batch eagerly and print per-layer "
                        "statistics of z, a and δ")
    dp = p.add_argument_group("differential privacy (DP-SGD; see README)")
    dp.add_argument("--dp-clip", type=_BOUNDS["dp_clip"], default=defaults.dp_clip,
                    help="train privately: clip every example's gradient to this norm (needs --dp-lot-size and one "
                         "of --dp-noise, --dp-epsilon)")
    dp.add_argument("--dp-lot-size", type=_BOUNDS["dp_lot_size"], default=defaults.dp_lot_size,
                    help="expected Poisson lot size L (q = L/N)")
    dp.add_argument("--dp-noise", type=_BOUNDS["dp_noise"], default=defaults.dp_noise, help="noise multiplier σ")
    dp.add_argument("--dp-epsilon", type=_BOUNDS["dp_epsilon"], default=defaults.dp_epsilon,
                    help="target ε for the whole run (σ is solved for)")
    dp.add_argument("--dp-delta", type=_BOUNDS["dp_delta"], default=defaults.dp_delta,
                    help="δ of the (ε, δ) guarantee, below 1/N for N training samples")
    dp.add_argument("--dp-allow-large-delta", action="store_true",
                    help="accept a --dp-delta ≥ 1/N (a guarantee that allows releasing some example outright)")
    t.add_argument("--data-parallel", action="store_true",
                   help="shard every batch over all devices (the batch size must be divisible by their number)")
    la = p.add_argument_group("Laplace approximation after training (fnn.laplace)")
    la.add_argument("--laplace", default=defaults.laplace, choices=names["laplace"],
                    help="fit a Gaussian posterior over the weights at the trained params, on the training split as "
                         "training read it, with this structure of its precision N·G + δ (G the Gauss-Newton "
                         "matrix). δ starts at N·β from --l2 when β > 0, else at 1, and is set by the evidence "
                         "(MacKay's fixed point, one δ for all layers). Prints the log evidence at the start and at "
                         "δ*, β* = δ*/N, and on the held-out split a table of NLL, ECE over "
                         f"{CALIBRATION_BINS} bins, accuracy and mean confidence of the MAP network and the Laplace "
                         "probit predictive (for mse, half_mse: the Gaussian predictive NLL); with --checkpoint-dir "
                         "the posterior goes into the last checkpoint. full and last_layer form a P × P matrix, for P "
                         f"up to {LAPLACE_LIMIT:,}. Not with --batch-norm, --loss mae or --dp-clip")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` of the flags :func:`parser` parsed, checked (:func:`check`)."""
    given = vars(args)
    fields = {f: given[f] for f in RunConfig._fields if f in given}
    hyper = {name: given[name] for name in _hyperparameters() if given.get(name) is not None}
    return check(RunConfig(**{**fields, "hidden": tuple(args.hidden), "hyperparams": hyper}))


def check(config: RunConfig) -> RunConfig:
    """``config``, its ``hyperparams`` a sorted tuple, once its names, numbers and flag combinations are found
    to work; :class:`ConfigError` names the first that does not. What needs the data or the files is checked
    by :func:`run`, and the hyper-parameters' values by the optimizer when it is built."""
    for field, names in _choices().items():
        value = getattr(config, field)
        if value is not None and value not in names:
            raise ConfigError(f"argument {_flag(field)}: invalid choice: {value!r} (choose from "
                              f"{', '.join(map(repr, names))})")
    for field, parse in _BOUNDS.items():
        if getattr(config, field) is not None:
            try:
                parse(getattr(config, field))
            except argparse.ArgumentTypeError as e:
                raise ConfigError(f"argument {_flag(field)}: {e}") from None
    _check_flags(config)
    hyper = dict(config.hyperparams)
    takes = [p.name for p in _settable(optim.OPTIMIZERS[config.optimizer])]
    rated = _takes_rate(config.optimizer)
    unused = [name for name in hyper if name not in takes]
    if unused:
        raise ConfigError(f"{config.optimizer} takes no {', '.join(map(_flag, unused))}; it takes "
                          + ", ".join(map(_flag, ["lr", *takes] if rated else takes)))
    if not rated and (config.lr is not None or config.schedule != "constant"):
        given = "--lr" if config.lr is not None else f"--schedule {config.schedule}"
        raise ConfigError(f"{config.optimizer} takes no {given}: it chooses its step length itself (from its "
                          "quadratic model); leave it out, or use an optimizer with a learning rate")
    return config._replace(hidden=tuple(config.hidden), hyperparams=tuple(sorted(hyper.items())))


def _check_flags(config: RunConfig) -> None:
    """Refuse flag combinations that cannot work."""
    for flag, given in (("--resume", config.resume), ("--overwrite", config.overwrite)):
        if given and not config.checkpoint_dir:
            raise ConfigError(f"{flag} needs --checkpoint-dir")
    if config.seed >= 2**63:
        raise ConfigError(f"--seed must be below 2**63; got {config.seed}")
    if config.resume and config.overwrite:
        raise ConfigError("--resume continues the run in --checkpoint-dir, --overwrite replaces it: give one of them")
    given = [f for f, v in (("--dp-lot-size", config.dp_lot_size), ("--dp-noise", config.dp_noise),
                            ("--dp-epsilon", config.dp_epsilon),
                            ("--dp-allow-large-delta", config.dp_allow_large_delta or None)) if v is not None]
    if config.dp_clip is None and given:
        raise ConfigError(f"{', '.join(given)} only apply to private training: add --dp-clip")
    if config.dp_clip is not None and config.dp_lot_size is None:
        raise ConfigError("--dp-clip needs --dp-lot-size (and --dp-noise or --dp-epsilon)")
    if config.dp_clip is not None and (config.grad_source != "manual" or config.batch_norm or config.data_parallel):
        raise ConfigError("--dp-clip needs --grad-source manual, and neither --batch-norm nor --data-parallel")
    if config.laplace and config.batch_norm:
        raise ConfigError(f"--laplace {config.laplace} covers networks without batch norm (fnn.laplace): leave out "
                          "--batch-norm or --laplace")
    if config.laplace and config.loss == "mae":
        raise ConfigError(f"--laplace {config.laplace} with --loss mae: mae has no curvature (its second derivative is "
                          "0 wherever it exists), so the posterior's precision would be the prior alone; use --loss "
                          "mse or half_mse")
    if config.laplace and config.dp_clip is not None:
        raise ConfigError(f"--laplace {config.laplace} reads every training example's curvature at the trained params, "
                          "outside the privacy accounting of --dp-clip: the posterior, and all that is printed and "
                          "saved from it, would break the (ε, δ) guarantee. Leave out --laplace in a private run")


def make_optimizer(config: RunConfig, net: MLP, loss: Loss, steps_per_epoch: int) -> optim.Optimizer:
    """The optimizer ``config`` names, from :data:`fnn.optim.OPTIMIZERS`: its learning rate
    (:func:`_learning_rate`) under ``--schedule`` over the run's steps, the hyper-parameters given (the others
    keep the optimizer's defaults), and of the run's network, loss, ``--l2`` and ``--seed`` what the factory
    takes (a second-order optimizer's curvature is theirs).

    Raises :class:`ConfigError` for a hyper-parameter the optimizer refuses, and for a schedule given to an
    optimizer that takes a constant learning rate only.
    """
    factory = optim.OPTIMIZERS[config.optimizer]
    accepted = inspect.signature(factory).parameters
    from_run = {"net": net, "loss": loss, "l2": config.l2, "seed": config.seed}
    given = {**{k: v for k, v in from_run.items() if k in accepted}, **dict(config.hyperparams)}
    rate = _learning_rate(config)

    def build(lr):
        try:
            return factory(**({"learning_rate": lr} if "learning_rate" in accepted else {}), **given)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None

    if config.schedule == "constant" or "learning_rate" not in accepted:
        return build(rate)
    try:
        return factory(learning_rate=SCHEDULES[config.schedule](rate, max(1, steps_per_epoch * config.epochs)),
                       **given)
    except (TypeError, ValueError):
        build(rate)  # raises if the problem is not the schedule
    raise ConfigError(f"{config.optimizer} takes a constant learning rate, not --schedule {config.schedule}: leave "
                      f"--schedule out, or use an optimizer that takes a schedule")


def _fail(message: str, status: int = 2) -> NoReturn:
    """Stop in argparse's format (``fnn-train: error: ...``) for a problem with a file, not a flag's syntax."""
    print(f"fnn-train: error: {message}", file=sys.stderr)
    raise SystemExit(status)


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


def _check_inputs(config: RunConfig) -> None:
    """Fail now on a ``--data-dir`` that is not a directory (a relative one starts from the working directory)."""
    if config.data_dir is not None and not Path(config.data_dir).is_dir():
        _fail(f"--data-dir {config.data_dir} is not a directory (looked for {Path(config.data_dir).resolve()}). Give "
              f"the directory holding the data files, or leave --data-dir out to search $FNN_DATA_DIR and the cache.")


def _check_outputs(config: RunConfig) -> None:
    """Fail now, not after training, on a ``--plot`` or ``--history`` that cannot be written."""
    for flag, name in (("--plot", config.plot), ("--history", config.history)):
        if name is not None:
            _check_writable(flag, name)
    if config.plot:
        from fnn.plots import pyplot
        try:
            pyplot()
        except ImportError as e:
            _fail(f"--plot: {e}")
        from matplotlib.backend_bases import FigureCanvasBase
        kinds = FigureCanvasBase.get_supported_filetypes()
        suffix = Path(config.plot).suffix.lstrip(".").lower()
        if suffix and suffix not in kinds:
            _fail(f"--plot {config.plot}: matplotlib writes no .{suffix} files; use one of {', '.join(sorted(kinds))}.")


@contextlib.contextmanager
def _held_checkpoint_dir(config: RunConfig):
    """Hold ``--checkpoint-dir`` for the run: create it, lock it against other runs (:func:`fnn.checkpoint.lock`)
    and refuse another run's checkpoints in it (unless ``--resume`` or ``--overwrite``). On the way out, however
    the run ends, what it created is removed again if it holds no checkpoint."""
    if not config.checkpoint_dir:
        yield
        return
    directory = Path(config.checkpoint_dir)
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
        if existing and not (config.resume or config.overwrite):
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


def _check_gradients(config: RunConfig, report) -> None:
    """Stop (exit status 1) when manual and autodiff gradients differ beyond the dtype's tolerance."""
    tolerance = GRAD_TOLERANCE[config.dtype]
    worst = max(report, key=lambda r: math.inf if math.isnan(r.manual_vs_autodiff) else r.manual_vs_autodiff)
    if worst.manual_vs_autodiff <= tolerance:
        return
    problem = (f"gradient check failed: the manual and autodiff gradients of layer {worst.layer} {worst.leaf} "
               f"differ by {worst.manual_vs_autodiff:.1e} (relative), above the {config.dtype} tolerance {tolerance:g}")
    if config.grad_source != "manual":
        print(f"fnn-train: warning: {problem}; training goes on with {config.grad_source} gradients.", file=sys.stderr)
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


class _Data(NamedTuple):
    """The run's data set: inputs z-scored by ``normalizer`` (fitted on the training split; ``None`` with
    ``--no-normalize``), targets in the form the loss reads, all in the run's dtype."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    normalizer: Any
    out_width: int  # the network's output width: classes, or target columns


def _load(config: RunConfig) -> tuple[_Data, Loss]:
    """The data of ``--dataset`` and the loss: ``--loss``, or softmax_cross_entropy for classes and mse for
    regression; class labels become one-hot rows for a loss that reads rows."""
    dtype = jnp.dtype(config.dtype)
    try:
        ds = data.load_dataset(config.dataset, config.data_dir)
    except (ImportError, OSError, ValueError) as e:
        _fail(f"cannot load --dataset {config.dataset}: {e}")
    x_train, x_test = np.asarray(ds.x_train, dtype), np.asarray(ds.x_test, dtype)
    normalizer = None
    if not config.no_normalize:
        normalizer = data.fit_zscore(x_train)  # statistics of the training split only
        x_train, x_test = (np.asarray(data.zscore(normalizer, a), dtype) for a in (x_train, x_test))
    classes = ds.num_classes is not None
    loss = LOSSES[config.loss or ("softmax_cross_entropy" if classes else "mse")]
    y_train, y_test = ds.y_train, ds.y_test
    if classes and loss.targets != CLASSES:
        y_train, y_test = (np.eye(ds.num_classes, dtype=dtype)[y] for y in (y_train, y_test))
    out_width = ds.num_classes if classes else np.shape(ds.y_train)[1]
    return _Data(ds.name, x_train, y_train, x_test, y_test, normalizer, out_width), loss


def _network(config: RunConfig, d: _Data, loss: Loss) -> MLP:
    """The network of the model flags for ``d``, its output checked against ``loss``."""
    try:
        net = MLP((d.x_train.shape[1], *config.hidden, d.out_width), config.activation, config.output,
                  init=config.init, batch_norm=config.batch_norm, compute_dtype=config.compute_dtype)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid model: {e}") from None
    try:
        losses.check_output(loss, net.output)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--loss {loss.name} with --output {net.output}: {e}") from None
    return net


def _check_sizes(config: RunConfig, net: MLP, d: _Data) -> None:
    """Refuse batch and lot sizes, and a privacy δ, that do not suit the ``N`` training samples."""
    n = len(d.x_train)
    for flag, size in (("--batch-size", config.batch_size), ("--dp-lot-size", config.dp_lot_size)):
        if size is not None and size > n:
            raise ConfigError(f"{flag} {size} is larger than the {n} training samples of {d.name}")
    if config.dp_clip is not None and config.dp_delta >= 1 / n and not config.dp_allow_large_delta:
        raise ConfigError(
            f"--dp-delta {config.dp_delta:g} is not below 1/N = 1/{n} = {1 / n:.3g} for the {n} training samples of "
            f"{d.name}: a δ that large allows releasing some example outright. Give a --dp-delta below "
            f"{1 / n:.3g} (1/N² or less is usual), or add --dp-allow-large-delta to accept it.")
    if net.has_state and _rest(config, n) == 1:
        raise ConfigError(f"with --batch-norm, the last batch of {n} samples in batches of {config.batch_size} would "
                          f"hold 1 sample, which has no batch variance; use --last-batch drop or another --batch-size")


def _check_laplace(config: RunConfig, net: MLP) -> None:
    """Refuse a ``--laplace full`` (every parameter) or ``last_layer`` (the output layer's) whose ``P × P`` matrix has
    ``P`` above :data:`LAPLACE_LIMIT`."""
    if config.laplace not in ("full", "last_layer"):
        return
    per_layer = [fan_out * (fan_in + 1) for fan_in, fan_out in zip(net.sizes[:-1], net.sizes[1:])]
    size = sum(per_layer) if config.laplace == "full" else per_layer[-1]
    if size > LAPLACE_LIMIT:
        which = "parameters" if config.laplace == "full" else "parameters in its output layer"
        raise ConfigError(f"--laplace {config.laplace} forms a P × P matrix, and the network {net.sizes} has P = "
                          f"{size:,} {which}, above the limit of {LAPLACE_LIMIT:,}; use --laplace kron (or diag), or a "
                          "smaller network")


def _rest(config: RunConfig, n: int) -> int:
    """The size of the last, smaller batch of an epoch over ``n`` samples (0 if none)."""
    return n % config.batch_size if config.last_batch == "smaller" else 0


def _mesh(config: RunConfig, n: int):
    """With ``--data-parallel``, the mesh of all devices, the batches checked to divide over it; else ``None``."""
    if not config.data_parallel:
        return None
    mesh = distributed.data_mesh()
    try:
        distributed.check_divisible(mesh, config.batch_size, _rest(config, n))
    except ValueError as e:
        raise ConfigError(f"--data-parallel: {e}") from None
    return mesh


def _check_first_order(config: RunConfig, opt: optim.Optimizer) -> None:
    """Refuse what needs a first-order optimizer, with one whose update reads the batch (K-FAC, Hessian-free)."""
    if not isinstance(opt, optim.BatchOptimizer):
        return
    if config.dp_clip is not None:
        raise ConfigError(f"--dp-clip needs a first-order --optimizer: {opt.name} reads the curvature of the batch, "
                          "which the privacy analysis does not cover (it bounds one example's influence through the "
                          "clipped gradient only)")
    if config.debug_nans:
        raise ConfigError(f"--debug-nans replays the step of a first-order --optimizer (fnn.diagnose.replay_step), "
                          f"and {opt.name}'s step reads the batch as well: leave --debug-nans out with {opt.name}")


def _privacy(config: RunConfig, n: int) -> tuple[privacy.Privacy | None, float | None]:
    """The privacy settings of the ``--dp-*`` flags and their noise multiplier ``σ`` (solved for a target ε over
    ``--epochs``), or ``(None, None)`` without ``--dp-clip``."""
    if config.dp_clip is None:
        return None, None
    try:
        private = privacy.Privacy(clip=config.dp_clip, lot_size=config.dp_lot_size, noise_multiplier=config.dp_noise,
                                  target_epsilon=config.dp_epsilon, delta=config.dp_delta,
                                  allow_large_delta=config.dp_allow_large_delta)
        return private, privacy.plan(private, n, config.epochs).noise_multiplier
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


class _Start(NamedTuple):
    """Where training starts: afresh, or from the checkpoint ``path`` that ``--resume`` read. ``run`` is the
    run's identity; ``private`` and ``sigma`` its privacy settings and ``σ`` (those of the run resumed)."""

    params: Any
    opt_state: Any
    key: jax.Array
    epoch: int
    state: Any
    run: str | None
    path: Path | None
    private: privacy.Privacy | None
    sigma: float | None


def _resume(config: RunConfig, net: MLP, opt: optim.Optimizer, fresh: _Start, n: int) -> _Start:
    """``fresh``, or where the newest intact checkpoint in ``--checkpoint-dir`` left off; one written with other
    model, optimizer or privacy settings stops the run (exit status 2), naming the difference."""
    skipped = []
    resumed = checkpoint.latest(config.checkpoint_dir, skipped)
    for why in skipped:
        print(f"fnn-train: --resume skips a damaged checkpoint: {why}", file=sys.stderr)
    if resumed is None and skipped:
        _fail(f"cannot --resume: no intact checkpoint in {config.checkpoint_dir}. Restore one, or start afresh "
              f"with --overwrite (without --resume) or in another --checkpoint-dir.")
    if resumed is None:
        print(f"no checkpoint in {config.checkpoint_dir}; starting from scratch")
        return fresh
    try:
        ck = checkpoint.load(resumed, params=fresh.params, opt_state=opt.init(fresh.params), state=fresh.state,
                             net=net, opt=opt)
    except checkpoint.CheckpointError as e:
        _fail(f"cannot --resume: {e} Resume with the flags of that run, or start afresh in another "
              f"--checkpoint-dir.")
    private, sigma = fresh.private, fresh.sigma
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
    print(f"resumed from {resumed} (epoch {ck.epoch})" + (", the newest intact checkpoint" if skipped else ""))
    # run: None for a checkpoint written before runs had an identity
    return _Start(ck.params, ck.opt_state, ck.key, ck.epoch, ck.state, ck.meta.get("run"), resumed, private, sigma)


def _gradient_check(config: RunConfig, net: MLP, start: _Start, d: _Data, loss: Loss) -> None:
    """Print the gradient check on the first batch (a table per layer and leaf, then a summary line), and stop
    the run on a failed one (:func:`_check_gradients`)."""
    b = min(config.batch_size, len(d.x_train))
    # gradient_report checks a mixed-precision network in full precision (see its docstring).
    report = gradient_report(net, start.params, jnp.asarray(d.x_train[:b]), jnp.asarray(d.y_train[:b]), loss,
                             config.l2, start.state)
    print(f"gradient check on the first batch{' (matmuls in ' + config.dtype + ')' if config.compute_dtype else ''}, "
          "relative differences per leaf:\n"
          + textwrap.indent(format_report(report), "  "))
    rel = [max(r.manual_vs_autodiff for r in report if r.layer == l) for l in range(1, net.num_layers + 1)]
    print("gradient check on the first batch, max relative difference manual vs autodiff per layer: "
          + " ".join(f"{r:.1e}" for r in rel) + f" (max {max(rel):.1e}); manual vs finite differences: "
          + f"max {max(r.manual_vs_fd for r in report):.1e}")
    _check_gradients(config, report)


class _Checkpoints:
    """This run's checkpoints in ``--checkpoint-dir``: one written per epoch (:meth:`save`, ``fit``'s
    ``on_epoch_end``); once the first is, the files of the run ``--overwrite`` replaces are deleted; rotation
    keeps this run's :data:`KEEP` newest and its best."""

    def __init__(self, config: RunConfig, net: MLP, opt: optim.Optimizer, normalizer, meta: dict, start: _Start):
        self.directory, self.net, self.opt, self.normalizer, self.meta = (config.checkpoint_dir, net, opt, normalizer,
                                                                          meta)
        self.run = start.run
        self.written = set() if start.path is None else {start.path}  # this run's checkpoints
        self.replaced = checkpoint.checkpoints(self.directory) if config.overwrite else []  # once this run has one

    def save(self, state, posterior: laplace.Posterior | None = None) -> Path:
        """Write the checkpoint of ``state`` (a ``fit`` epoch's state or a :class:`fnn.train.FitResult`), with the
        Laplace ``posterior`` at its params if given; returns its path."""
        path = checkpoint.path_for(self.directory, state.epoch)
        held_out_loss = next((r.get("held_out_loss") for r in state.history if r["epoch"] == state.epoch), None)
        spent = None if state.privacy_spent is None else state.privacy_spent._asdict()
        about = {"held_out_loss": held_out_loss, "privacy_spent": spent}
        try:
            checkpoint.save(path, params=state.params, opt_state=state.opt_state, key=state.key, epoch=state.epoch,
                            normalizer=self.normalizer, meta={**self.meta, **about}, state=state.state, net=self.net,
                            opt=self.opt, posterior=posterior)
        except OSError as e:
            _cannot_save(path, e, resumable=bool(self.written))
        self.written.add(path)
        for old in self.replaced:
            if old not in self.written:
                old.unlink(missing_ok=True)
        self.replaced.clear()
        checkpoint.prune(self.directory, keep=KEEP, run=self.run)
        return path

    def keep(self, result: FitResult, private: bool) -> Path:
        """Where the params of a run that stopped early are: its last epoch's checkpoint, written now if this run
        has none for it (a private run's anyway: its privacy_spent counts the failed epoch's steps too)."""
        path = checkpoint.path_for(self.directory, result.epoch)
        if private or not (path in self.written and path.exists()):
            self.save(result)
        return path


def _summary(result: FitResult, wall: float) -> str:
    """The last line of a run: epochs, held-out loss and accuracy, throughput, time."""
    last = result.history[-1]
    rate = np.median([r["samples_per_s"] for r in result.history])
    acc = last.get("held_out_accuracy")
    return (f"done: {result.epoch} epochs, held-out loss {last['held_out_loss']:.4f}"
            + (f", held-out accuracy {100 * acc:.2f}%" if acc is not None else "")
            + f", median {rate:,.0f} samples/s, {wall:.1f}s in total")


def _write_outputs(config: RunConfig, result: FitResult, title: str) -> None:
    """Write ``--history`` and ``--plot``; one that cannot be written stops the run (exit status 1)."""
    try:
        if config.history:
            Path(config.history).parent.mkdir(parents=True, exist_ok=True)
            Path(config.history).write_text(json.dumps(result.history, indent=1))
        if config.plot and result.history:
            from fnn.plots import plot_history
            print(f"learning curves: {plot_history(result.history, config.plot, title=title)}")
    except OSError as e:
        _fail(f"cannot write {e.filename} after training: {e.strerror or e}."
              + (f" The trained params are in --checkpoint-dir {config.checkpoint_dir}." if config.checkpoint_dir
                 else ""), status=1)


def run(config: RunConfig, argv: Sequence[str] | None = None) -> int:
    """Run ``config``: check it (:func:`check`), the data directory and the output paths, hold
    ``--checkpoint-dir``, load the data, check the gradients, train, and write the history and the plot.

    Returns the exit status: 0, or 1 when training stopped on a non-finite value. Raises
    :class:`ConfigError` for settings that do not work together or with the data; stops with ``SystemExit``
    (after printing ``fnn-train: error: ...``) on data or a file that cannot be read or written (status 2
    before training, 1 after) and on a failed gradient check (1). ``argv``, the flags of the run, goes into
    the checkpoints' metadata.
    """
    config = check(config)
    _check_inputs(config)
    _check_outputs(config)
    with _held_checkpoint_dir(config):
        return _train(config, None if argv is None else list(argv))


def _train(config: RunConfig, argv: list[str] | None) -> int:
    """The run, from the data on, once the paths are checked and the checkpoint directory is held."""
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(config.dtype)
    d, loss = _load(config)
    n = len(d.x_train)
    net = _network(config, d, loss)
    _check_sizes(config, net, d)
    _check_laplace(config, net)
    mesh = _mesh(config, n)
    init_key, key = jax.random.split(jax.random.PRNGKey(config.seed))
    params = net.init(init_key, dtype)
    opt = make_optimizer(config, net, loss, -(-n // config.batch_size))
    _check_first_order(config, opt)
    print(f"fnn-train: {d.name}: {n} train / {len(d.x_test)} held out, network {net.sizes} "
          f"{config.activation}->{config.output}, {loss.name}, {config.optimizer} "
          + (f"lr={_learning_rate(config)}, " if _takes_rate(config.optimizer) else "step length from its model, ")
          + f"batch {config.batch_size}, gradients: {config.grad_source}, "
          + (f"{config.compute_dtype} matmuls, " if config.compute_dtype else "")
          + f"on {jax.devices()[0].platform}")
    private, sigma = _privacy(config, n)
    if private is not None:
        print(f"DP-SGD: clip {config.dp_clip}, lot size {config.dp_lot_size} of {n}, σ = {sigma:.4g}, "
              f"δ = {config.dp_delta:g}; the training loss printed below is not private, and tuning on the private "
              f"data is not accounted")
    start = _Start(params, None, key, 0, net.init_state(dtype) if net.has_state else None, uuid.uuid4().hex[:12],
                   None, private, sigma)
    if config.resume:
        start = _resume(config, net, opt, start, n)
    _gradient_check(config, net, start, d, loss)

    private, sigma = start.private, start.sigma
    meta = {"argv": argv, "sizes": list(net.sizes), "run": start.run,
            "privacy": None if private is None else {**{k: v for k, v in private._asdict().items() if k != "spent"},
                                                     "resolved_noise_multiplier": sigma}}
    if private is not None:  # train with the σ resolved above (and stored), not solve for it again
        private = private._replace(noise_multiplier=sigma, target_epsilon=None)
    saved = _Checkpoints(config, net, opt, d.normalizer, meta, start) if config.checkpoint_dir else None
    began = time.perf_counter()
    result = fit(net, start.params, opt, (d.x_train, d.y_train), loss=loss, epochs=max(0, config.epochs - start.epoch),
                 batch_size=config.batch_size, key=start.key, held_out=(d.x_test, d.y_test), l2=config.l2,
                 grad_source=config.grad_source, last_batch=config.last_batch, opt_state=start.opt_state,
                 state=start.state, start_epoch=start.epoch, on_epoch_end=saved.save if saved else None,
                 quiet=config.quiet, mesh=mesh, privacy=private)
    if result.history:
        print(_summary(result, time.perf_counter() - began))
    _write_outputs(config, result, f"{d.name} {net.sizes}")
    if not result.stopped:
        if config.laplace:
            posterior = _fit_posterior(config, net, result.params, d, loss)
            _held_out_report(posterior, d)
            print(f"posterior saved in {saved.save(result, posterior)}" if saved
                  else "posterior not saved (no --checkpoint-dir)")
        return 0
    print(f"stopped: {result.stopped}" + (f"; no --laplace {config.laplace} fit" if config.laplace else ""),
          file=sys.stderr)
    epoch = ((result.nan_report or {}).get("kept") or {}).get("epoch", result.epoch)
    where = f"in {saved.keep(result, private is not None)}" if saved else "not saved (no --checkpoint-dir)"
    print(f"kept the params of epoch {epoch}, {where}", file=sys.stderr)
    if config.debug_nans and result.nan_report:
        params, opt_state, state = result.before_failure or (result.params, result.opt_state, result.state)
        print(replay_step(net, params, opt, opt_state, d.x_train, d.y_train, loss, result.nan_report["batch"],
                          config.l2, state))
    return 1


def _fit_posterior(config: RunConfig, net: MLP, params, d: _Data, loss: Loss) -> laplace.Posterior:
    """The ``--laplace`` posterior at ``params`` on the training split, its prior precision set by the evidence
    (MacKay's fixed point, one δ), after printing ``N``, ``P``, the log evidence at the start (``δ = N·β``, or 1
    for ``β = 0``) and at ``δ*``, ``β* = δ*/N`` and the time taken."""
    n = len(d.x_train)
    start = {"l2": config.l2} if config.l2 > 0 else {"prior_precision": 1.0}
    began = time.perf_counter()
    post = jax.block_until_ready(laplace.fit_laplace(net, params, (d.x_train, d.y_train), loss,
                                                     structure=config.laplace, **start))
    fitted = time.perf_counter() - began
    best = laplace.optimize_prior_precision(post)
    chosen = time.perf_counter() - began - fitted
    sizes = [sum(int(v.size) for v in layer.values()) for layer in params]
    covered = "" if config.laplace != "last_layer" else f" (the posterior covers the output layer's {sizes[-1]:,})"
    delta0, delta = float(post.prior_precision[0]), float(best.posterior.prior_precision[0])
    at = (f"the training β = {config.l2:g} (δ = N·β = {delta0:.6g})" if config.l2 > 0
          else "δ = 1 (--l2 0 gives no prior to start from)")
    print(f"Laplace ({config.laplace}) at the trained params, on the training split: N = {n:,}, P = {sum(sizes):,}"
          f"{covered}; fitted in {fitted:.2f}s, δ chosen in {chosen:.2f}s\n"
          f"  log evidence at {at}: {float(laplace.log_marginal_likelihood(post)):.4f}\n"
          f"  log evidence at δ* = {delta:.6g}, β* = δ*/N = {delta / n:.6g}: "
          f"{float(laplace.log_marginal_likelihood(best.posterior)):.4f} (MacKay's fixed point, "
          f"{best.iterations} iterations, {'converged' if best.converged else 'not converged'})")
    return best.posterior


def _held_out_report(post: laplace.Posterior, d: _Data) -> None:
    """Print how the MAP network and the Laplace predictive of ``post`` fit the held-out split, in chunks of
    :data:`HELD_OUT_CHUNK` rows: a calibration table (:func:`fnn.metrics.calibration`) for a canonical
    classification pair, the Gaussian predictive NLL for ``mse``/``half_mse``; else say why there is none."""
    x, y, m = d.x_test, d.y_test, len(d.x_test)
    if m == 0:
        print("no held-out split: no calibration table")
        return
    net, loss = post.net, post.loss
    chunks = [slice(s, s + HELD_OUT_CHUNK) for s in range(0, m, HELD_OUT_CHUNK)]
    if laplace.noise_variance(loss, 1) is not None:
        nll = np.zeros(2)
        for c in chunks:
            mean, cov = laplace.predict(post, x[c])
            noise = laplace.noise_variance(loss, mean.shape[-1]) * np.eye(mean.shape[-1])
            nll += [_gaussian_nll(y[c], mean, noise), _gaussian_nll(y[c], mean, cov)]
        print(f"held-out Gaussian predictive NLL on the {m:,} held-out samples (nats per sample): "
              f"MAP (noise σ² I) {nll[0] / m:.4f}, Laplace (σ² I + J Σ Jᵀ) {nll[1] / m:.4f}")
        return
    if not losses.output_curvature(loss, net.output).at_logits:
        print(f"no calibration table: {loss.name} on a {net.output} output is not a canonical pair, so the GLM "
              f"predictive is over the probabilities themselves with no link to integrate it through (fnn.laplace."
              f"predict); train on output {loss.canonical_output} for the table. The evidence above holds.")
        return
    softmax = laplace.CLASSIFICATION[loss.name] == "softmax"
    labels = _labels(y, softmax)
    if labels is None:
        print(f"no calibration table: the held-out targets are not {'class' if softmax else '0/1'} labels")
        return
    link = jax.nn.softmax if softmax else jax.nn.sigmoid
    probs = {"MAP": [], "Laplace": []}
    for c in chunks:
        out = net.apply(post.params, x[c])  # a^L: the probabilities, or for the identity output the logits
        probs["MAP"].append(np.asarray(link(out) if net.output == "identity" else out))
        probs["Laplace"].append(np.asarray(laplace.predict(post, x[c])))
    over = f"{m:,} held-out samples" + ("" if softmax else f"' {labels.size:,} binary outputs")
    print(f"calibration on the {over} (ECE over {CALIBRATION_BINS} equal-width confidence bins):\n"
          f"  {'':<8}{'NLL':>9}{'ECE':>9}{'accuracy':>10}{'confidence':>12}")
    for row, parts in probs.items():
        p = np.concatenate(parts)
        r = metrics.calibration(p if softmax else p.reshape(-1), labels, bins=CALIBRATION_BINS)
        print(f"  {row:<8}{r['nll']:>9.4f}{r['ece']:>9.4f}{100 * r['accuracy']:>9.2f}%{r['confidence']:>12.4f}")


def _labels(y: np.ndarray, softmax: bool) -> np.ndarray | None:
    """The class of each held-out row (from integer labels or one-hot rows) for a softmax; every output's 0/1 target,
    flattened, for a sigmoid; ``None`` for targets that are neither."""
    y = np.asarray(y)
    if softmax and y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        return y
    if not np.all((y == 0) | (y == 1)):
        return None
    if not softmax:
        return y.reshape(-1).astype(np.int64)
    return np.argmax(y, axis=-1) if y.ndim == 2 and np.all(y.sum(axis=-1) == 1) else None


def _gaussian_nll(y, mean, cov) -> float:
    """``Σ_m −log N(y_m | mean_m, S_m) = ½ Σ_m (K log 2π + log det S_m + r_mᵀ S_m⁻¹ r_m)``, ``r = y − mean``, on the
    host in float64; ``y, mean (M, K)``, ``cov`` ``(M, K, K)`` or one ``(K, K)`` for every row."""
    r = np.asarray(y, np.float64) - np.asarray(mean, np.float64)
    s = np.broadcast_to(np.asarray(cov, np.float64), (*r.shape, r.shape[-1]))
    _, logdet = np.linalg.slogdet(s)
    quad = np.einsum("mk,mk->m", r, np.linalg.solve(s, r[..., None])[..., 0])
    return float(0.5 * np.sum(r.shape[-1] * np.log(2 * np.pi) + logdet + quad))


def main(argv: Sequence[str] | None = None) -> int:
    """``fnn-train``: parse ``argv`` (``sys.argv[1:]`` if ``None``), check the run (:func:`config_from_args`) and
    :func:`run` it; returns the exit status. A :class:`ConfigError` ends as argparse's errors do (exit status 2)."""
    p = parser()
    args = p.parse_args(argv)
    try:
        return run(config_from_args(args), sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        p.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
