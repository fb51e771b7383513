// jaxinfer's CPU kernels, called from JAX through XLA's FFI (jaxinfer/cpu_kernels.py says why
// they exist and how this file is built):
//
// JaxinferBf16Matmul: y[M, N] = x[M, K] @ w[N, K]^T for bfloat16 x and w, float32 y: the product
// of a few activation rows (decode, verification) with a projection held as Hugging Face's
// Linear stores it (row n = output n's weights).
// JaxinferF32Matmul: y[M, N] = x[M, K] @ w for float32 x and a float32 w [K, N] packed in panels
// of 32 outputs ([N/32, K, 32]), any M.
// JaxinferBf16Attention, JaxinferF32Attention: attention of a few query tokens per row against a
// paged (or contiguous) bfloat16 / float32 KV cache, with an online softmax.
//
// bf16 matmul: each thread takes blocks of outputs. Within a block, four weight rows at a time
// are multiplied against every block of four x rows while they sit in L1 (the weights are read
// from memory once per call, whatever M), with AVX512-BF16's pairwise dot product
// (vdpbf16ps: 32 bf16 products summed into 16 float32 lanes per instruction) and a software
// prefetch of the next four rows. A 4x4 tile's 16 accumulators are summed by one
// transpose-and-add tree, in the order _mm512_reduce_add_ps sums the other tiles' lanes, so a
// row's result does not depend on which tile (hence which batch) it was computed in.
//
// f32 matmul: each thread takes blocks of panels; a panel is one contiguous stream, multiplied
// as outer products (two weight vectors times each row's x[k] broadcast) into up to 12 rows x 2
// accumulators per pass, prefetched 16 KB ahead so the stream and the FMAs overlap. Each output
// sums its K products in order, whatever the tile.
//
// Attention: one work item per (row, kv head, chunk of 32 query tokens: a decode or verify step
// is one chunk, a prefill's chunks share one row out over the threads). Its queries (tokens x
// the heads of the group) go through the visible slots 16 at a time, read from their pages in
// place (one page-table lookup per block, two blocks prefetched ahead); each block's K is read,
// and a bf16 block's V converted, once for all of them. Each query folds its scores into its own
// online softmax and accumulates the values in float32, with the arithmetic it would have alone;
// nothing past the row's length is read. The AVX2 build transposes each block's K once (slot j's dim d at
// kt[d][j]) so that a query's 16 scores are FMAs over d for up to four queries on the same
// loads, with no sums across lanes: verifying 9 tokens costs 1.5x less than lane-summed dot
// products (2 items, 200 slots: 122 -> 87 us; 1 token: 14.4 -> 15.7 us).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

// Two builds, by what -march=native enables: AVX512-BF16 gives all four kernels; AVX2 with FMA
// (no AVX512-BF16) gives the float32 ones on 8-lane vectors (attention's scores as above).
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define JAXINFER_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define JAXINFER_AVX512 0
#else
#error "these kernels need AVX512-BF16, or AVX2 with FMA (compiled with -march=native on a CPU that has them)"
#endif

namespace ffi = xla::ffi;

namespace {

#if JAXINFER_AVX512
// 32 bf16 values from p; past `left` of them (a row's tail), zeros.
inline __m512bh load32(const uint16_t* p, int64_t left) {
  if (left >= 32) return (__m512bh)_mm512_loadu_si512(p);
  return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << left) - 1), p);
}

