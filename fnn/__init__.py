"""fnn: a small functional neural-network package on JAX, with hand-derived backpropagation.

Read these first::

    net = fnn.MLP(sizes=(784, 256, 10), activation="relu", output="identity")
    params = net.init(jax.random.PRNGKey(0))
    loss, grads = fnn.backprop(net, params, x, y, fnn.losses.softmax_cross_entropy)
    opt = fnn.optim.adam(learning_rate=1e-3)
    result = fnn.fit(net, params, opt, (x, y), loss=fnn.losses.softmax_cross_entropy,
                     epochs=10, batch_size=128, key=jax.random.PRNGKey(1))
"""

from fnn import (
    activations,
    batchnorm,
    checkpoint,
    curvature,
    data,
    diagnose,
    distributed,
    epoch,
    influence,
    initializers,
    laplace,
    losses,
    noise,
    optim,
    per_example,
    perceptron,
    privacy,
    schedules,
    second_order,
)
from fnn.backprop import Trace, backprop, backprop_trace
from fnn.gradcheck import LeafCheck, check_gradients, format_report, gradient_report
from fnn.losses import Loss, l2_penalty
from fnn.metrics import evaluate
from fnn.mlp import MLP, ForwardTrace
from fnn.objective import autodiff_grads, objective
from fnn.step import StepResult, train_step
from fnn.train import FitResult, fit

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "ForwardTrace",
    "backprop",
    "backprop_trace",
    "Trace",
    "objective",
    "check_gradients",
    "gradient_report",
    "format_report",
    "LeafCheck",
    "autodiff_grads",
    "train_step",
    "StepResult",
    "fit",
    "evaluate",
    "FitResult",
    "Loss",
    "l2_penalty",
    "activations",
    "initializers",
    "losses",
    "optim",
    "schedules",
    "second_order",
    "laplace",
    "influence",
    "data",
    "checkpoint",
    "curvature",
    "diagnose",
    "batchnorm",
    "distributed",
    "epoch",
    "per_example",
    "privacy",
    "noise",
    "perceptron",
]
