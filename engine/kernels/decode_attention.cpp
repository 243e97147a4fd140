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
// are float32; the output is rounded to bf16 once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <math.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kMaxGroup = 16;  // query heads per KV head

inline float bf16_to_float(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <int HD>
void attend_group(const c10::BFloat16* q, const uint16_t* k, const uint16_t* v,
                  int64_t t_stride, int64_t len, int g, float scale, c10::BFloat16* out,
                  std::vector<float>& scores) {
  float qs[kMaxGroup][HD];
  for (int j = 0; j < g; ++j)
    for (int d = 0; d < HD; ++d) qs[j][d] = static_cast<float>(q[j * HD + d]) * scale;
  scores.resize(static_cast<size_t>(g) * len);
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
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / kv_heads, h = i % kv_heads;
      const int64_t q_at = (r * heads + h * g) * HD;
      attend_group<HD>(qp + q_at, kp + r * k.stride(0) + h * k.stride(1),
                       vp + r * v.stride(0) + h * v.stride(1), k.stride(2), lens[r], g,
                       static_cast<float>(scale), op + q_at, scores);
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
  switch (hd) {
    case 16: run<16>(q, k, v, ctx, scale, out); break;
    case 32: run<32>(q, k, v, ctx, scale, out); break;
    case 64: run<64>(q, k, v, ctx, scale, out); break;
    case 128: run<128>(q, k, v, ctx, scale, out); break;
    default: TORCH_CHECK(false, "decode_attention supports head_dim 16, 32, 64, 128; got ", hd);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(exegpt_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor ctx, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(exegpt_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