// The sums of 16 accumulators in one vector: lane 4b + l holds the sum of v[4l + b] (a
// transpose-and-add tree instead of 16 separate horizontal sums).
inline __m512 reduce16(const __m512* v) {
  __m512 t[8], u[4];
  for (int p = 0; p < 8; ++p)  // 128-bit blocks: v[2p]'s halves summed in 0-1, v[2p+1]'s in 2-3
    t[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int q = 0; q < 4; ++q)  // block b of u[q]: v[4q + b], four lanes left
    u[q] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * q], t[2 * q + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(t[2 * q], t[2 * q + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  __m512 s1 = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
  __m512 s2 = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
  __m512d a = _mm512_castps_pd(s1), b = _mm512_castps_pd(s2);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
}

// Accumulators v[i*4 + j] (output i, row j) summed; row j's four sums stored at y + j*ldy.
inline void store_4x4(const __m512* v, float* y, int64_t ldy) {
  __m512 r = reduce16(v);
  for (int j = 0; j < 4; ++j) _mm_storeu_ps(y + j * ldy, _mm512_extractf32x4_ps(r, j));
}

// Outputs n .. n+NT-1 for x rows m .. m+MB-1. PREFETCH: also pull the next NT weight rows
// into L1 (done by the first row block of each group of outputs).
template <int NT, int MB, bool PREFETCH>
inline void tile(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t K, int64_t N) {
  __m512 acc[NT][MB];
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K; c += 32) {
    __m512bh a[NT];
    for (int i = 0; i < NT; ++i) a[i] = load32(w + (n + i) * K + c, K - c);
    if (PREFETCH)
      for (int i = 0; i < NT; ++i) _mm_prefetch((const char*)(w + (n + NT + i) * K + c), _MM_HINT_T0);
    for (int j = 0; j < MB; ++j) {
      __m512bh xb = load32(x + (m + j) * K + c, K - c);
      for (int i = 0; i < NT; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a[i], xb);
    }
  }
  if constexpr (NT == 4 && MB == 4) {
    store_4x4(&acc[0][0], y + m * N + n, N);
  } else {
    for (int i = 0; i < NT; ++i)
      for (int j = 0; j < MB; ++j) y[(m + j) * N + n + i] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

template <int NT>
void all_rows(const uint16_t* x, const uint16_t* w, float* y, int64_t M, int64_t n, int64_t K, int64_t N) {
  int64_t m = 0;
  if (M >= 4) {
    tile<NT, 4, true>(x, w, y, 0, n, K, N);
    for (m = 4; m + 4 <= M; m += 4) tile<NT, 4, false>(x, w, y, m, n, K, N);
  } else if (M >= 2) {
    tile<NT, 2, true>(x, w, y, 0, n, K, N);
    m = 2;
  } else if (M == 1) {
    tile<NT, 1, true>(x, w, y, 0, n, K, N);
    m = 1;
  }
  for (; m + 2 <= M; m += 2) tile<NT, 2, false>(x, w, y, m, n, K, N);
  for (; m < M; ++m) tile<NT, 1, false>(x, w, y, m, n, K, N);
}

void outputs(const uint16_t* x, const uint16_t* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) all_rows<4>(x, w, y, M, n, K, N);
  for (; n < n1; ++n) all_rows<1>(x, w, y, M, n, K, N);
}
#endif  // JAXINFER_AVX512

// Runs fn(i) for every i in [0, n): items handed out to whichever thread asks next, the
// calling thread and up to all of the pool's. The caller works too and then waits only for
// items another thread has already taken, so the call finishes even if a scheduled task never
// gets a thread; shared ownership keeps the state alive for a task that starts late.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct State {
    explicit State(int64_t n, const F& fn) : n(n), fn(fn) {}
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n;
    F fn;
    void run() {
      for (int64_t i; (i = next.fetch_add(1)) < n;) {
        fn(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(n, fn);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, n); ++t) pool.Schedule([state]() { state->run(); });
  state->run();
  while (state->done.load(std::memory_order_acquire) < n) _mm_pause();
}

#if JAXINFER_AVX512
ffi::Error Bf16MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                          ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  auto xd = x.dimensions();
  if (wd.size() != 2 || xd.size() < 1 || xd.back() != wd[1])
    return ffi::Error::InvalidArgument("bf16_matmul: x [..., K] and w [N, K] expected");
  const int64_t K = wd[1], N = wd[0];
  if (K == 0) {  // an empty contraction: zeros
    std::fill(y->typed_data(), y->typed_data() + y->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  const int64_t M = x.element_count() / K;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.typed_data());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_block = (N + 8 * threads - 1) / (8 * threads);  // ~8 blocks of outputs per thread
  const int64_t block = std::max<int64_t>(16, (per_block + 15) / 16 * 16);
  parallel_for(pool, (N + block - 1) / block, [=](int64_t b) {
    outputs(xp, wp, yp, M, K, N, b * block, std::min(N, (b + 1) * block));
  });
  return ffi::Error::Success();
}
#endif  // JAXINFER_AVX512

// ---- float32 matmul: y[M, N] = x[M, K] @ w for a float32 w packed in panels of 32 outputs,
// wp[N/32, K, 32] (`cpu_kernels.pack_f32`; the last panel zero-padded): a panel's weights are
// one contiguous stream. Outer products: for each k, the panel's 32 weights (two vectors) times
// x[r, k] broadcast, accumulated into MR x 2 vectors; each output sums its K products in order
// k = 0, 1, ..., so a row's result does not depend on its batch-mates or on how rows are tiled.
constexpr int64_t kF32Cols = 32;          // outputs per panel
constexpr int64_t kF32PrefetchBytes = 16384;  // how far ahead of its reads the first pass pulls the panel into L1

#if JAXINFER_AVX512
constexpr int64_t kF32PanelRows = 12;  // rows per pass over a panel (24 accumulators of 16 lanes)

// Outputs n .. n+31 (`left` of them real) of MR rows, from one panel.
template <int MR>
inline void f32_tile(const float* x, const float* wp, float* y, int64_t K, int64_t N, int64_t n, int64_t left,
                     bool prefetch) {
  const __mmask16 m0 = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
  const __mmask16 m1 = left >= 32 ? 0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k, wp += kF32Cols) {
    if (prefetch) {
      _mm_prefetch((const char*)wp + kF32PrefetchBytes, _MM_HINT_T0);
      _mm_prefetch((const char*)wp + kF32PrefetchBytes + 64, _MM_HINT_T0);
    }
    const __m512 w0 = _mm512_loadu_ps(wp), w1 = _mm512_loadu_ps(wp + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(y + r * N + n, m0, acc[r][0]);
    _mm512_mask_storeu_ps(y + r * N + n + 16, m1, acc[r][1]);
  }
}
#else
// The first `count` lanes of v to p (all 8 from 8 on, none from 0 down): the padding outputs of a
// panel are not stored. (Stores from registers: a tile's accumulators then never touch the stack.)
inline void store8(float* p, __m256 v, int64_t count) {
  if (count >= 8) {
    _mm256_storeu_ps(p, v);
  } else if (count > 0) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(count)), lanes), v);
  }
}

// AVX2, by the number of rows M:
// - up to 3 (decode): one pass over whole panels (4 vectors a row; the FMAs read the weights from
//   L1), which streams each panel from memory once;
// - 4 to 64 (verification, small batches): passes over half panels, a few rows each, taking turns
//   block by block of k while the block sits in L1 (`f32_half_part`, `f32_rows` says why);
// - more (prefill): passes of up to 6 rows over one half of a panel at a time (12 accumulators,
//   both weight vectors held in registers, as a 6x16 micro-kernel), which keeps the FMAs busy
//   where the weights come from cache: ~0.95x XLA's time from 64 rows up, where whole panels took
//   ~1.2x.
// Each output sums its K products in order on every path, so a row's bits do not depend on which
// path its batch took. The unroll pragmas let GCC keep a tile's accumulators in registers;
// without them GCC 12 stores every accumulator to the stack on every k.
constexpr int64_t kF32PanelRows = 3;         // rows per pass over whole panels (decode)
constexpr int64_t kF32BlockedUpTo = 64;      // more rows than this take the prefill path
constexpr int64_t kF32HalfRows = 6;          // rows per pass over half panels
constexpr int64_t kF32BlockK = 64;           // k per block when passes take turns on a panel (8 KB)

template <int MR>
inline void f32_tile(const float* x, const float* wp, float* y, int64_t K, int64_t N, int64_t n, int64_t left,
                     bool prefetch) {
  __m256 acc[MR][4];
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 16
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k, wp += kF32Cols) {
    if (prefetch) {
      _mm_prefetch((const char*)wp + kF32PrefetchBytes, _MM_HINT_T0);
      _mm_prefetch((const char*)wp + kF32PrefetchBytes + 64, _MM_HINT_T0);
    }
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
      #pragma GCC unroll 16
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(wp + 8 * c), acc[r][c]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 16
    for (int c = 0; c < 4; ++c) store8(y + r * N + n + 8 * c, acc[r][c], left - 8 * c);
}

