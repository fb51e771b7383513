"""Shared fixtures: tiny random HF checkpoints written by transformers itself."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
