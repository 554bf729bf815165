"""Test set-up: float64 available, full-precision matmuls, hypothesis profiles, the compilation cache
and the fast tier's list (tests/slow.txt)."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The suite compiles thousands of small programs, eager primitives mostly, and runs each in microseconds, so
# compiling is most of its time. Without LLVM's optimization passes and with XLA's elemental emitters a
# compilation takes about half as long on 2 cores (an eager add: 57 -> 23 ms; a jitted gradient of a small
# function: 147 -> 75 ms). Tests compare results with float64 references under tolerances, or two runs of the
# same program with each other, so they hold under either setting; fnn itself compiles with XLA's defaults.
# Set before jax starts its backend; FNN_FAST_COMPILE=0 keeps XLA's defaults here too.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if os.environ.get("FNN_FAST_COMPILE", "1") != "0":
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # tests choose dtypes explicitly; float64 must exist
jax.config.update("jax_default_matmul_precision", "highest")  # no TF32/bf16 passes on GPUs

# XLA programs are kept on disk and shared by every test process: identical programs compiled by different
# tests are compiled once (12 % off a cold run of two test files; within the noise of a full cold run), and
# a second run of the fast tier compiles only what an edit changed (about 3 times faster). The key is the
# program and the compiler's settings, so a result can never come from other code. FNN_JAX_CACHE=DIR
# moves it, FNN_JAX_CACHE=off turns it off.
_cache = os.environ.get("FNN_JAX_CACHE", str(Path(__file__).resolve().parents[1] / ".jax_cache"))
if _cache != "off":
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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


SLOW_LIST = Path(__file__).with_name("slow.txt")


def _slow_entries() -> list[str]:
    lines = (line.strip() for line in SLOW_LIST.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def pytest_collection_modifyitems(session, config, items):
    """Marks the tests named in tests/slow.txt slow (an entry without ``[...]`` names every
    parametrization). When every test file was collected, an entry that names no test is an error, so
    that the list cannot rot when a test is renamed."""
    entries = _slow_entries()
    named = set(entries)
    used = set()
    for item in items:
        nodeid = item.nodeid.split("tests/", 1)[-1]
        base = nodeid.split("[", 1)[0]
        for key in (nodeid, base):
            if key in named:
                item.add_marker(pytest.mark.slow)
                used.add(key)
    files = {item.nodeid.split("::", 1)[0].split("tests/", 1)[-1] for item in items}
    every_file = {p.name for p in SLOW_LIST.parent.glob("test_*.py")}
    if not config.getoption("markexpr") and not config.getoption("keyword") and files == every_file:
        stale = [e for e in entries if e not in used]
        if stale:
            raise pytest.UsageError(f"tests/slow.txt names tests that do not exist: {stale[:5]}; "
                                    "remove or rename those lines")