// Products k0 .. k1-1 of MR rows with half of a panel (wp points at its first weight), added to
// the running sums part[MR][32] (this half's 16 of them: loaded into registers, stored back): the
// prefill path's 6 x 16 micro-kernel below, cut into blocks of k so that the passes of a few rows
// can take turns on a block of the panel while it sits in L1 (`f32_rows`). The pass also
// prefetches `pf_lines` cache lines from pf, one every `pf_step` k.
template <int MR>
inline void f32_half_part(const float* x, const float* wp, float* part, int64_t K, int64_t k0, int64_t k1,
                          const char* pf, int64_t pf_lines, int64_t pf_step) {
  __m256 acc[MR][2];
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = _mm256_loadu_ps(part + r * kF32Cols);
    acc[r][1] = _mm256_loadu_ps(part + r * kF32Cols + 8);
  }
  wp += k0 * kF32Cols;
  int64_t countdown = 0;
  for (int64_t k = k0; k < k1; ++k, wp += kF32Cols) {
    if (pf_lines > 0 && --countdown <= 0) {
      _mm_prefetch(pf, _MM_HINT_T0);
      pf += 64;
      --pf_lines;
      countdown = pf_step;
    }
    __m256 w0 = _mm256_loadu_ps(wp), w1 = _mm256_loadu_ps(wp + 8);
    asm("" : "+x"(w0), "+x"(w1));  // held in registers: GCC would fold them into each FMA
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
      acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(part + r * kF32Cols, acc[r][0]);
    _mm256_storeu_ps(part + r * kF32Cols + 8, acc[r][1]);
  }
}

// Outputs n .. n+15 (`left` of them real, at least 1) of MR rows, from half of a panel (wp points
// at its first weight): `f32_half_part` over all of K at once (the prefill path).
template <int MR>
inline void f32_half_tile(const float* x, const float* wp, float* y, int64_t K, int64_t N, int64_t n,
                          int64_t left) {
  alignas(32) float part[MR * kF32Cols] = {};
  f32_half_part<MR>(x, wp, part, K, 0, K, nullptr, 0, 1);
  for (int r = 0; r < MR; ++r) {
    store8(y + r * N + n, _mm256_load_ps(part + r * kF32Cols), left);
    store8(y + r * N + n + 8, _mm256_load_ps(part + r * kF32Cols + 8), left - 8);
  }
}
#endif

inline void f32_rows(const float* x, const float* wp, float* y, int64_t M, int64_t K, int64_t N, int64_t n,
                     int64_t left) {
#if !JAXINFER_AVX512
  if (M > kF32BlockedUpTo) {
    for (int64_t h = 0; h < kF32Cols && h < left; h += 16)
      for (int64_t r0 = 0; r0 < M; r0 += kF32HalfRows) {
        const float* xr = x + r0 * K;
        float* yr = y + r0 * N;
        switch (std::min(kF32HalfRows, M - r0)) {
          case 1: f32_half_tile<1>(xr, wp + h, yr, K, N, n + h, left - h); break;
          case 2: f32_half_tile<2>(xr, wp + h, yr, K, N, n + h, left - h); break;
          case 3: f32_half_tile<3>(xr, wp + h, yr, K, N, n + h, left - h); break;
          case 4: f32_half_tile<4>(xr, wp + h, yr, K, N, n + h, left - h); break;
          case 5: f32_half_tile<5>(xr, wp + h, yr, K, N, n + h, left - h); break;
          default: f32_half_tile<6>(xr, wp + h, yr, K, N, n + h, left - h); break;
        }
      }
    return;
  }
  if (M > kF32PanelRows) {
    // 4 to 64 rows: passes over half panels and groups of up to 6 rows, as even as they split
    // (a Zen 3 core, the block in L2: 3 / 4 / 5 / 6 rows at 63 / 77 / 86 / 88 GFLOP/s), take turns
    // block by block of k, the block sitting in L1, and share out the prefetches of the block
    // kF32PrefetchBytes ahead. The weight stream overlaps every pass's FMAs, where whole-panel
    // passes of 3 rows overlapped it with the first pass's only (two cores, the embedded target's
    // products at 9 rows: ~1.35x less time; 33 to 64 rows, which took the prefill path: 1.07x to
    // 1.3x). Each output still sums its K products in order.
    const int64_t groups = (M + kF32HalfRows - 1) / kF32HalfRows, per = (M + groups - 1) / groups;
    const int64_t passes = 2 * groups;
    alignas(32) float part[kF32BlockedUpTo * kF32Cols];
    std::fill(part, part + M * kF32Cols, 0.0f);
    for (int64_t k0 = 0; k0 < K; k0 += kF32BlockK) {
      const int64_t k1 = std::min(K, k0 + kF32BlockK);
      const char* pf = (const char*)(wp + k0 * kF32Cols) + kF32PrefetchBytes;
      const int64_t lines = 2 * (k1 - k0), share = (lines + passes - 1) / passes;
      const int64_t step = std::max<int64_t>(1, (k1 - k0) / share);
      int64_t pass = 0;
      for (int64_t r0 = 0; r0 < M; r0 += per) {
        const float* xr = x + r0 * K;
        for (int64_t h = 0; h < kF32Cols; h += 16, ++pass) {
          const float* wh = wp + h;
          float* ph = part + r0 * kF32Cols + h;
          const char* ppf = pf + pass * share * 64;
          const int64_t pl = std::max<int64_t>(0, std::min(share, lines - pass * share));
          switch (std::min(per, M - r0)) {
            case 1: f32_half_part<1>(xr, wh, ph, K, k0, k1, ppf, pl, step); break;
            case 2: f32_half_part<2>(xr, wh, ph, K, k0, k1, ppf, pl, step); break;
            case 3: f32_half_part<3>(xr, wh, ph, K, k0, k1, ppf, pl, step); break;
            case 4: f32_half_part<4>(xr, wh, ph, K, k0, k1, ppf, pl, step); break;
            case 5: f32_half_part<5>(xr, wh, ph, K, k0, k1, ppf, pl, step); break;
            default: f32_half_part<6>(xr, wh, ph, K, k0, k1, ppf, pl, step); break;
          }
        }
      }
    }
    for (int64_t r = 0; r < M; ++r)
      for (int c = 0; c < 4; ++c)
        store8(y + r * N + n + 8 * c, _mm256_load_ps(part + r * kF32Cols + 8 * c), left - 8 * c);
    return;
  }
#endif
  for (int64_t r0 = 0; r0 < M; r0 += kF32PanelRows) {
    const int64_t mr = std::min(kF32PanelRows, M - r0);
    const float* xr = x + r0 * K;
    float* yr = y + r0 * N;
    const bool pf = r0 == 0;  // later passes find the panel in cache
    switch (mr) {
      case 1: f32_tile<1>(xr, wp, yr, K, N, n, left, pf); break;
      case 2: f32_tile<2>(xr, wp, yr, K, N, n, left, pf); break;
#if JAXINFER_AVX512
      case 3: f32_tile<3>(xr, wp, yr, K, N, n, left, pf); break;
      case 4: f32_tile<4>(xr, wp, yr, K, N, n, left, pf); break;
      case 5: f32_tile<5>(xr, wp, yr, K, N, n, left, pf); break;
      case 6: f32_tile<6>(xr, wp, yr, K, N, n, left, pf); break;
      case 7: f32_tile<7>(xr, wp, yr, K, N, n, left, pf); break;
      case 8: f32_tile<8>(xr, wp, yr, K, N, n, left, pf); break;
      case 9: f32_tile<9>(xr, wp, yr, K, N, n, left, pf); break;
      case 10: f32_tile<10>(xr, wp, yr, K, N, n, left, pf); break;
      case 11: f32_tile<11>(xr, wp, yr, K, N, n, left, pf); break;
#endif
      default: f32_tile<kF32PanelRows>(xr, wp, yr, K, N, n, left, pf); break;
    }
  }
}

