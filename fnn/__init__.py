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
    data,
    distributed,
    initializers,
    losses,
    optim,
    perceptron,
    schedules,
)
from fnn.backprop import backprop, objective
from fnn.gradcheck import LeafCheck, autodiff_grads, check_gradients, format_report, gradient_report
from fnn.losses import Loss, l2_penalty
from fnn.mlp import MLP
from fnn.train import FitResult, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "backprop",
    "objective",
    "check_gradients",
    "gradient_report",
    "format_report",
    "LeafCheck",
    "autodiff_grads",
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
    "data",
    "checkpoint",
    "batchnorm",
    "distributed",
    "perceptron",
]
