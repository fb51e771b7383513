"""jaxinfer's native CPU kernels for decode, compiled on first use and called through XLA's FFI.

Four kernels in `csrc/cpu_kernels.cc`, on XLA's intra-op threads:

- `bf16_matmul`: x [M, K] @ wt[N, K]^T, float32 out, for the few rows of a decode or verification
  step. XLA:CPU multiplies such rows by bf16 weights at about half the rate it streams float32
  weights (~24 vs ~58 GB/s), and takes a one-row bf16 dot down a matrix-vector path ~10x slower
  still (`layers.one_row_padded`), so bf16 decode on CPU was held to ~1.7x transformers' (whose
  bf16 matmuls are oneDNN's). The kernel reads each weight row once per call, four rows at a time
  against every block of four x rows (AVX512-BF16 dot products), with a software prefetch of the
  next rows. Products of more than `MAX_ROWS` rows (prefill) stay on XLA's dot, which is as fast
  there.
- `f32_matmul`: x [M, K] @ w [K, N] for a float32 w packed by `pack_f32` into panels of 32
  outputs (`layers.PanelWeight`), any M. XLA:CPU multiplies a few float32 rows well under the FMA
  rate (9 rows: ~140 GFLOP/s on the target's projections); the kernel's outer products over
  contiguous panels with a 16 KB prefetch run 9 rows in ~1.1x the time of one
  (`cpu_kernels_speed.md`) and match XLA from 128 rows up, so every product goes to it: a float32
  row's result depends neither on its batch-mates nor on how its prompt was chunked.
- `attention`: `layers.attention_reference`'s contract for queries of any number of tokens per
  row against a paged or contiguous cache of their dtype (bf16 or float32): one work item per
  (row, kv head, chunk of 32 query tokens) takes its queries through the slots 16 at a time, read
  straight from their pages (no gather), each query with its own online softmax, float32
  accumulation, and work that stops at each row's length.

Prefill attention goes through the same kernel: a prompt's tokens are split into chunks of 32,
so a single row keeps every thread busy, and since each query's arithmetic does not depend on the
call's width, a prompt prefilled whole, in the engine's chunks or token by token gives every
token the same bits. On 2 AVX2 cores (`cpu_kernels_speed_avx2_s51.md`: 6 layers, 8 heads) it takes
0.55x / 0.44x / 0.52x / 0.35x XLA's time at 64 / 192 / 512 / 1024 prompt tokens, and the embedded
target's 192-token prefill went from 51 to 41.5 ms (stop 51); stop 35 measured the AVX-512 build at
0.51-0.75x (bf16) and 0.56-1.01x (float32) for 128-512 tokens before the chunks.

`experiments/cpu_kernels_speed.py` times the kernels against XLA side by side;
`experiments/bench_decode.py --weight-layouts in_out out_in native --attention-backends xla native`
measures what they buy end to end. `LLM(weight_layout="native")` (bf16 projections as
`layers.TransposedWeight(native=True)`, float32 ones as `layers.PanelWeight`) and
`LLM(attention_backend="native")` select them; both are what "auto" picks for bf16 and float32
on a CPU where the kernels build.

The library is built with the system's C++ compiler (`$CXX`, else `c++`), `-march=native`,
against the FFI headers jaxlib ships, into `$JAXINFER_CACHE_DIR` (default `~/.cache/jaxinfer`)
under a name keyed by the source, jaxlib's version, the CPU's flags and the compiler. A CPU with
AVX512-BF16 gets all four kernels. One with AVX2 and FMA but not AVX512-BF16 (most x86 servers
before Sapphire Rapids and Zen 4) gets the two float32 ones, the same algorithms on 8-lane
vectors; its bf16 models stay on XLA's paths. Where nothing can be built (no compiler, not x86-64,
neither instruction set), `available()` is False. `available(dtype)` says whether that dtype's
kernels are there, `unavailable_reason(dtype)` why not, and whatever is missing runs on XLA's
paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cc"
MATMUL = "jaxinfer_bf16_matmul"
F32_MATMUL = "jaxinfer_f32_matmul"
ATTENTION = "jaxinfer_bf16_attention"
F32_ATTENTION = "jaxinfer_f32_attention"
MAX_ROWS = 64  # products of more rows stay on XLA's dot (as fast from 128 rows on)
BUILD_TIMEOUT_S = 300


def cache_dir() -> Path:
    return Path(os.environ.get("JAXINFER_CACHE_DIR") or Path.home() / ".cache" / "jaxinfer") / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    return os.environ.get("CXX") or "c++"


def _library_path() -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), importlib.metadata.version("jaxlib").encode(), _cpu_flags().encode(),
                 _compiler().encode()):
        key.update(part)
    return cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def _build(out: Path) -> None:
    """Compile SOURCE into out (atomically: concurrent builders each write a temporary file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [_compiler(), "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} ... failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


KERNELS = {  # symbol in the library -> (FFI target, the dtype it serves)
    "JaxinferBf16Matmul": (MATMUL, "bfloat16"),
    "JaxinferF32Matmul": (F32_MATMUL, "float32"),
    "JaxinferBf16Attention": (ATTENTION, "bfloat16"),
    "JaxinferF32Attention": (F32_ATTENTION, "float32"),
}


@functools.cache
def _load() -> tuple[frozenset[str], str | None]:
    """Build (once per cache key), load and register the kernels this CPU runs: (the dtypes they
    serve, why the others are unavailable or None). AVX512-BF16 builds all four; AVX2 with FMA the
    float32 two."""
    none = frozenset()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return none, f"needs an x86-64 CPU with AVX512-BF16 or AVX2 (this is {platform.machine()})"
    flags = set(_cpu_flags().split()) if Path("/proc/cpuinfo").exists() else {"avx512_bf16"}
    if "avx512_bf16" not in flags and not {"avx2", "fma"} <= flags:
        return none, "this CPU has neither AVX512-BF16 nor AVX2 with FMA (none among /proc/cpuinfo's flags)"
    path = _library_path()
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        dtypes = set()
        for symbol, (target, dtype) in KERNELS.items():
            if hasattr(lib, symbol):
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                dtypes.add(dtype)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return none, f"building or loading {path.name} failed: {e}"
    why = None if "bfloat16" in dtypes else ("this CPU has no AVX512-BF16 (avx512_bf16 is not among /proc/cpuinfo's "
                                             "flags): float32 kernels only")
    return frozenset(dtypes), why


def available(dtype=None) -> bool:
    """Whether kernels for dtype (bfloat16 or float32; None: any) are built and registered in this
    process (building them if needed)."""
    dtypes = _load()[0]
    return bool(dtypes) if dtype is None else jnp.dtype(dtype).name in dtypes


def unavailable_reason(dtype=None) -> str | None:
    """Why `available(dtype)` is False (None when it is True)."""
    return None if available(dtype) else _load()[1] or f"no native kernels for {jnp.dtype(dtype).name}"


def chosen_by_default(dtype) -> bool:
    """Whether "auto" (`LLM`'s weight_layout and attention_backend) picks the kernels for a model of
    this dtype: bfloat16 or float32, running on CPU, kernels available."""
    return (jax.default_backend() == "cpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
            and available(dtype))


def applies(x: jax.Array, wt: jax.Array) -> bool:
    """Whether `bf16_matmul` takes x [..., K] times wt [N, K]: both bfloat16, at most MAX_ROWS rows
    of x, and the kernel available."""
    rows = x.size // max(x.shape[-1], 1)
    return x.dtype == wt.dtype == jnp.bfloat16 and rows <= MAX_ROWS and available(jnp.bfloat16)


def bf16_matmul(x: jax.Array, wt: jax.Array) -> jax.Array:
    """x [..., K] bf16 times wt [N, K] bf16, contracting K: float32 [..., N]. The native kernel on
    CPU; XLA's dot when lowered for another platform."""
    if x.dtype != jnp.bfloat16 or wt.dtype != jnp.bfloat16 or wt.ndim != 2 or x.shape[-1] != wt.shape[1]:
        raise ValueError(f"bf16_matmul: x [..., K] and wt [N, K] in bfloat16 expected, got "
                         f"{x.dtype}{list(x.shape)} and {wt.dtype}{list(wt.shape)}")
    if not available(jnp.bfloat16):
        raise RuntimeError(f"the native bf16 kernel is unavailable: {unavailable_reason(jnp.bfloat16)}")
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (wt.shape[0],), jnp.float32)

    def native(x):
        return jax.ffi.ffi_call(MATMUL, out, vmap_method="sequential")(x, wt)

    def xla(x):
        return jax.lax.dot_general(x, wt, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jax.lax.platform_dependent(x, cpu=native, default=xla)


F32_PANEL = 32  # outputs per panel of a packed float32 weight


def pack_f32(w: jax.Array) -> jax.Array:
    """w [K, N] float32 ([Din, Dout]) as panels [ceil(N / 32), K, 32] (the last zero-padded), the
    layout `f32_matmul` streams."""
    k, n = w.shape
    tiles = -(-n // F32_PANEL)
    w = jnp.pad(w, ((0, 0), (0, tiles * F32_PANEL - n)))
    return w.reshape(k, tiles, F32_PANEL).transpose(1, 0, 2)


def unpack_f32(panels: jax.Array, n: int) -> jax.Array:
    """`pack_f32`'s inverse: panels [ceil(n / 32), K, 32] -> w [K, n]."""
    tiles, k, width = panels.shape
    return panels.transpose(1, 0, 2).reshape(k, tiles * width)[:, :n]


def f32_matmul(x: jax.Array, panels: jax.Array, n: int) -> jax.Array:
    """x [..., K] float32 times the [K, n] float32 weight packed by `pack_f32`: float32 [..., n].
    The native kernel on CPU; XLA's dot when lowered for another platform."""
    if (x.dtype != jnp.float32 or panels.dtype != jnp.float32 or panels.ndim != 3 or panels.shape[2] != F32_PANEL
            or x.shape[-1] != panels.shape[1] or -(-n // F32_PANEL) != panels.shape[0]):
        raise ValueError(f"f32_matmul: x [..., K] and panels [ceil(n / {F32_PANEL}), K, {F32_PANEL}] in float32 "
                         f"expected, got {x.dtype}{list(x.shape)}, {panels.dtype}{list(panels.shape)}, n={n}")
    if not available(jnp.float32):
        raise RuntimeError(f"the native float32 kernels are unavailable: {unavailable_reason(jnp.float32)}")
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32)

    def native(x):
        return jax.ffi.ffi_call(F32_MATMUL, out, vmap_method="sequential")(x, panels, n=np.int64(n))

    def xla(x):
        return jnp.dot(x, unpack_f32(panels, n), preferred_element_type=jnp.float32)
    return jax.lax.platform_dependent(x, cpu=native, default=xla)


def _bits(pages) -> jax.Array | None:
    """A bf16 page array (or `BitsPages` of bf16) as its uint16 bits; None for any other kind."""
    from jaxinfer.kv.bits import to_storage
    from jaxinfer.kv.cache import BitsPages
    if isinstance(pages, BitsPages):
        return pages.bits if jnp.dtype(pages.dtype) == jnp.bfloat16 else None
    if isinstance(pages, jax.Array) and pages.dtype == jnp.bfloat16:
        return to_storage(pages, jnp.dtype(jnp.uint16))
    return None


def _cache(q: jax.Array, pages) -> jax.Array | None:
    """The cache array the attention kernel reads for queries q: a bf16 cache's uint16 bits for
    bf16 queries, a float32 array for float32 queries; None for any other pairing."""
    if q.dtype == jnp.bfloat16:
        return _bits(pages)
    if q.dtype == jnp.float32 and isinstance(pages, jax.Array) and pages.dtype == jnp.float32:
        return pages
    return None


def attention_applies(q: jax.Array, k_pages, v_pages) -> bool:
    """Whether `attention` takes this call: bf16 queries against a bf16 cache (plain or
    `BitsPages`; not quantized) or float32 against a float32 cache, head dim a multiple of 32 up
    to 256, and the kernels available. Any number of query tokens (decode, verification, prefill)."""
    h = q.shape[-1]
    return (h % 32 == 0 and h <= 256
            and _cache(q, k_pages) is not None and _cache(q, v_pages) is not None and available(q.dtype))


def attention(q: jax.Array, k_pages, v_pages, meta, *, scale: float, sliding_window: int | None = None,
              soft_cap: float | None = None) -> jax.Array:
    """`layers.attention_reference`'s arguments and result (q [B, T, N, H] against a paged
    [P, K, ps, H] or contiguous [B, K, S, H] cache, bf16 or float32 alike), computed by the native
    kernel: one work item per (row, kv head, 32 query tokens), its queries' scores 16 slots at
    a time (AVX512-BF16 dot products, or float32 FMAs), an online softmax, values accumulated in
    float32. The work
    stops at each row's length and starts at its sliding window, whatever the page table's
    width. soft_cap: Gemma 2's capped scores, cap * tanh(score / cap). Padding queries give zeros."""
    b, t, n, h = q.shape
    k, v = _cache(q, k_pages), _cache(q, v_pages)
    table = jnp.arange(b, dtype=jnp.int32)[:, None] if meta.contiguous else meta.page_table.astype(jnp.int32)
    out = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    window = np.int64(sliding_window or 0)
    target = ATTENTION if q.dtype == jnp.bfloat16 else F32_ATTENTION

    def native(q):
        return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
            q, k, v, table, meta.kv_lens.astype(jnp.int32), meta.q_lens.astype(jnp.int32),
            scale=np.float32(scale), window=window, soft_cap=np.float32(soft_cap or 0.0)).astype(q.dtype)

    def xla(q):
        from jaxinfer.layers import attention_reference
        return attention_reference(q, k_pages, v_pages, meta, scale=scale, sliding_window=sliding_window,
                                   soft_cap=soft_cap)
    return jax.lax.platform_dependent(q, cpu=native, default=xla)