ffi::Error F32MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, int64_t N,
                         ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  auto xd = x.dimensions();
  if (wd.size() != 3 || wd[2] != kF32Cols || xd.size() < 1 || xd.back() != wd[1] || N > wd[0] * kF32Cols ||
      N <= (wd[0] - 1) * kF32Cols)
    return ffi::Error::InvalidArgument("f32_matmul: x [..., K] and panels [ceil(N / 32), K, 32] expected");
  const int64_t K = wd[1], tiles = wd[0];
  if (K == 0) {
    std::fill(y->typed_data(), y->typed_data() + y->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  const int64_t M = x.element_count() / K;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per = std::max<int64_t>(1, (tiles + 4 * threads - 1) / (4 * threads));  // ~4 blocks a thread
  parallel_for(pool, (tiles + per - 1) / per, [=](int64_t b) {
    for (int64_t t = b * per; t < std::min(tiles, (b + 1) * per); ++t) {
      const int64_t n = t * kF32Cols;
      f32_rows(xp, wp + t * K * kF32Cols, yp, M, K, N, n, N - n);
    }
  });
  return ffi::Error::Success();
}

// e^x for 16 (AVX-512) or 8 (AVX2) lanes: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6
// Taylor polynomial (relative error ~2e-7), times 2^n. Inputs below -87 give ~1e-38 (callers mask
// such lanes).
template <typename V, typename Ops>
inline V exp_lanes(V x) {
  x = Ops::min(Ops::max(x, Ops::set1(-87.0f)), Ops::set1(88.0f));
  const V n = Ops::round(Ops::mul(x, Ops::set1(1.44269504f)));
  V r = Ops::fnmadd(n, Ops::set1(0.693359375f), x);
  r = Ops::fnmadd(n, Ops::set1(-2.12194440e-4f), r);
  V p = Ops::set1(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = Ops::fmadd(p, r, Ops::set1(c));
  return Ops::scale2(p, n);
}

// cap * tanh(s / cap) for every lane (attention logit soft-capping, Gemma 2), as
// cap * (1 - 2 / (e^(2s/cap) + 1)) on exp_lanes: absolute error ~1e-6 of cap, and +-cap where
// |s| is large (exp_lanes' clamp), so a masked lane comes out finite: callers mask after.
template <typename V, typename Ops>
inline V soft_cap_lanes(V s, float cap) {
  const V one = Ops::set1(1.0f);
  const V e = exp_lanes<V, Ops>(Ops::mul(s, Ops::set1(2.0f / cap)));
  return Ops::mul(Ops::set1(cap), Ops::fnmadd(Ops::set1(2.0f), Ops::div(one, Ops::add(e, one)), one));
}

#if JAXINFER_AVX512
struct Ops16 {
  static __m512 set1(float v) { return _mm512_set1_ps(v); }
  static __m512 min(__m512 a, __m512 b) { return _mm512_min_ps(a, b); }
  static __m512 max(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
  static __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
  static __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
  static __m512 div(__m512 a, __m512 b) { return _mm512_div_ps(a, b); }
  static __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
  static __m512 fnmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fnmadd_ps(a, b, c); }
  static __m512 round(__m512 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static __m512 scale2(__m512 p, __m512 n) { return _mm512_scalef_ps(p, n); }
};
inline __m512 exp16(__m512 x) { return exp_lanes<__m512, Ops16>(x); }
#else
struct Ops8 {
  static __m256 set1(float v) { return _mm256_set1_ps(v); }
  static __m256 min(__m256 a, __m256 b) { return _mm256_min_ps(a, b); }
  static __m256 max(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
  static __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
  static __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
  static __m256 div(__m256 a, __m256 b) { return _mm256_div_ps(a, b); }
  static __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
  static __m256 fnmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fnmadd_ps(a, b, c); }
  static __m256 round(__m256 a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n for integral n in [-126, 127] (x's clamp keeps it there): n + 127 as an exponent field
  static __m256 scale2(__m256 p, __m256 n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
};
inline __m256 exp8(__m256 x) { return exp_lanes<__m256, Ops8>(x); }

// The sum of a vector's 8 lanes.
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The largest of a vector's 8 lanes.
inline float max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

constexpr int kMaxHeadDim = 256;
constexpr int64_t kPrefetchSlots = 32;  // how far ahead of its block a query pulls K and V into L1
constexpr int64_t kAttentionChunk = 32;  // query tokens per work item (a prefill's rows split over the threads)

// Attention over a cache of E: uint16_t (bfloat16 bits; bf16 queries, vdpbf16ps scores, values
// converted to float32 once per block; AVX-512 build only) or float (float32 queries, cache and
// arithmetic).
template <typename E>
struct Attention {
  static constexpr bool kF32 = std::is_same_v<E, float>;
  static_assert(kF32 || JAXINFER_AVX512, "bf16 attention needs the AVX-512 build");
  const E* q;  // [B, T, N, H]
  const E* k;  // [P, KH, ps, H]
  const E* v;
  const int32_t* page_table;  // [B, PP]
  const int32_t* kv_lens;     // [B]
  const int32_t* q_lens;      // [B]
  float* out;                 // [B, T, N, H]
  int64_t B, T, N, KH, H, ps, PP, window;
  float scale;
  float soft_cap;  // > 0: scores -> soft_cap * tanh(scores / soft_cap) (Gemma 2); 0: none

  const E* slot(const E* pages, int64_t b, int64_t kh, int64_t s) const {
    const int64_t page = page_table[b * PP + s / ps];
    return pages + ((page * KH + kh) * ps + s % ps) * H;
  }

  // Pointers to row b's slots s0 .. s0+15 of kv head kh in `pages` (s0 a multiple of 16);
  // nullptr for the slots outside [lo, hi). One page-table lookup per page the block touches
  // (one division per block, whatever the page size).
  void block(const E* pages, int64_t b, int64_t kh, int64_t s0, int64_t lo, int64_t hi, const E** p) const {
    const int64_t from = std::max(s0, lo), to = std::min(s0 + 16, hi);
    for (int64_t s = s0; s < std::min(from, s0 + 16); ++s) p[s - s0] = nullptr;
    for (int64_t s = std::max(to, s0); s < s0 + 16; ++s) p[s - s0] = nullptr;
    if (from >= to) return;
    int64_t page = from / ps, off = from % ps;
    const E* base = slot(pages, b, kh, from) - off * H;  // the page's slot 0
    for (int64_t s = from; s < to; ++s, ++off) {
      if (off == ps) base = slot(pages, b, kh, ++page * ps), off = 0;
      p[s - s0] = base + off * H;
    }
  }

  // Query head g of row b's token t.
  const E* query(int64_t b, int64_t t, int64_t g) const { return q + ((b * T + t) * N + g) * H; }

  // The factor a query's running sum and accumulator are scaled by when its running max goes from
  // m_old to m_new: 0 for the first block (m_old = -inf); the exp call (which spills every vector
  // register) only when the max grows.
  static float rescale(float m_old, float m_new) {
    return m_new == m_old ? 1.0f : m_old == -INFINITY ? 0.0f : std::exp(m_old - m_new);
  }

#if JAXINFER_AVX512
  // The 16 scores of one query against slots kp (those not in `valid` left at 0), in lanes 0..15.
  template <int HC>
  static __m512 scores(const E* qp, const E* const* kp, __mmask16 valid) {
    __m512 dots[16];  // dots[4l + b] holds slot 4b + l, so reduce16 puts slot j in lane j
    if constexpr (kF32) {
      __m512 qv[2 * HC];
      for (int c = 0; c < 2 * HC; ++c) qv[c] = _mm512_loadu_ps(qp + c * 16);
      for (int d = 0; d < 16; ++d) {
        const int j = 4 * (d % 4) + d / 4;
        __m512 x = _mm512_setzero_ps();
        if (valid >> j & 1)
          for (int c = 0; c < 2 * HC; ++c) x = _mm512_fmadd_ps(_mm512_loadu_ps(kp[j] + c * 16), qv[c], x);
        dots[d] = x;
      }
    } else {
      __m512bh qv[HC];
      for (int c = 0; c < HC; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(qp + c * 32);
      for (int d = 0; d < 16; ++d) {
        const int j = 4 * (d % 4) + d / 4;
        __m512 x = _mm512_setzero_ps();
        if (valid >> j & 1)
          for (int c = 0; c < HC; ++c) x = _mm512_dpbf16_ps(x, (__m512bh)_mm512_loadu_si512(kp[j] + c * 32), qv[c]);
        dots[d] = x;
      }
    }
    return reduce16(dots);
  }

  // Folds one block (slots kp, values vrow, `valid` of them visible) into the online softmax of
  // the gc (<= 4) queries of token t0 + t's heads g0 .. g0+gc-1 (t: its index in the item's
  // state; the heads within kv head kh's group): their scores, the new running maxima and sums,
  // and the values accumulated into acc, the gc heads together.
  template <int HC>
  void fold(int64_t b, int64_t kh, int64_t t0, int64_t t, int64_t g0, int64_t gc, int64_t groups, const E* const* kp,
            const float* const* vrow, uint32_t valid, float* m, float* l, float* acc) const {
    constexpr int64_t HD = 32 * HC;
    alignas(64) float pj[4][16];
    float alpha[4];
    for (int64_t gi = 0; gi < gc; ++gi) {
      const int64_t i = t * groups + g0 + gi;
      const E* qp = query(b, t0 + t, kh * groups + g0 + gi);
      __m512 raw = _mm512_mul_ps(scores<HC>(qp, kp, (__mmask16)valid), _mm512_set1_ps(scale));
      if (soft_cap > 0) raw = soft_cap_lanes<__m512, Ops16>(raw, soft_cap);
      const __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), (__mmask16)valid, raw);
      const float m_new = std::max(m[i], _mm512_reduce_max_ps(sc));
      alpha[gi] = rescale(m[i], m_new);
      const __m512 p = _mm512_maskz_mov_ps((__mmask16)valid, exp16(_mm512_sub_ps(sc, _mm512_set1_ps(m_new))));
      l[i] = l[i] * alpha[gi] + _mm512_reduce_add_ps(p);
      m[i] = m_new;
      _mm512_store_ps(pj[gi], p);
    }
    float* o = acc + (t * groups + g0) * HD;
    __m512 r[4][2 * HC];
    for (int gi = 0; gi < 4; ++gi)
      if (gi < gc)
        for (int c = 0; c < 2 * HC; ++c)
          r[gi][c] = _mm512_mul_ps(_mm512_loadu_ps(o + gi * HD + c * 16), _mm512_set1_ps(alpha[gi]));
    for (int j = 0; j < 16; ++j) {
      if (!(valid >> j & 1)) continue;
      __m512 w[4];
      for (int gi = 0; gi < 4; ++gi) w[gi] = _mm512_set1_ps(gi < gc ? pj[gi][j] : 0.0f);
      for (int c = 0; c < 2 * HC; ++c) {
        const __m512 x = _mm512_loadu_ps(vrow[j] + c * 16);
        for (int gi = 0; gi < 4; ++gi)
          if (gi < gc) r[gi][c] = _mm512_fmadd_ps(w[gi], x, r[gi][c]);
      }
    }
    for (int gi = 0; gi < 4; ++gi)
      if (gi < gc)
        for (int c = 0; c < 2 * HC; ++c) _mm512_storeu_ps(o + gi * HD + c * 16, r[gi][c]);
  }
#else
  // AVX2. A block's K is transposed once (kt[d][j]: slot j's dim d; zeros for slots outside the
  // item's range) for all the queries that see it. A query's 16 scores are then two vectors of
  // FMAs over d, q[d] broadcast, with no sums across lanes, for up to four queries on the same
  // loads. Each query updates its own online softmax, and queries that see the same slots of the
  // block accumulate their values four at a time (independent FMA chains).
  static void transpose8(__m256* r) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20), r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20), r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20), r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20), r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
  }

  template <int HD>
  static void transpose_block(const float* const* kp, float* kt) {
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < HD; c += 8) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) r[j] = kp[8 * h + j] ? _mm256_loadu_ps(kp[8 * h + j] + c) : _mm256_setzero_ps();
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_store_ps(kt + (c + i) * 16 + 8 * h, r[i]);
      }
  }

  // sc[qi][j] = scale * (query qi . slot j) for QC queries: one FMA chain per query and lane, in
  // order of d, whichever queries share the call.
  template <int HD, int QC>
  static void scores(const float* const* qp, const float* kt, float scale, float* sc) {
    __m256 a[QC][2];
    for (int qi = 0; qi < QC; ++qi) a[qi][0] = a[qi][1] = _mm256_setzero_ps();
    for (int d = 0; d < HD; ++d) {
      const __m256 k0 = _mm256_load_ps(kt + d * 16), k1 = _mm256_load_ps(kt + d * 16 + 8);
      for (int qi = 0; qi < QC; ++qi) {
        const __m256 x = _mm256_broadcast_ss(qp[qi] + d);
        a[qi][0] = _mm256_fmadd_ps(x, k0, a[qi][0]);
        a[qi][1] = _mm256_fmadd_ps(x, k1, a[qi][1]);
      }
    }
    for (int qi = 0; qi < QC; ++qi) {
      _mm256_storeu_ps(sc + qi * 16, _mm256_mul_ps(a[qi][0], _mm256_set1_ps(scale)));
      _mm256_storeu_ps(sc + qi * 16 + 8, _mm256_mul_ps(a[qi][1], _mm256_set1_ps(scale)));
    }
  }

  // sc[j] = scale * (query . slot j) as one dot product per slot (two FMA chains, summed across
  // lanes), 0 for absent slots: the scores where a kv head serves a single query head (MHA), so a
  // decode step has one query per block and transposing the block would cost more than it saves
  // (1 token, 8 kv heads x 144 slots: ~1.3x the time). A kernel picks by the model's group size
  // alone, so a token's scores do not depend on the call's width.
  template <int HD>
  static void scores_direct(const float* qp, const float* const* kp, float scale, float* sc) {
    for (int j = 0; j < 16; ++j) {
      if (!kp[j]) {
        sc[j] = 0.0f;
        continue;
      }
      __m256 x0 = _mm256_setzero_ps(), x1 = _mm256_setzero_ps();
      for (int c = 0; c < HD; c += 16) {
        x0 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[j] + c), _mm256_loadu_ps(qp + c), x0);
        x1 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[j] + c + 8), _mm256_loadu_ps(qp + c + 8), x1);
      }
      sc[j] = sum8(_mm256_add_ps(x0, x1)) * scale;
    }
  }

  // One query's online softmax over a block: its scores sc[16] become probabilities (0 outside
  // `valid`), its running max m and sum l move on; returns the factor its accumulator is scaled by.
  float softmax_step(float* sc, uint32_t valid, float& m, float& l) const {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256 s[2], keep[2];
    for (int h = 0; h < 2; ++h) {
      s[h] = _mm256_loadu_ps(sc + 8 * h);
      if (soft_cap > 0) s[h] = soft_cap_lanes<__m256, Ops8>(s[h], soft_cap);
      const __m256i lanes = _mm256_and_si256(_mm256_set1_epi32(int(valid >> (8 * h))), bit);
      keep[h] = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lanes, bit));
      s[h] = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), s[h], keep[h]);
    }
    const float m_new = std::max(m, max8(_mm256_max_ps(s[0], s[1])));
    const float alpha = rescale(m, m_new);
    __m256 total = _mm256_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      const __m256 p = _mm256_and_ps(exp8(_mm256_sub_ps(s[h], _mm256_set1_ps(m_new))), keep[h]);
      _mm256_storeu_ps(sc + 8 * h, p);
      total = _mm256_add_ps(total, p);
    }
    l = l * alpha + sum8(total);
    m = m_new;
    return alpha;
  }

  // o[qi] = o[qi] * alpha[qi] + sum over slots j in [from, to) of p[qi][j] * vrow[j] for QC
  // queries (accumulators HD apart, probabilities 16 apart), CW vectors of each at a time.
  template <int HD, int QC, int CW>
  static void accumulate(float* o, const float* alpha, const float* p, const float* const* vrow, int from, int to) {
    for (int c0 = 0; c0 < HD / 8; c0 += CW) {
      __m256 r[QC][CW];
      for (int qi = 0; qi < QC; ++qi)
        for (int c = 0; c < CW; ++c)
          r[qi][c] = _mm256_mul_ps(_mm256_loadu_ps(o + qi * HD + (c0 + c) * 8), _mm256_set1_ps(alpha[qi]));
      for (int j = from; j < to; ++j) {
        __m256 x[CW];
        for (int c = 0; c < CW; ++c) x[c] = _mm256_loadu_ps(vrow[j] + (c0 + c) * 8);
        for (int qi = 0; qi < QC; ++qi) {
          const __m256 w = _mm256_broadcast_ss(p + qi * 16 + j);
          for (int c = 0; c < CW; ++c) r[qi][c] = _mm256_fmadd_ps(w, x[c], r[qi][c]);
        }
      }
      for (int qi = 0; qi < QC; ++qi)
        for (int c = 0; c < CW; ++c) _mm256_storeu_ps(o + qi * HD + (c0 + c) * 8, r[qi][c]);
    }
  }

  // Folds the block at slot s0 into every query of the item (row b, kv head kh, tokens t0 ..
  // t0 + nt - 1) that sees part of it (query i = t * groups + g: token t0 + t, head g of the
  // group). scratch: 16 floats and three int32 per query (its scores, then probabilities; its
  // index; the slots [from, to) of the block it sees).
  template <int HC>
  void fold_block(int64_t b, int64_t kh, int64_t groups, int64_t t0, int64_t nt, int64_t s0, const float* const* kp,
                  const float* const* vrow, const int64_t* lo, const int64_t* hi, float* m, float* l, float* acc,
                  float* scratch) const {
    constexpr int HD = 32 * HC;
    const bool direct = groups == 1;  // MHA: scores_direct
    alignas(32) float kt[HD * 16];
    if (!direct) transpose_block<HD>(kp, kt);
    float* sc = scratch;
    int32_t* seen = reinterpret_cast<int32_t*>(scratch + 16 * nt * groups);  // i, from, to per query
    int64_t nq = 0;
    for (int64_t t = 0; t < nt; ++t) {
      if (hi[t] <= lo[t] || s0 < lo[t] / 16 * 16 || s0 >= hi[t]) continue;
      const int32_t from = int32_t(std::max<int64_t>(lo[t] - s0, 0)), to = int32_t(std::min<int64_t>(hi[t] - s0, 16));
      for (int64_t g = 0; g < groups; ++g, ++nq)
        seen[3 * nq] = int32_t(t * groups + g), seen[3 * nq + 1] = from, seen[3 * nq + 2] = to;
    }
    for (int64_t c = 0; direct && c < nq; ++c)
      scores_direct<HD>(query(b, t0 + seen[3 * c], kh), kp, scale, sc + c * 16);
    for (int64_t c = 0; !direct && c < nq; c += 4) {
      const float* qp[4];
      const int64_t qc = std::min<int64_t>(4, nq - c);
      for (int64_t qi = 0; qi < qc; ++qi) {
        const int64_t i = seen[3 * (c + qi)];
        qp[qi] = query(b, t0 + i / groups, kh * groups + i % groups);
      }
      switch (qc) {
        case 1: scores<HD, 1>(qp, kt, scale, sc + c * 16); break;
        case 2: scores<HD, 2>(qp, kt, scale, sc + c * 16); break;
        case 3: scores<HD, 3>(qp, kt, scale, sc + c * 16); break;
        default: scores<HD, 4>(qp, kt, scale, sc + c * 16); break;
      }
    }
    for (int64_t c = 0; c < nq;) {
      const int32_t i = seen[3 * c], from = seen[3 * c + 1], to = seen[3 * c + 2];
      int64_t qc = 1;  // a run of up to four consecutive queries that see the same slots
      while (qc < 4 && c + qc < nq && seen[3 * (c + qc)] == i + qc && seen[3 * (c + qc) + 1] == from &&
             seen[3 * (c + qc) + 2] == to)
        ++qc;
      const uint32_t valid = ((1u << to) - 1) & ~((1u << from) - 1);
      float alpha[4];
      for (int64_t qi = 0; qi < qc; ++qi) alpha[qi] = softmax_step(sc + (c + qi) * 16, valid, m[i + qi], l[i + qi]);
      float* o = acc + i * HD;
      const float* p = sc + c * 16;
      switch (qc) {  // at least four independent FMA chains
        case 1: accumulate<HD, 1, 4>(o, alpha, p, vrow, from, to); break;
        case 2: accumulate<HD, 2, 4>(o, alpha, p, vrow, from, to); break;
        case 3: accumulate<HD, 3, 2>(o, alpha, p, vrow, from, to); break;
        default: accumulate<HD, 4, 2>(o, alpha, p, vrow, from, to); break;
      }
      c += qc;
    }
  }
