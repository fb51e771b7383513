"""Shared fixtures: tiny random HF checkpoints written by transformers itself."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile fresh: no persistent compilation cache (jaxinfer.jit_cache) unless a test sets one.
os.environ.setdefault("JAXINFER_COMPILATION_CACHE", "0")
# Engines given no KV budget take 64 MiB instead of 512: allocating (zeroing) 512 MiB took 0.65-0.8 s
# of every such LLM(...), and the tiny test models got 65,536-262,144 pages for prompts of a few
# dozen tokens. Tests that need a tight pool still give num_kv_pages.
os.environ.setdefault("JAXINFER_KV_CACHE_MEMORY_BYTES", str(64 << 20))
# Most of the suite's time is XLA:CPU compiling its many small programs. LLVM at -O0 compiles
# them ~30% faster (full suite 9:14 -> 6:33 on 2 cores), and XLA:CPU's loop emitters faster than
# its newer fusion emitters (one engine test 27 -> 18 s); the programs still compute the same
# things, and tests check results, never speed (benchmarks run with the defaults). One LLVM module per
# program instead of a split for parallel codegen (no gain with both cores busy running two workers):
# a third fewer memory mappings per executable (see the fixture below) and tests/test_engine.py alone
# 680 -> 590 s of test time (-n 2, back to back on an AVX2-only EPYC).
# On a GPU (JAX_PLATFORMS=cuda: the kernel tests compile the Triton variants there) the flags stay off.
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
              "--xla_cpu_parallel_codegen_split_count=1"):
    if os.environ["JAX_PLATFORMS"] == "cpu" and _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

import gc  # noqa: E402

# Tracing and lowering allocate many short-lived objects, so Python's cyclic collector ran often,
# and each full pass walked a heap that grows with every cached program. A 10x larger first
# generation: tests/test_engine.py alone 308 -> 274 s (-n 2, back to back on an AVX2-only EPYC).
gc.set_threshold(10000, 50, 50)

import pytest  # noqa: E402

from jaxinfer.jit_cache import memory_mappings  # noqa: E402


@pytest.fixture(autouse=True)
def _release_near_the_mapping_limit():
    """Free every compiled program once the process holds half its memory-mapping limit.

    Each XLA:CPU executable keeps memory mappings (a few per fused kernel) for as long as jax's
    caches hold it. A worker that ran module after module reached the kernel's limit of 65,530
    (vm.max_map_count) in about five minutes, and the next compilation died with a segmentation
    fault (`jit_cache.memory_mappings`); test_engine alone reaches ~38,000."""
    yield
    m = memory_mappings()
    if m is not None and m[0] > m[1] // 2:
        gc.collect()  # fixtures that are gone: drop what they referenced
        jax.clear_caches()
