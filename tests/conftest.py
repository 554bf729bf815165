"""Test set-up: float64 available, full-precision matmuls, and hypothesis profiles."""

import os
from pathlib import Path

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)  # tests choose dtypes explicitly; float64 must exist
jax.config.update("jax_default_matmul_precision", "highest")  # no TF32/bf16 passes on GPUs

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
# "default" draws the same pseudo-random examples on every run, so CI is reproducible;
# HYPOTHESIS_PROFILE=explore draws fresh ones each run (and keeps failures in .hypothesis/).
settings.register_profile("default", derandomize=True, database=None, **_common)
settings.register_profile("explore", **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _data_dir():
    env = os.environ.get("FNN_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"


@pytest.fixture(scope="session")
def mnist_dir():
    """The directory with the real MNIST t10k files; skips without it unless FNN_REQUIRE_DATA=1."""
    d = _data_dir()
    if not (d / "t10k-images-idx3-ubyte.gz").exists() and not (d / "t10k-images-idx3-ubyte").exists():
        if os.environ.get("FNN_REQUIRE_DATA") == "1":
            pytest.fail(f"FNN_REQUIRE_DATA=1 but no MNIST files in {d} (set FNN_DATA_DIR)")
        pytest.skip(f"no MNIST files in {d}; set FNN_DATA_DIR")
    return d
