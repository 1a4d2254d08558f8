import os

# Several forced CPU devices so single-device assumptions fail early; must precede importing jax.
# The tests' networks are tiny, so XLA's backend optimisations cost more compile time than they
# save at run time (about half the suite's time).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
