// Decode attention over a bf16 slot KV cache, one row per running query, each over its own
// context only (see engine/kernels/__init__.py).
//
//   q        [n, heads, head_dim]            bf16, the rows' new queries
//   k, v     [n, kv_heads, span, head_dim]   bf16 views of the cache, last dim contiguous
//   ctx      [n]                             int64, keys row r attends: positions 0..ctx[r)
//   returns  [n, heads, head_dim]            bf16
//
// The work is split over (row, kv head) pairs with at::parallel_for, torch's own thread
// pool. A pair reads its keys and values once for the whole GQA group of query heads and
// stops at the row's context: nothing past it is read. Scores, softmax and the weighted sum
// are float32; the output is rounded to bf16 once. Where the compiler targets AVX512-BF16
// (and for head sizes of 32 or more), scores and weighted values are bf16 dot products
// (exact products, float32 sums): scores 16 keys at a time, their lane sums taken by one
// transposing add tree rather than one reduction per key; the softmax vectorised, its
// weights rounded to bf16 as torch's flash attention rounds them; values in key pairs, each
// pair interleaved once for the group's heads, whose sums stay in registers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <math.h>

#include "head_dims.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include "avx512_bf16.h"
#define EXEGPT_BF16_DOT 1
#endif

namespace {

constexpr int kMaxGroup = 16;  // query heads per KV head
constexpr int kKeys = 16;      // keys scored at a time by the bf16 path: one float32 vector
constexpr int kAhead = 32;     // keys ahead of the block being scored that are prefetched

#ifdef EXEGPT_BF16_DOT
using namespace exegpt_bf16;

// The lane sums of 16 vectors, as one vector: element i is the sum of v[i]'s 16 lanes.
// Pairs of vectors add their lanes' halves (unpack lo + hi), pairs of those their quarters
// (64-bit unpacks), and the 128-bit lanes of the four results are transposed and added.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 x[8];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 y[4];  // y[i]'s 128-bit lane L: vectors 4i..4i+3 summed over lane L's elements
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x44),
                                   _mm512_shuffle_f32x4(y[0], y[1], 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x44),
                                   _mm512_shuffle_f32x4(y[2], y[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88),
                       _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

// scores[j * len + t] = scale * q_j . k_t for the group's g heads; HD a multiple of 32.
// The keys two blocks ahead are fetched into the cache meanwhile.
template <int HD>
void score_keys(const c10::BFloat16* q, const uint16_t* k, int64_t t_stride, int64_t len, int g,
                float scale, float* scores) {
  constexpr int C = HD / 32;  // vectors of 32 bf16 per head
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < len; t0 += kKeys) {
    const int m = static_cast<int>(std::min<int64_t>(kKeys, len - t0));
    for (int64_t t = t0 + kAhead; t < std::min<int64_t>(t0 + kAhead + kKeys, len); ++t)
      for (int c = 0; c < C; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(k + t * t_stride + 32 * c), _MM_HINT_T0);
    for (int j = 0; j < g; ++j) {
      const auto* qj = reinterpret_cast<const uint16_t*>(q) + j * HD;
      __m512i qv[C];
      for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_si512(qj + 32 * c);
      __m512 acc[kKeys];
      for (int i = 0; i < kKeys; ++i) {
        acc[i] = _mm512_setzero_ps();
        if (i < m) {
          const uint16_t* kr = k + (t0 + i) * t_stride;
          for (int c = 0; c < C; ++c) acc[i] = dot(acc[i], qv[c], _mm512_loadu_si512(kr + 32 * c));
        }
      }
      const __m512 s = _mm512_mul_ps(sum_lanes16(acc), vscale);
      _mm512_mask_storeu_ps(scores + j * len + t0, static_cast<__mmask16>((1u << m) - 1), s);
    }
  }
}

// The lanes of a 16-lane vector at offset t of a row of n: all but at the row's end.
inline __mmask16 live_lanes(int64_t t, int64_t n) {
  const int64_t left = n - t;
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// Each head's softmax over its row of `len` scores, in place, then the weights rounded to
// bf16 (nearest even, as torch's flash attention rounds them) into pb[j * padded + t];
// zeros from len up to `padded`, a multiple of 32.
inline void softmax_to_bf16(float* scores, int64_t len, int g, int64_t padded, uint16_t* pb) {
  for (int j = 0; j < g; ++j) {
    float* s = scores + j * len;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < len; t += 16) {
      const __mmask16 live = live_lanes(t, len);
      top = _mm512_mask_max_ps(top, live, top, _mm512_maskz_loadu_ps(live, s + t));
    }
    const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t += 16) {
      const __mmask16 live = live_lanes(t, len);
      const __m512 e =
          _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), peak)));
      total = _mm512_add_ps(total, e);
      _mm512_mask_storeu_ps(s + t, live, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
    uint16_t* p = pb + j * padded;
    for (int64_t t = 0; t < padded; t += 32) {
      const __m512 first = _mm512_mul_ps(_mm512_maskz_loadu_ps(live_lanes(t, len), s + t), inv);
      const __m512 second =
          _mm512_mul_ps(_mm512_maskz_loadu_ps(live_lanes(t + 16, len), s + t + 16), inv);
      _mm512_storeu_si512(p + t, (__m512i)_mm512_cvtne2ps_pbh(second, first));
    }
  }
}