#endif

  // All queries of row b's tokens t0 .. t1-1 that read kv head kh (x the heads of its group), 16 slots
  // at a time: each block's K is read (and a bf16 block's V converted to float32) once for all
  // of them, and up to four heads of a token accumulate their values together (independent FMA
  // chains). Each query keeps its own online softmax (running max m, sum l, accumulator) and
  // sees exactly the blocks and the arithmetic it would see alone, so its result depends neither
  // on how many tokens the call verifies or prefills, nor on its chunk, nor on its batch-mates.
  // HC: the head dim in 32s.
  template <int HC>
  void item(int64_t b, int64_t kh, int64_t t0, int64_t t1, int64_t groups) const {
    constexpr int64_t HD = 32 * HC;
    const int64_t q_len = q_lens[b], kv_len = kv_lens[b], nt = t1 - t0;
    // Per-thread scratch, reused across items and calls (no allocation per item in a decode step):
    // token t0 + t sees slots [lo[t], hi[t]); query i's running max m[i], sum l[i], accumulator acc[i].
    thread_local std::vector<int64_t> bounds;
    thread_local std::vector<float> state;
    bounds.resize(2 * nt);
    state.assign(nt * groups * (2 + HD), 0.0f);
#if !JAXINFER_AVX512
    thread_local std::vector<float> scratch;  // fold_block's: 16 floats and three int32 per query
    scratch.resize(nt * groups * (16 + 3));
#endif
    int64_t* lo = bounds.data();
    int64_t* hi = lo + nt;
    float* m = state.data();
    float* l = m + nt * groups;
    float* acc = l + nt * groups;
    std::fill(m, m + nt * groups, -INFINITY);
    int64_t first = kv_len, last = 0;  // the slots any query sees
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t pos = kv_len - q_len + t0 + t;
      hi[t] = std::min(kv_len, pos + 1);
      lo[t] = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      if (t0 + t >= q_len || hi[t] <= lo[t]) lo[t] = hi[t] = 0;  // a padding query, or nothing visible: zeros
      if (hi[t] > lo[t]) first = std::min(first, lo[t]), last = std::max(last, hi[t]);
    }
    [[maybe_unused]] alignas(64) float vf[kF32 ? 1 : 16 * HD];
    for (int64_t s0 = first / 16 * 16; s0 < last; s0 += 16) {
      const E *kp[16], *vp[16], *k_ahead[16], *v_ahead[16];
      block(k, b, kh, s0, first, last, kp);
      block(v, b, kh, s0, first, last, vp);
      if (s0 + kPrefetchSlots < last) {
        block(k, b, kh, s0 + kPrefetchSlots, first, last, k_ahead);
        block(v, b, kh, s0 + kPrefetchSlots, first, last, v_ahead);
        for (int j = 0; j < 16; ++j)
          if (k_ahead[j]) {
            const char* kn = reinterpret_cast<const char*>(k_ahead[j]);
            const char* vn = reinterpret_cast<const char*>(v_ahead[j]);
            for (int64_t line = 0; line < HD * int64_t(sizeof(E)); line += 64) {
              _mm_prefetch(kn + line, _MM_HINT_T0);
              _mm_prefetch(vn + line, _MM_HINT_T0);
            }
          }
      }
      const float* vrow[16];  // slot j's values in float32
      for (int j = 0; j < 16; ++j) {
        if constexpr (kF32) {
          vrow[j] = vp[j];
        } else {
#if JAXINFER_AVX512
          vrow[j] = vf + j * HD;
          if (vp[j])
            for (int c = 0; c < 2 * HC; ++c)
              _mm512_store_ps(vf + j * HD + c * 16,
                              _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i*)(vp[j] + c * 16))));
