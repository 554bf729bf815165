"""Test set-up: float64 available, full-precision matmuls, and hypothesis profiles."""

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)  # tests choose dtypes explicitly; float64 must exist
jax.config.update("jax_default_matmul_precision", "highest")  # no TF32/bf16 passes on GPUs

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
