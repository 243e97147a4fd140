// Causal attention over the prompts of an encoding step, packed without padding, for bf16
// on CPUs with AVX512-BF16 (see engine/kernels/__init__.py).
//
//   q        [T, heads, head_dim]      bf16, the packed prompts' queries
//   k, v     [T, kv_heads, head_dim]   bf16; any strides, head_dim contiguous
//   lengths  [S]                       int64, the prompts' lengths in packing order
//   returns  [sum(lengths), heads, head_dim]  bf16
//
// A unit of work is 16 consecutive positions of one prompt and one KV head: the queries of
// its whole GQA group, one 16-lane vector per query head, so that a vector's lanes are
// positions. Keys are taken in blocks of 32 up to the unit's last position:
//
//   scores^T [key][lane]  = q . k     AVX512-BF16 dot products (vdpbf16ps), float32 sums;
//                                     the queries are repacked once per unit, the keys are
//                                     broadcast from where they lie
//   online softmax                    per lane (query): all vertical, no horizontal
//                                     reductions; a key past a lane's position weighs 0
//   out^T [d][lane]      += p . v     weights rounded to bf16, value pairs interleaved once
//                                     per block
//
// The arithmetic is torch's flash attention's (float32 scores and softmax, bf16 weights
// times bf16 values summed in float32, one rounding to bf16 at the end), in another order.
// Units are handed to torch's threads longest first from a shared counter, so prompts of
// very different lengths still keep every thread busy to the end.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include "avx512_bf16.h"
#include "head_dims.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

using namespace exegpt_bf16;

constexpr int kLanes = 16;   // positions per unit: one float32 vector
constexpr int kBlock = 32;   // keys per block (even: values are interleaved in pairs)
constexpr int kMaxGroup = 16;  // query heads per KV head

// The lanes (positions c0 + l) that see key `key`: those with key <= c0 + l.
inline __mmask16 seeing(int key, int c0) {
  const int past = key - c0;  // lanes below this one cannot see the key
  return past <= 0 ? __mmask16(0xFFFF) : __mmask16(0xFFFF << past);
}

struct Strides {
  int64_t q_t, q_h, k_t, k_h, v_t, v_h;
};

// One unit's buffers, reused by a thread across its units.
template <int D>
struct Scratch {
  alignas(64) uint32_t qp[kMaxGroup][D / 2][kLanes];    // query pairs, transposed
  alignas(64) float s[kBlock][kMaxGroup][kLanes];       // scores^T, then weights
  alignas(64) uint32_t pp[kBlock / 2][kMaxGroup][kLanes];  // weight pairs (bf16)
  alignas(64) uint32_t vp[kBlock / 2][D];                // value pairs (bf16)
  alignas(64) float o[kMaxGroup][D][kLanes];            // out^T
  alignas(64) uint16_t row[D][kLanes];                   // one head's bf16 output
};

// scores^T for keys [k0, k0 + nk) of the block against NV query vectors from v0: 8 keys at
// a time, 8 * NV accumulators
template <int D, int NV>
void scores(Scratch<D>& w, const uint16_t* k, int64_t k_t, int k0, int nk, int v0,
            float scale) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int j = 0; j < nk; j += 8) {
    __m512 acc[8][NV];
    for (int a = 0; a < 8; ++a)
      for (int b = 0; b < NV; ++b) acc[a][b] = _mm512_setzero_ps();
    const int kn = std::min(8, nk - j);
    const uint16_t* rows[8];
    for (int a = 0; a < 8; ++a) rows[a] = k + (k0 + j + std::min(a, kn - 1)) * k_t;
    for (int p = 0; p < D / 2; ++p) {
      __m512i qv[NV];
      for (int b = 0; b < NV; ++b) qv[b] = _mm512_load_si512(w.qp[v0 + b][p]);
      for (int a = 0; a < 8; ++a) {
        uint32_t pair;
        std::memcpy(&pair, rows[a] + 2 * p, sizeof pair);
        const __m512i kv = _mm512_set1_epi32(static_cast<int>(pair));
        for (int b = 0; b < NV; ++b) acc[a][b] = dot(acc[a][b], qv[b], kv);
      }
    }
    for (int a = 0; a < kn; ++a)
      for (int b = 0; b < NV; ++b) _mm512_store_ps(w.s[j + a][v0 + b], _mm512_mul_ps(acc[a][b], sc));
  }
}

// out^T[d][lane] += sum over the block's key pairs of weight pair . value pair, for NV
// query vectors from v0, 8 dims at a time
template <int D, int NV>
void weighted_values(Scratch<D>& w, int pairs, int v0) {
  for (int d0 = 0; d0 < D; d0 += 8) {
    __m512 acc[NV][8];
    for (int b = 0; b < NV; ++b)
      for (int d = 0; d < 8; ++d) acc[b][d] = _mm512_load_ps(w.o[v0 + b][d0 + d]);
    for (int jp = 0; jp < pairs; ++jp) {
      __m512i pv[NV];
      for (int b = 0; b < NV; ++b) pv[b] = _mm512_load_si512(w.pp[jp][v0 + b]);
      for (int d = 0; d < 8; ++d) {
        const __m512i vv = _mm512_set1_epi32(static_cast<int>(w.vp[jp][d0 + d]));
        for (int b = 0; b < NV; ++b) acc[b][d] = dot(acc[b][d], pv[b], vv);
      }
    }
    for (int b = 0; b < NV; ++b)
      for (int d = 0; d < 8; ++d) _mm512_store_ps(w.o[v0 + b][d0 + d], acc[b][d]);
  }
}

