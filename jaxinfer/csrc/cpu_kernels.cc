// jaxinfer's CPU kernels, called from JAX through XLA's FFI (jaxinfer/cpu_kernels.py says why
// they exist and how this file is built):
//
// JaxinferBf16Matmul: y[M, N] = x[M, K] @ w[N, K]^T for bfloat16 x and w, float32 y: the product
// of a few activation rows (decode, verification) with a projection held as Hugging Face's
// Linear stores it (row n = output n's weights).
// JaxinferBf16Attention: attention of a few query tokens per row against a paged (or
// contiguous) bfloat16 KV cache, with an online softmax.
//
// Matmul: each thread takes blocks of outputs. Within a block, four weight rows at a time are
// multiplied against every block of four x rows while they sit in L1 (the weights are read
// from memory once per call, whatever M), with AVX512-BF16's pairwise dot product
// (vdpbf16ps: 32 bf16 products summed into 16 float32 lanes per instruction) and a software
// prefetch of the next four rows. A 4x4 tile's 16 accumulators are summed by one
// transpose-and-add tree, in the order _mm512_reduce_add_ps sums the other tiles' lanes, so a
// row's result does not depend on which tile (hence which batch) it was computed in.
//
// Attention: one work item per (row, kv head). Each of its queries scores its visible slots 16
// at a time, read from their pages in place (two blocks prefetched ahead), folds them into an
// online softmax and accumulates the values in float32; nothing past the row's length is read.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

#if !defined(__AVX512BF16__) || !defined(__AVX512F__) || !defined(__AVX512BW__)
#error "these kernels need AVX512-BF16 (compiled with -march=native on a CPU that has it)"
#endif

namespace ffi = xla::ffi;

namespace {

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

// e^x for 16 lanes: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial
// (relative error ~2e-7), times 2^n. Inputs below -87 give ~1e-38 (callers mask such lanes).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

constexpr int kMaxHeadDim = 256;
constexpr int64_t kPrefetchSlots = 32;  // how far ahead of its block a query pulls K and V into L1

struct AttentionArgs {
  const uint16_t* q;  // [B, T, N, H] bf16
  const uint16_t* k;  // [P, KH, ps, H] bf16
  const uint16_t* v;
  const int32_t* page_table;  // [B, PP]
  const int32_t* kv_lens;     // [B]
  const int32_t* q_lens;      // [B]
  float* out;                 // [B, T, N, H]
  int64_t B, T, N, KH, H, ps, PP, window;
  float scale;

  const uint16_t* slot(const uint16_t* pages, int64_t b, int64_t kh, int64_t s) const {
    const int64_t page = page_table[b * PP + s / ps];
    return pages + ((page * KH + kh) * ps + s % ps) * H;
  }

