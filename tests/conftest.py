"""Shared fixtures: tiny random HF checkpoints written by transformers itself."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile fresh: no persistent compilation cache (jaxinfer.jit_cache) unless a test sets one.
os.environ.setdefault("JAXINFER_COMPILATION_CACHE", "0")
# Most of the suite's time is XLA:CPU compiling its many small programs. LLVM at -O0 compiles
# them ~30% faster (full suite 9:14 -> 6:33 on 2 cores) and the programs still compute the same
# things; tests check results, never speed (benchmarks run at the default level).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