// f(std::integral_constant<int, NV>{}, v0) over a group's g query vectors, NV of them from
// v0 at a time: threes, then the rest (at most 24 accumulators live)
template <class F>
void in_threes(int g, F&& f) {
  int v0 = 0;
  for (; v0 + 3 <= g; v0 += 3) f(std::integral_constant<int, 3>{}, v0);
  if (g - v0 == 2) f(std::integral_constant<int, 2>{}, v0);
  if (g - v0 == 1) f(std::integral_constant<int, 1>{}, v0);
}

// Pack the value rows [k0, k0 + nk) of one KV head into pairs: vp[jp][d] = (v[2jp][d],
// v[2jp + 1][d]); a missing odd row is zero.
template <int D>
void pack_values(Scratch<D>& w, const uint16_t* v, int64_t v_t, int k0, int nk) {
  // a's and b's lanes 0-15, then 16-31; permutex2var counts b's lanes from 32
  static const __m512i lo = interleave_index(0, 32), hi = interleave_index(16, 32);
  constexpr int kChunk = D < 32 ? D : 32;
  const __mmask32 m = kChunk == 32 ? ~__mmask32(0) : (__mmask32(1) << kChunk) - 1;
  for (int jp = 0; jp < (nk + 1) / 2; ++jp) {
    const uint16_t* a = v + (k0 + 2 * jp) * v_t;
    const bool odd = 2 * jp + 1 < nk;
    const uint16_t* b = v + (k0 + 2 * jp + (odd ? 1 : 0)) * v_t;
    for (int d0 = 0; d0 < D; d0 += 32) {
      const __m512i av = _mm512_maskz_loadu_epi16(m, a + d0);
      const __m512i bv = odd ? _mm512_maskz_loadu_epi16(m, b + d0) : _mm512_setzero_si512();
      _mm512_store_si512(w.vp[jp] + d0, _mm512_permutex2var_epi16(av, lo, bv));
      if (kChunk == 32) _mm512_store_si512(w.vp[jp] + d0 + 16, _mm512_permutex2var_epi16(av, hi, bv));
    }
  }
}

// One unit: positions [c0, c0 + lanes) of a prompt starting at token t0, KV head h.
template <int D>
void unit(Scratch<D>& w, const uint16_t* q, const uint16_t* k, const uint16_t* v,
          const Strides& st, int64_t t0, int c0, int lanes, int h, int g, float scale,
          uint16_t* out, int64_t heads) {
  const __mmask16 live = static_cast<__mmask16>((1u << lanes) - 1);
  __m512i offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                         5, 4, 3, 2, 1, 0),
                                       _mm512_set1_epi32(static_cast<int>(st.q_t)));
  for (int b = 0; b < g; ++b) {
    const uint16_t* qh = q + (t0 + c0) * st.q_t + (h * g + b) * st.q_h;
    for (int p = 0; p < D / 2; ++p)  // lane l: q[c0 + l][2p], q[c0 + l][2p + 1]
      _mm512_store_si512(w.qp[b][p], _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live,
                                                                 offsets, qh + 2 * p, 2));
    for (int d = 0; d < D; ++d) _mm512_store_ps(w.o[b][d], _mm512_setzero_ps());
  }
  __m512 m[kMaxGroup], l[kMaxGroup];
  for (int b = 0; b < g; ++b) {
    m[b] = _mm512_set1_ps(-INFINITY);
    l[b] = _mm512_setzero_ps();
  }
  const uint16_t* kh = k + t0 * st.k_t + h * st.k_h;
  const uint16_t* vh = v + t0 * st.v_t + h * st.v_h;
  const int keys = c0 + lanes;  // the last lane's position + 1
  // (low half, high half) of one vector: lane l of each side by side
  static const __m512i pair_index = interleave_index(0, 16);
  for (int k0 = 0; k0 < keys; k0 += kBlock) {
    const int nk = std::min(kBlock, keys - k0);
    in_threes(g, [&](auto nv, int v0) {
      scores<D, decltype(nv)::value>(w, kh, st.k_t, k0, nk, v0, scale);
    });
    const int pairs = (nk + 1) / 2;
    for (int b = 0; b < g; ++b) {
      __m512 top = m[b];
      for (int j = 0; j < nk; ++j)
        top = _mm512_mask_max_ps(top, seeing(k0 + j, c0), top, _mm512_load_ps(w.s[j][b]));
      const __m512 alpha = exp512(_mm512_sub_ps(m[b], top));
      m[b] = top;
      __m512 sum = _mm512_setzero_ps();
      for (int j = 0; j < 2 * pairs; ++j) {  // an odd block's missing last key weighs 0
        const __mmask16 sees = j < nk ? seeing(k0 + j, c0) : __mmask16(0);
        const __m512 p =
            _mm512_maskz_mov_ps(sees, exp512(_mm512_sub_ps(_mm512_load_ps(w.s[j][b]), top)));
        sum = _mm512_add_ps(sum, p);
        _mm512_store_ps(w.s[j][b], p);
      }
      l[b] = _mm512_fmadd_ps(l[b], alpha, sum);
      for (int d = 0; d < D; ++d) _mm512_store_ps(w.o[b][d], _mm512_mul_ps(_mm512_load_ps(w.o[b][d]), alpha));
      for (int jp = 0; jp < pairs; ++jp) {
        // (p[2jp], p[2jp + 1]) per lane, rounded to bf16 (round to nearest even)
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(w.s[2 * jp + 1][b]),
                                                         _mm512_load_ps(w.s[2 * jp][b]));
        _mm512_store_si512(w.pp[jp][b], _mm512_permutexvar_epi16(pair_index, both));
      }
    }
    pack_values<D>(w, vh, st.v_t, k0, nk);
    in_threes(g, [&](auto nv, int v0) { weighted_values<D, decltype(nv)::value>(w, pairs, v0); });
  }
  for (int b = 0; b < g; ++b) {
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), l[b]);
    for (int d = 0; d < D; ++d) {
      const __m256bh r = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(w.o[b][d]), inv));
      std::memcpy(w.row[d], &r, sizeof r);
    }
    uint16_t* ob = out + ((t0 + c0) * heads + h * g + b) * D;
    for (int lane = 0; lane < lanes; ++lane)
      for (int d = 0; d < D; ++d) ob[lane * heads * D + d] = w.row[d][lane];
  }
}