#endif
        }
      }
#if JAXINFER_AVX512
      for (int64_t t = 0; t < nt; ++t) {
        if (hi[t] <= lo[t] || s0 < lo[t] / 16 * 16 || s0 >= hi[t]) continue;
        const int64_t from = std::max<int64_t>(lo[t] - s0, 0), to = std::min<int64_t>(hi[t] - s0, 16);
        const uint32_t valid = ((1u << to) - 1) & ~((1u << from) - 1);  // slots s0 + [from, to)
        for (int64_t g0 = 0; g0 < groups; g0 += 4)
          fold<HC>(b, kh, t0, t, g0, std::min<int64_t>(4, groups - g0), groups, kp, vrow, valid, m, l, acc);
      }
#else
      fold_block<HC>(b, kh, groups, t0, nt, s0, kp, vrow, lo, hi, m, l, acc, scratch.data());
#endif
    }
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = t * groups + g;
        float* o = out + ((b * T + t0 + t) * N + kh * groups + g) * HD;
        if (hi[t] <= lo[t]) {
          std::fill(o, o + HD, 0.0f);
          continue;
        }
        const float inv = 1.0f / l[i];
        for (int64_t d = 0; d < HD; ++d) o[d] = acc[i * HD + d] * inv;
      }
  }

  void item(int64_t b, int64_t kh, int64_t t0, int64_t t1, int64_t groups) const {
    switch (H / 32) {
      case 1: return item<1>(b, kh, t0, t1, groups);
      case 2: return item<2>(b, kh, t0, t1, groups);
      case 3: return item<3>(b, kh, t0, t1, groups);
      case 4: return item<4>(b, kh, t0, t1, groups);
      case 5: return item<5>(b, kh, t0, t1, groups);
      case 6: return item<6>(b, kh, t0, t1, groups);
      case 7: return item<7>(b, kh, t0, t1, groups);
      default: return item<8>(b, kh, t0, t1, groups);  // H <= kMaxHeadDim, checked by the caller
    }
  }
};