// out_j[d] = sum_t p_j[t] v_t[d] for the NV heads j0.. (p_j = pb[j * padded ..], bf16),
// float32 sums held in registers: the keys in pairs, each pair's values interleaved once and
// dotted with every head's two weights (one 32-bit broadcast per head).
template <int HD, int NV>
void weigh_heads(const uint16_t* pb, int64_t padded, const uint16_t* v, int64_t t_stride,
                 int64_t len, int j0, float* out) {
  constexpr int C = HD / 32;  // vectors of 32 bf16 per head
  static const __m512i lo = interleave_index(0, 32), hi = interleave_index(16, 32);
  __m512 s[NV][2 * C];
  for (int n = 0; n < NV; ++n)
    for (int c = 0; c < 2 * C; ++c) s[n][c] = _mm512_setzero_ps();
  const auto* w = reinterpret_cast<const int32_t*>(pb + j0 * padded);
  const int64_t w_stride = padded / 2;
  for (int64_t t = 0; t < len; t += 2) {
    __m512i vv[2 * C];
    for (int c = 0; c < C; ++c) {
      const __m512i a = _mm512_loadu_si512(v + t * t_stride + 32 * c);
      const __m512i b = t + 1 < len ? _mm512_loadu_si512(v + (t + 1) * t_stride + 32 * c)
                                    : _mm512_setzero_si512();
      vv[2 * c] = _mm512_permutex2var_epi16(a, lo, b);
      vv[2 * c + 1] = _mm512_permutex2var_epi16(a, hi, b);
    }
    for (int n = 0; n < NV; ++n) {
      const __m512i wn = _mm512_set1_epi32(w[n * w_stride + t / 2]);
      for (int c = 0; c < 2 * C; ++c) s[n][c] = dot(s[n][c], wn, vv[c]);
    }
  }
  for (int n = 0; n < NV; ++n)
    for (int c = 0; c < 2 * C; ++c) _mm512_storeu_ps(out + (j0 + n) * HD + 16 * c, s[n][c]);
}

// weigh_heads for `count` (1..NV) heads from j0, the count made a compile-time one.
template <int HD, int NV>
void weigh_count(int count, const uint16_t* pb, int64_t padded, const uint16_t* v,
                 int64_t t_stride, int64_t len, int j0, float* out) {
  if constexpr (NV > 1)
    if (count < NV) return weigh_count<HD, NV - 1>(count, pb, padded, v, t_stride, len, j0, out);
  weigh_heads<HD, NV>(pb, padded, v, t_stride, len, j0, out);
}

// out[j * HD + d] = sum_t p_j[t] * v_t[d] for the group's g heads, as many heads per pass
// over the values as keep their sums in registers.
template <int HD>
void weigh_values(const uint16_t* pb, int64_t padded, const uint16_t* v, int64_t t_stride,
                  int64_t len, int g, float* out) {
  constexpr int kHeads = HD == 128 ? 2 : 6 / (HD / 32);  // 2C sums each, within 32 registers
  for (int j0 = 0; j0 < g; j0 += kHeads)
    weigh_count<HD, kHeads>(std::min(kHeads, g - j0), pb, padded, v, t_stride, len, j0, out);
}
#endif