struct Unit {
  int64_t t0;   // the prompt's first token
  int c0;       // first position
  int lanes;    // positions (16 but at a prompt's end)
  int h;        // KV head
};

template <int D>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         const std::vector<int64_t>& lengths, double scale, at::Tensor& out) {
  const int64_t heads = q.size(1), kv_heads = k.size(1);
  const int g = static_cast<int>(heads / kv_heads);
  std::vector<Unit> units;
  int64_t t0 = 0;
  for (const int64_t len : lengths) {
    for (int c0 = 0; c0 < len; c0 += kLanes)
      for (int h = 0; h < kv_heads; ++h)
        units.push_back({t0, c0, static_cast<int>(std::min<int64_t>(kLanes, len - c0)), h});
    t0 += len;
  }
  // longest first (a unit's work grows with its last position), taken from a counter
  std::stable_sort(units.begin(), units.end(),
                   [](const Unit& a, const Unit& b) { return a.c0 > b.c0; });
  const Strides st{q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1)};
  const auto* qp = reinterpret_cast<const uint16_t*>(q.const_data_ptr<c10::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.const_data_ptr<c10::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.const_data_ptr<c10::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<c10::BFloat16>());
  std::atomic<size_t> next{0};
  const auto scale_f = static_cast<float>(scale);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), units.size());
  // one task per thread, each taking units from the counter until none is left
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const auto scratch = std::make_unique<Scratch<D>>();  // heap: ~260 KB at D = 128
    for (size_t i = next++; i < units.size(); i = next++) {
      const Unit& u = units[i];
      unit<D>(*scratch, qp, kp, vp, st, u.t0, u.c0, u.lanes, u.h, g, scale_f, op, heads);
    }
  });
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& lengths_in, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "prefill_attention takes q [T, heads, hd] and k, v [T, kv_heads, hd]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "prefill_attention takes bf16 tensors");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "head_dim must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(2) == q.size(2),
              "q, k and v disagree in shape");
  const int64_t heads = q.size(1), kv_heads = k.size(1), hd = q.size(2);
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup,
              "heads must be a multiple of kv_heads, at most ", kMaxGroup, " per KV head");
  const at::Tensor lens = lengths_in.to(at::kLong).contiguous();
  std::vector<int64_t> lengths(lens.const_data_ptr<int64_t>(),
                               lens.const_data_ptr<int64_t>() + lens.numel());
  int64_t total = 0;
  for (const int64_t len : lengths) {
    TORCH_CHECK(len >= 1, "prompt lengths must be positive, got ", len);
    total += len;
  }
  TORCH_CHECK(total <= q.size(0), "the lengths add up to ", total, " tokens; q has ", q.size(0));
  at::Tensor out = at::empty({total, heads, hd}, q.options());
  if (total == 0) return out;
  exegpt_kernels::with_head_dim(hd, "prefill_attention", [&](auto size) {
    run<decltype(size)::value>(q, k, v, lengths, scale, out);
  });
  return out;
}

}  // namespace

// Registered only where the CPU has AVX512-BF16; elsewhere torch's attention runs.
TORCH_LIBRARY_FRAGMENT(exegpt_cpu, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(exegpt_cpu, CPU, m) { m.impl("prefill_attention", &prefill_attention); }

#endif