template <typename E, typename QBuffer, typename KVBuffer>
ffi::Error AttentionImpl(ffi::ThreadPool& pool, const QBuffer& q, const KVBuffer& k, const KVBuffer& v,
                         ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> kv_lens,
                         ffi::Buffer<ffi::S32> q_lens, float scale, int64_t window, float soft_cap,
                         ffi::ResultBuffer<ffi::F32>& out) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto pd = page_table.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || pd.size() != 2 || kd[3] != qd[3] || pd[0] != qd[0] ||
      qd[2] % kd[1] != 0 || qd[3] % 32 != 0 || qd[3] > kMaxHeadDim)
    return ffi::Error::InvalidArgument(
        "attention: q [B, T, N, H], pages [P, K, ps, H] (N a multiple of K, H a multiple of 32 up to 256), "
        "page_table [B, PP] expected");
  Attention<E> a{reinterpret_cast<const E*>(q.typed_data()), reinterpret_cast<const E*>(k.typed_data()),
                 reinterpret_cast<const E*>(v.typed_data()), page_table.typed_data(), kv_lens.typed_data(),
                 q_lens.typed_data(), out->typed_data(), qd[0], qd[1], qd[2], kd[1], qd[3], kd[2], pd[1], window,
                 scale, soft_cap};
  const int64_t groups = a.N / a.KH;
  // One item per (row, kv head, chunk of kAttentionChunk tokens): its queries share the kv head's
  // slots, read while in cache. A decode or verify step is one chunk; a prefill's chunks spread a
  // single row over every thread, the last (which see the most slots) handed out first.
  const int64_t chunks = (a.T + kAttentionChunk - 1) / kAttentionChunk, rows = a.B * a.KH;
  parallel_for(pool, rows * chunks, [&a, groups, chunks, rows](int64_t item) {
    const int64_t c = chunks - 1 - item / rows, r = item % rows, t0 = c * kAttentionChunk;
    a.item(r / a.KH, r % a.KH, t0, std::min(a.T, t0 + kAttentionChunk), groups);
  });
  return ffi::Error::Success();
}

