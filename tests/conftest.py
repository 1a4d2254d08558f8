import os

# Several forced CPU devices so single-device assumptions fail early; must precede importing jax.
# The tests' networks are tiny, so XLA's backend optimisations cost more compile time than they
# save at run time (about half the suite's time).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache for the session and the subprocesses it starts: the experiment
# configs, shrunk, and the restarted runs of the kill tests compile the same programs again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # created (and removed at exit) by the first process only
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxconcept_test_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
# One probe cache for the session and both xdist workers: the tiny image probe is trained once
# (a file lock in probe.py makes a second process wait for it and read it instead of training it).
if "JAXCONCEPT_TEST_PROBE_CACHE" not in os.environ:
    os.environ["JAXCONCEPT_TEST_PROBE_CACHE"] = tempfile.mkdtemp(prefix="jaxconcept_test_probes_")
    atexit.register(shutil.rmtree, os.environ["JAXCONCEPT_TEST_PROBE_CACHE"], True)
# programs that compile in under 0.2 s are not worth a cache entry: the eager ops of a test (thousands,
# each a few milliseconds) would each write one (a third of test_images' time); the command line
# caches everything (its --compile-cache setting), so its tests see every program cached
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# the command line's size limit (cli.COMPILE_CACHE_MAX_BYTES) in every process sharing the cache: a
# cache written without it holds no access times, which a process with it warns about
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def probe_cache():
    """One probe cache for the session's processes: the tiny image probe is trained once (about
    a minute), by the first test that needs it, and read back by the others."""
    from pathlib import Path

    return Path(os.environ["JAXCONCEPT_TEST_PROBE_CACHE"])
