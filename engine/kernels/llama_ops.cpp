// The Llama family's elementwise work around the projections, one pass each, for bf16
// activations (see engine/kernels/__init__.py). Both round as Hugging Face's modules do in
// bf16, step for step, so their results match the unfused torch operations.
//
//   rms_norm(x [T, H], weight [H], eps) -> [T, H]
//       weight * bf16(x * rsqrt(mean(x^2) + eps)), the mean and the scaling in float32
//   rotary(x [T, heads, D], cos [T, 1, D], sin [T, 1, D]) -> [T, heads, D]
//       bf16(x * cos) + bf16(rotate_half(x) * sin), rotate_half(x) = (-x[D/2:], x[:D/2])
//
// x may be a strided view (the rotary's is q and k inside the fused QKV output); the
// last dimension must be contiguous. Rows are split over torch's thread pool.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

using bf16 = c10::BFloat16;

inline float round_bf16(float x) { return static_cast<float>(bf16(x)); }

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  TORCH_CHECK(x_in.dim() == 2 && weight_in.dim() == 1 && x_in.size(1) == weight_in.size(0),
              "rms_norm takes x [T, H] and weight [H]");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && weight_in.scalar_type() == at::kBFloat16,
              "rms_norm takes bf16 tensors");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t rows = x.size(0), width = x.size(1);
  at::Tensor out = at::empty({rows, width}, x.options());
  const bf16* xp = x.const_data_ptr<bf16>();
  const bf16* wp = weight.const_data_ptr<bf16>();
  bf16* op = out.mutable_data_ptr<bf16>();
  const float epsilon = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bf16* xr = xp + r * width;
      float squares = 0.f;
      for (int64_t c = 0; c < width; ++c) {
        const float v = static_cast<float>(xr[c]);
        squares += v * v;
      }
      const float scale = 1.f / std::sqrt(squares / static_cast<float>(width) + epsilon);
      bf16* orow = op + r * width;
      for (int64_t c = 0; c < width; ++c) {
        const float normed = round_bf16(static_cast<float>(xr[c]) * scale);
        orow[c] = bf16(normed * static_cast<float>(wp[c]));
      }
    }
  });
  return out;
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary takes x [T, heads, D], D contiguous");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos_in.scalar_type() == at::kBFloat16 &&
                  sin_in.scalar_type() == at::kBFloat16,
              "rotary takes bf16 tensors");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0, "rotary needs an even head size");
  const at::Tensor cos = cos_in.reshape({-1, dim}).contiguous();
  const at::Tensor sin = sin_in.reshape({-1, dim}).contiguous();
  TORCH_CHECK(cos.size(0) == tokens && sin.size(0) == tokens, "one cos and sin row per token");
  at::Tensor out = at::empty({tokens, heads, dim}, x.options());
  const bf16* xp = x.const_data_ptr<bf16>();
  const bf16* cp = cos.const_data_ptr<bf16>();
  const bf16* sp = sin.const_data_ptr<bf16>();
  bf16* op = out.mutable_data_ptr<bf16>();
  const int64_t token_stride = x.stride(0), head_stride = x.stride(1);
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const bf16* c = cp + t * dim;
      const bf16* s = sp + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        const bf16* xh = xp + t * token_stride + h * head_stride;
        bf16* oh = op + (t * heads + h) * dim;
        for (int64_t d = 0; d < half; ++d) {
          const float a = round_bf16(static_cast<float>(xh[d]) * static_cast<float>(c[d]));
          const float b =
              round_bf16(static_cast<float>(xh[d + half]) * static_cast<float>(s[d]));
          oh[d] = bf16(a - b);
        }
        for (int64_t d = half; d < dim; ++d) {
          const float a = round_bf16(static_cast<float>(xh[d]) * static_cast<float>(c[d]));
          const float b =
              round_bf16(static_cast<float>(xh[d - half]) * static_cast<float>(s[d]));
          oh[d] = bf16(a + b);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exegpt_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(exegpt_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary", &rotary);
}
