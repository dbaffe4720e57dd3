"""8 simulated CPU devices for every test; must run before JAX is imported."""

import os

# Tests are compile-bound on 2 cores: XLA's backend optimisation level 0 compiles ~40% faster and
# every comparison in the suite is between programs compiled with the same flags.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