  // One query (row b, token t, head `head` of kv head kh) against its visible slots
  // [lo, hi): blocks of 16 slots, scores summed by reduce16, an online softmax across blocks.
  void query(int64_t b, int64_t t, int64_t head, int64_t kh) const {
    float* o = out + ((b * T + t) * N + head) * H;
    const int64_t q_len = q_lens[b], kv_len = kv_lens[b];
    const int64_t pos = kv_len - q_len + t;
    const int64_t hi = std::min(kv_len, pos + 1);
    const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
    if (t >= q_len || hi <= lo) {  // a padding query, or nothing visible: zeros
      std::fill(o, o + H, 0.0f);
      return;
    }
    const int64_t hc = H / 32;  // 32-value chunks of a head
    __m512bh qv[kMaxHeadDim / 32];
    for (int64_t c = 0; c < hc; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + ((b * T + t) * N + head) * H + c * 32);
    __m512 acc[kMaxHeadDim / 16];
    for (int64_t c = 0; c < 2 * hc; ++c) acc[c] = _mm512_setzero_ps();
    float m = -INFINITY, l = 0.0f;
    for (int64_t s0 = lo / 16 * 16; s0 < hi; s0 += 16) {
      __mmask16 valid = 0;
      const uint16_t* kp[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t s = s0 + j;
        const bool ok = s >= lo && s < hi;
        valid |= (__mmask16)ok << j;
        kp[j] = ok ? slot(k, b, kh, s) : nullptr;
      }
      for (int64_t s = s0 + kPrefetchSlots; s < std::min(s0 + kPrefetchSlots + 16, hi); ++s) {
        const char* kn = reinterpret_cast<const char*>(slot(k, b, kh, s));
        const char* vn = reinterpret_cast<const char*>(slot(v, b, kh, s));
        for (int64_t line = 0; line < 2 * H; line += 64) {
          _mm_prefetch(kn + line, _MM_HINT_T0);
          _mm_prefetch(vn + line, _MM_HINT_T0);
        }
      }
      __m512 dots[16];  // dots[4l + b] holds slot 4b + l, so reduce16 puts slot j in lane j
      for (int i = 0; i < 16; ++i) {
        const uint16_t* p = kp[4 * (i % 4) + i / 4];
        __m512 d = _mm512_setzero_ps();
        if (p)
          for (int64_t c = 0; c < hc; ++c) d = _mm512_dpbf16_ps(d, (__m512bh)_mm512_loadu_si512(p + c * 32), qv[c]);
        dots[i] = d;
      }
      __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid,
                                     _mm512_mul_ps(reduce16(dots), _mm512_set1_ps(scale)));
      const float m_new = std::max(m, _mm512_reduce_max_ps(sc));
      const float alpha = std::exp(m - m_new);  // 0 for the first block (m = -inf)
      __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(sc, _mm512_set1_ps(m_new))));
      l = l * alpha + _mm512_reduce_add_ps(p);
      const __m512 a = _mm512_set1_ps(alpha);
      for (int64_t c = 0; c < 2 * hc; ++c) acc[c] = _mm512_mul_ps(acc[c], a);
      alignas(64) float pj[16];
      _mm512_store_ps(pj, p);
      for (int j = 0; j < 16; ++j) {
        if (!kp[j]) continue;
        const uint16_t* vp = slot(v, b, kh, s0 + j);
        const __m512 w = _mm512_set1_ps(pj[j]);
        for (int64_t c = 0; c < 2 * hc; ++c)
          acc[c] = _mm512_fmadd_ps(w, _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i*)(vp + c * 16))), acc[c]);
      }
      m = m_new;
    }
    const __m512 inv = _mm512_set1_ps(1.0f / l);
    for (int64_t c = 0; c < 2 * hc; ++c) _mm512_storeu_ps(o + c * 16, _mm512_mul_ps(acc[c], inv));
  }
};

ffi::Error Bf16AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::U16> k,
                             ffi::Buffer<ffi::U16> v, ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> kv_lens,
                             ffi::Buffer<ffi::S32> q_lens, float scale, int64_t window, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto pd = page_table.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || pd.size() != 2 || kd[3] != qd[3] || pd[0] != qd[0] ||
      qd[2] % kd[1] != 0 || qd[3] % 32 != 0 || qd[3] > kMaxHeadDim)
    return ffi::Error::InvalidArgument(
        "bf16_attention: q [B, T, N, H], pages [P, K, ps, H] (N a multiple of K, H a multiple of 32 up to 256), "
        "page_table [B, PP] expected");
  AttentionArgs a{reinterpret_cast<const uint16_t*>(q.typed_data()), k.typed_data(), v.typed_data(),
                  page_table.typed_data(), kv_lens.typed_data(), q_lens.typed_data(), out->typed_data(),
                  qd[0], qd[1], qd[2], kd[1], qd[3], kd[2], pd[1], window, scale};
  const int64_t groups = a.N / a.KH;
  // one item per (row, kv head): its queries share the kv head's slots, read while in cache
  parallel_for(pool, a.B * a.KH, [&a, groups](int64_t item) {
    const int64_t b = item / a.KH, kh = item % a.KH;
    for (int64_t t = 0; t < a.T; ++t)
      for (int64_t g = 0; g < groups; ++g) a.query(b, t, kh * groups + g, kh);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferBf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferBf16Attention, Bf16AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
