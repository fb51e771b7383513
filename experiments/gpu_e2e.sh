#!/usr/bin/env bash
# The end-to-end figures on a CUDA machine, in one call, from the repository root (the kernels' own
# checks are experiments/gpu_check.sh):
#   1. experiments/bench_serving.py in bfloat16: continuous vs static batching, async scheduling vs
#      synchronous steps (where host and device do not share cores), fused decode steps, the engine vs
#      transformers (on the GPU); SERVE_ARGS="--parts 1 2 3 4 5" adds prefix caching and paged vs
#      contiguous capacity;
#   2. experiments/bench_decode.py: jaxinfer's jit-compiled generate vs transformers' generate, both on
#      the GPU, batch 1 / 8 / 32, float32 and bfloat16, roofline against the GPU's measured read bandwidth
#      (its H200 figures are committed; serving goes first).
# One persistent compilation cache serves the run, so the several LLM instances of bench_serving compile
# a program once. Logs and result files go to $OUT (default runs/gpu_e2e); DECODE_S / SERVE_S cap each part
# (420 + 150 s: one call of the device tool holds both, with 30 s to spare).
set -u
OUT=${OUT:-runs/gpu_e2e}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxinfer_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  $PY -c "import sys, jax, torch, transformers; print('python', sys.version.split()[0], 'jax', jax.__version__, \
jax.devices(), 'torch', torch.__version__, torch.cuda.is_available(), 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.log"
# Serving: part 1 (continuous vs static), part 7 (async scheduling) and part 5 (fused steps) first, Poisson arrivals at 32/s: on an
# H200 the engine's programs compile slowly (a run did not get through part 1's 68 in 258 s), and at
# 4/s each Poisson pass lasts ~17 s. Timestamps show where a capped run spent its time.
date +%T | tee "$OUT/serving.log"
timeout "${SERVE_S:-420}" $PY experiments/bench_serving.py --dtype bfloat16 --pairs 2 --rate 32 --parts 1 7 5 4 \
  --out "$OUT/bench_serving_gpu" ${SERVE_ARGS:-} 2>&1 | while IFS= read -r line; do
  printf '%s %s\n' "$(date +%T)" "$line"; done | tee -a "$OUT/serving.log"
echo "bench_serving exit status ${PIPESTATUS[0]}" | tee -a "$OUT/serving.log"
timeout "${DECODE_S:-150}" $PY experiments/bench_decode.py --repeats 3 --out "$OUT/bench_decode_gpu" \
  ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log"
echo "bench_decode exit status ${PIPESTATUS[0]}" | tee -a "$OUT/decode.log"