inline float bf16_to_float(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// A row's scratch: its scores, float32, and (bf16 path) its softmax weights as bf16.
struct Scratch {
  std::vector<float> scores;
  std::vector<uint16_t> weights;
};

// The group's g query heads over one KV head's `len` keys: scalar float32 arithmetic, for
// head sizes and CPUs the bf16 path does not cover.
template <int HD>
void attend_group_scalar(const c10::BFloat16* q, const uint16_t* k, const uint16_t* v,
                         int64_t t_stride, int64_t len, int g, float scale, c10::BFloat16* out,
                         std::vector<float>& scores) {
  scores.resize(static_cast<size_t>(g) * len);
  float qs[kMaxGroup][HD];
  for (int j = 0; j < g; ++j)
    for (int d = 0; d < HD; ++d) qs[j][d] = static_cast<float>(q[j * HD + d]) * scale;
  float row[HD];
  for (int64_t t = 0; t < len; ++t) {
    const uint16_t* kr = k + t * t_stride;
    for (int d = 0; d < HD; ++d) row[d] = bf16_to_float(kr[d]);
    for (int j = 0; j < g; ++j) {
      float acc = 0.f;
      for (int d = 0; d < HD; ++d) acc += qs[j][d] * row[d];
      scores[j * len + t] = acc;
    }
  }
  for (int j = 0; j < g; ++j) {
    float* s = scores.data() + j * len;
    float top = s[0];
    for (int64_t t = 1; t < len; ++t) top = std::max(top, s[t]);
    for (int64_t t = 0; t < len; ++t) s[t] = expf(s[t] - top);
    float total = 0.f;
    for (int64_t t = 0; t < len; ++t) total += s[t];
    const float inv = 1.f / total;
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  float acc[kMaxGroup][HD];
  for (int j = 0; j < g; ++j)
    for (int d = 0; d < HD; ++d) acc[j][d] = 0.f;
  for (int64_t t = 0; t < len; ++t) {
    const uint16_t* vr = v + t * t_stride;
    for (int d = 0; d < HD; ++d) row[d] = bf16_to_float(vr[d]);
    for (int j = 0; j < g; ++j) {
      const float p = scores[j * len + t];
      for (int d = 0; d < HD; ++d) acc[j][d] += p * row[d];
    }
  }
  for (int j = 0; j < g; ++j)
    for (int d = 0; d < HD; ++d) out[j * HD + d] = c10::BFloat16(acc[j][d]);
}

template <int HD>
void attend_group(const c10::BFloat16* q, const uint16_t* k, const uint16_t* v,
                  int64_t t_stride, int64_t len, int g, float scale, c10::BFloat16* out,
                  Scratch& scratch) {
#ifdef EXEGPT_BF16_DOT
  if constexpr (HD % 32 == 0) {
    const int64_t padded = (len + 31) / 32 * 32;
    scratch.scores.resize(static_cast<size_t>(g) * len);
    scratch.weights.resize(static_cast<size_t>(g) * padded);
    score_keys<HD>(q, k, t_stride, len, g, scale, scratch.scores.data());
    softmax_to_bf16(scratch.scores.data(), len, g, padded, scratch.weights.data());
    alignas(64) float acc[kMaxGroup][HD];
    weigh_values<HD>(scratch.weights.data(), padded, v, t_stride, len, g, &acc[0][0]);
    for (int j = 0; j < g; ++j)
      for (int d = 0; d < HD; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * HD + d),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(&acc[j][d])));
    return;
  }
#endif
  attend_group_scalar<HD>(q, k, v, t_stride, len, g, scale, out, scratch.scores);
}

template <int HD>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ctx,
         double scale, at::Tensor& out) {
  const int64_t n = q.size(0), heads = q.size(1), kv_heads = k.size(1);
  const int g = static_cast<int>(heads / kv_heads);
  const auto* qp = q.const_data_ptr<c10::BFloat16>();
  const auto* kp = reinterpret_cast<const uint16_t*>(k.const_data_ptr<c10::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.const_data_ptr<c10::BFloat16>());
  const int64_t* lens = ctx.const_data_ptr<int64_t>();
  auto* op = out.mutable_data_ptr<c10::BFloat16>();
  at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / kv_heads, h = i % kv_heads;
      const int64_t q_at = (r * heads + h * g) * HD;
      attend_group<HD>(qp + q_at, kp + r * k.stride(0) + h * k.stride(1),
                       vp + r * v.stride(0) + h * v.stride(1), k.stride(2), lens[r], g,
                       static_cast<float>(scale), op + q_at, scratch);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& ctx_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k.dim() == 4 && v.dim() == 4, "q [n, heads, hd], k/v 4-d");
  TORCH_CHECK(q_in.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "decode_attention takes bf16 tensors");
  TORCH_CHECK(k.sizes() == v.sizes() && k.strides() == v.strides(), "k and v differ in layout");
  TORCH_CHECK(k.stride(3) == 1, "the cache's head_dim must be contiguous");
  const int64_t n = q_in.size(0), heads = q_in.size(1), hd = q_in.size(2);
  TORCH_CHECK(k.size(0) == n && k.size(3) == hd, "q and the cache rows disagree");
  const int64_t kv_heads = k.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup,
              "heads must be a multiple of kv_heads, at most ", kMaxGroup, " per KV head");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor ctx = ctx_in.to(at::kLong).contiguous();
  TORCH_CHECK(ctx.numel() == n, "one context length per row");
  const int64_t* lens = ctx.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= k.size(2), "row ", r, " context ", lens[r],
                " outside 1..", k.size(2));
  at::Tensor out = at::empty({n, heads, hd}, q.options());
  exegpt_kernels::with_head_dim(hd, "decode_attention", [&](auto size) {
    run<decltype(size)::value>(q, k, v, ctx, scale, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(exegpt_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor ctx, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(exegpt_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
