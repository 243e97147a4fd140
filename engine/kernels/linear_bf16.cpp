// Projections for bf16 models on CPUs with AVX512-BF16 (see engine/kernels/__init__.py).
//
//   pack_linear(w [N, K]) -> [ceil(N / 32), ceil(K / 2), 32, 2]  bf16, once per weight: panels
//       of 32 output columns, each k-pair of a column side by side (zeros past N and K)
//   linear(x [M, K], packed, bias [N]?, n = N, post, other [M, N]?, widen) -> [M, N]
//       post(x @ w^T + bias) with post "none", "silu" (v * sigmoid(v)), "mul" (v * other) or
//       "add" (v + other), all in float32 on the sum, rounded to bf16 once (as oneDNN's
//       post-ops round); bf16, or with widen float32 holding those bf16 values (logits,
//       without a second pass to widen them)
//
// The micro-kernel keeps up to 12 rows x 32 columns of float32 sums in 24 registers: per
// k-pair it loads the panel's two vectors of weights and dots them (vdpbf16ps: exact
// products, float32 sums) with each row's pair of inputs, broadcast. A panel of a
// projection with K = 576 is 36 KB, read from memory once per call for up to 192 rows and
// from the L1 cache by the other row blocks; the next panel is prefetched meanwhile. Work
// is split over (panel, group of 192 rows) with torch's thread pool. oneDNN's packed
// kernels (what torch runs otherwise) took 1.5x as long for a 32-row decoding iteration
// of SmolLM2 whose weights come from memory (benchmarks/README.md).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include "avx512_bf16.h"

#include <algorithm>
#include <cstdint>
#include <string>

namespace {

using namespace exegpt_bf16;

constexpr int kCols = 32;        // output columns per panel: two float32 vectors
constexpr int kRows = 12;        // rows per micro-kernel call: 24 sums in registers
constexpr int kRowGroup = 192;   // rows per unit of work: a panel is read once per group

enum class Post { kNone, kSilu, kMul, kAdd };

Post parse_post(const std::string& name) {
  if (name == "none") return Post::kNone;
  if (name == "silu") return Post::kSilu;
  if (name == "mul") return Post::kMul;
  if (name == "add") return Post::kAdd;
  TORCH_CHECK(false, "linear: post must be none, silu, mul or add; got ", name);
}

at::Tensor pack_linear(const at::Tensor& w_in) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.scalar_type() == at::kBFloat16,
              "pack_linear takes a bf16 weight [N, K]");
  const at::Tensor w = w_in.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t panels = (n + kCols - 1) / kCols, pairs = (k + 1) / 2;
  at::Tensor out = at::zeros({panels, pairs, kCols, 2}, w.options());
  const auto* src = reinterpret_cast<const uint16_t*>(w.const_data_ptr<c10::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<c10::BFloat16>());
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int c = 0; c < kCols && p * kCols + c < n; ++c) {
        const uint16_t* row = src + (p * kCols + c) * k;
        for (int64_t i = 0; i < k; ++i) dst[((p * pairs + i / 2) * kCols + c) * 2 + i % 2] = row[i];
      }
  });
  return out;
}

// sums[r][0..31] = x_r . panel's columns over `pairs` k-pairs, for R rows of x (stride ldx)
template <int R>
void micro(const uint16_t* x, int64_t ldx, const uint16_t* panel, int64_t pairs,
           const uint16_t* prefetch, float (*sums)[kCols]) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; ++i) {
    const uint16_t* wi = panel + i * 2 * kCols;
    if (prefetch != nullptr) {  // the next panel's same k-pair: two cache lines
      _mm_prefetch(reinterpret_cast<const char*>(prefetch + i * 2 * kCols), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(prefetch + i * 2 * kCols + kCols), _MM_HINT_T0);
    }
    const __m512i w0 = _mm512_loadu_si512(wi), w1 = _mm512_loadu_si512(wi + kCols);
    for (int r = 0; r < R; ++r) {
      const __m512i xr = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + r * ldx + 2 * i));
      acc[r][0] = dot(acc[r][0], xr, w0);
      acc[r][1] = dot(acc[r][1], xr, w1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(sums[r], acc[r][0]);
    _mm512_storeu_ps(sums[r] + 16, acc[r][1]);
  }
}

