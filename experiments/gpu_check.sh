#!/usr/bin/env bash
# The Pallas kernels' device checks in one call (issue 4), from the repository root on a CUDA machine:
#   1. the kernel tests with the Triton variants compiled for the GPU (interpret=None: no interpret
#      mode on their own hardware; the Mosaic cases stay on CPU CI), and the model end to end through
#      the kernels (tests/test_pallas_backend.py: same greedy tokens as the XLA path);
#   2. experiments/bench_kernels.py (flash TFLOP/s vs cuDNN and XLA, paged decode GB/s vs the HBM
#      peak, the measured copy bandwidth and the XLA gather path; --tune adds a few block sizes).
# The tests run with JAX_DEFAULT_MATMUL_PRECISION=highest: their float32 tolerances assume float32
# matmuls, where XLA:GPU would otherwise use TF32.
# Logs and the result files go to $OUT (default runs/gpu_check). TEST_S / BENCH_S cap each part.
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  $PY -c "import sys, jax; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
  # float32 -> float4_e2m1fn on this device against ml_dtypes (kv_formats.e2m1_encode avoids the cast)
  $PY -c "import jax.numpy as jnp, numpy as np, ml_dtypes; x = np.linspace(-7, 7, 57, dtype=np.float32); \
got = np.asarray(jnp.asarray(x).astype(jnp.float4_e2m1fn).astype(jnp.float32)); \
want = x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32); print('f32->e2m1 cast mismatches', int((got != want).sum()), 'of', x.size)"
} 2>&1 | tee "$OUT/env.log"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_S:-180}" $PY -m pytest -p no:cacheprovider -n 0 -q -rfE -k "not mosaic" \
  tests/test_kernels_flash.py tests/test_kernels_paged.py tests/test_pallas_backend.py 2>&1 | tee "$OUT/tests.log"
echo "tests exit status ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"
timeout "${BENCH_S:-250}" $PY experiments/bench_kernels.py --repeats 5 ${BENCH_ARGS:---tune} 2>&1 | tee "$OUT/bench.log"
echo "bench exit status ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
cp experiments/results/bench_kernels_gpu.* "$OUT"/ 2>/dev/null || true