#if JAXINFER_AVX512
ffi::Error Bf16AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::U16> k,
                             ffi::Buffer<ffi::U16> v, ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> kv_lens,
                             ffi::Buffer<ffi::S32> q_lens, float scale, int64_t window, float soft_cap,
                             ffi::ResultBuffer<ffi::F32> out) {
  return AttentionImpl<uint16_t>(pool, q, k, v, page_table, kv_lens, q_lens, scale, window, soft_cap, out);
}

#endif  // JAXINFER_AVX512

ffi::Error F32AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> kv_lens,
                            ffi::Buffer<ffi::S32> q_lens, float scale, int64_t window, float soft_cap,
                            ffi::ResultBuffer<ffi::F32> out) {
  return AttentionImpl<float>(pool, q, k, v, page_table, kv_lens, q_lens, scale, window, soft_cap, out);
}

}  // namespace

#if JAXINFER_AVX512  // the bf16 kernels
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferBf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
#endif

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferF32Matmul, F32MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n")
                                  .Ret<ffi::Buffer<ffi::F32>>());

// q, k, v, page_table, kv_lens, q_lens; scale, window, soft_cap (0: none).
template <ffi::DataType Q, ffi::DataType KV>
auto AttentionBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<Q>>()
      .template Arg<ffi::Buffer<KV>>()
      .template Arg<ffi::Buffer<KV>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Attr<float>("scale")
      .template Attr<int64_t>("window")
      .template Attr<float>("soft_cap")
      .template Ret<ffi::Buffer<ffi::F32>>();
}

#if JAXINFER_AVX512
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferBf16Attention, Bf16AttentionImpl, (AttentionBinding<ffi::BF16, ffi::U16>()));
#endif
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferF32Attention, F32AttentionImpl, (AttentionBinding<ffi::F32, ffi::F32>()));
