"""Shared fixtures: tiny random HF checkpoints written by transformers itself."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile fresh: no persistent compilation cache (jaxinfer.jit_cache) unless a test sets one.
os.environ.setdefault("JAXINFER_COMPILATION_CACHE", "0")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