// micro<R> for a run-time row count of 1..kRows
template <int R = kRows>
void micro_rows(int rows, const uint16_t* x, int64_t ldx, const uint16_t* panel, int64_t pairs,
                const uint16_t* prefetch, float (*sums)[kCols]) {
  if constexpr (R > 1)
    if (rows < R) return micro_rows<R - 1>(rows, x, ldx, panel, pairs, prefetch, sums);
  micro<R>(x, ldx, panel, pairs, prefetch, sums);
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 live) {
  const __m256i h = _mm256_maskz_loadu_epi16(live, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// out[row][col0 ..] = bf16(post(sums + bias)) for the panel's live columns; widened to
// float32 into wide instead where that is given
inline void finish(const float* sums, const uint16_t* bias, Post post, const uint16_t* other,
                   uint16_t* out, float* wide, int cols) {
  for (int h = 0; h < 2; ++h) {
    const int left = cols - 16 * h;
    if (left <= 0) break;
    const __mmask16 live = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    __m512 v = _mm512_loadu_ps(sums + 16 * h);
    if (bias != nullptr) v = _mm512_add_ps(v, load_bf16(bias + 16 * h, live));
    switch (post) {
      case Post::kNone: break;
      case Post::kSilu:
        v = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), v))));
        break;
      case Post::kMul: v = _mm512_mul_ps(v, load_bf16(other + 16 * h, live)); break;
      case Post::kAdd: v = _mm512_add_ps(v, load_bf16(other + 16 * h, live)); break;
    }
    const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(v);
    if (wide != nullptr)
      _mm512_mask_storeu_ps(wide + 16 * h, live,
                            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16)));
    else
      _mm256_mask_storeu_epi16(out + 16 * h, live, rounded);
  }
}

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& packed, const c10::optional<at::Tensor>& bias_in,
                  int64_t n, c10::string_view post_name, const c10::optional<at::Tensor>& other_in,
                  bool widen) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "linear takes bf16 x [M, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kCols && packed.size(3) == 2 &&
                  packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "linear takes a weight packed by pack_linear");
  const int64_t m = x_in.size(0), k = x_in.size(1), pairs = packed.size(1);
  TORCH_CHECK((k + 1) / 2 == pairs, "x has ", k, " columns; the weight was packed for ", 2 * pairs);
  TORCH_CHECK(n > (packed.size(0) - 1) * kCols && n <= packed.size(0) * kCols,
              "n = ", n, " does not fit the packed weight's ", packed.size(0), " panels");
  const Post post = parse_post(std::string(post_name));
  at::Tensor other;
  if (post == Post::kMul || post == Post::kAdd) {
    TORCH_CHECK(other_in.has_value() && other_in->sizes() == at::IntArrayRef({m, n}) &&
                    other_in->scalar_type() == at::kBFloat16,
                "linear: post ", std::string(post_name), " takes a bf16 other [M, N]");
    other = other_in->contiguous();
  }
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->numel() == n && bias_in->scalar_type() == at::kBFloat16,
                "linear: bias must be bf16 [N]");
    bias = bias_in->contiguous();
  }
  // an odd K reads one column past x's rows: pad them with a zero (its weight is zero too)
  const at::Tensor x = k % 2 ? at::constant_pad_nd(x_in, {0, 1}) : x_in.contiguous();
  const int64_t ldx = x.size(1);
  at::Tensor out = at::empty({m, n}, widen ? x.options().dtype(at::kFloat) : x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr<c10::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<c10::BFloat16>());
  const auto* bp = bias.defined() ? reinterpret_cast<const uint16_t*>(bias.const_data_ptr<c10::BFloat16>()) : nullptr;
  const auto* op = other.defined() ? reinterpret_cast<const uint16_t*>(other.const_data_ptr<c10::BFloat16>()) : nullptr;
  auto* yp = widen ? nullptr : reinterpret_cast<uint16_t*>(out.mutable_data_ptr<c10::BFloat16>());
  float* wide = widen ? out.mutable_data_ptr<float>() : nullptr;
  const int64_t panels = packed.size(0), groups = (m + kRowGroup - 1) / kRowGroup;
  const int64_t panel_size = pairs * 2 * kCols;
  at::parallel_for(0, panels * groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float sums[kRows][kCols];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t p = unit / groups, g = unit % groups;
      const uint16_t* panel = wp + p * panel_size;
      const uint16_t* next = p + 1 < panels && g == groups - 1 ? panel + panel_size : nullptr;
      const int cols = static_cast<int>(std::min<int64_t>(kCols, n - p * kCols));
      const int64_t row_end = std::min(m, (g + 1) * kRowGroup);
      for (int64_t r0 = g * kRowGroup; r0 < row_end; r0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, row_end - r0));
        micro_rows(rows, xp + r0 * ldx, ldx, panel, pairs, r0 == g * kRowGroup ? next : nullptr, sums);
        for (int r = 0; r < rows; ++r) {
          const int64_t at = (r0 + r) * n + p * kCols;
          finish(sums[r], bp == nullptr ? nullptr : bp + p * kCols, post,
                 op == nullptr ? nullptr : op + at, yp == nullptr ? nullptr : yp + at,
                 wide == nullptr ? nullptr : wide + at, cols);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exegpt_cpu, m) {
  m.def("pack_linear(Tensor w) -> Tensor");
  m.def(
      "linear(Tensor x, Tensor packed, Tensor? bias, int n, str post, Tensor? other, "
      "bool widen=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(exegpt_cpu, CPU, m) {
  m.impl("pack_linear", &pack_linear);
  m.impl("linear", &linear);
}
#endif
